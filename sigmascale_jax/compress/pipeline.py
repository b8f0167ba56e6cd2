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

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from sigmascale_jax.compress.plan import (Allocation, BlockInputs, BlockResult, Budget, ModelContext, Plan, RunSpec,
                                          widest_ranks)
from sigmascale_jax.errors import UserError
from sigmascale_jax.io.fileio import write_json_atomic, write_npz_atomic
from sigmascale_jax.io.outputs import Input, check_out, model_input, out_lock, replace_folder, writing_folder
from sigmascale_jax.linalg.precision import precision_key, resolve_precision
from sigmascale_jax.model.modeling import PROJECTIONS

REFIT_SALT = 1 << 20  # a per-block refit's PRNG key: fold_in(the block's key, REFIT_SALT), apart from the factorizer's

PARTIAL_SUFFIX = ".partial"
RANKS_FILE = "ranks.json"


def run_inputs(spec: RunSpec, data_dir: str | None, plan: Plan | None = None) -> list[Input]:
    """What a compression reads, which its `--out` must not replace: the model, the calibration file or data folder,
    and every path a stage's settings name (`Plan.inputs`: the healing text, the run whose ranks are reused)."""
    from sigmascale_jax.compress.calibration import CALIB_SOURCES
    from sigmascale_jax.io.data import find_data_dir

    inputs = model_input(spec.model, "the model being compressed")
    if spec.calib in CALIB_SOURCES or any(s in CALIB_SOURCES for s, _ in (plan.inputs() if plan else [])):
        inputs.append(Input(find_data_dir(data_dir), "the data folder"))
    if spec.calib not in CALIB_SOURCES:
        inputs.append(Input(spec.calib, "the calibration file", whole=False))
    for path, role in plan.inputs() if plan else []:
        if path not in CALIB_SOURCES:
            inputs.append(Input(path, role, whole=Path(path).is_dir()))
    return inputs


def run_key(spec: RunSpec) -> dict:
    """`spec` as resume and cache keys hold it: the precision only where it is not float64 (`precision_key`)."""
    key = {k: v for k, v in spec.asdict().items() if k != "precision"}
    return {**key, **precision_key(spec.precision)}


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


def run_windows(source, spec: RunSpec, data_dir: str | None) -> np.ndarray:
    """The calibration windows `spec` asks for (`calibration.calibration_windows`)."""
    from sigmascale_jax.compress.calibration import calibration_windows

    return calibration_windows(source, spec.calib, spec.nsamples, spec.seq_len, spec.seed, data_dir=data_dir)


def apply_in_chunks(block, xs: np.ndarray, cfg, batch_size: int, mesh=None) -> np.ndarray:
    """The block applied to `xs: [N, T, D]`, `batch_size` windows a call (split over the mesh's data axis); the
    loop moves nothing between host and device (`stats.block_stats` says how). Factored projections run as their
    dense product (`modeling.densified`), so every block of a shape runs one compiled program whatever its ranks."""
    import jax

    from sigmascale_jax.model.modeling import block_apply, densified
    from sigmascale_jax.parallel import device_chunks, fetch, on_device

    block, chunks = on_device(densified(block), mesh), device_chunks(xs, batch_size, mesh)
    with jax.transfer_guard("disallow"):
        outs = [block_apply(block, chunk, cfg) for chunk in chunks]
    return np.concatenate(fetch(outs))


def check_ranks(ranks: Any, cfg) -> list[dict[str, int | None]]:
    """An allocator's (or a resumed file's) ranks, checked against the model's shapes."""
    shapes = cfg.projection_shapes()
    if not isinstance(ranks, list) or len(ranks) != cfg.num_layers:
        raise ValueError(f"ranks must list {cfg.num_layers} blocks")
    for i, block in enumerate(ranks):
        for n in PROJECTIONS:
            k = block.get(n, "missing")
            if k is not None and not (type(k) is int and 1 <= k <= min(shapes[n])):  # a bool is no rank
                raise ValueError(f"block {i} {n}: rank {k!r} outside 1..{min(shapes[n])}")
    return [{n: block[n] for n in PROJECTIONS} for block in ranks]


def _allocation(plan: Plan, ctx: ModelContext, budget: Budget, staging: Path | None) -> Allocation:
    """The allocator's result, from `ranks.json` when resuming (ZS-SVD's passes are not repeated).

    Without a staging folder (in memory) nothing is read or written here; the disk cache skips weights without a
    `model_key` (`diskcache.cached`)."""
    path = None if staging is None else staging / RANKS_FILE
    if budget.ratio == 0:  # quantization alone: nothing to allocate
        return Allocation([{n: None for n in PROJECTIONS} for _ in range(ctx.cfg.num_layers)], {"dense": True})
    if path is not None and path.is_file():
        saved = json.loads(path.read_text())
        return Allocation(check_ranks(saved["ranks"], ctx.cfg), saved["info"])
    if not plan.allocate.costly:
        alloc = plan.allocate.allocate(ctx, budget)
        return Allocation(check_ranks(alloc.ranks, ctx.cfg), alloc.info)
    from sigmascale_jax.io.diskcache import cached

    # Costly allocations are also kept in the disk cache: the same ranks serve every factorizer.
    key = {"model": ctx.model_key, "calib_sha1": ctx.calib_sha1, "allocate": plan.key()["allocate"],
           "count": budget.count.__name__,
           "run": {k: v for k, v in run_key(ctx.spec).items() if k not in ("model", "sequential")}}

    def compute() -> dict:
        alloc = plan.allocate.allocate(ctx, budget)
        return {"ranks": alloc.ranks, "info": alloc.info}

    value, hit = cached("allocations", key, compute)
    alloc = Allocation(check_ranks(value["ranks"], ctx.cfg), {**value["info"], "from_cache": hit})
    if path is not None:
        write_json_atomic(path, {"ranks": alloc.ranks, "info": alloc.info})
    return alloc


class _Clock:
    """Seconds per stage (compression.json's `timings_s`) and, with `stage_memory` where the OS says (Linux), each
    stage's resident peak (`memory.stage_rss_peak_mib`): on a CPU backend the device's arrays live there too, so
    this is what `--plan-only`'s figures are checked against without a device (`scripts/bench_memory_plan.py`).
    Measuring resets the process's peak-RSS mark at every stage, so only a run that writes a folder does it, not
    `compress_params` inside a user's process."""

    def __init__(self, stage_memory: bool = False) -> None:
        from sigmascale_jax.compress.report import CompileCounter, resident_bytes, resident_high_water

        self.start = self.last = time.perf_counter()
        self.timings: dict[str, float] = {}
        self.compiler = CompileCounter()
        self.mark = self.compiler.snapshot()
        self.compiles: dict[str, dict] = {}
        self.stage_memory = stage_memory
        self.start_rss = resident_bytes() if stage_memory else None
        self.peaks: dict[str, int] = {}
        if stage_memory:
            resident_high_water(reset=True)

    def compile_record(self) -> dict:
        """compression.json's `compile`: XLA compiles and their seconds per stage, and in all; stops counting."""
        self.compiler.close()
        stages = {k: v for k, v in self.compiles.items() if v["compiles"]}
        return {"stages": stages, "compiles": sum(v["compiles"] for v in stages.values()),
                "compile_s": round(sum(v["compile_s"] for v in stages.values()), 3)}

    def lap(self, stage: str) -> float:
        """Close the stage running since the last lap; returns its seconds."""
        from sigmascale_jax.compress.report import resident_high_water

        now = time.perf_counter()
        elapsed = now - self.last
        self.timings[stage] = self.timings.get(stage, 0.0) + elapsed
        self.last = now
        count, secs = self.compiler.since(self.mark)
        self.mark = self.compiler.snapshot()
        done = self.compiles.setdefault(stage, {"compiles": 0, "compile_s": 0.0})
        done["compiles"] += count
        done["compile_s"] = round(done["compile_s"] + secs, 3)
        peak = resident_high_water(reset=True) if self.stage_memory else None
        if peak is not None:
            self.peaks[stage] = max(self.peaks.get(stage, 0), peak)
        return elapsed


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
    check_host_memory(spec, cfg)
    check_checkpoint(source.reader, cfg)  # names and shapes from the file headers; values are checked as they load
    return source


def check_host_memory(spec: RunSpec, cfg) -> None:
    """The calibration activations fit in this machine's memory: `--nsamples` and `--seq-len` are bounded by it
    before any work, not by an allocation failure after it (one `[N, T, D]` float32 copy is the least a run holds)."""
    from sigmascale_jax.compress.report import physical_memory

    need, have = spec.nsamples * spec.seq_len * cfg.hidden_size * 4, physical_memory()
    if have is not None and need > have:
        raise UserError(f"--nsamples {spec.nsamples} x --seq-len {spec.seq_len} calibration activations need at least "
                        f"{need / 2**30:.1f} GiB of host memory ([N, T, {cfg.hidden_size}] float32), more than this "
                        f"machine's {have / 2**30:.1f} GiB; lower --nsamples or --seq-len")


def run(spec: RunSpec, plan: Plan, out: str | Path, *, data_dir: str | None = None, overwrite: bool = False,
        progress: bool = True, inputs: list[Input] = ()) -> dict[str, Any]:
    """Compress `spec.model` with `plan` into the folder `out`; returns the report (compression.json).

    Everything that can be checked without the work (settings, model files and shapes,
    calibration text, `--out`) is checked before `OUT.partial/` is created; a run that
    fails before finishing anything removes it again.
    """
    from sigmascale_jax.parallel import barrier, is_main_process

    out = Path(out)
    inputs = [*run_inputs(spec, data_dir, plan), *inputs]  # `inputs`: what the caller read too (the --config file)
    check_out(out, overwrite, inputs)
    clock = _Clock(stage_memory=True)
    source = open_checked(spec, plan)
    windows = run_windows(source, spec, data_dir)
    if not is_main_process():
        return _run_worker(spec, plan, source, windows, out, clock, data_dir)
    with out_lock(out):
        check_out(out, overwrite, inputs)  # another run may have finished it meanwhile
        spec_key = {**run_key(spec), **plan.key(), "calib_sha1": hashlib.sha1(windows.tobytes()).hexdigest()}
        staging, resuming = prepare_out(out, spec_key, overwrite)
        try:
            (staging / "blocks").mkdir(parents=True, exist_ok=True)
            write_json_atomic(staging / "spec.json", spec_key)
            barrier("sigmascale-staging-ready")  # the other processes copy what there is to resume ...
            barrier("sigmascale-staging-copied")  # ... before anything new is written
            clock.lap("calibration")
            report = _compress(spec, plan, source, windows, staging, clock, progress, data_dir)
            report["resumed"] = resuming
        except BaseException:
            if staging.exists() and not _finished_work(staging):
                shutil.rmtree(staging, ignore_errors=True)
            raise
        return _finalize(staging, out, report)


def _run_worker(spec: RunSpec, plan: Plan, source, windows: np.ndarray, out: Path, clock: _Clock,
                data_dir: str | None) -> dict[str, Any]:
    """A process other than 0 of a multi-process run: the same stages and collectives as process 0, from a copy of
    its staging folder (so it resumes exactly where process 0 does), written only to a scratch folder that is
    removed after. Process 0 alone writes `out`. Every process needs `out`'s folder (a shared file system)."""
    import tempfile

    from sigmascale_jax.parallel import barrier

    barrier("sigmascale-staging-ready")
    with tempfile.TemporaryDirectory(prefix="sigmascale-worker-") as tmp:
        staging = Path(tmp) / "staging"
        shutil.copytree(out.with_name(out.name + PARTIAL_SUFFIX), staging)
        barrier("sigmascale-staging-copied")
        clock.lap("calibration")
        return _compress(spec, plan, source, windows, staging, clock, False, data_dir)


def fresh_windows_of(source, spec: RunSpec, data_dir: str | None):
    """`ModelContext.fresh_windows` for a model read from `source`: windows of a calibration text that overlap
    none of the run's calibration windows where the text has room."""
    from sigmascale_jax.compress.calibration import calibration_ids, fresh_windows, window_starts

    def fresh(calib: str | None, n: int, seq_len: int) -> tuple[np.ndarray, dict]:
        calib = calib or spec.calib
        ids = calibration_ids(source, calib, data_dir)
        taken = []
        if calib == spec.calib:  # the same text: keep clear of the windows that chose ranks and factors
            taken = [(int(s), spec.seq_len) for s in window_starts(len(ids), spec.nsamples, spec.seq_len, spec.seed)]
        windows, disjoint = fresh_windows(ids, taken, n, seq_len, spec.seed)
        return windows, {"calib": calib, "windows": n, "seq_len": seq_len, "disjoint_from_calibration": disjoint,
                         "sha1": hashlib.sha1(windows.tobytes()).hexdigest()}

    return fresh


def _compress(spec: RunSpec, plan: Plan, source, windows: np.ndarray, staging: Path, clock: _Clock,
              progress: bool, data_dir: str | None = None) -> dict[str, Any]:
    """Stages (0)-(3) of a model read from `source` into `staging`; returns the report."""
    import jax

    from sigmascale_jax.io.checkpoint import PARAMS_DIR, SPECTRA_FILE, TOKENIZER_DIR, save_pytree
    from sigmascale_jax.io.diskcache import model_fingerprint
    from sigmascale_jax.io.hf_map import load_block, load_outer
    from sigmascale_jax.parallel import make_mesh

    cfg = source.cfg
    # Host copies: only the block being worked on lives on the device.
    outer = jax.device_get(load_outer(source.reader, cfg))
    ctx = ModelContext(cfg, outer, lambda i: load_block(source.reader, cfg, i), windows, spec, progress,
                       # no disk cache across processes: one hitting it while another computes would deadlock
                       model_key=model_fingerprint(source) if jax.process_count() == 1 else None,
                       mesh=make_mesh(spec.mesh),
                       fresh_windows=fresh_windows_of(source, spec, data_dir))
    clock.lap("load")
    done = compress_stages(plan, ctx, clock, staging)
    from sigmascale_jax.compress.encode.quant import store_rules

    save_pytree(staging / PARAMS_DIR, stored_params(done.params, store_rules(plan.encoder())[1]))
    block_spectra = sorted((staging / "blocks").glob("*.spectra.npz"))
    if block_spectra:  # SigmaScale: singular values of W, W S and the scaled matrix, per block and projection
        merged = {}
        for f in block_spectra:
            with np.load(f) as z:
                merged.update({f"{int(f.name[:4])}.{k}": z[k] for k in z.files})
        write_npz_atomic(staging / SPECTRA_FILE, merged)
    source.save_tokenizer(staging / TOKENIZER_DIR)
    clock.lap("checkpoint")
    return stages_report(spec, plan, cfg, done, windows, clock)


class Stages(NamedTuple):
    """What the stages produce: typed params and what the report says of them."""

    params: dict  # the outer params and blocks with every projection its encoder's typed leaf
    alloc: Allocation
    results: list[BlockResult]
    refined: list[dict]
    budget: Budget
    counts: dict  # model_dense (all parameters), other (outside the projections' matrices) and other_bytes (as stored)


def compress_stages(plan: Plan, ctx: ModelContext, clock: _Clock, staging: Path | None = None) -> Stages:
    """Allocate, factor block by block, refine, encode. With `staging`, the allocation and each finished block are
    checkpointed there (and resumed from it); without, everything stays in memory."""
    import dataclasses

    import jax

    from sigmascale_jax.compress.encode.quant import store_outer, store_rules
    from sigmascale_jax.model.leaves import is_leaf
    from sigmascale_jax.model.modeling import param_count

    ctx = dataclasses.replace(ctx, staging=staging)
    encoder = plan.encoder()
    budget = Budget(ctx.spec.ratio, encoder.count)
    alloc = _allocation(plan, ctx, budget, staging)
    clock.lap("allocate")
    blocks, results, dense_count = _block_loop(plan, ctx, alloc, staging, clock)
    refined = []
    for refiner in plan.refine:
        if refiner.refine is None:  # per block only: it ran inside the block loop
            refined.append({"name": refiner.name, **refiner.settings.asdict(),
                            **(refiner.summary(results) if refiner.summary else {})})
            continue
        blocks, info = refiner.refine(ctx, blocks, alloc.ranks)
        blocks = [jax.device_get(b) for b in blocks]
        refined.append({"name": refiner.name, **refiner.settings.asdict(), **info})
        clock.lap("refine")
    # (3) how to store what is left: every projection becomes its encoder's typed leaf, fetched block by block
    # (encoders compute on the device; the whole model there at once would not fit where it matters)
    typed = [jax.device_get({**block, **{n: block[n] if is_leaf(block[n]) else encoder.encode(block[n],
                                                                                            results[i].matrices[n])
                                         for n in PROJECTIONS}})
             for i, block in enumerate(blocks)]
    outer = ctx.outer
    other = param_count(outer) + sum(param_count({k: v for k, v in b.items() if k not in PROJECTIONS}) for b in blocks)
    biases = [b[n].bias if is_leaf(b[n]) else b[n].get("bias") for b in blocks for n in PROJECTIONS]
    other += sum(int(np.size(bias)) for bias in biases if bias is not None)
    store = store_rules(encoder)
    params = store_outer({**outer, "blocks": typed}, *store)
    clock.lap("encode")
    return Stages(params, alloc, results, refined, budget,
                  {"model_dense": dense_count + param_count(outer), "other": other,
                   "other_bytes": other_bytes(params, store[1])})


def other_bytes(params: dict, store_dtype: str) -> int:
    """Bytes of everything but the projections' matrices (embeddings, head, norms, biases), as stored."""
    from sigmascale_jax.model.leaves import stored_bytes

    blocks = params["blocks"]
    rest = [{k: v for k, v in b.items() if k not in PROJECTIONS} for b in blocks]
    biases = [b[n].bias for b in blocks for n in PROJECTIONS if b[n].bias is not None]
    return stored_bytes([{k: v for k, v in params.items() if k != "blocks"}, rest, biases], store_dtype)


def stored_params(params: dict, store_dtype: str = "float32") -> dict:
    """Typed params as saved (Orbax): float tensors as `store_dtype`, every projection as its leaf's plain dict and
    a quantized embedding table as its matrix's."""
    from sigmascale_jax.model.leaves import matrix_tree, storage_cast

    params = storage_cast(params, store_dtype)
    outer = {k: matrix_tree(v) for k, v in params.items() if k != "blocks"}
    return {**outer, "blocks": [stored_block(b) for b in params["blocks"]]}


def stages_report(spec: RunSpec, plan: Plan, cfg, done: Stages, windows: np.ndarray, clock: _Clock) -> dict[str, Any]:
    from sigmascale_jax.compress.report import build_report

    leaves = [{n: b[n] for n in PROJECTIONS} for b in done.params["blocks"]]
    return build_report(
        spec, plan, cfg, done.alloc, done.results, done.refined, done.budget, leaves, counts=done.counts,
        calibration={"source": spec.calib, "nsamples": spec.nsamples, "seq_len": spec.seq_len, "seed": spec.seed,
                     "tokens": int(windows.size), "sha1": hashlib.sha1(windows.tobytes()).hexdigest()},
        resumed=False, timings=clock.timings, seconds=time.perf_counter() - clock.start, stage_peaks=clock.peaks,
        start_rss=clock.start_rss, compiles=clock.compile_record(),
    )


def _block_loop(plan: Plan, ctx: ModelContext, alloc: Allocation, staging: Path | None,
                clock: _Clock) -> tuple[list, list[BlockResult], int]:
    """Stage (1): every block factored at its ranks (or resumed from `staging`); returns the blocks, results and dense count."""
    import jax
    from tqdm.auto import tqdm

    from sigmascale_jax.compress.stats import block_stats
    from sigmascale_jax.io.checkpoint import save_pytree
    from sigmascale_jax.model.modeling import param_count

    cfg, factorizer, spec, encoder = ctx.cfg, plan.factorize, ctx.spec, plan.encoder()
    refits = [r for r in plan.refine if r.block is not None]  # per block, right after the factorizer
    widths = widest_ranks(alloc.ranks) if refits else {}
    xs = ctx.outer["embed"][ctx.windows]  # [N, L, D]
    # the dense model's stream beside the compressed one: SVD-LLM's update reads its Grams, a refit its outputs
    xs_ref = xs if (factorizer.needs_dense_stream or refits) and spec.sequential else None
    blocks, results, dense_count = [], [], 0
    bar = tqdm(range(cfg.num_layers), desc=f"{factorizer.name} r={spec.ratio}", unit="block", disable=not ctx.progress)
    for i in bar:
        ckpt = None if staging is None else staging / "blocks" / f"{i:04d}"  # + .json (written last), .spectra.npz
        dense = ctx.load_block(i)
        dense_count += param_count(dense)
        clock.lap("load")
        if ckpt is not None and ckpt.with_suffix(".json").is_file():  # finished before an interruption
            result = _resumed_block(ckpt, ckpt.with_suffix(".json"), i, staging, encoder)
            xs = apply_in_chunks(result.params if spec.sequential else dense, xs, cfg, spec.batch_size, ctx.mesh)
            if xs_ref is not None:
                xs_ref = apply_in_chunks(dense, xs_ref, cfg, spec.batch_size, ctx.mesh)
            clock.lap("propagate")
        else:
            # --sequential propagates the factored block instead: the dense outputs only if the factorizer reads them
            want_out = not spec.sequential or factorizer.needs_outputs  # (a refit's anchor without --sequential)
            if factorizer.needs_stats or encoder.needs_gram:
                dense_out, stats = block_stats(dense, xs, cfg, spec.batch_size, ctx.mesh, outputs=want_out)
            else:  # nothing reads the Grams (quantization alone, rounded to nearest)
                stats = {}
                dense_out = apply_in_chunks(dense, xs, cfg, spec.batch_size, ctx.mesh) if want_out else None
            ref_stats = None
            if xs_ref is not None:
                xs_ref, ref_stats = block_stats(dense, xs_ref, cfg, spec.batch_size, ctx.mesh)
            clock.lap("stats")
            # the refit's target: the dense block on the dense model's inputs (xs_ref is now its outputs)
            anchor = (xs_ref if xs_ref is not None else dense_out) if refits else None
            inputs = BlockInputs(dense, stats, xs, dense_out, cfg, spec.batch_size, ref_stats, ctx.mesh,
                                 resolve_precision(spec.precision), anchor)
            key = jax.random.fold_in(jax.random.key(spec.seed), i)
            result = factorizer.factor(inputs, alloc.ranks[i], key)
            factor_s = clock.lap("factorize")
            for refiner in refits:
                result = refiner.block(inputs, result, jax.random.fold_in(key, REFIT_SALT), widths)
                clock.lap("refit")
            if refits:  # the refit's seconds are in its record: the factorizer's beside them
                result = result._replace(block={**(result.block or {}), "factorize_s": round(factor_s, 3)})
            if encoder.needs_gram:  # GPTQ: stored now, from this block's Grams; the next block sees its rounding
                result = encode_block(encoder, result, stats, inputs.precision)
                clock.lap("encode")
            if ckpt is not None:
                save_pytree(ckpt, stored_block(result.params))
                if result.spectra:
                    write_npz_atomic(ckpt.with_suffix(".spectra.npz"), result.spectra)
                write_json_atomic(ckpt.with_suffix(".json"), {"matrices": result.matrices, "block": result.block})
                clock.lap("checkpoint")
            xs = apply_in_chunks(result.params, xs, cfg, spec.batch_size, ctx.mesh) if spec.sequential else dense_out
            clock.lap("propagate")
        blocks.append(jax.device_get(result.params))
        results.append(result._replace(params=blocks[-1]))  # the device copy goes: one block at a time there
        bar.set_postfix(factorizer.progress(result))
        if not np.isfinite(xs).all():
            raise FloatingPointError(f"non-finite activations after block {i}")
    return blocks, results, dense_count


def encode_block(encoder, result: BlockResult, stats: dict, precision: str) -> BlockResult:
    """A factored block with every projection its encoder's typed leaf, encoded from the Gram of its input
    (`stats`: `block_stats` of the block's inputs); what the encoder says of each joins its matrix's record."""
    import jax

    from sigmascale_jax.model.modeling import PROJECTION_INPUT

    params, matrices = dict(jax.device_get(result.params)), dict(result.matrices)
    for n in PROJECTIONS:
        params[n], info = encoder.encode_gram(params[n], matrices[n], stats[PROJECTION_INPUT[n]]["gram"], precision)
        matrices[n] = {**matrices[n], **info}
    return result._replace(params=params, matrices=matrices)


def stored_block(block: dict) -> dict:
    """A block as checkpointed: typed leaves (already encoded) as their saved dicts."""
    from sigmascale_jax.model.leaves import is_leaf

    return {k: v.to_tree() if is_leaf(v) else v for k, v in block.items()}


def _resumed_block(ckpt: Path, info_file: Path, i: int, staging: Path, encoder) -> BlockResult:
    from sigmascale_jax.io.checkpoint import load_pytree

    try:
        saved = json.loads(info_file.read_text())
        params = load_pytree(ckpt)
        if encoder.needs_gram:  # encoded in the loop: read back as the typed leaves it saved
            params = {**params, **{n: encoder.read(params[n], saved["matrices"][n]) for n in PROJECTIONS}}
        return BlockResult(params, saved["matrices"], saved["block"])
    except (UserError, OSError, ValueError, KeyError) as e:
        raise UserError(f"block {i}'s checkpoint in {staging} cannot be read ({' '.join(str(e).split())[:150]}); "
                        "pass --overwrite to start over") from None


def _finalize(staging: Path, out: Path, report: dict) -> dict:
    """Write the report and put the finished folder at `out` (an old `out` is set aside first, then removed)."""
    from sigmascale_jax.io.checkpoint import REPORT_FILE

    write_json_atomic(staging / REPORT_FILE, report)
    shutil.rmtree(staging / "blocks")
    for f in ("spec.json", RANKS_FILE):
        (staging / f).unlink(missing_ok=True)
    replace_folder(staging, out)
    return report


# ------------------------------------------------------------------ in memory: the library's face


def compress_params(params: dict, cfg, windows: Any, plan: Plan, ratio: float, *, mesh: Any = None,
                    progress: bool = False, seed: int = 0, sequential: bool = True,
                    batch_size: int = 8, precision: str | None = None) -> tuple[dict, dict[str, Any]]:
    """Compress a dense params pytree in memory: `(params, report)`, every projection its encoder's typed leaf.

    Args:
      params: dense params (`load_model(...)[1]`; projections `{"w": [out, in]}` or `Dense` leaves).
      cfg: its `ModelConfig`.
      windows: int `[N, T]` calibration tokens (`calibration_windows(...)`): the same windows give the
        same factors as `python -m sigmascale_jax.compress` on that model.
      plan: `make_plan(...)`; ratio: fraction of the projections' parameters removed, in (0, 1).
      mesh: a `jax.sharding.Mesh` with `data` and/or `model` axes (calibration windows split over data, weights
        over model), or a `parallel.Layout` for other axis names (None: one device).
      seed: SigmaScale's minibatches and FermiGrad's windows; sequential: feed block i+1 from the compressed
        block i; batch_size: windows per device call; precision: "float64" or "float32", what the factorizations
        run in (default: float32 on TPU, float64 elsewhere).
    Returns:
      the compressed params, on the host (numpy leaves; the device held one block at a time), and the report
      (`compression.json`'s content; its "model" is None until saved).
    Nothing is written to disk; costly allocations are not cached (the weights have no file to key them by).
    """
    import jax

    from sigmascale_jax.model.leaves import Dense, is_leaf

    from sigmascale_jax.io.hf_map import check_dense_params
    from sigmascale_jax.model.config import check_token_windows

    windows = check_token_windows(windows, cfg)
    for i, block in enumerate(params.get("blocks", ()) if isinstance(params, dict) else ()):
        for n in PROJECTIONS:
            if is_leaf(block.get(n)) and not isinstance(block[n], Dense):
                raise UserError(f"block {i} {n} is already compressed ({type(block[n]).__name__}); compress dense "
                                "params")
    check_dense_params(params, cfg)  # ranks and the report's ratios are computed from cfg's shapes: they must agree
    spec = RunSpec(model=None, ratio=ratio, calib="in-memory", nsamples=len(windows), seq_len=windows.shape[1],
                   seed=seed, sequential=sequential, batch_size=batch_size, precision=precision)
    plan.check(spec, cfg)

    def dense_block(i: int) -> dict:
        block = dict(params["blocks"][i])
        for n in PROJECTIONS:
            p = block[n]
            if isinstance(p, Dense):
                p = {"w": p.w} if p.bias is None else {"w": p.w, "bias": p.bias}
            block[n] = jax.device_get(p)
        return block

    clock = _Clock()
    outer = jax.device_get({k: v for k, v in params.items() if k != "blocks"})
    ctx = ModelContext(cfg, outer, dense_block, windows.astype(np.int32), spec, progress, model_key=None, mesh=mesh)
    done = compress_stages(plan, ctx, clock)
    return done.params, stages_report(spec, plan, cfg, done, windows.astype(np.int32), clock)


def save_compressed(params: dict, cfg, report: dict, out: str | Path, *, source: Any = None,
                    overwrite: bool = False) -> Path:
    """Write compressed params as a folder that `eval`, `generate`, `export` and `load_model` read.

    `report`: the one `compress_params` returned (it names each matrix's rank and encoding); `source`: the
    `ModelSource` the params came from (`load_model(...)[2]`), whose tokenizer the folder carries. Written
    under `OUT.partial` and renamed into place, holding the same lock as the compressor.
    """
    from sigmascale_jax.io.checkpoint import PARAMS_DIR, REPORT_FILE, TOKENIZER_DIR, report_store_dtype, save_pytree
    from sigmascale_jax.model.leaves import is_leaf

    if source is None or not hasattr(source, "save_tokenizer"):
        raise UserError("save_compressed needs source= (the third value load_model returns): the folder carries its "
                        "tokenizer")
    if report.get("model_config") != cfg.to_dict() or len(report.get("matrices", ())) != 7 * cfg.num_layers:
        raise UserError("report does not describe this model: pass the report compress_params returned with it")
    if not all(is_leaf(b[n]) for b in params["blocks"] for n in PROJECTIONS):
        raise UserError("params hold untyped projections: save what compress_params returned")
    out = Path(out)
    with writing_folder(out, overwrite, model_input(getattr(source, "src", None), "the model the params came from")) \
            as staging:
        save_pytree(staging / PARAMS_DIR, stored_params(params, report_store_dtype(report)))
        source.save_tokenizer(staging / TOKENIZER_DIR)
        write_json_atomic(staging / REPORT_FILE, {**report, "model": str(source.src)})
    return out
