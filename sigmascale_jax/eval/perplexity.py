"""Perplexity over non-overlapping windows, as SVD-LLM and ZS-SVD measure it."""

from __future__ import annotations

import math

import jax
import numpy as np
from tqdm.auto import tqdm

from sigmascale_jax.errors import UserError
from sigmascale_jax.model.config import ModelConfig, check_token_windows
from sigmascale_jax.model.modeling import Params, stack_params, token_nll
from sigmascale_jax.parallel import data_size, device_chunks, fetch, on_device


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
    compiled shape serves every batch; padded rows are dropped before summing. The windows go to the
    device in one call before the loop, which runs under `jax.transfer_guard("disallow")`.
    """
    windows = check_token_windows(windows, cfg)
    n, seq_len = windows.shape
    devices = data_size(mesh)
    batch_size = min(batch_size, -(-n // devices) * devices)  # padding past the windows there are would only cost
    padded = -(-n // batch_size) * batch_size
    if padded > n:
        windows = np.concatenate([windows, np.repeat(windows[-1:], padded - n, axis=0)])
    # stacked once here (on the host): the blocks run as one loop, and no call re-stacks them
    params, chunks = on_device(stack_params(params), mesh), device_chunks(windows, batch_size, mesh)
    total = 0.0
    bar = tqdm(total=n, desc=desc, unit="win", disable=not progress, leave=False)

    def tally(start: int, sums: jax.Array) -> None:
        nonlocal total
        real = min(batch_size, n - start)
        sums = np.asarray(fetch(sums), np.float64)[:real]
        if not np.isfinite(sums).all():
            raise FloatingPointError(f"non-finite NLL in windows {start}..{start + real - 1} of {desc}")
        total += float(sums.sum())
        bar.update(real)
        bar.set_postfix(ppl=f"{math.exp(total / ((start + real) * (seq_len - 1))):.3f}")

    # Batch i+1 is queued before batch i's sums are fetched (explicitly, for the bar), so the device never waits
    # on the host; nothing else crosses between them inside the loop.
    pending = None
    with jax.transfer_guard("disallow"):
        for i, chunk in enumerate(chunks):
            sums = _window_nll_sums(params, chunk, cfg)
            if pending is not None:
                tally(*pending)
            pending = (i * batch_size, sums)
        tally(*pending)
    bar.close()
    tokens = n * (seq_len - 1)
    return {"ppl": math.exp(total / tokens), "nll": total / tokens, "tokens": tokens, "windows": n, "seq_len": seq_len}
