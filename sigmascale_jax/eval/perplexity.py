"""Perplexity over non-overlapping windows, as SVD-LLM and ZS-SVD measure it."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from sigmascale_jax.errors import UserError
from sigmascale_jax.model.config import ModelConfig
from sigmascale_jax.model.modeling import Params, token_nll
from sigmascale_jax.parallel import replicate, shard


def make_windows(ids: np.ndarray, seq_len: int, max_windows: int | None = None) -> np.ndarray:
    """`[N, seq_len]` non-overlapping windows of `ids: [T]`; the tail shorter than a window is dropped."""
    n = len(ids) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise UserError(f"the text has {len(ids)} tokens, fewer than one window of --seq-len {seq_len}")
    return np.asarray(ids[: n * seq_len], dtype=np.int32).reshape(n, seq_len)


@jax.jit(static_argnames="cfg")
def _window_nll_sums(params: Params, windows: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Summed NLL `[B]` of each window's predicted tokens."""
    return token_nll(params, windows, cfg).sum(axis=-1)


def perplexity(
    params: Params,
    cfg: ModelConfig,
    windows: np.ndarray,
    batch_size: int = 1,
    desc: str = "perplexity",
    progress: bool = True,
    mesh=None,
) -> dict:
    """exp(mean NLL over every predicted token) of `windows: [N, L]` (each batch split over `mesh`'s data axis).

    Batches are padded to `batch_size` (repeating the last window) so one
    compiled shape serves every batch; padded rows are dropped before summing.
    """
    n, seq_len = windows.shape
    devices = 1 if mesh is None else mesh.shape["data"]
    batch_size = min(batch_size, -(-n // devices) * devices)  # padding past the windows there are would only cost
    total = 0.0
    params = replicate(params, mesh)
    bar = tqdm(total=n, desc=desc, unit="win", disable=not progress, leave=False)
    for start in range(0, n, batch_size):
        chunk = windows[start : start + batch_size]
        real = len(chunk)
        if real < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - real, axis=0)])
        sums = np.asarray(_window_nll_sums(params, shard(jnp.asarray(chunk), mesh), cfg), dtype=np.float64)[:real]
        if not np.isfinite(sums).all():
            raise FloatingPointError(f"non-finite NLL in windows {start}..{start + real - 1} of {desc}")
        total += float(sums.sum())
        bar.update(real)
        bar.set_postfix(ppl=f"{math.exp(total / ((start + real) * (seq_len - 1))):.3f}")
    bar.close()
    tokens = n * (seq_len - 1)
    return {"ppl": math.exp(total / tokens), "nll": total / tokens, "tokens": tokens, "windows": n, "seq_len": seq_len}
