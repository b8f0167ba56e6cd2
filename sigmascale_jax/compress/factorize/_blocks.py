"""What the per-matrix factorizers share: grouping a block's projections and assembling the factored block."""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax.numpy as jnp
import numpy as np

from sigmascale_jax.compress.plan import BlockResult, Params
from sigmascale_jax.model.modeling import PROJECTION_INPUT, PROJECTIONS


def low_rank_groups(block: Params, ranks: dict[str, Optional[int]]) -> dict[tuple[int, int], list[str]]:
    """`{shape: [projection, ...]}` of the block's projections by matrix shape, whatever their ranks (a rank is
    data, `rank_array`) and whether they are factored at all: a projection kept dense is computed with its group
    and dropped (`factor_block`), so every block of a model runs the same programs."""
    groups: dict[tuple, list[str]] = {}
    for name in PROJECTIONS:
        groups.setdefault(tuple(block[name]["w"].shape), []).append(name)
    return {shape: names for shape, names in groups.items() if any(ranks[n] is not None for n in names)}


def rank_array(ranks: dict[str, Optional[int]], names: list[str]) -> np.ndarray:
    """int32 `[G]`: the ranks of `names`, as data for a compiled group function (1 for a projection kept dense,
    whose factors are dropped)."""
    return np.asarray([ranks[n] or 1 for n in names], np.int32)


def stacked(block: Params, stats: dict, names: list[str], dtype=jnp.float64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stacks `w: [G, m, n]`, `gram: [G, n, n]`, `absmean: [G, n]` of `names` in `dtype`, on the host (a device
    stack would compile per group size). float64: call inside `linalg.precision.factor_precision`, which yields
    the dtype."""
    dtype = np.dtype(dtype)
    w = np.stack([np.asarray(block[n]["w"], dtype) for n in names])
    gram = np.stack([np.asarray(stats[PROJECTION_INPUT[n]]["gram"], dtype) for n in names])
    absmean = np.stack([np.asarray(stats[PROJECTION_INPUT[n]]["absmean"], dtype) for n in names])
    return w, gram, absmean


def dense_record(shape: tuple[int, int]) -> dict[str, Any]:
    """compression.json's record of a projection kept dense."""
    return {"shape": list(shape), "rank": min(shape), "dense": True, "rel_loss": 0.0, "whitening": None}


def factor_block(
    block: Params,
    ranks: dict[str, Optional[int]],
    group_fn: Callable[[list[str], np.ndarray], tuple[Any, Any, Any, list[dict]]],
    method: str,
) -> BlockResult:
    """Factor every low-rank projection of `block` with `group_fn(names, ranks) -> (B, C, rel_loss, extras)`.

    `names` are the same-shape projections and `ranks: int32 [G]` theirs; `B: [G, m, r]`, `C: [G, r, n]`
    (r = min(m, n)) are full-width, zero past each matrix's rank (`lowrank.split_sigma_masked`), and are cut to
    it here, on the host, so no compiled function sees a rank as a shape. `rel_loss: [G]`; `extras[j]` is merged
    into projection j's record. Factors are stored in the block's dtype; projections with rank None stay dense.
    """
    new = {k: v for k, v in block.items() if k not in PROJECTIONS}
    info: dict[str, dict] = {}
    for shape, names in low_rank_groups(block, ranks).items():
        ks = rank_array(ranks, names)
        b, c, loss, extras = group_fn(names, ks)
        b, c, loss = np.asarray(b), np.asarray(c), np.asarray(loss)
        for j, n in enumerate(names):
            if ranks[n] is None:  # computed with its group, kept dense
                continue
            k = int(ks[j])
            bj, cj = b[j][:, :k], c[j][:k]
            if not (np.isfinite(bj).all() and np.isfinite(cj).all()):
                raise FloatingPointError(f"non-finite factors for projection {n} ({method}, rank {k})")
            dtype = np.dtype(block[n]["w"].dtype)  # cast on the host: an eager device cast compiles once per rank
            p = {"b": np.ascontiguousarray(bj, dtype), "c": np.ascontiguousarray(cj, dtype)}
            if "bias" in block[n]:
                p["bias"] = block[n]["bias"]
            new[n] = p
            info[n] = {"shape": list(shape), "rank": k, "dense": False, "rel_loss": float(loss[j]), **extras[j]}
    for n in PROJECTIONS:
        if ranks[n] is None:
            new[n] = block[n]
            info[n] = dense_record(tuple(block[n]["w"].shape))
    return BlockResult(new, {n: info[n] for n in PROJECTIONS})
