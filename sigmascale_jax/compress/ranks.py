"""Rank and compression-ratio conventions (METHODS.md, SVD-LLM's convention).

Ratio = fraction of the compressible projections' parameters removed. Uniform
allocation gives each matrix `k = floor((1 − ratio) · m · n / (m + n))` from its
own shape, so grouped-query k/v projections get their own (smaller) ranks.
"""

from __future__ import annotations

import math

from sigmascale_jax.errors import ArgError, UserError


def uniform_rank(m: int, n: int, ratio: float) -> int:
    """Rank of an `m × n` matrix that keeps `1 − ratio` of its parameters."""
    if not 0.0 < ratio < 1.0:
        raise ArgError("ratio", f"must lie strictly between 0 and 1, got {ratio}")
    k = math.floor((1.0 - ratio) * m * n / (m + n))
    if k < 1:
        raise UserError(f"--ratio {ratio} leaves rank 0 for a {m}x{n} matrix; use a smaller ratio")
    return k


def factored_params(m: int, n: int, k: int) -> int:
    return k * (m + n)


def break_even_rank(m: int, n: int) -> int:
    """Largest rank at which factors are strictly smaller than the dense matrix."""
    return (m * n - 1) // (m + n)


def stored_params(m: int, n: int, k: int | None) -> int:
    """Numbers stored for an `m × n` matrix: `k(m+n)` as factors, `m·n` when kept dense (`k` None)."""
    return m * n if k is None else factored_params(m, n, k)


def achieved_ratio(shapes_ranks: list[tuple[int, int, int | None]]) -> float:
    """Fraction of parameters removed over `(m, n, k)` triples (`k` None: kept dense)."""
    dense = sum(m * n for m, n, _ in shapes_ranks)
    kept = sum(stored_params(m, n, k) for m, n, k in shapes_ranks)
    return 1.0 - kept / dense


def block_ranks(cfg, ratio: float) -> dict[str, int]:
    """Uniform rank of each projection of a block (`cfg: ModelConfig`), from its own shape."""
    return {name: uniform_rank(m, n, ratio) for name, (m, n) in cfg.projection_shapes().items()}
