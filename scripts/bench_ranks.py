"""Rank allocation benchmark: uniform, zs-svd (± correction), sensitivity and fermigrad ranks, each with svd-llm and
sigmascale factors, and SigmaScale's paper recipe (sensitivity ranks, --loss paper, --no-sequential).

Runs the public command lines (one process per compression and evaluation; finished
runs are reused, see benchlib). Writes OUT.md and OUT.json (perplexity, achieved
ratio, matrices kept dense, compression time by stage, the correction's calibration
loss before/after) and OUT_ranks_RATIO.png: the rank of each projection by block.

    python scripts/bench_ranks.py --ratios 0.2,0.4 --nsamples 64 --max-windows 16 --out results/ranks_smollm2 \
        --ranks uniform,zs-svd,zs-svd+correction,sensitivity,fermigrad --methods svd-llm,sigmascale,sigmascale-paper

Allocations are cached (`sigmascale_jax.io.diskcache`), so the ranks of zs-svd, sensitivity and
fermigrad are computed once per ratio and reused by the other methods: the `allocate`
column shows the seconds the allocation took when it was computed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import benchlib

RANKS_FLAGS = {
    "uniform": [],
    "zs-svd": ["--ranks", "zs-svd"],
    "zs-svd+correction": ["--ranks", "zs-svd", "--correction"],
    "sensitivity": ["--ranks", "sensitivity"],
    "fermigrad": ["--ranks", "fermigrad"],
}
PROJ = ("q", "k", "v", "o", "gate", "up", "down")


def _fmt_vs(r: dict, ref: dict | None) -> str:
    if not ref or ref is r:
        return ""
    return f"{r['wikitext2_ppl'] / ref['wikitext2_ppl'] - 1:+.1%} / {r['c4_ppl'] / ref['c4_ppl'] - 1:+.1%}"


def alloc_seconds(r: dict) -> str:
    """Seconds the allocation took when computed (a cached or reused one is marked *), from its own record."""
    info = r.get("allocate") or {}
    if isinstance(info.get("seconds"), dict):
        secs = sum(info["seconds"].values())
    elif "table_seconds" in info:
        secs = info["table_seconds"]
    else:
        secs = r["timings_s"].get("allocate", 0)
    # `reused_from`: the ranks were copied from another run with the same allocator and calibration
    cached = (info.get("from_cache") or info.get("table_from_cache") or info.get("deltas_from_cache")
              or info.get("reused_from"))
    return f"{secs:.0f}{'*' if cached else ''}"


def markdown(rows: list[dict], args) -> str:
    lines = ["| ratio | method | ranks | WikiText-2 ppl | C4 ppl | vs uniform (wiki / c4) | achieved | dense matrices "
             "| compress s | of which allocate / refine s | correction: held-out calib. loss |",
             "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r.get("method") == "dense":
            lines.append(f"| 0 | dense | | {r['wikitext2_ppl']:.3f} | {r['c4_ppl']:.3f} | | | | | | |")
            continue
        if r.get("not_run"):
            lines.append(benchlib.not_run_line([r["ratio"], r["method"], r["ranks"]], 11))
            continue
        ref = next((x for x in rows if x.get("ranks") == "uniform" and x["method"] == r["method"]
                    and x["ratio"] == r["ratio"] and not x.get("not_run")), None)
        t = r["timings_s"]
        corr = r.get("correction")
        corr_s = f"{corr['held_out_loss_before']:.4f} → {corr['held_out_loss_after']:.4f}" if corr and "held_out_loss_before" in corr else ""
        if corr and corr.get("kept") == "uncorrected":
            corr_s += " (dropped by the guard)"
        lines.append(
            f"| {r['ratio']} | {r['method']} | {r['ranks']} | {r['wikitext2_ppl']:.3f} | {r['c4_ppl']:.3f} | {_fmt_vs(r, ref)} "
            f"| {r['ratio_achieved']:.4f} | {r['dense_matrices']} | {r['compress_s']:.0f} "
            f"| {alloc_seconds(r)} / {t.get('refine', 0):.0f} | {corr_s} |")
    setup = (f"SigmaScale: the shipped config's learning settings ({' '.join(args.sigma_flags)}). zs-svd: gradient of the "
             f"calibration cross-entropy on the first {args.grad_samples or 16} calibration windows; the correction "
             "uses the same windows and is checked on the next ones (held-out calibration loss before → after). "
             "sensitivity: the perplexity table on the first 4 calibration windows, computed once and cached. fermigrad: "
             "the allocator's defaults. sigmascale-paper: the released recipe (sensitivity ranks, per-matrix scaling "
             f"without whitening, AdamW lr 0.005, {args.paper_steps} steps per matrix, --no-sequential). "
             "Allocation seconds: as computed once (* = this run reused it: from the cache, or copied from the "
             "svd-llm run with the same allocator); compress s is this run's wall time.\n\n")
    return benchlib.header("Rank allocation", args) + setup + "\n".join(lines) + "\n"


def plot_ranks(rows: list[dict], ratio: float, path: Path) -> bool:
    """Rank by block for each projection type: uniform and zs-svd (dense matrices drawn at full rank, hollow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {}
    for ranks in ("uniform", "zs-svd"):
        r = next((x for x in rows if x.get("ranks") == ranks and x["ratio"] == ratio and not x.get("not_run")), None)
        if r:
            runs[ranks] = json.loads((Path(r["run"]) / "compression.json").read_text())["matrices"]
    if "zs-svd" not in runs:
        return False
    fig, axes = plt.subplots(1, len(PROJ), figsize=(3.0 * len(PROJ), 3.2), sharex=True)
    for ax, proj in zip(axes, PROJ):
        for ranks, style in (("uniform", "--"), ("zs-svd", "-o")):
            if ranks not in runs:
                continue
            ms = [m for m in runs[ranks] if m["name"] == proj]
            blocks, ks = [m["block"] for m in ms], [m["rank"] for m in ms]
            ax.plot(blocks, ks, style, ms=3, label=ranks)
            dense = [(m["block"], m["rank"]) for m in ms if m.get("dense")]
            if dense:
                ax.plot(*zip(*dense), "s", mfc="none", color="red", ms=5, label="kept dense" if proj == PROJ[0] else None)
        ax.set_title(f"{proj} {ms[0]['shape'][0]}x{ms[0]['shape'][1]}", fontsize=9)
        ax.set_xlabel("block")
        ax.set_ylim(bottom=0)
    axes[0].set_ylabel("rank")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Ranks at ratio {ratio}: uniform vs zs-svd", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    benchlib.add_common_args(p, "results/ranks_smollm2")
    p.set_defaults(ratios="0.2,0.4", nsamples=64, runs_dir="runs/bench_ranks")
    p.add_argument("--methods", default="svd-llm,sigmascale")
    p.add_argument("--ranks", default="uniform,zs-svd,zs-svd+correction")
    p.add_argument("--grad-samples", type=int, default=None, help="zs-svd / correction gradient windows (default 16)")
    p.add_argument("--config", default="configs/smollm2-sigmascale.yaml",
                   help="SigmaScale's learning settings are read from this config")
    p.add_argument("--paper-steps", type=int, default=1000, help="sigmascale-paper: steps per matrix (the recipe: 1000)")
    args = p.parse_args()
    import yaml

    conf = yaml.safe_load((benchlib.REPO / args.config).read_text())
    keys = ("steps", "lr", "step-windows", "eval-every", "holdout")  # --loss block comes with the method
    args.sigma_flags = [tok for k in keys if k in conf for tok in (f"--{k}", str(conf[k]))]
    method_flags = {"svd-llm": [], "sigmascale": args.sigma_flags,
                    "sigmascale-paper": ["--loss", "paper", "--steps", str(args.paper_steps), "--no-sequential"]}
    base = {"svd-llm": "svd-llm", "sigmascale": "sigmascale-block", "sigmascale-paper": "sigmascale-block"}
    grad = ["--grad-samples", str(args.grad_samples)] if args.grad_samples else []

    rows = [benchlib.dense_row(args)]
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for method in args.methods.split(","):
            for ranks in args.ranks.split(","):
                if method == "sigmascale-paper" and ranks != "sensitivity":
                    continue  # the recipe is its own ranks and factors
                extra = method_flags[method] + RANKS_FLAGS[ranks] + (grad if ranks.startswith("zs-svd") else [])
                row = benchlib.method_row(base[method], ratio, args, extra, label=f"{method}-{ranks}")
                row.update(method=method, ranks=ranks)
                if not row.get("not_run"):
                    report = json.loads((Path(row["run"]) / "compression.json").read_text())
                    row["dense_matrices"] = sum(bool(m.get("dense")) for m in report["matrices"])
                    row["allocate"] = {k: v for k, v in report.get("allocate", {}).items() if k != "trace"}
                    row["correction"] = next(({k: v for k, v in r.items() if k != "matrices"}
                                              for r in report.get("refine", []) if r["name"] == "correction"), None)
                    row["ranks_by_matrix"] = [[m["block"], m["name"], m["rank"], bool(m.get("dense"))]
                                              for m in report["matrices"]]
                rows.append(row)
                benchlib.write(args.out, {"args": vars(args), "rows": rows}, markdown(rows, args))
        if plot_ranks(rows, ratio, benchlib.REPO / f"{args.out}_ranks_{ratio}.png"):
            print(f"wrote {args.out}_ranks_{ratio}.png")
    benchlib.write(args.out, {"args": vars(args), "rows": rows}, markdown(rows, args))
    print(markdown(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
