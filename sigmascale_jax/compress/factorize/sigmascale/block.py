"""SigmaScale: learned row/column scaling around a fixed whitening, before truncated SVD.

Per matrix (METHODS.md)::

    r = exp(ρ), c = exp(γ)
    A = diag(r) · W · S · diag(c)               S: Cholesky whitening of the input Gram matrix
    Ŵ = diag(r)⁻¹ · A_k · diag(c)⁻¹ · S⁻¹        stored as B = diag(r)⁻¹ U_k Σ_k^½,
                                                 C = Σ_k^½ V_kᵀ diag(c)⁻¹ S⁻¹

ρ = γ = 0 is SVD-LLM's solution. All scale vectors of one block are learned
jointly by `learn_block_scales`, one jit-compiled pure function (optax Adam with
cosine decay inside `lax.scan`), keeping the step with the best held-out loss.
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
from jax.scipy.linalg import solve_triangular

from sigmascale_jax.linalg.batching import stacked_map
from sigmascale_jax.compress.plan import BlockResult
from sigmascale_jax.compress.settings import Settings, setting
from sigmascale_jax.linalg.lowrank import relative_activation_loss, split_sigma, split_sigma_masked
from sigmascale_jax.linalg.precision import factor_precision
from sigmascale_jax.linalg.truncation import TRUNCATIONS
from sigmascale_jax.linalg.whitening import WHITEN_NAMES, triangular_whitening
from sigmascale_jax.model.config import ModelConfig
from sigmascale_jax.model.modeling import PROJECTION_INPUT, PROJECTIONS, Params, block_forward, rope_cos_sin

LOSS_KINDS = ("block", "layer")
# loss -> (steps, lr) when not given: this project's block/layer losses, and the released recipe's.
DEFAULTS = {"block": (200, 3e-2), "layer": (200, 3e-2), "paper": (1000, 5e-3)}


@dataclasses.dataclass(frozen=True)
class SigmaScaleSettings(Settings):
    """SigmaScale's knobs: the command line's flags, and the one static argument of the learning scan (frozen, so
    hashable: two blocks with the same settings share one compiled program whatever their ranks)."""

    loss: str = setting("block", "sigmascale: loss the scales learn on (paper: the released recipe, per matrix, "
                        "no whitening)", choices=(*LOSS_KINDS, "paper"))
    steps: int | None = setting(None, "sigmascale: Adam steps per block (per matrix for paper; default 200, paper 1000)",
                                min=0)
    lr: float | None = setting(None, "sigmascale: peak learning rate (default 0.03 with cosine decay; paper 0.005, "
                               "constant, AdamW)", above=0.0)
    holdout: float = setting(0.125, "sigmascale: fraction of windows held out to pick the step", above=0.0, below=1.0)
    step_windows: int = setting(8, "sigmascale (block loss): calibration windows per Adam step", min=1)
    eval_every: int = setting(10, "sigmascale: measure the held-out loss every N steps", min=1)
    truncation: str = setting("svd", "sigmascale: the learning loop's rank-k truncation, from an SVD or from eigh of the "
                              "smaller side's Gram matrix (same VJP, cheaper)", choices=("svd", "eigh"))
    min_gain: float = setting(0.0, "sigmascale: stop a block's learning when the last --eval-every steps lowered the "
                              "held-out loss by less than this fraction of its drop so far (0: run all --steps)",
                              min=0.0, below=1.0)

    def resolved(self) -> "SigmaScaleSettings":
        """These settings with `steps` and `lr` filled in from the loss's defaults where not given."""
        steps, lr = DEFAULTS[self.loss]
        return dataclasses.replace(self, steps=steps if self.steps is None else self.steps,
                                   lr=lr if self.lr is None else self.lr)


# the keyword names `learn_block_scales` and `sigmascale_block` took before they took settings
_LEGACY = {"kind": "loss", "batch_windows": "step_windows"}


def block_settings(settings: SigmaScaleSettings | None = None, **knobs: Any) -> SigmaScaleSettings:
    """`settings` (default: `SigmaScaleSettings()`) with `knobs` replaced (`steps=50`, `loss="layer"`; the older
    `kind=` and `batch_windows=` too), resolved."""
    settings = settings or SigmaScaleSettings()
    knobs = {_LEGACY.get(k, k): v for k, v in knobs.items()}
    return dataclasses.replace(settings, **knobs).resolved()


def _unwhiten_rows(y: jax.Array, s: jax.Array) -> jax.Array:
    """`y S⁻¹` for lower-triangular `s` (a triangular solve, never an inverse)."""
    return solve_triangular(s, y.T, trans="T", lower=True).T


def scaled_reconstruction(w: jax.Array, s: jax.Array, rho: jax.Array, gamma: jax.Array, rank: Any,
                          truncation: str = "svd") -> jax.Array:
    """`Ŵ(ρ, γ)`: `w: [m, n]`, `s: [n, n]` lower-triangular, `rho: [m]`, `gamma: [n]` -> `[m, n]`. Differentiable.

    `rank`: an int or a traced integer (the truncation cuts by a mask). `truncation`: how `A_k` is computed,
    "svd" or "eigh" (the smaller Gram matrix's; `truncation.py`).
    """
    r, c = jnp.exp(rho), jnp.exp(gamma)
    a = r[:, None] * (w @ s) * c[None, :]
    a_k = TRUNCATIONS[truncation](a, rank)
    return _unwhiten_rows(a_k / r[:, None] / c[None, :], s)


def scaled_factors(w: jax.Array, s: jax.Array, rho: jax.Array, gamma: jax.Array, rank: int, *, masked: bool = False):
    """The stored factors `B: [m, k]`, `C: [k, n]` of `scaled_reconstruction`, and `σ(A)`.

    `masked`: `rank` may be traced, and the factors come full-width (`B: [m, r]`, `C: [r, n]`), zero past it."""
    r, c = jnp.exp(rho), jnp.exp(gamma)
    a = r[:, None] * (w @ s) * c[None, :]
    u, sig, vt = jnp.linalg.svd(a, full_matrices=False)
    b, c_scaled = (split_sigma_masked if masked else split_sigma)(u, sig, vt, rank)
    return b / r[:, None], _unwhiten_rows(c_scaled / c[None, :], s), sig


def effective_rank_entropy(sigma: jax.Array) -> jax.Array:
    """H = −Σ p_i log p_i with p_i = σ_i / Σσ (Roy & Vetterli); the effective rank is exp(H)."""
    p = sigma / jnp.sum(sigma)
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))


def low_rank_names(ranks: dict[str, Any]) -> tuple[str, ...]:
    """The projections that get factors (rank not None), in `PROJECTIONS` order; the others stay dense."""
    return tuple(n for n in PROJECTIONS if ranks.get(n) is not None)


def rank_data(ranks: Any) -> dict[str, jax.Array]:
    """Every projection's rank as an int32 scalar array (data, not a static argument); 0 marks a projection kept
    dense. `ranks`: `{projection: rank or None}` or `((projection, rank), ...)`; projections not named stay dense."""
    ranks = dict(ranks)
    return {n: np.int32(ranks.get(n) or 0) for n in PROJECTIONS}


def _groups(block: Params, names: tuple[str, ...]) -> list[tuple[str, ...]]:
    """`names` by matrix shape, batched together (`batching.stacked_map`) whatever their ranks."""
    out: dict[tuple, list[str]] = {}
    for n in names:
        out.setdefault(tuple(block[n]["w"].shape), []).append(n)
    return [tuple(v) for v in out.values()]


def reconstruct_block(block: Params, whitening: dict, scales: dict, ranks: dict[str, Any],
                      truncation: str = "svd") -> Params:
    """The block with every low-rank projection replaced by its dense `Ŵ(ρ, γ)` (for the loss).

    `ranks[n]`: an int or a traced integer (`rank_data`); None (or absent) keeps the projection as it is, and so
    does a rank of 0, which selects `W` itself by data (`jnp.where`): the program does not change when an
    allocator keeps a matrix dense.
    """
    new = dict(block)
    for names in _groups(block, low_rank_names(ranks)):
        w = jnp.stack([block[n]["w"] for n in names])
        s = jnp.stack([whitening[n] for n in names])
        rho = jnp.stack([scales[n]["rho"] for n in names])
        gamma = jnp.stack([scales[n]["gamma"] for n in names])
        k = jnp.stack([jnp.asarray(ranks[n], jnp.int32) for n in names])
        w_hat = stacked_map(functools.partial(scaled_reconstruction, truncation=truncation), in_axes=(0, 0, 0, 0, 0))(
            w, s, rho, gamma, k)
        for j, n in enumerate(names):
            new[n] = {**block[n], "w": jnp.where(k[j] > 0, w_hat[j], block[n]["w"])}
    return new


def layer_loss(scales: dict, block: Params, whitening: dict, grams: dict, ranks: dict[str, Any],
               truncation: str = "svd") -> jax.Array:
    """Σ over the block's low-rank projections of the relative activation loss `tr(ΔG Δᵀ) / tr(W G Wᵀ)`, `Δ = W − Ŵ`.

    `grams: {tap: [in, in]}` are the Gram matrices of the projections' inputs
    (`modeling.PROJECTION_INPUT`): the loss needs no tokens, only their second moments. A projection kept dense
    (rank 0) adds exactly 0.
    """
    approx = reconstruct_block(block, whitening, scales, ranks, truncation)
    total = 0.0
    for n in low_rank_names(ranks):
        w, g = block[n]["w"], grams[PROJECTION_INPUT[n]].astype(block[n]["w"].dtype)
        total = total + relative_activation_loss(w, approx[n]["w"], g)
    return total


def block_loss(
    scales: dict, block: Params, whitening: dict, x: jax.Array, target: jax.Array, cfg: ModelConfig,
    ranks: dict[str, Any], truncation: str = "svd",
) -> jax.Array:
    """Relative MSE `‖f̂(x) − target‖² / ‖target‖²` of the block with every projection replaced by its Ŵ.

    `x, target: [B, T, D]`: the block's inputs and the original block's outputs on them.
    """
    approx = reconstruct_block(block, whitening, scales, ranks, truncation)
    cos, sin = rope_cos_sin(cfg, jnp.arange(x.shape[1]))
    out = block_forward(approx, x, cfg, cos, sin)
    return jnp.sum((out - target) ** 2) / jnp.sum(target**2)


def zero_scales(block: Params, names: tuple[str, ...] = PROJECTIONS) -> dict:
    """ρ = γ = 0 for each projection in `names`: the SVD-LLM starting point."""
    return {
        n: {"rho": jnp.zeros(block[n]["w"].shape[0], block[n]["w"].dtype), "gamma": jnp.zeros(block[n]["w"].shape[1], block[n]["w"].dtype)}
        for n in names
    }


def learn_block_scales(block: Params, whitening: dict, train: Any, hold: Any, key: jax.Array, *, cfg: ModelConfig,
                       ranks: Any, settings: SigmaScaleSettings | None = None, **knobs: Any) -> tuple[dict, dict]:
    """Learn ρ, γ of all seven projections of a block jointly; a pure, jit-compiled function.

    Args:
      block: dense block params (`w: [out, in]` per projection).
      whitening: `{projection: S [in, in]}`, lower-triangular with `S Sᵀ = G` (every projection's: a projection
        kept dense needs one too, or gets the identity).
      train, hold: the data of the loss. `settings.loss="block"`: `(x, y)`, the block's inputs
        and original outputs `[N, T, D]`; each step uses `settings.step_windows` of the N
        training windows, drawn without replacement with `key`. `"layer"`:
        `{tap: gram [in, in]}` (see `layer_loss`).
      key: PRNG key of the minibatches (unused by `layer`, which needs no sampling).
      ranks: `{projection: rank}` or `((projection, rank), ...)`; projections not listed, or with rank None, stay
        dense and keep ρ = γ = 0. Ranks are data: blocks of one shape share one compiled program.
      settings: `SigmaScaleSettings` (the one static argument besides `cfg`), or its fields as `knobs`
        (`steps=50, lr=0.03, eval_every=10, min_gain=0.0, truncation="svd", loss="block"`).
        The held-out loss is measured at step 0, every `eval_every` steps and at the end. `min_gain`: early
        stopping (0: off). From the second measurement on, learning stops when the last `eval_every` steps
        lowered the held-out loss by less than `min_gain` times its total drop so far; the remaining steps are
        skipped (`lax.cond`), the learning rate schedule still spans `steps`, so what is learned up to the stop is
        exactly what a full run learns by then.
    Returns:
      the scales of the best held-out step (step 0 = SVD-LLM included, so never worse
      than the initialization there), and a trace `{"train": [steps], "hold": [steps + 1]
      (NaN where not measured or skipped), "best_step": int, "steps_run": int}`.
    """
    settings = block_settings(settings, **knobs)
    if settings.loss not in LOSS_KINDS:
        raise ValueError(f"unknown SigmaScale loss {settings.loss!r}; known: {', '.join(LOSS_KINDS)}")
    eye = {n: jnp.eye(block[n]["w"].shape[1], dtype=block[n]["w"].dtype) for n in PROJECTIONS if n not in whitening}
    return _learn(block, {**whitening, **eye}, train, hold, key, rank_data(ranks), cfg=cfg, settings=settings)


@functools.partial(jax.jit, static_argnames=("cfg", "settings"))
def _learn(block: Params, whitening: dict, train: Any, hold: Any, key: jax.Array, ranks: dict, *, cfg: ModelConfig,
           settings: SigmaScaleSettings) -> tuple[dict, dict[str, Any]]:
    """`learn_block_scales`' compiled body: `ranks` is `rank_data`'s (data), `settings` resolved (static)."""
    steps, eval_every, min_gain, truncation = settings.steps, settings.eval_every, settings.min_gain, settings.truncation
    if settings.loss == "block":
        n_train = train[0].shape[0]
        take = min(settings.step_windows, n_train)

        def train_loss(scales, k):
            idx = jax.random.choice(k, n_train, (take,), replace=False) if take < n_train else jnp.arange(n_train)
            return block_loss(scales, block, whitening, train[0][idx], train[1][idx], cfg, ranks, truncation)

        def hold_loss(scales):
            return block_loss(scales, block, whitening, hold[0], hold[1], cfg, ranks, truncation)
    else:

        def train_loss(scales, k):
            return layer_loss(scales, block, whitening, train, ranks, truncation)

        def hold_loss(scales):
            return layer_loss(scales, block, whitening, hold, ranks, truncation)

    opt = optax.adam(optax.cosine_decay_schedule(settings.lr, max(steps, 1)))
    init = zero_scales(block)
    hold0 = hold_loss(init)

    nan = jnp.asarray(jnp.nan, hold0.dtype)

    def learn(carry, i):
        scales, opt_state, best, best_loss, best_step, last_hold, _, _ = carry
        loss, grads = jax.value_and_grad(train_loss)(scales, jax.random.fold_in(key, i))
        updates, opt_state = opt.update(grads, opt_state, scales)
        scales = optax.apply_updates(scales, updates)
        measure = ((i + 1) % eval_every == 0) | (i + 1 == steps)
        hold = jax.lax.cond(measure, hold_loss, lambda _: nan, scales)
        better = jnp.isfinite(hold) & (hold < best_loss)
        best = jax.tree.map(lambda new, old: jnp.where(better, new, old), scales, best)
        best_loss = jnp.where(better, hold, best_loss)
        stop = False
        if min_gain > 0:  # from the second measurement on: the first is at step min(eval_every, steps)
            stop = measure & (i + 1 > eval_every) & (last_hold - hold < min_gain * (hold0 - best_loss))
        carry = (scales, opt_state, best, best_loss, jnp.where(better, i + 1, best_step),
                 jnp.where(measure, hold, last_hold), i + 1, jnp.asarray(stop))
        return carry, (loss, hold)

    def step(carry, i):
        return jax.lax.cond(carry[-1], lambda c, i: (c, (nan, nan)), learn, carry, i)

    zero = jnp.asarray(0)
    carry = (init, opt.init(init), init, hold0, zero, hold0, zero, jnp.asarray(False))
    (_, _, best, _, best_step, _, steps_run, _), (train_trace, hold_trace) = jax.lax.scan(step, carry, jnp.arange(steps))
    return best, {"train": train_trace, "hold": jnp.concatenate([hold0[None], hold_trace]), "best_step": best_step,
                  "steps_run": steps_run}


# Compiled once per shape: run eagerly, each block would trace whitening's `lax.cond` branches again.
_triangular_whitening_jit = jax.jit(triangular_whitening)


@jax.jit
def _final_factors(w, s, rho, gamma, gram, rank) -> dict:
    """The stored factors of learned scales, full-width and zero past `rank` (data: one compile per shape), and what
    compression.json says of them: the relative activation loss, the singular values of W, W S and the scaled
    matrix, and their entropies."""
    b, c, sig = scaled_factors(w, s, rho, gamma, rank, masked=True)
    spectra = {"w": jnp.linalg.svd(w, compute_uv=False), "whitened": jnp.linalg.svd(w @ s, compute_uv=False),
               "scaled": sig}
    return {"b": b, "c": c, "rel_loss": relative_activation_loss(w, b @ c, gram), "spectra": spectra,
            "entropy": {k: effective_rank_entropy(v) for k, v in spectra.items()}}


def holdout_windows(n_windows: int, holdout: float) -> int:
    """How many of `n_windows` calibration windows are held out: `max(1, round(holdout · n))`."""
    return max(1, int(round(holdout * n_windows)))


def sigmascale_block(
    block: Params,
    stats: dict,
    xs: Any,
    ys: Any,
    cfg: ModelConfig,
    ranks: dict[str, int],
    *,
    settings: SigmaScaleSettings | None = None,
    key: jax.Array | None = None,
    batch_size: int = 8,
    mesh: Any = None,
    precision: str = "float64",
    **knobs: Any,
) -> BlockResult:
    """Factor a dense block with SigmaScale (the block loss's windows split over `mesh`'s data axis, if given).

    `xs, ys: [N, T, D]` are the block's calibration inputs and original outputs, `stats`
    their `stats.block_stats`; the last `max(1, round(holdout · N))` windows are held out
    to pick the step; `key` draws the minibatches (default `jax.random.key(0)`). `settings`: `SigmaScaleSettings`,
    or its fields as `knobs` (`steps=50, lr=0.03, ...`). Whitening comes from all N windows (so step 0 is exactly
    SVD-LLM's factors), in `precision` (float64 or float32); learning runs in float32 (`step_windows` windows per
    step for the `block` loss, the training windows' Gram matrices for `layer`); the final factors
    are computed in `precision` from the learned scales. Returns a `BlockResult`: the factored block, each
    projection's record, the block's record (the held-out trace) and `spectra`, the singular values of W, of W S
    and of the learned scaled matrix, `{"<projection>.<w|whitened|scaled>": [r]}`.
    """
    from sigmascale_jax.compress.stats import block_stats

    settings = block_settings(settings, **knobs)
    kind, steps = settings.loss, settings.steps
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown SigmaScale loss {kind!r}; known: {', '.join(LOSS_KINDS)}")
    n_hold = holdout_windows(len(xs), settings.holdout)
    if n_hold >= len(xs):
        raise ValueError(f"need more than {n_hold} calibration windows to hold {n_hold} out")
    names = low_rank_names(ranks)
    dense_info = {
        n: {"shape": list(block[n]["w"].shape), "rank": min(block[n]["w"].shape), "dense": True, "rel_loss": 0.0,
            "whitening": None}
        for n in PROJECTIONS if n not in names
    }
    if not names:  # every projection kept dense: nothing to learn
        return BlockResult(dict(block), dict(dense_info))
    # every tap's whitening, the dense projections' too: the learning scan keeps them by data (rank 0), so its
    # program is the same whichever projections an allocator keeps dense
    whitenings, routes = {}, {}
    with factor_precision(precision) as dtype:
        for tap in dict.fromkeys(PROJECTION_INPUT[n] for n in PROJECTIONS):
            s, route = _triangular_whitening_jit(np.asarray(stats[tap]["gram"], dtype))
            whitenings[tap], routes[tap] = np.asarray(s), int(route)
    white32 = {n: np.asarray(whitenings[PROJECTION_INPUT[n]], np.float32) for n in PROJECTIONS}
    from sigmascale_jax.parallel import fetch, on_device, shard

    host_block = block
    block, white32, rank_arrays = on_device((block, white32, rank_data(ranks)), mesh)
    if kind == "block":
        xs, ys = np.asarray(xs), np.asarray(ys)
        train = (shard(xs[:-n_hold], mesh), shard(ys[:-n_hold], mesh))
        hold_data = (shard(xs[-n_hold:], mesh), shard(ys[-n_hold:], mesh))
    else:
        # Gram matrices per token (float32-friendly); training = all windows minus the held-out ones.
        _, held = block_stats(block, np.asarray(xs[-n_hold:]), cfg, batch_size, mesh, outputs=False)
        n_train_tokens = (len(xs) - n_hold) * xs.shape[1]
        train = on_device({t: np.asarray((stats[t]["gram"] - held[t]["gram"]) / n_train_tokens, np.float32)
                           for t in held}, mesh)
        hold_data = on_device({t: np.asarray(held[t]["gram"] / held[t]["tokens"], np.float32) for t in held}, mesh)
    key = on_device(jax.random.key(0) if key is None else key, mesh)
    t0 = time.perf_counter()
    with jax.transfer_guard("disallow"):  # the learning loop is one compiled scan over data already on the device
        scales, trace = _learn(block, white32, train, hold_data, key, rank_arrays, cfg=cfg, settings=settings)
        scales, trace = fetch((scales, trace))  # whole on every process's host
    learn_s = time.perf_counter() - t0  # compilation included when this block's shapes are new
    block = host_block
    new = {k: v for k, v in block.items() if k not in PROJECTIONS}
    info: dict[str, Any] = {}
    all_spectra: dict[str, np.ndarray] = {}
    hold = np.asarray(trace["hold"])
    with factor_precision(precision) as dtype:
        for n in names:
            as_dtype = lambda x: np.asarray(x, dtype)  # noqa: E731  (host casts: no eager device op per shape)
            k = int(ranks[n])
            f = jax.device_get(_final_factors(
                as_dtype(block[n]["w"]), as_dtype(whitenings[PROJECTION_INPUT[n]]), as_dtype(scales[n]["rho"]),
                as_dtype(scales[n]["gamma"]), as_dtype(stats[PROJECTION_INPUT[n]]["gram"]), np.int32(k)))
            b, c = np.asarray(f["b"])[:, :k], np.asarray(f["c"])[:k]  # full-width: cut to the rank on the host
            if not (np.isfinite(b).all() and np.isfinite(c).all()):
                raise FloatingPointError(f"non-finite SigmaScale factors for projection {n} (rank {k})")
            w_dtype = np.dtype(block[n]["w"].dtype)
            p = {"b": np.ascontiguousarray(b, w_dtype), "c": np.ascontiguousarray(c, w_dtype)}
            if "bias" in block[n]:
                p["bias"] = block[n]["bias"]
            new[n] = p
            info[n] = {
                "shape": list(block[n]["w"].shape),
                "rank": k,
                "dense": False,
                "rel_loss": float(f["rel_loss"]),
                "whitening": WHITEN_NAMES[routes[PROJECTION_INPUT[n]]],
                **{f"entropy_{e}": float(f["entropy"][e]) for e in ("w", "whitened", "scaled")},
            }
            all_spectra.update({f"{n}.{e}": np.asarray(v, np.float32) for e, v in f["spectra"].items()})
    for n in dense_info:
        new[n], info[n] = block[n], dense_info[n]
    info = {n: info[n] for n in PROJECTIONS}
    train_trace = np.asarray(trace["train"])
    steps_run = int(trace["steps_run"])
    measured = np.flatnonzero(np.isfinite(hold))
    record = {
        "loss": kind,
        "steps": steps,
        "steps_run": steps_run,
        "holdout_init": float(hold[0]),
        "holdout_best": float(hold[int(trace["best_step"])]),
        "best_step": int(trace["best_step"]),
        "train_first": float(train_trace[0]) if steps else None,
        "train_last": float(train_trace[steps_run - 1]) if steps_run else None,
        "holdout_trace": [[int(i), float(hold[i])] for i in measured],
        "learn_s": round(learn_s, 3),
        "step_s": round(learn_s / steps_run, 4) if steps_run else None,
    }
    return BlockResult(new, info, record, all_spectra)  # spectra: not JSON, the pipeline stores them in spectra.npz


@functools.partial(jax.jit, static_argnames=("rank", "steps", "truncation", "loss_fn"))
def sigmascale_factors(w: jax.Array, gram: jax.Array, rank: int, *, steps: int = 200, lr: float = 3e-2,
                       truncation: str = "svd", loss_fn: Any = None) -> tuple[jax.Array, jax.Array, dict]:
    """SigmaScale on one matrix, a pure jit-compiled function: `(B [m, k], C [k, n], {"rho": [m], "gamma": [n]})`.

    `w: [m, n]` (out × in), `gram: [n, n]` = X Xᵀ of its inputs. The scales learn with Adam (cosine decay) from
    ρ = γ = 0, i.e. from SVD-LLM's factors, keeping the best step. `loss_fn(w_hat) -> scalar` is what they learn
    on; the default, the relative activation loss on `gram`, is already minimal at SVD-LLM's factors (so the start
    is kept), and the gain comes from losses that see more than the layer: pass your own (a hashable function).
    Whitening is `linalg.whitening.triangular_whitening` of `gram`, with its fallbacks.
    """
    from sigmascale_jax.compress.factorize.svd_llm import check_rank

    check_rank(rank, w.shape)
    n = gram.shape[0]
    s, _ = triangular_whitening(gram)
    loss_fn = loss_fn or (lambda w_hat: relative_activation_loss(w, w_hat, gram))

    def loss(sc):
        return loss_fn(scaled_reconstruction(w, s, sc["rho"], sc["gamma"], rank, truncation))

    opt = optax.adam(optax.cosine_decay_schedule(lr, max(steps, 1)))
    init = {"rho": jnp.zeros(w.shape[0], w.dtype), "gamma": jnp.zeros(n, w.dtype)}

    def step(carry, _):
        sc, state, best, best_loss = carry
        value, grads = jax.value_and_grad(loss)(sc)
        better = value < best_loss  # the loss of `sc`, measured before this step's update
        best = jax.tree.map(lambda a, b: jnp.where(better, a, b), sc, best)
        updates, state = opt.update(grads, state, sc)
        return (optax.apply_updates(sc, updates), state, best, jnp.minimum(value, best_loss)), value

    carry = (init, opt.init(init), init, jnp.asarray(jnp.inf, w.dtype))
    (last, _, best, best_loss), _ = jax.lax.scan(step, carry, None, length=steps)
    best = jax.tree.map(lambda a, b: jnp.where(loss(last) < best_loss, a, b), last, best)
    b, c, _ = scaled_factors(w, s, best["rho"], best["gamma"], rank)
    return b, c, best
