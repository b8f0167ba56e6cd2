"""Memory plan against a measured run: `--plan-only`'s figures beside the resident peaks of the same compression.

    python scripts/bench_memory_plan.py --methods svd-llm,sigmascale-block --nsamples 16 \
        --out results/memory_plan_smollm2

Without a device, the measurement is the operating system's: on a CPU backend the device's arrays and the
host's live in the same process memory, so each stage's resident peak (Linux's VmHWM, reset at every stage
boundary; compression.json's `memory.stage_rss_peak_mib`) less the resident size when the run began is compared
with the plan's device + host bytes for that stage. What the plan leaves out by design (the Python interpreter,
jaxlib, compiled programs) sits in the starting size and in the gap. Each compression runs in its own process.
Writes OUT.md and OUT.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import benchlib

from sigmascale_jax.compress.memory import GiB, memory_plan

# compression.json's timing stages -> the plan's stage names (a prefix of them)
STAGES = {"stats": "statistics", "propagate": "propagate", "factorize": "factorize", "encode": "encode",
          "allocate": "allocate"}
MiB = 2**20


def planned(method: str, args) -> dict[str, dict]:
    from sigmascale_jax.compress.cli import parse_args, spec_and_plan
    from sigmascale_jax.io.sources import read_config

    argv = ["--model", args.model, *benchlib.METHOD_FLAGS[method], "--ratio", str(args.ratio),
            "--nsamples", str(args.nsamples), "--seq-len", str(args.seq_len), "--plan-only", *benchlib.QUICK_FLAGS.get(method, [])]
    spec, plan = spec_and_plan(parse_args(argv))
    return {s.name: {"device": s.device, "host": s.host} for s in memory_plan(read_config(spec.model), spec, plan)}


def measured(method: str, out: Path, args) -> dict:
    cmd = benchlib.run_command(method, out, args)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=benchlib.REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    report = json.loads((out / "compression.json").read_text())
    return {"seconds": time.perf_counter() - t0, **report["memory"]}


def rows_of(method: str, plan: dict[str, dict], mem: dict) -> list[dict]:
    start = mem["start_rss_mib"]
    rows = []
    for stage, peak in mem["stage_rss_peak_mib"].items():
        name = next((n for n in plan if n.startswith(STAGES.get(stage, "\0"))), None)
        p = plan.get(name, {})
        both = None if p.get("device") is None else (p["device"] + p["host"]) / MiB
        rows.append({"method": method, "stage": stage, "plan_stage": name, "plan_device_mib": p.get("device", 0) / MiB
                     if p.get("device") is not None else None, "plan_host_mib": p.get("host", 0) / MiB if p else None,
                     "plan_mib": both, "rss_peak_mib": peak, "measured_mib": peak - start,
                     "measured_over_plan": None if not both else (peak - start) / both})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    benchlib.add_run_args(p, "results/memory_plan_smollm2")
    args = p.parse_args()
    rows, runs = [], []
    with tempfile.TemporaryDirectory(prefix="ssj-memory-plan-") as tmp:
        for method in args.methods.split(","):
            plan = planned(method, args)
            mem = measured(method, Path(tmp) / method, args)
            runs.append({"method": method, "plan": plan, "memory": mem})
            rows += rows_of(method, plan, mem)
            print(f"{method}: start {mem['start_rss_mib']:.0f} MiB, peaks {mem['stage_rss_peak_mib']}", flush=True)
    lines = [f"# Memory plan against measured peaks on {Path(args.model).name}\n",
             f"Ratio {args.ratio}, uniform ranks, {args.nsamples} × {args.seq_len} C4 calibration windows. Plan: "
             "`--plan-only`'s device + host bytes of the stage. Measured: the process's resident peak during the "
             "stage (VmHWM, reset at each stage boundary; on this CPU backend the device's arrays are resident "
             "memory too) less its resident size when the run began. "
             f"Machine: {os.cpu_count()} CPU cores, {benchlib.cpu_name()}, no GPU. Command: "
             f"`{benchlib.command_line()}`\n",
             "| method | stage | plan stage | plan device MiB | plan host MiB | plan MiB | resident peak MiB | "
             "measured MiB | measured / plan |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    fmt = lambda v, f="{:.0f}": "–" if v is None else f.format(v)  # noqa: E731
    for r in rows:
        lines.append(f"| {r['method']} | {r['stage']} | {r['plan_stage'] or '–'} | {fmt(r['plan_device_mib'])} | "
                     f"{fmt(r['plan_host_mib'])} | {fmt(r['plan_mib'])} | {r['rss_peak_mib']:.0f} | "
                     f"{r['measured_mib']:.0f} | {fmt(r['measured_over_plan'], '{:.2f}')} |")
    for run in runs:
        peak = max(run["memory"]["stage_rss_peak_mib"].values()) - run["memory"]["start_rss_mib"]
        plan_peak = max((s["device"] + s["host"]) for n, s in run["plan"].items()
                        if s["device"] is not None and not n.startswith("evaluate")) / MiB
        lines.append(f"\n{run['method']}: whole-run peak {peak:.0f} MiB above the start "
                     f"({run['memory']['start_rss_mib']:.0f} MiB), plan {plan_peak:.0f} MiB: "
                     f"measured / plan {peak / plan_peak:.2f}.")
        if "device_peak_mib" in run["memory"]:  # a GPU or TPU: its own counter against the plan's device figure
            plan_device = max(s["device"] for n, s in run["plan"].items()
                              if s["device"] is not None and not n.startswith("evaluate")) / MiB
            lines.append(f"{run['method']}: device peak {run['memory']['device_peak_mib']:.0f} MiB, plan "
                         f"{plan_device:.0f} MiB: measured / plan {run['memory']['device_peak_mib'] / plan_device:.2f}.")
    md = "\n".join(lines) + "\n"
    benchlib.write(args.out, {"rows": rows, "runs": runs, "command": benchlib.command_line(),
                              "cpu": benchlib.cpu_name(), "gib": GiB}, md)
    print(md)


if __name__ == "__main__":
    main()
