"""Compressing one block's projections with a named method, same-shape matrices batched with vmap."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sigmascale_jax.config import ModelConfig
from sigmascale_jax.factorize import (
    WHITEN_NAMES,
    asvd_factors,
    refit_left,
    relative_activation_loss,
    svd_factors,
    svd_llm_factors_with_route,
)
from sigmascale_jax.modeling import PROJECTION_INPUT, PROJECTIONS, Params
from sigmascale_jax.ranks import uniform_rank

METHODS = ("svd", "asvd", "svd-llm")


@functools.partial(jax.jit, static_argnames=("rank", "method", "update", "alpha"))
def _factor_group(w, gram, absmean, *, rank: int, method: str, update: bool, alpha: float):
    """vmap over a stack of same-shape matrices `w: [G, m, n]`; returns `(B, C, route, rel_loss)`."""

    def one(w, gram, absmean):
        route = jnp.asarray(-1)
        if method == "svd":
            b, c = svd_factors(w, rank)
        elif method == "asvd":
            b, c = asvd_factors(w, absmean, rank, alpha)
        else:
            b, c, route = svd_llm_factors_with_route(w, gram, rank)
        if update:
            b = refit_left(w, gram, c)
        return b, c, route, relative_activation_loss(w, b @ c, gram)

    return jax.vmap(one)(w, gram, absmean)


def block_ranks(cfg: ModelConfig, ratio: float) -> dict[str, int]:
    """Uniform rank of each projection, from its own shape."""
    return {name: uniform_rank(m, n, ratio) for name, (m, n) in cfg.projection_shapes().items()}


def compress_block(
    block: Params,
    stats: dict,
    cfg: ModelConfig,
    ranks: dict[str, int],
    method: str,
    update: bool = False,
    alpha: float = 0.5,
) -> tuple[Params, dict[str, Any]]:
    """Factor every projection of a dense `block`.

    `stats`: `{tap: {"gram": [n, n], "absmean": [n]}}` from `stats.block_stats`.
    Computation is float64 (whitening, SVD, refit); factors are stored in the
    block's dtype. Returns the factored block and per-matrix info (rank, whitening
    route, relative activation loss).
    """
    if method not in METHODS:
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
            b, c, route, loss = _factor_group(w, gram, absmean, rank=rank, method=method, update=update, alpha=alpha)
            b, c, route, loss = np.asarray(b), np.asarray(c), np.asarray(route), np.asarray(loss)
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
                    "whitening": WHITEN_NAMES.get(int(route[j])),
                }
    return new, info
