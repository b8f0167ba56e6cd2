"""Storage benchmark: plain vs PivGa factors at equal size, and a size–quality frontier in bytes.

1. At each of `--equal-ratios` (0.2, 0.4): svd-llm and sigmascale (uniform ranks) stored plain
   vs PivGa at the same stored numbers (PivGa keeps more components in them).
2. The frontier: dense float32; dense int8 and int4 (round-to-nearest, the same quantizer
   as for factors: quantization alone); low-rank (svd-llm, uniform ranks) plain and PivGa,
   each also +int8 and +int4 (`--quantized-encodings`), at each of `--ratios`. Quantized
   variants are re-encodings of the float32 runs (`compress/reencode.py`): same ranks and factors, other storage.
   Perplexity against whole-model bytes (embeddings and norms stay float32 in every
   family) as a table and a PNG, one line per family.

4. `--equal-bytes`: every tensor stored as users store it (token embeddings int8 per row, the
   float tensors that stay bfloat16: `--quantize-embeddings int8 --store-dtype bfloat16`), at
   equal whole-model bytes: GPTQ alone at `--eq-kinds` against the residual encoding
   (`--encoding residual`, W ≈ Q + L·R with Q by GPTQ) at `--eq-residual` points (kind:rank),
   and section 3's best low-rank point with its bytes recomputed under the same rules.

3. `--gptq`: error-compensating quantization at equal whole-model bytes. Dense RTN
   (`eval --quantize`) and dense GPTQ (`compress --ratio 0 --quantizer gptq`) at each of
   `--gptq-kinds`, against low-rank + GPTQ factors (`--gptq-recipe`, svd-llm × ZS-SVD ranks ×
   PivGa by default) at `--gptq-points` (ratio:kind), and the same low-rank runs stored with RTN
   (re-encodings of `--gptq-float-runs`' float folders). `--previous` keeps sections 1-2 from an
   earlier results JSON instead of rerunning them.

Runs the public command lines (one process per compression and evaluation; finished runs
are reused, see benchlib). Writes OUT.md, OUT.json and OUT.png.

    python scripts/bench_storage.py --nsamples 64 --max-windows 16 --out results/storage_smollm2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import benchlib

from sigmascale_jax.compress.encode.residual import RESIDUAL_INITS  # noqa: E402  (benchlib puts the repo on the path)


def dense_quant_row(kind: str, args) -> dict:
    runs = benchlib.REPO / args.runs_dir
    runs.mkdir(parents=True, exist_ok=True)
    out_json = runs / f"dense-{kind}.eval.json"
    cmd = [sys.executable, "-m", "sigmascale_jax.eval", "--model", args.model, "--tasks", "wikitext2,c4",
           "--seq-len", str(args.eval_seq_len), "--batch-size", str(args.eval_batch_size), "--quantize", kind,
           "--json", str(out_json), "--no-progress"]
    if args.max_windows:
        cmd += ["--max-windows", str(args.max_windows)]
    benchlib.cached(cmd, out_json, out_json.with_suffix(".cmd.json"), args.reuse_only)
    res = json.loads(out_json.read_text())
    q = res["quantized"]
    return {"family": f"dense {kind}", "ratio": 0.0, "wikitext2_ppl": res["wikitext2"]["ppl"], "c4_ppl": res["c4"]["ppl"],
            "model_bytes": args.dense_bytes - q["projection_bytes_dense"] + q["projection_bytes"]}


def reencoded_row(src: Path, family: str, quant: str, ratio: float, args) -> dict:
    from sigmascale_jax.compress.reencode import reencode

    dst = src.with_name(f"{src.name}-{quant}")
    record = dst.with_name(dst.name + ".cmd.json")
    key = [str(src), quant, json.loads((src / "compression.json").read_text())["calibration"]["sha1"]]
    if not ((dst / "compression.json").is_file() and record.is_file() and json.loads(record.read_text()) == key):
        if args.reuse_only:
            raise benchlib.NotRun(dst)
        reencode(src, dst, quantize=quant, overwrite=True)
        benchlib.write_json_atomic(record, key)
    report = json.loads((dst / "compression.json").read_text())
    res = benchlib.evaluate(str(dst), dst.with_name(dst.name + ".eval.json"), args)
    return {"family": family, "ratio": ratio, "wikitext2_ppl": res["wikitext2"]["ppl"], "c4_ppl": res["c4"]["ppl"],
            "model_bytes": report["bytes"]["model_compressed"], "ratio_achieved": report["ratio_achieved"],
            "byte_ratio": report["whole_model_byte_ratio"], "run": str(dst)}


def gptq_rows(args, rows: list[dict], write) -> list[dict]:
    """Section 3: dense RTN / GPTQ and low-rank + GPTQ (and + RTN) at the chosen points, appended to `rows` (and
    written after each)."""
    recipe = args.gptq_recipe.split()
    group = ["--group-size", str(args.gptq_group)] if args.gptq_group else []
    for kind in args.gptq_kinds.split(","):
        for quantizer in ("rtn", "gptq"):
            family = f"dense {quantizer}"
            try:
                if quantizer == "rtn":
                    row = dense_quant_row(kind, args)
                else:
                    row = run_row("none", f"dense-gptq-{kind}", family, 0.0, args,
                                  ["--quantize", kind, "--quantizer", "gptq", *group])
            except benchlib.NotRun:
                row = {"not_run": True}
            row = {**row, "family": family, "kind": kind, "ratio": 0.0}
            if quantizer == "gptq" and not row.get("not_run"):
                row["orders"] = order_summary(benchlib.REPO / row["run"])
            rows.append(row)
            write()
    for point in args.gptq_points.split(","):
        ratio, kind = point.split(":")
        ratio = float(ratio)
        label = f"{args.gptq_label}-gptq-{kind}"
        row = run_row(recipe[0], label, f"low-rank {args.gptq_label}+gptq", ratio, args,
                      [*recipe[1:], "--quantize", kind, "--quantizer", "gptq", *group])
        if not row.get("not_run"):
            row["orders"] = order_summary(benchlib.REPO / row["run"])
        rows.append({**row, "kind": kind})
        write()
        src = benchlib.REPO / args.gptq_float_runs / f"{args.gptq_label}-{ratio}"
        if (src / "compression.json").is_file():
            try:
                row = reencoded_row(src, f"low-rank {args.gptq_label}+rtn", kind, ratio, args)
            except benchlib.NotRun:
                row = {"family": f"low-rank {args.gptq_label}+rtn", "ratio": ratio, "not_run": True}
            rows.append({**row, "kind": kind})
            write()
    return rows


def gptq_markdown(rows: list[dict], args) -> list[str]:
    out = ["", "## 3. Error-compensating quantization (GPTQ) at equal whole-model bytes\n",
           f"Dense: every projection quantized alone (RTN: `eval --quantize`; GPTQ: `compress --ratio 0 --quantizer "
           f"gptq`, act order, 1% damping). Low-rank: `{args.gptq_recipe}` at the ratio, its factors stored by GPTQ "
           "(`--quantizer gptq`: the factor pair rounded one after the other, the second refit to the first, the "
           "better of both orders per matrix) or by RTN (the same float factors re-encoded). Group size "
           f"{args.gptq_group or 128}; embeddings and norms float32 everywhere (last column: the bytes under "
           "section 4's rules, perplexity as measured).\n",
           "| family | kind | ratio | model MB | WikiText-2 ppl | C4 ppl | compress s | MB, int8 embeddings + bfloat16 |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in sorted(rows, key=lambda r: -r.get("model_bytes", 0)):
        if r.get("not_run"):
            out.append(f"| {r['family']} | {r.get('kind', '')} | {r['ratio']} | not run | | | | |")
            continue
        secs = f"{r['compress_s']:.0f}" if r.get("compress_s") else ""
        out.append(f"| {r['family']} | {r['kind']} | {r['ratio']} | {r['model_bytes'] / 2**20:.1f} "
                   f"| {r['wikitext2_ppl']:.3f} | {r['c4_ppl']:.3f} | {secs} | {rules_bytes(r, args.cfg) / 2**20:.1f} |")
    orders = [r for r in rows if r.get("orders")]
    if orders:
        out += ["", "Which factor to round first (`--gptq-order best` tries both per matrix and keeps the lower output "
                "error `tr(ΔW H ΔWᵀ)/tr(W H Wᵀ)` on the calibration Gram; medians over the run's factored matrices):\n",
                "| run | kind | ratio | inner-first won | outer-first won | median error inner-first | outer-first "
                "| chosen | dense GPTQ, same kind |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        dense = {r["kind"]: r.get("orders") for r in rows if r["family"] == "dense gptq" and not r.get("not_run")}
        for r in orders:
            o = r["orders"]
            if "won" not in o:
                continue
            ref = dense.get(r["kind"]) or {}
            out.append(f"| {r['family']} | {r['kind']} | {r['ratio']} | {o['won'].get('inner-first', 0)} "
                       f"| {o['won'].get('outer-first', 0)} | {o['median']['inner-first']:.4f} "
                       f"| {o['median']['outer-first']:.4f} | {o['median']['chosen']:.4f} "
                       f"| {ref.get('median', {}).get('chosen', float('nan')):.4f} |")
    return out


STORE_RULES = ["--quantize-embeddings", "int8", "--store-dtype", "bfloat16"]


def residual_point(spec: str, default_init: str) -> tuple[str, int, str, str]:
    """`kind:rank[:init][:int8]` (e.g. `int2:40:best:int8`) as `(kind, rank, init, L and R storage)`."""
    kind, rank, *rest = spec.split(":")
    init = next((t for t in rest if t in RESIDUAL_INITS), default_init)
    factors = "int8" if "int8" in rest else "float"
    unknown = [t for t in rest if t not in (init, factors)]
    if unknown:
        raise SystemExit(f"error: --eq-residual {spec}: unknown {unknown}; give kind:rank[:best|quant-first|"
                         "lowrank-first][:int8]")
    return kind, int(rank), init, factors


def residual_label(kind: str, rank: int, iters: int, init: str, factors: str) -> str:
    """A residual run's folder name; quant-first float runs keep the name they had before the other starts existed."""
    return (f"eq-residual-{kind}-r{rank}-i{iters}" + ("" if init == "quant-first" else f"-{init}")
            + ("-int8" if factors == "int8" else ""))


def equal_bytes_rows(args, rows: list[dict], write) -> None:
    """Section 4: GPTQ alone and residual points, every run with `STORE_RULES`."""
    group = ["--group-size", str(args.gptq_group)] if args.gptq_group else []
    points = [(kind, None, None, None) for kind in args.eq_kinds.split(",")]
    points += [residual_point(pt, args.eq_init) for pt in args.eq_residual.split(",") if pt]
    for kind, rank, init, factors in points:
        label = f"eq-gptq-{kind}" if rank is None else residual_label(kind, rank, args.eq_iters, init, factors)
        extra = ["--quantize", kind, "--quantizer", "gptq", *group, *STORE_RULES]
        if rank is not None:
            extra += ["--encoding", "residual", "--residual-rank", str(rank), "--residual-iters", str(args.eq_iters),
                      "--residual-init", init, "--residual-quantize", factors]
        family = "gptq alone" if rank is None else "residual Q + L·R"
        row = run_row("none", label, family, 0.0, args, extra)
        row.update(kind=kind, rank=rank, init=init, factors=factors)
        if not row.get("not_run"):
            report = json.loads((Path(row["run"]) / "compression.json").read_text())
            row["bits_per_weight"] = 8 * report["bytes"]["compressible_compressed"] / report["params"]["compressible_dense"]
            errors = [m["output_error"] for m in report["matrices"] if "output_error" in m]
            row["mean_output_error"] = float(sum(errors) / len(errors)) if errors else None
            if rank is not None:
                mats = report["matrices"]
                row["residual"] = {key: float(sum(m[key] for m in mats) / len(mats))
                                   for key in ("quant_error", "output_error", "residual_iters_kept")}
        rows.append(row)
        write()


def rules_bytes(row: dict, cfg) -> int:
    """A row's whole-model bytes had it been stored by section 4's rules: embeddings int8 per row (a float32 scale
    a row), norms bfloat16, float32 projections bfloat16 (quantized ones as they were). The perplexity is not
    re-measured: only the bytes are recomputed."""
    v, d = cfg.vocab_size, cfg.hidden_size
    tables = 1 if cfg.tie_word_embeddings else 2
    norms = (2 * cfg.num_layers + 1) * d
    other = 4 * (tables * v * d + norms)
    projections = row["model_bytes"] - other
    quantized = "int" in row["family"] or "gptq" in row["family"] or "rtn" in row["family"]
    return (projections if quantized else projections // 2) + tables * (v * d + 4 * v) + 2 * norms


def rank_cell(r: dict) -> str:
    """A residual row's rank with where its fit started and how L and R are stored ("" for other rows)."""
    if not r.get("rank"):
        return ""
    return f"{r['rank']} ({r.get('init') or 'quant-first'}" + (", int8 L·R)" if r.get("factors") == "int8" else ")")


def equal_bytes_markdown(rows: list[dict], gptq: list[dict], cfg, args) -> list[str]:
    out = ["", "## 4. Every tensor stored as users store it, at equal whole-model bytes\n",
           "Every row: token embeddings (tied with the LM head) int8 per row, the float tensors that stay (norms; "
           "the residual's L and R) bfloat16 (`--quantize-embeddings int8 --store-dtype bfloat16`). GPTQ alone: "
           "`--ratio 0 --quantize KIND --quantizer gptq`. Residual: `--encoding residual --residual-rank R "
           f"--residual-iters {args.eq_iters} --residual-init INIT` (Q by GPTQ against the calibration Gram, L·R the "
           "whitened rank-R fit of W − Q, alternated; INIT in the rank column: quant-first is CALDERA's start, best "
           "also tries SVDQuant's low-rank-first start and keeps the lower error per matrix), L and R bfloat16, or "
           "int8 with `--residual-quantize int8` where the rank column says so. Group size "
           f"{args.gptq_group or 128}. Bits per weight: the projections' bytes × 8 / their weights. Output error: "
           "tr(ΔW H ΔWᵀ)/tr(W H Wᵀ) on the calibration Gram, mean over matrices (Q alone → Q + L·R).\n",
           "| family | kind | residual rank | bits / weight | model MB | WikiText-2 ppl | C4 ppl | output error | "
           "compress s |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    listed = list(rows)
    best = [r for r in gptq if r.get("family", "").startswith("low-rank") and "gptq" in r["family"]
            and not r.get("not_run")]
    for r in best:
        listed.append({**r, "family": f"{r['family']} (sec. 3, bytes recomputed)", "model_bytes": rules_bytes(r, cfg),
                       "rank": None, "compress_s": r.get("compress_s")})
    for r in sorted(listed, key=lambda r: -r.get("model_bytes", 0)):
        if r.get("not_run"):
            out.append(f"| {r['family']} | {r.get('kind', '')} | {rank_cell(r)} | not run | | | | | |")
            continue
        res = r.get("residual")
        err = f"{res['quant_error']:.4f} → {res['output_error']:.4f}" if res else ""
        bpw = f"{r['bits_per_weight']:.2f}" if r.get("bits_per_weight") else ""
        secs = f"{r['compress_s']:.0f}" if r.get("compress_s") else ""
        out.append(f"| {r['family']} | {r['kind']} | {rank_cell(r)} | {bpw} | {r['model_bytes'] / 2**20:.1f} "
                   f"| {r['wikitext2_ppl']:.3f} | {r['c4_ppl']:.3f} | {err} | {secs} |")
    if best:
        out += ["", "The section-3 low-rank rows were measured with float32 embeddings; only their bytes are "
                "recomputed here."]
    done = [r for r in rows if not r.get("not_run")]
    alone = {r["kind"]: r for r in done if r.get("rank") is None}
    sec3 = {r["kind"]: r for r in gptq if r.get("family") == "dense gptq" and not r.get("not_run")}
    for kind, r in alone.items():
        if kind in sec3:
            out += ["", f"Storing embeddings int8 and the rest bfloat16 cost GPTQ {kind} {r['wikitext2_ppl'] - sec3[kind]['wikitext2_ppl']:+.3f} / "
                    f"{r['c4_ppl'] - sec3[kind]['c4_ppl']:+.3f} perplexity (section 3: {sec3[kind]['wikitext2_ppl']:.3f} / "
                    f"{sec3[kind]['c4_ppl']:.3f} at {sec3[kind]['model_bytes'] / 2**20:.1f} MB) and took "
                    f"{(sec3[kind]['model_bytes'] - r['model_bytes']) / 2**20:.1f} MB off the model."]
    for r in (r for r in done if r.get("rank") is not None):
        near = min(alone.values(), key=lambda a: abs(a["model_bytes"] - r["model_bytes"]), default=None)
        if near is None:
            continue
        verdict = "beats" if r["wikitext2_ppl"] < near["wikitext2_ppl"] and r["c4_ppl"] < near["c4_ppl"] else "loses to"
        res = r["residual"]
        out += ["", f"Residual {r['kind']} + rank {rank_cell(r)} ({r['model_bytes'] / 2**20:.1f} MB, "
                f"{r['bits_per_weight']:.2f} bits a weight) {verdict} GPTQ {near['kind']} alone at "
                f"{near['model_bytes'] / 2**20:.1f} MB: {r['wikitext2_ppl']:.1f} / {r['c4_ppl']:.1f} against "
                f"{near['wikitext2_ppl']:.1f} / {near['c4_ppl']:.1f}. Its L·R removed "
                f"{1 - res['output_error'] / res['quant_error']:.0%} of Q's mean output error "
                f"({res['quant_error']:.4f} → {res['output_error']:.4f})"
                + (f", while GPTQ {near['kind']} alone has {near['mean_output_error']:.4f}" if near.get("mean_output_error")
                   else "") + "."]
    return out


def order_summary(run: Path) -> dict:
    """From a GPTQ run's compression.json: how often each order won, and the median output errors."""
    import numpy as np

    mats = json.loads((run / "compression.json").read_text())["matrices"]
    chosen = [m["output_error"] for m in mats if "output_error" in m]
    out = {"median": {"chosen": float(np.median(chosen)) if chosen else float("nan")}}
    tried = [m for m in mats if "output_error_orders" in m]
    if tried:
        out["won"] = {o: sum(m["gptq_order_used"] == o for m in tried) for o in ("inner-first", "outer-first")}
        for o in ("inner-first", "outer-first"):
            out["median"][o] = float(np.median([m["output_error_orders"][o] for m in tried]))
    return out


def run_row(method: str, label: str, family: str, ratio: float, args, extra: list[str]) -> dict:
    row = benchlib.method_row(method, ratio, args, extra, label=label)
    if row.get("not_run"):
        return {"family": family, "ratio": ratio, "not_run": True}
    report = json.loads((Path(row["run"]) / "compression.json").read_text())
    if "bytes" not in report:  # a run made before compression.json counted bytes: plain float32, 4 bytes a number
        report = {**report, "encoding": "plain", "whole_model_byte_ratio": report["whole_model_ratio"],
                  "bytes": {"model_compressed": 4 * report["params"]["model_compressed"]}}
    return {**row, "family": family, "model_bytes": report["bytes"]["model_compressed"],
            "byte_ratio": report["whole_model_byte_ratio"], "encoding": report["encoding"],
            "mean_rank": {n: v["mean"] for n, v in report["ranks"].items()}}


def run_name(method: str, enc: str) -> tuple[str, str]:
    """(run label, table family): plain runs carry bench_ranks.py's labels and commands, so they are shared."""
    return (f"{method}-uniform" if enc == "plain" else f"{method}-{enc}"), f"{method} {enc}"


def encoding_flags(enc: str) -> list[str]:
    return [] if enc == "plain" else ["--encoding", enc]


def markdown(equal: list[dict], frontier: list[dict], args, gptq: list[dict] | None = None) -> str:
    out = [benchlib.header("Storage", args),
           "## 1. Plain vs PivGa factors at equal stored numbers\n",
           "| ratio | method | encoding | mean rank q / gate | WikiText-2 ppl | C4 ppl | stored ratio | MB |",
           "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in equal:
        if r.get("not_run"):
            out.append(f"| {r['ratio']} | {r['family']} | not run | | | | | |")
            continue
        out.append(f"| {r['ratio']} | {r['method']} | {r['encoding']} | {r['mean_rank']['q']:.0f} / "
                   f"{r['mean_rank']['gate']:.0f} | {r['wikitext2_ppl']:.3f} | {r['c4_ppl']:.3f} "
                   f"| {r['ratio_achieved']:.4f} | {r['model_bytes'] / 2**20:.1f} |")
    out += ["", "## 2. Size–quality frontier (whole-model bytes; embeddings stay float32 everywhere)\n",
            "The last column recomputes each row's bytes under section 4's rules (embeddings int8 per row, float "
            "tensors bfloat16; PivGa's int16 permutations are halved with them, under 0.3 MB), its perplexity as "
            "measured.\n",
            "| family | ratio | model MB | byte ratio | WikiText-2 ppl | C4 ppl | MB, int8 embeddings + bfloat16 |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in sorted(frontier, key=lambda r: (r["family"], -r.get("model_bytes", 0))):
        if r.get("not_run"):
            out.append(f"| {r['family']} | {r['ratio']} | not run | | | | |")
            continue
        byte_ratio = 1 - r["model_bytes"] / args.dense_bytes
        out.append(f"| {r['family']} | {r['ratio']} | {r['model_bytes'] / 2**20:.1f} | {byte_ratio:.3f} "
                   f"| {r['wikitext2_ppl']:.3f} | {r['c4_ppl']:.3f} | {rules_bytes(r, args.cfg) / 2**20:.1f} |")
    if gptq:
        out += gptq_markdown(gptq, args)
    return "\n".join(out) + "\n"


def plot(frontier: list[dict], path: Path, gptq: list[dict] = (), eq: list[dict] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, task in zip(axes, ("wikitext2", "c4")):
        families = sorted({r["family"] for r in frontier if not r.get("not_run")})
        for fam in families:
            pts = sorted((r["model_bytes"] / 2**20, r[f"{task}_ppl"]) for r in frontier
                         if r["family"] == fam and not r.get("not_run"))
            style = "s" if fam.startswith("dense") else "-o"
            ax.plot(*zip(*pts), style, label=fam, ms=5)
        for fam in sorted({r["family"] for r in gptq if not r.get("not_run")}):  # section 3, hollow markers
            pts = sorted((r["model_bytes"] / 2**20, r[f"{task}_ppl"]) for r in gptq
                         if r["family"] == fam and not r.get("not_run"))
            ax.plot(*zip(*pts), "--D" if fam.startswith("dense") else "--^", label=f"{fam} (sec. 3)", ms=6,
                    mfc="none")
        for fam in sorted({r["family"] for r in eq if not r.get("not_run")}):  # section 4, int8 embeddings
            pts = sorted((r["model_bytes"] / 2**20, r[f"{task}_ppl"]) for r in eq
                         if r["family"] == fam and not r.get("not_run"))
            ax.plot(*zip(*pts), ":P" if fam.startswith("gptq") else ":X", label=f"{fam} (sec. 4)", ms=7)
        ax.set_xlabel("model size (MB)")
        ax.set_ylabel(f"{task} perplexity")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Perplexity vs stored bytes: low-rank, PivGa, quantized factors, quantization alone", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    benchlib.add_common_args(p, "results/storage_smollm2")
    # the plain float32 runs are those of bench_ranks.py (same runs folder and commands): they are reused
    p.set_defaults(ratios="0.1,0.2,0.4,0.6", nsamples=64, runs_dir="runs/bench_ranks")
    p.add_argument("--equal-ratios", default="0.2,0.4")
    p.add_argument("--equal-methods", default="svd-llm,sigmascale",
                   help="methods compared plain vs pivga at --equal-ratios (an empty --ratios skips the frontier)")
    # plain factors quantize far better than PivGa's at int4 (R's rounding error is multiplied by B' = B C_P)
    p.add_argument("--quantized-encodings", default="plain,pivga",
                   help="frontier encodings also re-encoded as int8 and int4")
    p.add_argument("--config", default="configs/smollm2-sigmascale.yaml",
                   help="SigmaScale's learning settings are read from this config")
    p.add_argument("--gptq", action="store_true", help="also section 3 (GPTQ at equal bytes)")
    p.add_argument("--gptq-kinds", default="int8,int4,int3", help="section 3: dense quantization kinds")
    p.add_argument("--gptq-points", default="0.1:int4,0.1:int8,0.2:int4",
                   help="section 3: low-rank points as ratio:kind, comma-separated")
    p.add_argument("--gptq-recipe", default="svd-llm --ranks zs-svd --encoding pivga",
                   help="section 3: the low-rank recipe, a benchlib method then compressor flags")
    p.add_argument("--gptq-label", default="cheap", help="section 3: the recipe's run label")
    p.add_argument("--gptq-float-runs", default="runs/bench_heal",
                   help="section 3: where the recipe's float runs (LABEL-RATIO) are, re-encoded for the RTN rows")
    p.add_argument("--gptq-group", type=int, default=None, help="section 3: --group-size (default 128)")
    p.add_argument("--previous", default=None,
                   help="a results JSON of this script: keep its sections 1-2 instead of running them")
    p.add_argument("--keep-gptq", action="store_true", help="with --previous: keep its section 3 too")
    p.add_argument("--equal-bytes", action="store_true", help="also section 4 (every tensor stored as users do)")
    p.add_argument("--eq-kinds", default="int4,int3,int2", help="section 4: GPTQ-alone kinds")
    p.add_argument("--eq-residual", default="int3:21,int2:21,int2:40:int8",
                   help="section 4: residual points as kind:rank[:init][:int8], comma-separated: init one of best, "
                        "quant-first, lowrank-first (default --eq-init), int8 for --residual-quantize int8 (rank 21 "
                        "in bfloat16, or about 40 in int8, costs about one bit per weight of SmolLM2's projections)")
    p.add_argument("--eq-iters", type=int, default=1, help="section 4: --residual-iters")
    p.add_argument("--eq-init", default="best", choices=RESIDUAL_INITS,
                   help="section 4: --residual-init of points that do not name one")
    args = p.parse_args()
    import yaml

    conf = yaml.safe_load((benchlib.REPO / args.config).read_text())
    sigma = [tok for k in ("steps", "lr", "step-windows", "eval-every", "holdout") if k in conf
             for tok in (f"--{k}", str(conf[k]))]
    import math

    from sigmascale_jax.io.hf_map import block_tensors, outer_tensors
    from sigmascale_jax.io.sources import open_model

    dense = benchlib.dense_row(args)
    cfg = args.cfg = open_model(args.model).cfg
    tensors = list(outer_tensors(cfg).values()) + [t for i in range(cfg.num_layers) for t in block_tensors(cfg, i).values()]
    args.dense_bytes = 4 * sum(math.prod(shape) for _, shape in tensors)  # the float32 model

    gptq: list[dict] = []
    eq: list[dict] = []

    def write(equal, frontier):
        md = markdown(equal, frontier, args, gptq)
        if eq:
            md += "\n".join(equal_bytes_markdown(eq, gptq, cfg, args)) + "\n"
        benchlib.write(args.out, {"args": {k: v for k, v in vars(args).items() if k != "cfg"}, "equal_size": equal,
                                  "frontier": frontier, "gptq": gptq, "equal_bytes": eq}, md)

    if args.previous:
        prev = json.loads((benchlib.REPO / args.previous).read_text())
        equal, frontier = prev["equal_size"], prev["frontier"]
        args.previous_args = prev["args"]
        if args.keep_gptq:
            gptq.extend(prev.get("gptq", []))
        else:
            gptq_rows(args, gptq, lambda: write(equal, frontier))
        if args.equal_bytes:
            equal_bytes_rows(args, eq, lambda: write(equal, frontier))
        write(equal, frontier)
        plot(frontier, benchlib.REPO / f"{args.out}.png", gptq, eq)
        print((benchlib.REPO / f"{args.out}.md").read_text())
        return 0

    equal, frontier = [], [{"family": "dense float32", "ratio": 0.0, "model_bytes": args.dense_bytes,
                            "wikitext2_ppl": dense["wikitext2_ppl"], "c4_ppl": dense["c4_ppl"]}]
    for kind in ("int8", "int4"):
        try:
            frontier.append(dense_quant_row(kind, args))
        except benchlib.NotRun:
            frontier.append({"family": f"dense {kind}", "ratio": 0.0, "not_run": True})
        write(equal, frontier)
    for ratio in [float(r) for r in args.equal_ratios.split(",") if r]:
        for method, base, extra in (("svd-llm", "svd-llm", []), ("sigmascale", "sigmascale-block", sigma)):
            if method not in args.equal_methods.split(","):
                continue
            for enc in ("plain", "pivga"):
                row = run_row(base, *run_name(method, enc), ratio, args, extra + encoding_flags(enc))
                row["method"] = method
                equal.append(row)
                write(equal, frontier)
    for ratio in [float(r) for r in args.ratios.split(",") if r]:
        for enc in ("plain", "pivga"):
            row = run_row("svd-llm", run_name("svd-llm", enc)[0], f"low-rank {enc}", ratio, args, encoding_flags(enc))
            frontier.append(row)
            write(equal, frontier)
            if enc in args.quantized_encodings.split(",") and not row.get("not_run"):
                for quant in ("int8", "int4"):
                    family = f"low-rank {enc}+{quant}"
                    try:
                        frontier.append(reencoded_row(Path(row["run"]), family, quant, ratio, args))
                    except benchlib.NotRun:
                        frontier.append({"family": family, "ratio": ratio, "not_run": True})
                    write(equal, frontier)
    if args.gptq:
        gptq_rows(args, gptq, lambda: write(equal, frontier))
    if args.equal_bytes:
        equal_bytes_rows(args, eq, lambda: write(equal, frontier))
    write(equal, frontier)
    plot(frontier, benchlib.REPO / f"{args.out}.png", gptq, eq)
    print((benchlib.REPO / f"{args.out}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
