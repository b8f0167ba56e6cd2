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
