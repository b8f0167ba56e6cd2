"""Each jit-compiled function compiles once per distinct shape, not once per block (stories260k cut to 2 and its full 5)."""

from __future__ import annotations

import collections
import dataclasses

import jax
import pytest
from conftest import DATA, STORIES, require

import sigmascale_jax as ssj

TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"  # one per trace of a function: a compile of a new shape


@pytest.mark.parametrize("method,settings", [
                                             ("sigmascale", {"steps": 2, "eval_every": 1, "step_windows": 4})])
def test_compiles_do_not_grow_with_the_number_of_blocks(method, settings):
    cfg, params, source = ssj.load_model(str(require(STORIES)))
    assert cfg.num_layers == 5
    windows = ssj.calibration_windows(source, "c4", data_dir=str(DATA), nsamples=8, seq_len=64, seed=0)
    traces: collections.Counter = collections.Counter()

    def listen(event, duration, **kw):
        if event == TRACE_EVENT:
            traces[kw.get("fun_name", "?")] += 1

    jax.monitoring.register_event_duration_secs_listener(listen)
    counts = {}
    try:
        for n in (2, 5):  # uniform ranks: every block has the same shapes, so nothing new after the first block
            jax.clear_caches()
            traces.clear()
            cut = {**params, "blocks": params["blocks"][:n]}
            ssj.compress_params(cut, dataclasses.replace(cfg, num_layers=n), windows, ssj.make_plan(method, **settings),
                                0.3)
            counts[n] = dict(traces)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert counts[2] and counts[5] == counts[2], {k: (counts[2].get(k), v) for k, v in counts[5].items()
                                                  if counts[2].get(k) != v}
