"""Log-likelihood of continuations given contexts, batched and jit-compiled.

Tokenization follows lm-evaluation-harness's Hugging Face backend: trailing spaces
of the context move to the continuation; `context + continuation` and `context`
are encoded with the tokenizer's default special tokens and the continuation's
tokens are the whole encoding past the context's; an empty context becomes the
prefix token (BOS, else EOS); sequences longer than the model's window lose tokens
on the left. The model reads `(context + continuation)[:-1]` and the score is the
sum of the continuation tokens' log-probabilities.

Requests are sorted by length and padded on the right (harmless to a causal model)
to a few bucket lengths, so only a handful of shapes are compiled.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from sigmascale_jax.config import ModelConfig
from sigmascale_jax.modeling import Params, forward


def prefix_token_id(tok: Any) -> int:
    """The token an empty context becomes: BOS if the tokenizer has one, else EOS (as the harness)."""
    return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id


def encode(tok: Any, text: str) -> list[int]:
    """The harness's `tok_encode`: default special tokens, except when the text already starts with the prefix token."""
    prefix = tok.decode(prefix_token_id(tok))
    if prefix and text.startswith(prefix):
        return tok(text, add_special_tokens=False).input_ids
    return tok(text).input_ids


def encode_pair(tok: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """`(context tokens, continuation tokens)` of one request, split as the harness splits them."""
    if context == "":
        cont = tok(continuation, add_special_tokens=False).input_ids
        prefix = prefix_token_id(tok)
        return ([prefix], cont) if cont[0] != prefix else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(tok, context + continuation)
    ctx = encode(tok, context)
    return ctx, whole[len(ctx) :]


def bucket_length(n: int, smallest: int = 32) -> int:
    """The padded length for `n` tokens: `smallest · 2^j` or 1.5 times that, the first that holds n."""
    size = smallest
    while True:
        if n <= size:
            return size
        if n <= size * 3 // 2:
            return size * 3 // 2
        size *= 2


@jax.jit(static_argnames="cfg")
def next_token_logprobs(params: Params, tokens: jax.Array, cfg: ModelConfig) -> jax.Array:
    """`[B, T]` log-probability the model gives, at each position t of `tokens: [B, T + 1]`, to token t + 1."""
    logits = forward(params, tokens[:, :-1], cfg)
    target = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
    return target - jax.nn.logsumexp(logits, axis=-1)


def score_requests(
    params: Params,
    cfg: ModelConfig,
    requests: Sequence[tuple[list[int], list[int]]],
    tokens_per_batch: int = 4096,
    desc: str = "loglikelihood",
    progress: bool = True,
) -> np.ndarray:
    """Summed log-likelihood `[N]` (float64) of each `(context tokens, continuation tokens)` request.

    Requests run longest first, grouped into batches of `tokens_per_batch // bucket`
    rows padded to the bucket length; a short last batch is padded with copies of its
    last row so every call of a bucket has one shape.
    """
    max_len = cfg.max_position_embeddings
    seqs = []
    for ctx, cont in requests:
        if not ctx or not cont:
            raise ValueError("every request needs at least one context and one continuation token")
        seqs.append((ctx + cont)[-(max_len + 1) :])
    cont_len = np.array([len(cont) for _, cont in requests])
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out = np.zeros(len(seqs), np.float64)
    bar = tqdm(total=len(seqs), desc=desc, unit="req", disable=not progress, leave=False)
    start = 0
    while start < len(order):
        length = bucket_length(len(seqs[order[start]]))
        rows = max(1, tokens_per_batch // length)
        batch = order[start : start + rows]
        tokens = np.zeros((rows, length), np.int32)  # pad id 0: padding sits after every scored token
        for r, i in enumerate(batch):
            tokens[r, : len(seqs[i])] = seqs[i]
        tokens[len(batch) :] = tokens[len(batch) - 1]
        logp = np.asarray(next_token_logprobs(params, jnp.asarray(tokens), cfg), np.float64)
        for r, i in enumerate(batch):
            n = len(seqs[i])  # positions 0..n-2 predict tokens 1..n-1; the last cont_len of them are scored
            out[i] = logp[r, n - 1 - cont_len[i] : n - 1].sum()
        if not np.isfinite(out[batch]).all():
            raise FloatingPointError(f"non-finite log-likelihood in {desc}")
        bar.update(len(batch))
        start += len(batch)
    bar.close()
    return out

