"""GPTQ (Frantar et al., 2023): quantize `w: [rows, cols]` column by column against the Gram of its input.

The output error of a quantized layer on calibration inputs X is
`tr((W − Ŵ) H (W − Ŵ)ᵀ)` with `H = X Xᵀ` (the Gram the pipeline already collects). GPTQ
rounds one column at a time and spreads its rounding error over the columns not yet
rounded, the optimal correction for that quadratic (OBS), read off the upper Cholesky
factor U of `H⁻¹ = Uᵀ U`:

    err = (w_i − q_i) / U_ii;   w_j −= err · U_ij  for j > i.

Updates are applied lazily in blocks of `grid.group` columns (a block is a group, so a
group's scale is taken from its columns as they stand when it starts: the same as the
column-by-column form). Options as GPTQ's code has them:

- damping: `H + damp · mean(diag H) · I` (default 1%);
- activation order: columns in decreasing `diag H` (the loudest inputs first, while the
  most columns remain to absorb their error); groups then keep their scales from the
  original matrix (GPTQ's `static_groups`), so the stored layout is unchanged;
- inputs that never fire (`H_ii = 0`) get their column zeroed, as GPTQ does.

The column loop is a `lax.fori_loop` inside a `lax.fori_loop` over blocks: one compiled
program per shape whatever the number of columns (qwix's `contrib/gptq_core.py` unrolls
its column loop in Python, a traced graph linear in the columns, and has no activation
order, so it is not used here).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.scipy.linalg import solve_triangular

from sigmascale_jax.linalg.grid import Grid
from sigmascale_jax.linalg.precision import factor_precision

DEFAULT_DAMP = 0.01


class Quantized(NamedTuple):
    """Unsigned codes `[rows, cols]` (int32), scales `[rows, groups]`, zero points `[rows, groups]` (None: int8)."""

    codes: jax.Array
    scale: jax.Array
    zero: jax.Array | None


def inverse_factor(h, damp: float = DEFAULT_DAMP, size: int | None = None) -> np.ndarray:
    """Upper-triangular U with `(H + damp · mean(diag H) · I)⁻¹ = Uᵀ U`, in h's dtype (`h: [n, n]` host array, dead
    inputs already given a unit diagonal); with `size`, H is first extended by an identity block to `[size, size]`
    (U then ends in that identity block), so that Grams of nearby widths share one compiled program. The damping and
    extension happen on the host (no program per width). A FloatingPointError if the damped H is not positive
    definite."""
    h = np.asarray(h)
    n = h.shape[0]
    size = size or n
    full = np.eye(size, dtype=h.dtype)
    full[:n, :n] = h + damp * np.mean(np.diagonal(h)) * np.eye(n, dtype=h.dtype)
    u = np.asarray(_upper_inverse_cholesky(full))
    if not np.isfinite(u).all():
        raise FloatingPointError(f"GPTQ: the damped Gram matrix ({n}x{n}, damping {damp}) is not positive definite "
                                 "in this precision; raise the damping (--gptq-damp)")
    return u


@jax.jit
def _upper_inverse_cholesky(h: jax.Array) -> jax.Array:
    """Upper U with `h⁻¹ = Uᵀ U` (`h: [n, n]` symmetric positive definite; NaN where Cholesky fails)."""
    eye = jnp.eye(h.shape[0], dtype=h.dtype)
    linv = solve_triangular(jnp.linalg.cholesky(h), eye, lower=True)
    return jnp.linalg.cholesky(linv.T @ linv).T


def gptq(w, h, grid: Grid, *, damp: float = DEFAULT_DAMP, act_order: bool = True,
         precision: str = "float64") -> Quantized:
    """GPTQ of `w: [rows, cols]` (float) against the input Gram `h: [cols, cols]` on `grid` (module docstring).

    The inverse-Hessian factor is computed in `precision` (`linalg.precision`); the column loop runs in w's float
    dtype (float32 unless 64-bit arrays are on). Everything shaped by the matrix's own size (dead inputs, the column
    order, padding to the bucketed shape, cutting back) happens on the host, so one program serves every matrix of a
    bucketed shape. Returns host arrays."""
    w = np.asarray(w)
    w = np.array(w, jax.dtypes.canonicalize_dtype(w.dtype))
    h = np.array(h, np.float64)
    rows, cols = w.shape
    if h.shape != (cols, cols):
        raise ValueError(f"GPTQ: a [{rows}, {cols}] matrix needs a [{cols}, {cols}] Gram, got {list(h.shape)}")
    if not np.isfinite(h).all():
        raise FloatingPointError("GPTQ: the Gram matrix holds non-finite values")
    dead = np.diagonal(h) <= 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = np.argsort(-np.diagonal(h), kind="stable") if act_order else np.arange(cols)
    padded_cols = grid.groups(cols) * grid.group
    with factor_precision(precision) as dtype:  # padding columns: an identity block of H, and so of U
        u_pad = inverse_factor(h[np.ix_(perm, perm)].astype(dtype), damp, padded_cols)
    full = np.concatenate([perm, np.arange(cols, padded_cols)])  # padding columns stay last, on their own
    w_pad = grid.bucket(w)  # rows are independent, so nearby ranks share one compiled loop
    codes, scale, zero = jax.device_get(_gptq(w_pad, full.astype(np.int32), u_pad.astype(w.dtype),
                                              (full // grid.group).astype(np.int32), grid, act_order))
    codes = codes[:rows, np.argsort(full)][:, :cols]
    return Quantized(codes, scale[:rows], None if grid.symmetric else zero[:rows])


@functools.partial(jax.jit, static_argnames=("grid", "static"))
def _gptq(w_pad, order, u, group_of, grid: Grid, static: bool):
    """The original matrix's scales (kept when columns are reordered), then `_gptq_loop` on `w_pad`'s columns in
    processing `order`."""
    scale, zero = grid.params(w_pad)
    if zero is None:
        zero = jnp.zeros(scale.shape, jnp.int32)
    return _gptq_loop(w_pad[:, order], u, scale, zero, group_of, grid, static)


@functools.partial(jax.jit, static_argnames=("grid", "static"))
def _gptq_loop(w, u, scale, zero, group_of, grid: Grid, static: bool):
    """GPTQ's blocked loop over `w: [rows, C]` (columns in processing order, C a multiple of the group) with
    `u: [C, C]`; `group_of: [C]` each column's group in the stored layout. `static`: keep the given scales (act
    order); else each block's scales come from its columns as they stand. Returns codes `[rows, C]` in processing
    order and the scales and zero points `[rows, groups]`."""
    rows, cols = w.shape
    size = grid.group
    zero_or_none = (lambda z: None) if grid.symmetric else (lambda z: z)

    def block(b, carry):
        w, codes, scale, zero = carry
        start = b * size
        w1 = lax.dynamic_slice(w, (0, start), (rows, size))
        u1 = lax.dynamic_slice(u, (start, start), (size, size))
        if static:
            g1 = lax.dynamic_slice(group_of, (start,), (size,))
            s1, z1 = scale[:, g1], zero[:, g1]  # [rows, size]: each column's own group
        else:
            s, z = grid.params(w1)
            z = jnp.zeros_like(s, jnp.int32) if z is None else z
            scale = lax.dynamic_update_slice(scale, s, (0, b))
            zero = lax.dynamic_update_slice(zero, z, (0, b))
            s1, z1 = jnp.broadcast_to(s, (rows, size)), jnp.broadcast_to(z, (rows, size))

        def column(i, c):
            w1, q1, e1 = c
            col = lax.dynamic_slice_in_dim(w1, i, 1, axis=1)  # [rows, 1]
            s, z = lax.dynamic_slice_in_dim(s1, i, 1, axis=1), lax.dynamic_slice_in_dim(z1, i, 1, axis=1)
            q = grid.codes(col, s, zero_or_none(z))
            err = (col - grid.values(q, s, zero_or_none(z)).astype(col.dtype)) / u1[i, i]
            w1 = w1 - err * u1[i][None, :]  # U is upper triangular: columns before i are untouched
            return (w1, lax.dynamic_update_slice_in_dim(q1, q, i, axis=1),
                    lax.dynamic_update_slice_in_dim(e1, err, i, axis=1))

        init = (w1, jnp.zeros((rows, size), jnp.int32), jnp.zeros((rows, size), w.dtype))
        _, q1, e1 = lax.fori_loop(0, size, column, init)
        w = w - e1 @ lax.dynamic_slice(u, (start, 0), (size, cols))  # the later blocks' lazy update
        return w, lax.dynamic_update_slice(codes, q1, (0, start)), scale, zero

    codes = jnp.zeros((rows, cols), jnp.int32)
    _, codes, scale, zero = lax.fori_loop(0, cols // size, block, (w, codes, scale, zero))
    return codes, scale, zero
