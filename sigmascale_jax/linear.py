"""Projections as typed pytree leaves: dense, low-rank B·C, PivGa, each possibly with quantized matrices.

Every form has `apply(x)`, `num_params` (the numbers it stands for, the budget's unit)
and `nbytes` (what it really stores), so the decoder has one code path, `project`,
and a filter can pick factors by type. Each is a `flax.struct.dataclass`: a pytree
that passes through `jit`, `vmap` and `grad`. Its matrices are arrays or
`quant.QuantMatrix` (dequantized inside `apply`).

On disk a compressed model is a plain Orbax tree of dicts (`to_tree`): `{"w"}` dense,
`{"b", "c"}` low-rank, `{"b", "r", "perm"}` PivGa, a quantized matrix as
`{"values", "scale"(, "zero")}`; `compression.json` records each matrix's encoding,
from which `from_tree` rebuilds the leaf. The compressor's own pipeline works on the
dict forms `{"w"}` / `{"b", "c"}`; `as_leaf` reads those too.

PivGa (METHODS.md; arXiv 2512.03062): `B C = (B C_P)(C_P⁻¹ C)` for the k pivot columns P
of C; `C_P⁻¹ C` is the identity on P, so only `B' = B C_P` (m × k), `R = C_P⁻¹ C_R`
(k × (n − k)) and the permutation are stored: `k(m + n) − k²` numbers, the same matrix
up to rounding. Applied as `y = B' (x_P + R x_R)`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from sigmascale_jax.quant import BITS, QuantMatrix, as_array, nbytes, quantize


def _bias_bytes(bias) -> int:
    return 0 if bias is None else int(np.asarray(bias).nbytes)


@struct.dataclass
class Dense:
    w: Any  # [out, in]
    bias: Any = None

    def apply(self, x: jax.Array) -> jax.Array:
        y = x @ as_array(self.w, x.dtype).T
        return y if self.bias is None else y + self.bias.astype(x.dtype)

    def matrix(self) -> jax.Array:
        return as_array(self.w)

    @property
    def num_params(self) -> int:
        rows, cols = self.w.shape
        return rows * cols

    @property
    def nbytes(self) -> int:
        return nbytes(self.w) + _bias_bytes(self.bias)


@struct.dataclass
class LowRank:
    b: Any  # [out, k]
    c: Any  # [k, in]
    bias: Any = None

    def apply(self, x: jax.Array) -> jax.Array:
        y = (x @ as_array(self.c, x.dtype).T) @ as_array(self.b, x.dtype).T
        return y if self.bias is None else y + self.bias.astype(x.dtype)

    def matrix(self) -> jax.Array:
        return as_array(self.b) @ as_array(self.c)

    @property
    def num_params(self) -> int:
        (m, k), n = self.b.shape, self.c.shape[1]
        return k * (m + n)

    @property
    def nbytes(self) -> int:
        return nbytes(self.b) + nbytes(self.c) + _bias_bytes(self.bias)


@struct.dataclass
class PivGa:
    b: Any  # [out, k]  B' = B C_P
    r: Any  # [k, in − k]  R = C_P⁻¹ C_R
    perm: jax.Array  # [in] int32: pivot columns first, then the rest
    bias: Any = None

    def apply(self, x: jax.Array) -> jax.Array:
        k = self.b.shape[1]
        xp = jnp.take(x, self.perm, axis=-1)
        z = xp[..., :k]
        if self.r.shape[1]:
            z = z + xp[..., k:] @ as_array(self.r, x.dtype).T
        y = z @ as_array(self.b, x.dtype).T
        return y if self.bias is None else y + self.bias.astype(x.dtype)

    def matrix(self) -> jax.Array:
        k = self.b.shape[1]
        c_perm = jnp.concatenate([jnp.eye(k, dtype=jnp.float32), as_array(self.r)], axis=1)  # C in permuted columns
        c = jnp.zeros_like(c_perm).at[:, self.perm].set(c_perm)
        return as_array(self.b) @ c

    @property
    def num_params(self) -> int:
        (m, k), n = self.b.shape, self.perm.shape[0]
        return k * (m + n) - k * k

    @property
    def nbytes(self) -> int:
        return nbytes(self.b) + nbytes(self.r) + int(np.asarray(self.perm).nbytes) + _bias_bytes(self.bias)


Leaf = Dense | LowRank | PivGa


# ------------------------------------------------------------------ building leaves


def pivga_from_factors(b: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(B' [m, k], R [k, n − k], perm [n])` of the rank-k pair `b: [m, k]`, `c: [k, n]` (float64, host).

    The k pivot columns come from a column-pivoted QR of C (LAPACK geqp3), which keeps
    `C_P` well conditioned and so `|R|` bounded; `R` is a solve, never an inverse.
    """
    from scipy.linalg import qr, solve

    b, c = np.asarray(b, np.float64), np.asarray(c, np.float64)
    k = c.shape[0]
    _, piv = qr(c, mode="r", pivoting=True)
    perm = np.asarray(piv, np.int32)
    c_p, c_r = c[:, perm[:k]], c[:, perm[k:]]
    r = solve(c_p, c_r) if c_r.shape[1] else np.zeros((k, 0))
    return b @ c_p, r, perm


def encode_factors(b: np.ndarray, c: np.ndarray, encoding: str, quant: str | None, group: int, bias=None) -> Leaf:
    """A low-rank pair stored as `encoding` ("plain" or "pivga"), its matrices quantized if `quant` is given."""
    # the float32 factors are what gets quantized, so a float32 folder re-encoded later gives the same bits
    q = (lambda m: quantize(np.asarray(m, np.float32), quant, group)) if quant else (
        lambda m: jnp.asarray(np.asarray(m, np.float32)))
    if encoding == "plain":
        return LowRank(q(b), q(c), bias)
    if encoding == "pivga":
        bp, r, perm = pivga_from_factors(b, c)
        small = perm.shape[0] <= np.iinfo(np.int16).max  # the permutation in 2 bytes an entry where it fits
        return PivGa(q(bp), q(r), jnp.asarray(perm.astype(np.int16 if small else np.int32)), bias)
    raise ValueError(f"unknown encoding {encoding!r}")


def encode_dense(w: np.ndarray, quant: str | None, group: int, bias=None) -> Dense:
    return Dense(quantize(w, quant, group) if quant else jnp.asarray(np.asarray(w, np.float32)), bias)


def as_leaf(p: Any) -> Leaf:
    """A projection as a typed leaf: leaves pass through; the pipeline's dicts `{"w"}` / `{"b", "c"}` are wrapped."""
    if isinstance(p, (Dense, LowRank, PivGa)):
        return p
    if "w" in p:
        return Dense(p["w"], p.get("bias"))
    if "b" in p and "c" in p:
        return LowRank(p["b"], p["c"], p.get("bias"))
    raise ValueError(f"projection params need 'w' or 'b'+'c', got keys {sorted(p)}")


# ------------------------------------------------------------------ the on-disk form


def _matrix_tree(m: Any) -> Any:
    return m.to_tree() if isinstance(m, QuantMatrix) else m


def to_tree(leaf: Leaf) -> dict[str, Any]:
    """The plain dict a leaf is saved as (Orbax)."""
    out: dict[str, Any]
    if isinstance(leaf, Dense):
        out = {"w": _matrix_tree(leaf.w)}
    elif isinstance(leaf, LowRank):
        out = {"b": _matrix_tree(leaf.b), "c": _matrix_tree(leaf.c)}
    else:
        out = {"b": _matrix_tree(leaf.b), "r": _matrix_tree(leaf.r), "perm": leaf.perm}
    if leaf.bias is not None:
        out["bias"] = leaf.bias
    return out


def from_tree(tree: dict, record: dict) -> Leaf:
    """The leaf saved as `tree`, given its `compression.json` record (shape, encoding, quantization)."""
    m, n = record["shape"]
    quant, group = record.get("quantize"), record.get("group_size")

    def mat(t, cols):
        return QuantMatrix.from_tree(t, BITS[quant], group, cols) if quant else jnp.asarray(t)

    bias = tree.get("bias")
    if record.get("dense"):
        return Dense(mat(tree["w"], n), bias)
    k = record["rank"]
    if record.get("encoding", "plain") == "pivga":
        return PivGa(mat(tree["b"], k), mat(tree["r"], n - k), jnp.asarray(tree["perm"]), bias)
    return LowRank(mat(tree["b"], k), mat(tree["c"], n), bias)


def leaf_bytes(p: Any) -> int:
    return as_leaf(p).nbytes
