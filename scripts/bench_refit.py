"""Refit benchmark: the same compressions with and without `--refit-steps`, on SmolLM2 by default.

    python scripts/bench_refit.py --ratios 0.2,0.4 --methods svd-llm --refit-steps 50 --max-windows 16

For every ratio and factorizer, one run without the refit and one with it (same calibration windows, ranks and
seed), each evaluated on WikiText-2 and C4 (`sigmascale_jax.eval`). Per refit run, every block's held-out block
error before and after the refit (on the calibration windows the refit held out, never evaluation text), its
steps, and its seconds beside the factorizer's. Writes OUT.md and OUT.json; finished runs are reused when their
command is the same (`--reuse-only`: tabulate only those).
"""

from __future__ import annotations

import argparse
import json

import benchlib

REFIT_KEYS = ("refit_lr", "refit_windows", "refit_holdout", "refit_eval_every", "refit_patience", "refit_backoff")


def refit_flags(args, lr: str | None = None) -> list[str]:
    flags = ["--refit-steps", str(args.refit_steps)]
    for key in REFIT_KEYS:
        value = lr if key == "refit_lr" else getattr(args, key)  # the learning rate is per run
        if value is not None:
            flags += [f"--{key.replace('_', '-')}", str(float(value)) if key == "refit_lr" else str(value)]
    return flags + (["--refit-norms"] if args.refit_norms else [])


def block_records(run: str) -> list[dict]:
    """Each block's refit record and factorizer seconds from a run's compression.json."""
    report = json.loads((benchlib.REPO / run / "compression.json").read_text())
    out = []
    for b in report.get("blocks", []):
        if "refit" in b:
            r = b["refit"]
            out.append({"block": b["block"], "factorize_s": b.get("factorize_s"), "refit_s": r["seconds"],
                        "before": r["holdout_before"], "after": r["holdout_after"], "steps_run": r["steps_run"],
                        "best_step": r["best_step"], "trace": r["holdout_trace"]})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    benchlib.add_common_args(p, "results/refit_smollm2")
    p.set_defaults(ratios="0.2,0.4", runs_dir="runs/refit")
    p.add_argument("--methods", default="svd-llm", help="factorizers (benchlib.METHOD_FLAGS keys), comma-separated")
    p.add_argument("--ranks", default="uniform", help="the allocator of every run")
    p.add_argument("--refit-steps", type=int, default=50)
    p.add_argument("--refit-lr", default=None,
                   help="one learning rate, or several comma-separated (one refit run each; the first keeps the plain "
                        "run folder name, the others add -lrLR)")
    p.add_argument("--refit-windows", type=int, default=None)
    p.add_argument("--refit-holdout", type=float, default=None)
    p.add_argument("--refit-eval-every", type=int, default=None)
    p.add_argument("--refit-patience", type=int, default=None)
    p.add_argument("--refit-backoff", type=float, default=None)
    p.add_argument("--refit-norms", action="store_true")
    p.add_argument("--render", action="store_true", help="rewrite OUT.md from OUT.json (its notes included) only")
    p.add_argument("--add-run", action="append", default=[], metavar="LABEL=RUN",
                   help="also tabulate a finished run made by its own command (RUN/compression.json, and RUN.eval.json "
                        "written by `sigmascale_jax.eval --json` with this script's evaluation flags): e.g. a shipped "
                        "config's recipe with --refit-steps; repeatable")
    args = p.parse_args()
    if args.render:
        payload = json.loads((benchlib.REPO / f"{args.out}.json").read_text())
        benchlib.write(args.out, payload, render(payload))
        return
    if args.add_run and not args.ratios:  # --ratios "": only the added runs, onto the rows OUT.json holds
        payload = json.loads((benchlib.REPO / f"{args.out}.json").read_text())
        payload["rows"] = [r for r in payload["rows"] if r.get("label") not in {a.split("=")[0] for a in args.add_run}]
        payload["rows"] += [added_row(spec) for spec in args.add_run]
        payload.setdefault("added_by", []).append(benchlib.command_line())
        benchlib.write(args.out, payload, render(payload))
        return

    ranks = [] if args.ranks == "uniform" else ["--ranks", args.ranks]
    lrs = args.refit_lr.split(",") if args.refit_lr else [None]
    out = benchlib.REPO / f"{args.out}.json"
    notes = json.loads(out.read_text()).get("notes", []) if out.is_file() else []  # written by hand: kept
    payload = {"cpu": benchlib.cpu_name(), "command": benchlib.command_line(), "note": args.note,
               "header": benchlib.header("Refit", args).rstrip(),
               "refit_flags": refit_flags(args), "notes": notes, "rows": [benchlib.dense_row(args)]}
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for method in args.methods.split(","):
            for i, lr in enumerate([False, *lrs]):
                refit = lr is not False
                label = f"{method}-{args.ranks}" + ("-refit" if refit else "") + (f"-lr{lr}" if refit and i > 1 else "")
                row = benchlib.method_row(method, ratio, args, [*ranks, *(refit_flags(args, lr) if refit else [])],
                                          label=label)
                row.update(ranks=args.ranks, refit=refit)
                if refit and not row.get("not_run"):
                    row["refit_lr"] = float(lr) if lr else None
                    row["blocks"] = block_records(row["run"])
                payload["rows"].append(row)
                benchlib.write(args.out, payload, render(payload))  # after every run: a long sweep keeps its rows


def added_row(spec: str) -> dict:
    """A row from a finished run's compression.json and its RUN.eval.json (`--add-run LABEL=RUN`)."""
    label, run = spec.split("=", 1)
    report = json.loads((benchlib.REPO / run / "compression.json").read_text())
    res = json.loads((benchlib.REPO / f"{run}.eval.json").read_text())
    refits = [r for r in report["refine"] if r["name"] == "refit"]
    heals = [r for r in report["refine"] if r["name"] == "heal"]
    heal = {k: heals[-1][k] for k in ("steps_run", "heal_lr", "held_out_loss_before", "held_out_loss_after", "trace")
            } if heals else None
    return {"method": label, "heal": heal, "label": label, "ratio": report["ratio_requested"], "ranks": report["ranks_method"],
            "refit": bool(refits), "refit_lr": refits[0]["refit_lr"] if refits else None,
            "wikitext2_ppl": res["wikitext2"]["ppl"], "c4_ppl": res["c4"]["ppl"],
            "eval_windows": {t: res[t]["windows"] for t in ("wikitext2", "c4")}, "timings_s": report["timings_s"],
            "compress_s": report["seconds"], "run": run,
            # a healed folder's blocks are its source's: their refit table is the source's row's
            "blocks": block_records(run) if refits and not heals else []}


def render(payload: dict) -> str:
    rows = payload["rows"]
    lines = [payload["header"], "",
             f"CPU: {payload['cpu']}. Refit flags (learning rate per row): `{' '.join(payload['refit_flags'])}`. "
             "Held-out block error: ‖f̂(x̂) − f(x)‖² / ‖f(x)‖² on the calibration windows the refit holds out, "
             "averaged over blocks.", "",
             "| ratio | factors | ranks | refit lr | WikiText-2 ppl | C4 ppl | held-out block error before → after | "
             "factorize s | refit s | compress s |",
             "| ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r["method"] == "dense":
            lines.append(f"| 0 | dense | | | {r['wikitext2_ppl']:.3f} | {r['c4_ppl']:.3f} | | | | |")
            continue
        if r.get("not_run"):
            lines.append(benchlib.not_run_line([r["ratio"], r["method"]], 10))
            continue
        blocks = r.get("blocks") or []
        err = (f"{sum(b['before'] for b in blocks) / len(blocks):.4f} → {sum(b['after'] for b in blocks) / len(blocks):.4f}"
               if blocks else "")
        lr = ("default" if r.get("refit_lr") is None else f"{r['refit_lr']:g}") if r["refit"] else "no refit"
        lines.append(f"| {r['ratio']} | {r['method']} | {r['ranks']} | {lr} | "
                     f"{r['wikitext2_ppl']:.3f} | {r['c4_ppl']:.3f} | {err} | {r['timings_s'].get('factorize', 0):.0f} | "
                     f"{r['timings_s'].get('refit', 0):.0f} | {r['compress_s']:.0f} |")
    if payload.get("notes"):
        lines += ["", *payload["notes"]]
    for r in rows:
        if not r.get("blocks"):
            continue
        lines += ["", f"**{r['method']} at {r['ratio']}, refit lr {r.get('refit_lr')}, per block** (`{r['run']}`)", "",
                  "| block | factorize s | refit s | held-out error before | after | steps run | best step |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {b['block']} | {b['factorize_s'] or 0:.1f} | {b['refit_s']:.1f} | {b['before']:.4f} | "
                  f"{b['after']:.4f} | {b['steps_run']} | {b['best_step']} |" for b in r["blocks"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
