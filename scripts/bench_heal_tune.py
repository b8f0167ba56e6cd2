"""Heal settings chosen on held-out calibration windows: one compressed folder healed under several settings for the
same few steps, each variant's held-out KL curve side by side.

    python scripts/bench_heal_tune.py --src runs/refit/best-refit-0.4 --steps 20 --eval-every 10 \
        --variants "lr=1e-5" "lr=3e-5" "lr=3e-5,norms" "lr=3e-5,ce=0.5" --out results/heal_tune_smollm2

Every variant runs `heal_compressed` (the `--heal-*` stage after the fact) into RUNS_DIR/NAME and records the
stage's held-out trace: the KL to the dense model on `--heal-holdout` calibration windows that no step trains on
and that neither chose ranks nor factors. Nothing here reads evaluation text. A variant is a comma-separated list of
`lr=X` (peak rate), `norms` (train the RMSNorm weights too), `ce=W` (cross-entropy weight added to the KL),
`warmup` is fixed by the stage (5% of the steps). Finished variants are reused when their settings match.
Writes OUT.md and OUT.json.
"""

from __future__ import annotations

import argparse
import time

import benchlib

SHORT = {"lr": ("heal_lr", float), "ce": ("heal_ce", float), "norms": ("heal_norms", bool)}


def parse_variant(text: str) -> dict:
    """`"lr=3e-5,norms"` -> `{"heal_lr": 3e-5, "heal_norms": True}`."""
    out = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, _, value = item.partition("=")
        if key not in SHORT:
            raise SystemExit(f"variant {text!r}: unknown setting {key!r}; known: {', '.join(SHORT)}")
        name, kind = SHORT[key]
        out[name] = True if kind is bool else kind(value)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help="a finished compressed folder (float or PivGa factors)")
    p.add_argument("--variants", nargs="+", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--holdout", type=int, default=8)
    p.add_argument("--runs-dir", default="runs/heal_tune")
    p.add_argument("--out", default="results/heal_tune_smollm2")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    src = benchlib.REPO / args.src
    base = {"heal_steps": args.steps, "heal_eval_every": args.eval_every, "heal_samples": args.samples,
            "heal_seq_len": args.seq_len, "heal_batch": args.batch, "heal_holdout": args.holdout,
            "heal_patience": args.steps}  # no early stop: every variant's full curve
    rows = []
    for text in args.variants:
        settings = {**base, "heal_lr": 1e-5, **parse_variant(text)}
        name = "heal-" + text.replace("=", "").replace(",", "-")
        t0 = time.perf_counter()
        rep = benchlib.healed(src, benchlib.REPO / args.runs_dir / name, settings, progress=not args.no_progress)
        rep = rep["refine"][-1]
        rows.append({"variant": text, "settings": settings, "trace": rep["trace"], "seconds": rep["seconds"],
                     "run": f"{args.runs_dir}/{name}"})
        print(f"{text:<20} held-out KL {' -> '.join(f'{t[2]:.4f}' for t in rep['trace'])}  "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    steps = [t[0] for t in rows[0]["trace"]]
    best = min(rows, key=lambda r: r["trace"][-1][2])
    md = (f"# Heal settings on held-out calibration windows: {args.src}\n\n"
          f"Command: `{benchlib.command_line()}`. CPU: {benchlib.cpu_name()}. Each variant: {args.steps} AdamW steps "
          f"of {args.batch} × {args.seq_len} tokens (linear warmup over 5% of the steps, cosine decay to 10%), "
          f"held-out KL to the dense model on {args.holdout} calibration windows clear of the training windows.\n\n"
          "| variant | " + " | ".join(f"KL @ {s}" for s in steps) + " | seconds |\n"
          "| --- | " + " | ".join("---:" for _ in steps) + " | ---: |\n"
          + "".join(f"| {r['variant']} | " + " | ".join(f"{t[2]:.4f}" for t in r["trace"])
                    + f" | {r['seconds']:.0f} |\n" for r in rows)
          + f"\nLowest held-out KL after {steps[-1]} steps: **{best['variant']}**.\n")
    benchlib.write(args.out, {"args": vars(args), "cpu": benchlib.cpu_name(), "rows": rows, "chosen": best["variant"]},
                   md)
    print(md)


if __name__ == "__main__":
    main()
