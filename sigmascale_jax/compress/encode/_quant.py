"""The quantization settings every encoder shares (`--quantize`, `--group-size`)."""

from __future__ import annotations

import dataclasses

from sigmascale_jax.compress.settings import Settings, setting
from sigmascale_jax.errors import UserError

DEFAULT_GROUP = 128


@dataclasses.dataclass(frozen=True)
class QuantSettings(Settings):
    quantize: str = setting("none", "store every projection's matrices as int8 or int4 (round to nearest, a scale per "
                            "group; int4 with zero points, packed two per byte)", choices=("none", "int8", "int4"))
    group_size: int | None = setting(None, f"quantization: columns per group sharing a scale (default "
                                     f"{DEFAULT_GROUP}; even for int4)", min=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.quantize == "none":
            if self.group_size is not None:
                raise UserError("--group-size sets the quantization groups; it needs --quantize int8 or int4")
            return
        if self.group_size is None:
            object.__setattr__(self, "group_size", DEFAULT_GROUP)
        if self.quantize == "int4" and self.group_size % 2:
            raise UserError(f"--quantize int4 packs two values per byte: --group-size must be even, got {self.group_size}")

    @property
    def kind(self) -> str | None:
        return None if self.quantize == "none" else self.quantize
