"""Baselines benchmark: every method x ratio on one model, with WikiText-2 and C4 perplexity.

Each compression and each evaluation runs in its own process (so peak memory is
per run) through the public command lines. Finished runs are reused, so an
interrupted benchmark continues where it stopped. Writes a Markdown table and JSON.

    python scripts/bench_compress.py --ratios 0.1,0.2,0.3,0.4 \\
        --methods svd,asvd,svd-llm,svd-llm+update --out results/baselines_smollm2
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

from sigmascale_jax.fileio import write_json_atomic, write_text_atomic  # noqa: E402

DEFAULT_MODEL = str(REPO.parent / "shared" / "models" / "smollm2-135m-instruct-q4_1")


def run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")


def method_flags(method: str) -> list[str]:
    """`svd-llm+update` is svd-llm with `--update`."""
    base, _, extra = method.partition("+")
    return ["--method", base] + (["--update"] if extra == "update" else [])


def evaluate(model: str, out_json: Path, args) -> dict:
    if not out_json.is_file():
        cmd = [sys.executable, "-m", "sigmascale_jax.eval", "--model", model, "--tasks", "wikitext2,c4",
               "--seq-len", str(args.eval_seq_len), "--batch-size", str(args.eval_batch_size),
               "--json", str(out_json), "--no-progress"]
        if args.max_windows:
            cmd += ["--max-windows", str(args.max_windows)]
        run(cmd)
    return json.loads(out_json.read_text())


def compress(method: str, ratio: float, folder: Path, args) -> dict:
    if not (folder / "compression.json").is_file():
        run([sys.executable, "-m", "sigmascale_jax.compress", "--model", args.model, *method_flags(method),
             "--ratio", str(ratio), "--nsamples", str(args.nsamples), "--seq-len", str(args.seq_len),
             "--seed", str(args.seed), "--out", str(folder), "--overwrite", "--no-progress", *args.extra])
    return json.loads((folder / "compression.json").read_text())


def markdown(rows: list[dict], args) -> str:
    head = (f"# Baselines on {Path(args.model).name}\n\n"
            f"Calibration: C4 docs 0-999, {args.nsamples} windows of {args.seq_len} tokens, seed {args.seed}. "
            f"Evaluation: seq-len {args.eval_seq_len}, "
            + (f"first {args.max_windows} windows of each set" if args.max_windows else "full sets")
            + f". Machine: {os.cpu_count()} CPU cores. Command: `{' '.join(sys.argv)}`\n\n")
    lines = ["| method | ratio | achieved | whole model | WikiText-2 ppl | C4 ppl | compress s | peak host MiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['ratio']} | {r.get('ratio_achieved', 0):.4f} | {r.get('whole_model_ratio', 0):.4f} "
                     f"| {r['wikitext2_ppl']:.3f} | {r['c4_ppl']:.3f} | {r.get('compress_s', 0):.0f} | {r.get('peak_host_mib', 0):.0f} |")
    return head + "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--ratios", default="0.1,0.2,0.3,0.4")
    p.add_argument("--methods", default="svd,asvd,svd-llm,svd-llm+update")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-seq-len", type=int, default=2048)
    p.add_argument("--eval-batch-size", type=int, default=1)
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows of each set")
    p.add_argument("--runs-dir", default="runs/bench")
    p.add_argument("--out", default="results/baselines_smollm2", help="writes OUT.md and OUT.json")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more flags for the compressor")
    args = p.parse_args()

    runs = REPO / args.runs_dir
    runs.mkdir(parents=True, exist_ok=True)
    rows = []
    dense = evaluate(args.model, runs / "dense.eval.json", args)
    rows.append({"method": "dense", "ratio": 0.0, "wikitext2_ppl": dense["wikitext2"]["ppl"], "c4_ppl": dense["c4"]["ppl"]})
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for method in args.methods.split(","):
            name = f"{method}-{ratio}"
            t0 = time.perf_counter()
            report = compress(method, ratio, runs / name, args)
            res = evaluate(str(runs / name), runs / f"{name}.eval.json", args)
            row = {
                "method": method, "ratio": ratio, "ratio_achieved": report["ratio_achieved"],
                "whole_model_ratio": report["whole_model_ratio"], "wikitext2_ppl": res["wikitext2"]["ppl"],
                "c4_ppl": res["c4"]["ppl"], "compress_s": report["seconds"],
                "peak_host_mib": report["memory"]["host_peak_mib"], "timings_s": report["timings_s"],
                "eval_windows": {t: res[t]["windows"] for t in ("wikitext2", "c4")},
            }
            rows.append(row)
            print(f"{name:<24} wiki {row['wikitext2_ppl']:>10.3f}  c4 {row['c4_ppl']:>10.3f}  "
                  f"achieved {row['ratio_achieved']:.4f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
            write_json_atomic(REPO / f"{args.out}.json", {"args": vars(args), "rows": rows})
            write_text_atomic(REPO / f"{args.out}.md", markdown(rows, args))
    write_json_atomic(REPO / f"{args.out}.json", {"args": vars(args), "rows": rows})
    write_text_atomic(REPO / f"{args.out}.md", markdown(rows, args))
    print(markdown(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
