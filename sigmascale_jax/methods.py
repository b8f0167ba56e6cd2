"""Compressing one block's projections with a named method, same-shape matrices batched with vmap."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sigmascale_jax.config import ModelConfig
from sigmascale_jax.factorize import (
    WHITEN_CHOLESKY,
    WHITEN_EIGH,
    WHITEN_NAMES,
    asvd_factors,
    refit_left,
    relative_activation_loss,
    svd_factors,
    whitened_factors,
    whitening,
)
from sigmascale_jax.modeling import PROJECTION_INPUT, PROJECTIONS, Params
from sigmascale_jax.ranks import uniform_rank

METHODS = ("svd", "asvd", "svd-llm", "sigmascale")


@functools.partial(jax.jit, static_argnames=("rank", "method", "alpha"))
def _activation_blind_group(w, gram, absmean, *, rank: int, method: str, alpha: float):
    """svd / asvd over a stack `w: [G, m, n]`; returns `(B, C, rel_loss)`."""

    def one(w, gram, absmean):
        b, c = svd_factors(w, rank) if method == "svd" else asvd_factors(w, absmean, rank, alpha)
        return b, c, relative_activation_loss(w, b @ c, gram)

    return jax.vmap(one)(w, gram, absmean)


_cholesky_group = jax.jit(jax.vmap(jnp.linalg.cholesky))
_whitening_one = jax.jit(whitening)


@functools.partial(jax.jit, static_argnames=("rank", "triangular", "update"))
def _whitened_group(w, s, refit_gram, *, rank: int, triangular: bool, update: bool):
    """SVD-LLM over a stack, given each matrix's whitening `s: [G, n, n]`; returns `(B, C, rel_loss)`.

    With `update`, B is refit on `refit_gram`; the loss is measured on `refit_gram`.
    """

    def one(w, s, refit_gram):
        b, c = whitened_factors(w, s, rank, triangular)
        if update:
            b = refit_left(w, refit_gram, c)
        return b, c, relative_activation_loss(w, b @ c, refit_gram)

    return jax.vmap(one)(w, s, refit_gram)


def svd_llm_group(w, gram, rank: int, refit_gram=None):
    """SVD-LLM for a stack of same-shape matrices: `(B, C, rel_loss, routes)`.

    `gram: [G, n, n]` decides the whitening (and so C). With `refit_gram`, B is
    refit on it (SVD-LLM's parameter update); refitting on `gram` itself would
    change nothing, since the whitened truncation is already optimal there.

    Cholesky runs batched; the rare matrices whose Cholesky fails get their fallback
    alone. The fallbacks' branches are not put under vmap: vmap turns `lax.cond`
    into running every branch, and XLA:CPU's concurrent scheduler was seen to
    deadlock on such a mix of LAPACK calls (576x576, jax 0.10.2, 2 cores).
    """
    chol = np.array(_cholesky_group(gram))  # a writable copy: failed rows are replaced below
    routes = [WHITEN_CHOLESKY] * len(chol)
    for j in range(len(chol)):
        if not np.isfinite(chol[j]).all():
            s_j, route = _whitening_one(gram[j])
            chol[j], routes[j] = np.asarray(s_j), int(route)
    triangular = WHITEN_EIGH not in routes
    update = refit_gram is not None
    b, c, loss = _whitened_group(
        w, jnp.asarray(chol), refit_gram if update else gram, rank=rank, triangular=triangular, update=update
    )
    return b, c, loss, routes


def block_ranks(cfg: ModelConfig, ratio: float) -> dict[str, int]:
    """Uniform rank of each projection, from its own shape."""
    return {name: uniform_rank(m, n, ratio) for name, (m, n) in cfg.projection_shapes().items()}


def compress_block(
    block: Params,
    stats: dict,
    cfg: ModelConfig,
    ranks: dict[str, int],
    method: str,
    alpha: float = 0.5,
    refit_stats: dict | None = None,
) -> tuple[Params, dict[str, Any]]:
    """Factor every projection of a dense `block`.

    `stats`: `{tap: {"gram": [n, n], "absmean": [n]}}` from `stats.block_stats`.
    `refit_stats` (svd-llm only): statistics of other inputs to refit B on (SVD-LLM's
    update: C from the original model's activations, B from the compressed one's).
    Computation is float64 (whitening, SVD, refit); factors are stored in the
    block's dtype. Returns the factored block and per-matrix info (rank, whitening
    route, relative activation loss).
    """
    if method not in METHODS or method == "sigmascale":  # sigmascale.sigmascale_block needs activations
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    groups: dict[tuple, list[str]] = {}
    for name in PROJECTIONS:
        groups.setdefault((block[name]["w"].shape, ranks[name]), []).append(name)
    new = {k: v for k, v in block.items() if k not in PROJECTIONS}
    info: dict[str, Any] = {}
    with jax.enable_x64(True):
        for (shape, rank), names in groups.items():
            w = jnp.stack([jnp.asarray(np.asarray(block[n]["w"]), jnp.float64) for n in names])
            gram = jnp.stack([jnp.asarray(stats[PROJECTION_INPUT[n]]["gram"], jnp.float64) for n in names])
            absmean = jnp.stack([jnp.asarray(stats[PROJECTION_INPUT[n]]["absmean"], jnp.float64) for n in names])
            if method == "svd-llm":
                refit = None
                if refit_stats is not None:
                    refit = jnp.stack([jnp.asarray(refit_stats[PROJECTION_INPUT[n]]["gram"], jnp.float64) for n in names])
                b, c, loss, routes = svd_llm_group(w, gram, rank, refit)
            else:
                b, c, loss = _activation_blind_group(w, gram, absmean, rank=rank, method=method, alpha=alpha)
                routes = [None] * len(names)
            b, c, loss = np.asarray(b), np.asarray(c), np.asarray(loss)
            for j, n in enumerate(names):
                if not (np.isfinite(b[j]).all() and np.isfinite(c[j]).all()):
                    raise FloatingPointError(f"non-finite factors for projection {n} ({method}, rank {rank})")
                dtype = block[n]["w"].dtype
                p = {"b": jnp.asarray(b[j], dtype), "c": jnp.asarray(c[j], dtype)}
                if "bias" in block[n]:
                    p["bias"] = block[n]["bias"]
                new[n] = p
                info[n] = {
                    "shape": list(shape),
                    "rank": rank,
                    "rel_loss": float(loss[j]),
                    "whitening": WHITEN_NAMES.get(routes[j]),
                }
    return new, info
