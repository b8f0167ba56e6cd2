"""Baselines benchmark: every method x ratio on one model, with WikiText-2 and C4 perplexity.

Runs the public command lines (`sigmascale_jax.compress`, `sigmascale_jax.eval`), one
process each; finished runs are reused (see benchlib). Writes a Markdown table and JSON.

    python scripts/bench_compress.py --ratios 0.1,0.2,0.3,0.4 \\
        --methods svd,asvd,svd-llm,svd-llm+update --max-windows 16 --out results/baselines_smollm2
"""

from __future__ import annotations

import argparse
import sys

import benchlib


def markdown(rows: list[dict], args) -> str:
    lines = ["| method | ratio | achieved | whole model | WikiText-2 ppl | C4 ppl | compress s | peak host MiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r.get("not_run"):
            lines.append(benchlib.not_run_line([r["method"], r["ratio"]], 8))
            continue
        lines.append(f"| {r['method']} | {r['ratio']} | {r.get('ratio_achieved', 0):.4f} | {r.get('whole_model_ratio', 0):.4f} "
                     f"| {r['wikitext2_ppl']:.3f} | {r['c4_ppl']:.3f} | {r.get('compress_s', 0):.0f} | {r.get('peak_host_mib', 0):.0f} |")
    return benchlib.header("Baselines", args) + "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    benchlib.add_common_args(p, "results/baselines_smollm2")
    p.add_argument("--methods", default="svd,asvd,svd-llm,svd-llm+update")
    args = p.parse_args()

    rows = [benchlib.dense_row(args)]
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for method in args.methods.split(","):
            rows.append(benchlib.method_row(method, ratio, args))
            benchlib.write(args.out, {"args": vars(args), "rows": rows}, markdown(rows, args))
    benchlib.write(args.out, {"args": vars(args), "rows": rows}, markdown(rows, args))
    print(markdown(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
