"""Sensitivity ranks: ASVD's perplexity table, as the SigmaScale paper's code uses it for its ranks.

For every projection and every kept-parameter fraction p in 0.2 … 0.9, the perplexity
of the model with only that matrix replaced by its plain truncated SVD at rank
`floor(floor(m·n·p) / (m + n))` (the released code's `calib_sensitivity_ppl`), measured
on calibration windows (the released code measures it on WikiText-2 *test* windows,
the evaluation text; not here). Then a search on a perplexity threshold: every
(matrix, fraction) whose perplexity is at most the threshold is allowed, each matrix
takes its smallest allowed fraction (none allowed: it stays dense), and the threshold
is the highest one whose model meets the budget. The released code's binary search
(ASVD's `binary_search.py`) stops on the last midpoint it tried, which can miss the
budget; this one returns the exact boundary.

The table does not depend on the ratio: it is cached per model and calibration
(`sigmascale_jax.io.diskcache`) and reused by every ratio and factorizer.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from sigmascale_jax.compress.grads import _head_nll_sum
from sigmascale_jax.compress.plan import ALLOCATORS, Allocation, Budget, ModelContext, RankAllocator, RunSpec, register
from sigmascale_jax.compress.settings import Settings, setting
from sigmascale_jax.errors import UserError
from sigmascale_jax.model.config import ModelConfig
from sigmascale_jax.model.modeling import PROJECTIONS, Params, block_forward, rope_cos_sin

FRACTIONS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def fraction_rank(m: int, n: int, kept: float) -> int:
    """The released code's rank for keeping `kept` of an `m × n` matrix's parameters (at least 1)."""
    return max(1, int(m * n * kept) // (m + n))


@functools.partial(jax.jit, static_argnames="cfg")
def _block_out(block: Params, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    cos, sin = rope_cos_sin(cfg, jnp.arange(x.shape[1]))
    return block_forward(block, x, cfg, cos, sin)


@functools.partial(jax.jit, static_argnames="cfg")
def _tail_nll(stacked: Params, outer: Params, x: jax.Array, tokens: jax.Array, start: jax.Array, cfg: ModelConfig):
    """Summed next-token NLL when `x: [B, T, D]` enters block `start` of the dense blocks `stacked` (leading axis L)."""
    cos, sin = rope_cos_sin(cfg, jnp.arange(x.shape[1]))

    def body(i, h):
        return block_forward(jax.tree.map(lambda a: a[i], stacked), h, cfg, cos, sin)

    return _head_nll_sum(outer, jax.lax.fori_loop(start, cfg.num_layers, body, x), tokens, cfg)


def sensitivity_table(ctx: ModelContext, n_windows: int, fractions=FRACTIONS) -> dict:
    """`{"baseline": ppl, "fractions": [...], "ppl": {"<block>.<projection>": [ppl per fraction]}}` on calibration windows.

    Blocks before the truncated matrix are shared: each block's dense input is kept, and
    only the truncated block and those after it are run for each variant.
    """
    from tqdm.auto import tqdm

    cfg = ctx.cfg
    tokens = np.asarray(ctx.windows[:n_windows])
    blocks = [ctx.load_block(i) for i in range(cfg.num_layers)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *blocks)
    count = tokens.shape[0] * (tokens.shape[1] - 1)
    bs = ctx.spec.batch_size
    chunks = [slice(s, min(s + bs, len(tokens))) for s in range(0, len(tokens), bs)]

    def ppl_from(x: np.ndarray, start: int) -> float:
        total = sum(float(_tail_nll(stacked, ctx.outer, jnp.asarray(x[c]), jnp.asarray(tokens[c]), start, cfg))
                    for c in chunks)
        return float(np.exp(total / count))

    x = np.asarray(ctx.outer["embed"])[tokens]
    table = {"baseline": ppl_from(x, 0), "fractions": list(fractions), "windows": n_windows, "ppl": {}}
    bar = tqdm(total=cfg.num_layers * len(PROJECTIONS) * len(fractions), desc="sensitivity table", unit="model",
               disable=not ctx.progress, leave=False)
    for b, block in enumerate(blocks):
        for name in PROJECTIONS:
            with jax.enable_x64(True):
                u, s, vt = np.linalg.svd(np.asarray(block[name]["w"], np.float64), full_matrices=False)
            m, n = block[name]["w"].shape
            row = []
            for p in fractions:
                k = fraction_rank(m, n, p)
                w_k = jnp.asarray((u[:, :k] * s[:k]) @ vt[:k], jnp.float32)
                changed = {**block, name: {**block[name], "w": w_k}}
                out = np.concatenate([np.asarray(_block_out(changed, jnp.asarray(x[c]), cfg)) for c in chunks])
                row.append(ppl_from(out, b + 1))
                bar.update()
            table["ppl"][f"{b}.{name}"] = row
        x = np.concatenate([np.asarray(_block_out(block, jnp.asarray(x[c]), cfg)) for c in chunks])
    bar.close()
    return table


def search_threshold(table: dict, shapes: dict[str, tuple[int, int]], budget: Budget) -> tuple[dict, float, int]:
    """`({"<block>.<projection>": rank or None}, threshold ppl, stored numbers)`: the highest threshold meeting the budget.

    Entries are sorted by perplexity, highest first (the released code's order); allowing
    entries `t:` gives each matrix its smallest allowed fraction. Stored numbers only
    grow with `t`, so the boundary is found by bisection.
    """
    fractions = table["fractions"]
    entries = sorted(((ppl, key, p) for key, row in table["ppl"].items() for p, ppl in zip(fractions, row)),
                     key=lambda e: -e[0])
    limit = budget.limit(list(shapes.values()))

    def ranks_at(t: int) -> dict:
        kept = {}
        for _, key, p in entries[t:]:
            kept[key] = min(kept.get(key, 1.0), p)
        return {key: (fraction_rank(*shapes[key], kept[key]) if key in kept else None) for key in shapes}

    def stored(t: int) -> int:
        return sum(budget.stored(*shapes[k], r) for k, r in ranks_at(t).items())

    if stored(0) > limit:
        raise UserError(f"--ranks sensitivity cannot reach ratio {budget.ratio}: keeping {fractions[0]} of every matrix "
                        "is its most compressed model; use a smaller --ratio")
    lo, hi = 0, len(entries)  # stored(lo) <= limit; find the largest such t
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if stored(mid) <= limit:
            lo = mid
        else:
            hi = mid - 1
    threshold = entries[lo][0] if lo < len(entries) else float("-inf")
    return ranks_at(lo), threshold, stored(lo)


@dataclasses.dataclass(frozen=True)
class SensitivitySettings(Settings):
    sensitivity_windows: int = setting(4, "sensitivity: calibration windows the perplexity table is measured on", min=1)


@register(ALLOCATORS, "sensitivity", SensitivitySettings,
          "ASVD's perplexity-sensitivity table and threshold search (the SigmaScale paper's ranks)")
def sensitivity(sensitivity_windows: int = 4) -> RankAllocator:
    settings = SensitivitySettings(sensitivity_windows=sensitivity_windows)

    def check(spec: RunSpec, cfg) -> None:
        if settings.sensitivity_windows > spec.nsamples:
            raise UserError(f"--sensitivity-windows {settings.sensitivity_windows} exceeds --nsamples {spec.nsamples}")

    def allocate(ctx: ModelContext, budget: Budget) -> Allocation:
        from sigmascale_jax.io.diskcache import cached

        t0 = time.perf_counter()
        key = {"model": ctx.model_key, "calib_sha1": ctx.calib_sha1, "windows": settings.sensitivity_windows,
               "fractions": list(FRACTIONS), "truncation": "svd", "batch_size": ctx.spec.batch_size}
        table, hit = cached("sensitivity", key, lambda: {**sensitivity_table(ctx, settings.sensitivity_windows),
                                                         "seconds": round(time.perf_counter() - t0, 3)})
        shapes = {f"{b}.{n}": ctx.cfg.projection_shapes()[n] for b in range(ctx.cfg.num_layers) for n in PROJECTIONS}
        flat, threshold, stored = search_threshold(table, shapes, budget)
        ranks = [{n: flat[f"{b}.{n}"] for n in PROJECTIONS} for b in range(ctx.cfg.num_layers)]
        info = {"baseline_ppl": table["baseline"], "threshold_ppl": threshold, "table_from_cache": hit,
                "table_seconds": table["seconds"], "matrices_dense": sum(r is None for r in flat.values()),
                "stored": stored}
        return Allocation(ranks, info)

    return RankAllocator("sensitivity", settings, allocate, check)
