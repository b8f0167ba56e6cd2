"""sigmascale_jax: activation-aware truncated-SVD compression of decoder LLMs in JAX/Flax.

The library, on in-memory pytrees (the command lines `python -m sigmascale_jax.{compress,eval,
generate,export}` run the same code)::

    import jax, optax, sigmascale_jax as ssj
    cfg, params, source = ssj.load_model("../shared/models/stories260k")
    windows = ssj.calibration_windows(source, "c4", nsamples=16, seq_len=128)      # int32 [16, 128]
    plan = ssj.make_plan("svd-llm", ranks="uniform", encoding="pivga")
    cparams, report = ssj.compress_params(params, cfg, windows, plan, 0.3)       # typed leaves, in memory
    logits = jax.jit(ssj.forward, static_argnums=2)(cparams, windows[:2], cfg)  # [2, 128, vocab]
    tx = optax.multi_transform({"factor": optax.adamw(1e-4), "frozen": optax.set_to_zero()},
                               ssj.trainable(cparams))
    ssj.save_compressed(cparams, cfg, report, "runs/mine", source=source)

Each method's core is a pure function of arrays that jits: `svd_factors(w, k)`, `asvd_factors(w, absmean, k)`,
`svd_llm_factors(w, gram, k)`, `sigmascale_factors(w, gram, k)` (one matrix), `learn_block_scales(...)`
(a block with the user's own activations).
"""

import importlib as _importlib
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

# public name -> the module that defines it (imported on first use, so `import sigmascale_jax` stays cheap and
# `python -m sigmascale_jax.compress` does not find its module already imported)
_API = {
    # models and data
    "load_model": "sigmascale_jax.io.sources",
    "ModelConfig": "sigmascale_jax.model.config",
    "calibration_windows": "sigmascale_jax.compress.calibration",
    # compression: plan, run in memory, save
    "make_plan": "sigmascale_jax.compress.plan",
    "Plan": "sigmascale_jax.compress.plan",
    "compress_params": "sigmascale_jax.compress.pipeline",
    "save_compressed": "sigmascale_jax.compress.pipeline",
    # the decoder
    "forward": "sigmascale_jax.model.modeling",
    "Decoder": "sigmascale_jax.model.modeling",
    "Factor": "sigmascale_jax.model.modeling",
    "trainable": "sigmascale_jax.model.modeling",
    "typed_params": "sigmascale_jax.model.modeling",
    "cast_params": "sigmascale_jax.model.modeling",
    "distill_step": "sigmascale_jax.compress.refine.heal",
    "distill_loss": "sigmascale_jax.compress.refine.heal",
    "heal_optimizer": "sigmascale_jax.compress.refine.heal",
    "perplexity": "sigmascale_jax.eval.perplexity",
    "generate_tokens": "sigmascale_jax.deploy.generate",
    "export_params": "sigmascale_jax.deploy.export",
    # each method's core on a user's own arrays
    "svd_factors": "sigmascale_jax.compress.factorize.svd",
    "asvd_factors": "sigmascale_jax.compress.factorize.asvd",
    "svd_llm_factors": "sigmascale_jax.compress.factorize.svd_llm",
    "sigmascale_factors": "sigmascale_jax.compress.factorize.sigmascale.block",
    "learn_block_scales": "sigmascale_jax.compress.factorize.sigmascale.block",
    "relative_activation_loss": "sigmascale_jax.linalg.lowrank",
    "quantize": "sigmascale_jax.compress.encode.quant",  # round to nearest: a QuantMatrix
    "quantize_gptq": "sigmascale_jax.compress.encode.quant",  # GPTQ against an input Gram: a QuantMatrix
    "gptq": "sigmascale_jax.linalg.gptq",  # GPTQ's codes, scales and zero points on a qwix-backed Grid
    "Grid": "sigmascale_jax.linalg.grid",
    "UserError": "sigmascale_jax.errors",
}
_ALIASES = {"generate_tokens": "generate", "export_params": "export_params"}
_MODULES = ("compress", "eval", "generate", "export")  # the command lines; compress/generate/export are callable

__all__ = sorted([*_API, *_MODULES])


def __getattr__(name: str):
    if name in _API:
        module = _importlib.import_module(_API[name])
        value = getattr(module, _ALIASES.get(name, name))
        globals()[name] = value
        return value
    if name in _MODULES:
        return _importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
