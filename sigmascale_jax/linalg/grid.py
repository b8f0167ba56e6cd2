"""Integer quantization grids on qwix (google's JAX quantization library): scales, zero points, codes, values.

A grid quantizes a matrix `[rows, cols]` in groups of `group` consecutive columns
(the input dimension, the one a matmul reduces over), a scale per row and group:

- int8: symmetric, `q = round(x / s)` in [−127, 127], `s = max|x| / 127`;
- int4, int3, int2: asymmetric, `q = round(x / s) + z` in [0, 2ᵇ − 1], `s = (max − min) / (2ᵇ − 1)` over
  the group with `min ≤ 0 ≤ max` (zero stays exact), `z = round(−min / s)`.

Codes are held unsigned for the asymmetric grids (`[0, 2ᵇ − 1]`, the on-disk form); qwix's
`QArray` holds them signed (`q − 2ᵇ⁻¹` with qtype `int4` / `"int3"`), which is the same grid.
What qwix does here, through its public API only: the calibration and scales of int8 and int4
(`qwix.quantize`, whose `QArray` holds them), the `QArray` a stored matrix becomes and
dequantizing (`qwix.dequantize`). What it does not, with the failing call:
`qwix.quantize(x, "int3", calibration_method="minmax")` raises "int3 doesn't support
asymmetric quantization" (qwix 0.1.8; "int2" and `jnp.int2` likewise), so int3's and int2's
scales and zero points are computed here (qwix dequantizes their `QArray`s, int4-stored);
rounding to scales fixed beforehand (GPTQ rounds each column to its group's scales) has no
public entry point (qwix's is in `qwix._src`), so `codes` rounds with qwix's own formula
(`round(x / s + z)`, saturated to the type), which the tests hold equal to `qwix.quantize` on
the same matrix; and qwix tiles only columns that divide evenly (`(8, 200) cannot be tiled as
{1: 128}`), so matrices are padded with zero columns to whole groups first (zeros change no
scale: the range always holds 0).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import qwix

# int8's symmetric range in qwix is ±127.5 (the ±127 buckets used in full); ±127 keeps every code in [−127, 127]
ROW_BUCKET = 64  # rows are padded to a multiple of this before compiling (`Grid.bucket`)
_INT8_CALIBRATION = f"absmax,{127.5 / 127.0!r}"


@dataclasses.dataclass(frozen=True)
class Grid:
    """A `bits`-bit integer grid (8: symmetric; 4, 3, 2: asymmetric with zero points) in groups of `group` columns."""

    bits: int
    group: int

    def __post_init__(self) -> None:
        if self.bits not in (8, 4, 3, 2):
            raise ValueError(f"grids are int8, int4, int3 or int2, got {self.bits} bits")

    @property
    def symmetric(self) -> bool:
        return self.bits == 8

    @property
    def qtype(self):
        """qwix's logical type of the (signed) codes."""
        return {8: jnp.int8, 4: jnp.int4, 3: "int3", 2: "int2"}[self.bits]

    @property
    def offset(self) -> int:
        """Unsigned code = qwix's signed code + offset (0 for the symmetric grid)."""
        return 0 if self.symmetric else 2 ** (self.bits - 1)

    @property
    def levels(self) -> tuple[int, int]:
        """The unsigned codes' range."""
        return (-127, 127) if self.symmetric else (0, 2**self.bits - 1)

    def groups(self, cols: int) -> int:
        return math.ceil(cols / self.group)

    def pad(self, x: jax.Array) -> jax.Array:
        """`x: [rows, cols]` with zero columns up to whole groups `[rows, groups · group]`."""
        return jnp.pad(x, ((0, 0), (0, self.groups(x.shape[1]) * self.group - x.shape[1])))

    def bucket(self, x) -> np.ndarray:
        """`x: [rows, cols]` (host) padded with zero columns to whole groups and zero rows to a multiple of
        ROW_BUCKET, on the host: rows are rounded independently and zeros round to zero, so matrices of nearby shapes
        (factors of nearby ranks) share one compiled program (and padding them compiles none)."""
        x = np.asarray(x)
        return np.pad(x, ((0, -x.shape[0] % ROW_BUCKET), (0, self.groups(x.shape[1]) * self.group - x.shape[1])))

    def params(self, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """Scales `[rows, groups]` (x's dtype) and unsigned zero points `[rows, groups]` (int32; None for int8) of
        `x: [rows, groups · group]` (padded)."""
        tiles = {1: self.group}
        if self.bits < 4:  # qwix has no asymmetric int3 or int2 (module docstring): the same formula as its int4's
            rows = x.shape[0]
            g = x.reshape(rows, -1, self.group)
            lo, hi = jnp.minimum(g.min(-1), 0.0), jnp.maximum(g.max(-1), 0.0)
            scale = (hi - lo) / (2**self.bits - 1)
            scale = jnp.where(scale < jnp.sqrt(jnp.finfo(scale.dtype).tiny), jnp.ones_like(scale), scale)
            zero = jnp.clip(jnp.round(-lo / scale), 0, 2**self.bits - 1).astype(jnp.int32)
            return scale, zero
        q = qwix.quantize(x, self.qtype, channelwise_axes=(0,), tiled_axes=tiles,
                          calibration_method=_INT8_CALIBRATION if self.symmetric else "minmax")
        zp = q.zero_point
        return q.scale.astype(x.dtype), None if zp is None else zp.astype(jnp.int32) + self.offset

    def qarray(self, codes: jax.Array, scale: jax.Array, zero: jax.Array | None) -> qwix.QArray:
        """qwix's `QArray` of unsigned `codes: [rows, groups · group]` with `scale`, `zero: [rows, groups]`."""
        store = jnp.int8 if self.bits == 8 else jnp.int4
        zp = None if zero is None else (zero.astype(jnp.int32) - self.offset).astype(store)
        return qwix.QArray((codes.astype(jnp.int32) - self.offset).astype(store), scale, zp, self.qtype)

    def codes(self, x: jax.Array, scale: jax.Array, zero: jax.Array | None) -> jax.Array:
        """Unsigned codes (int32, x's shape) of `x: [rows, groups · group]` rounded to the grid with qwix's formula:
        `round(x / s + z)` (signed zero point), saturated to the signed type's range."""
        tile = x.shape[1] // scale.shape[1]  # columns a scale covers: a group, or 1 for GPTQ's column by column
        per_column = lambda a: jnp.repeat(a.astype(x.dtype), tile, axis=1)  # noqa: E731  [rows, cols]
        q = x / per_column(scale)
        if zero is not None:
            q = q + per_column(zero - self.offset)
        signed = 2 ** (self.bits - 1)
        q = jnp.clip(jnp.round(q), -signed, signed - 1)  # the storage type's range, as qwix saturates
        # GPTQ's updated columns can leave the grid's range (int8 reaches −128): the unsigned levels hold
        return jnp.clip(q.astype(jnp.int32) + self.offset, *self.levels)

    def values(self, codes: jax.Array, scale: jax.Array, zero: jax.Array | None) -> jax.Array:
        """The float values (scale's dtype) unsigned `codes: [rows, groups · group]` stand for (qwix)."""
        return qwix.dequantize(self.qarray(codes, scale, zero))

    def round(self, x) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Round-to-nearest of `x: [rows, cols]` (host): unsigned codes `[rows, cols]`, scales and zero points
        `[rows, groups]` (host arrays), rounded on the bucketed matrix (`bucket`)."""
        rows, cols = x.shape
        codes, scale, zero = jax.device_get(_round(self.bucket(x), self))  # cut on the host: no program per shape
        return codes[:rows, :cols], scale[:rows], None if zero is None else zero[:rows]


@jax.jit(static_argnames="grid")
def _round(x: jax.Array, grid: Grid) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    scale, zero = grid.params(x)
    return grid.codes(x, scale, zero), scale, zero
