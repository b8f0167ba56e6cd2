"""Calibration statistics of one block: Gram matrices and mean |x| of each projection's input."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sigmascale_jax.model.config import ModelConfig
from sigmascale_jax.model.modeling import Params, block_forward_taps, rope_cos_sin
from sigmascale_jax.parallel import device_chunks, fetch, on_device


@jax.jit(static_argnames=("cfg", "outputs"))
def block_stats_chunk(block: Params, x: jax.Array, cfg: ModelConfig, outputs: bool = True) -> tuple[jax.Array | None, dict]:
    """Block output `[B, T, D]` of `x: [B, T, D]` and, per tap, `(gram [n, n], abs_sum [n])` in float32.

    With `outputs=False` the output is None and XLA drops what only it needed (the down
    projection and the residual): ~1/6 of the pass on SmolLM2.
    """
    cos, sin = rope_cos_sin(cfg, jnp.arange(x.shape[1]))
    out, taps = block_forward_taps(block, x, cfg, cos, sin)
    stats = {}
    for name, a in taps.items():
        flat = a.reshape(-1, a.shape[-1]).astype(jnp.float32)
        stats[name] = (flat.T @ flat, jnp.abs(flat).sum(axis=0))
    return (out if outputs else None), stats


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(s, e)` with `s = fl(a + b)` and `a + b = s + e` exactly (Knuth's TwoSum, no branch)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


@functools.partial(jax.jit, donate_argnums=0)
def accumulate(acc: dict, stats: dict) -> dict:
    """Add one chunk's `{tap: (gram, abs_sum)}` to `acc = {tap: (hi, lo)}` on the device, in double-float32.

    Each sum is held as a float32 pair whose float64 sum `hi + lo` carries the total to ~n·ε₃₂² relative:
    as exact as summing the chunks in float64 on the host, without copying every chunk's Gram matrices
    off the device (at 8B shapes the MLP-down Gram alone is 0.8 GB per chunk).
    """
    out = {}
    for name, parts in stats.items():
        pairs = []
        for (hi, lo), x in zip(acc[name], parts):
            hi, err = _two_sum(hi, x)
            pairs.append((hi, lo + err))
        out[name] = tuple(pairs)
    return out


@jax.jit
def _first_sums(stats: dict) -> dict:
    """`{tap: ((gram, 0), (abs_sum, 0))}`: the double-float32 sums after the first chunk (made on the device)."""
    return jax.tree.map(lambda x: (x, jnp.zeros_like(x)), stats)


def block_stats(block: Params, xs: np.ndarray, cfg: ModelConfig, batch_size: int, mesh=None,
                outputs: bool = True) -> tuple[np.ndarray | None, dict]:
    """Run `xs: [N, T, D]` through the block in chunks; combine chunk statistics in (double-)float32 on the device.

    With a `mesh`, each chunk's windows are split over its data axis (`parallel.shard`). The weights and all
    of `xs` go to the device before the loop and the results come back after it, each in one call: the loop
    runs under `jax.transfer_guard("disallow")`.

    Returns the block's outputs `[N, T, D]` (float32; None with `outputs=False`, which skips
    computing them) and
    `{tap: {"gram": [n, n] f64, "absmean": [n] f64, "tokens": int}}`.
    """
    block, chunks = on_device(block, mesh), device_chunks(xs, batch_size, mesh)
    outs, acc = [], None
    with jax.transfer_guard("disallow"):
        for chunk in chunks:
            out, stats = block_stats_chunk(block, chunk, cfg, outputs)
            if outputs:
                outs.append(out)
            acc = _first_sums(stats) if acc is None else accumulate(acc, stats)
    outs, acc = fetch((outs, acc))
    tokens = xs.shape[0] * xs.shape[1]
    result = {}
    for name, ((g_hi, g_lo), (s_hi, s_lo)) in acc.items():
        gram = np.asarray(g_hi, np.float64) + np.asarray(g_lo, np.float64)
        if not np.isfinite(gram).all():
            raise FloatingPointError(f"non-finite Gram matrix of {name}: the block's activations overflowed")
        absmean = (np.asarray(s_hi, np.float64) + np.asarray(s_lo, np.float64)) / tokens
        result[name] = {"gram": gram, "absmean": absmean, "tokens": tokens}
    return (np.concatenate(outs) if outputs else None), result
