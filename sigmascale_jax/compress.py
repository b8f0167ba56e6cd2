"""Compress a model block by block: calibration statistics, per-matrix factorization, Orbax output.

    python -m sigmascale_jax.compress --model ../shared/models/smollm2-135m-instruct-q4_1 \\
        --method svd-llm --ratio 0.2 --out runs/smollm2-svdllm-0.2

Block by block, as SVD-LLM and GPTQ do: calibration activations go through
block i, the Gram matrix of each projection's input is accumulated (float32
chunks, combined in float64), block i is factored, and block i+1's inputs come
from the compressed block i (`--sequential`, the default) or the original one.
Only the current block's weights and the activations are held; each finished
block is checkpointed in `OUT.partial/`, so rerunning the same command resumes.
The finished folder appears at OUT only when complete.

The module is also callable: ``sigmascale_jax.compress(model=..., method=..., ratio=..., out=...)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata
import json
import resource
import shutil
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np

from sigmascale_jax.errors import ArgumentParser, UserError, run_cli
from sigmascale_jax.fileio import write_json_atomic, write_npz_atomic
from sigmascale_jax.methods import METHODS

PARTIAL_SUFFIX = ".partial"


@dataclasses.dataclass(frozen=True)
class CompressSpec:
    """Everything that determines the result (a resumed run must match it exactly)."""

    model: str
    method: str
    ratio: float
    calib: str = "c4"
    nsamples: int = 64
    seq_len: int = 512
    seed: int = 0
    update: bool = False
    sequential: bool = True
    alpha: float = 0.5
    batch_size: int = 8
    loss: str = "block"
    steps: int = 200
    lr: float = 3e-2
    holdout: float = 0.125
    step_windows: int = 8
    eval_every: int = 10


def validate(spec: CompressSpec) -> None:
    """Checks that need no model: bad input stops here, before anything is written."""
    if spec.method not in METHODS:
        raise UserError(f"unknown method {spec.method!r}; known: {', '.join(METHODS)}")
    if not 0.0 < spec.ratio < 1.0:
        raise UserError(f"--ratio must lie strictly between 0 and 1, got {spec.ratio}")
    if spec.nsamples < 1:
        raise UserError(f"--nsamples must be at least 1, got {spec.nsamples}")
    if spec.seq_len < 2:
        raise UserError(f"--seq-len must be at least 2, got {spec.seq_len}")
    if spec.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {spec.batch_size}")
    if spec.update and spec.method != "svd-llm":
        raise UserError("--update is SVD-LLM's parameter update; use it with --method svd-llm")
    if spec.update and not spec.sequential:
        raise UserError("--update refits on the compressed model's activations; it needs --sequential")
    if spec.method == "sigmascale":
        from sigmascale_jax.sigmascale import LOSS_KINDS

        if spec.loss not in LOSS_KINDS:
            raise UserError(f"unknown --loss {spec.loss!r}; known: {', '.join(LOSS_KINDS)}")
        if spec.steps < 0:
            raise UserError(f"--steps must be at least 0, got {spec.steps}")
        if not 0.0 < spec.holdout < 1.0:
            raise UserError(f"--holdout must lie strictly between 0 and 1, got {spec.holdout}")
        if spec.nsamples < 2:
            raise UserError("--method sigmascale needs --nsamples of at least 2 (some windows are held out)")
        if spec.step_windows < 1:
            raise UserError(f"--step-windows must be at least 1, got {spec.step_windows}")
        if spec.eval_every < 1:
            raise UserError(f"--eval-every must be at least 1, got {spec.eval_every}")


def check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out} is not empty; pass --overwrite to replace it")


def prepare_out(out: Path, spec_key: dict, overwrite: bool) -> tuple[Path, bool]:
    """The staging folder for `out`, and whether it holds a run to resume."""
    staging = out.with_name(out.name + PARTIAL_SUFFIX)
    spec_file = staging / "spec.json"
    if staging.exists():
        same = spec_file.is_file() and json.loads(spec_file.read_text()) == spec_key
        if same:
            return staging, True
        if not overwrite:
            raise UserError(f"{staging} holds an unfinished run with other settings; pass --overwrite to discard it")
        shutil.rmtree(staging)
    return staging, False


def calibration_windows(source, spec: CompressSpec, data_dir: str | None) -> np.ndarray:
    from sigmascale_jax.calibration import calibration_text, sample_windows
    from sigmascale_jax.data import find_data_dir

    text = calibration_text(spec.calib, find_data_dir(data_dir) if spec.calib in ("c4", "wikitext2-valid") else Path("."))
    ids = np.asarray(source.tokenizer()(text).input_ids, dtype=np.int32)
    return sample_windows(ids, spec.nsamples, spec.seq_len, spec.seed)


def _apply_in_chunks(block, xs: np.ndarray, cfg, batch_size: int) -> np.ndarray:
    import jax.numpy as jnp

    from sigmascale_jax.modeling import block_apply

    return np.concatenate(
        [np.asarray(block_apply(block, jnp.asarray(xs[i : i + batch_size]), cfg)) for i in range(0, len(xs), batch_size)]
    )


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "numpy", "sigmascale_jax"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def peak_memory() -> dict[str, float]:
    """Peak host RSS of this process and, where the backend reports it, peak device memory (MiB)."""
    import jax

    mem = {"host_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        mem["device_peak_mib"] = stats["peak_bytes_in_use"] / 2**20
    return mem


def compress(
    model: str,
    method: str,
    ratio: float,
    out: str | Path,
    *,
    calib: str = "c4",
    nsamples: int = 64,
    seq_len: int = 512,
    seed: int = 0,
    update: bool = False,
    sequential: bool = True,
    alpha: float = 0.5,
    batch_size: int = 8,
    loss: str = "block",
    steps: int = 200,
    lr: float = 3e-2,
    holdout: float = 0.125,
    step_windows: int = 8,
    eval_every: int = 10,
    data_dir: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Compress `model` with `method` at `ratio` into the folder `out`; returns the report (compression.json)."""
    import jax
    from tqdm.auto import tqdm

    from sigmascale_jax.checkpoint import (
        FORMAT_VERSION, PARAMS_DIR, REPORT_FILE, SPECTRA_FILE, TOKENIZER_DIR, load_pytree, save_pytree,
    )
    from sigmascale_jax.methods import block_ranks, compress_block
    from sigmascale_jax.modeling import PROJECTIONS, param_count
    from sigmascale_jax.params import load_block, load_outer
    from sigmascale_jax.ranks import achieved_ratio
    from sigmascale_jax.sigmascale import sigmascale_block
    from sigmascale_jax.sources import open_model
    from sigmascale_jax.stats import block_stats

    spec = CompressSpec(
        model, method, float(ratio), calib, nsamples, seq_len, seed, update, sequential, alpha, batch_size, loss, steps, lr, holdout,
        step_windows, eval_every,
    )
    validate(spec)
    out = Path(out)
    check_out(out, overwrite)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    def lap(stage: str, since: float) -> float:
        now = time.perf_counter()
        timings[stage] = timings.get(stage, 0.0) + now - since
        return now

    source = open_model(model)
    cfg = source.cfg
    if seq_len > cfg.max_position_embeddings:
        raise UserError(f"--seq-len {seq_len} exceeds the model's maximum of {cfg.max_position_embeddings} positions")
    ranks = block_ranks(cfg, spec.ratio)
    windows = calibration_windows(source, spec, data_dir)
    spec_key = {**dataclasses.asdict(spec), "calib_sha1": hashlib.sha1(windows.tobytes()).hexdigest()}
    staging, resuming = prepare_out(out, spec_key, overwrite)
    (staging / "blocks").mkdir(parents=True, exist_ok=True)
    write_json_atomic(staging / "spec.json", spec_key)
    t = lap("calibration", t0)

    # Host copies: only the block being compressed lives on the device.
    outer = jax.device_get(load_outer(source.reader, cfg))
    xs = outer["embed"][windows]  # [N, L, D]
    # --update: C comes from the original model's activations (a dense stream kept
    # beside the compressed one), B is refit on the compressed model's.
    xs_ref = xs if update else None
    t = lap("load", t)

    blocks, infos = [], []
    dense_count = param_count(outer)
    bar = tqdm(range(cfg.num_layers), desc=f"{method} r={spec.ratio}", unit="block", disable=not progress)
    for i in bar:
        ckpt, info_file = staging / "blocks" / f"{i:04d}", staging / "blocks" / f"{i:04d}.json"
        dense = load_block(source.reader, cfg, i)
        dense_count += param_count(dense)
        t = lap("load", t)
        if info_file.is_file():  # finished before an interruption
            comp, info = load_pytree(ckpt), json.loads(info_file.read_text())
            xs = _apply_in_chunks(comp if sequential else dense, xs, cfg, batch_size)
            if xs_ref is not None:
                xs_ref = _apply_in_chunks(dense, xs_ref, cfg, batch_size)
            t = lap("propagate", t)
        else:
            dense_out, stats = block_stats(dense, xs, cfg, batch_size)
            ref_stats = None
            if xs_ref is not None:
                xs_ref, ref_stats = block_stats(dense, xs_ref, cfg, batch_size)
            t = lap("stats", t)
            if method == "sigmascale":
                comp, info = sigmascale_block(
                    dense, stats, xs, dense_out, cfg, ranks, kind=loss, steps=steps, lr=lr, holdout=holdout,
                    batch_windows=step_windows, eval_every=eval_every, batch_size=batch_size,
                    key=jax.random.fold_in(jax.random.key(seed), i),
                )
            else:
                if ref_stats is not None:  # whiten on the original activations, refit on the compressed ones
                    comp, info = compress_block(dense, ref_stats, cfg, ranks, method, refit_stats=stats)
                else:
                    comp, info = compress_block(dense, stats, cfg, ranks, method, alpha=alpha)
            t = lap("factorize", t)
            save_pytree(ckpt, comp)
            spectra = info.pop("_spectra", None)
            if spectra:
                write_npz_atomic(staging / "blocks" / f"{i:04d}.spectra.npz", spectra)
            write_json_atomic(info_file, info)  # last: it marks the block as finished
            t = lap("checkpoint", t)
            xs = _apply_in_chunks(comp, xs, cfg, batch_size) if sequential else dense_out
            t = lap("propagate", t)
        blocks.append(jax.device_get(comp))
        infos.append(info)
        if "_block" in info:
            bar.set_postfix(hold=f"{info['_block']['holdout_init']:.4f}->{info['_block']['holdout_best']:.4f}")
        else:
            bar.set_postfix(rel_loss=f"{np.mean([info[n]['rel_loss'] for n in PROJECTIONS]):.4f}")
        if not np.isfinite(xs).all():
            raise FloatingPointError(f"non-finite activations after block {i}")

    params = {**outer, "blocks": blocks}
    save_pytree(staging / PARAMS_DIR, params)
    block_spectra = sorted((staging / "blocks").glob("*.spectra.npz"))
    if block_spectra:  # SigmaScale: singular values of W, W S and the scaled matrix, per block and projection
        merged = {}
        for f in block_spectra:
            with np.load(f) as z:
                merged.update({f"{int(f.name[:4])}.{k}": z[k] for k in z.files})
        write_npz_atomic(staging / SPECTRA_FILE, merged)
    source.tokenizer().save_pretrained(str(staging / TOKENIZER_DIR))
    t = lap("checkpoint", t)

    shapes_ranks = [(*cfg.projection_shapes()[n], ranks[n]) for _ in range(cfg.num_layers) for n in PROJECTIONS]
    compressible_dense = sum(m * n for m, n, _ in shapes_ranks)
    compressed_count = param_count(params)
    report = {
        "format_version": FORMAT_VERSION,
        "model": model,
        "model_config": cfg.to_dict(),
        "method": method,
        "update": update,
        "sequential": sequential,
        "alpha": alpha if method == "asvd" else None,
        "sigmascale": {"loss": loss, "steps": steps, "lr": lr, "holdout": holdout, "step_windows": step_windows,
                       "eval_every": eval_every} if method == "sigmascale" else None,
        "ratio_requested": spec.ratio,
        "ratio_achieved": achieved_ratio(shapes_ranks),
        "whole_model_ratio": 1.0 - compressed_count / dense_count,
        "params": {
            "compressible_dense": compressible_dense,
            "compressible_compressed": sum(k * (m + n) for m, n, k in shapes_ranks),
            "model_dense": dense_count,
            "model_compressed": compressed_count,
        },
        "ranks": {n: {"shape": list(cfg.projection_shapes()[n]), "rank": ranks[n]} for n in PROJECTIONS},
        "matrices": [{"block": i, "name": n, **info[n]} for i, info in enumerate(infos) for n in PROJECTIONS],
        "blocks": [{"block": i, **info["_block"]} for i, info in enumerate(infos) if "_block" in info],
        "calibration": {
            "source": calib,
            "nsamples": nsamples,
            "seq_len": seq_len,
            "seed": seed,
            "tokens": int(windows.size),
            "sha1": spec_key["calib_sha1"],
        },
        "resumed": resuming,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "seconds": round(time.perf_counter() - t0, 3),
        "memory": peak_memory(),
        "versions": _versions(),
    }
    write_json_atomic(staging / REPORT_FILE, report)
    shutil.rmtree(staging / "blocks")
    (staging / "spec.json").unlink()
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return report


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m sigmascale_jax.compress",
        description="Compress a decoder LLM's projections with activation-aware truncated SVD.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", default=None, help="YAML file giving any of these flags (flags on the command line win)")
    p.add_argument("--model", default=None, help="HF folder, .gguf file or hub id (required)")
    p.add_argument("--method", default=None, choices=METHODS, help="compression method (required)")
    p.add_argument("--ratio", type=float, default=None, help="fraction of the projections' parameters removed (required)")
    p.add_argument("--out", default=None, help="output folder (required)")
    p.add_argument("--calib", default="c4", help="c4 (docs 0-999), wikitext2-valid, or a .txt/.jsonl file")
    p.add_argument("--nsamples", type=int, default=64, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration window offsets")
    p.add_argument("--update", action="store_true",
                   help="svd-llm: whiten on the original model's activations, then refit the left factor in closed form "
                        "on the compressed model's (with --sequential)")
    p.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=True,
                   help="feed block i+1 from the compressed block i")
    p.add_argument("--alpha", type=float, default=0.5, help="asvd: exponent of the activation scaling")
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per device call")
    p.add_argument("--loss", default="block", choices=("block", "layer"), help="sigmascale: loss the scales learn on")
    p.add_argument("--steps", type=int, default=200, help="sigmascale: Adam steps per block")
    p.add_argument("--lr", type=float, default=3e-2, help="sigmascale: peak learning rate (cosine decay)")
    p.add_argument("--holdout", type=float, default=0.125, help="sigmascale: fraction of windows held out to pick the step")
    p.add_argument("--step-windows", type=int, default=8, help="sigmascale (block loss): calibration windows per Adam step")
    p.add_argument("--eval-every", type=int, default=10, help="sigmascale: measure the held-out loss every N steps")
    p.add_argument("--data-dir", default=None, help="data folder (default: $SIGMASCALE_DATA, else ../shared/data)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (and an unfinished run)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        import yaml

        try:
            conf = yaml.safe_load(Path(args.config).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise UserError(f"cannot read --config {args.config}: {' '.join(str(e).split())[:200]}") from None
        if not isinstance(conf, dict):
            raise UserError(f"--config {args.config} must be a mapping of flag names to values")
        known = {a.dest for a in parser._actions}
        conf = {k.replace("-", "_"): v for k, v in conf.items()}
        unknown = sorted(set(conf) - known - {"config"})
        if unknown:
            raise UserError(f"unknown key {unknown[0]!r} in {args.config}; keys are the flag names, e.g. ratio, nsamples")
        parser.set_defaults(**conf)
        args = parser.parse_args(argv)
        if args.method not in METHODS:
            raise UserError(f"unknown method {args.method!r} in {args.config}; known: {', '.join(METHODS)}")
    for name in ("model", "method", "ratio", "out"):
        if getattr(args, name) is None:
            raise UserError(f"--{name} is required (on the command line or in --config)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = compress(
        args.model, args.method, args.ratio, args.out,
        calib=args.calib, nsamples=args.nsamples, seq_len=args.seq_len, seed=args.seed, update=args.update,
        sequential=args.sequential, alpha=args.alpha, batch_size=args.batch_size, loss=args.loss, steps=args.steps,
        lr=args.lr, holdout=args.holdout, step_windows=args.step_windows, eval_every=args.eval_every,
        data_dir=args.data_dir,
        overwrite=args.overwrite, progress=not args.no_progress,
    )
    print(f"{report['method']}{' +update' if report['update'] else ''}: ratio asked {report['ratio_requested']:.3f}, "
          f"achieved {report['ratio_achieved']:.4f} (whole model {report['whole_model_ratio']:.4f}) "
          f"in {report['seconds']:.1f} s, host peak {report['memory']['host_peak_mib']:.0f} MiB")
    print(f"wrote {args.out}; evaluate with: python -m sigmascale_jax.eval --model {args.out}")
    return 0


class _CallableModule(types.ModuleType):
    """Lets `sigmascale_jax.compress(...)` call the function while `python -m sigmascale_jax.compress` runs the CLI."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return compress(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(run_cli(main))
