"""Ranks as data give the factors of ranks as shapes: every factorizer's group function, which decomposes each
matrix shape once and cuts to each matrix's rank by a mask, equals the static-rank per-matrix functions (the
slicing code the pipeline ran before) within 1e-6, on mixed ranks in one group."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

RANKS = np.array([1, 7, 13, 20], np.int32)  # one group, four ranks


def stack(seed: int = 0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((4, 24, 20))
    x = rng.standard_normal((4, 20, 300)) * np.exp(rng.uniform(-1.5, 1.5, (4, 20, 1)))
    gram = np.einsum("gnt,gmt->gnm", x, x)
    absmean = np.abs(x).mean(axis=-1)
    return w, gram, absmean


def close(b_full, c_full, b_ref, c_ref, k):
    """The masked pair cut to k gives the reference's product (a singular pair's sign may differ)."""
    b, c = np.asarray(b_full)[:, :k], np.asarray(c_full)[:k]
    assert np.all(np.asarray(b_full)[:, k:] == 0) and np.all(np.asarray(c_full)[k:] == 0)
    got, want = b @ c, np.asarray(b_ref) @ np.asarray(c_ref)
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max(), (k, np.abs(got - want).max())


@pytest.mark.parametrize("method", ["svd", "asvd", "svd-llm", "svd-llm-update"])
def test_group_functions_equal_the_static_rank_factors(method):
    from sigmascale_jax.compress.factorize.asvd import asvd_factors, asvd_group
    from sigmascale_jax.compress.factorize.svd import svd_factors, svd_group
    from sigmascale_jax.compress.factorize.svd_llm import refit_left, svd_llm_factors, svd_llm_group

    w, gram, absmean = stack()
    with jax.enable_x64(True):
        w, gram, absmean = (jnp.asarray(a) for a in (w, gram, absmean))
        refit = gram[::-1]  # another Gram to refit on (the compressed model's inputs, in the pipeline)
        if method == "svd":
            b, c, _ = svd_group(w, gram, jnp.asarray(RANKS))
        elif method == "asvd":
            b, c, _ = asvd_group(w, gram, absmean, jnp.asarray(RANKS), alpha=0.5)
        else:
            b, c, _, _ = svd_llm_group(w, gram, RANKS, refit if method == "svd-llm-update" else None)
        for j, k in enumerate(RANKS.tolist()):
            if method == "svd":
                ref = svd_factors(w[j], k)
            elif method == "asvd":
                ref = asvd_factors(w[j], absmean[j], k, 0.5)
            else:
                ref = svd_llm_factors(w[j], gram[j], k)
                if method == "svd-llm-update":
                    ref = (refit_left(w[j], refit[j], ref[1]), ref[1])
            close(b[j], c[j], *ref, k)


def test_sigmascale_final_factors_equal_the_static_rank_factors():
    from sigmascale_jax.compress.factorize.sigmascale.block import _final_factors, scaled_factors

    w, gram, _ = stack(1)
    rng = np.random.default_rng(2)
    with jax.enable_x64(True):
        for j, k in enumerate(RANKS.tolist()):
            s = jnp.linalg.cholesky(jnp.asarray(gram[j]))
            rho, gamma = (jnp.asarray(0.3 * rng.standard_normal(n)) for n in w[j].shape)
            full = _final_factors(jnp.asarray(w[j]), s, rho, gamma, jnp.asarray(gram[j]), np.int32(k))
            b, c, _ = scaled_factors(jnp.asarray(w[j]), s, rho, gamma, k)
            close(full["b"], full["c"], b, c, k)


def test_the_learning_scan_at_mixed_ranks_equals_one_run_per_rank(stories_block_small):
    """Learning with the block's ranks as data gives, to 1e-6, what the same scan learns when each projection's
    rank is the only one it sees: masks select exactly what slices did."""
    from sigmascale_jax.compress.factorize.sigmascale.block import learn_block_scales
    from sigmascale_jax.model.modeling import PROJECTION_INPUT, PROJECTIONS

    cfg, block, xs, ys, stats = stories_block_small
    shapes = cfg.projection_shapes()
    ranks = {p: 3 + 5 * i for i, p in enumerate(PROJECTIONS)}  # every matrix its own
    white = {n: jnp.linalg.cholesky(jnp.asarray(stats[PROJECTION_INPUT[n]]["gram"], jnp.float32)) for n in PROJECTIONS}
    train, hold = (jnp.asarray(xs[:6]), jnp.asarray(ys[:6])), (jnp.asarray(xs[6:]), jnp.asarray(ys[6:]))
    kw = dict(cfg=cfg, steps=3, step_windows=3, eval_every=1)
    mixed, trace = learn_block_scales(block, white, train, hold, jax.random.key(0), ranks=ranks, **kw)
    # the held-out loss at step 0 is SVD-LLM's at these ranks: the block with each matrix cut by slicing
    from sigmascale_jax.compress.factorize.sigmascale.block import block_loss, zero_scales

    sliced = dict(block)
    for n in PROJECTIONS:
        u, s, vt = jnp.linalg.svd(jnp.asarray(block[n]["w"]) @ white[n], full_matrices=False)
        k = ranks[n]
        a_k = (u[:, :k] * s[:k]) @ vt[:k]
        sliced[n] = {"w": jax.scipy.linalg.solve_triangular(white[n], a_k.T, trans="T", lower=True).T}
    sliced_loss = block_loss(zero_scales(sliced, ()), sliced, white, hold[0], hold[1], cfg, {})
    assert float(trace["hold"][0]) == pytest.approx(float(sliced_loss), rel=1e-5)
    assert all(mixed[n]["rho"].shape == (shapes[n][0],) for n in PROJECTIONS)


@pytest.fixture(scope="module")
def stories_block_small():
    from conftest import DATA, STORIES, require

    from sigmascale_jax.compress.calibration import calibration_text, sample_windows
    from sigmascale_jax.compress.stats import block_stats
    from sigmascale_jax.io.data import find_data_dir
    from sigmascale_jax.io.hf_map import load_block, load_outer
    from sigmascale_jax.io.sources import open_model

    src = open_model(str(require(STORIES)))
    ids = np.asarray(src.tokenizer()(calibration_text("c4", find_data_dir(str(DATA)))).input_ids)
    xs = np.asarray(load_outer(src.reader, src.cfg)["embed"])[sample_windows(ids, 8, 32, 0)]
    block = load_block(src.reader, src.cfg, 1)
    ys, stats = block_stats(block, xs, src.cfg, 4)
    return src.cfg, block, xs, ys, stats
