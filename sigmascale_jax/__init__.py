"""sigmascale_jax: activation-aware truncated-SVD compression of decoder LLMs in JAX/Flax.

`sigmascale_jax.compress(model=..., method=..., ratio=..., out=...)` runs the whole
pipeline; `python -m sigmascale_jax.compress` and `python -m sigmascale_jax.eval`
are the command lines.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Imported lazily so that `python -m sigmascale_jax.compress` does not find the
    # module already imported (runpy warns then) and `import sigmascale_jax` stays cheap.
    if name == "compress":
        import importlib

        return importlib.import_module(".compress", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
