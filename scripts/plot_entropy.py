"""Effective-rank entropy of a SigmaScale run: spectra and entropy-vs-loss scatter (PNG), Spearman correlation (JSON).

Reads the run's `compression.json` (per-matrix entropies of W, of the whitened
W S and of the learned scaled matrix, and each matrix's relative activation loss)
and its factored params (for the spectra, recomputed from the source model).

    python scripts/plot_entropy.py runs/smollm2-sigmascale-0.2 --out results/entropy_smollm2_0.2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sigmascale_jax.fileio import write_json_atomic  # noqa: E402


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

    from sigmascale_jax.checkpoint import load_pytree
    from sigmascale_jax.params import load_block
    from sigmascale_jax.sources import open_model

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

    # spectra of one block: W, and the compressed product B C (rank k) for reference
    source = open_model(report["model"])
    block_idx = args.block if args.block is not None else report["model_config"]["num_layers"] // 2
    dense = load_block(source.reader, source.cfg, block_idx)
    comp = load_pytree(run / "params")["blocks"][block_idx]
    fig, axes = plt.subplots(1, 7, figsize=(21, 3.5))
    for ax, name in zip(axes, ("q", "k", "v", "o", "gate", "up", "down")):
        sw = np.linalg.svd(np.asarray(dense[name]["w"], np.float64), compute_uv=False)
        sc = np.linalg.svd(np.asarray(comp[name]["b"], np.float64) @ np.asarray(comp[name]["c"], np.float64), compute_uv=False)
        ax.semilogy(sw / sw[0], label="W")
        ax.semilogy(sc[: comp[name]["b"].shape[1]] / sw[0], label="B C")
        ax.set_title(f"block {block_idx} {name}")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(f"{args.out}_spectra.png", dpi=110)
    write_json_atomic(f"{args.out}.json", result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
