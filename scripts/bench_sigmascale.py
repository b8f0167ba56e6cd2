"""SigmaScale benchmark: sigmascale (block and layer loss) beside svd-llm and svd-llm+update, same calibration.

Runs the public command lines, reusing the baselines benchmark's svd-llm runs when
their commands match (same runs folder). Writes a Markdown table and JSON with
WikiText-2 and C4 perplexity, compression time, peak memory, and for SigmaScale the
share of the summed held-out block loss its learned scales removed.

    python scripts/bench_sigmascale.py --ratios 0.1,0.2,0.3,0.4 --steps 50 --step-windows 4 \\
        --max-windows 16 --out results/sigmascale_smollm2
"""

from __future__ import annotations

import argparse
import sys

import benchlib

REFERENCE = "svd-llm+update"


def markdown(rows: list[dict], args) -> str:
    lines = ["| ratio | method | WikiText-2 ppl | C4 ppl | vs svd-llm+update (wiki / c4) | held-out loss removed | compress s | peak host MiB |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r.get("not_run"):
            lines.append(benchlib.not_run_line([r["ratio"], r["method"]], 8))
            continue
        ref = next((x for x in rows if x["method"] == REFERENCE and x["ratio"] == r["ratio"] and not x.get("not_run")),
                   None)
        vs = (f"{r['wikitext2_ppl'] / ref['wikitext2_ppl'] - 1:+.1%} / {r['c4_ppl'] / ref['c4_ppl'] - 1:+.1%}"
              if ref and r is not ref else "")
        gain = f"{r['holdout_gain']:.1%}" if "holdout_gain" in r else ""
        lines.append(f"| {r['ratio']} | {r['method']} | {r['wikitext2_ppl']:.3f} | {r['c4_ppl']:.3f} | {vs} | {gain} "
                     f"| {r.get('compress_s', 0):.0f} | {r.get('peak_host_mib', 0):.0f} |")
    setup = (f"SigmaScale: {args.steps} Adam steps per block (lr {args.lr}, cosine decay), {args.step_windows} windows "
             f"per step, held-out {args.holdout} of the windows checked every {args.eval_every} steps.\n\n")
    return benchlib.header("SigmaScale", args) + setup + "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    benchlib.add_common_args(p, "results/sigmascale_smollm2")
    p.add_argument("--methods", default="svd-llm,svd-llm+update,sigmascale-layer,sigmascale-block")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--lr", type=float, default=3e-2)
    p.add_argument("--step-windows", type=int, default=4)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--holdout", type=float, default=0.125)
    args = p.parse_args()
    sigma_flags = ["--steps", str(args.steps), "--lr", str(args.lr), "--step-windows", str(args.step_windows),
                   "--eval-every", str(args.eval_every), "--holdout", str(args.holdout)]

    rows = [benchlib.dense_row(args)]
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for method in args.methods.split(","):
            extra = sigma_flags if method.startswith("sigmascale") else []
            rows.append(benchlib.method_row(method, ratio, args, extra))
            benchlib.write(args.out, {"args": vars(args), "rows": rows}, markdown(rows, args))
    print(markdown(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
