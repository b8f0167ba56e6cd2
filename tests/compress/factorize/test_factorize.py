"""The per-matrix methods against brute-force optima, on random matrices with correlated inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sigmascale_jax.compress.factorize.asvd import asvd_factors
from sigmascale_jax.compress.factorize.svd import svd_factors
from sigmascale_jax.compress.factorize.svd_llm import refit_left, svd_llm_factors
from sigmascale_jax.compress.ranks import achieved_ratio, break_even_rank, uniform_rank
from sigmascale_jax.linalg.lowrank import activation_loss
from sigmascale_jax.linalg.whitening import WHITEN_CHOLESKY, WHITEN_EIGH, WHITEN_SHIFTED, whitening


def correlated_problem(m=24, n=32, t=400, seed=0):
    """W: [m, n]; X: [n, t] with correlated features of very unequal scale (as LLM activations are)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((m, n))
    mix = rng.standard_normal((n, n)) * 0.3 + np.eye(n)
    scales = np.exp(rng.uniform(-2.0, 2.0, n))
    x = (mix @ rng.standard_normal((n, t))) * scales[:, None]
    return w, x


def brute_force_optimum(w, x, k):
    """min over rank-k Ŵ of ‖(W − Ŵ)X‖²: the tail energy of the SVD of W X (Eckart–Young on Y = W X)."""
    s = np.linalg.svd(w @ x, compute_uv=False)
    return float(np.sum(s[k:] ** 2))


@pytest.mark.parametrize("k", [3, 8, 15])
def test_svd_llm_reaches_the_optimum_and_beats_asvd_and_svd(k):
    w, x = correlated_problem()
    g = x @ x.T
    absmean = np.abs(x).mean(axis=1)
    with jax.enable_x64(True):
        W, G = jnp.asarray(w), jnp.asarray(g)
        loss = {
            "svd": activation_loss(W, jnp.matmul(*svd_factors(W, k)), G),
            "asvd": activation_loss(W, jnp.matmul(*asvd_factors(W, jnp.asarray(absmean), k)), G),
            "svd-llm": activation_loss(W, jnp.matmul(*svd_llm_factors(W, G, k)), G),
        }
    loss = {m: float(v) for m, v in loss.items()}
    assert loss["svd-llm"] == pytest.approx(brute_force_optimum(w, x, k), rel=1e-8)
    assert loss["svd-llm"] <= loss["asvd"] <= loss["svd"]
    assert loss["svd-llm"] < 0.9 * loss["svd"]  # the inputs' correlation really matters here


def test_factor_shapes_and_rank():
    w, x = correlated_problem()
    b, c = svd_llm_factors(jnp.asarray(w, jnp.float32), jnp.asarray(x @ x.T, jnp.float32), 5)
    assert b.shape == (24, 5) and c.shape == (5, 32)
    assert np.linalg.matrix_rank(np.asarray(b @ c, np.float64), tol=1e-4) == 5


def test_whitening_fallbacks_stay_finite():
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        x = rng.standard_normal((16, 40))
        s, route = whitening(jnp.asarray(x @ x.T))
        assert int(route) == WHITEN_CHOLESKY
        np.testing.assert_allclose(np.asarray(s @ s.T), x @ x.T, rtol=1e-10, atol=1e-10)
        # fewer tokens than features: singular Gram matrix; Cholesky fails, the shifted one works
        x = rng.standard_normal((16, 5))
        s, route = whitening(jnp.asarray(x @ x.T))
        assert int(route) == WHITEN_SHIFTED and np.isfinite(np.asarray(s)).all()
        # not a Gram matrix at all (NaN poisons both Choleskys): the eigh route answers
        bad = np.eye(4)
        bad[0, 0] = np.nan
        s, route = whitening(jnp.asarray(bad))
        assert int(route) == WHITEN_EIGH
        w, x = correlated_problem(m=6, n=16, t=5)
        b, c = svd_llm_factors(jnp.asarray(w), jnp.asarray(x @ x.T), 4)
        assert np.isfinite(np.asarray(b)).all() and np.isfinite(np.asarray(c)).all()
        # with rank ≥ the data's rank (5), the kept part reproduces W on the data
        b, c = svd_llm_factors(jnp.asarray(w), jnp.asarray(x @ x.T), 5)
        np.testing.assert_allclose(np.asarray(b @ c) @ x, w @ x, atol=1e-5 * np.abs(w @ x).max())


def test_refit_left_is_the_least_squares_solution():
    w, x = correlated_problem(seed=3)
    with jax.enable_x64(True):
        _, c = svd_factors(jnp.asarray(w), 6)  # a C that is not optimal for this data
        b = np.asarray(refit_left(jnp.asarray(w), jnp.asarray(x @ x.T), c))
        c = np.asarray(c)
    # min_B ‖W X − B (C X)‖ by lstsq, independently
    b_ls = np.linalg.lstsq((c @ x).T, (w @ x).T, rcond=None)[0].T
    np.testing.assert_allclose(b, b_ls, rtol=1e-6, atol=1e-8)


def test_methods_compose_with_jit_and_vmap():
    w, x = correlated_problem()
    ws = jnp.stack([jnp.asarray(w, jnp.float32), 2 * jnp.asarray(w, jnp.float32)])
    gs = jnp.stack([jnp.asarray(x @ x.T, jnp.float32)] * 2)
    b, c = jax.jit(jax.vmap(lambda w, g: svd_llm_factors(w, g, 4)))(ws, gs)
    assert b.shape == (2, 24, 4)
    np.testing.assert_allclose(np.asarray(b[1] @ c[1]), 2 * np.asarray(b[0] @ c[0]), rtol=1e-3, atol=1e-3)


def test_uniform_ranks_follow_each_matrix_shape():
    # SmolLM2: q 576x576, k/v 192x576 (3 KV heads of 64), gate/up 1536x576
    assert uniform_rank(576, 576, 0.2) == int(0.8 * 576 * 576 / 1152)
    assert uniform_rank(192, 576, 0.2) == int(0.8 * 192 * 576 / 768) == 115
    assert uniform_rank(192, 576, 0.2) < uniform_rank(576, 576, 0.2)
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    triples = [(m, n, uniform_rank(m, n, 0.3)) for m, n in shapes]
    assert 0.3 <= achieved_ratio(triples) < 0.31
    assert break_even_rank(576, 576) == 287


def test_batched_svd_llm_on_real_sizes_finishes():
    """Regression: a vmapped whitening-with-fallbacks + SVD deadlocked XLA:CPU at 576x576 (see compress/factorize/svd_llm.svd_llm_group)."""
    import subprocess
    import sys

    code = (
        "import numpy as np, jax, jax.numpy as jnp\n"
        "from sigmascale_jax.compress.factorize.svd_llm import svd_llm_group\n"
        "x = np.random.default_rng(0).standard_normal((576, 1200))\n"
        "with jax.enable_x64(True):\n"
        "    g = jnp.asarray(np.stack([x @ x.T] * 2)); w = jnp.asarray(np.random.default_rng(1).standard_normal((2, 576, 576)))\n"
        "    b, c, loss, routes = svd_llm_group(w, g, 200, g)\n"
        "    assert np.isfinite(np.asarray(loss)).all() and routes == [0, 0]\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_batched_svd_llm_falls_back_per_matrix():
    """One singular Gram matrix in a batch: that matrix takes the shifted Cholesky, the other stays plain."""
    from sigmascale_jax.compress.factorize.svd_llm import svd_llm_group

    rng = np.random.default_rng(5)
    full, thin = rng.standard_normal((16, 80)), rng.standard_normal((16, 6))  # 6 tokens < 16 features
    with jax.enable_x64(True):
        w = jnp.asarray(rng.standard_normal((2, 12, 16)))
        g = jnp.asarray(np.stack([full @ full.T, thin @ thin.T]))
        b, c, loss, routes = svd_llm_group(w, g, 5)
        assert routes == [WHITEN_CHOLESKY, WHITEN_SHIFTED]
        assert np.isfinite(np.asarray(b)).all() and np.isfinite(np.asarray(c)).all()
        b0, c0 = svd_llm_factors(w[0], g[0], 5)
        np.testing.assert_allclose(np.asarray(b[0] @ c[0]), np.asarray(b0 @ c0), atol=1e-8)


def test_gram_solver_gives_the_svd_solvers_factors_on_smollm2():
    """svd-llm's eigh-of-the-Gram top singular triples = the full SVD's, on real weights and real calibration text.

    Block 2 of SmolLM2 (every projection shape), statistics of 8 C4 windows through blocks 0-1, ratio-0.4 ranks.
    Each singular pair may come with the opposite sign; B C, the loss and the float32 factors agree far below
    float32 rounding.
    """
    from conftest import DATA, SMOLLM2_DIR, require

    from sigmascale_jax.compress.factorize._blocks import low_rank_groups, stacked
    from sigmascale_jax.compress.factorize.svd_llm import svd_llm_group
    from sigmascale_jax.compress.pipeline import apply_in_chunks, run_windows
    from sigmascale_jax.compress.plan import RunSpec
    from sigmascale_jax.compress.ranks import block_ranks
    from sigmascale_jax.compress.stats import block_stats
    from sigmascale_jax.io.hf_map import load_block, load_outer
    from sigmascale_jax.io.sources import open_model

    src = open_model(str(require(SMOLLM2_DIR)))
    cfg = src.cfg
    spec = RunSpec(model=str(SMOLLM2_DIR), ratio=0.4, nsamples=8, seq_len=256)
    xs = np.asarray(load_outer(src.reader, cfg)["embed"])[run_windows(src, spec, str(require(DATA)))]
    for i in range(2):
        xs = apply_in_chunks(load_block(src.reader, cfg, i), xs, cfg, 4)
    block = load_block(src.reader, cfg, 2)
    _, stats = block_stats(block, xs, cfg, 4)
    with jax.enable_x64(True):
        ranks = block_ranks(cfg, 0.4)
        for shape, names in low_rank_groups(block, ranks).items():
            w, gram, _ = stacked(block, stats, names)
            rank = ranks[names[0]]  # uniform ranks: one per shape
            b_s, c_s, loss_s, _ = svd_llm_group(w, gram, rank, solver="svd")
            b_g, c_g, loss_g, _ = svd_llm_group(w, gram, rank, solver="gram")
            b_s, c_s, b_g, c_g = (np.asarray(a) for a in (b_s[:, :, :rank], c_s[:, :rank], b_g[:, :, :rank],
                                                          c_g[:, :rank]))
            prod_s, prod_g = b_s @ c_s, b_g @ c_g
            assert np.abs(prod_g - prod_s).max() <= 1e-9 * np.abs(prod_s).max(), names
            np.testing.assert_allclose(np.asarray(loss_g), np.asarray(loss_s), rtol=1e-9)
            sign = np.sign(np.sum(b_s * b_g, axis=1))  # [G, k]: +1 or -1 per singular pair
            assert (sign != 0).all()
            np.testing.assert_allclose(b_g * sign[:, None, :], b_s, atol=1e-8 * np.abs(b_s).max())
            np.testing.assert_allclose(c_g * sign[:, :, None], c_s, atol=1e-8 * np.abs(c_s).max())
        with pytest.raises(ValueError, match="float64"):  # squaring W S in float32 is refused when asked for
            svd_llm_group(w.astype(jnp.float32), gram.astype(jnp.float32), rank, solver="gram")
