"""Healing: a short distillation of the compressed model's factors toward the dense model, with optax.

What every strong low-rank peer adds last (SVD-LLM's LoRA step, block-distillation chains,
SigmaScale's optional epoch): train the factors a little against the original model. Here
the factors are already typed pytree leaves, so healing is a plain optax loop:

    loss = KL(p_dense ‖ p_compressed) over next-token distributions  (+ ce_weight × cross-entropy on the text)

The teacher is the original params, run on the fly on each batch (its logits are never
stored for all tokens). Only the factor matrices train (`trainable` labels; `norms=True`
adds the RMSNorm weights); embeddings, head and projections kept dense stay frozen.

Two faces:

- the library transform, for the user's own loop, optimizer, data and mesh::

      tx = heal_optimizer(optax.adamw(1e-4), params)           # trains exactly the factors
      opt_state = tx.init(params)
      for tokens in batches:                                     # [B, T] int32, sharded as you like
          params, opt_state, loss = distill_step(params, opt_state, dense, tokens, cfg=cfg, optimizer=tx)

- the stage `--heal-steps N` of the compressor, after the block loop and the other refiners,
  before encoding (PivGa is lossless, quantization comes after healing): AdamW with a linear
  warmup and cosine decay, windows drawn from the calibration text clear of the windows that
  chose ranks and factors, early stopping on held-out calibration windows, and an Orbax
  checkpoint of params and optimizer state at every measurement, so a killed run resumes and
  ends with the factors of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sigmascale_jax.compress.plan import REFINERS, ModelContext, Params, Ranks, Refiner, RunSpec, register
from sigmascale_jax.compress.settings import Settings, setting
from sigmascale_jax.errors import UserError
from sigmascale_jax.model.modeling import forward, trainable

NORMS = ("attn_norm", "mlp_norm", "q_norm", "k_norm")  # per block; and the outer `final_norm`

# ------------------------------------------------------------------ the library transform


def distill_loss(params: Params, teacher: Params, tokens: jax.Array, cfg, ce_weight: float = 0.0,
                 remat: bool = False):
    """`(loss, {"kl", "ce"})`: mean KL(teacher ‖ student) of the next-token distributions at every position of
    `tokens: [B, T]`, plus `ce_weight` × the student's next-token cross-entropy on `tokens`.

    `params`: the student (any leaf forms); `teacher`: the dense params, run under `stop_gradient`.
    `remat`: recompute the student's block activations in the backward pass (less memory, one more forward).
    """
    student = jax.nn.log_softmax(forward(params, tokens, cfg, remat=remat), axis=-1)
    dense = jax.nn.log_softmax(jax.lax.stop_gradient(forward(teacher, tokens, cfg)), axis=-1)
    kl = jnp.mean(jnp.sum(jnp.exp(dense) * (dense - student), axis=-1))
    ce = -jnp.mean(jnp.take_along_axis(student[:, :-1], tokens[:, 1:, None], axis=-1))
    return kl + ce_weight * ce, {"kl": kl, "ce": ce}


def heal_labels(params: Params, norms: bool = False) -> Params:
    """`trainable(params)`, with the RMSNorm weights (every block's and the final one) labelled "factor" too
    when `norms`."""
    labels = trainable(params)
    if not norms:
        return labels
    labels = {**labels, "final_norm": "factor"}
    labels["blocks"] = [{k: "factor" if k in NORMS else v for k, v in b.items()} for b in labels["blocks"]]
    return labels


def heal_optimizer(tx: optax.GradientTransformation, params: Params, *, norms: bool = False):
    """`tx` on the factors of `params` (and the norms if `norms`), nothing on the rest (`optax.set_to_zero`)."""
    return optax.multi_transform({"factor": tx, "frozen": optax.set_to_zero()}, heal_labels(params, norms))


@functools.partial(jax.jit, static_argnames=("cfg", "optimizer", "ce_weight", "remat"))
def distill_step(params: Params, opt_state: Any, teacher: Params, tokens: jax.Array, *, cfg,
                 optimizer: optax.GradientTransformation, ce_weight: float = 0.0, remat: bool = False):
    """One optimizer step of `distill_loss`: `(params, opt_state, loss)`. Pure and jit-compiled.

    `optimizer`: an optax transformation that leaves frozen leaves alone (`heal_optimizer(...)`: without
    the mask, weight decay or a plain optimizer would move embeddings and integer carriers too). Works on
    plain, PivGa and quantized trees, and under a data mesh (shard `tokens` over it; params replicated).
    """
    (loss, _), grads = jax.value_and_grad(distill_loss, has_aux=True)(params, teacher, tokens, cfg, ce_weight, remat)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


@functools.partial(jax.jit, static_argnames=("cfg",))
def _held_loss(params: Params, teacher: Params, tokens: jax.Array, cfg) -> jax.Array:
    return distill_loss(params, teacher, tokens, cfg)[0]


def held_out_loss(params: Params, teacher: Params, windows: np.ndarray, cfg, batch: int, mesh=None) -> float:
    """Mean distillation loss (KL only) over `windows: [N, T]`, `batch` windows a call; the windows go to the device
    before the loop and the losses come back after it (`jax.transfer_guard("disallow")` in between)."""
    from sigmascale_jax.parallel import device_chunks

    chunks = device_chunks(windows, batch, mesh)
    with jax.transfer_guard("disallow"):
        losses = [_held_loss(params, teacher, chunk, cfg) for chunk in chunks]
    return sum(float(loss) * len(chunk) for loss, chunk in zip(jax.device_get(losses), chunks)) / len(windows)


# ------------------------------------------------------------------ the stage


@dataclasses.dataclass(frozen=True)
class HealSettings(Settings):
    switch = "heal_steps"

    heal_steps: int = setting(0, "heal: AdamW steps distilling the factors toward the dense model after the block "
                              "loop (0: off; any other value turns healing on)", min=0)
    heal_lr: float = setting(1e-5, "heal: peak learning rate (linear warmup over the first 5%% of the steps, cosine "
                             "decay to 10%%)", above=0.0)
    heal_samples: int = setting(128, "heal: training windows from the calibration text, clear of the windows that "
                                "chose ranks and factors where the text has room", min=1)
    heal_seq_len: int | None = setting(None, "heal: tokens per window (default: --seq-len)", min=2)
    heal_batch: int = setting(4, "heal: windows per step", min=1)
    heal_holdout: int = setting(8, "heal: more such windows, never trained on, measuring the distillation loss", min=1)
    heal_eval_every: int = setting(25, "heal: steps between held-out measurements (each also a checkpoint)", min=1)
    heal_patience: int = setting(2, "heal: stop after this many measurements without --heal-min-gain", min=1)
    heal_min_gain: float = setting(0.002, "heal: relative held-out improvement over the best that counts", min=0.0)
    heal_ce: float = setting(0.0, "heal: weight of next-token cross-entropy on the text, added to the KL", min=0.0)
    heal_norms: bool = setting(False, "heal: also train the RMSNorm weights (embeddings and head stay frozen)")
    heal_remat: bool = setting(False, "heal: recompute each block's activations in the backward pass instead of "
                               "keeping them (less memory; one more forward pass of the student a step)")
    heal_calib: str | None = setting(None, "heal: text to draw windows from: c4 (docs 0-999), wikitext2-valid or a "
                                     "file (default: --calib); never evaluation text")


def schedule(settings: HealSettings) -> optax.Schedule:
    steps = settings.heal_steps
    warmup = max(1, steps // 20)
    return optax.warmup_cosine_decay_schedule(0.0, settings.heal_lr, warmup, max(steps, warmup + 1),
                                              end_value=settings.heal_lr / 10)


def batch_rows(seed: int, step: int, n: int, batch: int) -> np.ndarray:
    """The training windows of step `step`: a function of the step alone, so a resumed run draws the same."""
    return np.random.default_rng([seed, 2, step]).choice(n, size=min(batch, n), replace=False)


class _Checkpoint:
    """The loop's state in `staging/heal`: an Orbax checkpoint of (params, optimizer state, best params) per
    measurement, and `heal.json` (step, trace, best) written after it, last."""

    def __init__(self, staging, key: dict):
        self.folder = None if staging is None else staging / "heal"
        self.key = key

    def load(self, like: tuple) -> tuple[tuple, dict] | None:
        from sigmascale_jax.io.checkpoint import load_pytree

        if self.folder is None or not (self.folder / "heal.json").is_file():
            return None
        info = json.loads((self.folder / "heal.json").read_text())
        if info.get("key") != self.key:
            shutil.rmtree(self.folder)  # another heal's state (a run with other settings is refused earlier)
            return None
        leaves = load_pytree(self.folder / f"step-{info['step']:06d}")["leaves"]
        treedef = jax.tree.structure(like)
        return jax.tree.unflatten(treedef, [jnp.asarray(x) for x in leaves]), info

    def save(self, state: tuple, info: dict) -> None:
        from sigmascale_jax.io.checkpoint import save_pytree
        from sigmascale_jax.io.fileio import write_json_atomic

        if self.folder is None:
            return
        path = self.folder / f"step-{info['step']:06d}"
        save_pytree(path, {"leaves": [np.asarray(x) for x in jax.tree.leaves(state)]})
        write_json_atomic(self.folder / "heal.json", {**info, "key": self.key})
        for old in self.folder.glob("step-*"):
            if old != path:
                shutil.rmtree(old)


def heal_model(ctx: ModelContext, blocks: list[Params], settings: HealSettings) -> tuple[list[Params], dict]:
    """The stage: `blocks` (the compressor's dict forms) distilled toward the dense model; and the record."""
    from tqdm.auto import tqdm

    from sigmascale_jax.parallel import on_device, shard

    cfg, spec = ctx.cfg, ctx.spec
    t0 = time.perf_counter()
    seq_len = settings.heal_seq_len or spec.seq_len
    n_train, n_held = settings.heal_samples, settings.heal_holdout
    if ctx.fresh_windows is not None:
        windows, text = ctx.fresh_windows(settings.heal_calib, n_train + n_held, seq_len)
    else:  # in memory only the compressor's own windows exist
        if settings.heal_calib or len(ctx.windows) < n_train + n_held or ctx.windows.shape[1] < seq_len:
            raise UserError(f"healing in memory draws its {n_train} + {n_held} windows of {seq_len} tokens from the "
                            f"calibration windows given ({list(ctx.windows.shape)}); give more windows or lower "
                            "heal_samples / heal_holdout / heal_seq_len")
        windows = ctx.windows[: n_train + n_held, :seq_len]
        text = {"calib": "the calibration windows given", "windows": n_train + n_held, "seq_len": seq_len,
                "disjoint_from_calibration": False}
    held, train = windows[:n_held], windows[n_held:]
    teacher = on_device({**ctx.outer, "blocks": [ctx.load_block(i) for i in range(cfg.num_layers)]}, ctx.mesh)
    params = on_device({**ctx.outer, "blocks": blocks}, ctx.mesh)  # weights split over the mesh's model axis
    tx = heal_optimizer(optax.adamw(schedule(settings), weight_decay=0.0), params, norms=settings.heal_norms)
    state = (params, tx.init(params), params)  # current, optimizer state, best so far
    ckpt = _Checkpoint(ctx.staging, {**settings.asdict(), "text": text})
    batch = min(settings.heal_batch, n_train)
    before = held_out_loss(params, teacher, held, cfg, batch, ctx.mesh)
    info = {"step": 0, "best": before, "best_step": 0, "bad": 0, "trace": [[0, None, before]], "resumed_from": None,
            "seconds": 0.0}
    restored = ckpt.load(state)
    if restored is not None:
        state, info = restored
        state = on_device(state, ctx.mesh)  # placed as the fresh state is, before the guarded steps read it
        info["resumed_from"] = info["step"]
    earlier = info.get("seconds", 0.0)  # the interrupted runs' time up to their last checkpoint
    bar = tqdm(total=settings.heal_steps, initial=info["step"], desc="heal", unit="step", disable=not ctx.progress,
               leave=False)
    step, stopped = info["step"], info["bad"] >= settings.heal_patience
    while step < settings.heal_steps and not stopped:
        params, opt_state, best = state
        tokens = shard(train[batch_rows(spec.seed, step, n_train, batch)], ctx.mesh)  # the step's ids: explicit
        with jax.transfer_guard("disallow"):  # everything else the step reads is on the device already
            params, opt_state, loss = distill_step(params, opt_state, teacher, tokens, cfg=cfg, optimizer=tx,
                                                   remat=settings.heal_remat)
        state, step = (params, opt_state, best), step + 1
        bar.update(1)
        if step % settings.heal_eval_every == 0 or step == settings.heal_steps:
            held_loss = held_out_loss(params, teacher, held, cfg, batch, ctx.mesh)
            if not np.isfinite(held_loss):
                raise FloatingPointError(f"healing diverged: held-out distillation loss {held_loss} at step {step}; "
                                         "lower --heal-lr")
            info["trace"].append([step, float(loss), held_loss])
            if held_loss < info["best"] * (1 - settings.heal_min_gain):
                info.update(best=held_loss, best_step=step, bad=0)
                state = (params, opt_state, params)
            else:
                info["bad"] += 1
                stopped = info["bad"] >= settings.heal_patience
            info.update(step=step, seconds=earlier + time.perf_counter() - t0)
            ckpt.save(state, info)
            bar.set_postfix(held=f"{held_loss:.4f}", best=f"{info['best']:.4f}")
    bar.close()
    best = jax.device_get(state[2])
    record = {
        "steps": settings.heal_steps, "steps_run": step, "stopped_early": step < settings.heal_steps,
        "best_step": info["best_step"], "tokens": int(step * batch * seq_len), "text": text,
        "held_out_windows": n_held, "held_out_loss_before": before, "held_out_loss_after": info["best"],
        "trace": info["trace"], "resumed_from_step": info["resumed_from"],
        "seconds": round(earlier + time.perf_counter() - t0, 3),
        "seconds_this_run": round(time.perf_counter() - t0, 3),
    }
    return best["blocks"], record


@register(REFINERS, "heal", HealSettings,
          "healing: distill the factors toward the dense model (KL on next-token distributions) with AdamW, "
          "--heal-steps N turns it on")
def heal(**kwargs: Any) -> Refiner:
    settings = HealSettings(**kwargs)

    def check(spec: RunSpec, cfg) -> None:
        if settings.heal_steps == 0:
            raise UserError("--heal needs --heal-steps N (the AdamW steps to run); give N > 0")
        seq_len = settings.heal_seq_len or spec.seq_len
        if seq_len > cfg.max_position_embeddings:
            raise UserError(f"--heal-seq-len {seq_len} exceeds the model's maximum of {cfg.max_position_embeddings} "
                            "positions")
        if jax.process_count() > 1:
            raise UserError("healing (--heal-steps) runs in one process: compress with several processes and no "
                            "healing, then heal the folder in one (`compress.refine.heal.heal_compressed`)")

    def refine(ctx: ModelContext, blocks: list[Params], ranks: Ranks) -> tuple[list[Params], dict]:
        return heal_model(ctx, blocks, settings)

    def memory(cfg, spec: RunSpec) -> tuple[int, str]:
        from sigmascale_jax.compress.memory import abstract_params, compiled_peak

        params = abstract_params(cfg)
        length = settings.heal_seq_len or spec.seq_len
        tokens = jax.ShapeDtypeStruct((settings.heal_batch, length), jnp.int32)
        peak = compiled_peak(_loss_grad, params, params, tokens, cfg=cfg, remat=settings.heal_remat)
        moments = 2 * cfg.num_layers * sum(m * n for m, n in cfg.projection_shapes().values()) * 4  # AdamW's, at most
        return peak + moments, (f"teacher + student forward and backward, {settings.heal_batch} x {length} tokens a "
                                "step (a dense-shaped student: an upper bound)")

    return Refiner("heal", settings, refine, check, memory)


def _loss_grad(params: Params, teacher: Params, tokens: jax.Array, *, cfg, remat: bool) -> Params:
    return jax.grad(lambda p: distill_loss(p, teacher, tokens, cfg, 0.0, remat)[0])(params)


# ------------------------------------------------------------------ after the fact: a finished folder


def heal_compressed(src: str | Path, out: str | Path, *, model: str | None = None, data_dir: str | None = None,
                    mesh: str | None = None, overwrite: bool = False, progress: bool = True,
                    **settings: Any) -> dict:
    """Heal a finished compressed folder `src` into `out`: the `heal` stage, run after the fact on its leaves.

    `model`: the dense model it was compressed from (default: the one its report names); the teacher and the
    healing text (the run's calibration text, clear of its calibration windows) come from it. `settings`: the
    `--heal-*` settings by field name (`heal_steps=200`, ...). Any unquantized encoding (plain, PivGa): its
    float factors train (PivGa's B' and R: the same rank-k matrices as B and C). The heal checkpoint lives in
    `OUT.partial/heal` until `out` is written, so the same call resumes. Returns the new report.
    """
    from sigmascale_jax.compress.pipeline import fresh_windows_of, stored_params
    from sigmascale_jax.io.checkpoint import load_compressed, read_report, write_derived
    from sigmascale_jax.io.hf_map import load_block, load_outer
    from sigmascale_jax.io.outputs import model_input, writing_folder
    from sigmascale_jax.io.sources import open_model
    from sigmascale_jax.model.leaves import is_quantized
    from sigmascale_jax.model.modeling import PROJECTIONS
    from sigmascale_jax.parallel import make_mesh

    settings = HealSettings(**{"heal_steps": 100, **settings})
    src, out = Path(src), Path(out)
    report = read_report(src)
    model = model or report.get("model")
    source = open_model(str(model))
    if source.kind == "compressed":
        raise UserError(f"{model} is a compressed model; healing needs the dense model {src} was compressed from")
    cfg, params = load_compressed(src)
    if source.cfg != cfg:
        raise UserError(f"{model} is not the model {src} was compressed from (its config differs); pass model=")
    blocks = jax.device_get(params["blocks"])
    if any(is_quantized(m) for b in blocks for n in PROJECTIONS for m in jax.tree.leaves(
            b[n], is_leaf=lambda x: hasattr(x, "dequantize"))):
        raise UserError(f"{src} holds quantized matrices; heal before quantizing (heal a float folder, then "
                        "re-encode it)")
    cal = report["calibration"]
    spec = RunSpec(model=str(model), ratio=report["ratio_requested"], calib=cal["source"], nsamples=cal["nsamples"],
                   seq_len=cal["seq_len"], seed=cal["seed"], mesh=mesh)
    inputs = model_input(src, "the model being healed") + model_input(str(model), "the dense model")
    with writing_folder(out, overwrite, inputs) as staging:
        partial = out.with_name(out.name + ".partial")
        partial.mkdir(exist_ok=True)
        outer = jax.device_get(load_outer(source.reader, cfg))
        ctx = ModelContext(cfg, outer, lambda i: load_block(source.reader, cfg, i),
                           np.zeros((0, spec.seq_len), np.int32), spec, progress, model_key=None,
                           mesh=make_mesh(mesh), fresh_windows=fresh_windows_of(source, spec, data_dir),
                           staging=partial)
        healed, record = heal_model(ctx, blocks, settings)
        new = {**report, "refine": [*report.get("refine", []), {"name": "heal", **settings.asdict(), **record}],
               "healed_from": str(src)}
        write_derived(staging, stored_params({**params, "blocks": healed}), new, src)
    shutil.rmtree(partial, ignore_errors=True)
    return new
