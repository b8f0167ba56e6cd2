"""FermiGrad (arXiv 2512.03062): each matrix's rank as a continuous variable, learned on the model's loss.

Per matrix ℓ, in its whitened SVD basis `W L = Σ σ_i u_i v_iᵀ` (L from the dense
model's inputs, `G/T + 1e-4 I` as in ZS-SVD), component i is kept with weight

    f_i = 1 / (1 + exp((i − μ_ℓ) / T))          (a Fermi function; i = 0, 1, ...)
    Ŵ_ℓ = Σ_i f_i σ_i u_i v_iᵀ L⁻¹

so `f_i > ½` for `i < μ_ℓ`. All μ_ℓ learn jointly by Adam (optax) on the model's
next-token cross-entropy on calibration windows (a few random windows per step)
plus `λ (S/B − 1)²`, where `S = Σ_ℓ (m_ℓ + n_ℓ) Σ_i f_i` is the soft number of
stored parameters (the encoding's count of each soft rank `Σ_i f_i`) and B the budget; T anneals geometrically from `--fermi-t0` to
`--fermi-t1`. The first `min(8, N/4)` calibration windows are held out: the
cross-entropy of the hard-truncated model on them, at the starting and at the
learned ranks, is recorded. Learning is one jit-compiled pure function (`learn_mu`: `lax.scan`
over steps, blocks mapped with `lax.scan` too); progress is reported through
`jax.debug.callback`.

Rounding rule (budget met exactly): a component's score is `μ_ℓ − i`; one global
threshold θ keeps every component scoring above it, so each matrix keeps a prefix,
`k_ℓ = clip(ceil(μ_ℓ − θ), 1, r_ℓ)`, and θ is the lowest value at which the stored
numbers fit the budget (a matrix whose k passes its break-even rank is kept dense).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sigmascale_jax.compress.grads import _head_nll_sum
from sigmascale_jax.compress.plan import ALLOCATORS, Allocation, Budget, ModelContext, RankAllocator, RunSpec, register
from sigmascale_jax.compress.ranks import block_ranks, factored_params
from sigmascale_jax.compress.settings import Settings, setting
from sigmascale_jax.errors import UserError
from sigmascale_jax.linalg.precision import factor_precision
from sigmascale_jax.model.config import ModelConfig
from sigmascale_jax.model.modeling import PROJECTION_INPUT, PROJECTIONS, block_forward, rope_cos_sin

# ------------------------------------------------------------------ pure pieces


def fermi_weights(mu: jax.Array, size: int, temperature) -> jax.Array:
    """`f [..., size]`: `1 / (1 + exp((i − μ) / T))` for `μ [...]`; differentiable in μ (and T)."""
    i = jnp.arange(size, dtype=mu.dtype)
    return jax.nn.sigmoid((mu[..., None] - i) / temperature)


def soft_count(mu: dict, shapes: dict, temperature, count: Callable = factored_params) -> jax.Array:
    """Soft stored numbers `Σ count(m, n, Σ_i f_i)` over projections and blocks: `mu[p]: [L]`, `shapes[p] = (m, n)`.

    `count` is the encoding's (k(m+n) for plain factors, k(m+n) − k² for PivGa), applied to
    the soft rank `Σ_i f_i`, which it takes as an array.
    """
    return sum(jnp.sum(count(*shapes[p], jnp.sum(fermi_weights(mu[p], min(shapes[p]), temperature), axis=-1)))
               for p in mu)


def round_ranks(mu: np.ndarray, sizes: np.ndarray, stored: Callable[[int, int], int], limit: int) -> np.ndarray:
    """Integer ranks from continuous μ (`[M]`) by one global threshold on the scores `μ_j − i` (module docstring).

    `stored(j, k)`: numbers matrix j stores at rank k (non-decreasing in k). Returns `k [M]`
    with `Σ stored(j, k_j) ≤ limit` and no component with a higher score left out.
    """
    mu, sizes = np.asarray(mu, np.float64), np.asarray(sizes)

    def ranks_at(theta: float) -> np.ndarray:
        return np.clip(np.ceil(mu - theta), 1, sizes).astype(int)

    def total(theta: float) -> int:
        return sum(stored(j, int(k)) for j, k in enumerate(ranks_at(theta)))

    # candidate thresholds: where some k changes, i.e. theta = mu_j - i for integer i
    scores = np.unique(np.concatenate([mu[j] - np.arange(sizes[j]) for j in range(len(mu))]))
    if total(scores[-1]) > limit:  # every matrix at rank 1 and still over
        raise UserError("--ranks fermigrad cannot meet the budget even at rank 1 everywhere; use a smaller --ratio")
    lo, hi = 0, len(scores) - 1  # total(scores[hi]) <= limit; find the smallest index that fits
    while lo < hi:
        mid = (lo + hi) // 2
        if total(scores[mid]) <= limit:
            hi = mid
        else:
            lo = mid + 1
    return ranks_at(scores[lo])


class FermiModel(NamedTuple):
    """The model in the learning's form: each projection p of every block as `A [L, m, r]`, `B [L, r, n]`,
    `Ŵ = A diag(f) B` with `A = U Σ`, `B = Vᵀ L⁻¹`; the rest of each block stacked as is."""

    factors: dict  # p -> {"a": [L, m, r], "b": [L, r, n]} (+ "bias": [L, m])
    rest: dict  # norms, stacked over blocks
    outer: dict  # embed, final_norm, lm_head


def _model_loss(mu: dict, model: FermiModel, tokens: jax.Array, temperature, cfg: ModelConfig) -> jax.Array:
    """Mean next-token cross-entropy of `tokens: [B, T]` with every projection replaced by its Fermi-weighted Ŵ."""
    cos, sin = rope_cos_sin(cfg, jnp.arange(tokens.shape[1]))

    def body(x, per_block):
        fac, rest, mu_b = per_block
        block = dict(rest)
        for p, f in fac.items():
            weights = fermi_weights(mu_b[p], f["a"].shape[-1], temperature)
            block[p] = {"b": f["a"] * weights[None, :], "c": f["b"], **({"bias": f["bias"]} if "bias" in f else {})}
        return block_forward(block, x, cfg, cos, sin), None

    x = model.outer["embed"][tokens]
    x, _ = jax.lax.scan(body, x, (model.factors, model.rest, mu))
    return _head_nll_sum(model.outer, x, tokens, cfg) / (tokens.shape[0] * (tokens.shape[1] - 1))


@functools.partial(jax.jit, static_argnames="cfg")
def hard_loss(ranks: dict, model: FermiModel, tokens: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Mean cross-entropy with every projection truncated to integer `ranks` (`{projection: [L]}`): no soft weights."""
    mu = {p: jnp.asarray(k, jnp.float32) - 0.5 for p, k in ranks.items()}
    return _model_loss(mu, model, tokens, 1e-3, cfg)  # at T = 1e-3 the weights are 0 or 1 to float32 precision


@functools.partial(jax.jit, static_argnames=("cfg", "steps", "step_windows", "callback", "count"))
def learn_mu(
    mu0: dict, model: FermiModel, windows: jax.Array, key: jax.Array, budget: jax.Array, *, cfg: ModelConfig,
    steps: int, step_windows: int, lr: float, penalty: float, t0: float, t1: float,
    callback: Callable | None = None, count: Callable = factored_params,
) -> tuple[dict, dict]:
    """Learn μ (`{projection: [L]}`) from `mu0`; a pure, jit-compiled function.

    Each step draws `step_windows` of `windows: [N, T]` without replacement (from `key`),
    takes an Adam step on `CE + penalty·(S/budget − 1)²` at temperature
    `t0·(t1/t0)^(step/(steps−1))`, and keeps every μ within `[0.5, r − 0.5]`.
    `callback(step, loss, soft_ratio)`, if given, is called on the host each step.
    Returns μ after the last step and the trace `{"loss", "soft_ratio", "temperature"}` per step.
    """
    sizes = {p: model.factors[p]["a"].shape[-1] for p in mu0}
    shapes = {p: (model.factors[p]["a"].shape[1], model.factors[p]["b"].shape[-1]) for p in mu0}
    opt = optax.adam(lr)
    n = windows.shape[0]
    take = min(step_windows, n)

    def objective(mu, tokens, temperature):
        ce = _model_loss(mu, model, tokens, temperature, cfg)
        ratio = soft_count(mu, shapes, temperature, count) / budget
        return ce + penalty * (ratio - 1.0) ** 2, (ce, ratio)

    def step(carry, i):
        mu, state = carry
        frac = i / max(steps - 1, 1)
        temperature = t0 * (t1 / t0) ** frac
        idx = jax.random.choice(jax.random.fold_in(key, i), n, (take,), replace=False)
        (_, (ce, ratio)), grads = jax.value_and_grad(objective, has_aux=True)(mu, windows[idx], temperature)
        updates, state = opt.update(grads, state, mu)
        mu = optax.apply_updates(mu, updates)
        mu = {p: jnp.clip(m, 0.5, sizes[p] - 0.5) for p, m in mu.items()}
        if callback is not None:
            jax.debug.callback(callback, i, ce, ratio)
        return (mu, state), {"loss": ce, "soft_ratio": ratio, "temperature": temperature}

    (mu, _), trace = jax.lax.scan(step, (mu0, opt.init(mu0)), jnp.arange(steps))
    return mu, trace


# ------------------------------------------------------------------ building the model's Fermi form


def fermi_model(ctx: ModelContext) -> FermiModel:
    """Whitened SVD of every projection of the dense model (in the run's precision), stacked over blocks (float32)."""
    from tqdm.auto import tqdm

    from sigmascale_jax.compress.allocate.zs_svd import _whitening_jit
    from sigmascale_jax.compress.stats import block_stats

    cfg, spec = ctx.cfg, ctx.spec
    xs = np.asarray(ctx.outer["embed"])[ctx.windows]
    factors = {p: {"a": [], "b": []} for p in PROJECTIONS}
    rest = []
    for i in tqdm(range(cfg.num_layers), desc="fermigrad: whitened SVDs", unit="block", disable=not ctx.progress,
                  leave=False):
        block = ctx.load_block(i)
        ys, stats = block_stats(block, xs, cfg, spec.batch_size, ctx.mesh)
        with factor_precision(spec.precision) as dtype:
            whiten = {}
            for tap in {PROJECTION_INPUT[n] for n in PROJECTIONS}:
                l, _ = _whitening_jit(np.asarray(stats[tap]["gram"], dtype), np.asarray(stats[tap]["tokens"], dtype))
                whiten[tap] = np.asarray(l)
            for p in PROJECTIONS:
                w = np.asarray(block[p]["w"], dtype)
                l = whiten[PROJECTION_INPUT[p]]
                u, s, vt = np.linalg.svd(w @ l, full_matrices=False)
                factors[p]["a"].append((u * s).astype(np.float32))
                factors[p]["b"].append(np.linalg.solve(l.T, vt.T).T.astype(np.float32))  # Vᵀ L⁻¹
                if "bias" in block[p]:
                    factors[p].setdefault("bias", []).append(np.asarray(block[p]["bias"], np.float32))
        rest.append({k: np.asarray(v) for k, v in block.items() if k not in PROJECTIONS})
        xs = ys
    stack = lambda items: jnp.asarray(np.stack(items))  # noqa: E731
    return FermiModel({p: {k: stack(v) for k, v in f.items()} for p, f in factors.items()},
                      jax.tree.map(lambda *a: jnp.asarray(np.stack(a)), *rest), ctx.outer)


def memory(cfg: ModelConfig, spec, settings) -> tuple[int, int, str]:
    """(device bytes, host bytes, note) of FermiGrad's learning, from the config alone: the whole model in its Fermi
    form (`A [L, m, r]`, `B [L, r, n]` per projection, r = min(m, n)) is on the device for the compiled learning
    scan (`learn_mu`), and built on the host first."""
    from sigmascale_jax.compress.memory import GiB, abstract_block, abstract_outer, compiled_peak, nbytes

    f32, num = jnp.float32, cfg.num_layers
    sds = jax.ShapeDtypeStruct
    block = abstract_block(cfg)
    factors = {}
    for p, (m, n) in cfg.projection_shapes().items():
        r = min(m, n)
        factors[p] = {"a": sds((num, m, r), f32), "b": sds((num, r, n), f32)}
        if "bias" in block[p]:
            factors[p]["bias"] = sds((num, m), f32)
    rest = {k: sds((num, *v.shape), v.dtype) for k, v in block.items() if k not in PROJECTIONS}
    model = FermiModel(factors, rest, abstract_outer(cfg))
    n_probe = max(1, min(8, spec.nsamples // 4)) if spec.nsamples > 1 else 0
    device = compiled_peak(
        learn_mu, {p: sds((num,), f32) for p in PROJECTIONS}, model,
        sds((spec.nsamples - n_probe, spec.seq_len), jnp.int32), jax.eval_shape(jax.random.key, 0), sds((), f32),
        cfg=cfg, steps=settings.fermi_steps, step_windows=settings.fermi_windows, lr=settings.fermi_lr,
        penalty=settings.fermi_penalty, t0=settings.fermi_t0, t1=settings.fermi_t1)
    held = nbytes(model)
    acts = spec.nsamples * spec.seq_len * cfg.hidden_size * 4
    return device, held + 2 * acts, (f"the whole model in Fermi form ({held / GiB:.1f} GiB) and the learning scan "
                                     f"({settings.fermi_windows} window(s) a step)")


# ------------------------------------------------------------------ the allocator


def _uniform_start(ctx: ModelContext, budget: Budget) -> tuple[list[dict], dict]:
    return [block_ranks(ctx.cfg, budget.ratio) for _ in range(ctx.cfg.num_layers)], {}


def _zs_svd_start(ctx: ModelContext, budget: Budget) -> tuple[list[dict], dict]:
    from sigmascale_jax.compress.allocate.zs_svd import zs_svd

    start = zs_svd().allocate(ctx, budget)
    shapes = ctx.cfg.projection_shapes()
    ranks = [{p: (min(shapes[p]) if k is None else k) for p, k in r.items()} for r in start.ranks]
    return ranks, {k: v for k, v in start.info.items() if k != "seconds"}


# --fermi-init: (check against the run, the starting ranks (dense as full rank) and what their allocator recorded)
STARTS = {
    "uniform": (lambda spec, cfg: block_ranks(cfg, spec.ratio), _uniform_start),
    "zs-svd": (lambda spec, cfg: None, _zs_svd_start),
}


@dataclasses.dataclass(frozen=True)
class FermiGradSettings(Settings):
    fermi_steps: int = setting(150, "fermigrad: Adam steps on the ranks", min=1)
    fermi_windows: int = setting(1, "fermigrad: calibration windows per step", min=1)
    fermi_lr: float = setting(2.0, "fermigrad: Adam learning rate on μ (in ranks)", above=0.0)
    fermi_penalty: float = setting(1000.0, "fermigrad: weight λ of (soft count / budget − 1)²", above=0.0)
    fermi_t0: float = setting(8.0, "fermigrad: starting temperature (in ranks)", above=0.0)
    fermi_t1: float = setting(0.5, "fermigrad: final temperature (in ranks)", above=0.0)
    fermi_init: str = setting("uniform", "fermigrad: starting ranks", choices=tuple(STARTS))


@register(ALLOCATORS, "fermigrad", FermiGradSettings,
          "FermiGrad: continuous ranks (Fermi-function weights) learned on the model's calibration loss")
def fermigrad(fermi_steps: int = 150, fermi_windows: int = 1, fermi_lr: float = 2.0, fermi_penalty: float = 1000.0,
              fermi_t0: float = 8.0, fermi_t1: float = 0.5, fermi_init: str = "uniform") -> RankAllocator:
    settings = FermiGradSettings(fermi_steps=fermi_steps, fermi_windows=fermi_windows, fermi_lr=fermi_lr,
                                 fermi_penalty=fermi_penalty, fermi_t0=fermi_t0, fermi_t1=fermi_t1,
                                 fermi_init=fermi_init)

    def check(spec: RunSpec, cfg) -> None:
        trainable = spec.nsamples - (max(1, min(8, spec.nsamples // 4)) if spec.nsamples > 1 else 0)
        if settings.fermi_windows > trainable:
            raise UserError(f"--fermi-windows {settings.fermi_windows} exceeds the {trainable} calibration windows left "
                            f"to learn on (--nsamples {spec.nsamples}, some held out to measure the result)")
        STARTS[settings.fermi_init][0](spec, cfg)

    def allocate(ctx: ModelContext, budget: Budget) -> Allocation:
        from tqdm.auto import tqdm

        cfg = ctx.cfg
        shapes = cfg.projection_shapes()
        t0 = time.perf_counter()
        ranks0, start_info = STARTS[settings.fermi_init][1](ctx, budget)
        mu0 = {p: jnp.asarray([r[p] - 0.5 for r in ranks0], jnp.float32) for p in PROJECTIONS}
        model = fermi_model(ctx)
        t1 = time.perf_counter()
        limit = budget.limit([shapes[p] for _ in range(cfg.num_layers) for p in PROJECTIONS])
        # a few windows never trained on measure what the learning did (start ranks vs end ranks, hard-truncated)
        n_probe = max(1, min(8, len(ctx.windows) // 4)) if len(ctx.windows) > 1 else 0
        probe, train = ctx.windows[:n_probe], ctx.windows[n_probe:]
        bar = tqdm(total=settings.fermi_steps, desc="fermigrad", unit="step", disable=not ctx.progress, leave=False)

        def progress(i, loss, ratio):
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss):.4f}", soft=f"{float(ratio):.4f}")

        mu, trace = learn_mu(
            mu0, model, jnp.asarray(train), jax.random.key(ctx.spec.seed), jnp.asarray(limit, jnp.float32),
            cfg=cfg, steps=settings.fermi_steps, step_windows=settings.fermi_windows, lr=settings.fermi_lr,
            penalty=settings.fermi_penalty, t0=settings.fermi_t0, t1=settings.fermi_t1,
            callback=progress if ctx.progress else None, count=budget.count,
        )
        jax.block_until_ready(mu)
        bar.close()
        t2 = time.perf_counter()
        keys = [(b, p) for b in range(cfg.num_layers) for p in PROJECTIONS]
        mu_flat = np.array([float(mu[p][b]) for b, p in keys])
        sizes = np.array([min(shapes[p]) for _, p in keys])
        ks = round_ranks(mu_flat, sizes, lambda j, k: budget.stored(*shapes[keys[j][1]], k), limit)
        ranks = [dict.fromkeys(PROJECTIONS) for _ in range(cfg.num_layers)]
        dense = 0
        for (b, p), k in zip(keys, ks):
            m, n = shapes[p]
            if budget.count(m, n, int(k)) >= m * n:
                dense += 1
                ranks[b][p] = None
            else:
                ranks[b][p] = int(k)
        trace = jax.device_get(trace)
        # the objective's own measure of progress: cross-entropy of the hard-truncated model, start vs end ranks
        probe = jnp.asarray(probe if n_probe else ctx.windows)
        end_ranks = {p: jnp.asarray([min(shapes[p]) if ranks[b][p] is None else ranks[b][p]
                                     for b in range(cfg.num_layers)]) for p in PROJECTIONS}
        start_ranks = {p: jnp.asarray([r[p] for r in ranks0]) for p in PROJECTIONS}
        loss_start, loss_end = (float(hard_loss(r, model, probe, cfg)) for r in (start_ranks, end_ranks))
        every = max(1, settings.fermi_steps // 20)
        info = {
            "init": settings.fermi_init, **({"init_info": start_info} if start_info else {}),
            "probe_windows": int(probe.shape[0]), "probe_loss_start_ranks": loss_start, "probe_loss_end_ranks": loss_end,
            "loss_first": float(trace["loss"][0]), "loss_last": float(trace["loss"][-1]),
            "soft_ratio_last": float(trace["soft_ratio"][-1]),
            "trace": [[i, float(trace["loss"][i]), float(trace["soft_ratio"][i]), float(trace["temperature"][i])]
                      for i in range(0, settings.fermi_steps, every)],
            "matrices_dense": dense,
            "seconds": {"setup": round(t1 - t0, 3), "learning": round(t2 - t1, 3)},
        }
        if not all(math.isfinite(v) for v in mu_flat):
            raise FloatingPointError("fermigrad: non-finite ranks after learning")
        return Allocation(ranks, info)

    return RankAllocator("fermigrad", settings, allocate, check, memory=lambda cfg, spec: memory(cfg, spec, settings))
