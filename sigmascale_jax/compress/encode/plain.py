"""Plain factors: `B` and `C` as they are (k(m + n) numbers), optionally quantized (`leaves.LowRank`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from sigmascale_jax.compress.encode.quant import QuantSettings
from sigmascale_jax.compress.plan import ENCODERS, Encoder, register
from sigmascale_jax.compress.ranks import factored_params
from sigmascale_jax.errors import UserError
from sigmascale_jax.model.leaves import Dense, LowRank, is_quantized


@dataclasses.dataclass(frozen=True)
class PlainSettings(QuantSettings):
    pass


def dense_leaf(p: dict, settings: QuantSettings) -> Dense:
    """A projection kept dense (`{"w"}`), its matrix stored as `settings` say."""
    return Dense(settings.store(p["w"]), p.get("bias"))


def dense_leaf_gptq(p: dict, settings: QuantSettings, gram, precision: str = "float64") -> tuple[Dense, dict]:
    """A projection kept dense, its matrix quantized by GPTQ against `gram` (its input's); and its output error."""
    from sigmascale_jax.compress.encode.quant import dequantized, output_error

    w = settings.store(p["w"], gram, precision)
    return Dense(w, p.get("bias")), {"output_error": output_error(np.asarray(p["w"], np.float64), dequantized(w),
                                                                   np.asarray(gram, np.float64))}


def refuse_quantized(matrices, src: str) -> None:
    """Re-encoding needs float matrices: a quantized one's float values are gone."""
    if any(is_quantized(m) for m in matrices):
        raise UserError(f"{src} holds quantized matrices; re-encode from an unquantized compression")


def float_form(leaf: Dense | LowRank, src: str) -> dict:
    """A stored leaf back in the pipeline's dict form, for re-encoding."""
    out = {"w": leaf.w} if isinstance(leaf, Dense) else {"b": leaf.b, "c": leaf.c}
    refuse_quantized(out.values(), src)
    return out if leaf.bias is None else {**out, "bias": leaf.bias}


def make_encoder(name: str, settings: QuantSettings, count, factored, read_factored, reencode_own=None) -> Encoder:
    """An encoder that stores low-rank pairs with `factored(b, c, settings, bias)` and dense matrices as they are,
    quantized as `settings` say. With GPTQ, `factored(b, c, settings, bias, gram, precision)` returns `(leaf, info)`
    and the encoder's `encode_gram(p, record, gram, precision)` gives it (`gram`: the projection's input Gram).

    `read_factored(tree, record, settings)` reads its saved form back; `reencode_own(leaf, settings, src)` re-stores
    a leaf of its own type (None: this encoder has no type of its own, and another encoder's leaf is refused)."""

    def encode(p: dict, record: dict):
        if settings.needs_gram:
            raise ValueError(f"{name} with --quantizer gptq encodes a projection from its input's Gram (encode_gram)")
        if "w" in p:
            return dense_leaf(p, settings)
        return factored(p["b"], p["c"], settings, p.get("bias"))

    def encode_gram(p: dict, record: dict, gram, precision: str = "float64"):
        if "w" in p:
            return dense_leaf_gptq(p, settings, gram, precision)
        return factored(p["b"], p["c"], settings, p.get("bias"), gram, precision)

    def read(tree: dict, record: dict):
        if record.get("dense"):
            return Dense(settings.load(tree["w"], record["shape"][1]), tree.get("bias"))
        return read_factored(tree, record, settings)

    def reencode(leaf: Any, src: str):
        if settings.needs_gram:
            raise UserError("--quantizer gptq rounds against the calibration Gram matrices, which a finished folder "
                            "does not keep; compress with --quantizer gptq instead of re-encoding")
        if isinstance(leaf, (Dense, LowRank)):
            return encode(float_form(leaf, src), {})
        if reencode_own is None:
            raise UserError(f"{src} stores its factors as {type(leaf).__name__}; it can be quantized in its own "
                            f"encoding, not turned {name}")
        return reencode_own(leaf, settings, src)

    def record() -> dict:
        return {"encoding": name, **settings.record()}

    return Encoder(name, settings, count, encode, record, check=lambda spec, cfg: settings.check_model(cfg), read=read,
                   reencode=reencode, encode_gram=encode_gram if settings.needs_gram else None)


def _plain(b, c, settings: QuantSettings, bias, gram=None, precision: str = "float64"):
    if settings.needs_gram:
        (b, c), info = settings.store_pair(b, c, gram, precision)
        return LowRank(b, c, bias), info
    return LowRank(settings.store(b), settings.store(c), bias)


def _read_plain(tree: dict, record: dict, settings: QuantSettings) -> LowRank:
    return LowRank(settings.load(tree["b"], record["rank"]), settings.load(tree["c"], record["shape"][1]),
                   tree.get("bias"))


@register(ENCODERS, "plain", PlainSettings, "the factors B, C as they are: k(m+n) numbers")
def plain(**settings) -> Encoder:
    return make_encoder("plain", PlainSettings(**settings), factored_params, _plain, _read_plain)
