"""Low-rank beside a quantized weight: `W ≈ Q + L·R` (CALDERA, QERA/LQER), and its leaf type.

`Q` is the projection's matrix quantized (`--quantize` int8 … int2, `--quantizer` rtn or gptq against
the calibration Gram); `L·R` (rank `--residual-rank`) is the activation-aware fit of what `Q`
loses, `W − Q`, under the input's Gram `H = X Xᵀ`: with `H = S S` (its symmetric root), the
SVD of `(W − Q) S` truncated to rank r gives `L R = [(W − Q) S]_r S⁻¹`, the minimiser of
`tr((W − Q − L R) H (W − Q − L R)ᵀ)` (SVD-LLM's whitening, applied to the error instead of
the weight). CALDERA alternates: `Q` is re-quantized from `W − L R`, then `L R` refit to the
new `W − Q`, `--residual-iters` times; an iterate is kept only if it lowers the output
error, so the stored error never rises (each matrix's record has the whole trace).

Forward: `y = Q x + L (R x)`. `L` and `R` are float factors (`trainable` labels them
"factor", so healing and a user's optax loop train them); `Q`, codes and scales, stays
frozen. With `--residual-quantize int8` L and R are stored int8 as well, R against the
input's Gram and L refit to R's rounded values (`QuantSettings.store_pair`, the same
pairing quantized plain factors use); their scales train, their codes do not. Exported to
Hugging Face as one dense weight.

The fit runs on the host in float64 numpy (an eigh and an SVD per matrix): nothing is
compiled per shape.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from flax import struct

from sigmascale_jax.compress.encode.quant import QuantSettings, dequantized, output_error
from sigmascale_jax.compress.plan import ENCODERS, Encoder, register
from sigmascale_jax.compress.settings import setting
from sigmascale_jax.errors import UserError
from sigmascale_jax.model.leaves import (
    FACTOR,
    FROZEN,
    as_array,
    as_matrix,
    bias_bytes,
    check_shapes,
    dense_export,
    frozen_labels,
    is_quantized,
    matrix_bytes,
    matrix_tree,
    register_dict_form,
    with_bias,
    with_bias_tree,
)


@struct.dataclass
class Residual:
    q: Any  # [out, in]: the quantized weight (a `QuantMatrix`)
    l: Any  # noqa: E741  [out, r]
    r: Any  # [r, in]
    bias: Any = None

    def apply(self, x: jax.Array) -> jax.Array:
        low = (x @ as_array(self.r, x.dtype).T) @ as_array(self.l, x.dtype).T
        return with_bias(x @ as_array(self.q, x.dtype).T + low, self.bias)

    def matrix(self) -> jax.Array:
        return as_array(self.q) + as_array(self.l) @ as_array(self.r)

    @property
    def rank(self) -> int:
        return int(self.l.shape[1])

    @property
    def num_params(self) -> int:
        (m, n), k = self.q.shape, self.rank
        return m * n + k * (m + n)

    @property
    def nbytes(self) -> int:
        return matrix_bytes(self.q) + matrix_bytes(self.l) + matrix_bytes(self.r) + bias_bytes(self.bias)

    def to_tree(self) -> dict[str, Any]:
        return with_bias_tree({"q": matrix_tree(self.q), "l": matrix_tree(self.l), "r": matrix_tree(self.r)},
                              self.bias)

    def check(self, shape: tuple[int, int], rank: int | None = None) -> None:
        (m, n), k = shape, self.rank
        check_shapes(f"a {m}x{n} matrix with a rank-{k} residual", {"q": self.q, "l": self.l, "r": self.r,
                                                                     "bias": self.bias},
                     {"q": (m, n), "l": (m, k), "r": (k, n), "bias": (m,)})

    def labels(self) -> "Residual":
        """L and R train (int8 ones: their scales); Q (codes, scales, zero points) and the bias do not."""
        factor = lambda m: m.labels() if is_quantized(m) else FACTOR  # noqa: E731
        return Residual(frozen_labels(self.q), factor(self.l), factor(self.r), None if self.bias is None else FROZEN)

    def export_tensors(self, prefix: str) -> tuple[dict[str, np.ndarray], dict]:
        return dense_export(self, prefix)


def _restored(p: dict) -> Residual:
    """A residual leaf from its saved dict, or from what an Orbax restore without a target gives."""
    l, r = (as_matrix(p[k]) if isinstance(p[k], (dict, jax.Array)) else np.asarray(p[k])  # noqa: E741
            for k in ("l", "r"))
    return Residual(as_matrix(p["q"]), l, r, p.get("bias"))


register_dict_form({"q", "l", "r"}, _restored)


def gram_root(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`(S, S⁻¹)`, the symmetric square root of `gram: [n, n]` and its inverse (float64), eigenvalues clamped at
    1e-8 of the largest: a calibration Gram is often singular (fewer tokens than inputs, dead channels), and a
    direction no input takes is one the fit need not match."""
    lam, vec = np.linalg.eigh(np.asarray(gram, np.float64))
    lam = np.maximum(lam, 1e-8 * max(lam[-1], np.finfo(np.float64).tiny))
    root = np.sqrt(lam)
    return (vec * root) @ vec.T, (vec / root) @ vec.T


def whitened_fit(e: np.ndarray, root: tuple[np.ndarray, np.ndarray], rank: int) -> tuple[np.ndarray, np.ndarray]:
    """`(L [m, r], R [r, n])` minimising `tr((E − L R) H (E − L R)ᵀ)` for `e: [m, n]`, `root = gram_root(H)`:
    the rank-r SVD of `E S`, unwhitened, with √σ on either side (factors of one scale, for training)."""
    s, s_inv = root
    u, sig, vt = np.linalg.svd(np.asarray(e, np.float64) @ s, full_matrices=False)
    half = np.sqrt(sig[:rank])
    return u[:, :rank] * half, (half[:, None] * vt[:rank]) @ s_inv


RESIDUAL_INITS = ("best", "quant-first", "lowrank-first")


def residual_fit(w: np.ndarray, gram: np.ndarray, rank: int, quantize, iters: int,
                 init: str = "best") -> tuple[Any, np.ndarray, np.ndarray, dict]:
    """`(Q, L, R, info)` for `w: [m, n]` under `gram: [n, n]`, then `iters` alternations (Q from `W − L R`, then L R
    the whitened rank-`rank` fit of `W − Q`), each kept only if it lowers the output error.

    Where it starts (`init`): "quant-first" (CALDERA): `Q = quantize(W, H)`, L R fit to `W − Q`; "lowrank-first"
    (SVDQuant's order): L R the whitened fit of W itself, `Q = quantize(W − L R)`, L R refit to `W − Q`: the
    leading directions, whose large values stretch a group's grid, never reach the quantizer; "best": both,
    alternating from the one with the lower error. `info`: `output_error` (relative, `quant.output_error`) of the
    result, `quant_error` (Q alone: `quantize(W, H)`, no residual), `residual_start` (the start used),
    `residual_start_errors` (each start's error), `residual_trace` (the used start's error, then each iterate's,
    kept or not) and `residual_iters_kept`."""
    w = np.asarray(w, np.float64)
    h = np.asarray(gram, np.float64)
    root = gram_root(h)

    def step(target: np.ndarray) -> tuple[Any, np.ndarray, np.ndarray, float]:
        """Q from `target` (W less the low-rank part so far), then L R refit to what Q leaves of W."""
        q = quantize(target, h)
        q_hat = dequantized(q)
        l, r = whitened_fit(w - q_hat, root, rank)  # noqa: E741
        return q, l, r, output_error(w, q_hat + l @ r, h)

    starts, quant_error = {}, None
    if init in ("best", "quant-first"):
        starts["quant-first"] = step(w)
        quant_error = output_error(w, dequantized(starts["quant-first"][0]), h)
    if init in ("best", "lowrank-first"):
        l, r = whitened_fit(w, root, rank)  # noqa: E741
        starts["lowrank-first"] = step(w - l @ r)
    if quant_error is None:
        quant_error = output_error(w, dequantized(quantize(w, h)), h)
    used = min(starts, key=lambda k: starts[k][3])
    *best, err = starts[used]
    trace, kept = [err], 0
    for _ in range(iters):
        *new, err = step(w - best[1] @ best[2])
        trace.append(err)
        if err >= min(trace[:-1]):
            break  # Q re-rounded from W − L R did not help: the alternation has settled
        best, kept = new, kept + 1
    info = {"output_error": min(trace), "quant_error": quant_error, "residual_start": used,
            "residual_start_errors": {k: v[3] for k, v in starts.items()}, "residual_trace": trace,
            "residual_iters_kept": kept, "residual_rank": rank}
    return (*best, info)


@dataclasses.dataclass(frozen=True)
class ResidualSettings(QuantSettings):
    residual_rank: int | None = setting(None, "residual encoding: rank r of the low-rank part L·R beside the "
                                        "quantized weight (capped at each matrix's smaller side)", min=1)
    residual_iters: int = setting(3, "residual encoding: CALDERA alternations (Q re-quantized from W − L·R, then L·R "
                                  "refit to W − Q), each kept only if it lowers the output error", min=0)
    residual_init: str = setting("best", "residual encoding: where the alternation starts: quant-first (CALDERA: Q "
                                 "from W, L·R fit to W − Q), lowrank-first (SVDQuant's order: L·R the whitened fit of "
                                 "W, Q from W − L·R, L·R refit) or best (both, keeping the lower output error)",
                                 choices=RESIDUAL_INITS)
    residual_quantize: str = setting("float", "residual encoding: how L and R are stored: float (as --store-dtype "
                                     "says) or int8 (R against the input's Gram, L refit to R's rounded values; "
                                     "a quarter of float32's bytes, so twice the rank of bfloat16 in the same bytes)",
                                     choices=("float", "int8"))

    def asdict(self) -> dict[str, Any]:
        out = {**super().asdict(), "residual_rank": self.residual_rank, "residual_iters": self.residual_iters,
               "residual_init": self.residual_init}
        if self.residual_quantize != "float":  # float runs keep the resume keys they had before the setting existed
            out["residual_quantize"] = self.residual_quantize
        return out

    def record(self) -> dict[str, Any]:
        return {**super().record(), "residual_rank": self.residual_rank, "residual_init": self.residual_init,
                "residual_quantize": self.residual_quantize}

    def factor_settings(self) -> QuantSettings:
        """How L and R are stored under `--residual-quantize int8`: int8 on Q's quantizer and group size."""
        gptq = dict(gptq_damp=self.gptq_damp, act_order=self.act_order, gptq_order="best") if self.needs_gram else {}
        return QuantSettings(quantize="int8", quantizer=self.quantizer, group_size=self.group_size, **gptq)


def residual_params(m: int, n: int, k) -> int:
    """Numbers a residual matrix stands for: the `m·n` of Q (its bytes are what shrinks) and `k(m + n)` of L, R."""
    return m * n + (0 if k is None else k * (m + n))


def _check(settings: ResidualSettings, spec, cfg) -> None:
    if not settings.kind:
        raise UserError("--encoding residual keeps each matrix quantized beside its low-rank part: give --quantize "
                        "int8, int4, int3 or int2")
    if settings.residual_rank is None:
        raise UserError("--encoding residual needs --residual-rank R (the rank of L·R, e.g. 32)")
    if spec.ratio != 0:
        raise UserError(f"--encoding residual stores every dense matrix as Q + L·R; it replaces the factorization: "
                        f"use --ratio 0 (got --ratio {spec.ratio})")
    settings.check_model(cfg)


def _encode_gram(settings: ResidualSettings):
    def encode_gram(p: dict, record: dict, gram, precision: str = "float64") -> tuple[Residual, dict]:
        if "w" not in p:
            raise ValueError("the residual encoding stores dense matrices ({'w'}); run it at --ratio 0")
        w = np.asarray(p["w"], np.float64)
        rank = min(settings.residual_rank, *w.shape)
        q, l, r, info = residual_fit(w, gram, rank, lambda x, h: settings.store(x, h, precision),  # noqa: E741
                                     settings.residual_iters, settings.residual_init)
        if settings.residual_quantize == "int8":
            (l, r), _ = settings.factor_settings().store_pair(l, r, gram, precision, order="best")  # noqa: E741
            h = np.asarray(gram, np.float64)
            info["output_error_float_factors"] = info["output_error"]
            info["output_error"] = output_error(w, dequantized(q) + dequantized(l) @ dequantized(r), h)
            return Residual(q, l, r, p.get("bias")), info
        return Residual(q, np.asarray(l, np.float32), np.asarray(r, np.float32), p.get("bias")), info

    return encode_gram


def _read(settings: ResidualSettings):
    def factor(m: Any) -> Any:  # an int8 factor's codes are as wide as its columns
        return settings.factor_settings().load(m, np.shape(m["values"])[1]) if isinstance(m, dict) else np.asarray(m)

    def read(tree: dict, record: dict) -> Residual:
        q = tree["q"]
        q = settings.load(q, record["shape"][1]) if isinstance(q, dict) else q
        return Residual(q, factor(tree["l"]), factor(tree["r"]), tree.get("bias"))

    return read


def _encode(p: dict, record: dict):
    raise ValueError("the residual encoding fits L·R under the input's Gram: it encodes with encode_gram")


def _reencode(leaf: Any, src: str):
    raise UserError("--encoding residual fits L·R under the calibration Gram matrices, which a finished folder does "
                    "not keep; compress with --ratio 0 --encoding residual instead of re-encoding")


@register(ENCODERS, "residual", ResidualSettings,
          "W ≈ Q + L·R: the quantized weight beside a whitened rank-R fit of what quantizing lost (CALDERA); "
          "with --ratio 0, --quantize and --residual-rank")
def residual(**settings) -> Encoder:
    s = ResidualSettings(**settings)
    return Encoder("residual", s, residual_params, _encode, lambda: {"encoding": "residual", **s.record()},
                   check=lambda spec, cfg: _check(s, spec, cfg), read=_read(s), reencode=_reencode,
                   encode_gram=_encode_gram(s))
