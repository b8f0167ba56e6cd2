"""Plain truncated SVD of each projection: optimal in ‖W − BC‖_F, blind to activations."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sigmascale_jax.compress.factorize._blocks import factor_block, stacked
from sigmascale_jax.compress.plan import FACTORIZERS, BlockInputs, BlockResult, Factorizer, register
from sigmascale_jax.compress.settings import NoSettings
from sigmascale_jax.linalg.lowrank import relative_activation_loss, split_sigma, split_sigma_masked
from sigmascale_jax.linalg.precision import factor_precision


def svd_factors(w: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """Plain truncated SVD of `w: [m, n]`: optimal in ‖W − BC‖_F, blind to activations. `rank` in 1..min(m, n)."""
    from sigmascale_jax.compress.factorize.svd_llm import check_rank

    check_rank(rank, w.shape)
    u, s, vt = jnp.linalg.svd(w, full_matrices=False)
    return split_sigma(u, s, vt, rank)


@jax.jit
def svd_group(w, gram, ranks):
    """Truncated SVD over a stack `w: [G, m, n]` at `ranks: int [G]` (data: one compile per shape); returns
    full-width `(B [G, m, r], C [G, r, n], rel_loss [G])`, zero past each rank (the loss on `gram: [G, n, n]`)."""

    def one(w, gram, rank):
        u, s, vt = jnp.linalg.svd(w, full_matrices=False)
        b, c = split_sigma_masked(u, s, vt, rank)
        return b, c, relative_activation_loss(w, b @ c, gram)

    return jax.vmap(one)(w, gram, ranks)


@register(FACTORIZERS, "svd", NoSettings, "plain truncated SVD (activation-blind)")
def svd() -> Factorizer:
    def factor(inputs: BlockInputs, ranks, key) -> BlockResult:
        def group(names, ranks):
            w, gram, _ = stacked(inputs.block, inputs.stats, names, dtype)
            b, c, loss = svd_group(w, gram, ranks)
            return b, c, loss, [{"whitening": None}] * len(names)

        with factor_precision(inputs.precision) as dtype:
            return factor_block(inputs.block, ranks, group, "svd")

    def memory(cfg, spec, ranks) -> tuple[int, str]:
        from sigmascale_jax.compress.memory import group_memory

        return group_memory(cfg, spec, ranks, svd_group, 0), "the largest same-shape group's SVD"

    return Factorizer("svd", NoSettings(), factor, memory=memory)
