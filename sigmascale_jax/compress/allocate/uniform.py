"""Uniform ranks: every matrix keeps `k = floor((1 − ratio)·m·n/(m + n))` from its own shape (SVD-LLM's convention)."""

from __future__ import annotations

from sigmascale_jax.compress.plan import ALLOCATORS, Allocation, Budget, ModelContext, RankAllocator, register
from sigmascale_jax.compress.settings import NoSettings
from sigmascale_jax.ranks import block_ranks


@register(ALLOCATORS, "uniform", NoSettings, "the same fraction of every matrix, from its own shape")
def uniform() -> RankAllocator:
    def allocate(ctx: ModelContext, budget: Budget) -> Allocation:
        ranks = block_ranks(ctx.cfg, budget.ratio)
        return Allocation([dict(ranks) for _ in range(ctx.cfg.num_layers)], {})

    def check(spec, cfg) -> None:
        block_ranks(cfg, spec.ratio)  # a ratio that leaves some matrix rank 0 fails before any work

    return RankAllocator("uniform", NoSettings(), allocate, check, costly=False)
