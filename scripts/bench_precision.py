"""Precision benchmark: every factorization in float32 (`--precision float32`, TPU's path) against float64, on SmolLM2.

    python scripts/bench_precision.py --methods svd-llm,sigmascale-block --ratios 0.2 --nsamples 64 \
        --max-windows 16 --out results/precision_smollm2

Each method is compressed twice with the public command line (uniform ranks, plain factors; SigmaScale with the
shipped learning settings), evaluated on WikiText-2 and C4, and the float32 row is set against the float64 one:
the issue's bound is 1% of perplexity. Writes OUT.md and OUT.json.
"""

from __future__ import annotations

import argparse

import benchlib

SIGMASCALE = ["--steps", "50", "--lr", "0.03", "--step-windows", "4", "--eval-every", "10", "--holdout", "0.125"]
EXTRA = {"sigmascale-block": SIGMASCALE}
PRECISIONS = ("float64", "float32")


def rows_of(method: str, ratio: float, args) -> list[dict]:
    out = []
    for precision in PRECISIONS:
        row = benchlib.method_row(method, ratio, args, ["--precision", precision, *EXTRA.get(method, [])],
                                  label=f"{method}-{precision}")
        out.append({**row, "precision": precision})
    base = out[0]
    for r in out:
        if not (r.get("not_run") or base.get("not_run")):
            r["wikitext2_rel"] = r["wikitext2_ppl"] / base["wikitext2_ppl"] - 1
            r["c4_rel"] = r["c4_ppl"] / base["c4_ppl"] - 1
    return out


def table(rows: list[dict], dense: dict) -> str:
    lines = ["| ratio | method | precision | WikiText-2 ppl | C4 ppl | vs float64 (WikiText-2 / C4) | factorize s | "
             "compress s |",
             "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |",
             f"| 0 | dense | | {dense['wikitext2_ppl']:.3f} | {dense['c4_ppl']:.3f} | | | |"]
    for r in rows:
        if r.get("not_run"):
            lines.append(benchlib.not_run_line([r["ratio"], r["method"]], 8))
            continue
        rel = f"{r['wikitext2_rel']:+.2e} / {r['c4_rel']:+.2e}" if "wikitext2_rel" in r else ""
        lines.append(f"| {r['ratio']} | {r['method']} | {r['precision']} | {r['wikitext2_ppl']:.3f} | "
                     f"{r['c4_ppl']:.3f} | {rel} | {r['timings_s'].get('factorize', 0):.0f} | {r['compress_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    benchlib.add_common_args(p, "results/precision_smollm2")
    p.set_defaults(runs_dir="runs/bench_precision", nsamples=64, ratios="0.2")
    p.add_argument("--methods", default="svd-llm,sigmascale-block", help="comma-separated benchlib methods")
    args = p.parse_args()
    dense = benchlib.dense_row(args)
    rows = [r for m in args.methods.split(",") for ratio in map(float, args.ratios.split(","))
            for r in rows_of(m, ratio, args)]
    md = benchlib.header("float32 vs float64 factorizations", args) + (
        "Uniform ranks, plain factors; `--precision` sets what every factorization runs in (whitening, SVDs, "
        "solves); SigmaScale's learning is float32 in both. CPU: " + benchlib.cpu_name() + ".\n\n"
        + table(rows, dense))
    benchlib.write(args.out, {"dense": dense, "rows": rows, "command": benchlib.command_line(),
                              "cpu": benchlib.cpu_name()}, md)
    print(md)


if __name__ == "__main__":
    main()
