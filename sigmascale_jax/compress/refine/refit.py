"""Refit: each block's factors trained, inside the block loop, to give the dense block's outputs.

A factorizer chooses each matrix's factors from statistics of its own inputs (SVD-LLM's
whitening, SigmaScale's two scale vectors); nothing fits the factors themselves to what the
block computes, and the error each block leaves compounds down the depth. After block i is
factored (and before it is encoded or feeds block i+1), Adam trains its float factors B and C
(and, with `refit_norms`, its RMSNorm weights) to minimize

    ‖f̂ᵢ(x̂) − fᵢ(x)‖² / ‖fᵢ(x)‖²

on the calibration windows: f̂ᵢ the factored block on the compressed model's inputs x̂,
fᵢ the dense block on the dense model's inputs x (the anchor: the refit also corrects
what the blocks before left; AA-SVD, the block-distillation chains). Without
`--sequential`, x̂ = x. The last `refit_holdout` of the windows are held out: measured every
`refit_eval_every` steps, the best step is kept (step 0 included, so a block never leaves
worse than it came on them), and the loop stops after `refit_patience` measurements
without improvement.

Ranks are data here too: each projection's factors are padded with zero columns of B and
rows of C to the widest rank the allocation gives that projection in any block (exact, and
their gradients are zero, so Adam never moves them), so every block of one pattern of
dense projections runs the same compiled program.

    loss = block_error(train, frozen, x̂, y, cfg)                   # pure, jits, grads
    train, frozen = refit_partition(block, norms=False)             # float factors | the rest
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sigmascale_jax.compress.plan import REFINERS, BlockInputs, BlockResult, Params, Refiner, RunSpec, register
from sigmascale_jax.compress.settings import Settings, setting
from sigmascale_jax.errors import UserError
from sigmascale_jax.model.config import ModelConfig
from sigmascale_jax.model.modeling import PROJECTIONS, block_forward, rope_cos_sin

BLOCK_NORMS = ("attn_norm", "mlp_norm", "q_norm", "k_norm")


@dataclasses.dataclass(frozen=True)
class RefitSettings(Settings):
    switch = "refit_steps"
    refit_steps: int = setting(0, "refit: Adam steps per block fitting its factors to the dense block's outputs on the "
                               "dense model's inputs, inside the block loop (0: off)", min=0)
    refit_lr: float = setting(1e-4, "refit: peak learning rate of the factors (cosine decay over --refit-steps)",
                              above=0.0, max=1.0)
    refit_windows: int = setting(4, "refit: calibration windows per step", min=1)
    refit_holdout: float = setting(0.125, "refit: fraction of the calibration windows held out to pick the step "
                                   "(at least one)", above=0.0, below=1.0)
    refit_eval_every: int = setting(10, "refit: steps between held-out measurements", min=1)
    refit_patience: int = setting(2, "refit: stop a block after this many measurements without improvement", min=1)
    refit_norms: bool = setting(False, "refit: also train the block's RMSNorm weights")
    refit_backoff: float = setting(0.25, "refit: a block that no held-out measurement improved is refitted once more "
                                   "at this fraction of --refit-lr (0: never)", min=0.0, below=1.0)


def held_out(n_windows: int, settings: RefitSettings) -> int:
    """How many of `n_windows` calibration windows the refit holds out (SigmaScale's rule, `holdout_windows`); a
    UserError if none would be left to train on."""
    from sigmascale_jax.compress.factorize.sigmascale.block import holdout_windows

    n_hold = holdout_windows(n_windows, settings.refit_holdout)
    if n_hold >= n_windows:
        raise UserError(f"--refit-holdout {settings.refit_holdout} holds out all {n_windows} calibration windows; "
                        "use more --nsamples or a smaller --refit-holdout")
    return n_hold


# ------------------------------------------------------------------ the pure core


def refit_partition(block: Params, norms: bool = False) -> tuple[Params, Params]:
    """`(train, frozen)`: the float factors `{projection: {"b", "c"}}` of `block`'s factored projections (and its
    RMSNorm weights when `norms`), and everything else (dense projections, biases, norms otherwise)."""
    train: Params = {}
    frozen: Params = {}
    for name, value in block.items():
        if name in PROJECTIONS and isinstance(value, dict) and "b" in value:
            train[name] = {"b": value["b"], "c": value["c"]}
            rest = {k: v for k, v in value.items() if k not in ("b", "c")}
            if rest:
                frozen[name] = rest
        elif norms and name in BLOCK_NORMS:
            train[name] = value
        else:
            frozen[name] = value
    return train, frozen


def merge(train: Params, frozen: Params) -> Params:
    """The block of a `refit_partition`."""
    block = dict(frozen)
    for name, value in train.items():
        block[name] = {**frozen.get(name, {}), **value} if isinstance(value, dict) else value
    return block


def block_error(train: Params, frozen: Params, x: jax.Array, y: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Relative squared error `‖f̂(x) − y‖² / ‖y‖²` of the block `merge(train, frozen)` on inputs `x: [B, T, D]`
    against outputs `y: [B, T, D]` (the dense block's, on the dense model's inputs)."""
    cos, sin = rope_cos_sin(cfg, jnp.arange(x.shape[1]))
    out = block_forward(merge(train, frozen), x, cfg, cos, sin)
    return jnp.sum((out - y) ** 2) / jnp.sum(y**2)


def pad_factors(train: Params, widths: dict[str, int]) -> Params:
    """Each projection's `b: [m, k]`, `c: [k, n]` padded with zeros to width `widths[projection]` (host arrays)."""
    out = dict(train)
    for name, p in train.items():
        if isinstance(p, dict):
            pad = widths[name] - p["b"].shape[1]
            out[name] = {"b": np.pad(np.asarray(p["b"]), ((0, 0), (0, pad))),
                         "c": np.pad(np.asarray(p["c"]), ((0, pad), (0, 0)))}
    return out


@functools.partial(jax.jit, static_argnames=("cfg", "settings"))
def refit_block(train: Params, frozen: Params, data: tuple, hold: tuple, key: jax.Array, lr: jax.Array | None = None,
                *, cfg: ModelConfig, settings: RefitSettings) -> tuple[Params, dict[str, jax.Array]]:
    """Adam on `train` (a `refit_partition`'s trainable half) minimizing `block_error`; one compiled scan.

    `data = (x̂, y)`: training windows `[N, T, D]`, `settings.refit_windows` of them per step (drawn without
    replacement with `fold_in(key, step)`); `hold = (x̂, y)`: held-out windows, measured at step 0, every
    `refit_eval_every` steps and at the end. Returns the best measured `train` and a trace
    `{"train": [steps], "hold": [steps + 1] (NaN where not measured or stopped), "best_step", "steps_run"}`;
    after `refit_patience` measurements without a new best the remaining steps are skipped (`lax.cond`). `lr`: the
    peak learning rate as data (one program for every rate), else `settings.refit_lr`.
    """
    steps, every = settings.refit_steps, settings.refit_eval_every
    n_train = data[0].shape[0]
    take = min(settings.refit_windows, n_train)

    def train_loss(params, k):
        idx = jax.random.choice(k, n_train, (take,), replace=False) if take < n_train else jnp.arange(n_train)
        return block_error(params, frozen, data[0][idx], data[1][idx], cfg)

    def hold_loss(params):
        return block_error(params, frozen, hold[0], hold[1], cfg)

    opt = optax.adam(optax.cosine_decay_schedule(settings.refit_lr if lr is None else lr, max(steps, 1)))
    hold0 = hold_loss(train)
    nan = jnp.asarray(jnp.nan, hold0.dtype)

    def learn(carry, i):
        params, opt_state, best, best_loss, best_step, stale, _ = carry
        loss, grads = jax.value_and_grad(train_loss)(params, jax.random.fold_in(key, i))
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        measure = ((i + 1) % every == 0) | (i + 1 == steps)
        h = jax.lax.cond(measure, hold_loss, lambda _: nan, params)
        better = jnp.isfinite(h) & (h < best_loss)
        best = jax.tree.map(lambda new, old: jnp.where(better, new, old), params, best)
        stale = jnp.where(better, 0, stale + measure.astype(stale.dtype))
        carry = (params, opt_state, best, jnp.where(better, h, best_loss), jnp.where(better, i + 1, best_step),
                 stale, stale >= settings.refit_patience)
        return carry, (loss, h)

    def step(carry, i):
        return jax.lax.cond(carry[-1], lambda c, i: (c, (nan, nan)), learn, carry, i)

    zero = jnp.asarray(0)
    carry = (train, opt.init(train), train, hold0, zero, zero, jnp.asarray(False))
    (_, _, best, _, best_step, _, _), (train_trace, hold_trace) = jax.lax.scan(step, carry, jnp.arange(steps))
    steps_run = jnp.sum(jnp.isfinite(train_trace))
    return best, {"train": train_trace, "hold": jnp.concatenate([hold0[None], hold_trace]), "best_step": best_step,
                  "steps_run": steps_run}


# ------------------------------------------------------------------ the stage


def refit_result(inputs: BlockInputs, result: BlockResult, key: jax.Array, widths: dict[str, int],
                 settings: RefitSettings) -> BlockResult:
    """`result` with its block's float factors refitted against `inputs.anchor` (the dense block's outputs on the
    dense model's inputs) from `inputs.xs` (this block's inputs in the compressed model); the block's record gains
    `"refit"`: held-out error before and after, steps run, best step, the held-out trace and seconds."""
    from sigmascale_jax.parallel import fetch, on_device, shard

    t0 = time.perf_counter()
    params = jax.device_get(result.params)
    train, frozen = refit_partition(params, settings.refit_norms)
    factored = [n for n in PROJECTIONS if n in train]
    if not factored:  # every projection kept dense: nothing to fit
        return result
    ranks = {n: train[n]["b"].shape[1] for n in factored}
    xs, ys = np.asarray(inputs.xs, np.float32), np.asarray(inputs.anchor, np.float32)
    n_hold = held_out(len(xs), settings)
    mesh = inputs.mesh
    padded = on_device(pad_factors(train, widths), mesh)
    frozen_d = on_device(frozen, mesh)
    data = (shard(xs[:-n_hold], mesh), shard(ys[:-n_hold], mesh))
    hold = (shard(xs[-n_hold:], mesh), shard(ys[-n_hold:], mesh))
    key_d, attempts, lr = on_device(key, mesh), [], settings.refit_lr
    while True:
        lr_d = on_device(np.float32(lr), mesh)
        with jax.transfer_guard("disallow"):  # one compiled scan over data already on the device
            best, trace = refit_block(padded, frozen_d, data, hold, key_d, lr_d, cfg=inputs.cfg, settings=settings)
            best, trace = fetch((best, trace))
        attempts.append({"lr": lr, "best_step": int(trace["best_step"]), "steps_run": int(trace["steps_run"])})
        # no measurement beat step 0: the learning rate overshoots this block (SmolLM2's block 11, whose outputs
        # carry the model's largest activations, at 3e-4): once more, slower (the same program: the rate is data)
        if int(trace["best_step"]) > 0 or len(attempts) > 1 or settings.refit_backoff <= 0:
            break
        lr = settings.refit_lr * settings.refit_backoff
    new = dict(params)
    for name, value in best.items():
        if name in ranks:
            k = ranks[name]
            b, c = np.asarray(value["b"])[:, :k], np.asarray(value["c"])[:k]
            if not (np.isfinite(b).all() and np.isfinite(c).all()):
                raise FloatingPointError(f"non-finite refitted factors for projection {name} (rank {k})")
            dtype = np.dtype(params[name]["b"].dtype)
            new[name] = {**params[name], "b": np.ascontiguousarray(b, dtype), "c": np.ascontiguousarray(c, dtype)}
        else:
            new[name] = np.asarray(value, np.dtype(params[name].dtype))
    hold_trace = np.asarray(trace["hold"])
    measured = np.flatnonzero(np.isfinite(hold_trace))
    best_step = int(trace["best_step"])
    record = {"steps": settings.refit_steps, "steps_run": sum(a["steps_run"] for a in attempts), "best_step": best_step,
              "lr": lr, "attempts": attempts,
              "holdout_before": float(hold_trace[0]), "holdout_after": float(hold_trace[best_step]),
              "holdout_trace": [[int(i), float(hold_trace[i])] for i in measured],
              "norms": settings.refit_norms, "seconds": round(time.perf_counter() - t0, 3)}
    return result._replace(params=new, block={**(result.block or {}), "refit": record})


def refit_summary(results: list[BlockResult]) -> dict[str, Any]:
    """What compression.json's `refine` entry says of the refit over all blocks."""
    recs = [r.block["refit"] for r in results if r.block and "refit" in r.block]
    if not recs:
        return {"blocks": 0}
    return {"blocks": len(recs),
            "holdout_before_mean": float(np.mean([r["holdout_before"] for r in recs])),
            "holdout_after_mean": float(np.mean([r["holdout_after"] for r in recs])),
            "steps_run": int(sum(r["steps_run"] for r in recs)),
            "seconds": round(float(sum(r["seconds"] for r in recs)), 3)}


@register(REFINERS, "refit", RefitSettings,
          "refit: train each block's factors to the dense block's outputs inside the block loop (Adam, early "
          "stopping on held-out calibration windows), --refit-steps N turns it on")
def refit(**kwargs: Any) -> Refiner:
    settings = RefitSettings(**kwargs)

    def check(spec: RunSpec, cfg) -> None:
        held_out(spec.nsamples, settings)

    def block(inputs: BlockInputs, result: BlockResult, key: jax.Array, widths: dict[str, int]) -> BlockResult:
        return refit_result(inputs, result, key, widths, settings)

    def memory(cfg, spec: RunSpec) -> tuple[int, str]:
        return refit_memory(cfg, spec, settings)

    return Refiner("refit", settings, None, check, memory, block=block, summary=refit_summary)


def refit_memory(cfg, spec: RunSpec, settings: RefitSettings) -> tuple[int, str]:
    """Device bytes of one block's refit, from the config alone: XLA's memory analysis of `refit_block` on a block
    at the run's uniform ranks with all its calibration windows on the device."""
    from sigmascale_jax.compress.memory import abstract_factored_params, compiled_peak

    block = abstract_factored_params(cfg, spec.ratio)["blocks"][0]
    train, frozen = refit_partition(block, settings.refit_norms)
    sds = jax.ShapeDtypeStruct
    n_hold = held_out(spec.nsamples, settings)
    shape = lambda n: sds((n, spec.seq_len, cfg.hidden_size), jnp.float32)  # noqa: E731
    data, hold = (shape(spec.nsamples - n_hold),) * 2, (shape(n_hold),) * 2
    key = jax.eval_shape(lambda: jax.random.key(0))
    lr = sds((), jnp.float32)  # the rate as data, as `refit_result` passes it: the program the run compiles
    peak = compiled_peak(refit_block, train, frozen, data, hold, key, lr, cfg=cfg, settings=settings)
    return peak, (f"one block's refit, {settings.refit_windows} windows per step, the calibration windows and the "
                  "dense outputs on the device")
