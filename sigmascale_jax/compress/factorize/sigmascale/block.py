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

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.scipy.linalg import solve_triangular

from sigmascale_jax.linalg.batching import stacked_map
from sigmascale_jax.linalg.lowrank import relative_activation_loss, split_sigma
from sigmascale_jax.linalg.precision import factor_precision
from sigmascale_jax.linalg.truncation import TRUNCATIONS
from sigmascale_jax.linalg.whitening import WHITEN_NAMES, triangular_whitening
from sigmascale_jax.model.config import ModelConfig
from sigmascale_jax.model.modeling import PROJECTION_INPUT, PROJECTIONS, Params, block_forward, rope_cos_sin

LOSS_KINDS = ("block", "layer")


def _unwhiten_rows(y: jax.Array, s: jax.Array) -> jax.Array:
    """`y S⁻¹` for lower-triangular `s` (a triangular solve, never an inverse)."""
    return solve_triangular(s, y.T, trans="T", lower=True).T


def scaled_reconstruction(w: jax.Array, s: jax.Array, rho: jax.Array, gamma: jax.Array, rank: int,
                          truncation: str = "svd") -> jax.Array:
    """`Ŵ(ρ, γ)`: `w: [m, n]`, `s: [n, n]` lower-triangular, `rho: [m]`, `gamma: [n]` -> `[m, n]`. Differentiable.

    `truncation`: how `A_k` is computed, "svd" or "eigh" (the smaller Gram matrix's; `truncation.py`).
    """
    r, c = jnp.exp(rho), jnp.exp(gamma)
    a = r[:, None] * (w @ s) * c[None, :]
    a_k = TRUNCATIONS[truncation](a, rank)
    return _unwhiten_rows(a_k / r[:, None] / c[None, :], s)


def scaled_factors(w: jax.Array, s: jax.Array, rho: jax.Array, gamma: jax.Array, rank: int):
    """The stored factors `B: [m, k]`, `C: [k, n]` of `scaled_reconstruction`, and `σ(A)`."""
    r, c = jnp.exp(rho), jnp.exp(gamma)
    a = r[:, None] * (w @ s) * c[None, :]
    u, sig, vt = jnp.linalg.svd(a, full_matrices=False)
    b, c_scaled = split_sigma(u, sig, vt, rank)
    return b / r[:, None], _unwhiten_rows(c_scaled / c[None, :], s), sig


def effective_rank_entropy(sigma: jax.Array) -> jax.Array:
    """H = −Σ p_i log p_i with p_i = σ_i / Σσ (Roy & Vetterli); the effective rank is exp(H)."""
    p = sigma / jnp.sum(sigma)
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))


def low_rank_names(ranks: dict[str, int | None]) -> tuple[str, ...]:
    """The projections that get factors (rank not None), in `PROJECTIONS` order; the others stay dense."""
    return tuple(n for n in PROJECTIONS if ranks.get(n) is not None)


def _groups(block: Params, ranks: dict[str, int | None]) -> list[tuple[str, ...]]:
    """Low-rank projections of equal shape and rank, batched together (`batching.stacked_map`)."""
    out: dict[tuple, list[str]] = {}
    for n in low_rank_names(ranks):
        out.setdefault((block[n]["w"].shape, ranks[n]), []).append(n)
    return [tuple(v) for v in out.values()]


def reconstruct_block(block: Params, whitening: dict, scales: dict, ranks: dict[str, int | None],
                      truncation: str = "svd") -> Params:
    """The block with every low-rank projection replaced by its dense `Ŵ(ρ, γ)` (for the loss); rank None stays."""
    new = dict(block)
    for names in _groups(block, ranks):
        w = jnp.stack([block[n]["w"] for n in names])
        s = jnp.stack([whitening[n] for n in names])
        rho = jnp.stack([scales[n]["rho"] for n in names])
        gamma = jnp.stack([scales[n]["gamma"] for n in names])
        w_hat = stacked_map(functools.partial(scaled_reconstruction, truncation=truncation), in_axes=(0, 0, 0, 0, None))(
            w, s, rho, gamma, ranks[names[0]])
        for j, n in enumerate(names):
            new[n] = {**block[n], "w": w_hat[j]}
    return new


def layer_loss(scales: dict, block: Params, whitening: dict, grams: dict, ranks: dict[str, int | None],
               truncation: str = "svd") -> jax.Array:
    """Σ over the block's low-rank projections of the relative activation loss `tr(ΔG Δᵀ) / tr(W G Wᵀ)`, `Δ = W − Ŵ`.

    `grams: {tap: [in, in]}` are the Gram matrices of the projections' inputs
    (`modeling.PROJECTION_INPUT`): the loss needs no tokens, only their second moments.
    """
    approx = reconstruct_block(block, whitening, scales, ranks, truncation)
    total = 0.0
    for n in low_rank_names(ranks):
        w, g = block[n]["w"], grams[PROJECTION_INPUT[n]].astype(block[n]["w"].dtype)
        total = total + relative_activation_loss(w, approx[n]["w"], g)
    return total


def block_loss(
    scales: dict, block: Params, whitening: dict, x: jax.Array, target: jax.Array, cfg: ModelConfig,
    ranks: dict[str, int | None], truncation: str = "svd",
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


@functools.partial(jax.jit, static_argnames=("cfg", "ranks", "kind", "steps", "lr", "batch_windows", "eval_every",
                                             "truncation", "min_gain"))
def learn_block_scales(
    block: Params,
    whitening: dict,
    train: Any,
    hold: Any,
    key: jax.Array,
    *,
    cfg: ModelConfig,
    ranks: tuple[tuple[str, int], ...],
    kind: str = "block",
    steps: int = 200,
    lr: float = 3e-2,
    batch_windows: int = 8,
    eval_every: int = 10,
    truncation: str = "svd",
    min_gain: float = 0.0,
) -> tuple[dict, dict[str, Any]]:
    """Learn ρ, γ of all seven projections of a block jointly; a pure, jit-compiled function.

    Args:
      block: dense block params (`w: [out, in]` per projection).
      whitening: `{projection: S [in, in]}`, lower-triangular with `S Sᵀ = G`.
      train, hold: the data of the loss. `kind="block"`: `(x, y)`, the block's inputs
        and original outputs `[N, T, D]`; each step uses `batch_windows` of the N
        training windows, drawn without replacement with `key`. `kind="layer"`:
        `{tap: gram [in, in]}` (see `layer_loss`).
      key: PRNG key of the minibatches (unused by `layer`, which needs no sampling).
      ranks: `((projection, rank), ...)` (a tuple, so it can be static); projections not listed, or
        with rank None, stay dense and get no scales.
      eval_every: the held-out loss is measured at step 0, every `eval_every` steps and at the end.
      min_gain: early stopping (0: off). From the second measurement on, learning stops when
        the last `eval_every` steps lowered the held-out loss by less than `min_gain` times
        its total drop so far; the remaining steps are skipped (`lax.cond`), the learning
        rate schedule still spans `steps`, so what is learned up to the stop is exactly
        what a full run learns by then.
    Returns:
      the scales of the best held-out step (step 0 = SVD-LLM included, so never worse
      than the initialization there), and a trace `{"train": [steps], "hold": [steps + 1]
      (NaN where not measured or skipped), "best_step": int, "steps_run": int}`.
    """
    rank_map = {n: k for n, k in ranks if k is not None}
    if kind == "block":
        n_train = train[0].shape[0]
        take = min(batch_windows, n_train)

        def train_loss(scales, k):
            idx = jax.random.choice(k, n_train, (take,), replace=False) if take < n_train else jnp.arange(n_train)
            return block_loss(scales, block, whitening, train[0][idx], train[1][idx], cfg, rank_map, truncation)

        def hold_loss(scales):
            return block_loss(scales, block, whitening, hold[0], hold[1], cfg, rank_map, truncation)
    elif kind == "layer":

        def train_loss(scales, k):
            return layer_loss(scales, block, whitening, train, rank_map, truncation)

        def hold_loss(scales):
            return layer_loss(scales, block, whitening, hold, rank_map, truncation)
    else:
        raise ValueError(f"unknown SigmaScale loss {kind!r}; known: {', '.join(LOSS_KINDS)}")

    opt = optax.adam(optax.cosine_decay_schedule(lr, max(steps, 1)))
    init = zero_scales(block, low_rank_names(rank_map))
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


@functools.partial(jax.jit, static_argnames="rank")
def _final_factors(w, s, rho, gamma, gram, *, rank: int) -> dict:
    """The stored factors of learned scales and what compression.json says of them: `B`, `C`, the relative
    activation loss, the singular values of W, W S and the scaled matrix, and their entropies."""
    b, c, sig = scaled_factors(w, s, rho, gamma, rank)
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
    kind: str = "block",
    steps: int = 200,
    lr: float = 3e-2,
    holdout: float = 0.125,
    batch_windows: int = 8,
    eval_every: int = 10,
    key: jax.Array | None = None,
    batch_size: int = 8,
    mesh: Any = None,
    truncation: str = "svd",
    min_gain: float = 0.0,
    precision: str = "float64",
) -> tuple[Params, dict[str, Any]]:
    """Factor a dense block with SigmaScale (the block loss's windows split over `mesh`'s data axis, if given).

    `xs, ys: [N, T, D]` are the block's calibration inputs and original outputs, `stats`
    their `stats.block_stats`; the last `max(1, round(holdout · N))` windows are held out
    to pick the step; `key` draws the minibatches (default `jax.random.key(0)`). Whitening comes from all N windows (so step 0 is exactly SVD-LLM's
    factors), in `precision` (float64 or float32); learning runs in float32 (`batch_windows` windows per step for
    the `block` loss, the training windows' Gram matrices for `layer`); the final factors
    are computed in `precision` from the learned scales. `info["_spectra"]` holds the singular
    values of W, of W S and of the learned scaled matrix, `{"<projection>.<w|whitened|scaled>": [r]}`.
    """
    import numpy as np

    from sigmascale_jax.compress.stats import block_stats

    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown SigmaScale loss {kind!r}; known: {', '.join(LOSS_KINDS)}")
    n_hold = holdout_windows(len(xs), holdout)
    if n_hold >= len(xs):
        raise ValueError(f"need more than {n_hold} calibration windows to hold {n_hold} out")
    names = low_rank_names(ranks)
    dense_info = {
        n: {"shape": list(block[n]["w"].shape), "rank": min(block[n]["w"].shape), "dense": True, "rel_loss": 0.0,
            "whitening": None}
        for n in PROJECTIONS if n not in names
    }
    if not names:  # every projection kept dense: nothing to learn
        return dict(block), dict(dense_info)
    whitenings, routes = {}, {}
    with factor_precision(precision) as dtype:
        for tap in {PROJECTION_INPUT[n] for n in names}:
            s, route = _triangular_whitening_jit(jnp.asarray(stats[tap]["gram"], dtype))
            whitenings[tap], routes[tap] = np.asarray(s), int(route)
    white32 = {n: jnp.asarray(whitenings[PROJECTION_INPUT[n]], jnp.float32) for n in names}
    from sigmascale_jax.parallel import fetch, on_device, shard

    host_block, block, white32 = block, on_device(block, mesh), on_device(white32, mesh)
    if kind == "block":
        xs, ys = np.asarray(xs), np.asarray(ys)
        train = (shard(xs[:-n_hold], mesh), shard(ys[:-n_hold], mesh))
        hold_data = (shard(xs[-n_hold:], mesh), shard(ys[-n_hold:], mesh))
    else:
        # Gram matrices per token (float32-friendly); training = all windows minus the held-out ones.
        _, held = block_stats(block, np.asarray(xs[-n_hold:]), cfg, batch_size, mesh, outputs=False)
        n_train_tokens = (len(xs) - n_hold) * xs.shape[1]
        train = {t: jnp.asarray((stats[t]["gram"] - held[t]["gram"]) / n_train_tokens, jnp.float32) for t in held}
        hold_data = {t: jnp.asarray(held[t]["gram"] / held[t]["tokens"], jnp.float32) for t in held}
    key = on_device(jax.random.key(0) if key is None else key, mesh)
    t0 = time.perf_counter()
    with jax.transfer_guard("disallow"):  # the learning loop is one compiled scan over data already on the device
        scales, trace = learn_block_scales(
            block, white32, train, hold_data, key,
            cfg=cfg, ranks=tuple(sorted(ranks.items())), kind=kind, steps=steps, lr=lr,
            batch_windows=batch_windows, eval_every=eval_every, truncation=truncation, min_gain=min_gain,
        )
        scales, trace = fetch((scales, trace))  # whole on every process's host
    learn_s = time.perf_counter() - t0  # compilation included when this block's shapes are new
    block = host_block
    new = {k: v for k, v in block.items() if k not in PROJECTIONS}
    info: dict[str, Any] = {}
    all_spectra: dict[str, np.ndarray] = {}
    hold = np.asarray(trace["hold"])
    with factor_precision(precision) as dtype:
        for n in names:
            as_dtype = lambda x: jnp.asarray(np.asarray(x), dtype)  # noqa: E731
            f = jax.device_get(_final_factors(
                as_dtype(block[n]["w"]), as_dtype(whitenings[PROJECTION_INPUT[n]]), as_dtype(scales[n]["rho"]),
                as_dtype(scales[n]["gamma"]), as_dtype(stats[PROJECTION_INPUT[n]]["gram"]), rank=ranks[n]))
            if not (np.isfinite(f["b"]).all() and np.isfinite(f["c"]).all()):
                raise FloatingPointError(f"non-finite SigmaScale factors for projection {n} (rank {ranks[n]})")
            p = {"b": jnp.asarray(f["b"], block[n]["w"].dtype), "c": jnp.asarray(f["c"], block[n]["w"].dtype)}
            if "bias" in block[n]:
                p["bias"] = block[n]["bias"]
            new[n] = p
            info[n] = {
                "shape": list(block[n]["w"].shape),
                "rank": ranks[n],
                "dense": False,
                "rel_loss": float(f["rel_loss"]),
                "whitening": WHITEN_NAMES[routes[PROJECTION_INPUT[n]]],
                **{f"entropy_{k}": float(f["entropy"][k]) for k in ("w", "whitened", "scaled")},
            }
            all_spectra.update({f"{n}.{k}": np.asarray(v, np.float32) for k, v in f["spectra"].items()})
    for n in dense_info:
        new[n], info[n] = block[n], dense_info[n]
    info = {n: info[n] for n in PROJECTIONS}
    train_trace = np.asarray(trace["train"])
    steps_run = int(trace["steps_run"])
    measured = np.flatnonzero(np.isfinite(hold))
    info["_block"] = {
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
    info["_spectra"] = all_spectra  # not JSON: the pipeline stores it in spectra.npz
    return new, info


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
