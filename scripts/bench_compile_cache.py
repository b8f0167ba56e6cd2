"""Compile cache benchmark: the same compression twice with an empty and then a filled XLA compilation cache.

    python scripts/bench_compile_cache.py --methods svd-llm,sigmascale-block --nsamples 16 \
        --out results/compile_cache_smollm2

The command lines keep compiled programs in `$SIGMASCALE_CACHE/xla` (`--no-compile-cache` turns that off). Each
method runs three times in a fresh cache folder: with `--no-compile-cache` (every program compiled, nothing
written), cold (compiled and written) and warm (read back); wall-clock seconds of the whole process and the
report's stage times. The first run also fills the folder's data caches (the model file's sha1, the tokenized
calibration windows), which the cold and warm runs then read alike: warm against cold is what the compiled
programs save. Writes OUT.md and OUT.json; `--render` rewrites OUT.md from OUT.json without running anything (notes added below the table are lost).
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

MODES = ("off", "cold", "warm")


def one_run(method: str, mode: str, cache: Path, out: Path, args) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(SIGMASCALE_CACHE=str(cache), HF_HUB_OFFLINE="1")
    cmd = benchlib.run_command(method, out, args)
    if mode == "off":
        cmd.append("--no-compile-cache")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=benchlib.REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    report = json.loads((out / "compression.json").read_text())
    xla = cache / "xla"
    files = list(xla.rglob("*")) if xla.exists() else []
    return {"method": method, "mode": mode, "wall_s": wall, "report_s": report["seconds"],
            "timings_s": report["timings_s"], "cache_files": sum(f.is_file() for f in files),
            "cache_mib": sum(f.stat().st_size for f in files if f.is_file()) / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    benchlib.add_run_args(p, "results/compile_cache_smollm2")
    p.add_argument("--render", action="store_true", help="rewrite OUT.md from OUT.json; run nothing")
    args = p.parse_args()
    if args.render:
        payload = json.loads((benchlib.REPO / f"{args.out}.json").read_text())
        benchlib.write(args.out, payload, table(payload["rows"], payload["command"], payload["cpu"], args))
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="ssj-compile-cache-") as tmp:
        for method in args.methods.split(","):
            cache = Path(tmp) / method  # fresh per method: its cold run compiles everything it needs
            for mode in MODES:
                rows.append(one_run(method, mode, cache, Path(tmp) / f"out-{method}", args))
                r = rows[-1]
                print(f"{method:<18} {mode:<5} {r['wall_s']:7.1f} s  (report {r['report_s']:.1f} s, "
                      f"{r['cache_files']} cache files)", flush=True)
    md = table(rows, benchlib.command_line(), benchlib.cpu_name(), args)
    benchlib.write(args.out, {"rows": rows, "command": benchlib.command_line(), "cpu": benchlib.cpu_name()}, md)
    print(md)


def table(rows: list[dict], command: str, cpu: str, args) -> str:
    lines = [f"# Compile cache on {Path(args.model).name}\n",
             f"Ratio {args.ratio}, uniform ranks, {args.nsamples} × {args.seq_len} C4 calibration windows; each "
             "method in a fresh cache folder: `--no-compile-cache`, then cold (compiles and writes), then warm. The "
             "first run also fills the data caches (the model file's sha1, the tokenized calibration windows) that "
             "the cold and warm runs read alike, so warm / cold is what the compiled programs save. "
             f"Machine: {os.cpu_count()} CPU cores, {cpu}. Command: `{command}`\n",
             "| method | cache | process s | report s | stats s | factorize s | propagate s | warm / cold | "
             "cache files (MiB) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        cold = next(o for o in rows if o["method"] == r["method"] and o["mode"] == "cold")
        t = r["timings_s"]
        lines.append(f"| {r['method']} | {r['mode']} | {r['wall_s']:.1f} | {r['report_s']:.1f} | "
                     f"{t.get('stats', 0):.1f} | {t.get('factorize', 0):.1f} | {t.get('propagate', 0):.1f} | "
                     f"{r['wall_s'] / cold['wall_s']:.2f} | {r['cache_files']} ({r['cache_mib']:.1f}) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
