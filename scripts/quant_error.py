"""Where quantized low-rank factors lose: each matrix's reconstruction error, per encoding and quantizer.

For every factored projection of a float32 plain compression (`B: [m, k]`, `C: [k, n]`,
`W = B C`), the relative Frobenius error `‖Ŵ − W‖ / ‖W‖` of:

- `rtn(W)`: the same round-to-nearest quantizer on the rank-k matrix itself (what the factors
  would cost if quantizing them were as good as quantizing W),
- `plain`: B and C quantized,
- `pivga`: B' = B C_P and R = C_P⁻¹ C_R quantized, and, to say which factor loses,
  `pivga, R only` and `pivga, B' only`,

for int8 and int4 (`--group-size` columns per scale, as `--quantize`). Reads the run's
factors, nothing else; about a minute on 2 CPU cores for SmolLM2. Writes OUT.md and OUT.json.

    python scripts/quant_error.py --run runs/bench_ranks/svd-llm-uniform-0.2 --out results/quant_error_smollm2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

import benchlib

from sigmascale_jax.io.checkpoint import load_compressed
from sigmascale_jax.compress.encode.quant import DEFAULT_GROUP
from sigmascale_jax.compress.encode.pivga import PivGa, perm_codes, pivga_from_factors
from sigmascale_jax.model.leaves import LowRank
from sigmascale_jax.model.modeling import PROJECTIONS
from sigmascale_jax.compress.encode.quant import quantize

VARIANTS = ("rtn(W)", "plain", "pivga", "pivga, R only", "pivga, B' only")


def rel(a, ref: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - ref) / np.linalg.norm(ref))


def matrix_errors(b: np.ndarray, c: np.ndarray, kind: str, group: int) -> dict[str, float]:
    """Relative errors of each variant for one pair `b: [m, k]`, `c: [k, n]` quantized as `kind`."""
    q = lambda x: quantize(np.asarray(x, np.float32), kind, group)  # noqa: E731
    w = np.asarray(b, np.float64) @ np.asarray(c, np.float64)
    bp, r, perm = pivga_from_factors(b, c)
    qbp, qr, perm = q(bp), q(r), perm_codes(perm)
    return {"rtn(W)": rel(q(w).dequantize(), w), "plain": rel(LowRank(q(b), q(c)).matrix(), w),
            "pivga": rel(PivGa(qbp, qr, perm).matrix(), w),
            "pivga, R only": rel(PivGa(np.asarray(bp, np.float32), qr, perm).matrix(), w),
            "pivga, B' only": rel(PivGa(qbp, np.asarray(r, np.float32), perm).matrix(), w),
            "max_abs_r": float(np.abs(r).max())}


def markdown(rows: list[dict], args) -> str:
    out = ["# Quantized factors: reconstruction error per matrix\n",
           f"Run: `{args.run}` (float32 plain factors). Group size {args.group_size}. Relative Frobenius error "
           f"‖Ŵ − W‖/‖W‖ of the rank-k matrix W = B·C, median over blocks (max in brackets). Command: "
           f"`{benchlib.command_line()}`\n",
           "| proj | quant | " + " | ".join(VARIANTS) + " | max abs R |",
           "| --- | --- | " + " | ".join("---:" for _ in VARIANTS) + " | ---: |"]
    for r in rows:
        cells = [f"{r[v]['median']:.3f} ({r[v]['max']:.3f})" for v in VARIANTS]
        out.append(f"| {r['proj']} | {r['quant']} | " + " | ".join(cells) + f" | {r['max_abs_r']:.2f} |")
    return "\n".join(out) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a plain float32 compression folder")
    p.add_argument("--group-size", type=int, default=DEFAULT_GROUP)
    p.add_argument("--out", default="results/quant_error_smollm2", help="writes OUT.md and OUT.json")
    args = p.parse_args()
    _, params = load_compressed(Path(args.run))
    rows = []
    for kind in ("int8", "int4"):
        for name in PROJECTIONS:
            per = [matrix_errors(blk[name].b, blk[name].c, kind, args.group_size)
                   for blk in params["blocks"] if isinstance(blk[name], LowRank)]
            if not per:
                continue
            row = {"proj": name, "quant": kind, "matrices": len(per),
                   "max_abs_r": max(e["max_abs_r"] for e in per)}
            for v in VARIANTS:
                vals = np.array([e[v] for e in per])
                row[v] = {"median": float(np.median(vals)), "max": float(vals.max())}
            rows.append(row)
            print(f"{kind} {name}: " + ", ".join(f"{v} {row[v]['median']:.3f}" for v in VARIANTS), flush=True)
    md = markdown(rows, args)
    benchlib.write(args.out, {"args": vars(args), "rows": rows}, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
