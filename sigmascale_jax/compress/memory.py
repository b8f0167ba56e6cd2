"""A memory plan before the work: device and host bytes of each stage, from the model's config alone.

No weight is read. Device figures are XLA's own memory analysis of each stage's compiled
function (`jax.jit(f).lower(abstract args).compile().memory_analysis()`: arguments +
outputs + temporaries − aliased) on abstract arrays (`jax.ShapeDtypeStruct`), plus what
the stage keeps on the device beside it (a block's calibration windows and outputs, see
`parallel.device_chunks`). Host figures are arithmetic: the calibration activations, one
dense block, the outer params, the block's statistics in float64. Ranks are the uniform
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
from sigmascale_jax.model.modeling import PROJECTION_INPUT, PROJECTIONS

GiB = 2**30
EVAL_STAGE = "evaluate (eval command)"
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
          "gib": 2**30, "tib": 2**40, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_bytes(text: str) -> int:
    """`"80GB"` → 80·10⁹, `"80GiB"` → 80·2³⁰, `"1e9"` → 10⁹; a UserError naming the flag otherwise."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise UserError(f"--device-memory takes a size such as 80GB or 16GiB, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclasses.dataclass
class StagePlan:
    name: str
    device: int  # peak bytes on one device while the stage runs
    host: int  # bytes the stage holds on the host
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


def abstract_params(cfg: ModelConfig) -> dict:
    from sigmascale_jax.io.hf_map import outer_tensors

    block = abstract_block(cfg)
    return {**_abstract(outer_tensors(cfg)), "blocks": [block] * cfg.num_layers}


def nbytes(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def compiled_peak(fn: Callable, *args, x64: bool = False, **kwargs) -> int:
    """Bytes XLA's memory analysis gives `fn(*args, **kwargs)` compiled for these abstract args."""
    ctx = jax.enable_x64(True) if x64 else _null()
    with ctx:
        stats = jax.jit(fn, static_argnames=tuple(kwargs)).lower(*args, **kwargs).compile().memory_analysis()
    if stats is None:  # a backend without the analysis: count what goes in and out at least
        return nbytes(args) + nbytes(jax.eval_shape(lambda *a: fn(*a, **kwargs), *args))
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
               - stats.alias_size_in_bytes)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def memory_plan(cfg: ModelConfig, spec: RunSpec, plan: Plan) -> list[StagePlan]:
    """The stages `spec` and `plan` run, each with its device peak and host bytes (see the module's docstring)."""
    from sigmascale_jax.compress.ranks import block_ranks
    from sigmascale_jax.compress.stats import block_stats_chunk
    from sigmascale_jax.linalg.precision import resolve_precision
    from sigmascale_jax.model.modeling import _block_jit

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
    host_base = outer_bytes + block_bytes + acts * streams
    x = jax.ShapeDtypeStruct((b, t, d), jnp.float32)
    stages = []

    peak = compiled_peak(block_stats_chunk, block, x, cfg=cfg, outputs=True)
    stages.append(StagePlan("statistics", peak + 2 * acts, host_base + acts + stats_host,
                            f"chunk of {b} windows: {peak / GiB:.2f} GiB compiled; all {n} windows in and out on the "
                            "device"))
    peak = compiled_peak(_block_jit, block, x, cfg=cfg)
    stages.append(StagePlan("propagate", peak + 2 * acts, host_base + acts, "the block applied to every window"))

    ranks = block_ranks(cfg, spec.ratio)
    precision = resolve_precision(spec.precision)
    wide = 8 if precision == "float64" else 4
    fdtype = jnp.float64 if precision == "float64" else jnp.float32
    name = plan.factorize.name
    if name == "sigmascale" and plan.factorize.settings.loss != "paper":
        from sigmascale_jax.compress.factorize.sigmascale.block import holdout_windows, learn_block_scales

        s = plan.factorize.settings
        hold = holdout_windows(n, s.holdout)
        whitening = {p: jax.ShapeDtypeStruct((cfg.projection_shapes()[p][1],) * 2, jnp.float32) for p in PROJECTIONS}
        train = (jax.ShapeDtypeStruct((n - hold, t, d), jnp.float32),) * 2
        held = (jax.ShapeDtypeStruct((hold, t, d), jnp.float32),) * 2
        key = jax.eval_shape(lambda: jax.random.key(0))
        peak = compiled_peak(learn_block_scales, block, whitening, train, held, key, cfg=cfg,
                             ranks=tuple(sorted(ranks.items())), kind=s.loss, steps=s.steps, lr=s.lr,
                             batch_windows=s.step_windows, eval_every=s.eval_every, truncation=s.truncation,
                             min_gain=s.min_gain)
        stages.append(StagePlan("factorize (sigmascale)", peak, host_base + 2 * acts + stats_host,
                                f"the learning scan, {s.step_windows} windows a step"))
    else:
        from sigmascale_jax.compress.factorize._blocks import low_rank_groups
        from sigmascale_jax.compress.factorize.svd_llm import _whitened_group

        shapes = cfg.projection_shapes()
        peaks = []
        # low_rank_groups reads only the shapes of the block's matrices
        for (shape, rank), names in low_rank_groups({p: {"w": _Shape(shapes[p])} for p in PROJECTIONS}, ranks).items():
            g, (m, k_in) = len(names), shape
            args = (jax.ShapeDtypeStruct((g, m, k_in), fdtype), jax.ShapeDtypeStruct((g, k_in, k_in), fdtype),
                    jax.ShapeDtypeStruct((g, k_in, k_in), fdtype))
            peaks.append(compiled_peak(_whitened_group, *args, x64=precision == "float64", rank=rank,
                                       triangular=True, update=False,
                                       solver="gram" if precision == "float64" else "svd"))
        stages.append(StagePlan(f"factorize ({name}, {precision})", max(peaks),
                                host_base + acts + stats_host + block_bytes // f32 * wide,
                                "the largest same-shape group (SVD-LLM's whitened truncation)"))

    if any(r.name == "heal" for r in plan.refine):
        heal = next(r for r in plan.refine if r.name == "heal").settings
        params = abstract_params(cfg)
        tokens = jax.ShapeDtypeStruct((heal.heal_batch, heal.heal_seq_len or t), jnp.int32)
        peak = compiled_peak(_distill_loss_grad, params, params, tokens, cfg=cfg, remat=heal.heal_remat)
        # AdamW's two moments of the factors, at most the dense projections' size
        moments = 2 * cfg.num_layers * sum(m * k for m, k in cfg.projection_shapes().values()) * f32
        stages.append(StagePlan("heal", peak + moments, outer_bytes + cfg.num_layers * block_bytes,
                                f"teacher + student forward and backward, {heal.heal_batch} × "
                                f"{heal.heal_seq_len or t} tokens a step (a dense-shaped student: an upper bound)"))

    # Evaluation holds the whole model; its blocks run one after the other, so beside the weights it needs one
    # block's working memory (compiled) and the head's logits with their log-softmax ([L, V] float32, twice).
    length = min(2048, cfg.max_position_embeddings)
    work = compiled_peak(_block_jit, block, jax.ShapeDtypeStruct((1, length, d), jnp.float32), cfg=cfg) - block_bytes
    whole = outer_bytes + cfg.num_layers * block_bytes
    stages.append(StagePlan(EVAL_STAGE, whole + work + 2 * length * cfg.vocab_size * f32, whole,
                            f"python -m sigmascale_jax.eval afterwards: the whole model, one window of {length} "
                            "tokens"))
    return stages


def _distill_loss_grad(params, teacher, tokens, *, cfg, remat):
    from sigmascale_jax.compress.refine.heal import distill_loss

    return jax.grad(lambda p: distill_loss(p, teacher, tokens, cfg, 0.0, remat)[0])(params)


class _Shape:
    """Stands in for an array where only `.shape` is read."""

    def __init__(self, shape):
        self.shape = tuple(shape)


def plan_table(stages: list[StagePlan], device_memory: int | None) -> str:
    """The plan as the text `--plan-only` prints: one line a stage, and whether it fits `device_memory`."""
    lines = [f"{'stage':<34} {'device GiB':>10} {'host GiB':>9}" + ("  fits" if device_memory else "")]
    for s in stages:
        fits = ("  yes" if s.device <= device_memory else "  NO") if device_memory else ""
        lines.append(f"{s.name:<34} {s.device / GiB:>10.2f} {s.host / GiB:>9.2f}{fits}  {s.detail}")
    run = [s for s in stages if s.name != EVAL_STAGE]
    peak = max(run, key=lambda s: s.device)
    lines.append(f"compression peak: {peak.device / GiB:.2f} GiB of device memory ({peak.name}), "
                 f"{max(s.host for s in run) / GiB:.2f} GiB of host memory"
                 + (f"; {'fits' if peak.device <= device_memory else 'does NOT fit'} a device of "
                    f"{device_memory / GiB:.1f} GiB" if device_memory else ""))
    return "\n".join(lines)


def compression_peak(stages: list[StagePlan]) -> StagePlan:
    """The compression stage with the largest device peak (the eval command's stage aside)."""
    return max((s for s in stages if s.name != EVAL_STAGE), key=lambda s: s.device)
