"""Quantized matrices (int8, int4, int3, int2) in groups along the last axis, rounded to nearest or by GPTQ.

A matrix `[rows, cols]` (HF layout `[out, in]`, so groups run along the input dimension,
the one a matmul reduces over) is cut into groups of `group` consecutive columns (the
last one may be shorter; nothing is padded on disk). The grids (`linalg/grid.py`, on
qwix): int8 symmetric (codes in [−127, 127]); int4, int3 and int2 asymmetric with a zero
point per group (codes in [0, 2ᵇ − 1]), packed little-endian along each row (two int4 codes a
byte, even column in the low nibble; eight int3 codes in three bytes; four int2 codes a byte).
Scales are float32, zero points uint8.

Rounding: `--quantizer rtn` rounds each value to its nearest grid point (`|x − x̂| ≤ s / 2`);
`--quantizer gptq` rounds column by column against the Gram matrix of the matrix's input,
spreading each column's error over the columns after it (`linalg/gptq.py`). A factor pair
`B·C` is quantized one factor after the other, the second refit to the first's rounded
values so it absorbs their error instead of multiplying it (`QuantSettings.store_pair`):
inner first (C against the input Gram H, then B refit by least squares under H and rounded
against `Ĉ H Ĉᵀ`, the Gram of C's output) or outer first (B against `C H Cᵀ`, then C refit
to B̂ and rounded against H); by default both, keeping the pair with the lower output error
on the calibration Gram (each matrix's record says which won; `scripts/bench_storage.py`
tallies them on SmolLM2).

The codes are `leaves.Codes` (exact integers in a float carrier, no gradient), so a
quantized tree differentiates; its scales are what `trainable` lets train. qwix's own
`QArray` holds integer arrays, which `jax.grad` refuses ("grad requires real- or
complex-valued inputs ... but got int8"), so it is made on demand (`QuantMatrix.qarray()`),
not stored in the tree.

This module also holds the settings every encoder shares (`--quantize`, `--quantizer`,
`--group-size`, `--gptq-damp`, `--act-order`, `--gptq-order`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import struct

from sigmascale_jax.compress.settings import Settings, setting
from sigmascale_jax.errors import UserError
from sigmascale_jax.linalg.gptq import DEFAULT_DAMP, gptq
from sigmascale_jax.linalg.grid import Grid
from sigmascale_jax.model.leaves import (
    FACTOR,
    STORE_DTYPES,
    Codes,
    is_quantized,
    matrix_bytes,
    register_matrix_form,
    storage_round,
)

BITS = {"int8": 8, "int4": 4, "int3": 3, "int2": 2}
EMBEDDING_BITS = ("int8", "int4")  # per-row tables: GGUF files keep embeddings at 8 bits, 4 at the least
UNQUANTIZED = "none"  # --quantize's float32 choice (a name of its own: "none" is also --method none's)
DEFAULT_GROUP = 128


def packed_width(cols: int, bits: int) -> int:
    """Bytes a row of `cols` codes takes: one each at 8 bits, else `ceil(cols · bits / 8)`."""
    return cols if bits == 8 else math.ceil(cols * bits / 8)


def grid_meta(bits: int, group: int, cols: int) -> np.ndarray:
    """int32 `[bits, group, cols]`: a quantized matrix's static fields as an array (saved with it)."""
    return np.asarray([bits, group, cols], np.int32)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned `codes: [rows, cols]` (< 2^bits) as uint8 `[rows, packed_width]`, little-endian bits along each row
    (int4: the even column in the low nibble)."""
    codes = np.asarray(codes, np.uint8)
    rows, cols = codes.shape
    bitplanes = (codes[..., None] >> np.arange(bits, dtype=np.uint8)) & 1  # [rows, cols, bits]
    return np.packbits(bitplanes.reshape(rows, cols * bits), axis=1, bitorder="little")


def unpack(packed: jax.Array, bits: int, cols: int) -> jax.Array:
    """The unsigned codes `[rows, cols]` (int32) that `pack` wrote."""
    packed = packed.astype(jnp.int32)
    rows = packed.shape[0]
    if bits == 4:
        return jnp.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(rows, -1)[:, :cols]
    bitplanes = (packed[..., None] >> jnp.arange(8)) & 1  # [rows, bytes, 8]
    bitplanes = bitplanes.reshape(rows, -1)[:, : cols * bits].reshape(rows, cols, bits)
    return (bitplanes << jnp.arange(bits)).sum(-1)


@struct.dataclass
class QuantMatrix:
    """A quantized `[rows, cols]` matrix: codes int8 `[rows, cols]` (int8) or packed uint8 `[rows, packed_width]`
    (int4, int3, int2), `scale` float32 `[rows, groups]`, `zero` uint8 `[rows, groups]` (below 8 bits)."""

    values: Codes
    scale: jax.Array
    zero: Codes | None
    bits: int = struct.field(pytree_node=False)
    group: int = struct.field(pytree_node=False)
    cols: int = struct.field(pytree_node=False)
    # the static fields again, as data (`Codes`, int32 [bits, group, cols]): what an Orbax restore without a target
    # keeps of them, so such a restore reads back (`from_restored`)
    meta: Codes | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.values.shape[0], self.cols)

    @property
    def grid(self) -> Grid:
        return Grid(self.bits, self.group)

    def check(self) -> None:
        """A ValueError unless the codes, scales and zero points make a `[rows, cols]` matrix in groups of `group`."""
        rows = self.values.shape[0]
        groups = math.ceil(self.cols / self.group)
        want = {"codes": (rows, packed_width(self.cols, self.bits)), "scales": (rows, groups)}
        have = {"codes": tuple(self.values.shape), "scales": tuple(self.scale.shape)}
        if self.bits != 8:
            want["zero points"], have["zero points"] = (rows, groups), tuple(self.zero.shape)
        if have != want:
            raise ValueError(f"an int{self.bits} [{rows}, {self.cols}] matrix in groups of {self.group} needs "
                             + ", ".join(f"{k} {list(v)}" for k, v in want.items()) + "; the params hold "
                             + ", ".join(f"{k} {list(v)}" for k, v in have.items()))

    def codes(self) -> jax.Array:
        """The codes `[rows, cols]` (int32): signed for int8, unsigned (with zero points) below."""
        if self.bits == 8:
            return self.values.array().astype(jnp.int32)
        return unpack(self.values.array(), self.bits, self.cols)

    def qarray(self):
        """qwix's `QArray` of this matrix, padded with zero columns to whole groups (`[rows, groups · group]`):
        for qwix's quantized matmuls (`qwix.dot_general`) and `qwix.dequantize`."""
        grid = self.grid
        if self.bits == 8:  # the stored int8 codes as they are: no detour through int32 (dequantized every step)
            return qwix.QArray(grid.pad(self.values.array()), self.scale, None, grid.qtype)
        return grid.qarray(grid.pad(self.codes()), self.scale, self.zero.array())

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        """The float matrix `[rows, cols]` it stands for."""
        return qwix.dequantize(self.qarray())[:, : self.cols].astype(dtype)

    def rows(self, index: jax.Array) -> jax.Array:
        """`[*index.shape, cols]`: the rows `index` (int, any shape) dequantized (in the scales' dtype), the others
        left alone: an embedding lookup in a quantized table."""
        flat = jnp.reshape(index, (-1,))
        take = lambda c: None if c is None else Codes(c.carrier[flat], c.dtype)  # noqa: E731
        picked = self.replace(values=take(self.values), scale=self.scale[flat], zero=take(self.zero))
        return picked.dequantize(self.scale.dtype).reshape(*jnp.shape(index), self.cols)

    def host_values(self) -> np.ndarray:
        """`dequantize()` on the host (float32 numpy) with qwix's formula, `(code − zero point) · scale`: the
        encoders and propagation read many shapes of these, and numpy compiles no program for each."""
        per_column = lambda a: np.repeat(np.asarray(a), self.group, axis=1)[:, : self.cols]  # noqa: E731
        codes = host_codes(self)
        if self.zero is not None:
            codes = codes - per_column(self.zero.numpy()).astype(np.int32)
        return codes.astype(np.float32) * per_column(self.scale).astype(np.float32)

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + matrix_bytes(self.scale) + (self.zero.nbytes if self.zero is not None else 0)

    def labels(self) -> "QuantMatrix":
        """The scales train (a quantized factor's float part); the codes and zero points do not."""
        return QuantMatrix(self.values.labels(), FACTOR, None if self.zero is None else self.zero.labels(),
                           self.bits, self.group, self.cols, None if self.meta is None else self.meta.labels())

    def to_tree(self) -> dict[str, Any]:
        out = {"values": self.values.numpy(), "scale": self.scale, "meta": grid_meta(self.bits, self.group, self.cols)}
        if self.zero is not None:
            out["zero"] = self.zero.numpy()
        return out

    @classmethod
    def from_restored(cls, tree: dict) -> "QuantMatrix":
        """A matrix from what an Orbax restore without a target gives (its saved dict, or its pytree with `Codes`
        carriers as `{"carrier": ...}`): bits, group and columns read from its `meta`. Outside `jit`."""
        meta = tree["meta"]
        meta = np.asarray(meta["carrier"] if isinstance(meta, dict) else meta, np.float64)
        if isinstance(meta, jax.core.Tracer) or meta.shape != (3,):
            raise ValueError("read a restored quantized matrix outside jit (sigmascale_jax.typed_params)")
        bits, group, cols = (int(x) for x in meta)

        def codes(x: Any, dtype: Any) -> Codes:
            if isinstance(x, dict):
                return Codes(jnp.asarray(x["carrier"]), np.dtype(dtype).name)
            return Codes.of(np.asarray(x).astype(dtype))

        values = codes(tree["values"], np.int8 if bits == 8 else np.uint8)
        zero = codes(tree["zero"], np.uint8) if tree.get("zero") is not None else None
        return cls(values, jnp.asarray(tree["scale"], jnp.float32), zero, bits, group, cols,
                   Codes.of(grid_meta(bits, group, cols)))

    @classmethod
    def from_tree(cls, tree: dict, bits: int, group: int, cols: int) -> "QuantMatrix":
        """A matrix from its saved dict and its record's grid (`meta`, where saved, is the same)."""
        zero = Codes.of(tree["zero"]) if "zero" in tree else None
        return cls(Codes.of(tree["values"]), np.asarray(tree["scale"]), zero, bits, group, cols,
                   Codes.of(grid_meta(bits, group, cols)))

    @classmethod
    def of(cls, codes: Any, scale: Any, zero: Any, bits: int, group: int) -> "QuantMatrix":
        """A stored matrix from a grid's codes `[rows, cols]` (unsigned below 8 bits), scales and zero points
        `[rows, groups]`."""
        codes = np.asarray(codes)
        cols = codes.shape[1]
        values = codes.astype(np.int8) if bits == 8 else pack(codes, bits)
        zero = None if zero is None else Codes.of(np.asarray(zero).astype(np.uint8))
        return cls(Codes.of(values), jnp.asarray(scale, jnp.float32), zero, bits, group, cols,
                   Codes.of(grid_meta(bits, group, cols)))


def _check_kind(kind: str, group: int, x: Any = None) -> int:
    """`kind`'s bits, after checking the arguments of `quantize` / `quantize_gptq` (an `ArgError` naming each)."""
    from sigmascale_jax.errors import ArgError

    if kind not in BITS:
        raise ArgError("kind", f"must be one of {', '.join(BITS)}, got {kind!r}")
    if isinstance(group, bool) or not isinstance(group, (int, np.integer)) or group < 1:
        raise ArgError("group", f"must be a whole number of columns ≥ 1, got {group!r}")
    bits = BITS[kind]
    if bits == 4 and group % 2:
        raise ArgError("group", f"must be even for int4 (two values a byte), got {group}")
    if x is not None and (np.ndim(x) != 2 or not np.issubdtype(np.asarray(x).dtype, np.floating)):
        raise ArgError("x", f"must be a float matrix [rows, cols], got {np.asarray(x).dtype} {list(np.shape(x))}")
    return bits


def quantize(x: Any, kind: str, group: int) -> QuantMatrix:
    """Round-to-nearest `x: [rows, cols]` (float; rounded as float32) as `kind` ("int8", "int4", "int3", "int2") in groups of
    `group` columns."""
    bits = _check_kind(kind, group, x)
    grid = Grid(bits, group)
    codes, scale, zero = grid.round(jnp.asarray(np.asarray(x, np.float32)))
    return QuantMatrix.of(codes, scale, zero, bits, group)


def quantize_gptq(x: Any, gram: Any, kind: str, group: int, *, damp: float = DEFAULT_DAMP, act_order: bool = True,
                  precision: str = "float64") -> QuantMatrix:
    """GPTQ of `x: [rows, cols]` (rounded as float32) against its input's Gram `gram: [cols, cols]`
    (`linalg/gptq.py`) as `kind` in groups of `group` columns."""
    bits = _check_kind(kind, group, x)
    q = gptq(np.asarray(x, np.float32), gram, Grid(bits, group), damp=damp, act_order=act_order, precision=precision)
    return QuantMatrix.of(q.codes, q.scale, q.zero, bits, group)


GPTQ_ORDERS = ("best", "inner-first", "outer-first")


def store_outer(params: dict, quantize_embeddings: str = UNQUANTIZED, store_dtype: str = "float32") -> dict:
    """Params (outer tensors and typed blocks) as a folder stores them: the embedding table and the LM head (float
    ones; tied: one table) rounded to nearest per row (one group a row) as `quantize_embeddings`, then every float
    tensor rounded to `store_dtype` (held as float32: `leaves.storage_round`)."""
    out = dict(params)
    if quantize_embeddings != UNQUANTIZED:
        for key in ("embed", "lm_head"):
            if key in out and not is_quantized(out[key]):
                table = np.asarray(out[key], np.float32)
                out[key] = quantize(table, quantize_embeddings, table.shape[1])
    return storage_round(out, store_dtype)


def store_rules(encoder) -> tuple[str, str]:
    """`(quantize_embeddings, store_dtype)` of an encoder (a user's own without those settings: float32, as is)."""
    settings = encoder.settings
    return getattr(settings, "quantize_embeddings", UNQUANTIZED), getattr(settings, "store_dtype", "float32")


def host_codes(m: QuantMatrix) -> np.ndarray:
    """`m.codes()` on the host (int32 `[rows, cols]`): numpy, no program per shape."""
    values = np.asarray(m.values.numpy())
    if m.bits == 8:
        return values.astype(np.int32)
    bitplanes = np.unpackbits(values, axis=1, bitorder="little")[:, : m.cols * m.bits]
    return (bitplanes.reshape(values.shape[0], m.cols, m.bits).astype(np.int32) << np.arange(m.bits)).sum(-1)


def dequantized(m: Any) -> np.ndarray:
    """A stored matrix's values as float64 numpy (a `QuantMatrix` dequantized on the host, `host_values`)."""
    if isinstance(m, QuantMatrix):
        return m.host_values().astype(np.float64)
    return np.asarray(m.dequantize() if hasattr(m, "dequantize") else m, np.float64)


def output_error(w: np.ndarray, w_hat: np.ndarray, gram: np.ndarray) -> float:
    """`tr((Ŵ − W) H (Ŵ − W)ᵀ) / tr(W H Wᵀ)`: the output error on the calibration inputs whose Gram is H, relative
    to the output's energy."""
    d = np.asarray(w_hat, np.float64) - w
    return float(np.einsum("ij,jk,ik->", d, gram, d) / max(np.einsum("ij,jk,ik->", w, gram, w), 1e-300))


def pick_order(order: str, make: dict, product, w: np.ndarray, gram: np.ndarray) -> tuple[Any, dict]:
    """The factor pair `make[order]()` builds, and what the matrix's record says of it: its `output_error`
    (relative, `output_error`), `gptq_order_used` and `output_error_orders` (each order tried); for "best",
    whichever of inner-first and outer-first gives the lower output error (`product(pair)` = Ŵ, in the coordinates
    of `gram`)."""
    names = ("inner-first", "outer-first") if order == "best" else (order,)
    if any(n not in make for n in names):
        raise ValueError(f"order is one of {', '.join(('independent', *GPTQ_ORDERS))}, got {order!r}")
    pairs = {n: make[n]() for n in names}
    errors = {n: output_error(w, product(pair), gram) for n, pair in pairs.items()}
    chosen = min(errors, key=errors.get)
    return pairs[chosen], {"output_error": errors[chosen], "gptq_order_used": chosen, "output_error_orders": errors}


def refit_outer(w: np.ndarray, inner: np.ndarray, gram: np.ndarray) -> np.ndarray:
    """`B: [m, k]` minimising `tr((B G − W) H (B G − W)ᵀ)` for `w: [m, n]`, `inner` G `[k, n]`, `gram` H `[n, n]`:
    `B = W H Gᵀ (G H Gᵀ)⁻¹` (float64, a solve with a relative ridge of 1e-10 against a singular `G H Gᵀ`)."""
    w, g, h = (np.asarray(a, np.float64) for a in (w, inner, gram))
    hg = h @ g.T  # [n, k]
    a = g @ hg
    a = a + 1e-10 * max(np.trace(a) / len(a), np.finfo(np.float64).tiny) * np.eye(len(a))
    return np.linalg.solve(a, (w @ hg).T).T


def default_group_size(cfg) -> int:
    """The group size a model gets when none is asked: 128 columns, but at most a quarter of its narrowest
    projection input (a power of two, at least 8). One group as wide as a whole row is what lost off the calibration
    domain: on stories260k (64-wide inputs) GPTQ int4 with act order at group 128 scored 213 on held-out WikiText-2
    validation text against round-to-nearest's 209, and at group 16 198.5 against 210.0; int3 likewise
    (`results/gptq_small_stories260k.md`). SmolLM2's narrowest input, 576, keeps 128."""
    narrowest = min(n for _, n in cfg.projection_shapes().values())
    return int(min(DEFAULT_GROUP, max(8, 2 ** int(np.floor(np.log2(max(narrowest // 4, 1)))))))


def check_group_size(group: int, cfg) -> None:
    """A UserError unless `group` columns fit in a row of some projection (rows run along the input dimension)."""
    longest = max(n for _, n in cfg.projection_shapes().values())
    if group > longest:
        raise UserError(f"--group-size {group} is longer than any row of this model's matrices ({longest} columns); "
                        f"use at most {longest} (default {DEFAULT_GROUP})")


@dataclasses.dataclass(frozen=True)
class QuantSettings(Settings):
    quantize: str = setting(UNQUANTIZED, "store every projection's matrices as int8, int4, int3 or int2 (a scale per "
                            "group; below 8 bits with zero points, packed)", choices=(UNQUANTIZED, *BITS))
    quantizer: str | None = setting(None, "--quantize: how values are rounded: rtn (to nearest) or gptq (column by "
                                    "column against the calibration Gram matrices, each column's error spread over "
                                    "the rest; block by block as the compressor reaches them) (default: rtn)",
                                    choices=("rtn", "gptq"))
    group_size: int | None = setting(None, f"quantization: columns per group sharing a scale (default "
                                     f"{DEFAULT_GROUP}, at most a quarter of the model's narrowest projection input; "
                                     "even for int4)", min=1)
    gptq_damp: float | None = setting(None, f"--quantizer gptq: damping added to the Gram's diagonal, a fraction of "
                                      f"its mean (default {DEFAULT_DAMP}; 1 or more makes GPTQ nearly round-to-"
                                      "nearest)", min=0.0, max=100.0)
    act_order: bool | None = setting(None, "--quantizer gptq: round columns in decreasing input energy (the Gram's "
                                     "diagonal), groups keeping the original matrix's scales (default: on)")
    quantize_embeddings: str = setting(UNQUANTIZED, "store the token embeddings and the LM head (one table when "
                                       "tied) as int8 or int4, a scale (and int4 zero point) per row",
                                       choices=(UNQUANTIZED, *EMBEDDING_BITS))
    store_dtype: str = setting("float32", "what the float tensors that stay (norms, float factors, embeddings kept "
                               "float) are stored as; bfloat16 halves them, loaded back as float32",
                               choices=STORE_DTYPES)
    gptq_order: str | None = setting(None, "--quantizer gptq on factors: which factor is rounded first, the other refit "
                                     "to it and rounded after; best: both, keeping the pair with the lower output "
                                     "error on the calibration Gram (default: best)", choices=GPTQ_ORDERS)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.quantize == UNQUANTIZED:
            for name in ("group_size", "quantizer", "gptq_damp", "act_order", "gptq_order"):
                if getattr(self, name) is not None:
                    what = "the quantization groups" if name == "group_size" else "how matrices are quantized"
                    raise UserError(f"--{name.replace('_', '-')} sets {what}; it needs --quantize int8, int4, int3 or int2")
            return
        if self.quantizer is None:  # the group size's default depends on the model: set in `check_model`
            object.__setattr__(self, "quantizer", "rtn")
        if self.quantizer == "gptq":
            object.__setattr__(self, "gptq_damp", DEFAULT_DAMP if self.gptq_damp is None else self.gptq_damp)
            object.__setattr__(self, "act_order", True if self.act_order is None else self.act_order)
            object.__setattr__(self, "gptq_order", self.gptq_order or "best")
        elif self.gptq_damp is not None or self.act_order is not None or self.gptq_order is not None:
            raise UserError("--gptq-damp, --act-order and --gptq-order set GPTQ; they need --quantizer gptq")
        if self.quantize == "int4" and self.group_size is not None and self.group_size % 2:
            raise UserError(f"--quantize int4 packs two values per byte: --group-size must be even, got {self.group_size}")

    def asdict(self) -> dict[str, Any]:
        """The settings that change the result: GPTQ's only where it is used (so unquantized and RTN runs keep the
        resume keys they had before GPTQ existed)."""
        out = super().asdict()
        for name in ("quantizer", "gptq_damp", "act_order", "gptq_order"):
            if out[name] is None or (name == "quantizer" and out[name] == "rtn"):
                out.pop(name)
        for name, default in (("quantize_embeddings", UNQUANTIZED), ("store_dtype", "float32")):
            if out[name] == default:  # runs that keep them keep the resume keys they had before the settings existed
                out.pop(name)
        return out

    def check_model(self, cfg) -> None:
        """The group size fits the model (no longer than the longest row any projection's matrix has); where none was
        asked, the model's default (`default_group_size`) is set here, before any matrix is stored."""
        if self.quantize_embeddings == "int4" and cfg.hidden_size % 2:
            raise UserError(f"--quantize-embeddings int4 packs two values a byte along rows of {cfg.hidden_size}; "
                            "use int8 for an odd hidden size")
        if self.kind:
            if self.group_size is None:
                object.__setattr__(self, "group_size", default_group_size(cfg))
            check_group_size(self.group_size, cfg)

    @property
    def kind(self) -> str | None:
        return None if self.quantize == UNQUANTIZED else self.quantize

    @property
    def needs_gram(self) -> bool:
        """Whether storing a matrix needs the Gram matrix of its input (GPTQ)."""
        return self.quantizer == "gptq"

    def store(self, m: Any, gram: Any = None, precision: str = "float64") -> Any:
        """A float matrix `m: [rows, cols]` as this encoding keeps it: quantized, or a float32 array. GPTQ needs
        `gram: [cols, cols]`, the Gram of the matrix's input."""
        # the float32 values are what gets quantized, so a float32 folder re-encoded later gives the same bits
        m = np.asarray(m, np.float32)
        if not self.kind:
            return m  # a host array: `jnp.asarray` would compile a transfer per shape, i.e. per rank
        if self.group_size is None:
            raise ValueError("the group size is set against the model first (QuantSettings.check_model)")
        if not self.needs_gram:
            return quantize(m, self.kind, self.group_size)
        if gram is None:
            raise ValueError("GPTQ quantization needs the Gram matrix of the matrix's input")
        return quantize_gptq(m, gram, self.kind, self.group_size, damp=self.gptq_damp, act_order=self.act_order,
                             precision=precision)

    def store_pair(self, b: Any, c: Any, gram: Any, precision: str = "float64",
                   order: str | None = None) -> tuple[tuple[Any, Any], dict]:
        """A factor pair `b: [m, k]`, `c: [k, n]` quantized with GPTQ against `gram: [n, n]`, the Gram of C's input:
        ((B stored, C stored), what `pick_order` says of it). `order` (default `--gptq-order`): "inner-first" (C against H; B refit to Ĉ and rounded
        against `Ĉ H Ĉᵀ`), "outer-first" (B against `C H Cᵀ`; C refit to B̂ and rounded against H), "best" (both,
        keeping the pair with the lower output error `tr(ΔW H ΔWᵀ)` on the calibration Gram) or "independent"
        (each against its float input's Gram, no refit: the baseline the orders are measured against)."""
        b, c, h = (np.asarray(a, np.float64) for a in (b, c, gram))
        w = b @ c

        def inner_first():
            c_q = self.store(c, h, precision)
            c_hat = dequantized(c_q)
            return self.store(refit_outer(w, c_hat, h), c_hat @ h @ c_hat.T, precision), c_q

        def outer_first():
            b_q = self.store(b, c @ h @ c.T, precision)
            return b_q, self.store(np.linalg.lstsq(dequantized(b_q), w, rcond=None)[0], h, precision)

        def independent():
            return self.store(b, c @ h @ c.T, precision), self.store(c, h, precision)

        return pick_order(order or self.gptq_order, {"inner-first": inner_first, "outer-first": outer_first,
                                                     "independent": independent},
                          lambda pair: dequantized(pair[0]) @ dequantized(pair[1]), w, h)

    def load(self, tree: Any, cols: int) -> Any:
        """A matrix as `store` saved it (`to_tree`), `cols` columns wide."""
        if self.kind:
            return QuantMatrix.from_tree(tree, BITS[self.kind], self.group_size, cols)
        return np.asarray(tree)  # on the host: the loader places the whole tree at once (no transfer per shape)

    def record(self) -> dict[str, Any]:
        out = {"quantize": self.kind, "group_size": self.group_size}
        if self.kind:
            out["quantizer"] = self.quantizer
        if self.needs_gram:
            out.update(gptq_damp=self.gptq_damp, act_order=self.act_order, gptq_order=self.gptq_order)
        return out


register_matrix_form({"values", "scale", "meta"}, QuantMatrix.from_restored)
register_matrix_form({"values", "scale", "zero", "meta"}, QuantMatrix.from_restored)
