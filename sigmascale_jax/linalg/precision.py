"""The precision factorizations run in (Cholesky whitening, eigh, solves, the SVDs of whitened matrices).

float64 is exact enough for every method as METHODS.md states them, and is what CPUs and
datacenter GPUs run at a useful speed; TPUs have no fast float64 and consumer GPUs little,
so there the factorizations run in float32 with the safeguards written where they are
used (`whitening`'s diagonal scaling and dtype-sized shifts, SVD-LLM's full SVD instead of
squaring, `refit_left`'s ridge). Learning (SigmaScale's scales, healing, FermiGrad's
temperatures) runs in float32 either way.

    with factor_precision("float32") as dtype:
        s, route = whitening(jnp.asarray(gram, dtype))
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import jax
import jax.numpy as jnp

PRECISIONS = ("float64", "float32")


def default_precision(backend: str | None = None) -> str:
    """float32 on TPU (no fast float64 there), float64 elsewhere; `backend` defaults to JAX's default backend."""
    return "float32" if (backend or jax.default_backend()) == "tpu" else "float64"


def resolve_precision(precision: str | None) -> str:
    """`precision`, or the backend's default when None; a ValueError for anything else."""
    if precision is None:
        return default_precision()
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


@contextlib.contextmanager
def factor_precision(precision: str) -> Iterator[jnp.dtype]:
    """Run a factorization in `precision`; yields its dtype.

    float64 turns 64-bit arrays on for the block only (`jax.enable_x64`); float32 leaves
    JAX's configuration alone, so nothing in it makes a float64 array.
    """
    if resolve_precision(precision) == "float64":
        with jax.enable_x64(True):
            yield jnp.dtype(jnp.float64)
    else:
        yield jnp.dtype(jnp.float32)


def precision_key(precision: str | None) -> dict:
    """What a resume or cache key holds of the precision: nothing for float64, so that runs and caches made before
    the choice existed (all float64) still match; `{"precision": "float32"}` otherwise."""
    resolved = resolve_precision(precision)
    return {} if resolved == "float64" else {"precision": resolved}
