"""SVD-LLM (Wang et al. 2024): truncation-aware whitening, optionally with its closed-form parameter update."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sigmascale_jax.compress.factorize._blocks import factor_block, stacked
from sigmascale_jax.compress.plan import FACTORIZERS, BlockInputs, BlockResult, Factorizer, RunSpec, register
from sigmascale_jax.compress.settings import Settings, setting
from sigmascale_jax.errors import UserError
from sigmascale_jax.linalg.lowrank import relative_activation_loss, split_sigma, split_sigma_masked, top_singular_gram
from sigmascale_jax.linalg.precision import factor_precision
from sigmascale_jax.linalg.whitening import WHITEN_CHOLESKY, WHITEN_EIGH, WHITEN_NAMES, cholesky, unwhiten, whitening
from sigmascale_jax.model.modeling import PROJECTION_INPUT


def whitened_factors(
    w: jax.Array, s: jax.Array, rank: int, triangular: bool = True, solver: str = "svd"
) -> tuple[jax.Array, jax.Array]:
    """Truncated SVD of `W S`, mapped back: `B = U_k Σ_k^½`, `C = Σ_k^½ V_kᵀ S⁻¹`.

    `solver="gram"` takes the top singular triples from `top_singular_gram` (float64 only: it squares `W S`).
    """
    if solver == "gram":
        u, sig, vt = top_singular_gram(w @ s, rank)
    else:
        u, sig, vt = jnp.linalg.svd(w @ s, full_matrices=False)
    b, c_white = split_sigma(u, sig, vt, rank)
    return b, unwhiten(c_white, s, triangular)


def svd_llm_factors(w: jax.Array, gram: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """SVD-LLM: truncated SVD of `W S` (S the whitening of `gram`), `C = Σ_k^½ V_kᵀ S⁻¹`.

    The exact minimizer of ‖(W − BC) X‖_F over rank-`rank` matrices. `rank` must lie in 1..min(m, n).
    """
    check_rank(rank, w.shape)
    s, route = whitening(gram)
    return jax.lax.cond(
        route == WHITEN_EIGH,
        lambda: whitened_factors(w, s, rank, triangular=False),
        lambda: whitened_factors(w, s, rank, triangular=True),
    )


def check_rank(rank: Any, shape: tuple[int, ...]) -> None:
    """An `ArgError` unless `rank` is a whole number in 1..min(shape) (a traced rank is the caller's promise)."""
    from sigmascale_jax.errors import ArgError

    if isinstance(rank, jax.core.Tracer):
        return
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 1 <= rank <= min(shape):
        raise ArgError("rank", f"must be a whole number in 1..{min(shape)} for a {shape[0]}x{shape[1]} matrix, "
                               f"got {rank!r}")


def refit_left(w: jax.Array, gram: jax.Array, c: jax.Array) -> jax.Array:
    """SVD-LLM's parameter update: `B = argmin ‖(W − B C) X‖ = W G Cᵀ (C G Cᵀ)⁻¹`."""
    return refit_left_masked(w, gram, c, c.shape[0])


def refit_left_masked(w: jax.Array, gram: jax.Array, c: jax.Array, rank: Any) -> jax.Array:
    """`refit_left` for a full-width `c: [r, n]` whose rows past `rank` (which may be traced) are zero: `B: [m, r]`,
    zero past `rank`. The zero rows get an identity block in `C G Cᵀ`, so the solve keeps the kept block's result."""
    from sigmascale_jax.linalg.truncation import keep_mask

    cg = c @ gram  # [r, n]
    lhs = cg @ c.T  # [r, r], symmetric positive semi-definite; zero past the rank
    keep = keep_mask(rank, lhs.shape[0], lhs.dtype)
    # a ridge below the dtype's resolution would do nothing: float32 gets ~10 ulps of the mean diagonal
    rel = max(1e-10, 10 * float(jnp.finfo(lhs.dtype).eps))
    ridge = rel * jnp.maximum(jnp.trace(lhs) / jnp.maximum(jnp.sum(keep), 1), jnp.finfo(lhs.dtype).tiny)
    rhs = cg @ w.T  # [r, m] = C G Wᵀ, zero past the rank
    return jnp.linalg.solve(lhs + jnp.diag(ridge * keep + (1 - keep)), rhs).T


_cholesky_group = jax.jit(jax.vmap(cholesky))
_whitening_one = jax.jit(whitening)


def whitened_factors_masked(w: jax.Array, s: jax.Array, rank: Any, triangular: bool = True,
                            solver: str = "svd") -> tuple[jax.Array, jax.Array]:
    """`whitened_factors` at a rank that may be traced: full-width `B: [m, r]`, `C: [r, n]`, zero past `rank`."""
    a = w @ s
    if solver == "gram":
        u, sig, vt = top_singular_gram(a, min(a.shape))
    else:
        u, sig, vt = jnp.linalg.svd(a, full_matrices=False)
    b, c_white = split_sigma_masked(u, sig, vt, rank)
    return b, unwhiten(c_white, s, triangular)


@functools.partial(jax.jit, static_argnames=("triangular", "update", "solver"))
def _whitened_group(w, s, refit_gram, ranks, *, triangular: bool, update: bool, solver: str):
    """SVD-LLM over a stack, given each matrix's whitening `s: [G, n, n]`, at `ranks: int [G]` (data: one compile
    per shape); returns full-width `(B [G, m, r], C [G, r, n], rel_loss [G])`, zero past each rank.

    With `update`, B is refit on `refit_gram`; the loss is measured on `refit_gram`.
    """

    def one(w, s, refit_gram, rank):
        b, c = whitened_factors_masked(w, s, rank, triangular, solver)
        if update:
            b = refit_left_masked(w, refit_gram, c, rank)
        return b, c, relative_activation_loss(w, b @ c, refit_gram)

    return jax.vmap(one)(w, s, refit_gram, ranks)


def svd_llm_group(w, gram, ranks, refit_gram=None, solver: str | None = None):
    """SVD-LLM for a stack of same-shape matrices at `ranks` (an int, or int `[G]`): `(B, C, rel_loss, routes)`,
    the factors full-width (`B: [G, m, r]`, `C: [G, r, n]`, r = min(m, n)) and zero past each rank: matrix j's
    factors are `B[j][:, :k_j]`, `C[j][:k_j]` (`_blocks.factor_block` cuts them on the host).

    `gram: [G, n, n]` decides the whitening (and so C). With `refit_gram`, B is
    refit on it (SVD-LLM's parameter update); refitting on `gram` itself would
    change nothing, since the whitened truncation is already optimal there.

    `solver="gram"` (the default for float64 stacks) takes the singular triples of `W S`
    from eigh of its smaller Gram matrix, which needs float64; `"svd"` (the default below
    float64) runs a full SVD.

    Cholesky runs batched; the rare matrices whose Cholesky fails get their fallback
    alone. The fallbacks' branches are not put under vmap: vmap turns `lax.cond`
    into running every branch, and XLA:CPU's concurrent scheduler was seen to
    deadlock on such a mix of LAPACK calls (576x576, jax 0.10.2, 2 cores).
    """
    solver = solver or ("gram" if w.dtype == jnp.float64 else "svd")
    if solver == "gram" and w.dtype != jnp.float64:
        raise ValueError(f"svd_llm_group(solver='gram') squares W S and needs float64 stacks, got {w.dtype}")
    chol = np.array(_cholesky_group(gram))  # a writable copy: failed rows are replaced below
    routes = [WHITEN_CHOLESKY] * len(chol)
    for j in range(len(chol)):
        if not np.isfinite(chol[j]).all():
            s_j, route = _whitening_one(gram[j])
            chol[j], routes[j] = np.asarray(s_j), int(route)
    triangular = WHITEN_EIGH not in routes
    update = refit_gram is not None
    b, c, loss = _whitened_group(
        w, jnp.asarray(chol), refit_gram if update else gram, jnp.broadcast_to(jnp.asarray(ranks, jnp.int32), (len(w),)), triangular=triangular,
        update=update, solver=solver,
    )
    return b, c, loss, routes


@dataclasses.dataclass(frozen=True)
class SvdLlmSettings(Settings):
    update: bool = setting(
        False,
        "svd-llm: whiten on the original model's activations, then refit the left factor in closed form on the "
        "compressed model's (needs --sequential)",
    )


@register(FACTORIZERS, "svd-llm", SvdLlmSettings, "SVD-LLM: Cholesky whitening, the per-layer optimum")
def svd_llm(update: bool = False) -> Factorizer:
    settings = SvdLlmSettings(update=update)

    def check(spec: RunSpec, cfg) -> None:
        if settings.update and not spec.sequential:
            raise UserError("--update refits on the compressed model's activations; it needs --sequential")

    def factor(inputs: BlockInputs, ranks, key) -> BlockResult:
        # --update: C from the original model's activations (ref_stats), B refit on the compressed model's.
        whiten_stats = inputs.ref_stats if settings.update else inputs.stats

        def group(names, ranks):
            w, gram, _ = stacked(inputs.block, whiten_stats, names, dtype)
            refit = None
            if settings.update:
                refit = np.stack([np.asarray(inputs.stats[PROJECTION_INPUT[n]]["gram"], dtype) for n in names])
            b, c, loss, routes = svd_llm_group(w, gram, ranks, refit)
            return b, c, loss, [{"whitening": WHITEN_NAMES[r]} for r in routes]

        with factor_precision(inputs.precision) as dtype:
            return factor_block(inputs.block, ranks, group, "svd-llm")

    def memory(cfg, spec: RunSpec, ranks) -> tuple[int, str]:
        from sigmascale_jax.compress.memory import group_memory
        from sigmascale_jax.linalg.precision import resolve_precision

        precision = resolve_precision(spec.precision)
        peak = group_memory(cfg, spec, ranks, _whitened_group, 1, triangular=True, update=settings.update,
                            solver="gram" if precision == "float64" else "svd")
        return peak, f"the largest same-shape group's whitened truncation ({precision})"

    return Factorizer("svd-llm", settings, factor, needs_dense_stream=settings.update, check=check, memory=memory)
