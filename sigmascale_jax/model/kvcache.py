"""A preallocated key/value cache and the decoder step that uses it (prefill and one-token decoding).

`step(params, tokens, cfg, cache)` runs `tokens: [B, T]` at positions `cache.length …`:
it writes their keys and values into the cache and attends over everything cached so
far, so the same jit-compiled function serves the prompt (T = its length) and each new
token (T = 1). Every projection form runs through `modeling.project`, so dense,
low-rank, PivGa and quantized models decode alike.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sigmascale_jax.model.config import ModelConfig
from sigmascale_jax.model.modeling import (
    Params,
    embed_tokens,
    is_stacked,
    lm_head,
    mlp_hidden,
    project,
    queries_keys_values,
    rms_norm,
    rope_cos_sin,
)
from sigmascale_jax.model.stacking import scan_inputs, stack_blocks, with_constants


class KVCache(NamedTuple):
    k: jax.Array  # [L, B, Hkv, S, hd]
    v: jax.Array  # [L, B, Hkv, S, hd]
    length: jax.Array  # [] int32: positions filled


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """An empty cache for `batch` sequences of up to `max_len` tokens."""
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))


def _attention(block: Params, x: jax.Array, cfg: ModelConfig, k_all: jax.Array, v_all: jax.Array, layer: int, start):
    """Self-attention of normed `x: [B, T, D]` at positions `start …`, through and into layer `layer` of the cache.

    `k_all, v_all: [L, B, Hkv, S, hd]` are updated in place (the step donates them): writing
    one layer's slice into the whole cache, rather than stacking new per-layer arrays, keeps
    a decode step from copying the entire cache.
    """
    b, t, _ = x.shape
    positions = start + jnp.arange(t)
    cos, sin = rope_cos_sin(cfg, positions)
    q, k, v = queries_keys_values(block, x, cfg, cos, sin)
    k_all = jax.lax.dynamic_update_slice(k_all, k.astype(k_all.dtype)[None], (layer, 0, 0, start, 0))
    v_all = jax.lax.dynamic_update_slice(v_all, v.astype(v_all.dtype)[None], (layer, 0, 0, start, 0))
    k_cache, v_cache = k_all[layer], v_all[layer]
    keys = jnp.arange(k_cache.shape[2])
    mask = keys[None, :] <= positions[:, None]  # [T, S]: causal, and nothing past what is written
    if cfg.sliding_window is not None:
        mask = mask & (positions[:, None] - keys[None, :] < cfg.sliding_window)
    scores = jnp.einsum("bhgqd,bhkd->bhgqk", q, k_cache.astype(q.dtype)).astype(jnp.float32)
    scores = jnp.where(mask, scores * (cfg.head_dim**-0.5), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
    out = jnp.einsum("bhgqk,bhkd->bhgqd", probs, v_cache).astype(x.dtype)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, cfg.num_heads * cfg.head_dim), k_all, v_all


@functools.partial(jax.jit, static_argnames="cfg", donate_argnames="cache")
def step(params: Params, tokens: jax.Array, cfg: ModelConfig, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Logits `[B, T, V]` (float32) of `tokens: [B, T]` following what `cache` holds, and the updated cache.

    The blocks run as one `lax.scan` where they stack (`stacking.stack_blocks`), the cache in the loop's carry
    (each layer's slice updated in place), else as a loop unrolled into the program. In a decode loop pass
    `modeling.stack_params(params)`, placed once (as `deploy.generate` does): a list of blocks is stacked inside
    every call, a copy of every weight per token.
    """
    start = cache.length
    x = embed_tokens(params, tokens)

    def layer(carry, inputs, constants=None):
        x, k_all, v_all = carry
        block, i = inputs
        block = with_constants(block, constants or {})
        h = rms_norm(x, block["attn_norm"], cfg.rms_norm_eps)
        a, k_all, v_all = _attention(block, h, cfg, k_all, v_all, i, start)
        x = x + project(block["o"], a)
        x = x + project(block["down"], mlp_hidden(block, rms_norm(x, block["mlp_norm"], cfg.rms_norm_eps)))
        return (x, k_all, v_all), None

    blocks = params["blocks"]
    stacked = blocks if is_stacked(blocks) else stack_blocks(blocks)
    carry = (x, cache.k, cache.v)
    if stacked is None:
        for i, block in enumerate(blocks):
            carry, _ = layer(carry, (block, i))
    else:
        xs, constants = scan_inputs(stacked)
        carry, _ = jax.lax.scan(lambda c, inp: layer(c, inp, constants), carry, (xs, jnp.arange(cfg.num_layers)))
    x, k_all, v_all = carry
    h = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    logits = (h @ lm_head(params).T.astype(h.dtype)).astype(jnp.float32)
    return logits, KVCache(k_all, v_all, start + tokens.shape[1])
