"""Calibration statistics of one block: Gram matrices and mean |x| of each projection's input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sigmascale_jax.config import ModelConfig
from sigmascale_jax.modeling import Params, block_forward_taps, rope_cos_sin
from sigmascale_jax.parallel import replicate, shard


@jax.jit(static_argnames="cfg")
def block_stats_chunk(block: Params, x: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, dict]:
    """Block output `[B, T, D]` of `x: [B, T, D]` and, per tap, `(gram [n, n], abs_sum [n])` in float32."""
    cos, sin = rope_cos_sin(cfg, jnp.arange(x.shape[1]))
    out, taps = block_forward_taps(block, x, cfg, cos, sin)
    stats = {}
    for name, a in taps.items():
        flat = a.reshape(-1, a.shape[-1]).astype(jnp.float32)
        stats[name] = (flat.T @ flat, jnp.abs(flat).sum(axis=0))
    return out, stats


def block_stats(block: Params, xs: np.ndarray, cfg: ModelConfig, batch_size: int, mesh=None) -> tuple[np.ndarray, dict]:
    """Run `xs: [N, T, D]` through the block in chunks; combine chunk statistics in float64.

    With a `mesh`, each chunk's windows are split over its data axis (`parallel.shard`).

    Returns the block's outputs `[N, T, D]` (float32) and
    `{tap: {"gram": [n, n] f64, "absmean": [n] f64, "tokens": int}}`.
    """
    outs = []
    acc: dict = {}
    block = replicate(block, mesh)
    for start in range(0, len(xs), batch_size):
        out, stats = block_stats_chunk(block, shard(jnp.asarray(xs[start : start + batch_size]), mesh), cfg)
        outs.append(np.asarray(out))
        for name, (g, s) in stats.items():
            g, s = np.asarray(g, np.float64), np.asarray(s, np.float64)
            if name in acc:
                acc[name]["gram"] += g
                acc[name]["abs_sum"] += s
            else:
                acc[name] = {"gram": g, "abs_sum": s}
    tokens = xs.shape[0] * xs.shape[1]
    for name, a in acc.items():
        if not np.isfinite(a["gram"]).all():
            raise FloatingPointError(f"non-finite Gram matrix of {name}: the block's activations overflowed")
        a["absmean"] = a.pop("abs_sum") / tokens
        a["tokens"] = tokens
    return np.concatenate(outs), acc
