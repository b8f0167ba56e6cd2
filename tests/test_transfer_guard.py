"""The hot loops move nothing between host and device: each runs under `jax.transfer_guard("disallow")`.

On CPU the device's memory is the host's, so only host-to-device transfers are caught here (a GPU or TPU also
catches the other direction); those are what a loop fed with per-chunk host arrays would do.
"""

from __future__ import annotations

import contextlib

import jax
import numpy as np
import pytest
from conftest import STORIES, require


@pytest.fixture
def guards(monkeypatch):
    """The levels of every `jax.transfer_guard` entered during the test (the real guard still applies)."""
    entered = []
    real = jax.transfer_guard

    @contextlib.contextmanager
    def spy(level):
        entered.append(level)
        with real(level):
            yield

    monkeypatch.setattr(jax, "transfer_guard", spy)
    return entered


def test_the_guard_catches_an_implicit_transfer_on_this_backend():
    with jax.transfer_guard("disallow"), pytest.raises(Exception, match="Disallowed host-to-device"):
        jax.jit(lambda x: x + 1)(np.ones(3, np.float32))


def test_statistics_propagation_sigmascale_perplexity_and_generation_loops_are_guarded(guards):
    from sigmascale_jax.compress.factorize.sigmascale.block import sigmascale_block
    from sigmascale_jax.compress.pipeline import apply_in_chunks
    from sigmascale_jax.compress.stats import block_stats
    from sigmascale_jax.deploy.generate import generate
    from sigmascale_jax.eval.perplexity import perplexity
    from sigmascale_jax.io.hf_map import load_block, load_params
    from sigmascale_jax.io.sources import open_model

    src = open_model(str(require(STORIES)))
    cfg = src.cfg
    block = load_block(src.reader, cfg, 1)  # host (numpy) weights, as the pipeline reads them
    xs = (np.random.default_rng(0).standard_normal((10, 32, cfg.hidden_size))).astype(np.float32)
    ys, stats = block_stats(block, xs, cfg, 4)  # 4 + 4 + 2 windows: two chunk shapes
    assert guards == ["disallow"] and ys.shape == xs.shape
    np.testing.assert_allclose(apply_in_chunks(block, xs, cfg, 4), ys, rtol=1e-6, atol=1e-6)
    assert guards == ["disallow"] * 2
    ranks = {n: 8 for n in ("q", "k", "v", "o", "gate", "up", "down")}
    sigmascale_block(block, stats, xs, ys, cfg, ranks, steps=2, eval_every=1, batch_windows=4, holdout=0.2)
    assert guards == ["disallow"] * 3
    windows = np.random.default_rng(1).integers(0, cfg.vocab_size, (5, 16)).astype(np.int32)
    params = load_params(src.reader, cfg)
    res = perplexity(params, cfg, windows, batch_size=2, progress=False)  # 2 + 2 + 1 padded
    assert guards == ["disallow"] * 4 and np.isfinite(res["ppl"]) and res["windows"] == 5
    seen = []
    out = generate(params, cfg, windows[:2, :4], 6, temperature=0.8, top_p=0.9, on_tokens=seen.append)
    assert guards == ["disallow"] * 5 and out.shape == (2, 10) and len(seen) == 6
