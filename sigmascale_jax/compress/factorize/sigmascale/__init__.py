"""SigmaScale: learned row/column scales around the whitening, all projections of a block jointly (`block.py`).

`--loss paper` runs the paper's released recipe instead (`paper.py`): per matrix, no
whitening, random initialisation, AdamW, 1000 steps, the last one kept.
"""

from __future__ import annotations

from sigmascale_jax.compress.factorize.sigmascale.block import (
    DEFAULTS,
    LOSS_KINDS,
    SigmaScaleSettings,
    holdout_windows,
    sigmascale_block,
)
from sigmascale_jax.compress.factorize.sigmascale.paper import sigmascale_paper_block
from sigmascale_jax.compress.plan import FACTORIZERS, BlockInputs, BlockResult, Factorizer, RunSpec, mean_loss, register
from sigmascale_jax.errors import UserError

__all__ = ["DEFAULTS", "LOSS_KINDS", "SigmaScaleSettings", "sigmascale", "progress"]


@register(FACTORIZERS, "sigmascale", SigmaScaleSettings,
          "SigmaScale: learned row/column scaling around SVD-LLM's whitening")
def sigmascale(loss: str = "block", steps: int | None = None, lr: float | None = None, holdout: float = 0.125,
               step_windows: int = 8, eval_every: int = 10, truncation: str = "svd", min_gain: float = 0.0) -> Factorizer:
    settings = SigmaScaleSettings(loss=loss, steps=steps, lr=lr, holdout=holdout, step_windows=step_windows,
                                  eval_every=eval_every, truncation=truncation, min_gain=min_gain).resolved()

    def check(spec: RunSpec, cfg) -> None:
        if settings.loss == "paper":
            return
        held = holdout_windows(spec.nsamples, settings.holdout)
        if held >= spec.nsamples:
            raise UserError(f"--holdout {settings.holdout} of --nsamples {spec.nsamples} holds out {held} windows and "
                            "leaves none to learn on; raise --nsamples or lower --holdout")

    def factor(inputs: BlockInputs, ranks, key) -> BlockResult:
        if settings.loss == "paper":
            new, info = sigmascale_paper_block(inputs.block, inputs.stats, ranks, key, steps=settings.steps,
                                               lr=settings.lr, precision=inputs.precision)
            return BlockResult(new, info)
        return sigmascale_block(inputs.block, inputs.stats, inputs.xs, inputs.ys, inputs.cfg, ranks,
                                settings=settings, batch_size=inputs.batch_size, key=key, mesh=inputs.mesh,
                                precision=inputs.precision)

    def memory(cfg, spec: RunSpec, ranks) -> tuple[int, str]:
        """The learning scan's compiled peak (the block loss); the paper's per-matrix recipe is not estimated."""
        if settings.loss != "block":
            return 0, f"not estimated for --loss {settings.loss}"
        import jax
        import jax.numpy as jnp

        from sigmascale_jax.compress.factorize.sigmascale.block import _learn
        from sigmascale_jax.compress.memory import abstract_block, compiled_peak

        n, t, d = spec.nsamples, spec.seq_len, cfg.hidden_size
        hold = holdout_windows(n, settings.holdout)
        shapes = cfg.projection_shapes()
        whitening = {p: jax.ShapeDtypeStruct((shapes[p][1],) * 2, jnp.float32) for p in shapes}
        window = lambda k: jax.ShapeDtypeStruct((k, t, d), jnp.float32)  # noqa: E731
        rank_arrays = {p: jax.ShapeDtypeStruct((), jnp.int32) for p in shapes}  # data: any ranks, one program
        peak = compiled_peak(_learn, abstract_block(cfg), whitening, (window(n - hold),) * 2, (window(hold),) * 2,
                             jax.eval_shape(lambda: jax.random.key(0)), rank_arrays, cfg=cfg, settings=settings)
        return peak, f"the learning scan, {settings.step_windows} windows a step"

    return Factorizer("sigmascale", settings, factor, check=check, needs_outputs=True, progress=progress, memory=memory,
                      flat_record=True)


def progress(result: BlockResult) -> dict[str, str]:
    """The block bar's postfix: the held-out loss at SVD-LLM's factors -> at the kept step (the paper recipe: the
    mean relative loss, it has no held-out set)."""
    if not result.block:
        return mean_loss(result)
    step = result.block.get("step_s")
    return {"hold": f"{result.block['holdout_init']:.4f}->{result.block['holdout_best']:.4f}",
            **({"s/step": f"{step:.3f}"} if step else {})}
