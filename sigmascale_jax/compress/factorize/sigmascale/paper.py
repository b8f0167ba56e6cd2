"""SigmaScale as the paper's released code runs it (github ernlavr/SigmaScale, 8e34871, `train_utils/svd_smoother.py`).

Per matrix, independently, with no whitening (METHODS.md, "recipe paper")::

    d_r ∈ ℝᵐ, d_c ∈ ℝⁿ ~ randn · std(W) · 0.1
    A = diag(exp d_r) · W · diag(exp d_c) + 1e-6 · N(0, 1)       (fresh noise every step)
    Ŵ = diag(exp −d_r) · A_k · diag(exp −d_c)
    loss = ‖(W − Ŵ) X‖²_F / (m·n) + 1e-6 (‖d_r‖² + ‖d_c‖²)      = tr(Δ G Δᵀ)/(m·n) + ..., G = X Xᵀ

AdamW (lr 0.005, weight decay 1e-6, no schedule), 1000 full-batch steps, the last
step kept; X are the layer's inputs in the uncompressed model. One difference from
the released code: the truncation's gradient is this project's cut-only VJP
(`truncation.py`), finite when singular values repeat, where the released code uses
the full SVD gradient and replaces NaN gradients by the mean of the others.

Without whitening and with a per-layer loss, this recipe can at best reach SVD-LLM's
per-layer optimum; its gains over SVD-LLM can only come from its rank table.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sigmascale_jax.linalg.lowrank import relative_activation_loss, split_sigma, split_sigma_masked
from sigmascale_jax.linalg.precision import factor_precision
from sigmascale_jax.linalg.truncation import truncated_reconstruction
from sigmascale_jax.model.modeling import PROJECTION_INPUT, PROJECTIONS, Params

PAPER_NOISE = 1e-6
PAPER_L2 = 1e-6
PAPER_WEIGHT_DECAY = 1e-6
PAPER_INIT_SCALE = 0.1


def paper_reconstruction(w: jax.Array, d_r: jax.Array, d_c: jax.Array, rank: int, noise: jax.Array) -> jax.Array:
    """`Ŵ` of `w: [m, n]` with log-scales `d_r: [m]`, `d_c: [n]` and additive `noise: [m, n]` before the SVD."""
    r, c = jnp.exp(d_r), jnp.exp(d_c)
    a = r[:, None] * w * c[None, :] + noise
    return truncated_reconstruction(a, rank) / r[:, None] / c[None, :]


def paper_loss(params: dict, w: jax.Array, gram: jax.Array, rank: int, noise: jax.Array, l2: float = PAPER_L2) -> jax.Array:
    """`tr((W − Ŵ) G (W − Ŵ)ᵀ)/(m·n) + l2 (‖d_r‖² + ‖d_c‖²)`, which is `‖(W − Ŵ)X‖²/(m·n) + ...` for `G = X Xᵀ`."""
    d = w - paper_reconstruction(w, params["d_r"], params["d_c"], rank, noise)
    m, n = w.shape
    return jnp.sum((d @ gram) * d) / (m * n) + l2 * (jnp.sum(params["d_r"] ** 2) + jnp.sum(params["d_c"] ** 2))


@functools.partial(jax.jit, static_argnames=("steps",))
def learn_matrix_scales_paper(
    w: jax.Array, gram: jax.Array, key: jax.Array, *, rank: Any, steps: int = 1000, lr: float = 5e-3,
    weight_decay: float = PAPER_WEIGHT_DECAY, noise: float = PAPER_NOISE, l2: float = PAPER_L2,
) -> tuple[dict, jax.Array]:
    """The released recipe for one matrix: `({"d_r": [m], "d_c": [n]}` after the last step, loss per step `[steps]`).

    `rank` is data (the truncation cuts by a mask): matrices of one shape share one compiled program."""
    k_init_r, k_init_c, k_noise = jax.random.split(key, 3)
    scale = jnp.std(w) * PAPER_INIT_SCALE
    params = {"d_r": jax.random.normal(k_init_r, (w.shape[0],), w.dtype) * scale,
              "d_c": jax.random.normal(k_init_c, (w.shape[1],), w.dtype) * scale}
    opt = optax.adamw(lr, weight_decay=weight_decay)

    def step(carry, i):
        params, state = carry
        eps = noise * jax.random.normal(jax.random.fold_in(k_noise, i), w.shape, w.dtype)
        loss, grads = jax.value_and_grad(paper_loss)(params, w, gram, rank, eps, l2)
        updates, state = opt.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), loss

    (params, _), trace = jax.lax.scan(step, (params, opt.init(params)), jnp.arange(steps))
    return params, trace


def paper_factors(w: jax.Array, d_r: jax.Array, d_c: jax.Array, rank: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The stored factors `B = e^{−d_r} U_k Σ_k^½`, `C = Σ_k^½ V_kᵀ e^{−d_c}` (no noise), and σ of the scaled matrix."""
    r, c = jnp.exp(d_r), jnp.exp(d_c)
    u, sig, vt = jnp.linalg.svd(r[:, None] * w * c[None, :], full_matrices=False)
    b, c_scaled = split_sigma(u, sig, vt, rank)
    return b / r[:, None], c_scaled / c[None, :], sig


@jax.jit
def _paper_final(w: jax.Array, d_r: jax.Array, d_c: jax.Array, gram: jax.Array, rank: Any) -> tuple:
    """`paper_factors` full-width and zero past `rank` (data: one compile per shape), and their relative loss."""
    r, c = jnp.exp(d_r), jnp.exp(d_c)
    u, sig, vt = jnp.linalg.svd(r[:, None] * w * c[None, :], full_matrices=False)
    b, c_scaled = split_sigma_masked(u, sig, vt, rank)
    b, c_out = b / r[:, None], c_scaled / c[None, :]
    return b, c_out, relative_activation_loss(w, b @ c_out, gram)


def sigmascale_paper_block(
    block: Params, stats: dict, ranks: dict[str, int | None], key: jax.Array, *, steps: int = 1000, lr: float = 5e-3,
    precision: str = "float64",
) -> tuple[Params, dict[str, Any]]:
    """Factor each low-rank projection of a dense block with the released recipe, independently.

    `stats`: the Gram matrices of the projections' inputs (`stats.block_stats`), from the
    uncompressed model for the recipe as published (`--no-sequential`). Learning runs in
    float32; the final factors are computed in `precision`. Returns the block and per-matrix
    records: rank, relative activation loss, the recipe's loss at the first and last step.
    """
    new = {k: v for k, v in block.items() if k not in PROJECTIONS}
    info: dict[str, Any] = {}
    for j, n in enumerate(PROJECTIONS):
        w32 = jnp.asarray(block[n]["w"], jnp.float32)
        if ranks[n] is None:
            new[n] = block[n]
            info[n] = {"shape": list(w32.shape), "rank": min(w32.shape), "dense": True, "rel_loss": 0.0, "whitening": None}
            continue
        gram32 = jnp.asarray(stats[PROJECTION_INPUT[n]]["gram"], jnp.float32)
        params, trace = learn_matrix_scales_paper(w32, gram32, jax.random.fold_in(key, j), rank=np.int32(ranks[n]),
                                                  steps=steps, lr=lr)
        trace = np.asarray(trace)
        with factor_precision(precision) as dtype:
            as_dtype = lambda x: np.asarray(x, dtype)  # noqa: E731  (host casts: no eager device op per shape)
            b, c, rel = _paper_final(as_dtype(block[n]["w"]), as_dtype(params["d_r"]), as_dtype(params["d_c"]),
                                     as_dtype(stats[PROJECTION_INPUT[n]]["gram"]), np.int32(ranks[n]))
            rel = float(rel)
        b, c = np.asarray(b)[:, : ranks[n]], np.asarray(c)[: ranks[n]]
        if not (np.isfinite(b).all() and np.isfinite(c).all()):
            raise FloatingPointError(f"non-finite factors of the paper recipe for projection {n} (rank {ranks[n]})")
        p = {"b": np.ascontiguousarray(b, np.dtype(block[n]["w"].dtype)),
             "c": np.ascontiguousarray(c, np.dtype(block[n]["w"].dtype))}
        if "bias" in block[n]:
            p["bias"] = block[n]["bias"]
        new[n] = p
        info[n] = {"shape": list(w32.shape), "rank": ranks[n], "dense": False, "rel_loss": rel, "whitening": None,
                   "paper_loss_first": float(trace[0]) if steps else None,
                   "paper_loss_last": float(trace[-1]) if steps else None}
    return new, info
