"""Calibration statistics accumulate on the device in double-float32 and equal a float64 sum of the chunks."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from conftest import STORIES, require


def test_device_accumulation_equals_a_float64_sum_of_the_chunks():
    from sigmascale_jax.compress.stats import block_stats, block_stats_chunk
    from sigmascale_jax.io.hf_map import load_block
    from sigmascale_jax.io.sources import open_model

    src = open_model(str(require(STORIES)))
    cfg = src.cfg
    block = load_block(src.reader, cfg, 1)
    xs = (np.random.default_rng(0).standard_normal((20, 64, cfg.hidden_size)) * 3).astype(np.float32)
    ys, stats = block_stats(block, xs, cfg, 3)
    ref_out, ref = [], {}
    for i in range(0, len(xs), 3):  # what the statistics were before: every chunk copied out, summed in float64
        out, chunk = block_stats_chunk(block, jnp.asarray(xs[i : i + 3]), cfg)
        ref_out.append(np.asarray(out))
        for name, (g, a) in chunk.items():
            acc = ref.setdefault(name, [0.0, 0.0])
            acc[0] = acc[0] + np.asarray(g, np.float64)
            acc[1] = acc[1] + np.asarray(a, np.float64)
    np.testing.assert_array_equal(ys, np.concatenate(ref_out))
    for name, (gram, abs_sum) in ref.items():
        assert stats[name]["gram"].dtype == np.float64 and stats[name]["tokens"] == 20 * 64
        assert np.abs(stats[name]["gram"] - gram).max() <= 1e-14 * np.abs(gram).max(), name
        np.testing.assert_allclose(stats[name]["absmean"], abs_sum / (20 * 64), rtol=1e-14)


def test_double_float_accumulation_keeps_what_float32_loses():
    from sigmascale_jax.compress.stats import accumulate

    # float32's spacing at 1e8 is 8: adding 1.0 to it is lost every time; the pair keeps all 999 of them
    assert np.float32(1e8) + np.float32(1.0) == np.float32(1e8)
    acc = {"t": ((jnp.full(4, 1e8, jnp.float32), jnp.zeros(4, jnp.float32)),)}
    for _ in range(999):
        acc = accumulate(acc, {"t": (jnp.ones(4, jnp.float32),)})
    (hi, lo), = acc["t"]
    np.testing.assert_array_equal(np.asarray(hi, np.float64) + np.asarray(lo, np.float64), np.full(4, 1e8 + 999))


def test_statistics_without_outputs_are_the_same():
    """`outputs=False` (the --sequential svd-llm pass) skips the block's output and changes no statistic."""
    from sigmascale_jax.compress.stats import block_stats
    from sigmascale_jax.io.hf_map import load_block
    from sigmascale_jax.io.sources import open_model

    src = open_model(str(require(STORIES)))
    block = load_block(src.reader, src.cfg, 2)
    xs = (np.random.default_rng(3).standard_normal((10, 64, src.cfg.hidden_size)) * 2).astype(np.float32)
    ys, full = block_stats(block, xs, src.cfg, 4)
    none, taps_only = block_stats(block, xs, src.cfg, 4, outputs=False)
    assert none is None and ys.shape == xs.shape
    for name, s in full.items():
        np.testing.assert_allclose(taps_only[name]["gram"], s["gram"], rtol=1e-6, atol=1e-6 * np.abs(s["gram"]).max())
        np.testing.assert_allclose(taps_only[name]["absmean"], s["absmean"], rtol=1e-6)
        assert taps_only[name]["tokens"] == s["tokens"]
