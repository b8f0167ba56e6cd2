"""No low-rank factors: every projection stays dense (`--ratio 0`), for quantization alone (`--quantize`).

With `--quantizer gptq` the block loop runs its statistics pass, and each dense matrix is
rounded against its input's Gram, block i+1 fed by the quantized block i (GPTQ's own
order); with RTN it skips the pass and only feeds the blocks forward. Quantization alone
and low-rank + quantization are made and measured by one tool.
"""

from __future__ import annotations

from sigmascale_jax.compress.factorize._blocks import factor_block
from sigmascale_jax.compress.plan import FACTORIZERS, BlockInputs, BlockResult, Factorizer, register
from sigmascale_jax.compress.settings import NoSettings
from sigmascale_jax.errors import UserError


def _no_group(names, rank):
    raise AssertionError(f"--method none factors nothing, asked for rank {rank} of {names}")


@register(FACTORIZERS, "none", NoSettings, "no factors: every projection stays dense (with --ratio 0, the default "
          "there; for --quantize alone)")
def none() -> Factorizer:
    def factor(inputs: BlockInputs, ranks, key) -> BlockResult:
        return factor_block(inputs.block, ranks, _no_group, "none")

    def check(spec, cfg) -> None:
        if spec.ratio:
            raise UserError(f"--method none keeps every projection dense; it takes --ratio 0, not {spec.ratio}")

    return Factorizer("none", NoSettings(), factor, needs_stats=False, check=check, progress=lambda result: {},
                      memory=lambda cfg, spec, ranks: (0, "nothing factored"))
