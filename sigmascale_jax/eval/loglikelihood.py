"""Log-likelihood of continuations given contexts, batched and jit-compiled.

Tokenization follows lm-evaluation-harness's Hugging Face backend: trailing spaces
of the context move to the continuation; `context + continuation` and `context`
are encoded with the tokenizer's default special tokens and the continuation's
tokens are the whole encoding past the context's; an empty context becomes the
prefix token (BOS, else EOS); sequences longer than the model's window lose tokens
on the left. The score is the sum of the continuation tokens' log-probabilities,
each given the context and the continuation's earlier tokens.

The choices of one question share their context, so they are packed into one
row behind a single copy of it (`modeling.Packing` keeps each choice from seeing
the others and gives it the positions it would have alone), and several questions
share a row: the same numbers as one sequence per request, for about half the
tokens on multiple-choice sets. Rows are padded to a few bucket lengths, so only a
handful of shapes are compiled.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from sigmascale_jax.model.config import ModelConfig
from sigmascale_jax.model.modeling import Packing, Params, hidden_states, lm_head, stack_params


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


@dataclasses.dataclass
class Group:
    """Requests that share their context tokens (the choices of one question), packed into one row together.

    The row holds the context once, then each continuation without its last token
    (nothing reads the prediction after it): continuation j's first token is read
    off the context's last position, its later tokens off its own earlier ones.
    """

    context: list[int]
    continuations: list[list[int]]
    ids: list[int]  # request indices

    @property
    def tokens(self) -> int:
        return len(self.context) + sum(len(c) - 1 for c in self.continuations)

    @property
    def reads(self) -> int:
        return sum(len(c) for c in self.continuations)


def group_requests(requests: Sequence[tuple[list[int], list[int]]], max_len: int) -> list[Group]:
    """Consecutive requests with equal context tokens form a group; a group that would not fit
    in `max_len` positions splits into one request each, left-truncated as the harness does."""
    groups: list[Group] = []
    for i, (ctx, cont) in enumerate(requests):
        if not ctx or not cont:
            raise ValueError("every request needs at least one context and one continuation token")
        if groups and groups[-1].context == ctx:
            groups[-1].continuations.append(cont)
            groups[-1].ids.append(i)
        else:
            groups.append(Group(list(ctx), [cont], [i]))
    out = []
    for g in groups:
        if g.tokens <= max_len:
            out.append(g)
            continue
        for i, cont in zip(g.ids, g.continuations):
            # the harness feeds (ctx + cont)[-(max_len + 1):][:-1]
            kept = (g.context + cont)[-(max_len + 1) :]
            out.append(Group(kept[: len(kept) - len(cont)], [cont], [i]))
    return out


def pack_rows(groups: list[Group], length: int, rows: int) -> list[list[Group]]:
    """First fit of `groups` (largest first) into at most `rows` rows of `length` tokens and reads."""
    packed: list[list[Group]] = []
    room: list[list[int]] = []  # [tokens, reads] left per row
    for g in groups:
        for r, left in enumerate(room):
            if g.tokens <= left[0] and g.reads <= left[1]:
                packed[r].append(g)
                left[0] -= g.tokens
                left[1] -= g.reads
                break
        else:
            if len(packed) == rows:
                break
            packed.append([g])
            room.append([length - g.tokens, length - g.reads])
    return packed


def layout_rows(rows: list[list[Group]], length: int, n_rows: int) -> tuple[np.ndarray, ...]:
    """Token, position, doc, part, read-position and read-token arrays `[n_rows, length]` of packed rows,
    and `[(row, read slot, request id)]` to sum the reads back."""
    tokens, positions, read_pos, read_tok = (np.zeros((n_rows, length), np.int32) for _ in range(4))
    doc, part = np.full((n_rows, length), -1, np.int32), np.zeros((n_rows, length), np.int32)
    owners = []
    for r, groups in enumerate(rows):
        at = slot = 0
        for d, g in enumerate(groups):
            n = len(g.context)
            tokens[r, at : at + n], positions[r, at : at + n], doc[r, at : at + n] = g.context, np.arange(n), d
            last_ctx = at + n - 1
            at += n
            for j, (cont, rid) in enumerate(zip(g.continuations, g.ids), start=1):
                body = cont[:-1]
                span = slice(at, at + len(body))
                tokens[r, span], positions[r, span], doc[r, span], part[r, span] = body, np.arange(n, n + len(body)), d, j
                # token 0 is predicted at the context's last position, token t at body token t - 1
                read_pos[r, slot : slot + len(cont)] = [last_ctx, *range(at, at + len(body))]
                read_tok[r, slot : slot + len(cont)] = cont
                owners.append((r, slice(slot, slot + len(cont)), rid))
                slot += len(cont)
                at += len(body)
    return tokens, Packing(positions, doc, part), read_pos, read_tok, owners


@jax.jit(static_argnames="cfg")
def read_logprobs(
    params: Params, tokens: jax.Array, packing: Packing, read_pos: jax.Array, read_tok: jax.Array, cfg: ModelConfig
) -> jax.Array:
    """`[B, M]`: log-probability the model gives, at position `read_pos[b, m]` of packed `tokens: [B, T]`, to `read_tok[b, m]`."""
    h = hidden_states(params, tokens, cfg, packing)
    logits = (h @ lm_head(params).T.astype(h.dtype)).astype(jnp.float32)  # [B, T, V]
    picked = jnp.take_along_axis(jnp.take_along_axis(logits, read_pos[..., None], axis=1), read_tok[..., None], axis=2)[..., 0]
    return picked - jnp.take_along_axis(jax.nn.logsumexp(logits, axis=-1), read_pos, axis=1)


def score_requests(
    params: Params,
    cfg: ModelConfig,
    requests: Sequence[tuple[list[int], list[int]]],
    tokens_per_batch: int = 4096,
    desc: str = "loglikelihood",
    progress: bool = True,
) -> np.ndarray:
    """Summed log-likelihood `[N]` (float64) of each `(context tokens, continuation tokens)` request.

    Requests sharing their context are packed into one row (`Group`); rows of one
    call have a bucket length L and hold several groups, largest first, with
    `max(1, tokens_per_batch // L)` rows per call (short last calls are padded, so
    each bucket compiles once).
    """
    params = jax.device_put(stack_params(params))  # once: the blocks run as one loop, no call re-stacks them
    pending = sorted(group_requests(requests, cfg.max_position_embeddings), key=lambda g: -max(g.tokens, g.reads))
    out = np.zeros(len(requests), np.float64)
    bar = tqdm(total=len(requests), desc=desc, unit="req", disable=not progress, leave=False)
    while pending:
        length = bucket_length(max(pending[0].tokens, pending[0].reads))
        n_rows = max(1, min(tokens_per_batch // length, len(requests)))  # never more rows than requests
        rows = pack_rows(pending, length, n_rows)
        placed = {id(g) for row in rows for g in row}
        pending = [g for g in pending if id(g) not in placed]
        tokens, packing, read_pos, read_tok, owners = layout_rows(rows, length, n_rows)
        logp = np.asarray(
            read_logprobs(params, jnp.asarray(tokens), jax.tree.map(jnp.asarray, packing), jnp.asarray(read_pos),
                          jnp.asarray(read_tok), cfg),
            np.float64,
        )
        for r, span, rid in owners:
            out[rid] = logp[r, span].sum()
        ids = [rid for _, _, rid in owners]
        if not np.isfinite(out[ids]).all():
            raise FloatingPointError(f"non-finite log-likelihood in {desc}")
        bar.update(len(ids))
    bar.close()
    return out
