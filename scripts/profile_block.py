"""Where a block's time goes: one 8B-shaped block's statistics, factorization and SigmaScale step, in float32 and
float64, timed first (a table written after every measurement) and then traced with `jax.profiler`.

    python scripts/profile_block.py --shape llama-3.1-8b --out results/profile_gpu --trace-dir /tmp/trace
    python scripts/profile_block.py --shape smoke --out /tmp/profile_smoke      # the plumbing, on a CPU

Parts (each timed once compiled; the first call, compilation included, is recorded beside it):
statistics of every calibration window (`stats.block_stats`), whitening of the block's four Gram matrices,
svd-llm's factorization of the block, and one SigmaScale step (value and gradient of the block loss), each
factorization in both precisions. Then, unless `--no-trace`, one `jax.profiler.trace` per part in
`--trace-dir` (open with TensorBoard or Perfetto). Writes OUT.md and OUT.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import benchlib
import numpy as np
from bench_scale import SHAPES, write_model

PRECISIONS = ("float32", "float64")


def timed(fn) -> tuple[float, float]:
    """(first call s, second call s): compilation included in the first."""
    import jax

    t = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t
    t = time.perf_counter()
    jax.block_until_ready(fn())
    return first, time.perf_counter() - t


def parts(args):
    """`{name: zero-argument function}` of the block's work, on one random block of `args.shape`'s shapes."""
    import jax
    import jax.numpy as jnp

    from sigmascale_jax.compress.factorize.sigmascale.block import block_loss, zero_scales
    from sigmascale_jax.compress.factorize.svd_llm import svd_llm
    from sigmascale_jax.compress.plan import BlockInputs
    from sigmascale_jax.compress.ranks import block_ranks
    from sigmascale_jax.compress.stats import block_stats
    from sigmascale_jax.io.hf_map import load_block, load_outer
    from sigmascale_jax.io.sources import open_model
    from sigmascale_jax.linalg.precision import factor_precision
    from sigmascale_jax.linalg.whitening import triangular_whitening
    from sigmascale_jax.model.modeling import PROJECTION_INPUT, PROJECTIONS

    src = open_model(str(write_model(args.shape, 1, benchlib.REPO / args.work / args.shape)))
    cfg = src.cfg
    windows = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.nsamples, args.seq_len)).astype(np.int32)
    xs = jax.device_get(load_outer(src.reader, cfg))["embed"][windows]
    block = load_block(src.reader, cfg, 0)
    ys, stats = block_stats(block, xs, cfg, args.batch_size)
    ranks = block_ranks(cfg, args.ratio)
    whiten_jit = jax.jit(triangular_whitening)
    out = {"statistics": lambda: block_stats(block, xs, cfg, args.batch_size)[1][PROJECTION_INPUT["q"]]["gram"]}
    for precision in PRECISIONS:
        def whiten(precision=precision):
            with factor_precision(precision) as dtype:
                return [whiten_jit(jnp.asarray(stats[t]["gram"], dtype))[0] for t in set(PROJECTION_INPUT.values())]

        def factor(precision=precision):
            inputs = BlockInputs(block, stats, xs, ys, cfg, args.batch_size, precision=precision)
            return jax.tree.leaves(svd_llm().factor(inputs, ranks, jax.random.key(0)).params)

        out[f"whitening {precision}"] = whiten
        out[f"svd-llm factorization {precision}"] = factor
    with factor_precision("float64") as dtype:
        white = {n: jnp.asarray(whiten_jit(jnp.asarray(stats[PROJECTION_INPUT[n]]["gram"], dtype))[0], jnp.float32)
                 for n in PROJECTIONS}
    dev_block, scales = jax.device_put(block), zero_scales(block)
    x, y = jax.device_put(xs[: args.step_windows]), jax.device_put(ys[: args.step_windows])
    grad = jax.jit(jax.value_and_grad(lambda s, b, wh, x_, y_: block_loss(s, b, wh, x_, y_, cfg, dict(ranks),
                                                                        args.truncation)))
    out[f"sigmascale step ({args.truncation}, {args.step_windows} windows)"] = lambda: grad(scales, dev_block, white,
                                                                                        x, y)
    return out, cfg


def markdown(rows: list[dict], args, device: str) -> str:
    lines = [f"# Where a block's time goes: one {args.shape} block\n",
             f"Device: {device}. Calibration {args.nsamples} × {args.seq_len} random tokens, ratio {args.ratio}. "
             f"Command: `{benchlib.command_line()}`\n",
             "| part | first call s (with compilation) | s |", "| --- | ---: | ---: |"]
    lines += [f"| {r['part']} | {r['first_s']:.2f} | {r['s']:.2f} |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama-3.1-8b", choices=tuple(SHAPES))
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--step-windows", type=int, default=4)
    p.add_argument("--truncation", default="eigh", choices=("svd", "eigh"))
    p.add_argument("--work", default="runs/scale", help="where the random model is written")
    p.add_argument("--trace-dir", default=None, help="one jax.profiler trace per part here (default: OUT-trace)")
    p.add_argument("--no-trace", action="store_true")
    p.add_argument("--out", default="results/profile_block")
    args = p.parse_args()
    import jax

    device = f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}"
    work, _ = parts(args)
    rows: list[dict] = []
    for name, fn in work.items():  # the table first: a time-boxed call that ends early keeps what it measured
        first, again = timed(fn)
        rows.append({"part": name, "first_s": first, "s": again})
        print(f"{name:<48} {again:8.2f} s  (first {first:.2f} s)", flush=True)
        benchlib.write(args.out, {"args": vars(args), "device": device, "rows": rows}, markdown(rows, args, device))
    if not args.no_trace:
        trace = Path(args.trace_dir or f"{args.out}-trace")
        for name, fn in work.items():
            folder = trace / name.split(" (")[0].replace(" ", "-")
            with jax.profiler.trace(str(folder)):
                jax.block_until_ready(fn())
            print(f"traced {name} -> {folder}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
