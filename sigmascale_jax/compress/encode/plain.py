"""Plain factors: `B` and `C` as they are (k(m + n) numbers), optionally quantized."""

from __future__ import annotations

import dataclasses

import numpy as np

from sigmascale_jax.compress.encode._quant import QuantSettings
from sigmascale_jax.compress.plan import ENCODERS, Encoder, register
from sigmascale_jax.linear import encode_dense, encode_factors
from sigmascale_jax.ranks import factored_params


@dataclasses.dataclass(frozen=True)
class PlainSettings(QuantSettings):
    pass


def encoder(name: str, settings: QuantSettings, count) -> Encoder:
    """An encoder storing low-rank pairs as `name` (`linear.encode_factors`), dense matrices as they are."""

    def encode(p: dict, record: dict):
        if "w" in p:
            return encode_dense(np.asarray(p["w"]), settings.kind, settings.group_size, p.get("bias"))
        return encode_factors(np.asarray(p["b"]), np.asarray(p["c"]), name, settings.kind, settings.group_size,
                              p.get("bias"))

    def record() -> dict:
        return {"encoding": name, "quantize": settings.kind, "group_size": settings.group_size}

    return Encoder(name, settings, count, encode, record)


@register(ENCODERS, "plain", PlainSettings, "the factors B, C as they are: k(m+n) numbers")
def plain(quantize: str = "none", group_size: int | None = None) -> Encoder:
    return encoder("plain", PlainSettings(quantize=quantize, group_size=group_size), factored_params)
