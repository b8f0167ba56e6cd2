"""Rank-k reconstruction `A ↦ A_k` with a custom VJP that stays finite when singular values repeat.

JAX's SVD derivative divides by `σ_i² − σ_j²` for every pair, so it is NaN or huge
whenever two singular values (anywhere) coincide. The truncated reconstruction
only depends on pairs across the cut (i ≤ k < j): within the kept or the discarded
set a rotation does not change `A_k`. With `M = Uᵀ dA V` the first-order change is

    dA_k = P_U dA + dA P_V − P_U dA P_V
           + Σ_{i≤k<j} σ_j (σ_i M_ij + σ_j M_ji)/(σ_i² − σ_j²) u_j v_iᵀ
           + Σ_{i≤k<j} σ_j (σ_j M_ij + σ_i M_ji)/(σ_i² − σ_j²) u_i v_jᵀ

(`P_U = U_k U_kᵀ`, `P_V = V_k V_kᵀ`); its adjoint is the VJP below. A zero gap at
the cut (σ_k = σ_{k+1}: A_k not unique) is guarded by a floor on the denominator.

The rank is data, not a shape: the kept triplets are selected by a mask (`arange(r) < k`) and the
pairs across the cut by its outer product, so a traced `k` works and one compiled function serves
every rank of a matrix shape (a static `k` compiled one program per rank).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def keep_mask(rank: Any, size: int, dtype: Any) -> jax.Array:
    """`[size]`: 1 for the first `rank` positions, 0 after. `rank` may be traced: the cut is data, not a shape."""
    return (jnp.arange(size) < rank).astype(dtype)


@jax.custom_vjp
def truncated_reconstruction(a: jax.Array, rank: Any) -> jax.Array:
    """`A_k = U_k Σ_k V_kᵀ` of `a: [m, n]` (best rank-`rank` approximation in Frobenius norm).

    `rank` is an int or a traced integer scalar: the truncation keeps the first `rank` triplets by a mask, so one
    compiled function serves every rank of a shape.
    """
    u, s, vt = jnp.linalg.svd(a, full_matrices=False)
    return (u * (s * keep_mask(rank, s.shape[0], s.dtype))) @ vt


def _fwd(a, rank):
    u, s, vt = jnp.linalg.svd(a, full_matrices=False)
    return (u * (s * keep_mask(rank, s.shape[0], s.dtype))) @ vt, (u, s, vt, rank)


def _cut_pairs(s: jax.Array, keep: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """`(σ_i [r, 1], σ_j [1, r], σ_i² − σ_j² floored [r, r], M [r, r])` with `M_ij = 1` for i kept, j discarded."""
    si, sj = s[:, None], s[None, :]
    floor = 1e-12 * jnp.maximum(s[0] ** 2, jnp.finfo(s.dtype).tiny)
    gap = jnp.maximum(si**2 - sj**2, floor)  # a zero gap at the cut (A_k not unique) is floored, never divided by
    return si, sj, gap, keep[:, None] * (1 - keep)[None, :]


def _bwd(res, g):
    u, s, vt, rank = res
    v = vt.T
    keep = keep_mask(rank, s.shape[0], s.dtype)
    # the three self-adjoint projection terms (exact if all discarded σ were 0)
    ug = u.T @ g  # [r, n]
    gvk = (g @ v) * keep  # [m, r]: g V_k, zero beyond the cut
    mix = ug @ v  # [r, r]: u_iᵀ g v_j
    grad = u @ (keep[:, None] * ug) + gvk @ vt - u @ (keep[:, None] * mix * keep[None, :]) @ vt
    # corrections for the discarded singular values that are not 0: pairs i ≤ k < j only
    si, sj, gap, cut = _cut_pairs(s, keep)
    g1, g2t = mix, mix.T  # g_ij = u_iᵀ g v_j, and g_ji
    f = cut * sj * (si * g2t + sj * g1) / gap  # coefficient of u_i v_jᵀ
    h = cut * sj * (sj * g2t + si * g1) / gap  # coefficient of u_j v_iᵀ (transposed)
    return grad + u @ (f + h.T) @ vt, None


truncated_reconstruction.defvjp(_fwd, _bwd)


# ---------------------------------------------------------------- from the smaller side's Gram matrix
#
# The same map A ↦ A_k and the same cut-only VJP, from `eigh` of the smaller Gram matrix
# instead of an SVD of A. For A: [m, n] with m ≤ n, `A Aᵀ = U Λ Uᵀ` gives the left singular
# vectors and σ² = λ; A_k = U_k U_kᵀ A. The right singular vectors enter the VJP only as
# `P = Aᵀ U = V Σ`, so no σ is ever divided by (the discarded ones may be 0); only the kept
# `V_k = P_k / σ_k` is formed. One eigh of an m × m matrix and a few products replace the
# SVD of an m × n matrix: cheaper when n > m and on CPU/GPU eigh kernels generally.
# Squaring A doubles its condition number, so components with σ/σ_1 below ~√eps (float32:
# 3e-4) come out inexact; the cut lies far above that in practice (tested against the SVD
# path on real whitened matrices).


def left_singular_gram(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(U [m, m], σ [m])` of `a: [m, n]`, descending, from `eigh(A Aᵀ)` (σ² = λ, clamped at 0)."""
    lam, u = jnp.linalg.eigh(a @ a.T)
    return u[:, ::-1], jnp.sqrt(jnp.maximum(lam[::-1], 0.0))


def _gram_parts(a: jax.Array):
    u, s = left_singular_gram(a)
    return u, s, a.T @ u  # P = Aᵀ U = V Σ


@jax.custom_vjp
def _gram_truncation(a: jax.Array, rank: Any) -> jax.Array:
    u, s, _ = _gram_parts(a)
    uk = u * keep_mask(rank, s.shape[0], u.dtype)
    return uk @ (u.T @ a)


def _gram_fwd(a, rank):
    u, s, p = _gram_parts(a)
    uk = u * keep_mask(rank, s.shape[0], u.dtype)
    return uk @ (u.T @ a), (u, s, p, rank)


def _gram_bwd(res, g):
    u, s, p, rank = res
    tiny = jnp.finfo(s.dtype).tiny
    keep = keep_mask(rank, s.shape[0], s.dtype)
    vk = p * (keep / jnp.maximum(s, tiny))[None, :]  # V_k, zero beyond the cut (no discarded σ divided by)
    ug = u.T @ g
    gvk = g @ vk
    grad = u @ (keep[:, None] * ug) + gvk @ vk.T - u @ (keep[:, None] * (ug @ vk)) @ vk.T
    q1 = ug @ p  # [r, r]: σ_j g_ij of the SVD form (p = V Σ)
    g2t = (ug @ vk).T  # g_ji for kept i
    si, sj, gap, cut = _cut_pairs(s, keep)
    f = cut * (si * g2t + q1) / gap  # times (V_r Σ_r)ᵀ: the SVD form's f / σ_j
    h = cut * (sj**2 * g2t + si * q1) / gap
    return grad + u @ f @ p.T + u @ h.T @ vk.T, None


_gram_truncation.defvjp(_gram_fwd, _gram_bwd)


def truncated_reconstruction_gram(a: jax.Array, rank: Any) -> jax.Array:
    """`truncated_reconstruction(a, rank)` computed from `eigh` of the smaller side's Gram matrix (same cut-only VJP)."""
    if a.shape[0] > a.shape[1]:
        return _gram_truncation(a.T, rank).T
    return _gram_truncation(a, rank)


TRUNCATIONS = {"svd": truncated_reconstruction, "eigh": truncated_reconstruction_gram}
