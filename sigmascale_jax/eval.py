"""Evaluate a model: perplexity on WikiText-2 and C4.

    python -m sigmascale_jax.eval --model ../shared/models/smollm2-135m-instruct-q4_1 \\
        --tasks wikitext2,c4 --seq-len 2048 --json results/dense.json
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from sigmascale_jax.data import PERPLEXITY_TASKS, find_data_dir, perplexity_text
from sigmascale_jax.errors import ArgumentParser, UserError, run_cli
from sigmascale_jax.fileio import write_json_atomic

DTYPES = {"float32": "float32", "bfloat16": "bfloat16"}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m sigmascale_jax.eval",
        description="Perplexity of a dense or compressed model (non-overlapping windows, exp of mean token NLL).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="HF folder, .gguf file, hub id, or a folder written by the compressor")
    p.add_argument("--tasks", default="wikitext2,c4", help=f"comma-separated; known: {','.join(PERPLEXITY_TASKS)}")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per window")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows of each task")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    p.add_argument("--data-dir", default=None, help="data folder (default: $SIGMASCALE_DATA, else ../shared/data)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="compute dtype of the weights")
    p.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON here")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def parse_tasks(spec: str) -> list[str]:
    tasks = [t.strip() for t in spec.split(",") if t.strip()]
    if not tasks:
        raise UserError("--tasks is empty; give e.g. --tasks wikitext2,c4")
    unknown = [t for t in tasks if t not in PERPLEXITY_TASKS]
    if unknown:
        raise UserError(f"unknown task {unknown[0]!r}; known: {', '.join(PERPLEXITY_TASKS)}")
    return tasks


def check_args(args: argparse.Namespace) -> None:
    if args.seq_len < 2:
        raise UserError(f"--seq-len must be at least 2, got {args.seq_len}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.max_windows is not None and args.max_windows < 1:
        raise UserError(f"--max-windows must be at least 1, got {args.max_windows}")


def evaluate(
    model: str,
    tasks: list[str],
    seq_len: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    data_dir: str | None = None,
    dtype: str = "float32",
    progress: bool = True,
) -> dict:
    """Load `model`, run each task, return the JSON-ready results."""
    import jax.numpy as jnp

    from sigmascale_jax.perplexity import make_windows, perplexity
    from sigmascale_jax.sources import open_model

    start = time.perf_counter()
    folder = find_data_dir(data_dir)
    texts = {t: perplexity_text(t, folder) for t in tasks}  # fail on missing data before loading weights
    source = open_model(model)
    cfg = source.cfg
    if seq_len > cfg.max_position_embeddings:
        raise UserError(f"--seq-len {seq_len} exceeds the model's maximum of {cfg.max_position_embeddings} positions")
    tok = source.tokenizer()
    params = source.load_params(getattr(jnp, dtype), progress=progress)
    results: dict = {"model": model}
    for task in tasks:
        ids = np.asarray(tok(texts[task]).input_ids, dtype=np.int32)
        windows = make_windows(ids, seq_len, max_windows)
        results[task] = perplexity(params, cfg, windows, batch_size, desc=task, progress=progress)
    results["seq_len"] = seq_len
    results["dtype"] = dtype
    results["seconds"] = round(time.perf_counter() - start, 2)
    return results


def format_table(results: dict, tasks: list[str]) -> str:
    rows = [f"{'task':<10} {'ppl':>10} {'tokens':>10} {'windows':>8}"]
    for t in tasks:
        r = results[t]
        rows.append(f"{t:<10} {r['ppl']:>10.4f} {r['tokens']:>10d} {r['windows']:>8d}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    tasks = parse_tasks(args.tasks)
    results = evaluate(
        args.model,
        tasks,
        seq_len=args.seq_len,
        max_windows=args.max_windows,
        batch_size=args.batch_size,
        data_dir=args.data_dir,
        dtype=args.dtype,
        progress=not args.no_progress,
    )
    print(f"model: {args.model}  seq_len: {args.seq_len}  dtype: {args.dtype}  ({results['seconds']:.1f} s)")
    print(format_table(results, tasks))
    if args.json:
        write_json_atomic(args.json, results)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
