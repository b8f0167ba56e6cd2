"""Blocks stacked into one pytree with a leading layer axis, so the decoder runs them as one `lax.scan`.

Compressed blocks rarely have equal shapes: an allocator gives each matrix its own rank and keeps
some dense (ZS-SVD kept 81 of SmolLM2's 210 matrices dense at ratio 0.2). Stacking makes them
agree without changing the model:

- float low-rank factors are padded with zeros to the widest rank of their projection (zero
  columns of B and rows of C add exact zeros and get zero gradients, so training never fills them);
- a projection dense in some blocks and factored in others becomes a `Switched` stack: every
  block's padded factors (zero where the block keeps the matrix dense) and, apart, the dense
  matrices, which the loop reads as constants and `lax.cond` selects by the block's index, so a
  block computes one form only.

Padding costs work: every block multiplies at its projection's widest rank. Measured on SmolLM2
with ZS-SVD's ranks (q from 8 to 231; `results/scan_smollm2.md`), the padded scan ran a healing
step 17% slower than the unrolled blocks, a 2048-token window 4% slower and a decoded token 47%
slower, while compiling 5.7, 2.1 and 6.1 s less: over a real heal, evaluation or generation the
unrolled form wins. So blocks are padded only while padding adds at most `PAD_TOLERANCE` of the
projections' multiply-adds (`padding_overhead`); uniform ranks add none and always scan.
What does not stack (padding past the tolerance, quantized factors of mixed ranks, PivGa at mixed
ranks, trees that differ otherwise) runs unrolled, as listed blocks: `stack_blocks` returns None. The stacked form is
`params["blocks"]` as a dict instead of a list; `unstack_blocks(stacked, like=blocks)` gives the
blocks back, each at its own rank.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from sigmascale_jax.model.leaves import FACTOR, FROZEN, Codes, Dense, LowRank, is_leaf, is_quantized, with_bias

Params = dict[str, Any]

# The extra multiply-adds (a fraction of the projections' own) that padding mixed ranks may add before the blocks
# run unrolled instead (module docstring: measured, the padded scan loses above a few percent).
PAD_TOLERANCE = 0.05


@struct.dataclass
class Switched:
    """One projection of stacked blocks that keep it dense in some blocks and factored in others.

    `b: [L, m, K]`, `c: [L, K, n]`: every block's factors padded to K (zero for the blocks that keep the matrix
    dense); `index: [L]` (`Codes`, int32): the block's row in `dense`, or −1 where it is factored; `dense: [D, m, n]`
    the dense matrices, a loop constant (`scan_inputs` takes it out of the scanned arrays, `with_constants` puts it
    back into each step's slice). Inside the loop a slice applies one form, chosen by `lax.cond`.
    """

    b: Any
    c: Any
    index: Codes
    dense: Any = None
    bias: Any = None

    def apply(self, x: jax.Array) -> jax.Array:
        i = self.index.array()

        def dense(x):
            w = jax.lax.dynamic_index_in_dim(self.dense, jnp.maximum(i, 0), axis=0, keepdims=False)
            return x @ w.astype(x.dtype).T

        def factored(x):
            return (x @ self.c.astype(x.dtype).T) @ self.b.astype(x.dtype).T

        return with_bias(jax.lax.cond(i >= 0, dense, factored, x), self.bias)

    def labels(self) -> "Switched":
        return Switched(FACTOR, FACTOR, self.index.labels(), None if self.dense is None else FROZEN,
                        None if self.bias is None else FROZEN)

    def to_tree(self) -> dict:
        raise ValueError("a stacked projection is not saved: unstack the blocks first (stacking.unstack_blocks)")


def factor_pair(p: Any) -> tuple[Any, Any] | None:
    """`(b, c)` of a float low-rank projection (a `{"b", "c"}` dict or a `LowRank` of float arrays), else None."""
    if isinstance(p, LowRank):
        return None if is_quantized(p.b) or is_quantized(p.c) else (p.b, p.c)
    if isinstance(p, dict) and set(p) - {"bias"} == {"b", "c"}:
        return p["b"], p["c"]
    return None


def dense_matrix(p: Any) -> Any:
    """`w` of a float dense projection (`{"w"}` or a `Dense` of a float array), else None."""
    if isinstance(p, Dense):
        return None if is_quantized(p.w) else p.w
    if isinstance(p, dict) and set(p) - {"bias"} == {"w"}:
        return p["w"]
    return None


def _is_projection(p: Any) -> bool:
    """A projection (a typed leaf, or the compressor's `{"w"}` / `{"b", "c"}` dict), not a norm's array."""
    return is_leaf(p) or (isinstance(p, dict) and (factor_pair(p) is not None or dense_matrix(p) is not None))


def _bias(p: Any) -> Any:
    return p.get("bias") if isinstance(p, dict) else p.bias


class _Abstract:
    """Stacking and padding of `jax.ShapeDtypeStruct`s (memory plans stack abstract params)."""

    @staticmethod
    def stack(xs):
        return jax.ShapeDtypeStruct((len(xs), *xs[0].shape), xs[0].dtype)

    @staticmethod
    def pad(x, widths):
        return jax.ShapeDtypeStruct(tuple(d + a + b for d, (a, b) in zip(x.shape, widths)), x.dtype)

    @staticmethod
    def zeros(shape, dtype):
        return jax.ShapeDtypeStruct(tuple(shape), dtype)


def _array_module(tree: Any) -> Any:
    """numpy when every array of `tree` is a host array (stacking stays on the host), `_Abstract` for abstract
    arrays, else jax.numpy (inside `jit` the stack is part of the program)."""
    leaves = jax.tree.leaves(tree)
    if leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves):
        return _Abstract
    return np if all(isinstance(x, np.ndarray) for x in leaves) else jnp


def _padded(b: Any, c: Any, width: int, xp: Any) -> tuple[Any, Any]:
    k = b.shape[-1]
    if k == width:
        return b, c
    return xp.pad(b, ((0, 0), (0, width - k))), xp.pad(c, ((0, width - k), (0, 0)))


def _stack_projection(column: list[Any], pad: bool, xp: Any) -> Any:
    """One projection of every block, stacked; None when it cannot be."""
    pairs = [factor_pair(p) for p in column]
    denses = [dense_matrix(p) for p in column]
    biases = [_bias(p) for p in column]
    if len({b is None for b in biases}) > 1:
        return None
    bias = None if biases[0] is None else xp.stack(biases)
    if all(p is not None for p in pairs) and (pad or len({p[0].shape for p in pairs}) == 1):
        width = max(p[0].shape[-1] for p in pairs)
        padded = [_padded(b, c, width, xp) for b, c in pairs]
        b, c = xp.stack([p[0] for p in padded]), xp.stack([p[1] for p in padded])
        if isinstance(column[0], LowRank) and all(isinstance(p, LowRank) for p in column):
            return LowRank(b, c, bias)
        if all(isinstance(p, dict) for p in column):
            return {"b": b, "c": c} if bias is None else {"b": b, "c": c, "bias": bias}
        return None
    if not pad or not all(p is not None or d is not None for p, d in zip(pairs, denses)):
        return None
    if not any(p is not None for p in pairs) or not any(d is not None for d in denses):
        return None
    (m, _), n = next(p for p in pairs if p is not None)[0].shape, next(p for p in pairs if p is not None)[1].shape[1]
    dtype = next(p for p in pairs if p is not None)[0].dtype
    width = max(p[0].shape[-1] for p in pairs if p is not None)
    zero_b, zero_c = xp.zeros((m, width), dtype), xp.zeros((width, n), dtype)
    padded = [_padded(*p, width, xp) if p is not None else (zero_b, zero_c) for p in pairs]
    rows = np.cumsum([d is not None for d in denses]) - 1
    index = np.where([d is not None for d in denses], rows, -1).astype(np.int32)
    carrier = index.astype(np.float32)  # a host carrier (Codes.of would compile a transfer for it)
    return Switched(xp.stack([p[0] for p in padded]), xp.stack([p[1] for p in padded]), Codes(carrier, "int32"),
                    xp.stack([d for d in denses if d is not None]), bias)


def padding_overhead(blocks: list[Params]) -> float:
    """The multiply-adds a padded stack of `blocks` adds, as a fraction of what their projections do as listed:
    each factored projection at its projection's widest rank instead of its own (a `Switched` block's dense matrix
    costs what it does listed)."""
    own, padded = 0, 0
    for key in blocks[0]:
        column = [b[key] for b in blocks]
        if not all(_is_projection(p) for p in column):
            continue
        pairs = [factor_pair(p) for p in column]
        widths = [p[0].shape[-1] for p in pairs if p is not None]
        for p, pair in zip(column, pairs):
            if pair is not None:
                (m, k), n = pair[0].shape, pair[1].shape[-1]
                own, padded = own + k * (m + n), padded + max(widths) * (m + n)
            else:
                size = int(np.prod(np.shape(dense_matrix(p)))) if dense_matrix(p) is not None else 0
                own, padded = own + size, padded + size
    return (padded - own) / own if own else 0.0


def stack_blocks(blocks: list[Params], pad: bool = True, tolerance: float = PAD_TOLERANCE) -> Params | None:
    """The blocks as one pytree whose arrays have a leading layer axis (`lax.scan`'s input), or None when they do
    not stack. Equal trees of equal shapes stack as they are; with `pad`, float low-rank factors of mixed ranks
    are padded and projections dense in some blocks become `Switched` (the module's docstring), as long as the
    padding adds at most `tolerance` of the projections' multiply-adds (`padding_overhead`)."""
    if not blocks or any(set(b) != set(blocks[0]) for b in blocks):
        return None
    xp = _array_module(blocks)
    structure = jax.tree.structure(blocks[0])
    if all(jax.tree.structure(b) == structure for b in blocks):
        shapes = [[np.shape(x) for x in jax.tree.leaves(b)] for b in blocks]
        if all(s == shapes[0] for s in shapes):
            return jax.tree.map(lambda *xs: xp.stack(xs), *blocks)
    if not pad or padding_overhead(blocks) > tolerance:
        return None
    out = {}
    for key in blocks[0]:
        column = [b[key] for b in blocks]
        stacked = _stack_projection(column, pad, xp) if all(_is_projection(p) for p in column) else None
        if stacked is None:
            stacked = _stack_equal(column, xp)
        if stacked is None:
            return None
        out[key] = stacked
    return out


def _stack_equal(column: list[Any], xp: Any) -> Any:
    """Equal trees of equal shapes, stacked; else None."""
    structure = jax.tree.structure(column[0])
    if any(jax.tree.structure(x) != structure for x in column):
        return None
    shapes = [[np.shape(a) for a in jax.tree.leaves(x)] for x in column]
    if any(s != shapes[0] for s in shapes):
        return None
    return jax.tree.map(lambda *xs: xp.stack(xs), *column)


def scan_inputs(stacked: Params) -> tuple[Params, dict]:
    """`(xs, constants)`: the stacked blocks without the `Switched` dense matrices (scanned, one slice a step), and
    those matrices by projection (read whole by every step)."""
    xs, constants = dict(stacked), {}
    for key, value in stacked.items():
        if isinstance(value, Switched):
            constants[key] = value.dense
            xs[key] = value.replace(dense=None)
    return xs, constants


def with_constants(block: Params, constants: dict) -> Params:
    """One step's block slice with its `Switched` projections' dense matrices put back."""
    if not constants:
        return block
    return {k: v.replace(dense=constants[k]) if k in constants else v for k, v in block.items()}


def unstack_blocks(stacked: Params, like: list[Params] | None = None) -> list[Params]:
    """The list of blocks of a stacked form. With `like` (the blocks it was stacked from), every projection comes
    back in its block's own form and rank: padded factors cut (their padding is zero: nothing is lost), `Switched`
    projections factored or, where the block kept the matrix dense, that block's own matrix."""
    num = jax.tree.leaves(stacked)[0].shape[0]
    xs, constants = scan_inputs(stacked)
    blocks = [jax.tree.map(lambda x, i=i: x[i], xs) for i in range(num)]
    if like is None:
        if constants:
            raise ValueError("blocks with Switched projections unstack against the blocks they came from (like=)")
        return blocks
    out = []
    for block, ref in zip(blocks, like):
        cut = dict(block)
        for name in block:
            if not _is_projection(ref[name]):
                continue
            ref_pair = factor_pair(ref[name])
            if isinstance(block[name], Switched) and ref_pair is None:
                cut[name] = ref[name]  # kept dense there: frozen, unchanged
                continue
            got = block[name]
            pair = (got.b, got.c) if isinstance(got, Switched) else factor_pair(got)
            if pair is None or ref_pair is None:
                continue
            k = ref_pair[0].shape[-1]
            b, c = pair[0][:, :k], pair[1][:k]
            bias = _bias(got) if not isinstance(got, Switched) else got.bias
            if isinstance(ref[name], LowRank):
                cut[name] = LowRank(b, c, bias)
            else:
                cut[name] = {"b": b, "c": c} if bias is None else {"b": b, "c": c, "bias": bias}
        out.append(cut)
    return out
