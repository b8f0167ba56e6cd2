"""A memory plan before the work: device and host bytes of each stage, from the model's config alone.

No weight is read. Device figures are XLA's own memory analysis of each stage's compiled
function (`jax.jit(f).lower(abstract args).compile().memory_analysis()`: arguments +
outputs + temporaries − aliased) on abstract arrays (`jax.ShapeDtypeStruct`), plus what
the stage keeps on the device beside it (a block's calibration windows and outputs, see
`parallel.device_chunks`). Host figures are arithmetic: the calibration activations, one
dense block, the outer params, the block's statistics in float64, and the blocks already factored (plain
float32 factors), which wait on the host until the model is written. Ranks are the uniform
ones at the run's ratio (a rank allocator moves rank between matrices, not the totals).

    python -m sigmascale_jax.compress --model CONFIG_OR_MODEL --method sigmascale --ratio 0.2 \
        --plan-only --device-memory 80GB
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from sigmascale_jax.compress.plan import Plan, RunSpec
from sigmascale_jax.errors import UserError
from sigmascale_jax.model.config import ModelConfig
from sigmascale_jax.model.modeling import PROJECTION_INPUT, PROJECTIONS, _block_jit

GiB = 2**30
EVAL_STAGE = "evaluate (eval command)"
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
          "gib": 2**30, "tib": 2**40, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_bytes(text: str) -> int:
    """`"80GB"` → 80·10⁹, `"80GiB"` → 80·2³⁰, `"1e9"` → 10⁹; a UserError naming the flag otherwise."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise UserError(f"--device-memory takes a size such as 80GB or 16GiB, got {text!r}")
    size = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not 0 < size < 2**63:
        raise UserError(f"--device-memory takes a size above 0 and below 8 EiB, got {text!r}")
    return int(size)


@dataclasses.dataclass
class StagePlan:
    name: str
    device: int | None  # peak bytes on one device while the stage runs (None: not estimated)
    host: int | None  # bytes the stage holds on the host
    detail: str = ""


def _abstract(tensors: dict, dtype=jnp.float32) -> dict:
    """`{path: (name, shape)}` (hf_map's tensor tables) as a pytree of `ShapeDtypeStruct`."""
    tree: dict[str, Any] = {}
    for path, (_, shape) in tensors.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jax.ShapeDtypeStruct(tuple(shape), dtype)
    return tree


def abstract_block(cfg: ModelConfig) -> dict:
    from sigmascale_jax.io.hf_map import block_tensors

    return _abstract(block_tensors(cfg, 0))


def abstract_outer(cfg: ModelConfig) -> dict:
    """The embedding, final norm and LM head as abstract arrays."""
    from sigmascale_jax.io.hf_map import outer_tensors

    return _abstract(outer_tensors(cfg))


def abstract_params(cfg: ModelConfig) -> dict:
    from sigmascale_jax.io.hf_map import outer_tensors

    block = abstract_block(cfg)
    return {**_abstract(outer_tensors(cfg)), "blocks": [block] * cfg.num_layers}


def abstract_factored_params(cfg: ModelConfig, ratio: float | None) -> dict:
    """The compressed model's params as abstract arrays: every projection factored `{"b": [m, k], "c": [k, n]}` at
    the uniform ranks of `ratio` (dense `{"w"}` where a matrix is kept so), embeddings, norms and head as they are."""
    from sigmascale_jax.compress.ranks import block_ranks

    dense = abstract_params(cfg)
    ranks = block_ranks(cfg, ratio) if ratio else {}
    block = dict(dense["blocks"][0])
    for p, (m, n) in cfg.projection_shapes().items():
        k = ranks.get(p)
        if k is not None:
            block[p] = {"b": jax.ShapeDtypeStruct((m, k), jnp.float32), "c": jax.ShapeDtypeStruct((k, n), jnp.float32)}
    return {**dense, "blocks": [block] * cfg.num_layers}


def nbytes(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def compiled_peak(fn: Callable, *args, **kwargs) -> int:
    """Bytes XLA's memory analysis gives `fn(*args, **kwargs)` compiled for these abstract args (float64 ones
    inside `linalg.precision.factor_precision`)."""
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn, static_argnames=tuple(kwargs))  # keeps its donations
    stats = jitted.lower(*args, **kwargs).compile().memory_analysis()
    if stats is None:  # a backend without the analysis: count what goes in and out at least
        return nbytes(args) + nbytes(jax.eval_shape(lambda *a: fn(*a, **kwargs), *args))
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
               - stats.alias_size_in_bytes)


def group_memory(cfg: ModelConfig, spec: RunSpec, ranks: dict, group_fn: Callable, extra: int, **static) -> int:
    """Device bytes of the largest same-shape group of a per-matrix factorizer: `group_fn(w [G, m, n], gram
    [G, n, n], *([G, n, n] or [G, n]) * extra, ranks [G] int32, **static)` compiled in the run's precision (ranks
    are data: the figure holds for any ranks)."""
    from sigmascale_jax.compress.factorize._blocks import low_rank_groups
    from sigmascale_jax.linalg.precision import factor_precision

    shapes = cfg.projection_shapes()
    peaks = [0]
    with factor_precision(spec.precision) as dtype:
        for (m, n), names in low_rank_groups({p: {"w": _Shape(shapes[p])} for p in PROJECTIONS}, ranks).items():
            g = len(names)
            args = [jax.ShapeDtypeStruct((g, m, n), dtype), *[jax.ShapeDtypeStruct((g, n, n), dtype)] * (1 + extra),
                    jax.ShapeDtypeStruct((g,), jnp.int32)]
            peaks.append(compiled_peak(group_fn, *args, **static))
    return max(peaks)


class _Shape:
    """Stands in for an array where only `.shape` is read (`low_rank_groups` reads nothing else)."""

    def __init__(self, shape):
        self.shape = tuple(shape)


def memory_plan(cfg: ModelConfig, spec: RunSpec, plan: Plan) -> list[StagePlan]:
    """The stages `spec` and `plan` run, each with its device peak and host bytes (see the module's docstring)."""
    from sigmascale_jax.compress.ranks import block_ranks, factored_params
    from sigmascale_jax.compress.stats import block_stats_chunk
    from sigmascale_jax.linalg.precision import resolve_precision

    n, t, d = spec.nsamples, spec.seq_len, cfg.hidden_size
    b = min(spec.batch_size, n)
    f32 = 4
    acts = n * t * d * f32  # one copy of the calibration activations
    block = abstract_block(cfg)
    block_bytes = nbytes(block)
    outer_bytes = nbytes(abstract_params(cfg)) - cfg.num_layers * block_bytes
    taps = {PROJECTION_INPUT[p]: cfg.projection_shapes()[p][1] for p in PROJECTIONS}
    stats_host = sum(k * k * 8 + k * 8 for k in taps.values())  # float64 Gram and |x| mean per tap
    streams = 2 if plan.factorize.needs_dense_stream and spec.sequential else 1
    ranks = block_ranks(cfg, spec.ratio) if spec.ratio else {n: None for n in cfg.projection_shapes()}
    # the blocks already done wait on the host, factored, until the model is written
    done = sum((m * n if ranks[p] is None else factored_params(m, n, ranks[p])) - m * n
               for p, (m, n) in cfg.projection_shapes().items()) * f32 + block_bytes
    host_base = outer_bytes + block_bytes + acts * streams + (cfg.num_layers - 1) * done
    x = jax.ShapeDtypeStruct((b, t, d), jnp.float32)
    stages = []

    peak = compiled_peak(block_stats_chunk, block, x, cfg=cfg, outputs=True)
    stages.append(StagePlan("statistics", peak + 2 * acts, host_base + acts + stats_host,
                            f"chunk of {b} windows: {peak / GiB:.2f} GiB compiled; all {n} windows in and out on the "
                            "device"))
    peak = compiled_peak(_block_jit, block, x, cfg=cfg)
    stages.append(StagePlan("propagate", peak + 2 * acts, host_base + acts, "the block applied to every window"))

    if plan.allocate.costly:  # whole-model passes (ZS-SVD, FermiGrad, ...), not the cheap uniform ranks
        name = f"allocate ({plan.allocate.name})"
        if plan.allocate.memory:
            device, host, detail = plan.allocate.memory(cfg, spec)
            stages.append(StagePlan(name, device, host, detail))
        else:
            stages.append(StagePlan(name, None, None, "not estimated yet (whole-model passes; the factorize stage "
                                    "below assumes uniform ranks)"))
    fz = plan.factorize
    device, detail = fz.memory(cfg, spec, ranks) if fz.memory else (None, "not estimated for this method")
    stages.append(StagePlan(f"factorize ({fz.name})", device, host_base + 2 * acts + stats_host, detail))
    if plan.encoder().needs_gram:
        # GPTQ's widest input: the damped Gram, its Cholesky factor, that factor's inverse, H⁻¹ and U in the factor
        # precision, then U and the matrix (and its running copy) in float32 for the column loop
        cols = max(c for _, c in cfg.projection_shapes().values())
        rows = max(r for r, c in cfg.projection_shapes().values() if c == cols)
        wide = 8 if resolve_precision(spec.precision) == "float64" else 4
        stages.append(StagePlan("encode (gptq)", 5 * cols * cols * wide + cols * cols * f32 + 3 * rows * cols * f32,
                                host_base + stats_host, f"the widest matrix, {rows}x{cols}, and its Gram's inverse "
                                "factor"))
    for refiner in plan.refine:
        if refiner.memory:
            device, detail = refiner.memory(cfg, spec)
            stages.append(StagePlan(refiner.name, device, outer_bytes + cfg.num_layers * block_bytes, detail))

    # Evaluation holds the whole model; its blocks run one after the other, so beside the weights it needs one
    # block's working memory (compiled) and the head's logits with their log-softmax ([L, V] float32, twice).
    length = min(2048, cfg.max_position_embeddings)
    work = compiled_peak(_block_jit, block, jax.ShapeDtypeStruct((1, length, d), jnp.float32), cfg=cfg) - block_bytes
    whole = outer_bytes + cfg.num_layers * block_bytes
    stages.append(StagePlan(EVAL_STAGE, whole + work + 2 * length * cfg.vocab_size * f32, whole,
                            f"python -m sigmascale_jax.eval afterwards: the whole model, one window of {length} "
                            "tokens"))
    return stages


def plan_table(stages: list[StagePlan], device_memory: int | None) -> str:
    """The plan as the text `--plan-only` prints: one line a stage, and whether it fits `device_memory`."""
    lines = [f"{'stage':<34} {'device GiB':>10} {'host GiB':>9}" + ("  fits" if device_memory else "")]
    for s in stages:
        if s.device is None:
            lines.append(f"{s.name:<34} {'-':>10} {'-':>9}{'     ' if device_memory else ''}  {s.detail}")
            continue
        fits = ("  yes" if s.device <= device_memory else "  NO") if device_memory else ""
        lines.append(f"{s.name:<34} {s.device / GiB:>10.2f} {s.host / GiB:>9.2f}{fits}  {s.detail}")
    run = [s for s in stages if s.name != EVAL_STAGE and s.device is not None]
    peak = max(run, key=lambda s: s.device)
    lines.append(f"compression peak: {peak.device / GiB:.2f} GiB of device memory ({peak.name}), "
                 f"{max(s.host for s in run) / GiB:.2f} GiB of host memory"
                 + (f"; {'fits' if peak.device <= device_memory else 'does NOT fit'} a device of "
                    f"{device_memory / GiB:.1f} GiB" if device_memory else ""))
    return "\n".join(lines)


def compression_peak(stages: list[StagePlan]) -> StagePlan:
    """The compression stage with the largest device peak (the eval command's stage aside)."""
    return max((s for s in stages if s.name != EVAL_STAGE and s.device is not None), key=lambda s: s.device)
