"""Each jit-compiled function compiles once per distinct shape, not once per block (stories260k, 5 blocks)."""

from __future__ import annotations

import dataclasses

import jax
from conftest import DATA, STORIES, require

import sigmascale_jax as ssj

TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"  # one per trace of a function: a compile of a new shape


def test_compiles_do_not_grow_with_the_number_of_blocks():
    """With uniform ranks every block has the same shapes: once block 0 is factored and block 1 is fed from its
    compressed form, blocks 2-4 (statistics, SigmaScale's whitening, learning scan and final factors, propagation)
    trace nothing new."""
    cfg, params, source = ssj.load_model(str(require(STORIES)))
    assert cfg.num_layers == 5
    windows = ssj.calibration_windows(source, "c4", data_dir=str(DATA), nsamples=8, seq_len=64, seed=0)
    traces: list[str] = []
    at_block: list[int] = []  # traces so far when each block's factorization starts, and when it ends

    def listen(event, duration, **kw):
        if event == TRACE_EVENT:
            traces.append(kw.get("fun_name", "?"))

    plan = ssj.make_plan("sigmascale", steps=2, eval_every=1, step_windows=4)
    factor = plan.factorize.factor

    def counted(inputs, ranks, key):
        at_block.append(len(traces))
        result = factor(inputs, ranks, key)
        at_block.append(len(traces))
        return result

    plan = dataclasses.replace(plan, factorize=plan.factorize._replace(factor=counted))
    jax.clear_caches()  # what other tests compiled would otherwise hide block 0's traces too
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        ssj.compress_params(params, cfg, windows, plan, 0.3)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert len(at_block) == 10 and at_block[1] > at_block[0] > 0  # block 0 compiled its functions
    # from block 2's start to block 4's end (what follows the loop, encoding and the report, runs once)
    assert traces[at_block[4]:at_block[9]] == [], traces[at_block[4]:at_block[9]]
