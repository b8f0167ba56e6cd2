"""The decoder as pure functions of a params pytree, and a Flax NNX module around them.

Params pytree (HF layout, `w: [out, in]`)::

    {"embed": [V, D],
     "blocks": [ {"attn_norm": [D],
                  "q": P, "k": P, "v": P, "o": P,        # P: a projection, see `project`
                  "q_norm": [hd], "k_norm": [hd],        # Qwen3 only
                  "mlp_norm": [D], "gate": P, "up": P, "down": P}, ... ],
     "final_norm": [D],
     "lm_head": [V, D]}                                  # absent with tied embeddings

Each projection decides its own form by its keys, so one code path runs dense,
compressed and mixed models. Blocks are a list (compressed blocks have per-matrix
ranks, so their shapes differ), or the stacked form `model/stacking.py` makes of
them, `params["blocks"]` a dict of arrays with a leading layer axis: the decoder runs
stacked blocks as one `lax.scan` and stacks listed ones itself where that costs
little (`run_blocks`), so its programs do not grow with depth.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sigmascale_jax.model.config import ModelConfig, rope_inv_freq

Params = dict[str, Any]
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


def project(p: Any, x: jax.Array) -> jax.Array:
    """Apply one projection to `x: [..., in]`, giving `[..., out]`.

    `p` is a typed leaf (`model/leaves.py`; an encoder's, as PivGa; quantized or not), or one of
    the dict forms the compressor works on: dense `{"w": [out, in]}` or factored
    `{"b": [out, k], "c": [k, in]}`, either with an optional `"bias": [out]`.
    """
    from sigmascale_jax.model.leaves import as_leaf

    return as_leaf(p).apply(x)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, statistics in float32 (as transformers does)."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * x32.astype(x.dtype)


class Packing(NamedTuple):
    """Several sequences sharing rows: `positions, doc, part: [B, T]` (int).

    Token t sees token s ≤ t of the same `doc` when s is in part 0 (a shared
    context) or in t's own part: the choices of one multiple-choice question ride
    in one row behind a single copy of their context, each seeing only the context
    and itself, at the positions it would have alone. `doc` −1 marks padding.
    """

    positions: jax.Array
    doc: jax.Array
    part: jax.Array


def rope_cos_sin(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin `[..., T, head_dim]` for integer `positions: [..., T]`, in the rotate-half layout."""
    inv = jnp.asarray(rope_inv_freq(cfg))
    freqs = positions.astype(jnp.float32)[..., None] * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate `x: [B, T, H, hd]` by `cos, sin: [T, hd]` (shared by the batch) or `[B, T, hd]`."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[..., None, :].astype(x.dtype) + rotated * sin[..., None, :].astype(x.dtype)


# Queries per attention chunk: each chunk scores only the keys it may see (causal),
# which halves the work and keeps the scores cache-sized. Measured on 2 CPU cores
# (SmolLM2, T=2048): 0.45 s per block unchunked, 0.067 s with 128.
ATTENTION_CHUNK = 128
# The chunks run as loops (`lax.scan`), not unrolled into the program: chunks of one segment share a key length
# (the segment's end), so at most this many loop bodies are compiled whatever T is, at most 1/SEGMENTS more
# score work than scoring each chunk against exactly its own prefix.
ATTENTION_SEGMENTS = 4


def chunk_mask(cfg: ModelConfig, start: Any, size: int, keys: int, packing: Packing | None = None) -> jax.Array:
    """Which keys `[:keys]` the queries `start … start + size − 1` may see: `[q, k]`, or `[B, q, k]` with a packing.

    `start` may be traced (a loop's index). Causal, inside Mistral's sliding window (measured in positions), and
    with a packing only within a document's shared context or the query's own part.
    """
    i = start + jnp.arange(size)[:, None]
    j = jnp.arange(keys)[None, :]
    mask = j <= i
    if packing is None:
        if cfg.sliding_window is not None:
            mask = mask & (i - j < cfg.sliding_window)
        return mask
    rows = lambda a: jax.lax.dynamic_slice_in_dim(a, start, size, axis=1)  # noqa: E731
    doc_q, doc_k = rows(packing.doc)[:, :, None], packing.doc[:, None, :keys]
    part_q, part_k = rows(packing.part)[:, :, None], packing.part[:, None, :keys]
    mask = mask[None] & (doc_q == doc_k) & ((part_k == 0) | (part_k == part_q))
    if cfg.sliding_window is not None:
        mask = mask & (rows(packing.positions)[:, :, None] - packing.positions[:, None, :keys] < cfg.sliding_window)
    return mask


def queries_keys_values(
    block: Params, x: jax.Array, cfg: ModelConfig, cos: jax.Array, sin: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Rotated queries `[B, Hkv, G, T, hd]`, keys and values `[B, Hkv, T, hd]` of normed `x: [B, T, D]`.

    Heads first, so scores are plain batched matmuls; each KV head serves a group of
    G consecutive query heads.
    """
    b, t, _ = x.shape
    hd, hk, g = cfg.head_dim, cfg.num_kv_heads, cfg.group_size
    q = project(block["q"], x).reshape(b, t, cfg.num_heads, hd)
    k = project(block["k"], x).reshape(b, t, hk, hd)
    v = project(block["v"], x).reshape(b, t, hk, hd)
    if cfg.qk_norm:
        q = rms_norm(q, block["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, block["k_norm"], cfg.rms_norm_eps)
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)
    return q.reshape(b, t, hk, g, hd).transpose(0, 2, 3, 1, 4), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def attention_mix(
    block: Params, x: jax.Array, cfg: ModelConfig, cos: jax.Array, sin: jax.Array, packing: Packing | None = None
) -> jax.Array:
    """Grouped-query self-attention of normed `x: [B, T, D]` up to the o projection: `[B, T, H * hd]`."""
    return attention_core(*queries_keys_values(block, x, cfg, cos, sin), cfg, packing)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, hd: int, packed: bool) -> jax.Array:
    """Softmax attention of queries `q: [B, Hkv, G, q, hd]` over `k, v: [B, Hkv, K, hd]` under `mask`."""
    scores = jnp.einsum("bhgqd,bhkd->bhgqk", q, k).astype(jnp.float32)
    mask = mask[:, None, None] if packed else mask  # [B, 1, 1, q, k] against [B, Hkv, G, q, k]
    scores = jnp.where(mask, scores * (hd**-0.5), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhgqk,bhkd->bhgqd", probs, v)


def segments(t: int, chunk: int = ATTENTION_CHUNK, most: int = ATTENTION_SEGMENTS) -> list[tuple[int, int, int]]:
    """`[(first chunk, chunks, keys), ...]`: the query chunks of a length-`t` sequence in at most `most` runs of
    consecutive chunks, each run scoring against the keys up to its last chunk's end."""
    n = -(-t // chunk)
    edges = sorted({round(n * j / min(most, n)) for j in range(min(most, n) + 1)})
    return [(a, b - a, min(b * chunk, t)) for a, b in zip(edges, edges[1:])]


def attention_core(q: jax.Array, k: jax.Array, v: jax.Array, cfg: ModelConfig, packing: Packing | None = None) -> jax.Array:
    """Causal softmax attention of `queries_keys_values`' output, in query chunks: `[B, T, H * hd]`.

    Chunks of `ATTENTION_CHUNK` queries run in `lax.scan` loops, one per segment of consecutive chunks that share
    a key length (`segments`): the program holds a few loop bodies whatever T, not one copy per chunk.
    """
    b, _, _, t, hd = q.shape
    c = min(ATTENTION_CHUNK, t)
    n = -(-t // c)
    if n * c > t:  # pad the queries to whole chunks; their rows are dropped below
        q = jnp.pad(q, ((0, 0),) * 3 + ((0, n * c - t), (0, 0)))
        if packing is not None:
            fill = lambda a, value: jnp.pad(a, ((0, 0), (0, n * c - t)), constant_values=value)  # noqa: E731
            packing = Packing(fill(packing.positions, 0), fill(packing.doc, -1), fill(packing.part, 0))
    outs = []
    for first, count, keys in segments(t, c):
        kk, vv = k[:, :, :keys], v[:, :, :keys]

        def one(_, i, kk=kk, vv=vv, keys=keys):
            start = i * c
            qc = jax.lax.dynamic_slice_in_dim(q, start, c, axis=3)
            mask = chunk_mask(cfg, start, c, keys, packing)
            return None, _attend(qc, kk, vv, mask, hd, packing is not None)

        if count == 1:
            outs.append(one(None, first)[1])
            continue
        _, chunks = jax.lax.scan(one, None, jnp.arange(first, first + count))  # [count, B, Hkv, G, c, hd]
        outs.append(jnp.moveaxis(chunks, 0, 3).reshape(*chunks.shape[1:4], count * c, hd))
    out = jnp.concatenate(outs, axis=3)[:, :, :, :t]  # [B, Hkv, G, T, hd]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, cfg.num_heads * hd)


def mlp_hidden(block: Params, x: jax.Array) -> jax.Array:
    """SwiGLU hidden activations `[B, T, F]` of normed `x: [B, T, D]` (the down projection's input)."""
    return jax.nn.silu(project(block["gate"], x)) * project(block["up"], x)


# Which recorded input feeds each projection: q/k/v share one, gate/up share one.
PROJECTION_INPUT = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "o_in", "gate": "mlp_in", "up": "mlp_in", "down": "down_in"}


def block_forward_taps(
    block: Params, x: jax.Array, cfg: ModelConfig, cos: jax.Array, sin: jax.Array, packing: Packing | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One decoder block `x: [B, T, D] -> [B, T, D]` and the inputs of its projections.

    Taps: `attn_in` (q/k/v), `o_in`, `mlp_in` (gate/up), `down_in`; see `PROJECTION_INPUT`.
    Unused taps cost nothing under jit.
    """
    attn_in = rms_norm(x, block["attn_norm"], cfg.rms_norm_eps)
    o_in = attention_mix(block, attn_in, cfg, cos, sin, packing)
    x = x + project(block["o"], o_in)
    mlp_in = rms_norm(x, block["mlp_norm"], cfg.rms_norm_eps)
    down_in = mlp_hidden(block, mlp_in)
    x = x + project(block["down"], down_in)
    return x, {"attn_in": attn_in, "o_in": o_in, "mlp_in": mlp_in, "down_in": down_in}


def block_forward(
    block: Params, x: jax.Array, cfg: ModelConfig, cos: jax.Array, sin: jax.Array, packing: Packing | None = None
) -> jax.Array:
    """One decoder block: `x: [B, T, D] -> [B, T, D]` (pre-norm, residuals)."""
    return block_forward_taps(block, x, cfg, cos, sin, packing)[0]


# ------------------------------------------------------------------ the blocks as one loop


def is_stacked(blocks: Any) -> bool:
    """Whether `params["blocks"]` is the stacked form (`model/stacking.py`) rather than a list of blocks."""
    return isinstance(blocks, dict)


def stack_params(params: Params, pad: bool = True) -> Params:
    """`params` with its blocks stacked where they stack (`stacking.stack_blocks`), else unchanged: what the decoder
    runs as one `lax.scan`. Do it once, outside `jit`, for a model you run many times (inside, each call stacks
    anew)."""
    from sigmascale_jax.model.stacking import stack_blocks

    if is_stacked(params["blocks"]):
        return params
    stacked = stack_blocks(params["blocks"], pad)
    return params if stacked is None else {**params, "blocks": stacked}


def run_blocks(blocks: Any, x: jax.Array, cfg: ModelConfig, cos: jax.Array, sin: jax.Array,
               packing: Packing | None = None, remat: bool = False, pad: bool = True,
               scan: bool = True) -> jax.Array:
    """Every block on `x: [B, T, D]` in order: one `lax.scan` over the stacked blocks where they stack
    (`stacking.stack_blocks`), else (or with `scan=False` and listed blocks) a loop unrolled into the program.
    `remat`: `jax.checkpoint` per block."""
    from sigmascale_jax.model.stacking import scan_inputs, stack_blocks, with_constants

    apply = jax.checkpoint(block_forward, static_argnums=(2,)) if remat else block_forward
    stacked = blocks if is_stacked(blocks) else stack_blocks(blocks, pad) if scan else None
    if stacked is None:
        for block in blocks:
            x = apply(block, x, cfg, cos, sin, packing)
        return x
    xs, constants = scan_inputs(stacked)

    def body(x, block):
        return apply(with_constants(block, constants), x, cfg, cos, sin, packing), None

    x, _ = jax.lax.scan(body, x, xs)
    return x


def hidden_states(
    params: Params, tokens: jax.Array, cfg: ModelConfig, packing: Packing | None = None, remat: bool = False,
    pad: bool = True, scan: bool = True,
) -> jax.Array:
    """Final normed hidden states `[B, T, D]` of `tokens: [B, T]` (int): one sequence per row, or a `Packing`.

    `remat`: recompute each block's activations in the backward pass instead of keeping them (`jax.checkpoint`
    per block), so a gradient holds one `[B, T, D]` per block rather than all its intermediates. The blocks run as
    one `lax.scan` where they stack (`run_blocks`; `pad`: mixed ranks padded to stack; `scan=False`: unrolled).
    """
    x = embed_tokens(params, tokens)
    positions = jnp.arange(tokens.shape[1]) if packing is None else packing.positions
    cos, sin = rope_cos_sin(cfg, positions)
    x = run_blocks(params["blocks"], x, cfg, cos, sin, packing, remat, pad, scan)
    return rms_norm(x, params["final_norm"], cfg.rms_norm_eps)


def embed_tokens(params: Params, tokens: jax.Array) -> jax.Array:
    """`[..., D]`: the embedding rows of `tokens` (int, any shape); a quantized table (`--quantize-embeddings`)
    dequantizes only the rows it gathers."""
    from sigmascale_jax.model.leaves import is_quantized

    embed = params["embed"]
    return embed.rows(tokens) if is_quantized(embed) else embed[tokens]


def lm_head(params: Params) -> jax.Array:
    """`[V, D]`: the output embedding (the input one when tied), dequantized where it is stored quantized."""
    from sigmascale_jax.model.leaves import is_quantized

    head = params["lm_head"] if "lm_head" in params else params["embed"]
    return head.dequantize(head.scale.dtype) if is_quantized(head) else head


def forward(params: Params, tokens: jax.Array, cfg: ModelConfig, remat: bool = False,
            pad: bool = True, scan: bool = True) -> jax.Array:
    """Logits `[B, T, V]` (float32) of `tokens: [B, T]` (`remat`, `pad`, `scan`: see `hidden_states`)."""
    h = hidden_states(params, tokens, cfg, remat=remat, pad=pad, scan=scan)
    return (h @ lm_head(params).T.astype(h.dtype)).astype(jnp.float32)


def token_nll(params: Params, tokens: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Negative log-likelihood `[B, T-1]` of each token given those before it."""
    logits = forward(params, tokens[:, :-1], cfg)
    target = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target


forward_jit = jax.jit(forward, static_argnames="cfg")
token_nll_jit = jax.jit(token_nll, static_argnames="cfg")


def cast_params(params: Params, dtype: Any) -> Params:
    """Cast every floating array to `dtype` (quantized codes and permutations keep their exact carriers)."""
    from sigmascale_jax.model.leaves import Codes

    return jax.tree.map(lambda a: a if isinstance(a, Codes) or not jnp.issubdtype(a.dtype, jnp.floating)
                        else a.astype(dtype), params, is_leaf=lambda a: isinstance(a, Codes))


def typed_params(params: Params) -> Params:
    """Every projection as a typed leaf (`leaves.as_leaf`): for trees restored from disk as plain dicts
    (an Orbax restore without a target, the compressor's dict forms)."""
    from sigmascale_jax.model.leaves import as_leaf

    typed = lambda b: {**b, **{n: as_leaf(b[n]) for n in PROJECTIONS}}  # noqa: E731
    blocks = params["blocks"]
    return {**params, "blocks": typed(blocks) if is_stacked(blocks) else [typed(b) for b in blocks]}


def trainable(params: Params, scales: str = "factor") -> Params:
    """A label pytree shaped like `params`: `"factor"` on the float factors of every compressed projection
    (B, C; PivGa's B', R; a quantized factor's scales), `"frozen"` on everything else (embeddings, norms,
    head, biases, projections kept dense, permutations, quantized codes).

    For `optax.multi_transform({"factor": optax.adamw(1e-4), "frozen": optax.set_to_zero()}, trainable(params))`:
    `jax.grad` of a loss over the whole tree then trains exactly the factors. `scales`: the label of quantized
    matrices' scales (default: "factor", like the float factors). Give them their own (`scales="scale"`) to step
    them apart: an int8 scale is ~1e-3 of a weight's range and Adam moves every parameter by about its learning
    rate a step, so the 1e-4..1e-3 that suits float factors overshoots scales (use ~1e-5 for them).
    """
    from sigmascale_jax.model.leaves import FACTOR, frozen_labels, is_quantized, leaf_labels

    labels = {k: frozen_labels(v) for k, v in params.items() if k != "blocks"}
    block_labels = lambda b: {k: leaf_labels(v) if k in PROJECTIONS else frozen_labels(v)  # noqa: E731
                              for k, v in b.items()}
    blocks = params["blocks"]
    labels["blocks"] = block_labels(blocks) if is_stacked(blocks) else [block_labels(b) for b in blocks]
    if scales == FACTOR:
        return labels
    relabel = lambda tree: jax.tree.map(lambda x: scales if x == FACTOR else x, tree)  # noqa: E731
    return jax.tree.map(lambda p, lab: relabel(lab) if is_quantized(p) else lab, params, labels, is_leaf=is_quantized)


def param_count(tree: Any) -> int:
    return int(sum(np.prod(a.shape) for a in jax.tree.leaves(tree)))


class Factor(nnx.Param):
    """A low-rank factor of a compressed projection: `nnx.Optimizer(model, tx, wrt=Factor)` trains only these."""


class Buffer(nnx.Variable):
    """An integer payload's carrier (a permutation, quantized codes): not an `nnx.Param`, never trained."""


def _is_carrier(path) -> bool:
    """Whether a tree path ends at a `leaves.Codes` carrier."""
    return bool(path) and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "carrier"


class Decoder(nnx.Module):
    """Flax NNX decoder holding a params pytree as `nnx.Param`s.

    The computation is `forward`; this module is the stateful face of it for
    NNX code (``nnx.split`` / ``nnx.merge``, ``nnx.jit``, optimizers over its
    params). Dense and factored projections coexist, as in the pytree.

    >>> model = Decoder(cfg, params)
    >>> logits = model(tokens)            # [B, T, V]
    """

    def __init__(self, cfg: ModelConfig, params: Params):
        self.cfg = cfg
        kinds = {"factor": Factor, "frozen": nnx.Param}
        self.params = nnx.data(jax.tree_util.tree_map_with_path(
            lambda path, a, label: Buffer(a) if _is_carrier(path) else kinds[label](a), params, trainable(params)))

    def pytree(self) -> Params:
        """The params as a plain pytree of arrays (what `forward` takes)."""
        return jax.tree.map(lambda p: p[...], self.params, is_leaf=lambda x: isinstance(x, nnx.Variable))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return forward(self.pytree(), tokens, self.cfg)


@jax.jit
def _padded_product(b: jax.Array, c: jax.Array) -> jax.Array:
    return b @ c


_leaf_matrix = jax.jit(lambda leaf: leaf.matrix())


def dense_projection(p: Any) -> dict:
    """A projection as `{"w": [out, in]}` (+ `"bias"`), its factors multiplied out on the device.

    `p`: a dict form (`{"w"}`, `{"b", "c"}`) or a typed leaf. Factors are padded with zeros to full width
    (`b: [out, r]`, `c: [r, in]`, r = min(out, in)) before the product, which is exact, so one compiled product
    serves every rank of a shape (a factored leaf's factors read on the host, `host_factors`); a leaf without
    factors compiles its `matrix()` per leaf type and shape.
    """
    from sigmascale_jax.model.leaves import is_leaf

    if not is_leaf(p):  # a dict form
        if "w" in p:
            return p
        (b, c), bias = (np.asarray(p["b"]), np.asarray(p["c"])), p.get("bias")
    elif hasattr(p, "host_factors"):  # factors (quantized ones dequantized on the host)
        (b, c), bias = p.host_factors(), p.bias
    else:  # a leaf without factors (a quantized matrix): one compile per leaf type and shape
        w = _leaf_matrix(p)
        return {"w": w} if p.bias is None else {"w": w, "bias": p.bias}
    (m, k), n = b.shape, c.shape[1]  # factors padded to full width: one product per shape, whatever the rank
    r = min(m, n)
    pad_b = np.zeros((m, r), b.dtype)
    pad_c = np.zeros((r, n), c.dtype)
    pad_b[:, :k], pad_c[:k] = b, c
    w = _padded_product(pad_b, pad_c)
    return {"w": w} if bias is None else {"w": w, "bias": bias}


def densified(block: Params) -> Params:
    """`block` with every projection dense (`dense_projection`): what propagating calibration windows, gradients
    with respect to dense weights and other block-at-a-time passes run, one compiled program per block shape
    whatever the ranks."""
    return {k: dense_projection(v) if k in PROJECTIONS else v for k, v in block.items()}


@functools.partial(jax.jit, static_argnames="cfg")
def _block_jit(block: Params, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    cos, sin = rope_cos_sin(cfg, jnp.arange(x.shape[1]))
    return block_forward(block, x, cfg, cos, sin)


def block_apply(block: Params, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """jit-compiled `block_forward` with RoPE for positions `0..T-1`: `x: [B, T, D] -> [B, T, D]`."""
    return _block_jit(block, x, cfg)
