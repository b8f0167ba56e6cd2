"""Compress a model: where to cut (rank allocation), how to cut (factorization), then an optional refinement.

    python -m sigmascale_jax.compress --model ../shared/models/smollm2-135m-instruct-q4_1 \\
        --method svd-llm --ratio 0.2 --out runs/smollm2-svdllm-0.2 [--ranks zs-svd] [--correction]

The package is also callable: ``sigmascale_jax.compress(model, method, ratio, out, ...)``.
In memory: `sigmascale_jax.compress_params(params, cfg, windows, plan, ratio)` (`pipeline.py`).
Layout: `plan.py` (the stage types, registries, `make_plan`), `settings.py` (checked
settings dataclasses), `pipeline.py` (the block loop, in memory and into a folder),
`allocate/`, `factorize/`, `refine/` and `encode/` (one module per method), `grads.py`
(block-wise model gradients), `report.py` (compression.json), `cli.py` (flags and YAML configs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sigmascale_jax.compress.plan import (  # noqa: F401  (the public face of the package)
    Budget,
    Factorizer,
    ModelContext,
    Plan,
    RankAllocator,
    Refiner,
    RunSpec,
    make_plan,
)
from sigmascale_jax.errors import make_callable


def compress(
    model: str,
    method: Any,
    ratio: float,
    out: str | Path,
    *,
    ranks: Any = "uniform",
    correction: bool = False,
    encoding: Any = "plain",
    calib: str = "c4",
    nsamples: int = 64,
    seq_len: int = 512,
    seed: int = 0,
    sequential: bool = True,
    batch_size: int = 8,
    mesh: str | None = None,
    precision: str | None = None,
    data_dir: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **settings: Any,
) -> dict[str, Any]:
    """Compress `model` with `method` at `ratio` into the folder `out`; returns the report (compression.json).

    `method`: "svd", "asvd", "svd-llm", "sigmascale" (or a `Factorizer`); `ranks`: "uniform",
    "zs-svd", "fermigrad", "sensitivity", "from-run" (with `ranks_from=RUN`; or a `RankAllocator`);
    `correction`: ZS-SVD's correction after the block loop; `encoding`: "plain" or "pivga" (or an `Encoder`).
    `precision`: "float64" or "float32", what the factorizations run in (default: float32 on TPU, else float64).
    `settings`: the methods' own settings by field name (`update=True`, `alpha=0.5`,
    `steps=50`, `grad_samples=8`, ...); see `python -m sigmascale_jax.compress --help`.
    """
    from sigmascale_jax.compress.pipeline import run

    plan = make_plan(method, ranks, ("correction",) if correction else (), encoding, **settings)
    spec = RunSpec(model=model, ratio=ratio, calib=calib, nsamples=nsamples, seq_len=seq_len, seed=seed,
                   sequential=sequential, batch_size=batch_size, mesh=mesh, precision=precision)
    return run(spec, plan, out, data_dir=data_dir, overwrite=overwrite, progress=progress)


def parse_args(argv: list[str] | None = None):
    from sigmascale_jax.compress.cli import parse_args as _parse

    return _parse(argv)


make_callable(__name__, compress)  # `sigmascale_jax.compress(...)` calls the function above
