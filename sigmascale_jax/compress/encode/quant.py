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
The codes are `leaves.Codes` (exact integers in a float carrier, no gradient), so a
quantized tree differentiates; its scales are what `trainable` lets train.

This module also holds the settings every encoder shares (`--quantize`, `--group-size`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from sigmascale_jax.compress.settings import Settings, setting
from sigmascale_jax.errors import UserError
from sigmascale_jax.model.leaves import FACTOR, Codes, matrix_bytes

BITS = {"int8": 8, "int4": 4}
DEFAULT_GROUP = 128


@struct.dataclass
class QuantMatrix:
    """A quantized `[rows, cols]` matrix: codes int8 `[rows, cols]` or packed uint8 `[rows, ceil(cols/2)]`,
    `scale` float32 `[rows, groups]`, `zero` uint8 `[rows, groups]` (int4 only)."""

    values: Codes
    scale: jax.Array
    zero: Codes | None
    bits: int = struct.field(pytree_node=False)
    group: int = struct.field(pytree_node=False)
    cols: int = struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.values.shape[0], self.cols)

    def check(self) -> None:
        """A ValueError unless the codes, scales and zero points make a `[rows, cols]` matrix in groups of `group`."""
        rows = self.values.shape[0]
        groups = math.ceil(self.cols / self.group)
        want = {"codes": (rows, self.cols if self.bits == 8 else math.ceil(self.cols / 2)), "scales": (rows, groups)}
        have = {"codes": tuple(self.values.shape), "scales": tuple(self.scale.shape)}
        if self.bits == 4:
            want["zero points"], have["zero points"] = (rows, groups), tuple(self.zero.shape)
        if have != want:
            raise ValueError(f"an int{self.bits} [{rows}, {self.cols}] matrix in groups of {self.group} needs "
                             + ", ".join(f"{k} {list(v)}" for k, v in want.items()) + "; the params hold "
                             + ", ".join(f"{k} {list(v)}" for k, v in have.items()))

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        """The float matrix `[rows, cols]` it stands for."""
        rows, groups = self.scale.shape
        if self.bits == 8:
            q = self.values.array().astype(jnp.float32)
        else:
            packed = self.values.array()
            q = jnp.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(rows, -1)[:, : self.cols].astype(jnp.float32)
        q = jnp.pad(q, ((0, 0), (0, groups * self.group - self.cols))).reshape(rows, groups, self.group)
        if self.bits == 4:
            q = q - self.zero.array().astype(jnp.float32)[..., None]
        return (q * self.scale[..., None]).reshape(rows, -1)[:, : self.cols].astype(dtype)

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + matrix_bytes(self.scale) + (self.zero.nbytes if self.zero is not None else 0)

    def labels(self) -> "QuantMatrix":
        """The scales train (a quantized factor's float part); the codes and zero points do not."""
        return QuantMatrix(self.values.labels(), FACTOR, None if self.zero is None else self.zero.labels(),
                           self.bits, self.group, self.cols)

    def to_tree(self) -> dict[str, Any]:
        out = {"values": self.values.numpy(), "scale": self.scale}
        if self.zero is not None:
            out["zero"] = self.zero.numpy()
        return out

    @classmethod
    def from_tree(cls, tree: dict, bits: int, group: int, cols: int) -> "QuantMatrix":
        zero = Codes.of(tree["zero"]) if "zero" in tree else None
        return cls(Codes.of(tree["values"]), jnp.asarray(tree["scale"]), zero, bits, group, cols)


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
        return QuantMatrix(Codes.of(q), jnp.asarray(scale), None, 8, group, cols)
    lo, hi = g.min(axis=-1), g.max(axis=-1)
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)  # zero stays exactly representable (padding, sparse rows)
    scale = ((hi - lo) / 15.0)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    zero = np.clip(np.rint(-lo / scale), 0, 15).astype(np.uint8)
    q = np.clip(np.rint(g / scale[..., None]) + zero[..., None], 0, 15).astype(np.uint8).reshape(rows, -1)
    q = q[:, : cols + cols % 2]  # keep the real columns (and one padding nibble for an odd count)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)
    return QuantMatrix(Codes.of(packed), jnp.asarray(scale), Codes.of(zero), 4, group, cols)


def check_group_size(group: int, cfg) -> None:
    """A UserError unless `group` columns fit in a row of some projection (rows run along the input dimension)."""
    longest = max(n for _, n in cfg.projection_shapes().values())
    if group > longest:
        raise UserError(f"--group-size {group} is longer than any row of this model's matrices ({longest} columns); "
                        f"use at most {longest} (default {DEFAULT_GROUP})")


@dataclasses.dataclass(frozen=True)
class QuantSettings(Settings):
    quantize: str = setting("none", "store every projection's matrices as int8 or int4 (round to nearest, a scale per "
                            "group; int4 with zero points, packed two per byte)", choices=("none", "int8", "int4"))
    group_size: int | None = setting(None, f"quantization: columns per group sharing a scale (default "
                                     f"{DEFAULT_GROUP}; even for int4)", min=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.quantize == "none":
            if self.group_size is not None:
                raise UserError("--group-size sets the quantization groups; it needs --quantize int8 or int4")
            return
        if self.group_size is None:
            object.__setattr__(self, "group_size", DEFAULT_GROUP)
        if self.quantize == "int4" and self.group_size % 2:
            raise UserError(f"--quantize int4 packs two values per byte: --group-size must be even, got {self.group_size}")

    def check_model(self, cfg) -> None:
        """The group size fits the model: no longer than the longest row any projection's matrix has."""
        if self.kind:
            check_group_size(self.group_size, cfg)

    @property
    def kind(self) -> str | None:
        return None if self.quantize == "none" else self.quantize

    def store(self, m: Any) -> Any:
        """A float matrix as this encoding keeps it: quantized, or a float32 array."""
        # the float32 values are what gets quantized, so a float32 folder re-encoded later gives the same bits
        m = np.asarray(m, np.float32)
        return quantize(m, self.kind, self.group_size) if self.kind else jnp.asarray(m)

    def load(self, tree: Any, cols: int) -> Any:
        """A matrix as `store` saved it (`to_tree`), `cols` columns wide."""
        return QuantMatrix.from_tree(tree, BITS[self.kind], self.group_size, cols) if self.kind else jnp.asarray(tree)

    def record(self) -> dict[str, Any]:
        return {"quantize": self.kind, "group_size": self.group_size}
