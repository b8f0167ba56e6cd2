"""Whitening of a Gram matrix: `S` with `G = S Sᵀ`, its fallbacks, and `a S⁻¹` (METHODS.md, SVD-LLM).

Computes in the dtype it is given: pass float64 (inside `jax.enable_x64(True)`) where
METHODS.md asks for it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

# Whitening fallbacks, recorded per matrix in compression.json.
WHITEN_CHOLESKY, WHITEN_SHIFTED, WHITEN_EIGH = 0, 1, 2
WHITEN_NAMES = {WHITEN_CHOLESKY: "cholesky", WHITEN_SHIFTED: "cholesky+shift", WHITEN_EIGH: "eigh-sqrt"}


def whitening(gram: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`S` with `G ≈ S Sᵀ`, and which route gave it (`WHITEN_*`).

    Cholesky; if it fails (G not positive definite), Cholesky of `G + (−λ_min + ε) I`;
    if that fails too, the symmetric square root from `eigh` with eigenvalues
    clamped at ε. ε = 1e-6 · mean(diag G) keeps the shift relative to the data's scale.
    """
    n = gram.shape[-1]
    eps = 1e-6 * jnp.maximum(jnp.trace(gram) / n, jnp.finfo(gram.dtype).tiny)
    eye = jnp.eye(n, dtype=gram.dtype)

    def finite(a):
        return jnp.isfinite(a).all()

    chol = jnp.linalg.cholesky(gram)

    def shifted(_):
        lam_min = jnp.linalg.eigvalsh(gram)[0]
        return jnp.linalg.cholesky(gram + (jnp.maximum(-lam_min, 0.0) + eps) * eye)

    def eigh_sqrt(_):
        lam, vec = jnp.linalg.eigh(gram)
        return (vec * jnp.sqrt(jnp.maximum(lam, eps))) @ vec.T

    s1 = jax.lax.cond(finite(chol), lambda _: chol, shifted, None)
    route1 = jnp.where(finite(chol), WHITEN_CHOLESKY, WHITEN_SHIFTED)
    s2 = jax.lax.cond(finite(s1), lambda _: s1, eigh_sqrt, None)
    route = jnp.where(finite(s1), route1, WHITEN_EIGH)
    return s2, route


def unwhiten(a: jax.Array, s: jax.Array, triangular: bool = True) -> jax.Array:
    """`a S⁻¹` for `a: [k, n]`: a triangular solve for Cholesky factors, a general one for eigh's root."""
    if triangular:
        return solve_triangular(s, a.T, trans="T", lower=True).T  # Sᵀ Xᵀ = aᵀ
    return jnp.linalg.solve(s.T, a.T).T


def triangular_whitening(gram: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A lower-triangular `L` with `L Lᵀ ≈ G` through `whitening`'s fallbacks, and the route (`WHITEN_*`); jit-able.

    The eigh fallback gives a symmetric root `R`; the QR of `Rᵀ` turns it into a
    triangular factor of the same product, so `Ŵ` can always use a triangular solve.
    """
    s, route = whitening(gram)

    def triangular(root):
        r = jnp.linalg.qr(root.T, mode="r")
        return (r * jnp.sign(jnp.diagonal(r))[:, None]).T

    return jax.lax.cond(route == WHITEN_EIGH, triangular, lambda root: root, s), route
