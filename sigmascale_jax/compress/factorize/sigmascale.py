"""SigmaScale: learned row/column scales around the whitening, all projections of a block jointly (`sigmascale.py`)."""

from __future__ import annotations

import dataclasses

import jax

from sigmascale_jax.compress.plan import FACTORIZERS, BlockInputs, BlockResult, Factorizer, RunSpec, register
from sigmascale_jax.compress.settings import Settings, setting
from sigmascale_jax.errors import UserError
from sigmascale_jax.sigmascale import LOSS_KINDS, holdout_windows, sigmascale_block


@dataclasses.dataclass(frozen=True)
class SigmaScaleSettings(Settings):
    loss: str = setting("block", "sigmascale: loss the scales learn on", choices=LOSS_KINDS)
    steps: int = setting(200, "sigmascale: Adam steps per block", min=0)
    lr: float = setting(3e-2, "sigmascale: peak learning rate (cosine decay)", above=0.0)
    holdout: float = setting(0.125, "sigmascale: fraction of windows held out to pick the step", above=0.0, below=1.0)
    step_windows: int = setting(8, "sigmascale (block loss): calibration windows per Adam step", min=1)
    eval_every: int = setting(10, "sigmascale: measure the held-out loss every N steps", min=1)


@register(FACTORIZERS, "sigmascale", SigmaScaleSettings,
          "SigmaScale: learned row/column scaling around SVD-LLM's whitening")
def sigmascale(loss: str = "block", steps: int = 200, lr: float = 3e-2, holdout: float = 0.125,
               step_windows: int = 8, eval_every: int = 10) -> Factorizer:
    settings = SigmaScaleSettings(loss=loss, steps=steps, lr=lr, holdout=holdout, step_windows=step_windows,
                                  eval_every=eval_every)

    def check(spec: RunSpec, cfg) -> None:
        held = holdout_windows(spec.nsamples, settings.holdout)
        if held >= spec.nsamples:
            raise UserError(f"--holdout {settings.holdout} of --nsamples {spec.nsamples} holds out {held} windows and "
                            "leaves none to learn on; raise --nsamples or lower --holdout")

    def factor(inputs: BlockInputs, ranks, key) -> BlockResult:
        new, info = sigmascale_block(
            inputs.block, inputs.stats, inputs.xs, inputs.ys, inputs.cfg, ranks, kind=settings.loss,
            steps=settings.steps, lr=settings.lr, holdout=settings.holdout, batch_windows=settings.step_windows,
            eval_every=settings.eval_every, batch_size=inputs.batch_size, key=key,
        )
        block, spectra = info.pop("_block", None), info.pop("_spectra", None)
        return BlockResult(new, info, block, spectra)

    return Factorizer("sigmascale", settings, factor, check=check)
