"""PivGa (arXiv 2512.03062): the same matrix as B·C in k(m + n) − k² numbers (`linear.PivGa`)."""

from __future__ import annotations

import dataclasses

from sigmascale_jax.compress.encode._quant import QuantSettings
from sigmascale_jax.compress.encode.plain import encoder
from sigmascale_jax.compress.plan import ENCODERS, Encoder, register


@dataclasses.dataclass(frozen=True)
class PivGaSettings(QuantSettings):
    pass


def pivga_params(m: int, n: int, k):
    """Numbers PivGa stores for an `m × n` matrix at rank k: `k(m + n) − k²` (never more than `m·n`)."""
    return k * (m + n) - k * k


@register(ENCODERS, "pivga", PivGaSettings,
          "PivGa: B' = B C_P and R = C_P⁻¹ C_R with pivot columns P, lossless, k(m+n) − k² numbers")
def pivga(quantize: str = "none", group_size: int | None = None) -> Encoder:
    return encoder("pivga", PivGaSettings(quantize=quantize, group_size=group_size), pivga_params)
