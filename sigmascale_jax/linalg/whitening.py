"""Whitening of a Gram matrix: `S` with `G = S Sᵀ`, its fallbacks, and `a S⁻¹` (METHODS.md, SVD-LLM).

Computes in the dtype it is given: float64 (inside `linalg.precision.factor_precision`) where
METHODS.md asks for it; in float32 (`--precision float32`) with the safeguards below.
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

    Below float64 the factorization runs on the unit-diagonal `D⁻¹ G D⁻¹` (D = √diag G)
    and returns `D S'` (the Cholesky factor of `D G' D` is exactly `D chol(G')`): LLM
    activations have channels 10⁴× louder than the rest, so a shift relative to the mean
    diagonal would swamp the quiet channels, while on `G'` it is relative to each
    channel's own scale. The shift is at least n·eps, the size that lets Cholesky succeed
    in that precision (Higham). float64 keeps the unscaled form its results were measured with.
    """
    n = gram.shape[-1]
    if gram.dtype != jnp.float64:
        d = _diagonal_scale(gram)
        s, route = _whitening(gram / d[:, None] / d[None, :], rel_eps=max(1e-6, n * float(jnp.finfo(gram.dtype).eps)))
        return d[:, None] * s, route
    return _whitening(gram, rel_eps=1e-6)


def cholesky(gram: jax.Array) -> jax.Array:
    """The lower Cholesky factor of `gram: [n, n]` (NaN where it fails), below float64 through `whitening`'s
    unit-diagonal scaling; the batched first try of callers that run `whitening` only where it fails."""
    if gram.dtype == jnp.float64:
        return jnp.linalg.cholesky(gram)
    d = _diagonal_scale(gram)
    return d[:, None] * jnp.linalg.cholesky(gram / d[:, None] / d[None, :])


def _diagonal_scale(gram: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.maximum(jnp.diagonal(gram), jnp.finfo(gram.dtype).tiny))


def _whitening(gram: jax.Array, rel_eps: float) -> tuple[jax.Array, jax.Array]:
    n = gram.shape[-1]
    eps = rel_eps * jnp.maximum(jnp.trace(gram) / n, jnp.finfo(gram.dtype).tiny)
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
