"""SigmaScale's math on small matrices, and a small end-to-end run on the real stories260k."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import DATA, STORIES, require

import sigmascale_jax
from sigmascale_jax.compress.factorize.sigmascale.block import (
    effective_rank_entropy,
    learn_block_scales,
    scaled_factors,
    scaled_reconstruction,
    sigmascale_block,
)
from sigmascale_jax.compress.factorize.svd_llm import svd_llm_factors
from sigmascale_jax.linalg.truncation import truncated_reconstruction


def jax_svd_reference(a, k):
    u, s, vt = jnp.linalg.svd(a, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vt[:k]


@pytest.mark.parametrize("m,n,k", [(7, 5, 2), (5, 7, 3), (6, 6, 5)])
def test_custom_vjp_matches_jax_and_finite_differences(m, n, k):
    rng = np.random.default_rng(m * 10 + n)
    with jax.enable_x64(True):
        a, g, e = (jnp.asarray(rng.standard_normal((m, n))) for _ in range(3))
        ours = jax.grad(lambda a: jnp.sum(g * truncated_reconstruction(a, k)))(a)
        theirs = jax.grad(lambda a: jnp.sum(g * jax_svd_reference(a, k)))(a)
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=1e-10)
        h = 1e-6
        f = lambda a: jnp.sum(g * truncated_reconstruction(a, k))  # noqa: E731
        fd = (f(a + h * e) - f(a - h * e)) / (2 * h)
        assert float(jnp.sum(ours * e)) == pytest.approx(float(fd), rel=1e-6, abs=1e-8)


def test_gradient_stays_finite_when_singular_values_repeat():
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    v, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    g = jnp.asarray(rng.standard_normal((6, 6)), jnp.float32)
    for sigma in ([3, 2, 2, 1, 0.5, 0.5], [1, 1, 1, 1, 1, 1]):  # repeats inside the cut; all equal (zero gap at the cut)
        a = jnp.asarray(u @ np.diag(sigma) @ v.T, jnp.float32)
        grad = jax.grad(lambda a: jnp.sum(g * truncated_reconstruction(a, 3)))(a)
        assert np.isfinite(np.asarray(grad)).all()
    # repeats away from the cut: the gradient is still the true one (finite differences)
    with jax.enable_x64(True):
        a = jnp.asarray(u @ np.diag([3, 2, 2, 1, 0.5, 0.5]) @ v.T)
        g64, e = jnp.asarray(np.asarray(g), jnp.float64), jnp.asarray(rng.standard_normal((6, 6)))
        f = lambda a: jnp.sum(g64 * truncated_reconstruction(a, 3))  # noqa: E731
        grad = jax.grad(f)(a)
        fd = (f(a + 1e-6 * e) - f(a - 1e-6 * e)) / 2e-6
        assert float(jnp.sum(grad * e)) == pytest.approx(float(fd), rel=1e-6)


def test_zero_scales_reproduce_svd_llm_and_scales_change_it():
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        w = jnp.asarray(rng.standard_normal((12, 16)))
        x = rng.standard_normal((16, 60)) * np.exp(rng.uniform(-1, 1, 16))[:, None]
        gram = jnp.asarray(x @ x.T)
        s = jnp.linalg.cholesky(gram)
        b_ref, c_ref = svd_llm_factors(w, gram, 5)
        zero_m, zero_n = jnp.zeros(12), jnp.zeros(16)
        np.testing.assert_allclose(np.asarray(scaled_reconstruction(w, s, zero_m, zero_n, 5)), np.asarray(b_ref @ c_ref), atol=1e-10)
        b, c, _ = scaled_factors(w, s, zero_m, zero_n, 5)
        np.testing.assert_allclose(np.asarray(b @ c), np.asarray(b_ref @ c_ref), atol=1e-10)
        rho = jnp.asarray(rng.standard_normal(12))
        b, c, _ = scaled_factors(w, s, rho, zero_n, 5)
        np.testing.assert_allclose(np.asarray(b @ c), np.asarray(scaled_reconstruction(w, s, rho, zero_n, 5)), atol=1e-10)
        assert np.abs(np.asarray(b @ c - b_ref @ c_ref)).max() > 1e-3


def test_effective_rank_entropy():
    assert float(effective_rank_entropy(jnp.ones(8))) == pytest.approx(np.log(8))
    assert float(effective_rank_entropy(jnp.asarray([1.0, 0.0, 0.0]))) == pytest.approx(0.0)


@pytest.fixture(scope="module")
def stories_block():
    """Block 1 of stories260k with its real calibration inputs (through dense block 0) and outputs."""
    from sigmascale_jax.compress.calibration import calibration_text, sample_windows
    from sigmascale_jax.compress.stats import block_stats
    from sigmascale_jax.io.data import find_data_dir
    from sigmascale_jax.io.hf_map import load_block, load_outer
    from sigmascale_jax.io.sources import open_model
    from sigmascale_jax.model.modeling import block_apply

    src = open_model(str(require(STORIES)))
    ids = np.asarray(src.tokenizer()(calibration_text("c4", find_data_dir(str(DATA)))).input_ids)
    windows = sample_windows(ids, 12, 64, 0)
    xs = np.asarray(load_outer(src.reader, src.cfg)["embed"][windows])
    xs = np.asarray(block_apply(load_block(src.reader, src.cfg, 0), jnp.asarray(xs), src.cfg))
    block = load_block(src.reader, src.cfg, 1)
    ys, stats = block_stats(block, xs, src.cfg, 6)
    return src.cfg, block, xs, ys, stats


@pytest.mark.parametrize("kind", ["block", "layer"])
def test_learning_lowers_the_held_out_loss_and_never_ends_worse(stories_block, kind):
    from sigmascale_jax.compress.ranks import block_ranks

    cfg, block, xs, ys, stats = stories_block
    ranks = block_ranks(cfg, 0.4)
    b = sigmascale_block(block, stats, xs, ys, cfg, ranks, kind=kind, steps=25, lr=1e-2, eval_every=5).block
    assert [i for i, _ in b["holdout_trace"]] == [0, 5, 10, 15, 20, 25]
    assert b["holdout_best"] <= b["holdout_init"]
    if kind == "layer":
        # step 0 is SVD-LLM, the exact optimum of each layer's loss on all windows: the
        # held-out layer loss has (almost) nothing left to gain; the block loss does.
        assert b["holdout_best"] > 0.97 * b["holdout_init"]
        return
    assert b["holdout_best"] < 0.97 * b["holdout_init"] and b["best_step"] > 0
    # a learning rate that only makes things worse: the guard keeps step 0 (SVD-LLM)
    res = sigmascale_block(block, stats, xs, ys, cfg, ranks, kind="block", steps=5, lr=50.0)
    assert res.block["best_step"] == 0 and res.block["holdout_best"] == res.block["holdout_init"]
    for n in ("q", "down"):
        assert res.matrices[n]["entropy_whitened"] > 0 and res.matrices[n]["entropy_scaled"] > 0


def test_early_stopping_skips_steps_and_learns_what_a_full_run_learns_by_then(stories_block):
    """--min-gain stops a block when the held-out gain flattens; until then it is the full run, step for step."""
    from sigmascale_jax.compress.ranks import block_ranks

    cfg, block, xs, ys, stats = stories_block
    ranks = block_ranks(cfg, 0.4)
    kw = dict(kind="block", steps=40, lr=1e-2, eval_every=5)
    full = sigmascale_block(block, stats, xs, ys, cfg, ranks, **kw)
    off = sigmascale_block(block, stats, xs, ys, cfg, ranks, **kw, min_gain=0.0)
    assert full.block["steps_run"] == off.block["steps_run"] == 40
    np.testing.assert_array_equal(np.asarray(full.params["q"]["b"]), np.asarray(off.params["q"]["b"]))
    early = sigmascale_block(block, stats, xs, ys, cfg, ranks, **kw, min_gain=0.5)
    e, f = early.block, full.block
    trace = dict((i, h) for i, h in f["holdout_trace"])
    # the rule, replayed on the full run's trace, names the same stopping step
    expect, best = 40, trace[0]
    for j, i in enumerate(sorted(trace)[1:], start=1):
        best = min(best, trace[i])
        if j >= 2 and trace[i - 5] - trace[i] < 0.5 * (trace[0] - best):
            expect = i
            break
    assert expect < 40, "this block's gain never flattened at min_gain 0.5: the test shows nothing"
    assert e["steps_run"] == expect and e["holdout_trace"][-1][0] == expect
    kept = [[i, h] for i, h in f["holdout_trace"] if i <= expect]
    assert [i for i, _ in e["holdout_trace"]] == [i for i, _ in kept]
    np.testing.assert_allclose([h for _, h in e["holdout_trace"]], [h for _, h in kept], rtol=1e-6)
    np.testing.assert_allclose(e["holdout_best"], min(h for _, h in kept), rtol=1e-6)


def test_learning_is_a_pure_function_under_jit_and_grad(stories_block):
    from sigmascale_jax.compress.factorize.sigmascale.block import block_loss, zero_scales
    from sigmascale_jax.compress.ranks import block_ranks
    from sigmascale_jax.model.modeling import PROJECTION_INPUT, PROJECTIONS

    cfg, block, xs, ys, stats = stories_block
    ranks = block_ranks(cfg, 0.4)
    white = {n: jnp.linalg.cholesky(jnp.asarray(stats[PROJECTION_INPUT[n]]["gram"], jnp.float32)) for n in PROJECTIONS}
    train, hold = (jnp.asarray(xs[:8]), jnp.asarray(ys[:8])), (jnp.asarray(xs[8:]), jnp.asarray(ys[8:]))
    kw = dict(cfg=cfg, ranks=tuple(sorted(ranks.items())), steps=4, batch_windows=3, eval_every=2)
    a, trace_a = learn_block_scales(block, white, train, hold, jax.random.key(1), **kw)
    b, trace_b = learn_block_scales(block, white, train, hold, jax.random.key(1), **kw)
    _, trace_c = learn_block_scales(block, white, train, hold, jax.random.key(2), **kw)
    np.testing.assert_array_equal(np.asarray(trace_a["train"]), np.asarray(trace_b["train"]))
    assert not np.array_equal(np.asarray(trace_a["train"]), np.asarray(trace_c["train"]))  # the key draws the minibatches
    assert trace_a["hold"].shape == (5,) and trace_a["train"].shape == (4,)
    # held-out loss measured at step 0, every 2 steps and at the end only
    assert np.isfinite(np.asarray(trace_a["hold"])).tolist() == [True, False, True, False, True]
    x4, y4 = jnp.asarray(xs[:4]), jnp.asarray(ys[:4])
    grads = jax.jit(jax.grad(lambda s: block_loss(s, block, white, x4, y4, cfg, ranks)))(zero_scales(block))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads))


def test_layer_loss_from_grams_equals_the_loss_on_tokens(stories_block):
    """The layer loss needs only Gram matrices: it equals Σ ‖(W − Ŵ)X‖² / ‖W X‖² computed on the tokens."""
    from sigmascale_jax.compress.factorize.sigmascale.block import layer_loss, reconstruct_block
    from sigmascale_jax.compress.ranks import block_ranks
    from sigmascale_jax.model.modeling import PROJECTION_INPUT, PROJECTIONS, block_forward_taps, rope_cos_sin

    cfg, block, xs, ys, stats = stories_block
    ranks = block_ranks(cfg, 0.4)
    white = {n: jnp.linalg.cholesky(jnp.asarray(stats[PROJECTION_INPUT[n]]["gram"], jnp.float32)) for n in PROJECTIONS}
    rng = np.random.default_rng(3)
    scales = {n: {"rho": jnp.asarray(0.3 * rng.standard_normal(block[n]["w"].shape[0]), jnp.float32),
                  "gamma": jnp.asarray(0.3 * rng.standard_normal(block[n]["w"].shape[1]), jnp.float32)} for n in PROJECTIONS}
    grams = {t: jnp.asarray(stats[t]["gram"] / stats[t]["tokens"], jnp.float32) for t in stats}
    ours = float(layer_loss(scales, block, white, grams, ranks))
    approx = reconstruct_block(block, white, scales, ranks)
    cos, sin = rope_cos_sin(cfg, jnp.arange(xs.shape[1]))
    _, taps = block_forward_taps(block, jnp.asarray(xs), cfg, cos, sin)
    direct = 0.0
    for n in PROJECTIONS:
        a = np.asarray(taps[PROJECTION_INPUT[n]], np.float64).reshape(-1, block[n]["w"].shape[1])
        w, w_hat = np.asarray(block[n]["w"], np.float64), np.asarray(approx[n]["w"], np.float64)
        direct += np.sum((a @ (w - w_hat).T) ** 2) / np.sum((a @ w.T) ** 2)
    assert ours == pytest.approx(direct, rel=1e-3)
    assert direct > 0.01  # a real loss, not a trivially small one


def test_end_to_end_on_stories260k_beats_svd_llm(tmp_path):
    from sigmascale_jax.eval.cli import evaluate

    common = dict(nsamples=16, seq_len=128, batch_size=8, data_dir=str(DATA), progress=False)
    ss = sigmascale_jax.compress(str(require(STORIES)), "sigmascale", 0.4, tmp_path / "ss", steps=20, **common)
    sl = sigmascale_jax.compress(str(STORIES), "svd-llm", 0.4, tmp_path / "sl", **common)
    assert len(ss["blocks"]) == 5 and all(b["holdout_best"] <= b["holdout_init"] for b in ss["blocks"])
    # the learning loop's own time, per block and per step (compilation lands in the first block)
    assert all(b["learn_s"] > 0 and b["step_s"] == pytest.approx(b["learn_s"] / 20, abs=1e-3) for b in ss["blocks"])
    assert ss["ratio_achieved"] == sl["ratio_achieved"]
    assert {"entropy_w", "entropy_whitened", "entropy_scaled"} <= set(ss["matrices"][0])
    with np.load(tmp_path / "ss" / "spectra.npz") as spectra:
        assert len(spectra.files) == 5 * 7 * 3
        m = ss["matrices"][7 * 2 + 6]  # block 2, down
        assert (m["block"], m["name"]) == (2, "down")
        for key in ("w", "whitened", "scaled"):
            sig = spectra[f"2.down.{key}"]
            assert sig.shape == (min(m["shape"]),) and np.all(np.diff(sig) <= 0)
            assert float(effective_rank_entropy(jnp.asarray(sig))) == pytest.approx(m[f"entropy_{key}"], rel=1e-5)
    assert not (tmp_path / "sl" / "spectra.npz").exists()
    ppl = {k: evaluate(str(tmp_path / k), ["wikitext2"], seq_len=256, max_windows=6, data_dir=str(DATA), progress=False)["wikitext2"]["ppl"] for k in ("ss", "sl")}
    assert ppl["ss"] < ppl["sl"]


def test_entropy_script_draws_spectra_and_scatter(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    run = tmp_path / "ss"
    sigmascale_jax.compress(str(require(STORIES)), "sigmascale", 0.4, run, nsamples=8, seq_len=64, steps=2,
                            data_dir=str(DATA), progress=False)
    proc = subprocess.run([sys.executable, "scripts/plot_entropy.py", str(run), "--out", str(tmp_path / "ent")],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "ent_spectra.png").stat().st_size > 10_000 and (tmp_path / "ent_scatter.png").stat().st_size > 10_000
    result = json.loads((tmp_path / "ent.json").read_text())
    assert result["n"] == 35 and set(result["spearman_vs_rel_loss"]) == {"entropy_w", "entropy_whitened", "entropy_scaled"}
    assert all(-1 <= r <= 1 for r in result["spearman_vs_rel_loss"].values())


@pytest.mark.parametrize("m,n,k", [(30, 50, 10), (50, 30, 12), (20, 60, 1)])
def test_gram_eigh_truncation_matches_the_svd_path(m, n, k):
    from sigmascale_jax.linalg.truncation import truncated_reconstruction_gram

    rng = np.random.default_rng(m + n)
    u, _ = np.linalg.qr(rng.normal(size=(m, m)))
    v, _ = np.linalg.qr(rng.normal(size=(n, n)))
    r = min(m, n)
    a = jnp.asarray((u[:, :r] * np.exp(-np.linspace(0, 4, r))) @ v[:, :r].T, jnp.float32)
    g = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)
    ref, got = truncated_reconstruction(a, k), truncated_reconstruction_gram(a, k)
    assert float(jnp.abs(ref - got).max()) <= 1e-5 * float(jnp.abs(ref).max())
    gr = jax.grad(lambda x: jnp.sum(truncated_reconstruction(x, k) * g))(a)
    gg = jax.grad(lambda x: jnp.sum(truncated_reconstruction_gram(x, k) * g))(a)
    assert float(jnp.abs(gr - gg).max()) <= 1e-4 * float(jnp.abs(gr).max())


GRAM_EIGH_SCRIPT = r"""
import json, sys
import jax, numpy as np
from sigmascale_jax.compress.factorize.sigmascale.block import sigmascale_block
from sigmascale_jax.compress.pipeline import run_windows
from sigmascale_jax.compress.plan import RunSpec
from sigmascale_jax.compress.ranks import block_ranks
from sigmascale_jax.compress.stats import block_stats
from sigmascale_jax.io.hf_map import load_block, load_outer
from sigmascale_jax.io.sources import open_model

model, data = sys.argv[1:3]
spec = RunSpec(model=model, ratio=0.2, nsamples=6, seq_len=128)
src = open_model(spec.model)
cfg = src.cfg
xs = np.asarray(jax.device_get(load_outer(src.reader, cfg))["embed"])[run_windows(src, spec, data)]
block = load_block(src.reader, cfg, 3)
ys, stats = block_stats(block, xs, cfg, 3)
runs = {tr: sigmascale_block(block, stats, xs, ys, cfg, block_ranks(cfg, 0.2), steps=4, lr=0.03, holdout=0.34,
                             batch_windows=4, eval_every=2, truncation=tr) for tr in ("svd", "eigh")}
print("RESULT " + json.dumps({tr: {"trace": [v for _, v in r.block["holdout_trace"]],
                                   "holdout_init": r.block["holdout_init"], "holdout_best": r.block["holdout_best"],
                                   "rel_loss": {n: r.matrices[n]["rel_loss"] for n in ("q", "gate", "down")}}
                              for tr, r in runs.items()}))
"""


def test_gram_eigh_learns_what_the_svd_path_learns_on_a_smollm2_block():
    """Same held-out trace (to 1e-3) and the same factors' losses; float32 eigh squares the spectrum, so gradients
    of matrices with a tiny gap at the cut (gate/up: 2e-6 of σ₁²) differ by a few percent, which Adam absorbs.

    Also the regression of `tests/linalg/test_batching.py`: with vmapped SVDs, learning SmolLM2's block scales hung
    XLA:CPU (jaxlib 0.10.2) after step 1 — so it runs in a process of its own, with a timeout."""
    import subprocess
    import sys

    from conftest import REPO, SMOLLM2_DIR

    proc = subprocess.run([sys.executable, "-c", GRAM_EIGH_SCRIPT, str(require(SMOLLM2_DIR)), str(DATA)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])
    for r in runs.values():  # four steps finished, and the best step is never worse than the start
        assert r["holdout_best"] <= r["holdout_init"]
    a, b = (np.array(runs[tr]["trace"]) for tr in ("svd", "eigh"))
    assert a[-1] < a[0] and np.abs(a - b).max() <= 1e-3 * a.max()
    for n in ("q", "gate", "down"):
        assert runs["eigh"]["rel_loss"][n] == pytest.approx(runs["svd"]["rel_loss"][n], rel=1e-3)
