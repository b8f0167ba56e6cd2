"""Per-matrix low-rank factorizations: plain SVD, ASVD, SVD-LLM (and its closed-form update).

Pure functions of arrays, usable under jit / vmap / grad. Shapes: `w: [m, n]`
(out x in, HF layout), `gram: [n, n]` = X Xᵀ of the layer's inputs, results
`B: [m, k]`, `C: [k, n]` with `Ŵ = B C`. They compute in the dtype they are given:
pass float64 (inside `jax.enable_x64(True)`) where METHODS.md asks for it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

# Whitening fallbacks, recorded per matrix in compression.json.
WHITEN_CHOLESKY, WHITEN_SHIFTED, WHITEN_EIGH = 0, 1, 2
WHITEN_NAMES = {WHITEN_CHOLESKY: "cholesky", WHITEN_SHIFTED: "cholesky+shift", WHITEN_EIGH: "eigh-sqrt"}


def split_sigma(u: jax.Array, s: jax.Array, vt: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """`B = U_k Σ_k^½`, `C = Σ_k^½ V_kᵀ` from an SVD."""
    root = jnp.sqrt(s[:rank])
    return u[:, :rank] * root, root[:, None] * vt[:rank]


def svd_factors(w: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """Plain truncated SVD of `w: [m, n]`: optimal in ‖W − BC‖_F, blind to activations."""
    u, s, vt = jnp.linalg.svd(w, full_matrices=False)
    return split_sigma(u, s, vt, rank)


def asvd_factors(w: jax.Array, absmean: jax.Array, rank: int, alpha: float = 0.5) -> tuple[jax.Array, jax.Array]:
    """ASVD: SVD of `W diag(s)` with `s_j = mean_t|X_jt|^α` (`absmean: [n]`), then `C ← C diag(s)⁻¹`."""
    scale = jnp.maximum(absmean, jnp.finfo(absmean.dtype).tiny) ** alpha
    b, c = svd_factors(w * scale[None, :], rank)
    return b, c / scale[None, :]


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


def top_singular_gram(a: jax.Array, rank: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(U_k [m, k], σ_k [k], V_kᵀ [k, n])` of `a: [m, n]` from `eigh` of its smaller-side Gram matrix.

    One eigh of a min(m, n)-square matrix and two products instead of a full SVD: on CPU
    ~0.6x the time of `svd` for SmolLM2's whitened matrices in float64. Squaring `a`
    loses components below σ₁·√eps, so call it in float64 (√eps ≈ 1.5e-8), where the
    rank-k product agrees with the SVD's to ~1e-12. Singular pairs come with eigh's
    signs, not LAPACK gesdd's: `U_k Σ_k V_kᵀ` is the same, each pair may be negated.
    """
    from sigmascale_jax.truncation import left_singular_gram

    tall = a.shape[0] >= a.shape[1]
    vec, sig = left_singular_gram(a.T if tall else a)  # the smaller side's singular vectors
    top, sig = vec[:, :rank], sig[:rank]
    # a zero σ gives a zero column (a·v = 0), not a NaN: the product is unchanged
    inv = 1.0 / jnp.maximum(sig, jnp.finfo(a.dtype).tiny * jnp.maximum(sig[0], 1.0))
    if tall:
        return (a @ top) * inv, sig, top.T
    return top, sig, (top.T @ a) * inv[:, None]


def whitened_factors(
    w: jax.Array, s: jax.Array, rank: int, triangular: bool = True, solver: str = "svd"
) -> tuple[jax.Array, jax.Array]:
    """Truncated SVD of `W S`, mapped back: `B = U_k Σ_k^½`, `C = Σ_k^½ V_kᵀ S⁻¹`.

    `solver="gram"` takes the top singular triples from `top_singular_gram` (float64 only).
    """
    if solver == "gram":
        u, sig, vt = top_singular_gram(w @ s, rank)
    else:
        u, sig, vt = jnp.linalg.svd(w @ s, full_matrices=False)
    b, c_white = split_sigma(u, sig, vt, rank)
    return b, unwhiten(c_white, s, triangular)


def svd_llm_factors(w: jax.Array, gram: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """SVD-LLM: truncated SVD of `W S` (S the whitening of `gram`), `C = Σ_k^½ V_kᵀ S⁻¹`.

    The exact minimizer of ‖(W − BC) X‖_F over rank-`rank` matrices.
    """
    s, route = whitening(gram)
    return jax.lax.cond(
        route == WHITEN_EIGH,
        lambda: whitened_factors(w, s, rank, triangular=False),
        lambda: whitened_factors(w, s, rank, triangular=True),
    )


def refit_left(w: jax.Array, gram: jax.Array, c: jax.Array) -> jax.Array:
    """SVD-LLM's parameter update: `B = argmin ‖(W − B C) X‖ = W G Cᵀ (C G Cᵀ)⁻¹`."""
    cg = c @ gram  # [k, n]
    lhs = cg @ c.T  # [k, k], symmetric positive semi-definite
    k = lhs.shape[0]
    ridge = 1e-10 * jnp.maximum(jnp.trace(lhs) / k, jnp.finfo(lhs.dtype).tiny)
    rhs = cg @ w.T  # [k, m] = C G Wᵀ
    return jnp.linalg.solve(lhs + ridge * jnp.eye(k, dtype=lhs.dtype), rhs).T


def activation_loss(w: jax.Array, w_hat: jax.Array, gram: jax.Array) -> jax.Array:
    """ℓ(Ŵ) = tr((W − Ŵ) G (W − Ŵ)ᵀ) = ‖(W − Ŵ) X‖²_F."""
    d = w - w_hat
    return jnp.sum((d @ gram) * d)


def relative_activation_loss(w: jax.Array, w_hat: jax.Array, gram: jax.Array) -> jax.Array:
    """ℓ(Ŵ) / tr(W G Wᵀ)."""
    return activation_loss(w, w_hat, gram) / jnp.sum((w @ gram) * w)
