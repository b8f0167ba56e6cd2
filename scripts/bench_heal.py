"""Healing benchmark: the recipes of the three levers, each before and after healing, on SmolLM2.

For each recipe and ratio: compress with the public command line (reused when finished,
see benchlib), evaluate, heal the finished folder with `heal_compressed` (the `--heal-*`
stage run after the fact, so one block loop serves both rows; resumable), evaluate again.

    python scripts/bench_heal.py --ratios 0.2,0.4 --recipes best --nsamples 64 --max-windows 16 \
        --out results/heal_smollm2

Recipes: `best` = SigmaScale (the shipped learning settings) × zs-svd ranks at ratios up to 0.3,
fermigrad above × PivGa; `cheap` = SVD-LLM × zs-svd × PivGa. `--dense-quant` adds dense int8 / int4
rows (RTN, `eval --quantize`) for the size-quality frontier; `--plot` draws it (bytes vs perplexity).
Writes OUT.md and OUT.json (and OUT.png with --plot).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import benchlib

# what a row keeps of a heal record (compression.json's refine entry)
HEAL_KEYS = ("steps", "steps_run", "best_step", "stopped_early", "tokens", "held_out_loss_before",
             "held_out_loss_after", "seconds", "trace", "text")
SIGMASCALE = ["--steps", "50", "--lr", "0.03", "--step-windows", "4", "--eval-every", "10", "--holdout", "0.125"]


def recipe_flags(recipe: str, ratio: float) -> tuple[str, list[str], str]:
    """(benchlib method, extra compressor flags, ranks name) of a recipe at a ratio."""
    if recipe == "best":
        ranks = "zs-svd" if ratio <= 0.3 else "fermigrad"
        return "sigmascale-block", [*SIGMASCALE, "--ranks", ranks, "--encoding", "pivga"], ranks
    if recipe == "cheap":
        return "svd-llm", ["--ranks", "zs-svd", "--encoding", "pivga"], "zs-svd"
    raise SystemExit(f"unknown recipe {recipe!r}; known: best, cheap")


def heal_steps_at(spec: str, ratio: float) -> int:
    """Healing steps at a ratio from `--heal-steps`: one count for all ("150") or one per ratio ("0.2=150,0.4=75")."""
    if "=" not in spec:
        return int(spec)
    steps = {float(k): int(v) for k, v in (item.split("=") for item in spec.split(","))}
    if ratio not in steps:
        raise SystemExit(f"--heal-steps {spec} names no count for ratio {ratio}; add {ratio}=N")
    return steps[ratio]


def heal_settings(args, ratio: float | None = None) -> dict:
    """The `heal_compressed` settings of a ratio (`heal_steps` as given on the command line when ratio is None)."""
    spec = args.heal_steps
    steps = heal_steps_at(spec, ratio) if ratio is not None else (spec if "=" in spec else int(spec))
    return {"heal_steps": steps, "heal_lr": args.heal_lr, "heal_samples": args.heal_samples,
            "heal_seq_len": args.heal_seq_len, "heal_batch": args.heal_batch, "heal_holdout": args.heal_holdout,
            "heal_eval_every": args.heal_eval_every, "heal_patience": args.heal_patience}


def row(recipe: str, ratio: float, args) -> list[dict]:
    runs = benchlib.REPO / args.runs_dir
    runs.mkdir(parents=True, exist_ok=True)
    method, extra, ranks = recipe_flags(recipe, ratio)
    name = f"{recipe}-{ratio}"
    out = []
    try:
        t0 = time.perf_counter()
        report = benchlib.compress(method, ratio, runs / name, args, extra)
        res = benchlib.evaluate(str(runs / name), runs / f"{name}.eval.json", args)
        base = {"recipe": recipe, "ratio": ratio, "ranks": ranks, "healed": False,
                "ratio_achieved": report["ratio_achieved"], "bytes": report["bytes"]["model_compressed"],
                "model_dense_bytes": report["bytes"]["model_dense"],
                "wikitext2_ppl": res["wikitext2"]["ppl"], "c4_ppl": res["c4"]["ppl"], "compress_s": report["seconds"],
                "run": f"{args.runs_dir}/{name}"}
        out.append(base)
        print(f"{name:<16} wiki {base['wikitext2_ppl']:9.3f}  c4 {base['c4_ppl']:9.3f}  "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        if heal_steps_at(args.heal_steps, ratio):
            t0 = time.perf_counter()
            rep = benchlib.healed(runs / name, runs / f"{name}-healed", heal_settings(args, ratio), args.model,
                                 args.reuse_only, not args.no_progress)
            res = benchlib.evaluate(str(runs / f"{name}-healed"), runs / f"{name}-healed.eval.json", args)
            h = rep["refine"][-1]
            out.append({**base, "healed": True, "wikitext2_ppl": res["wikitext2"]["ppl"], "c4_ppl": res["c4"]["ppl"],
                        "heal": {k: h[k] for k in HEAL_KEYS},
                        "run": f"{args.runs_dir}/{name}-healed"})
            print(f"{name + '-healed':<16} wiki {out[-1]['wikitext2_ppl']:9.3f}  c4 {out[-1]['c4_ppl']:9.3f}  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    except benchlib.NotRun:
        print(f"{name:<16} not run (--reuse-only)", flush=True)
        out.append({"recipe": recipe, "ratio": ratio, "not_run": True})
    return out


def finished_row(label: str, folder: str, eval_json: str) -> dict:
    """A row for a folder compressed (and maybe healed in-line, `--heal-steps`) by a command of its own, e.g. the
    README's quick start, from its report and its `eval --json` (same evaluation settings)."""
    report = json.loads((benchlib.REPO / folder / "compression.json").read_text())
    res = json.loads((benchlib.REPO / eval_json).read_text())
    heals = [r for r in report.get("refine", []) if r["name"] == "heal"]
    h = heals[-1] if heals else None
    return {"recipe": label, "ratio": report["ratio_requested"], "ranks": report.get("allocate", {}).get("name", ""),
            "healed": bool(h), "ratio_achieved": report["ratio_achieved"], "bytes": report["bytes"]["model_compressed"],
            "model_dense_bytes": report["bytes"]["model_dense"], "wikitext2_ppl": res["wikitext2"]["ppl"],
            "c4_ppl": res["c4"]["ppl"], "compress_s": report["seconds"], "run": folder,
            "windows": {t: res[t]["windows"] for t in ("wikitext2", "c4")},
            **({"heal": {k: h[k] for k in HEAL_KEYS}}
               if h else {})}


def dense_quant_rows(args) -> list[dict]:
    if args.dense_quant_from:
        return dense_quant_recorded(args)
    rows = []
    for kind in ("int8", "int4"):
        path = benchlib.REPO / args.runs_dir / f"dense-{kind}.eval.json"
        cmd = [sys.executable, "-m", "sigmascale_jax.eval", "--model", args.model, "--tasks", "wikitext2,c4",
               "--seq-len", str(args.eval_seq_len), "--quantize", kind, "--json", str(path), "--no-progress"]
        if args.max_windows:
            cmd += ["--max-windows", str(args.max_windows)]
        try:
            benchlib.cached(cmd, path, path.with_suffix(".cmd.json"), args.reuse_only)
        except benchlib.NotRun:
            continue
        res = json.loads(path.read_text())
        q = res["quantized"]
        rows.append({"recipe": f"dense {kind}", "ratio": None, "healed": False,
                     "bytes": None, "projection_bytes": q["projection_bytes"],
                     "projection_bytes_dense": q["projection_bytes_dense"],
                     "wikitext2_ppl": res["wikitext2"]["ppl"], "c4_ppl": res["c4"]["ppl"]})
    return rows


def dense_quant_recorded(args) -> list[dict]:
    """The dense int8 / int4 rows of an earlier storage benchmark's JSON (`scripts/bench_storage.py`), when its
    evaluation settings are this run's: the same measurement, not repeated."""
    rec = json.loads((benchlib.REPO / args.dense_quant_from).read_text())
    want = {"model": args.model, "eval_seq_len": args.eval_seq_len, "max_windows": args.max_windows}
    got = {k: rec["args"].get(k) for k in want}
    if Path(str(got["model"])).name != Path(str(want["model"])).name or \
            (got["eval_seq_len"], got["max_windows"]) != (want["eval_seq_len"], want["max_windows"]):
        raise SystemExit(f"{args.dense_quant_from} evaluated {got}, this run evaluates {want}")
    return [{"recipe": r["family"], "ratio": None, "healed": False, "bytes": r["model_bytes"],
             "wikitext2_ppl": r["wikitext2_ppl"], "c4_ppl": r["c4_ppl"], "from": args.dense_quant_from}
            for r in rec["frontier"] if r["family"] in ("dense int8", "dense int4")]


def table(rows: list[dict], dense: dict) -> str:
    lines = ["| ratio | recipe | ranks | healed | WikiText-2 ppl | C4 ppl | model MiB | held-out KL before → after | "
             "heal steps (best) | heal tokens | heal s | compress s |",
             "| ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
             f"| 0 | dense | | | {dense['wikitext2_ppl']:.3f} | {dense['c4_ppl']:.3f} | | | | | | |"]
    for r in rows:
        if r.get("not_run"):
            lines.append(benchlib.not_run_line([r["ratio"], r["recipe"]], 12))
            continue
        h = r.get("heal")
        heal_cells = (f"{h['held_out_loss_before']:.4f} → {h['held_out_loss_after']:.4f} | {h['steps_run']} "
                      f"({h['best_step']}) | {h['tokens']:,} | {h['seconds']:.0f}") if h else " | | | "
        mib = f"{r['bytes'] / 2**20:.1f}" if r.get("bytes") else ""
        lines.append(f"| {r['ratio'] if r['ratio'] is not None else ''} | {r['recipe']} | {r.get('ranks', '')} | "
                     f"{'yes' if r['healed'] else 'no'} | {r['wikitext2_ppl']:.3f} | {r['c4_ppl']:.3f} | {mib} | "
                     f"{heal_cells} | {r.get('compress_s', 0):.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    benchlib.add_common_args(p, "results/heal_smollm2")
    p.set_defaults(runs_dir="runs/bench_heal", nsamples=64, ratios="0.2,0.4")
    p.add_argument("--recipes", default="best")
    p.add_argument("--heal-steps", default="150",
                   help="healing steps: one count (0 = no healed rows) or one per ratio, e.g. 0.2=150,0.4=75")
    p.add_argument("--heal-lr", type=float, default=1e-5)
    p.add_argument("--heal-samples", type=int, default=256)
    p.add_argument("--heal-seq-len", type=int, default=512)
    p.add_argument("--heal-batch", type=int, default=4)
    p.add_argument("--heal-holdout", type=int, default=8)
    p.add_argument("--heal-eval-every", type=int, default=25)
    p.add_argument("--heal-patience", type=int, default=2)
    p.add_argument("--dense-quant", action="store_true", help="also dense int8 / int4 (RTN) rows")
    p.add_argument("--also", default="", help="comma-separated LABEL=FOLDER=EVAL_JSON: rows for folders compressed "
                   "by their own command (e.g. the README's quick start) and evaluated with eval --json")
    p.add_argument("--dense-quant-from", default=None,
                   help="take the dense int8 / int4 rows from this storage benchmark JSON (same evaluation)")
    p.add_argument("--plot", action="store_true", help="draw OUT.png: model bytes vs perplexity")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    dense = benchlib.dense_row(args)
    rows = [r for recipe in args.recipes.split(",") for ratio in map(float, args.ratios.split(","))
            for r in row(recipe, ratio, args)]
    rows += [finished_row(*item.split("=")) for item in args.also.split(",") if item]
    quant = dense_quant_rows(args) if args.dense_quant else []
    md = benchlib.header("Healing", args) + (
        f"Healing: `heal_compressed` (the `--heal-*` stage) with {json.dumps(heal_settings(args))}: AdamW on the "
        "factors only, KL from the dense model's next-token distributions, windows of C4 docs 0-999 clear of the "
        "calibration windows, early stopping on held-out calibration windows. CPU: " + benchlib.cpu_name()
        + ".\n\n" + table(rows + quant, dense))
    benchlib.write(args.out, {"dense": dense, "rows": rows, "dense_quant": quant, "heal": heal_settings(args),
                              "command": benchlib.command_line(), "cpu": benchlib.cpu_name()}, md)
    if args.plot:
        plot(rows, quant, dense, benchlib.REPO / f"{args.out}.png")
    print(md)


def plot(rows: list[dict], quant: list[dict], dense: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for healed_, style in ((False, "o--"), (True, "s-")):
        pts = sorted((r["bytes"] / 2**20, r["wikitext2_ppl"]) for r in rows
                     if not r.get("not_run") and r["healed"] == healed_)
        if pts:
            ax.plot(*zip(*pts), style, label="low-rank" + (" + healing" if healed_ else ""))
    ax.axhline(dense["wikitext2_ppl"], color="gray", lw=0.8, label="dense float32")
    whole = next((r["model_dense_bytes"] for r in rows if not r.get("not_run")), None)
    for q in quant:  # the whole model: dense float32 less its projections, plus their quantized bytes
        total = q["bytes"] or (whole and whole - q["projection_bytes_dense"] + q["projection_bytes"])
        if total:
            ax.plot([total / 2**20], [q["wikitext2_ppl"]], "^", label=q["recipe"])
    ax.set_xlabel("model bytes (MiB)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
