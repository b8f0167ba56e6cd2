"""Shared pieces of the compression benchmarks: run the public command lines, reuse finished runs, write tables.

Each compression and each evaluation runs in its own process (so peak memory is per
run). A run is reused only when its recorded command is the one about to run, so an
interrupted benchmark continues where it stopped and changed flags never mix results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sigmascale_jax.io.fileio import write_json_atomic, write_text_atomic  # noqa: E402

DEFAULT_MODEL = str(REPO.parent / "shared" / "models" / "smollm2-135m-instruct-q4_1")


def shown_path(path: str) -> str:
    """`path` as results files give it: relative to the repository where it lies beside it (`../shared/...`),
    never this machine's absolute path."""
    import os

    p = Path(path)
    return os.path.relpath(p, REPO) if p.is_absolute() and p.resolve().is_relative_to(REPO.parent) else str(path)

# Benchmark method name -> compressor flags.
METHOD_FLAGS = {
    "svd": ["--method", "svd"],
    "asvd": ["--method", "asvd"],
    "svd-llm": ["--method", "svd-llm"],
    "svd-llm+update": ["--method", "svd-llm", "--update"],
    "sigmascale-block": ["--method", "sigmascale", "--loss", "block"],
    "sigmascale-layer": ["--method", "sigmascale", "--loss", "layer"],
    "none": ["--method", "none"],  # --ratio 0: every projection dense (quantization alone)
}


def cpu_name() -> str:
    """This machine's CPU model (/proc/cpuinfo), for tables that quote times."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")


class NotRun(Exception):
    """A run that --reuse-only found no finished record of."""


def _without_overwrite(cmd: list[str]) -> list[str]:
    return [c for c in cmd if c != "--overwrite"]


def cached(cmd: list[str], done: Path, record: Path, reuse_only: bool = False) -> None:
    """Run `cmd` unless `done` exists and `record` holds this very command (`--overwrite` aside)."""
    if done.exists() and record.is_file() and _without_overwrite(json.loads(record.read_text())) == _without_overwrite(cmd):
        return
    if reuse_only:
        raise NotRun(done)
    run(cmd)
    write_json_atomic(record, cmd)


def add_common_args(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--ratios", default="0.1,0.2,0.3,0.4")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-seq-len", type=int, default=2048)
    p.add_argument("--eval-batch-size", type=int, default=1)
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows of each set")
    p.add_argument("--runs-dir", default="runs/bench")
    p.add_argument("--out", default=out, help="writes OUT.md and OUT.json")
    p.add_argument("--reuse-only", action="store_true",
                   help="tabulate only runs already made with these flags; list the others as not run")
    p.add_argument("--note", default="", help="a paragraph for the table's header (e.g. what else ran on the machine)")


def evaluate(model: str, out_json: Path, args) -> dict:
    cmd = [sys.executable, "-m", "sigmascale_jax.eval", "--model", model, "--tasks", "wikitext2,c4",
           "--seq-len", str(args.eval_seq_len), "--batch-size", str(args.eval_batch_size),
           "--json", str(out_json), "--no-progress"]
    if args.max_windows:
        cmd += ["--max-windows", str(args.max_windows)]
    cached(cmd, out_json, out_json.with_suffix(".cmd.json"), args.reuse_only)
    return json.loads(out_json.read_text())


def compress(method: str, ratio: float, folder: Path, args, extra: list[str] = ()) -> dict:
    """Run (or reuse) the compressor with `METHOD_FLAGS[method]` plus `extra` flags into `folder`."""
    # --overwrite only to replace a finished run made with other flags: an interrupted one (folder.partial) resumes.
    replace = ["--overwrite"] if folder.exists() else []
    cmd = [sys.executable, "-m", "sigmascale_jax.compress", "--model", args.model, *METHOD_FLAGS[method],
           "--ratio", str(ratio), "--nsamples", str(args.nsamples), "--seq-len", str(args.seq_len),
           "--seed", str(args.seed), "--out", str(folder), *replace, "--no-progress", *extra]
    cached(cmd, folder / "compression.json", folder.with_name(folder.name + ".cmd.json"),
           args.reuse_only)
    return json.loads((folder / "compression.json").read_text())


def dense_row(args) -> dict:
    res = evaluate(args.model, REPO / args.runs_dir / "dense.eval.json", args)
    return {"method": "dense", "ratio": 0.0, "wikitext2_ppl": res["wikitext2"]["ppl"], "c4_ppl": res["c4"]["ppl"],
            "eval_windows": {t: res[t]["windows"] for t in ("wikitext2", "c4")}}


def method_row(method: str, ratio: float, args, extra: list[str] = (), label: str | None = None) -> dict:
    """Compress (or reuse), evaluate (or reuse) and summarize one method at one ratio (run folder `label-ratio`)."""
    runs = REPO / args.runs_dir
    runs.mkdir(parents=True, exist_ok=True)
    name = f"{label or method}-{ratio}"
    t0 = time.perf_counter()
    try:
        report = compress(method, ratio, runs / name, args, extra)
        res = evaluate(str(runs / name), runs / f"{name}.eval.json", args)
    except NotRun:
        print(f"{name:<26} not run (--reuse-only)", flush=True)
        return {"method": method, "ratio": ratio, "not_run": True}
    row = {
        "method": method, "ratio": ratio, "ratio_achieved": report["ratio_achieved"],
        "whole_model_ratio": report["whole_model_ratio"], "wikitext2_ppl": res["wikitext2"]["ppl"],
        "c4_ppl": res["c4"]["ppl"], "compress_s": report["seconds"],
        "peak_host_mib": report["memory"]["host_peak_mib"], "timings_s": report["timings_s"],
        "eval_windows": {t: res[t]["windows"] for t in ("wikitext2", "c4")},
        "run": str(Path(args.runs_dir) / name),  # repo-relative, as results files give paths
    }
    if report.get("blocks") and "holdout_init" in report["blocks"][0]:  # SigmaScale's learning (a refit has its own)
        init = [b["holdout_init"] for b in report["blocks"]]
        best = [b["holdout_best"] for b in report["blocks"]]
        row["holdout_gain"] = 1.0 - sum(best) / sum(init)  # fraction of the summed held-out loss removed
        row["sigmascale"] = report["sigmascale"]
    print(f"{name:<26} wiki {row['wikitext2_ppl']:>12.3f}  c4 {row['c4_ppl']:>12.3f}  "
          f"achieved {row['ratio_achieved']:.4f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return row


def not_run_line(lead: list, columns: int) -> str:
    """A table row of `columns` cells for a run --reuse-only did not find: `lead`, "not run", blanks."""
    return "| " + " | ".join(map(str, lead)) + " | not run |" + " |" * (columns - len(lead) - 1)


def command_line() -> str:
    """This script's command line, without the --note (printed on its own)."""
    argv = sys.argv
    kept = [a for i, a in enumerate(argv) if a != "--note" and (i == 0 or argv[i - 1] != "--note")]
    return "python " + " ".join(kept)


def header(title: str, args) -> str:
    return (f"# {title} on {Path(args.model).name}\n\n"
            f"Calibration: C4 docs 0-999, {args.nsamples} windows of {args.seq_len} tokens, seed {args.seed}. "
            f"Evaluation: seq-len {args.eval_seq_len}, "
            + (f"first {args.max_windows} windows of each set" if args.max_windows else "full sets")
            + f". Machine: {os.cpu_count()} CPU cores (times are wall-clock on this machine). "
            f"Command: `{command_line()}`\n\n" + (f"{args.note}\n\n" if args.note else ""))


def write(out: str, payload: dict, md: str) -> None:
    """`out`.json and `out`.md; a payload's `args.model` is written as `shown_path` gives it."""
    if isinstance(payload.get("args"), dict) and isinstance(payload["args"].get("model"), str):
        payload = {**payload, "args": {**payload["args"], "model": shown_path(payload["args"]["model"])}}
    write_json_atomic(REPO / f"{out}.json", payload)
    write_text_atomic(REPO / f"{out}.md", md)


def healed(src: Path, out: Path, settings: dict, model: str | None = None, reuse_only: bool = False,
           progress: bool = True) -> dict:
    """`heal_compressed(src, out, **settings)` and its report, reused when `out` was healed from `src` (and `model`)
    with these settings (OUT.cmd.json beside it)."""
    from sigmascale_jax.compress.refine.heal import heal_compressed

    record = out.with_name(out.name + ".cmd.json")
    want = {"src": str(src), "model": model, **settings}
    if (out / "compression.json").is_file() and record.is_file() and json.loads(record.read_text()) == want:
        return json.loads((out / "compression.json").read_text())
    if reuse_only:
        raise NotRun(out)
    report = heal_compressed(src, out, model=model, overwrite=True, progress=progress, **settings)
    write_json_atomic(record, want)
    return report


# Whole runs timed or measured as they are (compile cache, memory plan): SigmaScale at 10 steps
QUICK_FLAGS = {"sigmascale-block": ["--steps", "10", "--step-windows", "4", "--eval-every", "5"]}


def add_run_args(p: argparse.ArgumentParser, out: str) -> None:
    """The flags of the scripts that run whole compressions as they are: --model, --methods, --ratio, --nsamples,
    --seq-len, --out."""
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--methods", default="svd-llm,sigmascale-block")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--out", default=out)


def run_command(method: str, out: Path, args) -> list[str]:
    """The compressor's command line for one of those runs, into `out` (replaced)."""
    return [sys.executable, "-m", "sigmascale_jax.compress", "--model", args.model, *METHOD_FLAGS[method],
            "--ratio", str(args.ratio), "--nsamples", str(args.nsamples), "--seq-len", str(args.seq_len),
            "--out", str(out), "--overwrite", "--no-progress", *QUICK_FLAGS.get(method, [])]
