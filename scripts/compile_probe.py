"""Run one command line of the package in this process and count its XLA compiles, per pipeline stage.

    python scripts/compile_probe.py --json runs/probe.json compress --config configs/smollm2-quick.yaml --out ...
    python scripts/compile_probe.py --json runs/probe.json eval --model runs/... --tasks wikitext2

Counts JAX's own monitoring events: `/jax/core/compile/backend_compile_duration` (one per XLA compile; its
seconds) and `/jax/core/compile/jaxpr_trace_duration` (traces). For `compress` the counts are split by the
pipeline's stage clock (`compress.pipeline._Clock.lap`), which every version of the pipeline has, so the same
probe measures the code before and after a change (`PYTHONPATH` picks the package). Writes
`{"command", "wall_s", "compiles", "compile_s", "traces", "stages": {stage: {...}}, "largest": [...]}`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter

COMPILE = "/jax/core/compile/backend_compile_duration"
TRACE = "/jax/core/compile/jaxpr_trace_duration"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", required=True, help="where to write the counts")
    p.add_argument("command", choices=("compress", "eval"))
    p.add_argument("args", nargs=argparse.REMAINDER)
    args = p.parse_args()

    import jax

    events: list[tuple[str, float, str]] = []  # (event, seconds, function)
    stage_marks: list[tuple[str, int]] = []  # (stage, events so far) at each lap

    def listen(event, duration, **kw):
        if event in (COMPILE, TRACE):
            events.append((event, float(duration), str(kw.get("fun_name", "?"))))

    jax.monitoring.register_event_duration_secs_listener(listen)
    if args.command == "compress":
        from sigmascale_jax.compress import pipeline

        lap = pipeline._Clock.lap

        def counted_lap(self, stage):
            stage_marks.append((stage, len(events)))
            return lap(self, stage)

        pipeline._Clock.lap = counted_lap
        from sigmascale_jax.compress.cli import main as cli_main
    else:
        from sigmascale_jax.eval.cli import main as cli_main
    from sigmascale_jax.errors import run_cli

    t0 = time.perf_counter()
    code = run_cli(cli_main, args.args)
    wall = time.perf_counter() - t0
    if code:
        raise SystemExit(f"the command failed with exit code {code}")

    def summary(evs) -> dict:
        comp = [e for e in evs if e[0] == COMPILE]
        return {"compiles": len(comp), "compile_s": round(sum(e[1] for e in comp), 3),
                "traces": sum(e[0] == TRACE for e in evs)}

    stages: dict[str, dict] = {}
    start = 0
    for stage, mark in stage_marks:
        part = summary(events[start:mark])
        acc = stages.setdefault(stage, {"compiles": 0, "compile_s": 0.0, "traces": 0})
        for k, v in part.items():
            acc[k] = round(acc[k] + v, 3)
        start = mark
    if start < len(events):
        stages["after"] = summary(events[start:])
    per_fun = Counter()
    secs = Counter()
    for e, d, f in events:
        if e == COMPILE:
            per_fun[f] += 1
            secs[f] += d
    largest = [{"function": f, "compiles": n, "compile_s": round(secs[f], 3)} for f, n in per_fun.most_common(12)]
    import sigmascale_jax

    out = {"command": [args.command, *args.args], "package": os.path.dirname(sigmascale_jax.__file__),
           "wall_s": round(wall, 3),
           **summary(events), "stages": stages, "largest": largest}
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({k: out[k] for k in ("wall_s", "compiles", "compile_s", "traces")}), file=sys.stderr)


if __name__ == "__main__":
    main()
