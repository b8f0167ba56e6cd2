"""Orbax checkpoints of params pytrees, and the compressed-model folder format.

A compressed folder holds::

    compression.json     what was done (model config, method, ranks, calibration, timings, ...)
    params/              Orbax checkpoint of the factored params pytree
    tokenizer/           the source model's tokenizer (save_pretrained)
    spectra.npz          SigmaScale only: singular values "<block>.<projection>.<w|whitened|scaled>"
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax

from sigmascale_jax.errors import UserError
from sigmascale_jax.io.fileio import read_json
from sigmascale_jax.model.config import ModelConfig

FORMAT_VERSION = 1
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
REPORT_FILE = "compression.json"
SPECTRA_FILE = "spectra.npz"


def save_pytree(path: Path, tree: Any) -> None:
    """Write `tree` as an Orbax checkpoint at `path` (blocking until it is complete)."""
    import orbax.checkpoint as ocp

    ckpt = ocp.StandardCheckpointer()
    ckpt.save(Path(path).resolve(), tree, force=True)
    ckpt.wait_until_finished()


def load_pytree(path: Path) -> Any:
    """Restore an Orbax checkpoint written by `save_pytree` (structure from its own metadata)."""
    import orbax.checkpoint as ocp

    path = Path(path).resolve()
    if not path.is_dir():
        raise UserError(f"no Orbax checkpoint at {path}")
    try:
        return ocp.StandardCheckpointer().restore(path)
    except Exception as e:
        raise UserError(f"cannot restore the Orbax checkpoint at {path}: {' '.join(str(e).split())[:200]}") from None


def read_report(folder: Path) -> dict:
    report = read_json(folder / REPORT_FILE)
    if not isinstance(report, dict) or report.get("format_version") != FORMAT_VERSION or "model_config" not in report:
        raise UserError(f"{folder / REPORT_FILE} is not a sigmascale_jax compression report (format {FORMAT_VERSION})")
    return report


def load_compressed(folder: Path, dtype: Any = None) -> tuple[ModelConfig, dict]:
    """Config and params of a compressed folder, each projection as the typed leaf `compression.json` records."""
    from sigmascale_jax.compress.plan import read_leaf
    from sigmascale_jax.model.modeling import cast_params

    report = read_report(folder)
    cfg = ModelConfig.from_dict(report["model_config"])
    params = load_pytree(folder / PARAMS_DIR)
    records = {(m["block"], m["name"]): m for m in report.get("matrices", [])}
    for i, block in enumerate(params["blocks"]):
        for name in ("q", "k", "v", "o", "gate", "up", "down"):
            record = records.get((i, name), {"shape": cfg.projection_shapes()[name]})
            if "w" in block[name] and "dense" not in record:
                record = {**record, "dense": True}
            if "rank" not in record and "b" in block[name]:
                record = {**record, "rank": int(block[name]["b"].shape[1])}
            block[name] = read_leaf(block[name], record)
    if dtype is not None:
        params = cast_params(params, dtype)
    # Orbax hands some leaves back as numpy arrays; on the device once, or every jit call would copy them again
    return cfg, jax.device_put(params)
