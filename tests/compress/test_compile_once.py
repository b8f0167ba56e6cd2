"""Each jit-compiled function compiles once per distinct shape, not once per block, and the device holds one block's
work at a time, not every block done so far (stories260k, 5 blocks)."""

from __future__ import annotations

import dataclasses

import pytest

import jax
import numpy as np
from conftest import DATA, STORIES, require

import sigmascale_jax as ssj

TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"  # one per trace of a function: a compile of a new shape


def live_bytes() -> int:
    return sum(a.nbytes for a in jax.live_arrays())


def test_compiles_and_device_memory_do_not_grow_with_the_number_of_blocks():
    """With uniform ranks every block has the same shapes: once block 0 is factored and block 1 is fed from its
    compressed form, blocks 2-4 (statistics, SigmaScale's whitening, learning scan and final factors, propagation)
    trace nothing new. Finished blocks leave the device (on a GPU every block's factors would pile up there)."""
    cfg, params, source = ssj.load_model(str(require(STORIES)))
    # host copies of their own: on CPU a device_put of a device_get'd view aliases the array it came from, and
    # jax.live_arrays() would count those aliases as if they held memory
    params = jax.tree.map(np.array, params)
    assert cfg.num_layers == 5
    windows = ssj.calibration_windows(source, "c4", data_dir=str(DATA), nsamples=8, seq_len=64, seed=0)
    traces: list[str] = []
    at_block: list[int] = []  # traces so far when each block's factorization starts, and when it ends
    live: list[int] = []  # device bytes in use when each block's factorization starts

    def listen(event, duration, **kw):
        if event == TRACE_EVENT:
            traces.append(kw.get("fun_name", "?"))

    plan = ssj.make_plan("sigmascale", steps=2, eval_every=1, step_windows=4)
    factor = plan.factorize.factor

    def counted(inputs, ranks, key):
        live.append(live_bytes())
        at_block.append(len(traces))
        result = factor(inputs, ranks, key)
        at_block.append(len(traces))
        return result

    plan = dataclasses.replace(plan, factorize=plan.factorize._replace(factor=counted))
    jax.clear_caches()  # what other tests compiled would otherwise hide block 0's traces too
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        before = live_bytes()
        out, _ = ssj.compress_params(params, cfg, windows, plan, 0.3)
        after = live_bytes()
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert len(at_block) == 10 and at_block[1] > at_block[0] > 0  # block 0 compiled its functions
    # from block 2's start to block 4's end (what follows the loop, encoding and the report, runs once)
    assert traces[at_block[4]:at_block[9]] == [], traces[at_block[4]:at_block[9]]
    block_bytes = sum(x.nbytes for x in jax.tree.leaves(params["blocks"][0]))
    assert live[4] - live[1] < block_bytes / 2, (live, block_bytes)  # before the fix: ~0.7 block more per block
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(out["blocks"]))  # the model comes back on the host
    assert after - before < block_bytes / 2, (before, after)


def traced(run) -> tuple[list[str], object]:
    """`(names of the functions traced while run() ran, its result)`: a trace is a compile of a new signature."""
    traces: list[str] = []

    def listen(event, duration, **kw):
        if event == TRACE_EVENT:
            traces.append(kw.get("fun_name", "?"))

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        return traces, run()
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def mixed_ranks(cfg):
    """Every matrix its own rank, one kept dense: what ZS-SVD or FermiGrad give, without their passes."""
    from sigmascale_jax.compress.plan import Allocation, RankAllocator
    from sigmascale_jax.compress.ranks import break_even_rank

    rng = np.random.default_rng(0)
    shapes = cfg.projection_shapes()

    def allocate(ctx, budget):
        ranks = [{p: int(rng.integers(1, break_even_rank(*shapes[p]))) for p in shapes} for _ in range(cfg.num_layers)]
        ranks[2]["up"] = None
        return Allocation(ranks, {})

    return RankAllocator("mixed", ssj.make_plan("svd").allocate.settings, allocate, costly=False)


HEAL_PROGRAMS = {"heal_step", "_held_loss", "init_fn"}  # shaped by the padded ranks: once per run


@pytest.mark.parametrize("method,settings", [
    ("svd", {}), ("asvd", {}), ("svd-llm", {}), ("svd-llm", {"update": True}),
    ("sigmascale", {"steps": 2, "eval_every": 1, "step_windows": 4}),
    ("sigmascale", {"loss": "layer", "steps": 2, "eval_every": 1}),
    ("sigmascale", {"loss": "paper", "steps": 2}),
    ("svd-llm", {"heal_steps": 2, "heal_samples": 8, "heal_holdout": 4, "heal_eval_every": 2}),
    ("sigmascale", {"steps": 2, "eval_every": 1, "step_windows": 4, "refit_steps": 2, "refit_eval_every": 1}),
])
def test_mixed_ranks_compile_no_program_that_uniform_ranks_did_not(stories_small, method, settings):
    """Ranks are data: after a uniform-rank run, a run where every matrix has its own rank (one kept dense) traces
    no new program — healing and the refit aside, whose steps are shaped by the padded widths: once per run (the
    refit once more for the block that keeps a matrix dense), not per block."""
    cfg, params, windows = stories_small
    heal = "heal_steps" in settings
    ssj.compress_params(params, cfg, windows, ssj.make_plan(method, **settings), 0.3)  # compiles what it needs
    plan = ssj.make_plan(method, ranks=mixed_ranks(cfg), **settings)
    traces, (_, report) = traced(lambda: ssj.compress_params(params, cfg, windows, plan, 0.3))
    assert len({m["rank"] for m in report["matrices"] if m["name"] == "q"}) > 2  # the ranks did differ
    new = [t for t in traces if not (heal and t in HEAL_PROGRAMS) and t != "refit_block"]
    assert new == [], new
    if "refit_steps" in settings:  # padded to the widest ranks: one program per pattern of dense projections (2)
        assert 1 <= traces.count("refit_block") <= 2, traces
        assert any("refit" in b for b in report["blocks"])
    if heal:  # stacked or (these random ranks pad past the tolerance) unrolled: one step program per run
        assert len(traces) <= len(HEAL_PROGRAMS) and report["refine"][0]["stacked"] in (True, False)


def test_zs_svd_adds_only_its_own_passes_to_sigmascale(stories_small):
    """The allocator's gradient and sensitivity passes are a few programs of their own (one per block shape, not
    per block or per rank); the factorization compiles nothing new."""
    cfg, params, windows = stories_small
    settings = {"steps": 2, "eval_every": 1, "step_windows": 4}
    ssj.compress_params(params, cfg, windows, ssj.make_plan("sigmascale", **settings), 0.3)
    plan = ssj.make_plan("sigmascale", ranks="zs-svd", **settings)
    traces, _ = traced(lambda: ssj.compress_params(params, cfg, windows, plan, 0.3))
    allocation = {"_head_vjp", "_block_vjp_sum", "_block_deltas", "zero_sum_select"}
    # each once per shape of window chunk (here 8 and 4 of the 12 windows), never per block or rank
    assert set(traces) <= allocation and len(traces) <= 2 * len(allocation), traces


@pytest.fixture(scope="module")
def stories_small():
    cfg, params, source = ssj.load_model(str(require(STORIES)))
    windows = ssj.calibration_windows(source, "c4", data_dir=str(DATA), nsamples=12, seq_len=32, seed=0)
    return cfg, jax.tree.map(np.array, params), windows
