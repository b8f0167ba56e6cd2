"""Settings of one stage's method: a frozen dataclass that checks itself, and whose fields are command-line flags.

Every allocator, factorizer and refiner declares its knobs as fields made with
`setting(...)`; the command line, YAML configs and the Python API all build the
same dataclass, so a value is converted and checked in one place whichever way it
came in. The resume key is `asdict()` of the settings that change the result.

    @dataclasses.dataclass(frozen=True)
    class AsvdSettings(Settings):
        alpha: float = setting(0.5, "exponent of the activation scaling", min=0.0)
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

from sigmascale_jax.errors import ArgError


def setting(default: Any, help: str, *, choices: tuple | None = None, min: float | None = None,
            max: float | None = None, above: float | None = None, below: float | None = None,
            reads: str | None = None) -> Any:
    """A settings field: its default, its `--help` text and the bounds `Settings` enforces.

    `min`/`max` are inclusive bounds, `above`/`below` strict ones. `reads`: the field names a path the run reads
    ("the healing text"), which no output of the run may replace (`Settings.inputs`).
    """
    meta = {"help": help, "choices": choices, "min": min, "max": max, "above": above, "below": below,
            "reads": reads}
    return dataclasses.field(default=default, metadata=meta)


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _coerce(name: str, kind: type, value: Any) -> Any:
    """`value` as `kind` (bool, int, float or str), or a UserError naming the flag."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ArgError(name, f"takes true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
            raise ArgError(name, f"takes a whole number, got {value!r}")
        return int(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ArgError(name, f"takes a number, got {value!r}")
        if not math.isfinite(value):
            raise ArgError(name, f"must be a finite number, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ArgError(name, f"takes a string, got {value!r}")
        return value
    raise TypeError(f"unsupported settings type {kind} for {name}")


def field_type(cls: type, field: dataclasses.Field) -> type:
    hint = typing.get_type_hints(cls)[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


@dataclasses.dataclass(frozen=True)
class Settings:
    """Base of every method's settings: converts and bounds each field on construction.

    `switch`: for a refiner, the setting whose non-zero value turns it on (`--heal-steps 100` runs healing
    without `--heal`).
    """

    switch: typing.ClassVar[str | None] = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.default is None:  # optional setting left unset
                continue
            value = _coerce(f.name, field_type(type(self), f), value)
            object.__setattr__(self, f.name, value)
            m, name = f.metadata, f.name
            if m.get("choices") and value not in m["choices"]:
                raise ArgError(name, f"must be one of {', '.join(map(str, m['choices']))}, got {value!r}")
            if m.get("min") is not None and value < m["min"]:
                raise ArgError(name, f"must be at least {m['min']}, got {value}")
            if m.get("max") is not None and value > m["max"]:
                raise ArgError(name, f"must be at most {m['max']}, got {value}")
            if m.get("above") is not None and not value > m["above"]:
                raise ArgError(name, f"must be greater than {m['above']}, got {value}")
            if m.get("below") is not None and not value < m["below"]:
                raise ArgError(name, f"must be less than {m['below']}, got {value}")

    def asdict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def inputs(self) -> list[tuple[str, str]]:
        """`(path, role)` of every path these settings make the run read (fields declared with `reads=`)."""
        return [(getattr(self, f.name), f.metadata["reads"]) for f in dataclasses.fields(self)
                if f.metadata.get("reads") and getattr(self, f.name)]


@dataclasses.dataclass(frozen=True)
class NoSettings(Settings):
    """For methods without knobs."""


def settings_fields(cls: type[Settings]) -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(cls)
