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
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def truncated_reconstruction(a: jax.Array, rank: int) -> jax.Array:
    """`A_k = U_k Σ_k V_kᵀ` of `a: [m, n]` (best rank-`rank` approximation in Frobenius norm)."""
    u, s, vt = jnp.linalg.svd(a, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


def _fwd(a, rank):
    u, s, vt = jnp.linalg.svd(a, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank], (u, s, vt)


def _bwd(rank, res, g):
    u, s, vt = res
    v = vt.T
    uk, vk, ur, vr = u[:, :rank], v[:, :rank], u[:, rank:], v[:, rank:]
    sk, sr = s[:rank], s[rank:]
    # the three self-adjoint projection terms (exact if all discarded σ were 0)
    gu = uk.T @ g  # [k, n]
    gv = g @ vk  # [m, k]
    grad = uk @ gu + gv @ vk.T - uk @ (gu @ vk) @ vk.T
    # corrections for the discarded singular values that are not 0
    g1 = uk.T @ g @ vr  # [k, r]  g_ij
    g2t = (ur.T @ g @ vk).T  # [k, r]  g_ji
    si, sj = sk[:, None], sr[None, :]
    gap = si**2 - sj**2
    floor = 1e-12 * jnp.maximum(s[0] ** 2, jnp.finfo(s.dtype).tiny)
    gap = jnp.maximum(gap, floor)
    f = sj * (si * g2t + sj * g1) / gap  # coefficient of u_i v_jᵀ
    h = sj * (sj * g2t + si * g1) / gap  # coefficient of u_j v_iᵀ (transposed)
    grad = grad + uk @ f @ vr.T + ur @ h.T @ vk.T
    return (grad,)


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _gram_truncation(a: jax.Array, rank: int) -> jax.Array:
    u, _, _ = _gram_parts(a)
    uk = u[:, :rank]
    return uk @ (uk.T @ a)


def _gram_fwd(a, rank):
    u, s, p = _gram_parts(a)
    uk = u[:, :rank]
    return uk @ (uk.T @ a), (u, s, p)


def _gram_bwd(rank, res, g):
    u, s, p = res
    tiny = jnp.finfo(s.dtype).tiny
    uk, ur = u[:, :rank], u[:, rank:]
    sk, sr = s[:rank], s[rank:]
    vk = p[:, :rank] / jnp.maximum(sk, tiny)[None, :]
    pr = p[:, rank:]  # V_r Σ_r
    gu = uk.T @ g
    gv = g @ vk
    grad = uk @ gu + gv @ vk.T - uk @ (gu @ vk) @ vk.T
    q1 = uk.T @ g @ pr  # σ_j g_ij of the SVD form
    g2t = (ur.T @ g @ vk).T
    si, sj = sk[:, None], sr[None, :]
    floor = 1e-12 * jnp.maximum(s[0] ** 2, tiny)
    gap = jnp.maximum(si**2 - sj**2, floor)
    f = (si * g2t + q1) / gap  # times (V_r Σ_r)ᵀ: the SVD form's f / σ_j
    h = (sj**2 * g2t + si * q1) / gap
    return (grad + uk @ f @ pr.T + ur @ h.T @ vk.T,)


_gram_truncation.defvjp(_gram_fwd, _gram_bwd)


def truncated_reconstruction_gram(a: jax.Array, rank: int) -> jax.Array:
    """`truncated_reconstruction(a, rank)` computed from `eigh` of the smaller side's Gram matrix (same cut-only VJP)."""
    if a.shape[0] > a.shape[1]:
        return _gram_truncation(a.T, rank).T
    return _gram_truncation(a, rank)


TRUNCATIONS = {"svd": truncated_reconstruction, "eigh": truncated_reconstruction_gram}
