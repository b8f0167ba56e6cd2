"""PivGa (arXiv 2512.03062): the same matrix as B·C in k(m + n) − k² numbers, and its leaf type.

`B C = (B C_P)(C_P⁻¹ C)` for the k pivot columns P of C; `C_P⁻¹ C` is the identity on
P, so only `B' = B C_P` (m × k), `R = C_P⁻¹ C_R` (k × (n − k)) and the permutation are
stored: `k(m + n) − k²` numbers, the same matrix up to rounding. Applied as
`y = B' (x_P + R x_R)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from sigmascale_jax.compress.encode.plain import make_encoder, refuse_quantized
from sigmascale_jax.compress.encode.quant import QuantSettings
from sigmascale_jax.compress.plan import ENCODERS, Encoder, register
from sigmascale_jax.model.leaves import (
    FROZEN,
    Codes,
    as_array,
    as_matrix,
    bias_bytes,
    check_shapes,
    export_bias,
    factor_labels,
    host_array,
    matrix_bytes,
    matrix_tree,
    register_dict_form,
    with_bias,
    with_bias_tree,
)


@struct.dataclass
class PivGa:
    b: Any  # [out, k]  B' = B C_P
    r: Any  # [k, in − k]  R = C_P⁻¹ C_R
    perm: Codes  # [in]: pivot columns first, then the rest
    bias: Any = None

    def apply(self, x: jax.Array) -> jax.Array:
        k = self.b.shape[1]
        xp = jnp.take(x, self.perm.array(), axis=-1)
        z = xp[..., :k]
        if self.r.shape[1]:
            z = z + xp[..., k:] @ as_array(self.r, x.dtype).T
        return with_bias(z @ as_array(self.b, x.dtype).T, self.bias)

    def matrix(self) -> jax.Array:
        k = self.b.shape[1]
        c_perm = jnp.concatenate([jnp.eye(k, dtype=jnp.float32), as_array(self.r)], axis=1)  # C in permuted columns
        c = jnp.zeros_like(c_perm).at[:, self.perm.array()].set(c_perm)
        return as_array(self.b) @ c

    def host_factors(self) -> tuple[np.ndarray, np.ndarray]:
        """`(B' [out, k], C [k, in])` as float32 numpy, C = [I R] put back in the original column order."""
        k = self.b.shape[1]
        c_perm = np.concatenate([np.eye(k, dtype=np.float32), host_array(self.r)], axis=1)
        c = np.zeros_like(c_perm)
        c[:, self.perm.numpy()] = c_perm
        return host_array(self.b), c

    @property
    def num_params(self) -> int:
        (m, k), n = self.b.shape, self.perm.shape[0]
        return k * (m + n) - k * k

    @property
    def nbytes(self) -> int:
        return matrix_bytes(self.b) + matrix_bytes(self.r) + self.perm.nbytes + bias_bytes(self.bias)

    def to_tree(self) -> dict[str, Any]:
        return with_bias_tree({"b": matrix_tree(self.b), "r": matrix_tree(self.r), "perm": self.perm.numpy()}, self.bias)

    def check(self, shape: tuple[int, int], rank: int | None = None) -> None:
        (m, n), k = shape, rank
        check_shapes(f"a rank-{k} {m}x{n} PivGa matrix", {"b": self.b, "r": self.r, "perm": self.perm,
                                                          "bias": self.bias},
                     {"b": (m, k), "r": (k, n - k), "perm": (n,), "bias": (m,)})
        if not np.array_equal(np.sort(self.perm.numpy()), np.arange(n)):
            raise ValueError(f"its column order perm is not a permutation of 0..{n - 1}")

    def labels(self) -> "PivGa":
        return PivGa(factor_labels(self.b), factor_labels(self.r), self.perm.labels(),
                     None if self.bias is None else FROZEN)

    def export_tensors(self, prefix: str) -> tuple[dict[str, np.ndarray], dict]:
        out = {f"{prefix}.b.weight": np.asarray(as_array(self.b), np.float32),
               f"{prefix}.r.weight": np.asarray(as_array(self.r), np.float32),
               f"{prefix}.perm": self.perm.numpy().astype(np.int64)}
        return export_bias(out, f"{prefix}.b.bias", self.bias), {"form": "pivga", "rank": int(self.b.shape[1])}


def perm_dtype(n: int) -> str:
    """The permutation of `n` columns in 2 bytes an entry where it fits, else 4."""
    return "int16" if n <= np.iinfo(np.int16).max else "int32"


def perm_codes(perm: Any) -> Codes:
    return Codes.of(perm.astype(perm_dtype(perm.shape[0])))


def _restored(p: dict) -> PivGa:
    """A PivGa leaf from its saved dict, or from what an Orbax restore without a target gives (`perm` as a dict of
    its float carrier); works under `jit`."""
    perm = p["perm"]
    if isinstance(perm, dict):
        carrier = jnp.asarray(perm["carrier"], jnp.float32)
        perm = Codes(carrier, perm_dtype(carrier.shape[0]))
    else:
        perm = perm_codes(perm)
    # a dict: a quantized matrix; an array (traced, under jit) as it is; host data stays on the host
    b, r = (as_matrix(p[k]) if isinstance(p[k], dict) else p[k] if isinstance(p[k], jax.Array) else np.asarray(p[k])
            for k in ("b", "r"))
    return PivGa(b, r, perm, p.get("bias"))


register_dict_form({"b", "r", "perm"}, _restored)


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


def pivga_leaf(b, c, settings: QuantSettings | None = None, bias=None, gram=None, precision: str = "float64") -> PivGa:
    """The rank-k pair `b: [m, k]`, `c: [k, n]` as a PivGa leaf, its matrices stored as `settings` say (float32).

    With GPTQ (`gram`: the input's `[n, n]` Gram), B' and R are rounded one after the other (`pivga_pair`), and
    the result is `(leaf, what pivga_pair says of it)`."""
    settings = settings or QuantSettings()
    bp, r, perm = pivga_from_factors(b, c)
    if not settings.needs_gram:
        return PivGa(settings.store(bp), settings.store(r), perm_codes(perm), bias)
    (b_q, r_q), info = pivga_pair(settings, bp, r, np.asarray(gram, np.float64)[np.ix_(perm, perm)], precision)
    return PivGa(b_q, r_q, perm_codes(perm), bias), info


def pivga_pair(settings: QuantSettings, bp: np.ndarray, r: np.ndarray, h: np.ndarray, precision: str = "float64",
               order: str | None = None) -> tuple[tuple[Any, Any], dict]:
    """PivGa's `B' [m, k]` and `R [k, n − k]` quantized with GPTQ against `h`, the input Gram in pivot order
    (`QuantSettings.store_pair`'s orders). Its inner factor `[I R]` passes the pivot inputs through exactly, so R
    is rounded against the Gram of the other inputs `h_RR`; outer first refits R to B̂ by least squares under h:
    `R = B̂⁺ (W_R − (B̂ − W_P) h_PR h_RR⁻¹)`."""
    from sigmascale_jax.compress.encode.quant import dequantized, pick_order, refit_outer

    k = bp.shape[1]
    eye = np.eye(k)
    w = bp @ np.concatenate([eye, r], axis=1)
    h_rr = h[k:, k:]

    def inner(r_values):
        return np.concatenate([eye, r_values], axis=1)

    def inner_first():
        r_q = settings.store(r, h_rr, precision)
        g = inner(dequantized(r_q))
        return settings.store(refit_outer(w, g, h), g @ h @ g.T, precision), r_q

    def outer_first():
        g = inner(r)
        b_q = settings.store(bp, g @ h @ g.T, precision)
        b_hat = dequantized(b_q)
        ridge = 1e-10 * max(np.trace(h_rr) / max(len(h_rr), 1), np.finfo(np.float64).tiny) * np.eye(len(h_rr))
        target = w[:, k:] - (b_hat - w[:, :k]) @ np.linalg.solve(h_rr + ridge, h[k:, :k]).T
        return b_q, settings.store(np.linalg.lstsq(b_hat, target, rcond=None)[0], h_rr, precision)

    def independent():
        g = inner(r)
        return settings.store(bp, g @ h @ g.T, precision), settings.store(r, h_rr, precision)

    return pick_order(order or settings.gptq_order, {"inner-first": inner_first, "outer-first": outer_first,
                                                     "independent": independent},
                      lambda pair: dequantized(pair[0]) @ inner(dequantized(pair[1])), w, h)


def _read(tree: dict, record: dict, settings: QuantSettings) -> PivGa:
    k, n = record["rank"], record["shape"][1]
    return PivGa(settings.load(tree["b"], k), settings.load(tree["r"], n - k), perm_codes(tree["perm"]),
                 tree.get("bias"))


def _requantize(leaf: Any, settings: QuantSettings, src: str) -> PivGa:
    """A float PivGa leaf with its B' and R stored as `settings` say (already gauge-fixed: only quantization is left)."""
    refuse_quantized((leaf.b, leaf.r), src)
    return PivGa(settings.store(leaf.b), settings.store(leaf.r), leaf.perm, leaf.bias)


@dataclasses.dataclass(frozen=True)
class PivGaSettings(QuantSettings):
    pass


def pivga_params(m: int, n: int, k):
    """Numbers PivGa stores for an `m × n` matrix at rank k: `k(m + n) − k²` (never more than `m·n`)."""
    return k * (m + n) - k * k


@register(ENCODERS, "pivga", PivGaSettings,
          "PivGa: B' = B C_P and R = C_P⁻¹ C_R with pivot columns P, lossless, k(m+n) − k² numbers")
def pivga(**settings) -> Encoder:
    return make_encoder("pivga", PivGaSettings(**settings), pivga_params, pivga_leaf, _read, _requantize)
