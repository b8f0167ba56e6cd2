"""Round-to-nearest quantization of a matrix in groups along its last axis, int8 or int4 (packed two per byte).

A matrix `[rows, cols]` (HF layout `[out, in]`, so groups run along the input dimension,
the one a matmul reduces over) is cut into groups of `group` consecutive columns
(the last one may be shorter; nothing is padded on disk but one nibble when an int4
row has an odd length). Per group:

- int8: symmetric, `q = round(x / s)`, `s = max|x| / 127`, q in [−127, 127];
- int4: asymmetric, `q = round(x / s) + z`, `s = (max − min) / 15`, `z = round(−min / s)`,
  q in [0, 15]; two values per byte (even column in the low nibble), so a group of
  128 costs 64 bytes plus its scale and zero point.

Scales are float32 and zero points uint8. Round-to-nearest keeps every element within
half a step of its value: `|x − x̂| ≤ s / 2` (plus float32 rounding), the format's bound.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

BITS = {"int8": 8, "int4": 4}


@struct.dataclass
class QuantMatrix:
    """A quantized `[rows, cols]` matrix: `values` int8 `[rows, cols]` or packed uint8 `[rows, ceil(cols/2)]`,
    `scale` float32 `[rows, groups]`, `zero` uint8 `[rows, groups]` (int4 only)."""

    values: jax.Array
    scale: jax.Array
    zero: jax.Array | None
    bits: int = struct.field(pytree_node=False)
    group: int = struct.field(pytree_node=False)
    cols: int = struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.values.shape[0], self.cols)

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        """The float matrix `[rows, cols]` it stands for."""
        rows, groups = self.scale.shape
        if self.bits == 8:
            q = self.values.astype(jnp.float32)
        else:
            packed = self.values.astype(jnp.uint8)
            q = jnp.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(rows, -1)[:, : self.cols].astype(jnp.float32)
        q = jnp.pad(q, ((0, 0), (0, groups * self.group - self.cols))).reshape(rows, groups, self.group)
        if self.bits == 4:
            q = q - self.zero.astype(jnp.float32)[..., None]
        return (q * self.scale[..., None]).reshape(rows, -1)[:, : self.cols].astype(dtype)

    @property
    def nbytes(self) -> int:
        return int(sum(a.size * a.dtype.itemsize for a in (self.values, self.scale, self.zero) if a is not None))

    def to_tree(self) -> dict[str, Any]:
        out = {"values": self.values, "scale": self.scale}
        if self.zero is not None:
            out["zero"] = self.zero
        return out

    @classmethod
    def from_tree(cls, tree: dict, bits: int, group: int, cols: int) -> "QuantMatrix":
        return cls(jnp.asarray(tree["values"]), jnp.asarray(tree["scale"]),
                   jnp.asarray(tree["zero"]) if "zero" in tree else None, bits, group, cols)


def quantize(x: np.ndarray, kind: str, group: int) -> QuantMatrix:
    """RTN-quantize `x: [rows, cols]` (float, host) as `kind` ("int8" or "int4") in groups of `group` columns."""
    bits = BITS[kind]
    if bits == 4 and group % 2:
        raise ValueError(f"int4 packs two values per byte: the group size must be even, got {group}")
    x = np.asarray(x, np.float64)
    rows, cols = x.shape
    groups = math.ceil(cols / group)
    padded = np.zeros((rows, groups * group))
    padded[:, :cols] = x
    g = padded.reshape(rows, groups, group)
    if bits == 8:
        scale = np.abs(g).max(axis=-1) / 127.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.clip(np.rint(g / scale[..., None]), -127, 127).astype(np.int8).reshape(rows, -1)[:, :cols]
        return QuantMatrix(jnp.asarray(q), jnp.asarray(scale), None, 8, group, cols)
    lo, hi = g.min(axis=-1), g.max(axis=-1)
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)  # zero stays exactly representable (padding, sparse rows)
    scale = ((hi - lo) / 15.0)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    zero = np.clip(np.rint(-lo / scale), 0, 15).astype(np.uint8)
    q = np.clip(np.rint(g / scale[..., None]) + zero[..., None], 0, 15).astype(np.uint8).reshape(rows, -1)
    q = q[:, : cols + cols % 2]  # keep the real columns (and one padding nibble for an odd count)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)
    return QuantMatrix(jnp.asarray(packed), jnp.asarray(scale), jnp.asarray(zero), 4, group, cols)


def as_array(m: Any, dtype: Any = jnp.float32) -> jax.Array:
    """A factor as a float array: dequantized if it is a `QuantMatrix`."""
    return m.dequantize(dtype) if isinstance(m, QuantMatrix) else jnp.asarray(m).astype(dtype)


def nbytes(m: Any) -> int:
    return m.nbytes if isinstance(m, QuantMatrix) else int(np.asarray(m).nbytes)
