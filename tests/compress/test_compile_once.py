"""Each jit-compiled function compiles once per distinct shape, not once per block, and the device holds one block's
work at a time, not every block done so far (stories260k, 5 blocks)."""

from __future__ import annotations

import dataclasses

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
