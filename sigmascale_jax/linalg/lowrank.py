"""Rank-k factors and the activation-aware loss every method is measured on (METHODS.md).

Shapes: `w: [m, n]` (out × in, HF layout), `gram: [n, n]` = X Xᵀ of the layer's inputs,
`B: [m, k]`, `C: [k, n]` with `Ŵ = B C`. Pure functions of arrays (jit / vmap / grad).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def split_sigma(u: jax.Array, s: jax.Array, vt: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """`B = U_k Σ_k^½`, `C = Σ_k^½ V_kᵀ` from an SVD."""
    root = jnp.sqrt(s[:rank])
    return u[:, :rank] * root, root[:, None] * vt[:rank]


def split_sigma_masked(u: jax.Array, s: jax.Array, vt: jax.Array, rank: Any) -> tuple[jax.Array, jax.Array]:
    """`split_sigma` at a rank that may be traced: full-width `B: [m, r]`, `C: [r, n]` (r = len(s)) whose columns /
    rows past `rank` are zero, so `B C` is the rank-`rank` product and `B[:, :rank]`, `C[:rank]` are the factors.

    One compiled function serves every rank of a shape; cut the factors to `rank` on the host.
    """
    from sigmascale_jax.linalg.truncation import keep_mask

    root = jnp.sqrt(jnp.maximum(s, 0.0)) * keep_mask(rank, s.shape[0], s.dtype)
    return u[:, : s.shape[0]] * root, root[:, None] * vt[: s.shape[0]]


def top_singular_gram(a: jax.Array, rank: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(U_k [m, k], σ_k [k], V_kᵀ [k, n])` of `a: [m, n]` from `eigh` of its smaller-side Gram matrix.

    One eigh of a min(m, n)-square matrix and two products instead of a full SVD: on CPU
    ~0.6x the time of `svd` for SmolLM2's whitened matrices in float64. Squaring `a`
    loses components below σ₁·√eps, so call it in float64 (√eps ≈ 1.5e-8), where the
    rank-k product agrees with the SVD's to ~1e-12. Singular pairs come with eigh's
    signs, not LAPACK gesdd's: `U_k Σ_k V_kᵀ` is the same, each pair may be negated.
    """
    from sigmascale_jax.linalg.truncation import left_singular_gram

    tall = a.shape[0] >= a.shape[1]
    vec, sig = left_singular_gram(a.T if tall else a)  # the smaller side's singular vectors
    top, sig = vec[:, :rank], sig[:rank]
    # a zero σ gives a zero column (a·v = 0), not a NaN: the product is unchanged
    inv = 1.0 / jnp.maximum(sig, jnp.finfo(a.dtype).tiny * jnp.maximum(sig[0], 1.0))
    if tall:
        return (a @ top) * inv, sig, top.T
    return top, sig, (top.T @ a) * inv[:, None]


def activation_loss(w: jax.Array, w_hat: jax.Array, gram: jax.Array) -> jax.Array:
    """ℓ(Ŵ) = tr((W − Ŵ) G (W − Ŵ)ᵀ) = ‖(W − Ŵ) X‖²_F."""
    d = w - w_hat
    return jnp.sum((d @ gram) * d)


def relative_activation_loss(w: jax.Array, w_hat: jax.Array, gram: jax.Array) -> jax.Array:
    """ℓ(Ŵ) / tr(W G Wᵀ)."""
    return activation_loss(w, w_hat, gram) / jnp.sum((w @ gram) * w)
