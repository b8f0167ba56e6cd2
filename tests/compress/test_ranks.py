"""Rank allocation as a stage: uniform ranks, ZS-SVD (gradients, sensitivities, zero-sum selection), its correction,
and heterogeneous ranks through save, load, resume and eval — on the real stories260k."""

from __future__ import annotations

import heapq
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import DATA, REPO, STORIES, assert_one_line_error, compress_cli, require

import sigmascale_jax
from sigmascale_jax.compress.allocate.zs_svd import component_deltas, zero_sum_select, zs_whitening
from sigmascale_jax.compress.grads import model_grads, model_loss
from sigmascale_jax.io.checkpoint import load_pytree
from sigmascale_jax.model.modeling import PROJECTIONS

SMALL = dict(nsamples=12, seq_len=64, batch_size=4, data_dir=str(DATA), progress=False)


def cli(capsys, *args: str) -> subprocess.CompletedProcess:
    return compress_cli(capsys, *args)


@pytest.fixture(scope="module")
def stories():
    """stories260k's config, host params and 16 calibration windows of 128 tokens."""
    from sigmascale_jax.compress.calibration import calibration_text, sample_windows
    from sigmascale_jax.io.data import find_data_dir
    from sigmascale_jax.io.hf_map import load_block, load_outer
    from sigmascale_jax.io.sources import open_model

    src = open_model(str(require(STORIES)))
    ids = np.asarray(src.tokenizer()(calibration_text("c4", find_data_dir(str(DATA)))).input_ids)
    cfg = src.cfg
    outer = jax.device_get(load_outer(src.reader, cfg))
    blocks = [jax.device_get(load_block(src.reader, cfg, i)) for i in range(cfg.num_layers)]
    return cfg, outer, blocks, sample_windows(ids, 16, 128, 0)


# ------------------------------------------------------------------ gradients


def test_blockwise_gradient_equals_jax_grad_of_the_whole_model(stories):
    from sigmascale_jax.model.modeling import token_nll

    cfg, outer, blocks, windows = stories
    tokens = windows[:6]
    loss, grads = model_grads(outer, blocks, tokens, cfg, batch_size=4)  # 2 chunks: accumulation is exercised
    params = {**outer, "blocks": blocks}
    ref_loss, ref = jax.value_and_grad(lambda p: jnp.mean(token_nll(p, jnp.asarray(tokens), cfg)))(params)
    assert loss == pytest.approx(float(ref_loss), rel=1e-6)
    for i in range(cfg.num_layers):
        for n in PROJECTIONS:
            g, r = grads[i][n], np.asarray(ref["blocks"][i][n]["w"])
            assert np.abs(g - r).max() <= 1e-4 * np.abs(r).max() + 1e-9, (i, n)
    assert model_loss(outer, blocks.__getitem__, tokens, cfg, batch_size=4) == pytest.approx(loss, rel=1e-6)


def test_gradient_of_a_factored_model_is_taken_at_the_densified_weights(stories):
    cfg, outer, blocks, windows = stories
    w = blocks[1]["o"]["w"]
    u, s, vt = np.linalg.svd(w)
    fact = [dict(b) for b in blocks]
    fact[1] = {**blocks[1], "o": {"b": u[:, :20] * s[:20], "c": vt[:20]}}
    dense = [dict(b) for b in blocks]
    dense[1] = {**blocks[1], "o": {"w": (u[:, :20] * s[:20]) @ vt[:20]}}
    la, ga = model_grads(outer, fact, windows[:4], cfg)
    lb, gb = model_grads(outer, dense, windows[:4], cfg)
    assert la == pytest.approx(lb, rel=1e-5)
    np.testing.assert_allclose(ga[1]["o"], gb[1]["o"], atol=1e-6)


# ------------------------------------------------------------------ sensitivities


def test_delta_predicts_the_loss_change_of_dropping_a_small_component(stories):
    """Δ_i = −σ_i u_iᵀ G L⁻ᵀ v_i against the measured loss change, for the smallest components of real matrices."""
    from sigmascale_jax.compress.stats import block_stats

    cfg, outer, blocks, windows = stories
    _, grads = model_grads(outer, blocks, windows, cfg)
    xs = outer["embed"][windows]
    for i in range(2):
        xs, _ = block_stats(blocks[i], xs, cfg, 8)
    _, stats = block_stats(blocks[2], xs, cfg, 8)
    base = model_loss(outer, blocks.__getitem__, windows, cfg)
    checked = 0
    for name, tap in (("q", "attn_in"), ("o", "o_in")):
        with jax.enable_x64(True):
            l, chol = zs_whitening(jnp.asarray(stats[tap]["gram"]), int(stats[tap]["tokens"]))
            assert bool(chol)
            w = jnp.asarray(blocks[2][name]["w"], jnp.float64)
            sigma, delta = component_deltas(w, jnp.asarray(grads[2][name], jnp.float64), l)
            u, s, vt = jnp.linalg.svd(w @ l, full_matrices=False)
            v_unwhite = jnp.linalg.solve(l.T, vt.T).T  # rows v_iᵀ L⁻¹
        np.testing.assert_allclose(np.asarray(sigma), np.asarray(s))
        for idx in range(len(s) - 5, len(s)):
            drop = np.asarray(-s[idx] * jnp.outer(u[:, idx], v_unwhite[idx]), np.float32)
            changed = [dict(b) for b in blocks]
            changed[2] = {**blocks[2], name: {"w": blocks[2][name]["w"] + drop}}
            true = model_loss(outer, changed.__getitem__, windows, cfg) - base
            pred = float(delta[idx])
            assert abs(true - pred) <= 0.1 * abs(pred) + 3e-6, (name, idx, pred, true)
            checked += abs(pred) > 1e-5
    assert checked >= 6  # the comparison is not between numbers at float32 noise level


# ------------------------------------------------------------------ zero-sum selection


def reference_zero_sum(deltas: list[np.ndarray], shapes: list[tuple[int, int]], budget: int, min_rank: int = 1):
    """A slow transcription of the official code's zero_sum stage plan (CandidateQueues + effective dense delta)."""
    tail = [len(d) for d in deltas]  # current rank
    r_star = [max(1, (m * n - 1) // (m + n)) for m, n in shapes]
    pos, neg, counter = [], [], 0

    def push(j):
        nonlocal counter
        if tail[j] > min_rank:
            d = float(deltas[j][tail[j] - 1])
            heapq.heappush(pos if d >= 0 else neg, (abs(d), counter, j, d))
            counter += 1

    for j in range(len(deltas)):
        push(j)
    running, removed, order = 0.0, 0, []
    while removed < budget and (pos or neg):
        first, other = (pos, neg) if running <= 0 else (neg, pos)
        _, _, j, d = heapq.heappop(first if first else other)
        tail[j] -= 1
        running += d
        m, n = shapes[j]
        r = tail[j]
        removed += 0 if r > r_star[j] else (m * n - r_star[j] * (m + n) if r == r_star[j] else m + n)
        order.append(j)
        push(j)
    return tail, running, removed, order


def toy_problem(seed: int):
    rng = np.random.default_rng(seed)
    shapes = [tuple(int(x) for x in rng.integers(4, 40, size=2)) for _ in range(7)]
    deltas = [rng.normal(size=min(s)) * np.exp(rng.normal(size=min(s))) for s in shapes]
    r = max(min(s) for s in shapes)
    d = np.full((len(shapes), r), np.nan)
    c = np.zeros((len(shapes), r + 1), np.int64)
    for j, ((m, n), delta) in enumerate(zip(shapes, deltas)):
        d[j, : len(delta)] = delta
        c[j] = [min(m * n, k * (m + n)) for k in range(r + 1)]
    return shapes, deltas, d, c


@pytest.mark.parametrize("seed,ratio,min_rank", [(0, 0.3, 1), (1, 0.5, 1), (2, 0.7, 3), (3, 0.95, 1)])
def test_zero_sum_selection_matches_a_slow_reference_step_by_step(seed, ratio, min_rank):
    shapes, deltas, d, c = toy_problem(seed)
    budget = int(sum(m * n for m, n in shapes) * ratio)
    ref_ranks, ref_sum, ref_removed, ref_order = reference_zero_sum(deltas, shapes, budget, min_rank)
    with jax.enable_x64(True):
        res = jax.device_get(jax.jit(zero_sum_select)(d, c, budget, min_rank))
    steps = int(res.steps)
    assert steps == len(ref_order) and list(res.order[:steps]) == ref_order and (res.order[steps:] == -1).all()
    assert list(res.ranks) == ref_ranks and int(res.removed) == ref_removed
    assert float(res.running_sum) == pytest.approx(ref_sum, abs=1e-12)
    if ref_removed >= budget:  # met, and not by more than the last step's saving
        assert budget <= int(res.removed) <= budget + max(m * n for m, n in shapes)
    else:  # infeasible budget: every matrix is at its floor
        assert all(k == min_rank for k in ref_ranks)
    stored = sum(c[j, k] for j, k in enumerate(res.ranks))
    assert stored == sum(m * n for m, n in shapes) - int(res.removed)


def test_zero_sum_selection_keeps_the_running_sum_near_zero():
    shapes, deltas, d, c = toy_problem(5)
    budget = int(sum(m * n for m, n in shapes) * 0.5)
    with jax.enable_x64(True):
        res = jax.device_get(zero_sum_select(d, c, budget))
    ranks = np.isfinite(d).sum(axis=1)
    partial, sums, taken = 0.0, [], []
    for j in res.order[: int(res.steps)]:
        ranks[j] -= 1
        taken.append(d[j, ranks[j]])
        partial += taken[-1]
        sums.append(partial)
    assert partial == pytest.approx(float(res.running_sum))
    # the running sum never strays further from zero than the largest |Δ| taken, though Δ of both signs add up
    assert np.abs(sums).max() <= np.abs(taken).max() + 1e-12
    assert np.abs(sums).max() < 0.2 * np.abs(taken).sum()


def test_zero_sum_selection_runs_under_jit_in_float32():
    _, _, d, c = toy_problem(4)
    res = jax.jit(zero_sum_select)(jnp.asarray(d, jnp.float32), jnp.asarray(c, jnp.int32), 500)
    assert int(res.removed) >= 500 and res.ranks.dtype == jnp.int32


# ------------------------------------------------------------------ the pipeline with zs-svd


@pytest.fixture(scope="module")
def zs_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("zs") / "zs"
    report = sigmascale_jax.compress(str(require(STORIES)), "svd-llm", 0.3, out, ranks="zs-svd", correction=True,
                                     grad_samples=6, **SMALL)
    return out, report


def test_uniform_ranks_reproduce_the_plain_block_recipe(tmp_path):
    """`--ranks uniform` gives exactly what SVD-LLM block by block gives without the stage machinery."""
    from sigmascale_jax.compress.factorize._blocks import low_rank_groups
    from sigmascale_jax.compress.factorize.svd_llm import svd_llm_group
    from sigmascale_jax.compress.pipeline import apply_in_chunks, run_windows
    from sigmascale_jax.compress.plan import RunSpec
    from sigmascale_jax.compress.ranks import block_ranks
    from sigmascale_jax.compress.stats import block_stats
    from sigmascale_jax.io.hf_map import load_block, load_outer
    from sigmascale_jax.io.sources import open_model

    out = tmp_path / "u"
    sigmascale_jax.compress(str(STORIES), "svd-llm", 0.3, out, ranks="uniform", **SMALL)
    got = load_pytree(out / "params")
    src = open_model(str(STORIES))
    cfg = src.cfg
    spec = RunSpec(model=str(STORIES), ratio=0.3, nsamples=12, seq_len=64, batch_size=4)
    xs = np.asarray(load_outer(src.reader, cfg)["embed"])[run_windows(src, spec, str(DATA))]
    ranks = block_ranks(cfg, 0.3)
    for i in range(cfg.num_layers):
        block = load_block(src.reader, cfg, i)
        _, stats = block_stats(block, xs, cfg, 4)
        comp = dict(block)
        with jax.enable_x64(True):
            for names in low_rank_groups(block, ranks).values():  # same-shape matrices batch together
                from sigmascale_jax.model.modeling import PROJECTION_INPUT

                w = jnp.stack([jnp.asarray(np.asarray(block[n]["w"]), jnp.float64) for n in names])
                g = jnp.stack([jnp.asarray(stats[PROJECTION_INPUT[n]]["gram"]) for n in names])
                b, c, _, _ = svd_llm_group(w, g, ranks[names[0]])
                for j, n in enumerate(names):
                    k = ranks[n]
                    comp[n] = {"b": np.asarray(b[j][:, :k], np.float32), "c": np.asarray(c[j][:k], np.float32)}
        for n in PROJECTIONS:
            for part in ("b", "c"):
                assert np.array_equal(np.asarray(got["blocks"][i][n][part]), np.asarray(comp[n][part])), (i, n, part)
        xs = apply_in_chunks(comp, xs, cfg, 4)


def test_zs_svd_ranks_are_heterogeneous_and_meet_the_budget(zs_run):
    out, report = zs_run
    ranks = [(m["block"], m["name"], m["rank"], m["dense"]) for m in report["matrices"]]
    assert len({(n, k) for _, n, k, _ in ranks}) > 2 * len(PROJECTIONS)  # ranks differ across blocks
    assert report["ranks_method"] == "zs-svd" and report["ranks"]["q"]["rank"] is None
    p = report["params"]
    assert report["ratio_achieved"] == pytest.approx(1 - p["compressible_compressed"] / p["compressible_dense"])
    assert 0.3 <= report["ratio_achieved"] < 0.31
    # the stored numbers are what the checkpoint really holds (stories260k has no biases)
    assert p["model_compressed"] == p["model_dense"] - p["compressible_dense"] + p["compressible_compressed"]
    alloc = report["allocate"]
    assert alloc["grad_samples"] == 6 and alloc["removed"] >= alloc["to_remove"]
    params = load_pytree(out / "params")
    for b, n, k, dense in ranks:
        p = params["blocks"][b][n]
        if dense:
            assert set(p) == {"w"} and k == min(p["w"].shape)
        else:
            assert p["b"].shape[1] == k == p["c"].shape[0]


def test_correction_lowers_the_calibration_loss_and_keeps_the_ranks(zs_run):
    _, report = zs_run
    (corr,) = report["refine"]
    assert corr["name"] == "correction" and corr["grad_samples"] == 6
    assert corr["loss_after"] < corr["loss_before"]
    assert corr["held_out_windows"] == 6 and np.isfinite(corr["held_out_loss_after"])
    for m in corr["matrices"]:  # the projection of W − Ŵ on the gradient is never longer than W − Ŵ
        assert m["relative_step"] <= m["relative_residual"] * (1 + 1e-9)
        assert np.sign(m["predicted_loss_change"]) == np.sign(m["alpha"])
    assert {(m["block"], m["name"]) for m in corr["matrices"]} == {
        (m["block"], m["name"]) for m in report["matrices"] if not m["dense"]}


def test_correction_guard_keeps_the_uncorrected_factors_when_held_out_loss_rises(tmp_path, monkeypatch, capsys, zs_run):
    """A correction that hurts the held-out windows is dropped: the factors are the uncorrected run's, bit for bit."""
    from sigmascale_jax.compress.refine import correction as corr_mod

    _, ref = zs_run
    assert ref["refine"][0]["kept"] == "corrected"  # stories260k's correction helps the held-out windows
    assert ref["refine"][0]["held_out_loss_after"] < ref["refine"][0]["held_out_loss_before"]
    real = corr_mod.correct_block

    def harmful(dense, comp, grads, stats, ranks, *rest):  # a step that doubles every corrected left factor
        new, info = real(dense, comp, grads, stats, ranks, *rest)
        return {n: ({**p, "b": p["b"] * 2} if n in info else p) for n, p in new.items()}, info

    monkeypatch.setattr(corr_mod, "correct_block", harmful)
    kw = dict(ranks="zs-svd", grad_samples=6, **SMALL)
    guarded = sigmascale_jax.compress(str(STORIES), "svd-llm", 0.3, tmp_path / "g", correction=True, **kw)
    (rec,) = guarded["refine"]
    assert rec["kept"] == "uncorrected" and rec["held_out_loss_after"] > rec["held_out_loss_before"]
    assert "kept the uncorrected factors" in capsys.readouterr().err
    plain = sigmascale_jax.compress(str(STORIES), "svd-llm", 0.3, tmp_path / "p", **kw)
    assert plain["refine"] == []
    a, b = load_pytree(tmp_path / "g" / "params"), load_pytree(tmp_path / "p" / "params")
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    unguarded = sigmascale_jax.compress(str(STORIES), "svd-llm", 0.3, tmp_path / "u", correction=True,
                                        correction_guard=False, **kw)
    assert unguarded["refine"][0]["kept"] == "corrected"
    u = load_pytree(tmp_path / "u" / "params")
    assert not all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(u), jax.tree.leaves(b)))


def test_heterogeneous_ranks_load_and_evaluate(zs_run):
    out, _ = zs_run
    proc = subprocess.run(
        [sys.executable, "-m", "sigmascale_jax.eval", "--model", str(out), "--tasks", "c4", "--seq-len", "128",
         "--max-windows", "2", "--json", str(out.parent / "eval.json"), "--no-progress"],
        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    ppl = json.loads((out.parent / "eval.json").read_text())["c4"]["ppl"]
    assert 1 < ppl < 1e4


def test_zs_svd_resumes_without_recomputing_the_allocation(tmp_path, interrupt_call, count_calls, zs_run):
    from sigmascale_jax.compress.allocate import zs_svd as zs_mod
    from sigmascale_jax.compress.factorize import svd_llm as svd_llm_mod

    ref_out, _ = zs_run
    out = tmp_path / "r"
    _, restore = interrupt_call(svd_llm_mod, "factor_block", at=3)
    grads = count_calls(zs_mod, "model_grads")
    kw = dict(ranks="zs-svd", correction=True, grad_samples=6, **SMALL)
    with pytest.raises(KeyboardInterrupt):
        sigmascale_jax.compress(str(STORIES), "svd-llm", 0.3, out, **kw)
    assert (tmp_path / "r.partial" / "ranks.json").is_file() and not out.exists()
    restore()
    report = sigmascale_jax.compress(str(STORIES), "svd-llm", 0.3, out, **kw)
    assert report["resumed"] and grads["n"] == 1
    a, b = load_pytree(out / "params"), load_pytree(ref_out / "params")
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_zs_svd_deltas_are_cached_across_ratios(tmp_path, monkeypatch, count_calls, zs_run):
    """Δ does not depend on the ratio: a second ratio reuses it, and the ranks are those of a fresh computation."""
    from sigmascale_jax.compress.allocate import zs_svd as zs_mod

    monkeypatch.setenv("SIGMASCALE_CACHE", str(tmp_path / "cache"))
    calls = count_calls(zs_mod, "model_grads")
    kw = dict(ranks="zs-svd", grad_samples=6, **SMALL)
    first = sigmascale_jax.compress(str(STORIES), "svd", 0.5, tmp_path / "a", **kw)
    second = sigmascale_jax.compress(str(STORIES), "svd", 0.3, tmp_path / "b", **kw)
    assert calls["n"] == 1
    assert not first["allocate"]["deltas_from_cache"] and second["allocate"]["deltas_from_cache"]
    assert 0.5 <= first["ratio_achieved"] and 0.3 <= second["ratio_achieved"] < 0.31
    _, fresh = zs_run  # ratio 0.3, cache off
    assert [(m["rank"], m["dense"]) for m in second["matrices"]] == [(m["rank"], m["dense"]) for m in fresh["matrices"]]


@pytest.mark.parametrize("method,extra", [("svd", {}), ("asvd", {"alpha": 0.5}), ("sigmascale", {"steps": 2})])
def test_zs_svd_ranks_combine_with_every_method(tmp_path, zs_run, method, extra):
    _, ref = zs_run
    report = sigmascale_jax.compress(str(STORIES), method, 0.3, tmp_path / method, ranks="zs-svd", grad_samples=6,
                                     **SMALL, **extra)
    # the allocator sees only the dense model: same ranks whatever the factorizer
    assert [(m["rank"], m["dense"]) for m in report["matrices"]] == [(m["rank"], m["dense"]) for m in ref["matrices"]]
    assert report["method"] == method and report["ratio_achieved"] == ref["ratio_achieved"]


# ------------------------------------------------------------------ ranks from an earlier run


def test_from_run_gives_another_factorizer_the_same_ranks(tmp_path, zs_run):
    out, ref = zs_run
    report = sigmascale_jax.compress(str(STORIES), "svd", 0.3, tmp_path / "svd", ranks="from-run",
                                     ranks_from=str(out), **SMALL)
    assert [(m["rank"], m["dense"]) for m in report["matrices"]] == [(m["rank"], m["dense"]) for m in ref["matrices"]]
    assert report["ratio_achieved"] == ref["ratio_achieved"] and report["ranks_method"] == "from-run"
    assert report["allocate"]["source_allocate"]["name"] == "zs-svd"
    assert report["allocate"]["matrices_dense"] == sum(m["dense"] for m in ref["matrices"]) > 0


def _edited_report(tmp_path, zs_run, edit) -> str:
    report = json.loads((zs_run[0] / "compression.json").read_text())
    edit(report)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(report))
    return str(path)


@pytest.mark.parametrize(
    "flags,fragment",
    [
        (lambda run, tmp: ["--ratio", "0.4", "--ranks-from", run], "was compressed at --ratio 0.3"),
        (lambda run, tmp: ["--ratio", "0.3"], "--ranks from-run needs --ranks-from RUN"),
        (lambda run, tmp: ["--ratio", "0.3", "--ranks-from", str(tmp / "nowhere")], "no compression.json there"),
        (lambda run, tmp: ["--ratio", "0.3", "--ranks-from", run, "--encoding", "pivga"],
         "pass --encoding plain"),
    ],
)
def test_from_run_refuses_ranks_that_do_not_fit(tmp_path, capsys, zs_run, flags, fragment):
    out = tmp_path / "o"
    proc = cli(capsys, "--model", str(STORIES), "--method", "svd", "--nsamples", "12", "--seq-len", "64",
               "--ranks", "from-run", "--out", str(out), "--data-dir", str(DATA), *flags(str(zs_run[0]), tmp_path))
    assert_one_line_error(proc, fragment)
    assert not out.exists() and not out.with_name("o.partial").exists()


def _reshape(report):
    report["matrices"][3]["shape"] = [7, 7]


def _overrank(report):
    m = next(m for m in report["matrices"] if not m["dense"])
    m["rank"] = 1000000


@pytest.mark.parametrize("edit,fragments", [(_reshape, ("is [7, 7] there but", "another model")),
                                            (_overrank, ("edited.json: block", "rank 1000000 outside 1.."))])
def test_from_run_refuses_a_report_that_does_not_fit_this_model(tmp_path, capsys, zs_run, edit, fragments):
    proc = cli(capsys, "--model", str(STORIES), "--method", "svd", "--ratio", "0.3", "--ranks", "from-run",
               "--ranks-from", _edited_report(tmp_path, zs_run, edit), "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, *fragments)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ settings and configs


@pytest.mark.parametrize(
    "extra,fragment",
    [
        (["--method", "svd-llm", "--alpha", "0.3"], "--alpha is a setting of asvd"),
        (["--method", "svd-llm", "--grad-samples", "4"], "--grad-samples is a setting of"),
        (["--method", "svd-llm", "--ranks", "zs-svd", "--grad-samples", "13"], "exceeds --nsamples 12"),
        (["--method", "svd-llm", "--ranks", "zs-svd", "--min-rank-ratio", "2"], "--min-rank-ratio must be at most 1"),
        (["--method", "svd-llm", "--correction", "--grad-samples", "12"], "leaves none after --grad-samples 12"),
        (["--method", "sigmascale", "--holdout", "0.99"], "leaves none to learn on"),
        (["--method", "svd-llm", "--ranks", "magic"], "invalid choice: 'magic'"),
        (["--method", "svd-llm", "--seed", "-1"], "--seed must be at least 0"),
    ],
)
def test_settings_that_do_not_fit_are_one_line_errors(tmp_path, capsys, extra, fragment):
    proc = cli(capsys, "--model", str(STORIES), "--ratio", "0.3", "--nsamples", "12", "--out", str(tmp_path / "o"), *extra)
    assert_one_line_error(proc, fragment)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "yaml_text,fragment",
    [
        ("method: svd-llm\nupdate: 'false'\n", "update in"),
        ("method: svd-llm\nnsamples: 8.7\n", "invalid int value: '8.7'"),
        ("method: svd-llm\nnsamples: [1, 2]\n", "must be a single value"),
        ("factorize: svd-llm\n", "must be a mapping with a name"),
        ("factorize: {name: svd-llm, alpha: 0.2}\n", "--alpha is a setting of asvd"),
        ("method: svd-llm\nrefine: [magic]\n", "refine in"),
    ],
)
def test_yaml_values_are_checked_like_flags(tmp_path, capsys, yaml_text, fragment):
    conf = tmp_path / "c.yaml"
    conf.write_text(yaml_text)
    out = tmp_path / "o"
    proc = cli(capsys, "--config", str(conf), "--model", str(STORIES), "--ratio", "0.3", "--out", str(out))
    assert_one_line_error(proc, fragment)
    assert not out.exists()


def test_nested_yaml_config_builds_the_same_plan():
    import tempfile

    from sigmascale_jax.compress.cli import parse_args, spec_and_plan

    nested = ("model: m\nratio: 0.2\nout: o\nfactorize: {name: sigmascale, steps: 7, lr: 0.01}\n"
              "allocate: {name: zs-svd, grad-samples: 4}\nrefine: [correction]\n")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(nested)
    _, plan = spec_and_plan(parse_args(["--config", f.name]))
    _, flat = spec_and_plan(parse_args(["--model", "m", "--ratio", "0.2", "--out", "o", "--method", "sigmascale",
                                        "--steps", "7", "--lr", "0.01", "--ranks", "zs-svd", "--grad-samples", "4",
                                        "--correction"]))
    assert plan.key() == flat.key()
    assert plan.key()["factorize"]["steps"] == 7
    assert plan.key()["refine"] == [{"name": "correction", "grad_samples": 4, "correction_guard": True}]
    # the command line wins over the file
    _, over = spec_and_plan(parse_args(["--config", f.name, "--steps", "9", "--no-correction"]))
    assert over.key()["factorize"]["steps"] == 9 and over.key()["refine"] == []


def test_resume_key_holds_only_what_changes_the_result():
    from sigmascale_jax.compress.plan import make_plan

    a = make_plan("svd-llm").key()
    assert a == {"allocate": {"name": "uniform"}, "factorize": {"name": "svd-llm", "update": False}, "refine": [],
                 "encode": {"name": "plain", "quantize": "none", "group_size": None}}
    assert "lr" not in json.dumps(a)  # SigmaScale's settings do not touch an svd-llm run's key


def test_a_new_allocator_is_one_registered_constructor(tmp_path, capsys):
    """The README's example: registering an allocator makes it a --ranks choice with its own flag."""
    import dataclasses

    from sigmascale_jax.compress.plan import ALLOCATORS, Allocation, RankAllocator, register
    from sigmascale_jax.compress.settings import Settings, setting

    @dataclasses.dataclass(frozen=True)
    class HalfSettings(Settings):
        keep: float = setting(0.5, "half: fraction of each matrix's full rank kept", above=0.0, max=1.0)

    @register(ALLOCATORS, "half", HalfSettings, "the same fraction of every matrix's full rank")
    def half(keep: float = 0.5) -> RankAllocator:
        settings = HalfSettings(keep=keep)

        def allocate(ctx, budget):
            ranks = {n: max(1, int(settings.keep * min(s))) for n, s in ctx.cfg.projection_shapes().items()}
            return Allocation([dict(ranks) for _ in range(ctx.cfg.num_layers)], {})

        return RankAllocator("half", settings, allocate, costly=False)  # cheap: not cached

    try:
        out = tmp_path / "h"
        proc = cli(capsys, "--model", str(STORIES), "--method", "svd", "--ratio", "0.3", "--ranks", "half",
                   "--keep", "0.25", "--nsamples", "4", "--seq-len", "32", "--out", str(out), "--data-dir", str(DATA))
        assert proc.returncode == 0, proc.stderr
        report = json.loads((out / "compression.json").read_text())
        assert report["allocate"] == {"name": "half", "keep": 0.25}
        assert {m["name"]: m["rank"] for m in report["matrices"][:7]}["q"] == 16  # a quarter of 64
    finally:
        del ALLOCATORS["half"]
