"""Compile benchmark: XLA compiles and their seconds per stage, for the same runs on two versions of the code.

    python scripts/bench_compile.py --label after --out results/compile_smollm2            # this checkout
    python scripts/bench_compile.py --label before --code ../before --out results/compile_smollm2   # another one

Every run goes through `scripts/compile_probe.py` (JAX's own compile events, split by the pipeline's stage clock)
with `--no-compile-cache`, in a process of its own, using the package at `--code` (PYTHONPATH). Runs:

- stories260k, 16 x 128 windows, ratio 0.3: svd-llm and SigmaScale (10 steps) with uniform and zs-svd ranks
  (issue 40's table);
- SmolLM2: `configs/smollm2-best-0.2.yaml` with healing off, the README's quick start (`configs/smollm2-quick.yaml`),
  and `sigmascale_jax.eval` of the quick start's model on 16 windows of WikiText-2 and C4.

Results accumulate in OUT.json by (label, run), so `before` and `after` may run at different times; OUT.md is
rendered from all of them (`--render`: render only).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import benchlib

STORIES = "../shared/models/stories260k"
SMOLLM2 = "../shared/models/smollm2-135m-instruct-q4_1"
STORIES_FLAGS = ["--model", STORIES, "--ratio", "0.3", "--nsamples", "16", "--seq-len", "128"]
SIGMA10 = ["--method", "sigmascale", "--steps", "10", "--eval-every", "5", "--step-windows", "4"]

# name -> (command, args without --out)
RUNS = {
    "stories svd-llm uniform": ("compress", [*STORIES_FLAGS, "--method", "svd-llm"]),
    "stories svd-llm zs-svd": ("compress", [*STORIES_FLAGS, "--method", "svd-llm", "--ranks", "zs-svd"]),
    "stories sigmascale uniform": ("compress", [*STORIES_FLAGS, *SIGMA10]),
    "stories sigmascale zs-svd": ("compress", [*STORIES_FLAGS, *SIGMA10, "--ranks", "zs-svd"]),
    # the recipe's config without its heal-* keys (written beside the runs: older code refuses --heal-steps 0 there)
    "smollm2 best-0.2, no healing": ("compress", ["--config", "{runs}/best-0.2-no-heal.yaml"]),
    # the recipe the quick start had before this change (the "before" rows ran it), and the one it has now
    "smollm2 quick start, earlier recipe": ("compress", ["--config", "configs/smollm2-quick.yaml", "--nsamples", "64",
                                                         "--heal-steps", "50", "--heal-samples", "200",
                                                         "--heal-eval-every", "25"]),
    "smollm2 quick start": ("compress", ["--config", "configs/smollm2-quick.yaml"]),
    "smollm2 eval of the quick start": ("eval", ["--tasks", "wikitext2,c4", "--seq-len", "2048", "--max-windows", "16"]),
}
GROUPS = {"stories": [r for r in RUNS if r.startswith("stories")], "smollm2": [r for r in RUNS if r.startswith("smollm2")]}


def folder(runs_dir: Path, label: str, name: str) -> Path:
    return runs_dir / f"{label}-{name.replace(' ', '-').replace(',', '')}"


def one(name: str, label: str, code: str, runs_dir: Path) -> dict:
    command, args = RUNS[name]
    no_heal = runs_dir / "best-0.2-no-heal.yaml"
    lines = (benchlib.REPO / "configs/smollm2-best-0.2.yaml").read_text().splitlines()
    no_heal.write_text("\n".join(line for line in lines if not line.startswith("heal-")) + "\n")
    args = [a.replace("{runs}", str(runs_dir)) for a in args]
    base = folder(runs_dir, label, name)
    out_json = base.with_name(base.name + ".probe.json")
    if command == "eval":  # the quick start's model (the earlier recipe's, for the code before the change)
        quick = "smollm2 quick start, earlier recipe" if label == "before" else "smollm2 quick start"
        args = ["--model", str(folder(runs_dir, label, quick)), *args, "--json",
                str(base.with_name(base.name + ".eval.json"))]
    else:
        args = [*args, "--out", str(folder(runs_dir, label, name)), "--overwrite"]
    cmd = [sys.executable, "scripts/compile_probe.py", "--json", str(out_json), command, *args, "--no-compile-cache",
           "--no-progress"]
    # no disk cache of allocations either: every run computes what it needs
    env = {**os.environ, "PYTHONPATH": code, "HF_HUB_OFFLINE": "1", "SIGMASCALE_CACHE": "off"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=benchlib.REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    probe = json.loads((benchlib.REPO / out_json).read_text())
    row = {"run": name, "label": label, "command": " ".join(cmd[2:]), "process_s": round(time.perf_counter() - t0, 1),
           "package": os.path.relpath(probe["package"], benchlib.REPO), **{k: probe[k] for k in ("wall_s", "compiles", "compile_s", "traces", "stages", "largest")}}
    if command == "compress":
        report = json.loads((benchlib.REPO / folder(runs_dir, label, name) / "compression.json").read_text())
        row["timings_s"] = report.get("timings_s")
        row["compile_record"] = report.get("compile")
        for r in report.get("refine", []):
            if r.get("name") == "heal":
                row["heal"] = {k: r.get(k) for k in ("steps_run", "seconds", "time_s", "held_out_loss_before",
                                                      "held_out_loss_after")}
    return row


def compare(before: Path, after: Path) -> dict:
    """How far `after`'s matrices are from `before`'s (the same run on the code before a change): the largest
    relative difference of any projection's matrix (B C, or PivGa's, dequantized), and whether the ranks agree."""
    import jax
    import numpy as np

    from sigmascale_jax.io.sources import load_model
    from sigmascale_jax.model.leaves import as_leaf
    from sigmascale_jax.model.modeling import PROJECTIONS

    (_, a, _), (_, b, _) = load_model(str(before)), load_model(str(after))
    worst, same = 0.0, True
    for x, y in zip(jax.device_get(a["blocks"]), jax.device_get(b["blocks"])):
        for n in PROJECTIONS:
            mx, my = np.asarray(as_leaf(x[n]).matrix(), np.float64), np.asarray(as_leaf(y[n]).matrix(), np.float64)
            rx = json.dumps(jax.tree.map(np.shape, as_leaf(x[n]).to_tree()), default=str)
            ry = json.dumps(jax.tree.map(np.shape, as_leaf(y[n]).to_tree()), default=str)
            same &= rx == ry
            worst = max(worst, float(np.abs(mx - my).max() / np.abs(mx).max()))
    return {"max_rel_matrix_diff": worst, "same_ranks": bool(same)}


def table(payload: dict) -> str:
    rows = payload["rows"]
    labels = sorted({r["label"] for r in rows}, key=lambda x: (x != "before", x))
    lines = [f"# XLA compiles per run (CPU: {payload['cpu']})", "",
             "Counted from JAX's `/jax/core/compile/backend_compile_duration` events, `--no-compile-cache`; "
             "`scripts/bench_compile.py` (command below). Seconds are wall-clock on this CPU.", "",
             "| run | " + " | ".join(f"{lb}: compiles / compile s / wall s" for lb in labels) + " |",
             "| --- |" + " ---: |" * len(labels)]
    for name in RUNS:
        cells = []
        for lb in labels:
            r = next((r for r in rows if r["run"] == name and r["label"] == lb), None)
            cells.append("—" if r is None else f"{r['compiles']} / {r['compile_s']:.1f} / {r['wall_s']:.1f}")
        if any(c != "—" for c in cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if payload.get("notes"):  # what the rows say, written by hand beside the measurements
        lines += ["", *payload["notes"]]
    lines += ["", "## Per stage (compiles / compile s)", ""]
    for name in RUNS:
        got = [r for r in rows if r["run"] == name and r.get("stages")]
        if not got:
            continue
        stages = [s for s in dict.fromkeys(s for r in got for s in r["stages"]) if
                  any(r["stages"].get(s, {}).get("compiles") for r in got)]
        lines += [f"**{name}**", "", "| stage | " + " | ".join(r["label"] for r in got) + " |",
                  "| --- |" + " ---: |" * len(got)]
        for s in stages:
            cells = []
            for r in got:
                st = r["stages"].get(s)
                cells.append("0" if not st else f"{st['compiles']} / {st['compile_s']:.1f}")
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines.append("")
    compared = [r for r in rows if r.get("vs_before")]
    if compared:
        lines += ["## The same factors", "", "| run | largest relative difference of a matrix | same ranks |",
                  "| --- | ---: | --- |"]
        lines += [f"| {r['run']} ({r['label']} vs before) | {r['vs_before']['max_rel_matrix_diff']:.1e} | "
                  f"{'yes' if r['vs_before']['same_ranks'] else 'no'} |" for r in compared]
        lines.append("")
    lines += ["## Commands", ""] + [f"- {r['label']}, {r['run']}: `{r['command']}` (PYTHONPATH: {r['code']})"
                                   for r in rows]
    return "\n".join(lines) + "\n"


def split_runs(text: str) -> list[str]:
    """Groups and run names, comma-separated; a run's own name may hold a comma ("smollm2 best-0.2, no healing")."""
    parts, out = [p.strip() for p in text.split(",")], []
    while parts:
        for n in range(len(parts), 0, -1):  # the longest known name first
            joined = ", ".join(parts[:n])
            if joined in RUNS or joined in GROUPS or n == 1:
                out.append(joined)
                parts = parts[n:]
                break
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--label", default="after")
    p.add_argument("--code", default=".", help="the package's checkout, repo-relative or absolute (PYTHONPATH)")
    p.add_argument("--runs", default="stories,smollm2", help="groups (stories, smollm2) or run names, comma-separated")
    p.add_argument("--runs-dir", default="runs/compile")
    p.add_argument("--out", default="results/compile_smollm2")
    p.add_argument("--render", action="store_true")
    args = p.parse_args()
    path = benchlib.REPO / f"{args.out}.json"
    payload = json.loads(path.read_text()) if path.is_file() else {"cpu": benchlib.cpu_name(), "rows": []}
    if not args.render:
        names = [n for g in split_runs(args.runs) for n in GROUPS.get(g, [g])]
        runs_dir = Path(args.runs_dir)
        runs_dir.mkdir(parents=True, exist_ok=True)
        code = args.code if os.path.isabs(args.code) else str((benchlib.REPO / args.code).resolve())
        shown = os.path.relpath(code, benchlib.REPO)
        for name in names:
            if name not in RUNS:
                raise SystemExit(f"unknown run {name!r}; known: {', '.join(RUNS)}")
            row = {**one(name, args.label, code, runs_dir), "code": shown}
            before = folder(runs_dir, "before", name)
            after = folder(runs_dir, args.label, name)
            if args.label != "before" and RUNS[name][0] == "compress" and (before / "compression.json").is_file():
                row["vs_before"] = compare(before, after)
            payload["rows"] = [r for r in payload["rows"] if (r["run"], r["label"]) != (name, args.label)] + [row]
            payload["cpu"] = benchlib.cpu_name()
            benchlib.write(args.out, payload, table(payload))
            print(f"{args.label} {name}: {row['compiles']} compiles, {row['compile_s']:.1f} s compiling, "
                  f"{row['wall_s']:.1f} s", flush=True)
    benchlib.write(args.out, payload, table(payload))


if __name__ == "__main__":
    main()
