"""ASVD (Yuan et al. 2023): SVD of `W diag(s)`, `s_j = mean_t|X_jt|^α`, then `C ← C diag(s)⁻¹`."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from sigmascale_jax.compress.factorize._blocks import factor_block, stacked
from sigmascale_jax.compress.factorize.svd import svd_factors
from sigmascale_jax.compress.plan import FACTORIZERS, BlockInputs, BlockResult, Factorizer, register
from sigmascale_jax.compress.settings import Settings, setting
from sigmascale_jax.linalg.lowrank import relative_activation_loss, split_sigma_masked
from sigmascale_jax.linalg.precision import factor_precision


def asvd_factors(w: jax.Array, absmean: jax.Array, rank: int, alpha: float = 0.5) -> tuple[jax.Array, jax.Array]:
    """ASVD: SVD of `W diag(s)` with `s_j = mean_t|X_jt|^α` (`absmean: [n]`), then `C ← C diag(s)⁻¹`."""
    scale = jnp.maximum(absmean, jnp.finfo(absmean.dtype).tiny) ** alpha
    b, c = svd_factors(w * scale[None, :], rank)
    return b, c / scale[None, :]


@dataclasses.dataclass(frozen=True)
class AsvdSettings(Settings):
    alpha: float = setting(0.5, "asvd: exponent of the activation scaling", min=0.0)


@functools.partial(jax.jit, static_argnames="alpha")
def asvd_group(w, gram, absmean, ranks, *, alpha: float):
    """ASVD over a stack `w: [G, m, n]` with `absmean: [G, n]` at `ranks: int [G]` (data); returns full-width
    `(B [G, m, r], C [G, r, n], rel_loss [G])`, zero past each rank."""

    def one(w, gram, absmean, rank):
        scale = jnp.maximum(absmean, jnp.finfo(absmean.dtype).tiny) ** alpha
        u, s, vt = jnp.linalg.svd(w * scale[None, :], full_matrices=False)
        b, c = split_sigma_masked(u, s, vt, rank)
        c = c / scale[None, :]
        return b, c, relative_activation_loss(w, b @ c, gram)

    return jax.vmap(one)(w, gram, absmean, ranks)


@register(FACTORIZERS, "asvd", AsvdSettings, "ASVD: activation-magnitude column scaling before SVD")
def asvd(alpha: float = 0.5) -> Factorizer:
    settings = AsvdSettings(alpha=alpha)

    def factor(inputs: BlockInputs, ranks, key) -> BlockResult:
        def group(names, ranks):
            w, gram, absmean = stacked(inputs.block, inputs.stats, names, dtype)
            b, c, loss = asvd_group(w, gram, absmean, ranks, alpha=settings.alpha)
            return b, c, loss, [{"whitening": None}] * len(names)

        with factor_precision(inputs.precision) as dtype:
            return factor_block(inputs.block, ranks, group, "asvd")

    return Factorizer("asvd", settings, factor)
