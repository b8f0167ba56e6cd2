"""Choosing the next token from logits: greedy or nucleus sampling, as jit-compiled device functions."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sigmascale_jax.model.config import GREEDY_BELOW


def sample(logits, key, temperature: float, top_p: float):
    """Next tokens `[B]` from `logits: [B, V]`: argmax at temperature 0 (or below `GREEDY_BELOW`), else nucleus
    sampling (top-p of the mass)."""
    if temperature < GREEDY_BELOW:
        return jnp.argmax(logits, axis=-1)
    # shifted so the largest is 0 before dividing: a small temperature cannot overflow to inf - inf = NaN
    logits = (logits - jnp.max(logits, axis=-1, keepdims=True)) / temperature
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above
        sorted_logits = jnp.where(before < top_p, sorted_logits, -jnp.inf)  # the first token always stays
        logits = jnp.full_like(logits, -jnp.inf).at[jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
    return jax.random.categorical(key, logits, axis=-1)


@functools.partial(jax.jit, static_argnames=("temperature", "top_p"))
def next_tokens(logits: jax.Array, key: jax.Array, i: jax.Array, temperature: float, top_p: float):
    """`([B, 1] int32 tokens, i + 1)`: the tokens after `logits: [B, T, V]`, drawn with `fold_in(key, i)`.

    The counter `i` stays on the device, so a decoding loop passes nothing from the host.
    """
    nxt = sample(logits[:, -1], jax.random.fold_in(key, i), temperature, top_p)
    return nxt.astype(jnp.int32)[:, None], i + 1
