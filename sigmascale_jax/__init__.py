"""sigmascale_jax: activation-aware truncated-SVD compression of decoder LLMs in JAX/Flax.

`sigmascale_jax.compress(model=..., method=..., ratio=..., out=...)` runs the whole
pipeline; `python -m sigmascale_jax.compress` and `python -m sigmascale_jax.eval`
are the command lines.
"""

import os as _os

__version__ = "0.1.0"

# XLA:CPU's concurrency-optimized scheduler deadlocks (all threads asleep, no error)
# when one computation holds several independent LAPACK calls, as a vmapped SVD
# with whitening or its gradient does (seen with jax/jaxlib 0.10.2 on 2 cores).
# The flag only matters on CPU and must be set before JAX starts its backend;
# a user's own XLA_FLAGS setting of it wins.
_XLA_CPU_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"
if _XLA_CPU_FLAG not in _os.environ.get("XLA_FLAGS", ""):
    _os.environ["XLA_FLAGS"] = f"{_os.environ.get('XLA_FLAGS', '')} {_XLA_CPU_FLAG}=false".strip()

# jaxlib's CPU LAPACK kernels run inside OpenBLAS (scipy's copy), whose worker threads
# spin while they wait. XLA already runs independent LAPACK calls side by side on
# its own threads, so OpenBLAS threads on top oversubscribe the cores: one SigmaScale
# block-loss step (value and gradient, 4 windows, a SmolLM2 block) took 0.90 s with
# OpenBLAS's default threads and 0.55 s with one, on 2 idle cores (with other jobs on
# the cores, the scaled reconstruction alone ran 4.6x slower). One thread each, unless
# the user chose otherwise; it must be set before OpenBLAS loads.
_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def __getattr__(name: str):
    # Imported lazily so that `python -m sigmascale_jax.compress` does not find the
    # module already imported (runpy warns then) and `import sigmascale_jax` stays cheap.
    if name == "compress":
        import importlib

        return importlib.import_module(".compress", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
