"""Plain truncated SVD of each projection: optimal in ‖W − BC‖_F, blind to activations."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sigmascale_jax.compress.factorize._blocks import factor_block, stacked
from sigmascale_jax.compress.plan import FACTORIZERS, BlockInputs, BlockResult, Factorizer, register
from sigmascale_jax.compress.settings import NoSettings
from sigmascale_jax.linalg.lowrank import relative_activation_loss, split_sigma
from sigmascale_jax.linalg.precision import factor_precision


def svd_factors(w: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """Plain truncated SVD of `w: [m, n]`: optimal in ‖W − BC‖_F, blind to activations."""
    u, s, vt = jnp.linalg.svd(w, full_matrices=False)
    return split_sigma(u, s, vt, rank)


@functools.partial(jax.jit, static_argnames="rank")
def svd_group(w, gram, *, rank: int):
    """Truncated SVD over a stack `w: [G, m, n]`; returns `(B, C, rel_loss)` (the loss on `gram: [G, n, n]`)."""

    def one(w, gram):
        b, c = svd_factors(w, rank)
        return b, c, relative_activation_loss(w, b @ c, gram)

    return jax.vmap(one)(w, gram)


@register(FACTORIZERS, "svd", NoSettings, "plain truncated SVD (activation-blind)")
def svd() -> Factorizer:
    def factor(inputs: BlockInputs, ranks, key) -> BlockResult:
        def group(names, rank):
            w, gram, _ = stacked(inputs.block, inputs.stats, names, dtype)
            b, c, loss = svd_group(w, gram, rank=rank)
            return b, c, loss, [{"whitening": None}] * len(names)

        with factor_precision(inputs.precision) as dtype:
            return factor_block(inputs.block, ranks, group, "svd")

    def memory(cfg, spec, ranks) -> tuple[int, str]:
        from sigmascale_jax.compress.memory import group_memory

        return group_memory(cfg, spec, ranks, svd_group, 0), "the largest same-shape group's SVD"

    return Factorizer("svd", NoSettings(), factor, memory=memory)
