"""ZS-SVD's correction: one projected-gradient step after truncation, then re-truncation at the same ranks.

As the official code's `pull_subspace` correction does it (github.com/mint-vu/Zero-Sum-SVD,
`compression/corrections.py`, one gradient batch): with Ŵ the truncated matrix, W the
original and g = ∂𝓛/∂W at the compressed model (mean next-token cross-entropy on
calibration windows), the teacher's residual `W − Ŵ` is projected onto the gradient
direction,

    W' = Ŵ + α g,   α = ⟨g, W − Ŵ⟩ / ⟨g, g⟩,

so the step length needs no learning rate and never moves further than ‖W − Ŵ‖. To
first order it changes the loss by `⟨g, W − Ŵ⟩`: a descent step where moving toward
the original weights lowers the loss, an ascent step (as in the official code) where
it does not; each matrix's prediction is recorded. W' has full rank again; it is re-truncated to its rank by
SVD-LLM's whitened truncation on the Gram matrix of the matrix's inputs in the
compressed model (the official multi-stage code re-truncates with whitening too).
Matrices kept dense are not touched.

The guard (`--correction-guard`, on by default; not in the official code): the step is a
first-order guess, and on SigmaScale's factors at ratio 0.4 it raised the loss on
calibration windows the gradient did not see (results/ranks_smollm2.md). So the loss of the
uncorrected and the corrected model is measured on the next `--grad-samples` calibration
windows, and the uncorrected factors are kept unless the correction lowers it; the record
says which were kept (`kept`), and a line on stderr says so when the correction is dropped.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from sigmascale_jax.compress.allocate.zs_svd import DEFAULT_GRAD_SAMPLES, grad_windows
from sigmascale_jax.compress.grads import model_loss, reverse_pass
from sigmascale_jax.compress.plan import REFINERS, ModelContext, Params, Ranks, Refiner, RunSpec, register
from sigmascale_jax.compress.settings import Settings, setting
from sigmascale_jax.errors import UserError
from sigmascale_jax.linalg.precision import factor_precision
from sigmascale_jax.model.modeling import PROJECTION_INPUT, PROJECTIONS


@dataclasses.dataclass(frozen=True)
class CorrectionSettings(Settings):
    grad_samples: int | None = setting(
        None, f"zs-svd / correction: calibration windows the loss gradient averages over (default: the first "
        f"{DEFAULT_GRAD_SAMPLES}, or all if fewer)", min=1)
    correction_guard: bool = setting(
        True, "correction: keep the uncorrected factors unless the correction lowers the loss on the next "
        "--grad-samples calibration windows (held out from its gradient)")


def pull_step(w: jax.Array, w_hat: jax.Array, grad: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(W', α)`: `Ŵ` moved by the projection of `W − Ŵ` onto the gradient direction (`[m, n]` each). Pure."""
    gg = jnp.sum(grad * grad)
    alpha = jnp.where(gg > 0, jnp.sum(grad * (w - w_hat)) / jnp.where(gg > 0, gg, 1.0), 0.0)
    return w_hat + alpha * grad, alpha


_pull_jit = jax.jit(pull_step)


def correct_block(dense: Params, comp: Params, grads: dict, stats: dict, ranks: dict,
                  precision: str = "float64") -> tuple[Params, dict]:
    """One block's corrected and re-truncated factors (in `precision`), and a record per corrected projection."""
    from sigmascale_jax.compress.factorize.svd_llm import svd_llm_group

    new, info = dict(comp), {}
    with factor_precision(precision) as dtype:
        for n in PROJECTIONS:
            if ranks[n] is None:
                continue
            w = jnp.asarray(np.asarray(dense[n]["w"]), dtype)
            w_hat = jnp.asarray(np.asarray(comp[n]["b"]), dtype) @ jnp.asarray(np.asarray(comp[n]["c"]), dtype)
            g = jnp.asarray(grads[n], dtype)
            w_new, alpha = _pull_jit(w, w_hat, g)
            gram = jnp.asarray(stats[PROJECTION_INPUT[n]]["gram"], dtype)
            b, c, _, _ = svd_llm_group(w_new[None], gram[None], ranks[n])
            b, c = np.asarray(b[0])[:, : ranks[n]], np.asarray(c[0])[: ranks[n]]  # full-width: cut to the rank
            if not (np.isfinite(b).all() and np.isfinite(c).all()):
                raise FloatingPointError(f"non-finite factors after the correction of projection {n}")
            dtype = comp[n]["b"].dtype
            new[n] = {**comp[n], "b": jnp.asarray(b, dtype), "c": jnp.asarray(c, dtype)}
            norm = jnp.linalg.norm(w_hat)
            info[n] = {"alpha": float(alpha), "relative_step": float(jnp.linalg.norm(w_new - w_hat) / norm),
                       "relative_residual": float(jnp.linalg.norm(w - w_hat) / norm),
                       "predicted_loss_change": float(alpha * jnp.sum(g * g))}
    return new, info


@register(REFINERS, "correction", CorrectionSettings,
          "ZS-SVD's correction: one projected-gradient step toward the original weights, then re-truncation")
def correction(grad_samples: int | None = None, correction_guard: bool = True) -> Refiner:
    settings = CorrectionSettings(grad_samples=grad_samples, correction_guard=correction_guard)

    def check(spec: RunSpec, cfg) -> None:
        n_grad = grad_windows(spec, settings.grad_samples)
        if settings.correction_guard and spec.nsamples <= n_grad:
            raise UserError(f"--correction-guard checks the correction on calibration windows its gradient did not see, "
                            f"but --nsamples {spec.nsamples} leaves none after --grad-samples {n_grad}: raise "
                            f"--nsamples, lower --grad-samples, or pass --no-correction-guard")

    def refine(ctx: ModelContext, blocks: list[Params], ranks: Ranks) -> tuple[list[Params], dict]:
        from sigmascale_jax.compress.stats import block_stats

        cfg, spec = ctx.cfg, ctx.spec
        n_grad = grad_windows(spec, settings.grad_samples)
        tokens = ctx.windows[:n_grad]
        held = ctx.windows[n_grad : 2 * n_grad]  # calibration windows the gradient did not see
        t0 = time.perf_counter()
        new_blocks: list = [None] * cfg.num_layers
        records: list = [None] * cfg.num_layers

        def on_block(i, grads, xs):
            _, stats = block_stats(blocks[i], xs, cfg, spec.batch_size, ctx.mesh, outputs=False)
            new_blocks[i], records[i] = correct_block(ctx.load_block(i), blocks[i], grads, stats, ranks[i],
                                                        spec.precision)

        loss = reverse_pass(ctx.outer, blocks.__getitem__, cfg.num_layers, tokens, cfg, on_block,
                            batch_size=spec.batch_size, progress=ctx.progress, desc="correction")
        after = model_loss(ctx.outer, new_blocks.__getitem__, tokens, cfg, batch_size=spec.batch_size)
        info = {
            "grad_samples": n_grad,
            "loss_before": loss,
            "loss_after": after,
            "predicted_loss_change": float(sum(r["predicted_loss_change"] for rec in records for r in rec.values())),
            "matrices": [{"block": i, "name": n, **r} for i, rec in enumerate(records) for n, r in rec.items()],
        }
        if len(held):
            info["held_out_windows"] = len(held)
            info["held_out_loss_before"] = model_loss(ctx.outer, blocks.__getitem__, held, cfg, batch_size=spec.batch_size)
            info["held_out_loss_after"] = model_loss(ctx.outer, new_blocks.__getitem__, held, cfg,
                                                     batch_size=spec.batch_size)
        kept = "corrected"
        if settings.correction_guard and not info["held_out_loss_after"] < info["held_out_loss_before"]:
            kept = "uncorrected"
            print(f"correction: the loss on {len(held)} held-out calibration windows went "
                  f"{info['held_out_loss_before']:.4f} -> {info['held_out_loss_after']:.4f}; kept the uncorrected "
                  f"factors (--no-correction-guard keeps the corrected ones)", file=sys.stderr)
        info["kept"] = kept
        info["seconds"] = round(time.perf_counter() - t0, 3)
        return (new_blocks if kept == "corrected" else blocks), info

    return Refiner("correction", settings, refine, check)
