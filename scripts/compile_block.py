"""What one block's compiled programs cost at a model's shapes: compile once, then run at any ranks.

For one block of `--shape` (bench_scale.SHAPES: llama-3.1-8b, qwen3-8b, smoke), with random weights and
`--nsamples` x `--seq-len` random calibration activations, on this machine's default device:

- the calibration statistics chunk (`stats.block_stats_chunk`): compile seconds, then run seconds;
- SigmaScale's learning scan (`--steps` steps of `--step-windows` windows, the block loss): compile seconds
  (lower + compile, once), the run at uniform ranks, then a second run at other, mixed ranks (every matrix its own)
  with the XLA compiles it caused — 0: ranks are data;
- the 8B-model estimate: compile once + layers x (statistics run + learning run), against 20 minutes.

    python scripts/compile_block.py --shape llama-3.1-8b --out results/compile_block_gpu    # on a GPU
    python scripts/compile_block.py --shape smoke --out /tmp/smoke                          # the plumbing, on a CPU
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from bench_scale import SHAPES

import benchlib


def run(args) -> dict:
    import jax
    from transformers import AutoConfig

    from sigmascale_jax.compress.factorize.sigmascale.block import SigmaScaleSettings, _learn, rank_data
    from sigmascale_jax.compress.ranks import block_ranks, break_even_rank
    from sigmascale_jax.compress.report import CompileCounter
    from sigmascale_jax.compress.stats import block_stats_chunk
    from sigmascale_jax.io.hf_map import block_tensors
    from sigmascale_jax.model.config import config_from_hf

    shape = SHAPES[args.shape]
    cfg = config_from_hf(AutoConfig.for_model(**{**shape, "num_hidden_layers": 1}))
    layers = shape["num_hidden_layers"]
    rng = np.random.default_rng(0)
    block: dict = {}
    for path, (name, dims) in block_tensors(cfg, 0).items():
        value = np.ones(dims, np.float32) if name.endswith("norm.weight") else \
            (rng.standard_normal(dims, np.float32) / np.sqrt(dims[-1])).astype(np.float32)
        node = block
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    n, t, d = args.nsamples, args.seq_len, cfg.hidden_size
    hold = max(1, round(0.125 * n))
    xs = rng.standard_normal((n, t, d), np.float32)
    ys = xs + 0.1 * rng.standard_normal((n, t, d), np.float32)
    shapes = cfg.projection_shapes()
    white = {p: np.eye(shapes[p][1], dtype=np.float32) for p in shapes}
    settings = SigmaScaleSettings(steps=args.steps, step_windows=args.step_windows, eval_every=10).resolved()
    counter = CompileCounter()
    put = jax.device_put
    blk, white, key = put(block), put(white), jax.random.key(0)
    train, held = (put(xs[:-hold]), put(ys[:-hold])), (put(xs[-hold:]), put(ys[-hold:]))
    out = {"shape": args.shape, "device": str(jax.devices()[0]), "nsamples": n, "seq_len": t, "steps": args.steps,
           "step_windows": args.step_windows, "layers": layers}

    chunk = put(xs[: min(8, n)])
    t0 = time.perf_counter()
    stats_exe = block_stats_chunk.lower(blk, chunk, cfg=cfg, outputs=True).compile()
    out["stats_compile_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for s in range(0, n, 8):
        jax.block_until_ready(stats_exe(blk, put(xs[s : s + 8])) if s + 8 <= n else None)
    out["stats_run_s"] = time.perf_counter() - t0  # the whole block's windows, in chunks of 8

    uniform = rank_data(block_ranks(cfg, 0.2))
    mixed = rank_data({p: int(rng.integers(1, break_even_rank(*shapes[p]))) for p in shapes})
    t0 = time.perf_counter()
    learn_exe = _learn.lower(blk, white, train, held, key, uniform, cfg=cfg, settings=settings).compile()
    out["learn_compile_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(learn_exe(blk, white, train, held, key, put(uniform)))
    out["learn_run_s"] = time.perf_counter() - t0
    c0 = counter.snapshot()
    t0 = time.perf_counter()
    jax.block_until_ready(_learn(blk, white, train, held, key, put(mixed), cfg=cfg, settings=settings))
    out["learn_mixed_ranks_s"] = time.perf_counter() - t0
    out["learn_mixed_ranks_compiles"] = counter.since(c0)[0]
    out["step_s"] = out["learn_run_s"] / args.steps
    compile_once = out["stats_compile_s"] + out["learn_compile_s"]
    per_block = out["stats_run_s"] + out["learn_run_s"]
    out["estimate_min"] = (compile_once + layers * per_block) / 60
    out["estimate_before_min"] = layers * (compile_once + per_block) / 60  # a compile per block: mixed ranks before
    return out


def table(r: dict) -> str:
    return "\n".join([
        f"# One {r['shape']} block's programs on {r['device']}", "",
        f"Command: `{benchlib.command_line()}`. {r['nsamples']} x {r['seq_len']} random calibration windows; "
        f"SigmaScale {r['steps']} steps of {r['step_windows']} windows (block loss); ranks as data.", "",
        "| program | compile s | run s |", "| --- | ---: | ---: |",
        f"| statistics (all windows, chunks of 8) | {r['stats_compile_s']:.1f} | {r['stats_run_s']:.1f} |",
        f"| SigmaScale learning, uniform ranks | {r['learn_compile_s']:.1f} | {r['learn_run_s']:.1f} |",
        f"| SigmaScale learning, mixed ranks | {r['learn_mixed_ranks_compiles']} compiles | "
        f"{r['learn_mixed_ranks_s']:.1f} |", "",
        f"Whole model ({r['layers']} blocks; factorization's final SVDs and propagation not included): compile once + "
        f"{r['layers']} x (statistics + learning) = **{r['estimate_min']:.1f} min** (against 20 minutes); with a "
        f"compile per block, as mixed ranks cost before ranks were data: {r['estimate_before_min']:.1f} min.", ""])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--step-windows", type=int, default=4)
    p.add_argument("--out", default="results/compile_block_gpu")
    args = p.parse_args()
    r = run(args)
    r["command"] = benchlib.command_line()
    benchlib.write(args.out, r, table(r))
    print(table(r))
    print(json.dumps({k: v for k, v in r.items() if k != "command"}))


if __name__ == "__main__":
    main()
