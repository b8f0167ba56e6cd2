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
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from sigmascale_jax.compress.plan import REFINERS, ModelContext, Params, Ranks, Refiner, RunSpec, register
from sigmascale_jax.compress.settings import Settings, setting
from sigmascale_jax.errors import UserError
from sigmascale_jax.model.modeling import hidden_states, lm_head, trainable

NORMS = ("attn_norm", "mlp_norm", "q_norm", "k_norm")  # per block; and the outer `final_norm`
# Positions per chunk of the streamed KL: at most one `[B, KL_CHUNK, V]` float32 block of logits (and its
# log-softmax, teacher's and student's) lives at once, forward and backward, never the whole `[B, T, V]`.
KL_CHUNK = 128

# ------------------------------------------------------------------ the library transform


def _logprobs(h: jax.Array, head: jax.Array) -> jax.Array:
    return jax.nn.log_softmax((h @ head.T.astype(h.dtype)).astype(jnp.float32), axis=-1)


def streamed_kl_ce(h_student: jax.Array, h_teacher: jax.Array, head_student: jax.Array, head_teacher: jax.Array,
                   tokens: jax.Array, chunk: int = KL_CHUNK) -> tuple[jax.Array, jax.Array]:
    """`(mean KL(teacher ‖ student), mean next-token cross-entropy of the student)` from final hidden states
    `h_*: [B, T, D]` and heads `[V, D]`, over chunks of `chunk` positions (torchtune's chunked KL, ModelOpt's
    streamed distillation): each chunk's logits are made, reduced and dropped inside a `lax.scan` whose body is
    rematerialized, so the backward pass rebuilds one chunk at a time too. Equal to the whole-sequence
    formulas (tested to 1e-5, value and gradient)."""
    b, t, _ = h_student.shape
    c = min(chunk, t)
    n = -(-t // c)
    pad = n * c - t
    if pad:
        h_student, h_teacher = (jnp.pad(h, ((0, 0), (0, pad), (0, 0))) for h in (h_student, h_teacher))
    nxt = jnp.pad(tokens[:, 1:], ((0, 0), (0, pad + 1)))  # the next token at each position (0 past the end)

    @jax.checkpoint
    def body(sums, i):
        start = i * c
        rows = lambda a: jax.lax.dynamic_slice_in_dim(a, start, c, axis=1)  # noqa: E731
        student, teacher = _logprobs(rows(h_student), head_student), _logprobs(rows(h_teacher), head_teacher)
        pos = start + jnp.arange(c)
        kl = jnp.sum(jnp.where((pos < t)[None, :], jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1), 0.0))
        picked = jnp.take_along_axis(student, rows(nxt)[..., None], axis=-1)[..., 0]
        ce = -jnp.sum(jnp.where((pos < t - 1)[None, :], picked, 0.0))
        return (sums[0] + kl, sums[1] + ce), None

    zero = jnp.zeros((), jnp.float32)
    (kl, ce), _ = jax.lax.scan(body, (zero, zero), jnp.arange(n))
    return kl / (b * t), ce / (b * max(t - 1, 1))


def distill_loss(params: Params, teacher: Any, tokens: jax.Array, cfg, ce_weight: float = 0.0,
                 remat: bool = False):
    """`(loss, {"kl", "ce"})`: mean KL(teacher ‖ student) of the next-token distributions at every position of
    `tokens: [B, T]`, plus `ce_weight` × the student's next-token cross-entropy on `tokens`.

    `params`: the student (any leaf forms, blocks listed or stacked); `teacher`: the dense params, run under
    `stop_gradient`, or the teacher's final normed hidden states `[B, T, D]` on these tokens (computed once,
    `teacher_states`), which leave the teacher's blocks out of the step; the teacher's head is then the student's
    (frozen) head. `remat`: recompute the student's block activations in the backward pass (less memory, one more
    forward). The KL is streamed over position chunks (`streamed_kl_ce`): no `[B, T, V]` logits are held.
    """
    h_student = hidden_states(params, tokens, cfg, remat=remat)
    if isinstance(teacher, dict):
        h_teacher, head_teacher = hidden_states(teacher, tokens, cfg), lm_head(teacher)
    else:
        h_teacher, head_teacher = teacher, lm_head(params)
    kl, ce = streamed_kl_ce(h_student, jax.lax.stop_gradient(h_teacher), lm_head(params),
                            jax.lax.stop_gradient(head_teacher), tokens)
    return kl + ce_weight * ce, {"kl": kl, "ce": ce}


def trains_quantized(leaf) -> bool:
    """Whether a projection leaf has a quantized matrix of which something trains (a quantized factor's scales);
    a residual leaf's Q is frozen whole, so it heals: its float L and R train."""
    from sigmascale_jax.model.leaves import FACTOR, is_quantized

    pairs = zip(jax.tree.leaves(leaf, is_leaf=is_quantized), jax.tree.leaves(leaf.labels(), is_leaf=is_quantized))
    return any(is_quantized(m) and FACTOR in jax.tree.leaves(lab) for m, lab in pairs)


def heal_labels(params: Params, norms: bool = False, scales: str = "factor") -> Params:
    """`trainable(params, scales)`, with the RMSNorm weights (every block's and the final one) labelled "factor"
    too when `norms`."""
    labels = trainable(params, scales)
    if not norms:
        return labels
    labels = {**labels, "final_norm": "factor"}
    relabel = lambda b: {k: "factor" if k in NORMS else v for k, v in b.items()}  # noqa: E731
    blocks = labels["blocks"]
    labels["blocks"] = relabel(blocks) if isinstance(blocks, dict) else [relabel(b) for b in blocks]
    return labels


def heal_optimizer(tx: optax.GradientTransformation, params: Params, *, norms: bool = False,
                   scale_tx: optax.GradientTransformation | None = None):
    """`tx` on the factors of `params` (and the norms if `norms`), nothing on the rest (`optax.set_to_zero`).

    `scale_tx`: a transformation of its own for quantized matrices' scales (`trainable(..., scales="scale")`),
    e.g. `optax.adam(1e-5)` beside `tx = optax.adam(1e-3)` for the float factors: scales are ~1e-3 of a weight's
    range, and Adam moves each by about its learning rate a step."""
    if scale_tx is None:
        return optax.multi_transform({"factor": tx, "frozen": optax.set_to_zero()}, heal_labels(params, norms))
    return optax.multi_transform({"factor": tx, "scale": scale_tx, "frozen": optax.set_to_zero()},
                                 heal_labels(params, norms, scales="scale"))


def distill_step(params: Params, opt_state: Any, teacher: Any, tokens: jax.Array, *, cfg,
                 optimizer: optax.GradientTransformation, ce_weight: float = 0.0, remat: bool = False):
    """One optimizer step of `distill_loss`: `(params, opt_state, loss)`. Pure and jit-compiled.

    `params` and `opt_state` are donated (their device buffers become the new ones: pass the returned values on,
    not the ones given). `teacher`: the dense params or the teacher's hidden states on `tokens` (`distill_loss`).
    `optimizer`: an optax transformation that leaves frozen leaves alone (`heal_optimizer(...)`: without
    the mask, weight decay or a plain optimizer would move embeddings and integer carriers too). Works on
    plain, PivGa and quantized trees, and under a data mesh (shard `tokens` over it; params replicated).
    """
    # every static argument passed by name, defaults included: jit keys its cache on the keywords given, so
    # `remat=False` spelled out and left out would otherwise compile the same step twice
    return _distill_step(params, opt_state, teacher, tokens, cfg=cfg, optimizer=optimizer, ce_weight=float(ce_weight),
                         remat=bool(remat))


@functools.partial(jax.jit, static_argnames=("cfg", "optimizer", "ce_weight", "remat"), donate_argnums=(0, 1))
def _distill_step(params: Params, opt_state: Any, teacher: Any, tokens: jax.Array, *, cfg,
                  optimizer: optax.GradientTransformation, ce_weight: float, remat: bool):
    (loss, _), grads = jax.value_and_grad(distill_loss, has_aux=True)(params, teacher, tokens, cfg, ce_weight, remat)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


@functools.partial(jax.jit, static_argnames=("cfg",))
def _teacher_hidden(teacher: Params, tokens: jax.Array, cfg) -> jax.Array:
    return hidden_states(teacher, tokens, cfg)


def teacher_states(teacher: Params, windows: np.ndarray, cfg, batch: int, mesh=None) -> np.ndarray:
    """The dense teacher's final normed hidden states `[N, T, D]` (float32, host) on `windows: [N, T]`, `batch`
    windows a call: what `distill_loss` takes instead of the teacher, so training steps and held-out measurements
    run the student alone."""
    from sigmascale_jax.model.modeling import stack_params
    from sigmascale_jax.parallel import device_chunks, fetch, on_device

    teacher, chunks = on_device(stack_params(teacher), mesh), device_chunks(windows, batch, mesh)
    with jax.transfer_guard("disallow"):
        states = [_teacher_hidden(teacher, chunk, cfg) for chunk in chunks]
    return np.concatenate(fetch(states))


class Split(NamedTuple):
    """Which leaves of a params tree train: the tree's structure and each leaf's label, static (hashable), so the
    trainable leaves (a list) and the frozen ones travel apart and are put back together inside `jit`."""

    treedef: Any
    train: tuple[bool, ...]

    @classmethod
    def of(cls, params: Params, labels: Params) -> "Split":
        leaves, treedef = jax.tree.flatten(params)
        marks = jax.tree.leaves(labels)
        if len(marks) != len(leaves):
            raise ValueError("labels do not match the params tree")
        return cls(treedef, tuple(m == "factor" for m in marks))

    def partition(self, params: Params) -> tuple[list, list]:
        leaves = jax.tree.leaves(params)
        return ([x for x, t in zip(leaves, self.train) if t], [x for x, t in zip(leaves, self.train) if not t])

    def combine(self, train: list, frozen: list) -> Params:
        train, frozen = iter(train), iter(frozen)
        return jax.tree.unflatten(self.treedef, [next(train) if t else next(frozen) for t in self.train])


@functools.partial(jax.jit, static_argnames=("split", "cfg", "optimizer", "ce_weight", "remat"), donate_argnums=(0, 1))
def heal_step(train: list, opt_state: Any, frozen: list, teacher: Any, tokens: jax.Array, *, split: Split, cfg,
              optimizer: optax.GradientTransformation, ce_weight: float = 0.0, remat: bool = False):
    """The heal stage's step: `distill_step` on the trainable leaves alone (`split`), frozen leaves passed apart
    and never differentiated; `train` and `opt_state` donated. `(train, opt_state, loss)`."""

    def loss(train):
        return distill_loss(split.combine(train, frozen), teacher, tokens, cfg, ce_weight, remat)[0]

    value, grads = jax.value_and_grad(loss)(train)
    updates, opt_state = optimizer.update(grads, opt_state, train)
    return optax.apply_updates(train, updates), opt_state, value


@functools.partial(jax.jit, static_argnames=("split", "cfg"))
def _held_loss(train: list, frozen: list, teacher: Any, tokens: jax.Array, *, split: Split, cfg) -> jax.Array:
    return distill_loss(split.combine(train, frozen), teacher, tokens, cfg)[0]


def held_out_loss(params: Params, teacher: Any, windows: np.ndarray, cfg, batch: int, mesh=None) -> float:
    """Mean distillation loss (KL only) over `windows: [N, T]`, `batch` windows a call: `teacher` the dense params or
    their hidden states on `windows` (`[N, T, D]`, `teacher_states`). The windows go to the device before the loop
    and the losses come back after it (`jax.transfer_guard("disallow")` in between); `params` and a dense `teacher`
    are placed on the device (or `mesh`) first, wherever they lie."""
    from sigmascale_jax.parallel import on_device

    params = on_device(params, mesh)
    teacher = on_device(teacher, mesh) if isinstance(teacher, dict) else teacher
    split = Split.of(params, jax.tree.map(lambda _: "factor", params))
    train, frozen = split.partition(params)
    return _held_out(train, frozen, teacher, windows, cfg, batch, split, mesh)


def _held_out(train: list, frozen: list, teacher: Any, windows: np.ndarray, cfg, batch: int, split: Split,
              mesh=None) -> float:
    from sigmascale_jax.parallel import device_chunks

    chunks = device_chunks(windows, batch, mesh)
    states = [teacher] * len(chunks) if isinstance(teacher, dict) else device_chunks(teacher, batch, mesh)
    with jax.transfer_guard("disallow"):
        losses = [_held_loss(train, frozen, t, chunk, split=split, cfg=cfg) for t, chunk in zip(states, chunks)]
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
    heal_remat: bool = setting(True, "heal: recompute each block's activations in the backward pass instead of "
                               "keeping them (one more forward pass of the student a step; off, SmolLM2's step "
                               "plans 6.8 GiB of device memory instead of 1.7)")
    heal_teacher_cache: bool = setting(True, "heal: run the dense teacher once over the healing windows and keep its "
                                       "final hidden states on the host, so steps and held-out measurements run "
                                       "only the student (off: the teacher runs inside every step)")
    heal_calib: str | None = setting(None, "heal: text to draw windows from: c4 (docs 0-999), wikitext2-valid or a "
                                     "file (default: --calib); never evaluation text", reads="the healing text")


def check_heal(settings: HealSettings, spec: RunSpec, cfg) -> None:
    """The stage's settings against the run and the model, before any work (the compressor's and `heal_compressed`'s
    check alike)."""
    if settings.heal_steps == 0:
        raise UserError("--heal needs --heal-steps N (the AdamW steps to run); give N > 0")
    seq_len = settings.heal_seq_len or spec.seq_len
    if seq_len > cfg.max_position_embeddings:
        raise UserError(f"--heal-seq-len {seq_len} exceeds the model's maximum of {cfg.max_position_embeddings} "
                        "positions")
    if jax.process_count() > 1:
        raise UserError("healing (--heal-steps) runs in one process: compress with several processes and no "
                        "healing, then heal the folder in one (`compress.refine.heal.heal_compressed`)")
    check_heal_text(settings, cfg, seq_len)


def check_heal_text(settings: HealSettings, cfg, seq_len: int) -> None:
    """Before any work: the healing text exists, and its windows (with the teacher's hidden states when cached) fit
    in this machine's memory."""
    import os

    from sigmascale_jax.compress.calibration import CALIB_SOURCES

    if settings.heal_calib and settings.heal_calib not in CALIB_SOURCES and not os.path.isfile(settings.heal_calib):
        raise UserError(f"--heal-calib {settings.heal_calib}: no such file; give c4, wikitext2-valid or a .txt/.jsonl "
                        "file")
    from sigmascale_jax.compress.report import physical_memory

    windows = settings.heal_samples + settings.heal_holdout
    need = windows * seq_len * (4 + (4 * cfg.hidden_size if settings.heal_teacher_cache else 0))
    have = physical_memory()
    if have is not None and need > have:
        raise UserError(f"--heal-samples {settings.heal_samples} + --heal-holdout {settings.heal_holdout} windows of "
                        f"{seq_len} tokens need {need / 2**30:.1f} GiB of host memory (with the teacher's hidden "
                        f"states), more than this machine's {have / 2**30:.1f} GiB; lower --heal-samples")


def schedule(settings: HealSettings) -> optax.Schedule:
    steps = settings.heal_steps
    warmup = max(1, steps // 20)
    return optax.warmup_cosine_decay_schedule(0.0, settings.heal_lr, warmup, max(steps, warmup + 1),
                                              end_value=settings.heal_lr / 10)


def batch_rows(seed: int, step: int, n: int, batch: int) -> np.ndarray:
    """The training windows of step `step`: a function of the step alone, so a resumed run draws the same."""
    return np.random.default_rng([seed, 2, step]).choice(n, size=min(batch, n), replace=False)


class _Checkpoint:
    """The loop's state in `staging/heal`: an Orbax checkpoint of (trainable leaves, optimizer state, best trainable
    leaves) per measurement — never the frozen ones, which the run has anyway — and `heal.json` (step, trace,
    best) written after it, last."""

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
        return jax.tree.unflatten(treedef, [np.asarray(x) for x in leaves]), info

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


class _Timer:
    """Seconds and XLA compiles of the heal loop's parts (`compile`, `steps`, `held_out`, `checkpoint`, `teacher`)."""

    def __init__(self) -> None:
        from sigmascale_jax.compress.report import CompileCounter

        self.compiles = CompileCounter()
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def part(self, name: str):
        import contextlib

        @contextlib.contextmanager
        def timed():
            t0, c0 = time.perf_counter(), self.compiles.snapshot()
            yield
            dt, (n, secs) = time.perf_counter() - t0, self.compiles.since(c0)
            self.seconds[name] = self.seconds.get(name, 0.0) + dt - secs
            self.seconds["compile"] = self.seconds.get("compile", 0.0) + secs
            self.counts[name] = self.counts.get(name, 0) + n

        return timed()

    def record(self) -> dict:
        self.compiles.close()
        return {"seconds": {k: round(v, 3) for k, v in self.seconds.items()},
                "compiles": {**self.counts, "total": sum(self.counts.values())}}


def heal_model(ctx: ModelContext, blocks: list[Params], settings: HealSettings,
               key: dict | None = None) -> tuple[list[Params], dict]:
    """The stage: `blocks` (the compressor's dict forms, or typed leaves) distilled toward the dense model; and the
    record.

    The blocks are stacked (mixed ranks padded, `stacking.stack_blocks`) so the model runs as one loop; only the
    trainable leaves (`heal_labels`) and their optimizer state are differentiated, donated, checkpointed; the
    teacher runs once over the windows (`heal_teacher_cache`) and leaves the device before the first step.
    """
    from sigmascale_jax.model.modeling import stack_params
    from sigmascale_jax.model.stacking import unstack_blocks
    from sigmascale_jax.parallel import on_device, shard

    cfg, spec = ctx.cfg, ctx.spec
    t0 = time.perf_counter()
    timer = _Timer()
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
    held, train_windows = windows[:n_held], windows[n_held:]
    batch = min(settings.heal_batch, n_train)
    dense = {**ctx.outer, "blocks": [ctx.load_block(i) for i in range(cfg.num_layers)]}
    if settings.heal_teacher_cache:
        with timer.part("teacher"):
            states = teacher_states(dense, windows, cfg, batch, ctx.mesh)
        held_teacher, train_teacher, teacher = states[:n_held], states[n_held:], None
        del dense
    else:
        teacher = on_device(stack_params(dense), ctx.mesh)
        held_teacher = teacher
    params = stack_params({**ctx.outer, "blocks": blocks})
    split = Split.of(params, heal_labels(params, settings.heal_norms))
    train, frozen = split.partition(params)
    tx = optax.adamw(schedule(settings), weight_decay=0.0)
    # current, optimizer state, best so far (kept on the host); the state made by one compiled program, not an eager
    # zeros per array shape
    state = (train, jax.jit(tx.init)(train), train)
    ckpt = _Checkpoint(ctx.staging, {**settings.asdict(), "text": text, **(key or {})})  # `key`: what else it heals
    frozen = on_device(frozen, ctx.mesh)
    cur, opt_state = on_device(state[:2], ctx.mesh)  # weights split over the mesh's model axis, the rest replicated

    def measure(cur) -> float:
        with timer.part("held_out"):
            return _held_out(cur, frozen, held_teacher, held, cfg, batch, split, ctx.mesh)

    before = measure(cur)
    info = {"step": 0, "best": before, "best_step": 0, "bad": 0, "trace": [[0, None, before]], "resumed_from": None,
            "seconds": 0.0}
    best = jax.device_get(state[2])
    restored = ckpt.load((state[0], state[1], state[2]))
    if restored is not None:
        (cur, opt_state, best), info = restored
        cur, opt_state = on_device((cur, opt_state), ctx.mesh)  # placed as the fresh state is, before guarded steps
        info["resumed_from"] = info["step"]
    earlier = info.get("seconds", 0.0)  # the interrupted runs' time up to their last checkpoint
    bar = tqdm(total=settings.heal_steps, initial=info["step"], desc="heal", unit="step", disable=not ctx.progress,
               leave=False)
    step, stopped = info["step"], info["bad"] >= settings.heal_patience
    pending = None  # the last step's loss, still being computed: the bar counts a step once its loss is ready
    while step < settings.heal_steps and not stopped:
        rows = batch_rows(spec.seed, step, n_train, batch)
        tokens = shard(train_windows[rows], ctx.mesh)  # the step's ids: explicit
        step_teacher = teacher if teacher is not None else shard(train_teacher[rows], ctx.mesh)
        with timer.part("steps"), jax.transfer_guard("disallow"):  # everything else the step reads is there already
            cur, opt_state, loss = heal_step(cur, opt_state, frozen, step_teacher, tokens, split=split, cfg=cfg,
                                             optimizer=tx, ce_weight=settings.heal_ce, remat=settings.heal_remat)
            if pending is not None:
                float(jax.device_get(pending))
                bar.update(1)
        pending, step = loss, step + 1
        if step % settings.heal_eval_every == 0 or step == settings.heal_steps:
            held_loss = measure(cur)  # waits for the step: its loss is ready too
            bar.update(1)
            pending = None
            if not np.isfinite(held_loss):
                raise FloatingPointError(f"healing diverged: held-out distillation loss {held_loss} at step {step}; "
                                         "lower --heal-lr")
            info["trace"].append([step, float(loss), held_loss])
            if held_loss < info["best"] * (1 - settings.heal_min_gain):
                info.update(best=held_loss, best_step=step, bad=0)
                best = jax.device_get(cur)
            else:
                info["bad"] += 1
                stopped = info["bad"] >= settings.heal_patience
            info.update(step=step, seconds=earlier + time.perf_counter() - t0)
            with timer.part("checkpoint"):
                ckpt.save((jax.device_get(cur), jax.device_get(opt_state), best), info)
            bar.set_postfix(held=f"{held_loss:.4f}", best=f"{info['best']:.4f}")
    bar.close()
    healed = split.combine(best, jax.device_get(frozen))
    out = healed["blocks"]
    out = unstack_blocks(out, like=blocks) if isinstance(out, dict) else out
    timing = timer.record()
    record = {
        "steps": settings.heal_steps, "steps_run": step, "stopped_early": step < settings.heal_steps,
        "best_step": info["best_step"], "tokens": int(step * batch * seq_len), "text": text,
        "held_out_windows": n_held, "held_out_loss_before": before, "held_out_loss_after": info["best"],
        "trace": info["trace"], "resumed_from_step": info["resumed_from"],
        "seconds": round(earlier + time.perf_counter() - t0, 3),
        "seconds_this_run": round(time.perf_counter() - t0, 3),
        "time_s": timing["seconds"], "compiles": timing["compiles"],
        "stacked": not isinstance(blocks, dict) and isinstance(params["blocks"], dict),
    }
    return out, record


@register(REFINERS, "heal", HealSettings,
          "healing: distill the factors toward the dense model (KL on next-token distributions) with AdamW, "
          "--heal-steps N turns it on")
def heal(**kwargs: Any) -> Refiner:
    settings = HealSettings(**kwargs)

    def check(spec: RunSpec, cfg) -> None:
        check_heal(settings, spec, cfg)

    def refine(ctx: ModelContext, blocks: list[Params], ranks: Ranks) -> tuple[list[Params], dict]:
        return heal_model(ctx, blocks, settings)

    def memory(cfg, spec: RunSpec) -> tuple[int, str]:
        return heal_memory(cfg, spec, settings)

    return Refiner("heal", settings, refine, check, memory)


def heal_memory(cfg, spec: RunSpec, settings: HealSettings) -> tuple[int, str]:
    """Device bytes of the heal stage's step, from the config alone: XLA's memory analysis of `heal_step` (donation
    counted) on the student at the run's uniform ranks, stacked, with its AdamW state; the teacher's hidden states
    (one batch) or, without the cache, the dense teacher; beside it the held-out measurement's."""
    from sigmascale_jax.compress.memory import abstract_factored_params, compiled_peak
    from sigmascale_jax.model.modeling import stack_params

    length = settings.heal_seq_len or spec.seq_len
    b = settings.heal_batch
    sds = jax.ShapeDtypeStruct
    params = stack_params(abstract_factored_params(cfg, spec.ratio))
    split = Split.of(params, heal_labels(params, settings.heal_norms))
    train, frozen = split.partition(params)
    tx = optax.adamw(1e-5, weight_decay=0.0)
    opt_state = jax.eval_shape(tx.init, train)
    tokens = sds((b, length), jnp.int32)
    if settings.heal_teacher_cache:
        teacher = sds((b, length, cfg.hidden_size), jnp.float32)
    else:
        from sigmascale_jax.compress.memory import abstract_params

        teacher = stack_params(abstract_params(cfg))
    peak = compiled_peak(heal_step, train, opt_state, frozen, teacher, tokens, split=split, cfg=cfg, optimizer=tx,
                         ce_weight=settings.heal_ce, remat=settings.heal_remat)
    what = "the teacher's hidden states" if settings.heal_teacher_cache else "the dense teacher"
    return peak, (f"one step on {b} x {length} tokens: the student at uniform ranks with AdamW, {what}"
                  f"{', rematerialized' if settings.heal_remat else ''}")


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
    from sigmascale_jax.io.checkpoint import load_compressed, read_report, report_store_dtype, write_derived
    from sigmascale_jax.io.hf_map import load_block, load_outer
    from sigmascale_jax.io.outputs import model_input, writing_folder
    from sigmascale_jax.io.sources import open_model
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
    if any(trains_quantized(b[n]) for b in blocks for n in PROJECTIONS):
        raise UserError(f"{src} holds quantized factors; heal before quantizing (heal a float folder, then "
                        "re-encode it)")
    cal = report["calibration"]
    spec = RunSpec(model=str(model), ratio=report["ratio_requested"], calib=cal["source"], nsamples=cal["nsamples"],
                   seq_len=cal["seq_len"], seed=cal["seed"], mesh=mesh)
    check_heal(settings, spec, cfg)  # the stage's own checks, before any work (heal_seq_len, the text, memory)
    # a killed heal resumes only into the same folder's heal: its checkpoint is keyed by the folder and its report
    source_key = {"source": str(src.resolve()),
                  "source_report_sha1": hashlib.sha1((src / "compression.json").read_bytes()).hexdigest()}
    from sigmascale_jax.io.outputs import Input

    inputs = model_input(src, "the model being healed") + model_input(str(model), "the dense model")
    inputs += [Input(path, role, whole=Path(path).is_dir()) for path, role in settings.inputs()]
    with writing_folder(out, overwrite, inputs) as staging:
        partial = out.with_name(out.name + ".partial")
        partial.mkdir(exist_ok=True)
        outer = jax.device_get(load_outer(source.reader, cfg))
        ctx = ModelContext(cfg, outer, lambda i: load_block(source.reader, cfg, i),
                           np.zeros((0, spec.seq_len), np.int32), spec, progress, model_key=None,
                           mesh=make_mesh(mesh), fresh_windows=fresh_windows_of(source, spec, data_dir),
                           staging=partial)
        healed, record = heal_model(ctx, blocks, settings, key=source_key)
        new = {**report, "refine": [*report.get("refine", []), {"name": "heal", **settings.asdict(), **record}],
               "healed_from": str(src)}
        write_derived(staging, stored_params({**params, "blocks": healed}, report_store_dtype(report)), new, src)
    shutil.rmtree(partial, ignore_errors=True)
    return new
