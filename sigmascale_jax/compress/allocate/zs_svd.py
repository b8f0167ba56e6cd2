"""ZS-SVD (Abbasi et al. 2026): global singular-component selection that keeps the predicted loss change near zero.

Per matrix (METHODS.md; official code github.com/mint-vu/Zero-Sum-SVD,
`compression/importance.py`, `compression/planning.py`, `utils/correction_utils.py`):

    L = cholesky(G/T + 1e-4 I)          (eigen fallback), from the dense model's inputs
    W L = Σ σ_i u_i v_iᵀ                 H = (∂𝓛/∂W) L⁻ᵀ,  g_i = u_iᵀ H v_i
    Δ_i = −σ_i g_i                       first-order change of 𝓛 when component i is dropped

with 𝓛 the next-token cross-entropy on calibration windows. Then `zero_sum_select`:
each matrix offers its smallest remaining σ; while the budget is not met, take the
offered component whose Δ pulls the running sum of Δ back toward zero (a Δ ≥ 0 when
the sum is ≤ 0, a negative one otherwise; smallest |Δ| first). A matrix counts as
dense until its stored factors would be smaller than the dense matrix; a matrix
planned above that break-even rank is kept dense.
"""

from __future__ import annotations

import dataclasses
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import solve_triangular

from sigmascale_jax.compress.grads import model_grads
from sigmascale_jax.compress.plan import ALLOCATORS, Allocation, Budget, ModelContext, RankAllocator, RunSpec, register
from sigmascale_jax.compress.settings import Settings, setting
from sigmascale_jax.errors import UserError
from sigmascale_jax.linalg.precision import factor_precision, precision_key
from sigmascale_jax.model.modeling import PROJECTION_INPUT, PROJECTIONS

COVARIANCE_JITTER = 1e-4  # added to G/T before the Cholesky, as the official code does
DEFAULT_GRAD_SAMPLES = 16


# ------------------------------------------------------------------ per matrix: whitening and Δ


def zs_whitening(gram: jax.Array, tokens: int) -> tuple[jax.Array, jax.Array]:
    """`L` with `L Lᵀ = G/T + 1e-4 I` (`gram: [n, n]`), and whether it is the Cholesky factor (else `Q diag(√λ)`).

    The eigen fallback clamps eigenvalues at 1e-4, as the official code does. Pure; jit-able.
    """
    n = gram.shape[-1]
    cov = gram / tokens
    cov = 0.5 * (cov + cov.T) + COVARIANCE_JITTER * jnp.eye(n, dtype=gram.dtype)
    chol = jnp.linalg.cholesky(cov)
    ok = jnp.isfinite(chol).all()

    def eigen(_):
        lam, q = jnp.linalg.eigh(cov)
        return q * jnp.sqrt(jnp.maximum(lam, COVARIANCE_JITTER))[None, :]

    return jax.lax.cond(ok, lambda _: chol, eigen, None), ok


def component_deltas(w: jax.Array, grad: jax.Array, l: jax.Array, triangular: bool = True) -> tuple[jax.Array, jax.Array]:
    """`(σ, Δ)`, each `[min(m, n)]`, σ descending: singular values of `W L` and `Δ_i = −σ_i u_iᵀ (∂𝓛/∂W) L⁻ᵀ v_i`.

    `w, grad: [m, n]`, `l: [n, n]` (lower-triangular when `triangular`). Pure; jit-able.
    """
    u, sigma, vt = jnp.linalg.svd(w @ l, full_matrices=False)
    if triangular:
        h = solve_triangular(l, grad.T, lower=True).T  # G L⁻ᵀ = (L⁻¹ Gᵀ)ᵀ
    else:
        h = jnp.linalg.solve(l, grad.T).T
    g = jnp.sum((u.T @ h) * vt, axis=1)  # diag(Uᵀ H V)
    return sigma, -sigma * g


# ------------------------------------------------------------------ the zero-sum selection


class ZeroSumResult(NamedTuple):
    ranks: jax.Array  # [M] rank of each matrix after the selection
    running_sum: jax.Array  # Σ Δ of the dropped components
    removed: jax.Array  # numbers removed: Σ costs[j, full_j] − costs[j, rank_j]
    steps: jax.Array  # components dropped
    order: jax.Array  # [M·R] matrix index dropped at each step, −1 after the last


def zero_sum_select(deltas: jax.Array, costs: jax.Array, budget, min_rank=1) -> ZeroSumResult:
    """The zero-sum rule over M matrices; pure and jit-able.

    Args:
      deltas: `[M, R]`, row j holding matrix j's Δ in order of descending σ; its first
        `full_j` entries are finite, the rest NaN (padding).
      costs: `[M, R + 1]` numbers matrix j stores at rank k (`min(m·n, count(m, n, k))`,
        so a matrix above its break-even rank counts as dense).
      budget: numbers to remove in all; selection stops once `removed ≥ budget`.
      min_rank: scalar or `[M]`: no matrix goes below it (the official `keep_rank_ratio` floor).
    Each step, every matrix above its floor offers its smallest remaining component;
    when the running sum of Δ is ≤ 0 the offer with Δ ≥ 0 and the smallest |Δ| is taken
    (else the one with Δ < 0 and the smallest |Δ|), falling back to the other sign when
    none is offered. Counts are integers: call under `jax.enable_x64` when the model
    has more than 2³¹ parameters.
    """
    deltas = jnp.asarray(deltas)
    costs = jnp.asarray(costs)
    m, r = deltas.shape
    rows = jnp.arange(m)
    full = jnp.sum(jnp.isfinite(deltas), axis=1)
    floor = jnp.broadcast_to(jnp.asarray(min_rank, full.dtype), (m,))
    budget = jnp.asarray(budget, costs.dtype)
    zero = jnp.zeros((), deltas.dtype)

    def cond(state):
        rank, _, removed, _, _ = state
        return (removed < budget) & jnp.any(rank > floor)

    def body(state):
        rank, total, removed, step, order = state
        cand = deltas[rows, jnp.maximum(rank - 1, 0)]
        avail = rank > floor
        pos, neg = avail & (cand >= 0), avail & (cand < 0)
        prefer_pos = total <= 0
        first = jnp.where(prefer_pos, pos, neg)
        pool = jnp.where(jnp.any(first), first, jnp.where(prefer_pos, neg, pos))
        j = jnp.argmin(jnp.where(pool, jnp.abs(cand), jnp.inf))
        saved = costs[j, rank[j]] - costs[j, rank[j] - 1]
        return rank.at[j].add(-1), total + cand[j], removed + saved, step + 1, order.at[step].set(j)

    init = (full, zero, jnp.zeros((), costs.dtype), jnp.zeros((), full.dtype), jnp.full((m * r,), -1, full.dtype))
    rank, total, removed, steps, order = jax.lax.while_loop(cond, body, init)
    return ZeroSumResult(rank, total, removed, steps, order)


# ------------------------------------------------------------------ the allocator


@dataclasses.dataclass(frozen=True)
class ZsSvdSettings(Settings):
    grad_samples: int | None = setting(
        None, f"zs-svd / correction: calibration windows the loss gradient averages over (default: the first "
        f"{DEFAULT_GRAD_SAMPLES}, or all if fewer)", min=1)
    min_rank_ratio: float = setting(
        0.0, "zs-svd: no matrix below this fraction of its break-even rank (the official keep_rank_ratio; rank >= 1)",
        min=0.0, max=1.0)


def grad_windows(spec: RunSpec, grad_samples: int | None) -> int:
    """How many calibration windows a gradient uses (checked against --nsamples)."""
    if grad_samples is None:
        return min(DEFAULT_GRAD_SAMPLES, spec.nsamples)
    if grad_samples > spec.nsamples:
        raise UserError(f"--grad-samples {grad_samples} exceeds --nsamples {spec.nsamples}; lower it or raise --nsamples")
    return grad_samples


_select_jit = jax.jit(zero_sum_select)
_whitening_jit = jax.jit(zs_whitening)  # `tokens` traced: one program per Gram shape


@jax.jit
def _block_deltas(ws: dict, grads: dict, grams: dict, tokens: jax.Array) -> dict:
    """`{projection: (σ, Δ)}` of one block: every tap's whitening and every projection's Δ in one program (the same
    for every block of a model), the Cholesky route or its eigen fallback chosen by `lax.cond`."""
    whitening = {tap: zs_whitening(g, tokens) for tap, g in grams.items()}
    out = {}
    for n, w in ws.items():
        l, chol_ok = whitening[PROJECTION_INPUT[n]]
        out[n] = jax.lax.cond(chol_ok, lambda w, g, l: component_deltas(w, g, l, True),
                              lambda w, g, l: component_deltas(w, g, l, False), w, grads[n], l)
    return out


def block_deltas(block, stats, grads, dtype=jnp.float64) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """`{projection: (σ, Δ)}` of one dense block from its input statistics and loss gradients, in `dtype` (float64:
    call inside `linalg.precision.factor_precision`)."""
    taps = dict.fromkeys(PROJECTION_INPUT[n] for n in PROJECTIONS)
    grams = {tap: np.asarray(stats[tap]["gram"], dtype) for tap in taps}
    tokens = {int(stats[tap]["tokens"]) for tap in taps}
    if len(tokens) != 1:
        raise ValueError(f"the block's taps were measured on different token counts: {sorted(tokens)}")
    out = jax.device_get(_block_deltas({n: np.asarray(block[n]["w"], dtype) for n in PROJECTIONS},
                                       {n: np.asarray(grads[n], dtype) for n in PROJECTIONS}, grams,
                                       np.asarray(tokens.pop(), dtype)))
    for n, (sigma, delta) in out.items():
        if not (np.isfinite(sigma).all() and np.isfinite(delta).all()):
            raise FloatingPointError(f"non-finite ZS-SVD sensitivities for projection {n}")
    return out


def selection_inputs(shapes: list[tuple[int, int]], deltas: list[np.ndarray], budget: Budget):
    """`(deltas [M, R] NaN-padded, costs [M, R + 1], numbers to remove)` for `zero_sum_select`."""
    r = max(min(s) for s in shapes)
    d = np.full((len(shapes), r), np.nan)
    c = np.zeros((len(shapes), r + 1), np.int64)
    for j, ((m, n), delta) in enumerate(zip(shapes, deltas)):
        d[j, : len(delta)] = delta
        c[j] = [budget.stored(m, n, k) for k in range(r + 1)]
    dense = sum(m * n for m, n in shapes)
    return d, c, dense - budget.limit(shapes)


def model_deltas(ctx: ModelContext, n_grad: int) -> dict:
    """Δ of every component of every projection, in block-major order (JSON-able, for the cache).

    `{"calibration_loss", "shapes": [[m, n]...], "deltas": [[Δ_i in σ order]...], "seconds"}`: the
    gradient of the calibration loss on the first `n_grad` windows (block by block), then
    the dense model's input statistics and Δ per block.
    """
    from tqdm.auto import tqdm

    from sigmascale_jax.compress.stats import block_stats

    cfg, spec = ctx.cfg, ctx.spec
    t0 = time.perf_counter()
    loss, grads = model_grads(ctx.outer, ctx.load_block, ctx.windows[:n_grad], cfg,
                              batch_size=spec.batch_size, progress=ctx.progress)
    t1 = time.perf_counter()
    xs = np.asarray(ctx.outer["embed"])[ctx.windows]
    shapes, deltas = [], []
    for i in tqdm(range(cfg.num_layers), desc="zs-svd sensitivities", unit="block", disable=not ctx.progress,
                  leave=False):
        block = ctx.load_block(i)
        ys, stats = block_stats(block, xs, cfg, spec.batch_size, ctx.mesh)
        with factor_precision(spec.precision) as dtype:
            per = block_deltas(block, stats, grads[i], dtype)
        grads[i] = None
        for n in PROJECTIONS:
            shapes.append(list(block[n]["w"].shape))
            deltas.append(per[n][1].astype(np.float64).tolist())  # float64 → JSON floats round-trip exactly
        xs = ys
    return {"calibration_loss": loss, "shapes": shapes, "deltas": deltas,
            "seconds": {"gradient": round(t1 - t0, 3), "sensitivities": round(time.perf_counter() - t1, 3)}}


def memory(cfg, spec: RunSpec, n_grad: int) -> tuple[int, int, str]:
    """(device bytes, host bytes, note) of ZS-SVD's passes, from the config alone: the gradient pass holds one
    block and a chunk of windows on the device (its heaviest compiled function: the head's or a block's VJP), and on
    the host every block's inputs on the gradient windows and every projection's gradient until its block's
    sensitivities are taken; the sensitivities whiten and decompose one matrix at a time in the run's precision."""
    from sigmascale_jax.compress.grads import _block_vjp, _head_vjp
    from sigmascale_jax.compress.memory import GiB, abstract_block, abstract_outer, compiled_peak, nbytes

    b, t, d = min(spec.batch_size, n_grad), spec.seq_len, cfg.hidden_size
    x = jax.ShapeDtypeStruct((b, t, d), jnp.float32)
    block = abstract_block(cfg)
    vjp = max(compiled_peak(_head_vjp, abstract_outer(cfg), x, jax.ShapeDtypeStruct((b, t), jnp.int32),
                            jax.ShapeDtypeStruct((), jnp.float32), cfg=cfg),
              compiled_peak(_block_vjp, block, x, x, cfg=cfg))
    with factor_precision(spec.precision) as dtype:
        shapes = cfg.projection_shapes()
        taps = {PROJECTION_INPUT[p]: shapes[p][1] for p in PROJECTIONS}
        deltas = compiled_peak(_block_deltas, {p: jax.ShapeDtypeStruct(shapes[p], dtype) for p in PROJECTIONS},
                               {p: jax.ShapeDtypeStruct(shapes[p], dtype) for p in PROJECTIONS},
                               {t: jax.ShapeDtypeStruct((k, k), dtype) for t, k in taps.items()},
                               jax.ShapeDtypeStruct((), dtype))
    inputs = cfg.num_layers * n_grad * t * d * 4
    grads = cfg.num_layers * sum(m * n for m, n in cfg.projection_shapes().values()) * 4
    device = max(vjp + 2 * n_grad * t * d * 4, deltas)
    return device, inputs + grads + nbytes(abstract_outer(cfg)), (
        f"gradient on {n_grad} windows: {vjp / GiB:.2f} GiB compiled; host: every block's inputs "
        f"({inputs / GiB:.1f} GiB) and every projection's gradient ({grads / GiB:.1f} GiB)")


@register(ALLOCATORS, "zs-svd", ZsSvdSettings, "ZS-SVD: global zero-sum selection of singular components")
def zs_svd(grad_samples: int | None = None, min_rank_ratio: float = 0.0) -> RankAllocator:
    settings = ZsSvdSettings(grad_samples=grad_samples, min_rank_ratio=min_rank_ratio)

    def check(spec: RunSpec, cfg) -> None:
        grad_windows(spec, settings.grad_samples)

    def allocate(ctx: ModelContext, budget: Budget) -> Allocation:
        from sigmascale_jax.compress.ranks import break_even_rank
        from sigmascale_jax.io.diskcache import cached

        cfg, spec = ctx.cfg, ctx.spec
        n_grad = grad_windows(spec, settings.grad_samples)
        # Δ does not depend on the ratio or the encoding: cached apart, so another ratio costs only the selection
        key = {"model": ctx.model_key, "calib_sha1": ctx.calib_sha1, "grad_samples": n_grad,
               "batch_size": spec.batch_size, **precision_key(spec.precision)}
        sens, hit = cached("zs-svd-deltas", key, lambda: model_deltas(ctx, n_grad))
        t2 = time.perf_counter()
        keys = [(i, n) for i in range(cfg.num_layers) for n in PROJECTIONS]
        shapes = [tuple(s) for s in sens["shapes"]]
        deltas = [np.asarray(d, np.float64) for d in sens["deltas"]]
        loss = sens["calibration_loss"]
        d, c, to_remove = selection_inputs(shapes, deltas, budget)
        floors = np.array([max(1, int(np.ceil(settings.min_rank_ratio * break_even_rank(m, n)))) for m, n in shapes])
        with jax.enable_x64(True):
            res = jax.device_get(_select_jit(d, c, to_remove, floors))
        if int(res.removed) < int(to_remove):  # every matrix at its floor and the budget still not met
            raise UserError(f"--ratio {budget.ratio} cannot be met with every matrix at its --min-rank-ratio floor "
                            f"{settings.min_rank_ratio} (rank >= 1); use a smaller --ratio or --min-rank-ratio")
        ranks = [dict.fromkeys(PROJECTIONS) for _ in range(cfg.num_layers)]
        dense_kept = 0
        for j, (i, n) in enumerate(keys):
            k = int(res.ranks[j])
            if c[j, k] >= c[j, min(shapes[j])]:  # planned above break-even: stays dense
                ranks[i][n] = None
                dense_kept += 1
            else:
                ranks[i][n] = k
        info = {
            "grad_samples": n_grad,
            "calibration_loss": loss,
            "components_dropped": int(res.steps),
            "predicted_loss_change": float(res.running_sum),
            "removed": int(res.removed),
            "to_remove": int(to_remove),
            "matrices_dense": dense_kept,
            "deltas_from_cache": hit,
            "seconds": {**sens["seconds"], "selection": round(time.perf_counter() - t2, 3)},
        }
        return Allocation(ranks, info)

    return RankAllocator("zs-svd", settings, allocate, check,
                         memory=lambda cfg, spec: memory(cfg, spec, grad_windows(spec, settings.grad_samples)))
