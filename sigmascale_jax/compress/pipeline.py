"""The block-by-block pipeline: allocate ranks, factor each block, refine, write the compressed folder.

    (0) the rank allocator picks a rank (or dense) for every block and projection;
        it may look at the whole model (ZS-SVD runs a gradient and a statistics pass);
    (1) block by block, as SVD-LLM and GPTQ do: calibration activations go through
        block i, the Gram matrix of each projection's input is accumulated (float32
        chunks, combined in float64), the factorizer factors block i at its ranks,
        and block i+1's inputs come from the compressed block i (`sequential`) or
        the original one; a dense stream runs beside it for factorizers that ask;
    (2) refiners (ZS-SVD's correction) revise the factors with the whole model in view;
    (3) the params, tokenizer and `compression.json` are written.

Only the current block's weights and the activations are held on the device. The
allocation and each finished block are checkpointed in `OUT.partial/`, so rerunning
the same command resumes; the finished folder appears at OUT only when complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from sigmascale_jax.compress.plan import Allocation, BlockInputs, BlockResult, Budget, ModelContext, Plan, RunSpec
from sigmascale_jax.errors import UserError
from sigmascale_jax.io.fileio import check_writable_dir, write_json_atomic, write_npz_atomic
from sigmascale_jax.model.modeling import PROJECTIONS

PARTIAL_SUFFIX = ".partial"
RANKS_FILE = "ranks.json"


def check_out(out: Path, overwrite: bool, model: str) -> None:
    """`--out` can be written and replacing it harms nothing else: checked before any work."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out} is not empty; pass --overwrite to replace it")
    src, dst = Path(model).expanduser(), out
    if src.exists():
        src, dst = src.resolve(), out.resolve()
        if src == dst or dst in src.parents:
            raise UserError(f"--out {out} would replace the model being compressed ({model}); choose another --out")
    check_writable_dir(out.parent, "--out")


@contextlib.contextmanager
def out_lock(out: Path):
    """Hold an exclusive lock on `out` for this run; a second run on the same `--out` gets a one-line error.

    The lock is a `flock` on `.OUT.lock` beside it, released by the kernel however
    the process ends (so a killed run never leaves a stale lock).
    """
    path = out.with_name(f".{out.name}.lock")
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"another compression is writing {out} (it holds {path}); wait for it or use another --out") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:  # not a lock file another run just removed
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def prepare_out(out: Path, spec_key: dict, overwrite: bool) -> tuple[Path, bool]:
    """The staging folder for `out`, and whether it holds a run to resume (`overwrite` discards any)."""
    staging = out.with_name(out.name + PARTIAL_SUFFIX)
    spec_file = staging / "spec.json"
    if staging.exists():
        if overwrite:
            shutil.rmtree(staging)
            return staging, False
        try:
            same = spec_file.is_file() and json.loads(spec_file.read_text()) == spec_key
        except (OSError, ValueError):
            same = False
        if same:
            return staging, True
        raise UserError(f"{staging} holds an unfinished run with other settings; rerun that command to finish it, "
                        "or pass --overwrite to discard it")
    return staging, False


def _finished_work(staging: Path) -> bool:
    """Whether the staging folder holds anything worth resuming (a finished block or an allocation)."""
    return (staging / RANKS_FILE).is_file() or any((staging / "blocks").glob("*.json"))


def calibration_windows(source, spec: RunSpec, data_dir: str | None) -> np.ndarray:
    from sigmascale_jax.compress.calibration import calibration_text, sample_windows
    from sigmascale_jax.io.data import find_data_dir

    from importlib.metadata import version

    from sigmascale_jax.io.diskcache import cached, model_fingerprint

    text = calibration_text(spec.calib, find_data_dir(data_dir) if spec.calib in ("c4", "wikitext2-valid") else Path("."))
    # Tokenizing the text is seconds a run; the ids depend only on the tokenizer's files and the text.
    key = {"model": model_fingerprint(source), "transformers": version("transformers"),
           "text_sha1": hashlib.sha1(text.encode()).hexdigest()}
    ids, _ = cached("calibration-ids", key, lambda: source.tokenizer()(text).input_ids)
    ids = np.asarray(ids, dtype=np.int32)
    return sample_windows(ids, spec.nsamples, spec.seq_len, spec.seed)


def apply_in_chunks(block, xs: np.ndarray, cfg, batch_size: int, mesh=None) -> np.ndarray:
    """The block applied to `xs: [N, T, D]`, `batch_size` windows a call (split over the mesh's data axis)."""
    import jax.numpy as jnp

    from sigmascale_jax.model.modeling import block_apply
    from sigmascale_jax.parallel import replicate, shard

    block = replicate(block, mesh)
    return np.concatenate([np.asarray(block_apply(block, shard(jnp.asarray(xs[i : i + batch_size]), mesh), cfg))
                           for i in range(0, len(xs), batch_size)])


def check_ranks(ranks: Any, cfg) -> list[dict[str, int | None]]:
    """An allocator's (or a resumed file's) ranks, checked against the model's shapes."""
    shapes = cfg.projection_shapes()
    if not isinstance(ranks, list) or len(ranks) != cfg.num_layers:
        raise ValueError(f"ranks must list {cfg.num_layers} blocks")
    for i, block in enumerate(ranks):
        for n in PROJECTIONS:
            k = block.get(n, "missing")
            if k is not None and not (isinstance(k, int) and 1 <= k <= min(shapes[n])):
                raise ValueError(f"block {i} {n}: rank {k!r} outside 1..{min(shapes[n])}")
    return [{n: block[n] for n in PROJECTIONS} for block in ranks]


def _allocation(plan: Plan, ctx: ModelContext, budget: Budget, staging: Path) -> Allocation:
    """The allocator's result, from `ranks.json` when resuming (ZS-SVD's passes are not repeated)."""
    path = staging / RANKS_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        return Allocation(check_ranks(saved["ranks"], ctx.cfg), saved["info"])
    if not plan.allocate.costly:
        alloc = plan.allocate.allocate(ctx, budget)
        return Allocation(check_ranks(alloc.ranks, ctx.cfg), alloc.info)
    from sigmascale_jax.io.diskcache import cached

    # Costly allocations are also kept in the disk cache: the same ranks serve every factorizer.
    key = {"model": ctx.model_key, "calib_sha1": ctx.calib_sha1, "allocate": plan.key()["allocate"],
           "count": budget.count.__name__,
           "run": {k: v for k, v in ctx.spec.asdict().items() if k not in ("model", "sequential")}}

    def compute() -> dict:
        alloc = plan.allocate.allocate(ctx, budget)
        return {"ranks": alloc.ranks, "info": alloc.info}

    value, hit = cached("allocations", key, compute)
    alloc = Allocation(check_ranks(value["ranks"], ctx.cfg), {**value["info"], "from_cache": hit})
    write_json_atomic(path, {"ranks": alloc.ranks, "info": alloc.info})
    return alloc


class _Clock:
    """Seconds per stage (compression.json's `timings_s`)."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.timings: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + now - self.last
        self.last = now


def open_checked(spec: RunSpec, plan: Plan):
    """The model source, after every check that needs no calibration data: a UserError here writes nothing."""
    from sigmascale_jax.io.hf_map import check_checkpoint
    from sigmascale_jax.io.sources import open_model

    for name in ("model", "ratio"):
        if getattr(spec, name) is None:
            raise UserError(f"--{name} is required")
    source = open_model(spec.model)
    if source.kind == "compressed":
        raise UserError(f"{spec.model} is already a compressed model (it holds compression.json); compress the model it "
                        f"came from instead ({source.folder / 'compression.json'} names it)")
    cfg = source.cfg
    from sigmascale_jax.parallel import parse_mesh

    parse_mesh(spec.mesh)  # a bad --mesh fails here, before any work
    if spec.seq_len > cfg.max_position_embeddings:
        raise UserError(f"--seq-len {spec.seq_len} exceeds the model's maximum of {cfg.max_position_embeddings} positions")
    plan.check(spec, cfg)
    check_checkpoint(source.reader, cfg)  # names and shapes from the file headers; values are checked as they load
    return source


def run(spec: RunSpec, plan: Plan, out: str | Path, *, data_dir: str | None = None, overwrite: bool = False,
        progress: bool = True) -> dict[str, Any]:
    """Compress `spec.model` with `plan` into the folder `out`; returns the report (compression.json).

    Everything that can be checked without the work (settings, model files and shapes,
    calibration text, `--out`) is checked before `OUT.partial/` is created; a run that
    fails before finishing anything removes it again.
    """
    out = Path(out)
    check_out(out, overwrite, spec.model or "")
    clock = _Clock()
    source = open_checked(spec, plan)
    windows = calibration_windows(source, spec, data_dir)
    with out_lock(out):
        spec_key = {**spec.asdict(), **plan.key(), "calib_sha1": hashlib.sha1(windows.tobytes()).hexdigest()}
        staging, resuming = prepare_out(out, spec_key, overwrite)
        try:
            (staging / "blocks").mkdir(parents=True, exist_ok=True)
            write_json_atomic(staging / "spec.json", spec_key)
            clock.lap("calibration")
            report = _compress(spec, plan, source, windows, staging, clock, progress)
            report["resumed"] = resuming
        except BaseException:
            if staging.exists() and not _finished_work(staging):
                shutil.rmtree(staging, ignore_errors=True)
            raise
        return _finalize(staging, out, report)


def _compress(spec: RunSpec, plan: Plan, source, windows: np.ndarray, staging: Path, clock: _Clock,
              progress: bool) -> dict[str, Any]:
    """Stages (0)-(3) into `staging`; returns the report."""
    import jax

    from sigmascale_jax.io.checkpoint import PARAMS_DIR, SPECTRA_FILE, TOKENIZER_DIR, save_pytree
    from sigmascale_jax.compress.report import build_report
    from sigmascale_jax.model.modeling import param_count
    from sigmascale_jax.io.hf_map import load_block, load_outer

    cfg = source.cfg
    encoder = plan.encoder()
    budget = Budget(spec.ratio, encoder.count)
    # Host copies: only the block being worked on lives on the device.
    outer = jax.device_get(load_outer(source.reader, cfg))
    from sigmascale_jax.io.diskcache import model_fingerprint

    from sigmascale_jax.parallel import make_mesh

    ctx = ModelContext(cfg, outer, lambda i: load_block(source.reader, cfg, i), windows, spec, progress,
                       model_key=model_fingerprint(source), mesh=make_mesh(spec.mesh))
    clock.lap("load")
    alloc = _allocation(plan, ctx, budget, staging)
    clock.lap("allocate")
    blocks, results, dense_count = _block_loop(spec, plan, ctx, alloc, source, staging, clock)
    refined = []
    for refiner in plan.refine:
        blocks, info = refiner.refine(ctx, blocks, alloc.ranks)
        blocks = [jax.device_get(b) for b in blocks]
        refined.append({"name": refiner.name, **refiner.settings.asdict(), **info})
        clock.lap("refine")

    # (3) how to store what is left: every projection becomes its encoder's typed leaf
    leaves = [{n: encoder.encode(block[n], results[i].matrices[n]) for n in PROJECTIONS} for i, block in enumerate(blocks)]
    clock.lap("encode")
    saved = [{**block, **{n: leaf.to_tree() for n, leaf in leaves[i].items()}} for i, block in enumerate(blocks)]
    params = {**outer, "blocks": saved}
    save_pytree(staging / PARAMS_DIR, params)
    block_spectra = sorted((staging / "blocks").glob("*.spectra.npz"))
    if block_spectra:  # SigmaScale: singular values of W, W S and the scaled matrix, per block and projection
        merged = {}
        for f in block_spectra:
            with np.load(f) as z:
                merged.update({f"{int(f.name[:4])}.{k}": z[k] for k in z.files})
        write_npz_atomic(staging / SPECTRA_FILE, merged)
    source.save_tokenizer(staging / TOKENIZER_DIR)
    clock.lap("checkpoint")
    other = param_count(outer) + sum(param_count({k: v for k, v in b.items() if k not in PROJECTIONS}) for b in blocks)
    other += sum(int(np.size(b[n]["bias"])) for b in blocks for n in PROJECTIONS if "bias" in b[n])
    return build_report(
        spec, plan, cfg, alloc, results, refined, budget, leaves,
        counts={"model_dense": dense_count + param_count(outer), "other": other},
        calibration={"source": spec.calib, "nsamples": spec.nsamples, "seq_len": spec.seq_len, "seed": spec.seed,
                     "tokens": int(windows.size), "sha1": hashlib.sha1(windows.tobytes()).hexdigest()},
        resumed=False, timings=clock.timings, seconds=time.perf_counter() - clock.start,
    )


def _block_loop(spec: RunSpec, plan: Plan, ctx: ModelContext, alloc: Allocation, source, staging: Path,
                clock: _Clock) -> tuple[list, list[BlockResult], int]:
    """Stage (1): every block factored at its ranks (or resumed from `staging`); returns the blocks, results and dense count."""
    import jax
    from tqdm.auto import tqdm

    from sigmascale_jax.io.checkpoint import load_pytree, save_pytree
    from sigmascale_jax.model.modeling import param_count
    from sigmascale_jax.io.hf_map import load_block
    from sigmascale_jax.compress.stats import block_stats

    cfg, factorizer = ctx.cfg, plan.factorize
    xs = ctx.outer["embed"][ctx.windows]  # [N, L, D]
    xs_ref = xs if factorizer.needs_dense_stream and spec.sequential else None
    blocks, results, dense_count = [], [], 0
    bar = tqdm(range(cfg.num_layers), desc=f"{factorizer.name} r={spec.ratio}", unit="block", disable=not ctx.progress)
    for i in bar:
        ckpt, info_file = staging / "blocks" / f"{i:04d}", staging / "blocks" / f"{i:04d}.json"
        dense = load_block(source.reader, cfg, i)
        dense_count += param_count(dense)
        clock.lap("load")
        if info_file.is_file():  # finished before an interruption
            result = _resumed_block(ckpt, info_file, i, staging)
            xs = apply_in_chunks(result.params if spec.sequential else dense, xs, cfg, spec.batch_size, ctx.mesh)
            if xs_ref is not None:
                xs_ref = apply_in_chunks(dense, xs_ref, cfg, spec.batch_size, ctx.mesh)
            clock.lap("propagate")
        else:
            # --sequential propagates the factored block instead: the dense outputs only if the factorizer reads them
            want_out = not spec.sequential or factorizer.needs_outputs
            dense_out, stats = block_stats(dense, xs, cfg, spec.batch_size, ctx.mesh, outputs=want_out)
            ref_stats = None
            if xs_ref is not None:
                xs_ref, ref_stats = block_stats(dense, xs_ref, cfg, spec.batch_size, ctx.mesh)
            clock.lap("stats")
            inputs = BlockInputs(dense, stats, xs, dense_out, cfg, spec.batch_size, ref_stats, ctx.mesh)
            key = jax.random.fold_in(jax.random.key(spec.seed), i)
            result = factorizer.factor(inputs, alloc.ranks[i], key)
            clock.lap("factorize")
            save_pytree(ckpt, result.params)
            if result.spectra:
                write_npz_atomic(staging / "blocks" / f"{i:04d}.spectra.npz", result.spectra)
            write_json_atomic(info_file, {"matrices": result.matrices, "block": result.block})  # last: marks it done
            clock.lap("checkpoint")
            xs = apply_in_chunks(result.params, xs, cfg, spec.batch_size, ctx.mesh) if spec.sequential else dense_out
            clock.lap("propagate")
        blocks.append(jax.device_get(result.params))
        results.append(result)
        bar.set_postfix(factorizer.progress(result))
        if not np.isfinite(xs).all():
            raise FloatingPointError(f"non-finite activations after block {i}")
    return blocks, results, dense_count


def _resumed_block(ckpt: Path, info_file: Path, i: int, staging: Path) -> BlockResult:
    from sigmascale_jax.io.checkpoint import load_pytree

    try:
        saved = json.loads(info_file.read_text())
        return BlockResult(load_pytree(ckpt), saved["matrices"], saved["block"])
    except (UserError, OSError, ValueError, KeyError) as e:
        raise UserError(f"block {i}'s checkpoint in {staging} cannot be read ({' '.join(str(e).split())[:150]}); "
                        "pass --overwrite to start over") from None


def _finalize(staging: Path, out: Path, report: dict) -> dict:
    """Write the report and put the finished folder at `out` (an old `out` is set aside first, then removed)."""
    from sigmascale_jax.io.checkpoint import REPORT_FILE

    write_json_atomic(staging / REPORT_FILE, report)
    shutil.rmtree(staging / "blocks")
    old = out.with_name(f".{out.name}.replaced")
    if out.exists():
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
    for f in ("spec.json", RANKS_FILE):
        (staging / f).unlink(missing_ok=True)
    staging.rename(out)
    if old.exists():
        shutil.rmtree(old)
    return report
