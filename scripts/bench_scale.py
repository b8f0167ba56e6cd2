"""Scale benchmark: the compressor's stages on blocks with the exact shapes of Llama-3.1-8B and Qwen3-8B.

A random-weight model with an 8B model's shapes (N blocks; float16 safetensors, read by
the real loader) is compressed stage by stage, on this machine:

- calibration statistics of one block (`stats.block_stats`: forward and Gram matrices),
- svd-llm factorization of one block (`--method svd-llm`'s factorizer),
- one SigmaScale step (value and gradient of the block loss at the shipped config's
  settings), and the share of it spent in the rank-k truncations (7 SVDs and their VJPs),
- peak host memory, and XLA's own `compiled.memory_analysis()` of the heaviest compiled
  functions (the device memory they would need),

then extrapolates to the whole model (× layers) and says whether the heaviest step fits
an 80 GB accelerator at the given calibration size. Writes OUT.md and OUT.json.

    python scripts/bench_scale.py --shapes llama-3.1-8b --blocks 1 --nsamples 64 --out results/scale
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHAPES = {
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192}),
    # a small stand-in to check the script itself in seconds
    "smoke": dict(model_type="llama", hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=1000,
                  max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, use_sliding_window=False),
}


def write_model(name: str, blocks: int, folder: Path) -> Path:
    """A random model of `name`'s shapes with `blocks` layers, as config.json + float16 model.safetensors."""
    from safetensors.numpy import save_file
    from transformers import AutoConfig

    from sigmascale_jax.model.config import config_from_hf
    from sigmascale_jax.io.hf_map import block_tensors, outer_tensors

    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "model.safetensors").is_file():
        return folder
    hf = AutoConfig.for_model(**{**SHAPES[name], "num_hidden_layers": blocks})
    hf.save_pretrained(str(folder))
    cfg = config_from_hf(hf)
    rng = np.random.default_rng(0)
    tensors = {}
    specs = list(outer_tensors(cfg).values()) + [t for i in range(blocks) for t in block_tensors(cfg, i).values()]
    for tname, shape in specs:
        if tname.endswith("norm.weight"):
            tensors[tname] = np.ones(shape, np.float16)
        else:  # scaled like a trained model's weights: unit-variance activations through each layer
            tensors[tname] = (rng.standard_normal(shape, np.float32) / np.sqrt(shape[-1])).astype(np.float16)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def memory_of(fn, *args, **kwargs) -> dict:
    """XLA's memory analysis of `fn` compiled for these arguments (bytes)."""
    compiled = fn.lower(*args, **kwargs).compile()
    m = compiled.memory_analysis()
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "generated_code_size_in_bytes")
    out = {f: int(getattr(m, f, 0) or 0) for f in fields}
    out["total_bytes"] = out["argument_size_in_bytes"] + out["output_size_in_bytes"] + out["temp_size_in_bytes"]
    return out


def bench_shape(name: str, args, save=lambda row: None) -> dict:
    import jax
    import jax.numpy as jnp

    import sigmascale_jax  # noqa: F401
    from sigmascale_jax.compress.factorize.svd_llm import svd_llm
    from sigmascale_jax.compress.plan import BlockInputs
    from sigmascale_jax.model.modeling import PROJECTION_INPUT, PROJECTIONS
    from sigmascale_jax.io.hf_map import load_block, load_outer
    from sigmascale_jax.compress.ranks import block_ranks
    from sigmascale_jax.compress.factorize.sigmascale.block import block_loss, zero_scales
    from sigmascale_jax.linalg.whitening import triangular_whitening
    from sigmascale_jax.io.sources import open_model
    from sigmascale_jax.compress.stats import block_stats, block_stats_chunk
    from sigmascale_jax.linalg.truncation import TRUNCATIONS

    folder = write_model(name, args.blocks, REPO / args.work / name)
    src = open_model(str(folder))
    cfg = src.cfg
    ranks = block_ranks(cfg, args.ratio)
    rng = np.random.default_rng(0)
    windows = rng.integers(0, cfg.vocab_size, (args.nsamples, args.seq_len)).astype(np.int32)
    t = time.perf_counter()
    outer = jax.device_get(load_outer(src.reader, cfg))
    xs = outer["embed"][windows]
    del outer
    block = load_block(src.reader, cfg, 0)
    load_s = time.perf_counter() - t
    row: dict = {"shape": name, "layers": SHAPES[name]["num_hidden_layers"], "nsamples": args.nsamples,
                 "seq_len": args.seq_len, "ratio": args.ratio, "ranks": ranks, "load_s": load_s}

    t = time.perf_counter()
    ys, stats = block_stats(block, xs, cfg, args.batch_size)
    row["stats_s"] = time.perf_counter() - t
    row["memory_stats_chunk"] = memory_of(block_stats_chunk, block, jnp.asarray(xs[: args.batch_size]), cfg=cfg)
    print(f"{name}: stats {row['stats_s']:.1f} s", flush=True)

    t = time.perf_counter()
    svd_llm().factor(BlockInputs(block, stats, xs, ys, cfg, args.batch_size), ranks, jax.random.key(0))
    row["svd_llm_block_s"] = time.perf_counter() - t
    print(f"{name}: svd-llm block {row['svd_llm_block_s']:.1f} s", flush=True)

    with jax.enable_x64(True):
        taps = {tap: np.asarray(triangular_whitening(jnp.asarray(stats[tap]["gram"], jnp.float64))[0])
                for tap in set(PROJECTION_INPUT.values())}
    white = {n: jnp.asarray(taps[PROJECTION_INPUT[n]], jnp.float32) for n in PROJECTIONS}
    scales = zero_scales(block)
    x, y = jnp.asarray(xs[: args.step_windows]), jnp.asarray(ys[: args.step_windows])
    rank_map = dict(ranks)
    for trunc_name in args.truncations.split(","):
        suffix = "" if trunc_name == "svd" else f"_{trunc_name}"
        # Weights and data are arguments, not closed-over constants: XLA would otherwise fold 2 GB of constants.
        grad_fn = jax.jit(jax.value_and_grad(
            lambda s, b, wh, x_, y_, tn=trunc_name: block_loss(s, b, wh, x_, y_, cfg, rank_map, tn)))
        t = time.perf_counter()
        jax.block_until_ready(grad_fn(scales, block, white, x, y))
        row[f"sigmascale_step_first{suffix}_s"] = time.perf_counter() - t  # with compilation
        t = time.perf_counter()
        jax.block_until_ready(grad_fn(scales, block, white, x, y))
        row[f"sigmascale_step{suffix}_s"] = time.perf_counter() - t
        trunc = 0.0
        for n in PROJECTIONS:
            a = jnp.asarray(np.asarray(block[n]["w"]) @ np.asarray(white[n]))
            f = jax.jit(jax.value_and_grad(lambda a_, k=ranks[n], tn=trunc_name: jnp.sum(TRUNCATIONS[tn](a_, k))))
            jax.block_until_ready(f(a))
            t = time.perf_counter()
            jax.block_until_ready(f(a))
            trunc += time.perf_counter() - t
        row[f"truncation_share{suffix}_s"] = trunc
        print(f"{name}: sigmascale step ({trunc_name}) {row[f'sigmascale_step{suffix}_s']:.1f} s "
              f"(truncations {trunc:.1f} s)", flush=True)
        if trunc_name == args.truncations.split(",")[0]:
            row["memory_sigmascale_step"] = memory_of(grad_fn, scales, block, white, x, y)
    fastest = min(args.truncations.split(","), key=lambda tn: row[f"sigmascale_step{'' if tn == 'svd' else '_' + tn}_s"])
    row["fastest_truncation"] = fastest
    row["sigmascale_step_best_s"] = row[f"sigmascale_step{'' if fastest == 'svd' else '_' + fastest}_s"]
    steps = args.steps
    row["sigmascale_block_s"] = row["stats_s"] + steps * row["sigmascale_step_best_s"]
    if args.full_block:
        save(summarize(dict(row), args, cfg.hidden_size))  # kept if the full block runs out of time
        # The whole factorizer once, as the compressor runs it (whitening, learning with held-out checks, final
        # float64 factors), timed twice: the second call is what every later block of the same shape costs.
        from sigmascale_jax.compress.factorize.sigmascale import sigmascale

        fac = sigmascale(loss="block", steps=steps, lr=0.03, step_windows=args.step_windows, truncation=fastest)
        inputs = BlockInputs(block, stats, xs, ys, cfg, args.batch_size)
        for label in ("sigmascale_full_block_first_s", "sigmascale_full_block_s"):
            t = time.perf_counter()
            jax.block_until_ready(jax.tree.leaves(fac.factor(inputs, ranks, jax.random.key(0)).params))
            row[label] = time.perf_counter() - t
            if row[label] > args.full_block_once_above:  # too slow to time twice: the first call, compilation included
                row["sigmascale_full_block_s"] = row[label]
                break
        print(f"{name}: full SigmaScale block ({fastest}) {row['sigmascale_full_block_s']:.1f} s "
              f"(first, with compilation: {row['sigmascale_full_block_first_s']:.1f} s)", flush=True)
        row["sigmascale_block_s"] = row["stats_s"] + row["sigmascale_full_block_s"]
    return summarize(row, args, cfg.hidden_size)


def summarize(row: dict, args, hidden: int) -> dict:
    """The derived fields: block and full-model times, their ratio, memory; called again as more is measured."""
    import jax

    row["peak_host_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    mem = getattr(jax.devices()[0], "memory_stats", lambda: None)()
    if mem and "peak_bytes_in_use" in mem:
        row["device_peak_bytes"] = int(mem["peak_bytes_in_use"])
    row["device"] = f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}"
    row["svd_llm_block_total_s"] = row["stats_s"] + row["svd_llm_block_s"]
    row["sigmascale_over_svdllm_block"] = row["sigmascale_block_s"] / row["svd_llm_block_total_s"]
    layers = row["layers"]
    row["full_model_s"] = {"svd-llm": layers * row["svd_llm_block_total_s"], "sigmascale": layers * row["sigmascale_block_s"]}
    heaviest = max(row["memory_stats_chunk"]["total_bytes"], row["memory_sigmascale_step"]["total_bytes"])
    resident = 2 * args.nsamples * args.seq_len * hidden * 4  # the block's inputs and targets
    row["device_bytes_estimate"] = heaviest + resident
    row["fits_80gb"] = row["device_bytes_estimate"] < 80e9
    return row


def _step_cell(r: dict, trunc: str) -> str:
    suffix = "" if trunc == "svd" else f"_{trunc}"
    if f"sigmascale_step{suffix}_s" not in r:
        return "not run"
    return f"{r[f'sigmascale_step{suffix}_s']:.1f} ({r[f'truncation_share{suffix}_s']:.1f})"


def markdown(rows: list[dict], args) -> str:
    devices = sorted({r.get("device", "?") for r in rows})
    lines = ["# Scale: one block of 8B-model shapes on this machine\n",
             f"Device: {', '.join(devices)}.\n",
             f"Calibration {args.nsamples} × {args.seq_len} random tokens; ratio {args.ratio}; SigmaScale at the shipped "
             f"config's settings ({args.steps} steps of {args.step_windows} windows). Command: `python {' '.join(sys.argv)}`\n",
             "SigmaScale step: value and gradient of the block loss, with the truncations' share (the seven rank-k "
             "truncations and their VJPs alone) in brackets, for `--truncation svd` and `eigh`; the block time is "
             "stats + steps × the faster step, or stats + the whole factorizer timed once compiled where `--full-block` "
             "ran it (marked *).\n",
             "| shape | stats s | svd-llm factor s | step s, svd (truncations) | step s, eigh (truncations) "
             "| SigmaScale block s | svd-llm block s "
             "| ratio | full model svd-llm / SigmaScale h | heaviest jit GB | est. device GB (80 GB?) | peak host GiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        heavy = max(r["memory_stats_chunk"]["total_bytes"], r["memory_sigmascale_step"]["total_bytes"]) / 1e9
        lines.append(
            f"| {r['shape']} | {r['stats_s']:.0f} | {r['svd_llm_block_s']:.0f} | {_step_cell(r, 'svd')} "
            f"| {_step_cell(r, 'eigh')} | {r['sigmascale_block_s']:.0f}{'*' if 'sigmascale_full_block_s' in r else ''} | {r['svd_llm_block_total_s']:.0f} "
            f"| {r['sigmascale_over_svdllm_block']:.1f}× | {r['full_model_s']['svd-llm'] / 3600:.1f} / "
            f"{r['full_model_s']['sigmascale'] / 3600:.1f} | {heavy:.1f} | {r['device_bytes_estimate'] / 1e9:.1f} "
            f"({'yes' if r['fits_80gb'] else 'no'}) | {r['peak_host_mib'] / 1024:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="llama-3.1-8b,qwen3-8b")
    p.add_argument("--blocks", type=int, default=1)
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--steps", type=int, default=50, help="SigmaScale steps per block (the shipped config: 50)")
    p.add_argument("--step-windows", type=int, default=4, help="windows per SigmaScale step (the shipped config: 4)")
    p.add_argument("--work", default="runs/scale", help="where the random models are written")
    p.add_argument("--truncations", default="svd,eigh",
                   help="SigmaScale step timed with each truncation (--truncation); the fastest sets the block time")
    p.add_argument("--full-block", action="store_true",
                   help="also time the whole SigmaScale factorizer on the block (steps × step, held-out checks, "
                        "final factors); the block estimate then uses it instead of steps × step")
    p.add_argument("--full-block-once-above", type=float, default=120.0,
                   help="time the whole factorizer only once (compilation included) when that took longer (s)")
    p.add_argument("--out", default="results/scale")
    args = p.parse_args()
    import benchlib

    rows: list[dict] = []

    def write(done: list[dict]) -> None:
        benchlib.write(args.out, {"args": vars(args), "rows": done,
                                  "sigmascale_over_svdllm_block": done[0]["sigmascale_over_svdllm_block"]},
                       markdown(done, args))

    for name in args.shapes.split(","):
        rows.append(bench_shape(name, args, save=lambda partial: write(rows + [partial])))
        write(rows)
    print(markdown(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
