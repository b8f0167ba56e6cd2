"""Effective-rank entropy of a SigmaScale run: spectra and entropy-vs-loss scatter (PNG), Spearman correlation (JSON).

Reads the run's `compression.json` (per-matrix entropies of W, of the whitened
W S and of the learned scaled matrix, and each matrix's relative activation loss)
and its `spectra.npz` (the singular values behind those entropies).

    python scripts/plot_entropy.py runs/smollm2-sigmascale-0.2 --out results/entropy_smollm2_0.2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sigmascale_jax.io.fileio import write_json_atomic  # noqa: E402


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a folder written by `compress --method sigmascale`")
    p.add_argument("--out", required=True, help="prefix: writes OUT_spectra.png, OUT_scatter.png, OUT.json")
    p.add_argument("--block", type=int, default=None, help="block whose spectra to draw (default: the middle one)")
    args = p.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sigmascale_jax.io.checkpoint import SPECTRA_FILE

    run = Path(args.run)
    report = json.loads((run / "compression.json").read_text())
    mats = [m for m in report["matrices"] if "entropy_scaled" in m]
    if not mats:
        raise SystemExit(f"{run} has no entropies: it was not compressed with --method sigmascale")
    loss = np.array([m["rel_loss"] for m in mats])
    kinds = {"W": "entropy_w", "W S (whitened)": "entropy_whitened", "learned scaled A": "entropy_scaled"}
    result = {"run": str(run), "n": len(mats), "spearman_vs_rel_loss": {}}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=True)
    for ax, (label, key) in zip(axes, kinds.items()):
        h = np.array([m[key] for m in mats])
        rho = spearman(h, loss)
        result["spearman_vs_rel_loss"][key] = rho
        for name in sorted({m["name"] for m in mats}):
            sel = [i for i, m in enumerate(mats) if m["name"] == name]
            ax.scatter(h[sel], loss[sel], s=12, label=name)
        ax.set_xlabel(f"H({label})")
        ax.set_title(f"Spearman ρ = {rho:.3f}")
        ax.set_yscale("log")
    axes[0].set_ylabel("relative activation loss")
    axes[-1].legend(fontsize=8)
    fig.suptitle(f"{report['method']} r={report['ratio_requested']} on {Path(report['model']).name}")
    fig.tight_layout()
    fig.savefig(f"{args.out}_scatter.png", dpi=120)

    # spectra of one block: W, W S and the learned scaled matrix, each over its own largest value; the cut at rank k
    block_idx = args.block if args.block is not None else report["model_config"]["num_layers"] // 2
    ranks = {m["name"]: m["rank"] for m in mats if m["block"] == block_idx}
    fig, axes = plt.subplots(1, 7, figsize=(21, 3.5))
    with np.load(run / SPECTRA_FILE) as spectra:
        for ax, name in zip(axes, ("q", "k", "v", "o", "gate", "up", "down")):
            for label, key in (("W", "w"), ("W S", "whitened"), ("scaled A", "scaled")):
                sig = spectra[f"{block_idx}.{name}.{key}"]
                ax.semilogy(sig / sig[0], label=label)
            ax.axvline(ranks[name], color="gray", lw=0.8, ls="--")
            ax.set_title(f"block {block_idx} {name} (k={ranks[name]})")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(f"{args.out}_spectra.png", dpi=110)
    write_json_atomic(f"{args.out}.json", result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
