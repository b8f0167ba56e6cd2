"""Evaluate a model: perplexity on WikiText-2 and C4, zero-shot accuracy on the lm-evaluation-harness tasks.

    python -m sigmascale_jax.eval --model ../shared/models/smollm2-135m-instruct-q4_1 \\
        --tasks wikitext2,c4 --seq-len 2048 --json results/dense.json
    python -m sigmascale_jax.eval --model runs/smollm2-svd-llm-0.2 --tasks zeroshot --limit 200
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from sigmascale_jax.errors import ArgumentParser, UserError
from sigmascale_jax.eval.tasks import ZEROSHOT_TASKS, load_task
from sigmascale_jax.io.data import PERPLEXITY_TASKS, find_data_dir, perplexity_text
from sigmascale_jax.io.diskcache import COMPILE_CACHE_HELP, use_compilation_cache
from sigmascale_jax.io.fileio import write_json_atomic

KNOWN_TASKS = PERPLEXITY_TASKS + ZEROSHOT_TASKS
TASK_GROUPS = {"zeroshot": ZEROSHOT_TASKS, "perplexity": PERPLEXITY_TASKS}

DTYPES = {"float32": "float32", "bfloat16": "bfloat16"}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m sigmascale_jax.eval",
        description="Perplexity (non-overlapping windows, exp of mean token NLL) and zero-shot accuracy "
        "(lm-evaluation-harness task definitions) of a dense or compressed model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="HF folder, .gguf file, hub id, or a folder written by the compressor")
    p.add_argument("--tasks", default="wikitext2,c4",
                   help=f"comma-separated; known: {','.join(KNOWN_TASKS)}; groups: zeroshot (all seven), perplexity")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per window")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows of each task")
    p.add_argument("--batch-size", type=int, default=1, help="perplexity: windows per forward pass")
    p.add_argument("--limit", type=int, default=None, help="zero-shot: only the first N examples of each task")
    p.add_argument("--tokens-per-batch", type=int, default=4096,
                   help="zero-shot: tokens per forward pass (rows x padded length)")
    p.add_argument("--data-dir", default=None, help="data folder (default: $SIGMASCALE_DATA, else ../shared/data)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="compute dtype of the weights")
    p.add_argument("--quantize", choices=("int8", "int4", "int3", "int2"), default=None,
                   help="round-to-nearest quantize a dense model's projections first (the compressor's quantizer: "
                        "quantization alone, to compare with low-rank compression)")
    p.add_argument("--group-size", type=int, default=None, help="--quantize: columns per scale group (default 128)")
    p.add_argument("--mesh", default=None, help="data=N,model=M: split each batch of windows over N devices and the "
                                                "weights over M (default: every local device on data)")
    p.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON here")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--no-compile-cache", action="store_true", help=COMPILE_CACHE_HELP)
    return p


def parse_tasks(spec: str) -> list[str]:
    """Task names from a comma-separated spec, groups expanded, duplicates dropped."""
    tasks: list[str] = []
    for t in (t.strip() for t in spec.split(",")):
        for name in TASK_GROUPS.get(t, (t,) if t else ()):
            if name not in KNOWN_TASKS:
                raise UserError(f"unknown task {name!r}; known: {', '.join(KNOWN_TASKS)} (groups: {', '.join(TASK_GROUPS)})")
            if name not in tasks:
                tasks.append(name)
    if not tasks:
        raise UserError("--tasks is empty; give e.g. --tasks wikitext2,c4")
    return tasks


def check_args(args: argparse.Namespace) -> None:
    if args.seq_len < 2:
        raise UserError(f"--seq-len must be at least 2, got {args.seq_len}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.max_windows is not None and args.max_windows < 1:
        raise UserError(f"--max-windows must be at least 1, got {args.max_windows}")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    if args.tokens_per_batch < 1:
        raise UserError(f"--tokens-per-batch must be at least 1, got {args.tokens_per_batch}")
    if args.group_size is not None and args.quantize is None:
        raise UserError("--group-size sets the quantization groups; it needs --quantize int8, int4, int3 or int2")
    if args.group_size is not None and (args.group_size < 1 or (args.quantize == "int4" and args.group_size % 2)):
        raise UserError(f"--group-size must be at least 1 (and even for int4), got {args.group_size}")


def evaluate(
    model: str,
    tasks: list[str],
    seq_len: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    data_dir: str | None = None,
    dtype: str = "float32",
    progress: bool = True,
    limit: int | None = None,
    tokens_per_batch: int = 4096,
    quantize: str | None = None,
    group_size: int | None = None,
    mesh: str | None = None,
) -> dict:
    """Load `model` (its projections RTN-quantized if `quantize`), run each task, return the JSON-ready results."""
    import jax.numpy as jnp

    from sigmascale_jax.eval.perplexity import make_windows, perplexity
    from sigmascale_jax.eval.zeroshot import average, score_task, task_metrics
    from sigmascale_jax.io.sources import open_model
    from sigmascale_jax.parallel import make_mesh

    start = time.perf_counter()
    device_mesh = make_mesh(mesh)
    folder = find_data_dir(data_dir)
    # Read (and check) every data file before loading weights.
    texts = {t: perplexity_text(t, folder) for t in tasks if t in PERPLEXITY_TASKS}
    zeroshot = {t: load_task(t, folder, limit)[1] for t in tasks if t in ZEROSHOT_TASKS}
    source = open_model(model)
    if quantize and source.kind == "compressed":
        raise UserError(f"{model} is a compressed model; --quantize applies to dense ones (compress with --quantize)")
    cfg = source.cfg
    if quantize:
        from sigmascale_jax.compress.encode.quant import check_group_size, default_group_size

        group_size = group_size or default_group_size(cfg)
        check_group_size(group_size, cfg)
    if texts and seq_len > cfg.max_position_embeddings:
        raise UserError(f"--seq-len {seq_len} exceeds the model's maximum of {cfg.max_position_embeddings} positions")
    tok = source.tokenizer()
    params = source.load_params(None if quantize else getattr(jnp, dtype), progress=progress)
    results: dict = {"model": model}
    if quantize:
        from sigmascale_jax.model.modeling import cast_params

        params, results["quantized"] = quantize_params(params, quantize, group_size)
        params = cast_params(params, getattr(jnp, dtype))
    for task in tasks:
        if task in texts:
            ids = np.asarray(tok(texts[task]).input_ids, dtype=np.int32)
            windows = make_windows(ids, seq_len, max_windows)
            results[task] = perplexity(params, cfg, windows, batch_size, desc=task, progress=progress, mesh=device_mesh)
        else:
            lls = score_task(params, cfg, tok, zeroshot[task], task, tokens_per_batch, progress)
            results[task] = task_metrics(task, zeroshot[task], lls)
    if zeroshot:
        results["zeroshot_average"] = average({t: results[t] for t in zeroshot})
        results["limit"] = limit
    results["seq_len"] = seq_len
    results["dtype"] = dtype
    results["seconds"] = round(time.perf_counter() - start, 2)
    return results


def quantize_params(params: dict, kind: str, group: int) -> tuple[dict, dict]:
    """Every projection RTN-quantized (the compressor's quantizer); and a record: the kind, group and the bytes of the
    projections' matrices before and after."""
    from sigmascale_jax.compress.encode.plain import dense_leaf
    from sigmascale_jax.compress.encode.quant import QuantSettings
    from sigmascale_jax.model.modeling import PROJECTIONS

    settings = QuantSettings(quantize=kind, group_size=group)

    before = after = 0
    blocks = []
    for block in params["blocks"]:
        new = dict(block)
        for n in PROJECTIONS:
            leaf = dense_leaf(block[n], settings)
            before += int(np.asarray(block[n]["w"]).nbytes)
            after += leaf.w.nbytes
            new[n] = leaf
        blocks.append(new)
    return {**params, "blocks": blocks}, {"kind": kind, "group_size": group, "projection_bytes_dense": before,
                                          "projection_bytes": after}


def format_table(results: dict, tasks: list[str]) -> str:
    """Perplexity rows, then zero-shot rows (acc ± stderr, acc_norm ± stderr) and their average."""
    out = []
    ppl = [t for t in tasks if t in PERPLEXITY_TASKS]
    if ppl:
        out.append(f"{'task':<14} {'ppl':>10} {'tokens':>10} {'windows':>8}")
        for t in ppl:
            r = results[t]
            out.append(f"{t:<14} {r['ppl']:>10.4f} {r['tokens']:>10d} {r['windows']:>8d}")
    zs = [t for t in tasks if t in ZEROSHOT_TASKS]
    if zs:
        if out:
            out.append("")
        out.append(f"{'task':<14} {'acc':>16} {'acc_norm':>16} {'n':>6}")
        for t in zs:
            r = results[t]
            acc = f"{r['acc']:.4f} ± {r['acc_stderr']:.4f}"
            norm = f"{r['acc_norm']:.4f} ± {r['acc_norm_stderr']:.4f}" if "acc_norm" in r else "-"
            out.append(f"{t:<14} {acc:>16} {norm:>16} {r['n']:>6d}")
        avg = results["zeroshot_average"]
        out.append(f"{'average':<14} {avg['acc']:>16.4f} {avg['acc_norm_or_acc']:>16.4f}   (acc_norm column: acc_norm where reported, else acc)")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    use_compilation_cache(not args.no_compile_cache)
    if args.json:  # before the evaluation, not after it
        from sigmascale_jax.io.outputs import Input, check_out_file, model_input

        inputs = model_input(args.model, "the model being evaluated")
        check_out_file(args.json, [*inputs, Input(find_data_dir(args.data_dir), "the data folder")], "--json")
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
        limit=args.limit,
        tokens_per_batch=args.tokens_per_batch,
        quantize=args.quantize,
        group_size=args.group_size,
        mesh=args.mesh,
    )
    window = f"  seq_len: {args.seq_len}" if any(t in PERPLEXITY_TASKS for t in tasks) else ""
    limit = f"  limit: {args.limit}" if args.limit and any(t in ZEROSHOT_TASKS for t in tasks) else ""
    print(f"model: {args.model}{window}{limit}  dtype: {args.dtype}  ({results['seconds']:.1f} s)")
    print(format_table(results, tasks))
    if args.json:
        write_json_atomic(args.json, results)
        print(f"wrote {args.json}")
    return 0
