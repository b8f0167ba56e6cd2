"""FermiGrad and sensitivity ranks, and SigmaScale's paper recipe, on the real stories260k."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import DATA, REPO, STORIES, require

import sigmascale_jax
from sigmascale_jax.compress.allocate.fermigrad import fermi_weights, round_ranks, soft_count
from sigmascale_jax.compress.allocate.sensitivity import FRACTIONS, fraction_rank, search_threshold, sensitivity_table
from sigmascale_jax.compress.plan import Budget, ModelContext, RunSpec
from sigmascale_jax.compress.ranks import factored_params
from sigmascale_jax.model.modeling import PROJECTIONS

SMALL = dict(nsamples=12, seq_len=64, batch_size=4, data_dir=str(DATA), progress=False)


@pytest.fixture(scope="module")
def ctx():
    from sigmascale_jax.compress.pipeline import run_windows
    from sigmascale_jax.io.hf_map import load_block, load_outer
    from sigmascale_jax.io.sources import open_model

    spec = RunSpec(model=str(require(STORIES)), ratio=0.3, nsamples=12, seq_len=64, batch_size=4)
    src = open_model(spec.model)
    outer = jax.device_get(load_outer(src.reader, src.cfg))
    return ModelContext(src.cfg, outer, lambda i: load_block(src.reader, src.cfg, i),
                        run_windows(src, spec, str(DATA)), spec, False)


# ------------------------------------------------------------------ FermiGrad


def test_fermi_weights_and_soft_count_are_differentiable():
    mu = jnp.asarray([3.3, 7.8])
    f = fermi_weights(mu, 12, 0.7)
    assert f.shape == (2, 12) and float(f[0, 3]) > 0.5 > float(f[0, 4])  # i < μ kept
    jac = jax.jacobian(lambda m: fermi_weights(m, 12, 0.7))(mu)
    assert np.isfinite(jac).all() and (np.asarray(jac[0, :, 0]) > 0).all() and np.allclose(jac[0, :, 1], 0)

    def count(m):
        return soft_count({"q": m}, {"q": (12, 20)}, 0.7)

    g = jax.grad(count)(mu)
    eps = 1e-3
    fd = [(count(mu.at[j].add(eps)) - count(mu.at[j].add(-eps))) / (2 * eps) for j in range(2)]
    np.testing.assert_allclose(np.asarray(g), np.asarray(fd), rtol=2e-2)
    assert float(count(mu)) == pytest.approx(32 * (3.3 + 0.5 + 7.8 + 0.5), rel=0.02)  # Σ f ≈ μ + ½ at small T
    # PivGa's count k(m+n) − k² of the soft rank, differentiable too
    from sigmascale_jax.compress.encode.pivga import pivga_params

    piv = jax.grad(lambda m: soft_count({"q": m}, {"q": (12, 20)}, 0.7, pivga_params))(mu)
    assert np.isfinite(piv).all() and (np.asarray(piv) < np.asarray(g)).all()
    # the temperature too: a gradient exists for an annealing schedule that would learn it
    assert np.isfinite(float(jax.grad(lambda t: jnp.sum(fermi_weights(mu, 12, t)))(0.7)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rounding_meets_the_budget_exactly(seed):
    rng = np.random.default_rng(seed)
    shapes = [tuple(int(x) for x in rng.integers(8, 60, size=2)) for _ in range(9)]
    sizes = np.array([min(s) for s in shapes])
    mu = rng.uniform(0.5, sizes - 0.5)
    budget = Budget(0.4, factored_params)
    limit = budget.limit(shapes)
    ks = round_ranks(mu, sizes, lambda j, k: budget.stored(*shapes[j], k), limit)
    total = sum(budget.stored(*s, int(k)) for s, k in zip(shapes, ks))
    assert total <= limit and (ks >= 1).all() and (ks <= sizes).all()
    # exact: the best-scoring component left out does not fit any more
    left = [(mu[j] - ks[j], j) for j in range(len(ks)) if ks[j] < sizes[j]]
    _, j = max(left)
    grown = total - budget.stored(*shapes[j], int(ks[j])) + budget.stored(*shapes[j], int(ks[j]) + 1)
    assert grown > limit
    # kept components are exactly those scoring above one threshold
    kept = [mu[j] - i for j in range(len(ks)) for i in range(int(ks[j]))]
    dropped = [mu[j] - i for j in range(len(ks)) for i in range(int(ks[j]), int(sizes[j]))]
    assert min(kept) >= max(dropped) or any(k == 1 for k in ks)


def test_fermigrad_lowers_the_calibration_loss_from_its_start(tmp_path):
    report = sigmascale_jax.compress(str(STORIES), "svd-llm", 0.3, tmp_path / "f", ranks="fermigrad", fermi_steps=40,
                                     fermi_windows=2, **SMALL)
    a = report["allocate"]
    assert a["probe_windows"] == 3  # held out from the learning
    assert a["probe_loss_end_ranks"] < a["probe_loss_start_ranks"]
    assert abs(a["soft_ratio_last"] - 1) < 0.02  # the penalty kept the soft count at the budget
    assert report["ratio_achieved"] >= 0.3 and report["ratio_achieved"] - 0.3 < 0.005
    assert len({m["rank"] for m in report["matrices"] if m["name"] == "q"}) > 1


# ------------------------------------------------------------------ sensitivity


@pytest.fixture(scope="module")
def table(ctx):
    """The table on 8 windows of 128 tokens (4 windows of 64 are too noisy to show its shape)."""
    from sigmascale_jax.compress.pipeline import run_windows
    from sigmascale_jax.io.sources import open_model

    spec = RunSpec(model=str(STORIES), ratio=0.3, nsamples=8, seq_len=128, batch_size=4)
    wide = ModelContext(ctx.cfg, ctx.outer, ctx.load_block, run_windows(open_model(spec.model), spec, str(DATA)),
                        spec, False)
    return sensitivity_table(wide, 8)


def test_sensitivity_table_is_monotone_in_the_kept_fraction(table, ctx):
    assert table["fractions"] == list(FRACTIONS) and len(table["ppl"]) == 7 * ctx.cfg.num_layers
    rows = np.array(list(table["ppl"].values()))
    assert np.isfinite(rows).all() and (rows > 1).all()
    # Not monotone matrix by matrix: stories260k is a TinyStories model and C4 is foreign text to it, so cutting some
    # matrices lowers its calibration perplexity below the dense model's (1.up at 0.5: 60.8 vs 66.4), and neighbouring
    # fractions of one matrix differ by up to ~5% either way (measured on 1,024 tokens). Monotone where it matters:
    # averaged over matrices; and for every matrix that keeping 20% hurts by over 10%, keeping 90% is better, with
    # perplexity falling as the kept fraction grows (rank correlation < 0) in most of them.
    assert (np.diff(rows.mean(axis=0)) < 0).all()
    hurt = rows[hurt_mask(rows, table["baseline"])]
    assert len(hurt) >= 10 and (hurt[:, -1] < hurt[:, 0]).all()
    ranks = np.argsort(np.argsort(hurt, axis=1), axis=1)
    spearman = 1 - 6 * ((ranks - np.arange(8)[None, ::-1]) ** 2).sum(axis=1) / (8 * 63)
    assert (spearman > 0).mean() >= 0.8  # ppl ranks against descending fractions: positive = falling ppl


def hurt_mask(rows: np.ndarray, baseline: float) -> np.ndarray:
    return rows[:, 0] > 1.10 * baseline


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
def test_threshold_search_meets_the_budget(table, ctx, ratio):
    shapes = {f"{b}.{n}": ctx.cfg.projection_shapes()[n] for b in range(ctx.cfg.num_layers) for n in PROJECTIONS}
    budget = Budget(ratio, factored_params)
    ranks, threshold, stored = search_threshold(table, shapes, budget)
    limit = budget.limit(list(shapes.values()))
    assert stored == sum(budget.stored(*shapes[k], r) for k, r in ranks.items()) <= limit
    # allowing the next entry (raising no matrix's fraction) would exceed: the threshold is the boundary
    entries = sorted(((ppl, key, p) for key, row in table["ppl"].items() for p, ppl in zip(FRACTIONS, row)),
                     key=lambda e: -e[0])
    for key, r in ranks.items():
        allowed = [p for ppl, k, p in entries if k == key and ppl <= threshold]
        assert r == (fraction_rank(*shapes[key], min(allowed)) if allowed else None)


def test_sensitivity_ranks_run_end_to_end_and_the_table_is_cached(tmp_path, monkeypatch, count_calls):
    from sigmascale_jax.compress.allocate import sensitivity as sens_mod

    monkeypatch.setenv("SIGMASCALE_CACHE", str(tmp_path / "cache"))
    calls = count_calls(sens_mod, "sensitivity_table")
    first = sigmascale_jax.compress(str(STORIES), "svd-llm", 0.3, tmp_path / "a", ranks="sensitivity", **SMALL)
    second = sigmascale_jax.compress(str(STORIES), "svd", 0.4, tmp_path / "b", ranks="sensitivity", **SMALL)
    assert calls["n"] == 1 and second["allocate"]["table_from_cache"] and not first["allocate"]["table_from_cache"]
    assert first["ratio_achieved"] >= 0.3 and second["ratio_achieved"] >= 0.4
    # the whole allocation is cached too: the same ranks serve another factorizer
    third = sigmascale_jax.compress(str(STORIES), "asvd", 0.3, tmp_path / "c", ranks="sensitivity", **SMALL)
    assert third["allocate"]["from_cache"]
    assert [m["rank"] for m in third["matrices"]] == [m["rank"] for m in first["matrices"]]


# ------------------------------------------------------------------ the paper recipe


def test_paper_loss_equals_the_loss_on_tokens():
    from sigmascale_jax.compress.factorize.sigmascale.paper import PAPER_L2, paper_loss, paper_reconstruction

    rng = np.random.default_rng(0)
    m, n, t, k = 24, 40, 300, 9
    w = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(n, t)) * rng.uniform(0.1, 3, size=(n, 1)), jnp.float32)
    params = {"d_r": jnp.asarray(rng.normal(size=m) * 0.1, jnp.float32),
              "d_c": jnp.asarray(rng.normal(size=n) * 0.1, jnp.float32)}
    noise = jnp.zeros((m, n))
    w_hat = paper_reconstruction(w, params["d_r"], params["d_c"], k, noise)
    on_tokens = jnp.sum((w @ x - w_hat @ x) ** 2) / (m * n)
    reg = PAPER_L2 * (jnp.sum(params["d_r"] ** 2) + jnp.sum(params["d_c"] ** 2))
    assert float(paper_loss(params, w, x @ x.T, k, noise)) == pytest.approx(float(on_tokens + reg), rel=1e-4)
    assert jnp.linalg.matrix_rank(w_hat) == k


def test_paper_recipe_runs_per_matrix_from_the_uncompressed_model(tmp_path):
    report = sigmascale_jax.compress(str(STORIES), "sigmascale", 0.3, tmp_path / "p", loss="paper", steps=30,
                                     sequential=False, **SMALL)
    assert report["factorize"] == {**report["factorize"], "loss": "paper", "steps": 30, "lr": 0.005}
    ms = [m for m in report["matrices"] if not m["dense"]]
    assert all(m["whitening"] is None and np.isfinite(m["paper_loss_last"]) for m in ms)
    assert np.mean([m["paper_loss_last"] < m["paper_loss_first"] for m in ms]) > 0.5
    assert not report["blocks"]  # no block-loss trace: nothing is learned per block


def test_paper_config_runs_the_published_recipe():
    from sigmascale_jax.compress.cli import parse_args, spec_and_plan

    spec, plan = spec_and_plan(parse_args(["--config", str(REPO / "configs" / "smollm2-sigmascale-paper.yaml"),
                                           "--out", "x"]))
    key = plan.key()
    assert key["allocate"]["name"] == "sensitivity" and not spec.sequential
    assert {k: key["factorize"][k] for k in ("name", "loss", "steps", "lr")} == {
        "name": "sigmascale", "loss": "paper", "steps": 1000, "lr": 0.005}
