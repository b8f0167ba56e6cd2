"""The gradient of the model's calibration loss with respect to every projection, one block's memory at a time.

The loss is the mean next-token cross-entropy over every predicted token of the
windows. A forward pass keeps each block's inputs (on the host); the head gives
the cotangent of the last hidden state; then a reverse pass applies `jax.vjp` of
one block at a time to its stored inputs, yielding that block's weight gradients
and the cotangent of its inputs. Only one block's weights and one chunk of
activations are on the device at once, as in the compression pipeline, so the
same code serves an 8B model on one accelerator.

Gradients are taken with respect to dense weights: a factored projection
(`{"b", "c"}`) is densified to `W = B C` first (the gradient at that point).
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sigmascale_jax.model.config import ModelConfig
from sigmascale_jax.model.modeling import PROJECTIONS, Params, block_forward, lm_head, rms_norm, rope_cos_sin


def densify(block: Params) -> Params:
    """The block with every factored projection `{"b", "c"}` replaced by `{"w": B C}` (bias kept): `densified`."""
    from sigmascale_jax.model.modeling import densified

    return densified(block)


def _head_nll_sum(outer: Params, h: jax.Array, tokens: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Summed next-token NLL of last hidden states `h: [B, T, D]` for `tokens: [B, T]` (T−1 predictions per row)."""
    x = rms_norm(h, outer["final_norm"], cfg.rms_norm_eps)
    logits = (x[:, :-1] @ lm_head(outer).T.astype(x.dtype)).astype(jnp.float32)
    target = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(jax.nn.logsumexp(logits, axis=-1) - target)


@functools.partial(jax.jit, static_argnames="cfg")
def _head_vjp(outer: Params, h: jax.Array, tokens: jax.Array, scale: jax.Array, cfg: ModelConfig):
    """`(scale · Σ NLL, ∂(scale · Σ NLL)/∂h)` for one chunk."""
    loss, vjp = jax.vjp(lambda h_: scale * _head_nll_sum(outer, h_, tokens, cfg), h)
    return loss, vjp(jnp.ones_like(loss))[0]


@functools.partial(jax.jit, static_argnames="cfg")
def _block_vjp(block: Params, x: jax.Array, dy: jax.Array, cfg: ModelConfig):
    """Cotangents `(∂/∂block, ∂/∂x)` of `⟨dy, block_forward(block, x)⟩` for `x, dy: [B, T, D]`."""
    cos, sin = rope_cos_sin(cfg, jnp.arange(x.shape[1]))
    _, vjp = jax.vjp(lambda p, x_: block_forward(p, x_, cfg, cos, sin), block, x)
    return vjp(dy)


@functools.partial(jax.jit, static_argnames="cfg", donate_argnums=3)
def _block_vjp_sum(block: Params, x: jax.Array, dy: jax.Array, acc: dict, cfg: ModelConfig):
    """`(acc + ∂⟨dy, f(x)⟩/∂W per projection, ∂/∂x)`: one chunk's VJP, its weight gradients summed on the device."""
    dblock, dx = _block_vjp(block, x, dy, cfg)
    return {n: acc[n] + dblock[n]["w"] for n in acc}, dx


def _block_fwd(block: Params, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """The block on `x: [B, T, D]`: the propagation's compiled program (`modeling.block_apply`), shared with it."""
    from sigmascale_jax.model.modeling import block_apply

    return block_apply(block, x, cfg)


def reverse_pass(
    outer: Params,
    get_block: Callable[[int], Params],
    num_blocks: int,
    tokens: np.ndarray,
    cfg: ModelConfig,
    on_block: Callable[[int, dict[str, np.ndarray], np.ndarray], None],
    *,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "gradient",
) -> float:
    """Mean next-token cross-entropy of `tokens: [N, T]`; calls `on_block(i, grads, xs)` from the last block to the first.

    `grads`: `{projection: ∂loss/∂W [out, in]}` (float32, host) of block i, whose
    factored projections are taken densified; `xs: [N, T, D]` are block i's inputs.
    `get_block(i)` returns block i's params (it is called twice per block: forward
    and reverse, so nothing but the inputs is kept between the passes).
    """
    from tqdm.auto import tqdm

    tokens = np.asarray(tokens, np.int32)
    n = len(tokens)
    chunks = [slice(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    put = jax.device_put  # not jnp.asarray, which compiles a transfer program per shape
    scale = put(np.float32(1.0 / (n * (tokens.shape[1] - 1))))
    bar = tqdm(total=2 * num_blocks, desc=desc, unit="block", disable=not progress, leave=False)
    inputs = []
    x = np.asarray(outer["embed"])[tokens]  # [N, T, D]
    for i in range(num_blocks):
        inputs.append(x)
        block = put(densify(get_block(i)))
        x = np.concatenate([np.asarray(_block_fwd(block, put(x[c]), cfg)) for c in chunks])
        bar.update()
    loss, dy = 0.0, []
    outer = put(outer)
    for c in chunks:
        part, g = _head_vjp(outer, put(x[c]), put(tokens[c]), scale, cfg)
        loss += float(part)
        dy.append(np.asarray(g))
    dy = np.concatenate(dy)
    for i in reversed(range(num_blocks)):
        block = put(densify(get_block(i)))
        xs = inputs[i]
        grads = put({name: np.zeros(block[name]["w"].shape, np.float32) for name in PROJECTIONS})
        dx = []
        for c in chunks:
            grads, dxc = _block_vjp_sum(block, put(xs[c]), put(dy[c]), grads, cfg)
            dx.append(np.asarray(dxc))
        dy = np.concatenate(dx)
        on_block(i, {name: np.asarray(g, np.float32) for name, g in grads.items()}, xs)
        inputs[i] = None  # free the host copy as soon as it is used
        bar.update()
    bar.close()
    if not np.isfinite(loss):
        raise FloatingPointError("non-finite calibration loss in the gradient pass")
    return loss


def model_grads(
    outer: Params,
    blocks: Sequence[Params] | Callable[[int], Params],
    tokens: np.ndarray,
    cfg: ModelConfig,
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> tuple[float, list[dict[str, np.ndarray]]]:
    """Mean next-token cross-entropy of `tokens: [N, T]` and `[{projection: ∂loss/∂W}]` for every block.

    `blocks`: the blocks' params, or a function `i -> params` (e.g. loading each dense
    block from disk). Equals `jax.grad` of the whole model's loss (tested).
    """
    get = blocks if callable(blocks) else blocks.__getitem__
    num = cfg.num_layers
    out: list = [None] * num

    def keep(i, grads, xs):
        out[i] = grads

    loss = reverse_pass(outer, get, num, tokens, cfg, keep, batch_size=batch_size, progress=progress)
    return loss, out


def model_loss(
    outer: Params,
    get_block: Callable[[int], Params],
    tokens: np.ndarray,
    cfg: ModelConfig,
    *,
    batch_size: int = 8,
) -> float:
    """Mean next-token cross-entropy of `tokens: [N, T]` (forward only, one block on the device at a time)."""
    tokens = np.asarray(tokens, np.int32)
    n = len(tokens)
    chunks = [slice(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    put = jax.device_put
    scale = put(np.float32(1.0 / (n * (tokens.shape[1] - 1))))
    x = np.asarray(outer["embed"])[tokens]
    for i in range(cfg.num_layers):
        block = put(densify(get_block(i)))
        x = np.concatenate([np.asarray(_block_fwd(block, put(x[c]), cfg)) for c in chunks])
    outer = put(outer)
    return float(sum(float(_head_loss(outer, put(x[c]), put(tokens[c]), scale, cfg)) for c in chunks))


@functools.partial(jax.jit, static_argnames="cfg")
def _head_loss(outer: Params, h: jax.Array, tokens: jax.Array, scale: jax.Array, cfg: ModelConfig) -> jax.Array:
    return scale * _head_nll_sum(outer, h, tokens, cfg)
