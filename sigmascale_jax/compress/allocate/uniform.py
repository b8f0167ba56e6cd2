"""Uniform ranks: every matrix keeps `k = floor((1 − ratio)·m·n/(m + n))` from its own shape (SVD-LLM's convention)."""

from __future__ import annotations

from sigmascale_jax.compress.plan import ALLOCATORS, Allocation, Budget, ModelContext, RankAllocator, register
from sigmascale_jax.compress.ranks import block_ranks, factored_params
from sigmascale_jax.compress.settings import NoSettings
from sigmascale_jax.errors import UserError


def largest_rank(m: int, n: int, budget: Budget) -> int:
    """The largest k whose encoding stores at most `(1 − ratio)·m·n` numbers (at least 1)."""
    keep = (1.0 - budget.ratio) * m * n
    ks = [k for k in range(1, min(m, n) + 1) if budget.count(m, n, k) <= keep]
    if not ks:
        raise UserError(f"--ratio {budget.ratio} leaves rank 0 for a {m}x{n} matrix; use a smaller ratio")
    return ks[-1]


@register(ALLOCATORS, "uniform", NoSettings, "the same fraction of every matrix, from its own shape")
def uniform() -> RankAllocator:
    def allocate(ctx: ModelContext, budget: Budget) -> Allocation:
        if budget.count is factored_params:  # SVD-LLM's formula, as it always was
            ranks = block_ranks(ctx.cfg, budget.ratio)
        else:  # another encoding: the largest rank whose stored numbers keep 1 − ratio of the matrix
            ranks = {n: largest_rank(m, n_, budget) for n, (m, n_) in ctx.cfg.projection_shapes().items()}
        return Allocation([dict(ranks) for _ in range(ctx.cfg.num_layers)], {})

    def check(spec, cfg) -> None:
        block_ranks(cfg, spec.ratio)  # a ratio that leaves some matrix rank 0 fails before any work

    return RankAllocator("uniform", NoSettings(), allocate, check, costly=False)
