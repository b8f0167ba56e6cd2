"""Projections as typed pytree leaves, and the labels that say which of their arrays train.

Every form has `apply(x)`, `matrix()`, `num_params` (the numbers it stands for, the
budget's unit), `nbytes` (what it stores on disk), `to_tree()` (the plain dict it is
saved as), `labels()` (`"factor"` / `"frozen"` per array, for `optax.multi_transform`)
`export_tensors(prefix)` (its Hugging Face tensors) and `check(shape, rank)` (a ValueError
if its arrays do not make that matrix: a damaged or edited folder). Each is a
`flax.struct.dataclass`, so a tree of them passes through `jit`, `vmap` and `grad`.

The base forms live here because the decoder and the compressor's block loop work on
them: `Dense` (`{"w"}`) and `LowRank` (`{"b", "c"}`). Encoders own their own forms
(`compress/encode/pivga.py`: `PivGa`; `compress/encode/quant.py`: quantized matrices)
and register how a restored dict of theirs reads back (`register_dict_form`).

Integer payloads (PivGa's permutation, quantized codes) are `Codes`: exact integers
held in a float carrier (bfloat16 for 8-bit codes, float32 for indices) behind
`stop_gradient`, so `jax.grad`, optax and `nnx.Optimizer` take a compressed tree as it
is; on disk they are written as the integers they are. `trainable(params)` labels
them `"frozen"`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

FACTOR, FROZEN = "factor", "frozen"


@struct.dataclass
class Codes:
    """An integer array (`dtype` on disk) carried as exact integers in a float array, out of reach of gradients.

    8-bit codes ride in bfloat16 (its 8 significant bits hold every integer up to 256),
    wider indices in float32 (exact up to 2²⁴).
    """

    carrier: Any
    dtype: str = struct.field(pytree_node=False)

    @classmethod
    def of(cls, a: Any) -> "Codes":
        """Codes of an integer array (a traced one too: inside `jit`, its range is the caller's promise)."""
        if not isinstance(a, jax.core.Tracer):
            a = np.asarray(a)
        dtype = np.dtype(a.dtype)
        if not np.issubdtype(dtype, np.integer):
            raise TypeError(f"Codes hold integers, got {dtype}")
        small = dtype.itemsize == 1
        carrier = jnp.bfloat16 if small else jnp.float32
        if isinstance(a, np.ndarray):
            limit = 256 if small else 2**24
            if a.size and int(np.abs(a.astype(np.int64)).max()) > limit:
                raise ValueError(f"{dtype} values above {limit} cannot ride exactly in a float carrier")
            # a host carrier (numpy holds bfloat16 through ml_dtypes): a device transfer here would compile once
            # per array shape, i.e. per rank, when a folder loads
            return cls(a.astype(np.float32).astype(carrier), dtype.name)
        return cls(jnp.asarray(a).astype(carrier), dtype.name)

    def array(self) -> jax.Array:
        """The integers, as `dtype` (no gradient flows to the carrier)."""
        return jax.lax.stop_gradient(self.carrier).astype(self.dtype)

    def numpy(self) -> np.ndarray:
        return np.asarray(np.asarray(self.carrier, np.float32), self.dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.carrier.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

    def labels(self) -> "Codes":
        return Codes(FROZEN, self.dtype)


# The packages whose modules register leaf kinds, matrix forms and dict forms (the encoders): imported by name the
# first time a lookup misses, so `model/` and `io/` read every kind without importing the compressor's modules.
LEAF_PROVIDERS = ("sigmascale_jax.compress.encode",)


def load_leaf_kinds() -> None:
    """Import `LEAF_PROVIDERS` (their modules register what they store)."""
    import importlib

    for name in LEAF_PROVIDERS:
        importlib.import_module(name)


# encoding name -> reader(saved dict, its compression.json record) -> typed leaf; encoders register theirs
_LEAF_KINDS: dict[str, Callable[[dict, dict], Any]] = {}


def register_leaf_kind(encoding: str, read: Callable[[dict, dict], Any]) -> None:
    """Let `read_leaf` read a projection saved by the encoder `encoding` (its record names it)."""
    _LEAF_KINDS[encoding] = read


def read_leaf(tree: dict, record: dict) -> Any:
    """A projection saved by an encoder (`to_tree`), read back as the typed leaf its record names."""
    name = record.get("encoding") or "plain"
    if name not in _LEAF_KINDS:
        load_leaf_kinds()
    if name not in _LEAF_KINDS:
        raise ValueError(f"unknown encoding {name!r}; known: {', '.join(_LEAF_KINDS)}")
    return _LEAF_KINDS[name](tree, record)


# (keys a restored matrix dict has, constructor): encoders add theirs (`register_matrix_form`)
_MATRIX_FORMS: list[tuple[frozenset[str], Callable[[dict], Any]]] = []


def register_matrix_form(keys: set[str], build: Callable[[dict], Any]) -> None:
    """Let `as_matrix` read a dict with exactly `keys` (a quantized matrix as Orbax restores it without a target)."""
    _MATRIX_FORMS.append((frozenset(keys), build))


def as_matrix(m: Any) -> Any:
    """A matrix field of a leaf: an array or a quantized matrix as it is, or a restored dict read by its keys."""
    if not isinstance(m, dict):
        return m
    keys = frozenset(m)
    for _ in range(2):
        for form_keys, build in _MATRIX_FORMS:
            if keys == form_keys:
                return build(m)
        load_leaf_kinds()  # the encoders register their forms
    raise ValueError(f"a matrix saved as keys {sorted(m)} cannot be read without its record (a quantized matrix "
                     "saved before its grid was kept with it): load the folder with sigmascale_jax.load_model")


def is_quantized(m: Any) -> bool:
    """Whether a leaf's matrix is a quantized one (anything with `dequantize`), not a float array."""
    return hasattr(m, "dequantize")


def as_array(m: Any, dtype: Any = jnp.float32) -> jax.Array:
    """A leaf's matrix as a float array: dequantized if it is quantized."""
    return m.dequantize(dtype) if is_quantized(m) else jnp.asarray(m).astype(dtype)


def host_array(m: Any) -> np.ndarray:
    """A leaf's matrix as a float32 numpy array, dequantized on the host where the quantized form can
    (`host_values`): no program compiled per shape."""
    if is_quantized(m):
        return np.asarray(m.host_values() if hasattr(m, "host_values") else m.dequantize(), np.float32)
    return np.asarray(m, np.float32)


def matrix_bytes(m: Any) -> int:
    return m.nbytes if is_quantized(m) else int(np.prod(m.shape)) * np.dtype(m.dtype).itemsize


def matrix_tree(m: Any) -> Any:
    """A matrix as saved: a quantized one's dict, or the array."""
    return m.to_tree() if is_quantized(m) else m


def factor_labels(m: Any) -> Any:
    """Labels of a low-rank factor: a float array trains; a quantized one trains its scales only."""
    return m.labels() if is_quantized(m) else FACTOR


def frozen_labels(tree: Any) -> Any:
    return jax.tree.map(lambda _: FROZEN, tree)


def matrix_shape(m: Any) -> tuple[int, ...]:
    """The shape of the matrix `m` stands for (an array, or a quantized matrix whose own arrays are checked first)."""
    if hasattr(m, "check"):
        m.check()
    return tuple(m.shape)


def check_shapes(what: str, got: dict[str, Any], want: dict[str, tuple[int, ...]]) -> None:
    """A ValueError naming each array of `got` (name -> matrix) whose shape is not `want[name]`."""
    bad = {k: matrix_shape(v) for k, v in got.items() if v is not None and matrix_shape(v) != tuple(want[k])}
    if bad:
        have = ", ".join(f"{k} {list(s)}" for k, s in bad.items())
        need = ", ".join(f"{k} {list(want[k])}" for k in bad)
        raise ValueError(f"{what} needs {need}, the params hold {have}")


STORE_DTYPES = ("float32", "bfloat16")  # what float tensors are written as (`--store-dtype`)


def _written_whole(x: Any) -> bool:
    """Quantized matrices and codes: written as they are, whatever `--store-dtype` says."""
    return is_quantized(x) or isinstance(x, Codes)


def _stored_items(tree: Any) -> list[Any]:
    """The tensors a tree is written as: quantized matrices and codes whole, the float arrays one by one."""
    return jax.tree.leaves(tree, is_leaf=_written_whole)


def _is_float_array(x: Any) -> bool:
    return not _written_whole(x) and jnp.issubdtype(x.dtype, jnp.floating)


def stored_bytes(tree: Any, store_dtype: str = "float32") -> int:
    """Bytes `tree` (params, a block, a leaf) takes on disk with its float arrays written as `store_dtype`; quantized
    matrices (their float32 scales included) and codes count as they are."""
    size = np.dtype(jnp.bfloat16 if store_dtype == "bfloat16" else np.float32).itemsize
    total = 0
    for x in _stored_items(tree):
        if _written_whole(x):
            total += x.nbytes
        else:
            total += int(np.prod(np.shape(x))) * (size if _is_float_array(x) else np.dtype(x.dtype).itemsize)
    return total


def storage_cast(tree: Any, store_dtype: str) -> Any:
    """`tree` with its float arrays as `store_dtype` (host numpy), quantized matrices and codes as they are: what
    is written. A `storage_round`ed tree casts without loss."""
    if store_dtype == "float32":
        return tree
    dtype = jnp.bfloat16 if store_dtype == "bfloat16" else np.float32
    return jax.tree.map(lambda x: np.asarray(x).astype(dtype) if _is_float_array(x) else x, tree,
                        is_leaf=_written_whole)


def storage_round(tree: Any, store_dtype: str) -> Any:
    """`tree` with its float arrays rounded to `store_dtype`'s values and held as float32: the params as a folder
    written with `--store-dtype` loads them (computed in float32, stored in fewer bytes)."""
    if store_dtype == "float32":
        return tree
    return jax.tree.map(lambda x: np.asarray(x).astype(np.float32) if _is_float_array(x) else x,
                        storage_cast(tree, store_dtype), is_leaf=_written_whole)


def bias_bytes(bias) -> int:
    return 0 if bias is None else int(np.prod(bias.shape)) * np.dtype(bias.dtype).itemsize


def with_bias(y: jax.Array, bias: Any) -> jax.Array:
    return y if bias is None else y + bias.astype(y.dtype)


@struct.dataclass
class Dense:
    w: Any  # [out, in]
    bias: Any = None

    def apply(self, x: jax.Array) -> jax.Array:
        return with_bias(x @ as_array(self.w, x.dtype).T, self.bias)

    def matrix(self) -> jax.Array:
        return as_array(self.w)

    @property
    def num_params(self) -> int:
        rows, cols = self.w.shape
        return rows * cols

    @property
    def nbytes(self) -> int:
        return matrix_bytes(self.w) + bias_bytes(self.bias)

    def to_tree(self) -> dict[str, Any]:
        return with_bias_tree({"w": matrix_tree(self.w)}, self.bias)

    def check(self, shape: tuple[int, int], rank: int | None = None) -> None:
        m, n = shape
        check_shapes(f"a dense {m}x{n} matrix", {"w": self.w, "bias": self.bias}, {"w": (m, n), "bias": (m,)})

    def labels(self) -> "Dense":
        return frozen_labels(self)

    def export_tensors(self, prefix: str) -> tuple[dict[str, np.ndarray], dict]:
        return dense_export(self, prefix)


@struct.dataclass
class LowRank:
    b: Any  # [out, k]
    c: Any  # [k, in]
    bias: Any = None

    def apply(self, x: jax.Array) -> jax.Array:
        return with_bias((x @ as_array(self.c, x.dtype).T) @ as_array(self.b, x.dtype).T, self.bias)

    def matrix(self) -> jax.Array:
        return as_array(self.b) @ as_array(self.c)

    def host_factors(self) -> tuple[np.ndarray, np.ndarray]:
        """`(B [out, k], C [k, in])` as float32 numpy (`modeling.dense_projection` multiplies them padded)."""
        return host_array(self.b), host_array(self.c)

    @property
    def num_params(self) -> int:
        (m, k), n = self.b.shape, self.c.shape[1]
        return k * (m + n)

    @property
    def nbytes(self) -> int:
        return matrix_bytes(self.b) + matrix_bytes(self.c) + bias_bytes(self.bias)

    def to_tree(self) -> dict[str, Any]:
        return with_bias_tree({"b": matrix_tree(self.b), "c": matrix_tree(self.c)}, self.bias)

    def check(self, shape: tuple[int, int], rank: int | None = None) -> None:
        (m, n), k = shape, rank
        check_shapes(f"a rank-{k} {m}x{n} matrix", {"b": self.b, "c": self.c, "bias": self.bias},
                     {"b": (m, k), "c": (k, n), "bias": (m,)})

    def labels(self) -> "LowRank":
        return LowRank(factor_labels(self.b), factor_labels(self.c), None if self.bias is None else FROZEN)

    def export_tensors(self, prefix: str) -> tuple[dict[str, np.ndarray], dict]:
        out = {f"{prefix}.b.weight": np.asarray(as_array(self.b), np.float32),
               f"{prefix}.c.weight": np.asarray(as_array(self.c), np.float32)}
        return export_bias(out, f"{prefix}.b.bias", self.bias), {"form": "lowrank", "rank": int(self.b.shape[1])}


def with_bias_tree(out: dict[str, Any], bias: Any) -> dict[str, Any]:
    if bias is not None:
        out["bias"] = bias
    return out


def export_bias(out: dict[str, np.ndarray], name: str, bias: Any) -> dict[str, np.ndarray]:
    if bias is not None:
        out[name] = np.asarray(bias, np.float32)
    return out


def dense_export(leaf: Any, prefix: str) -> tuple[dict[str, np.ndarray], dict]:
    """Any leaf as one stock `Linear`: its reconstructed matrix (and bias)."""
    out = {f"{prefix}.weight": np.asarray(leaf.matrix(), np.float32)}
    return export_bias(out, f"{prefix}.bias", leaf.bias), {"form": "dense"}


# ------------------------------------------------------------------ dict forms (the pipeline's, and Orbax restores)

# (keys a restored dict has, constructor): encoders add theirs (`register_dict_form`)
_DICT_FORMS: list[tuple[frozenset[str], Callable[[dict], Any]]] = [
    (frozenset({"w"}), lambda p: Dense(as_matrix(p["w"]), p.get("bias"))),
    (frozenset({"b", "c"}), lambda p: LowRank(as_matrix(p["b"]), as_matrix(p["c"]), p.get("bias"))),
]


def register_dict_form(keys: set[str], build: Callable[[dict], Any]) -> None:
    """Let `as_leaf` read a dict with exactly `keys` (besides "bias") as the leaf `build(dict)` returns."""
    _DICT_FORMS.append((frozenset(keys), build))


def is_leaf(p: Any) -> bool:
    """Whether `p` is a typed projection leaf (has `apply` and `to_tree`)."""
    return hasattr(p, "apply") and hasattr(p, "to_tree")


def as_leaf(p: Any) -> Any:
    """A projection as a typed leaf: leaves pass through; dicts (`{"w"}`, `{"b", "c"}`, an encoder's saved form, or
    what an Orbax restore without a target gives) are read by their keys."""
    if is_leaf(p):
        return p
    keys = frozenset(k for k in p if k != "bias")
    for _ in range(2):
        for form_keys, build in _DICT_FORMS:
            if keys == form_keys:
                return build(p)
        load_leaf_kinds()  # the encoders register their forms
    raise ValueError(f"projection params need 'w', 'b'+'c' or an encoder's saved keys, got keys {sorted(p)}")


def leaf_labels(p: Any) -> Any:
    """`labels()` of a projection, structured like `p`: a typed leaf, or the pipeline's `{"w"}` / `{"b", "c"}` dict."""
    if is_leaf(p):
        return p.labels()
    if set(p) - {"bias"} == {"b", "c"}:
        return {k: FROZEN if k == "bias" else FACTOR for k in p}
    if set(p) - {"bias"} == {"w"}:
        return frozen_labels(p)
    raise ValueError(f"cannot label a projection saved as keys {sorted(p)}: read it as a typed leaf first "
                     "(sigmascale_jax.typed_params)")
