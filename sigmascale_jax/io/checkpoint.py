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
import jax.numpy as jnp

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
    import jax

    if jax.process_count() > 1:  # Orbax takes one process's device arrays for shards of a global one: save host copies
        from sigmascale_jax.parallel import fetch

        tree = fetch(tree)
    ckpt = _checkpointer()
    ckpt.save(Path(path).resolve(), tree, force=True)
    if hasattr(ckpt, "wait_until_finished"):  # the async checkpointer (one process); the synchronous one is done
        ckpt.wait_until_finished()


def _checkpointer():
    """An Orbax checkpointer that writes and reads host trees from this process alone.

    In a multi-process run each process checkpoints into its own folder (`pipeline._run_worker`), so none may wait
    on the others: a synchronous checkpointer (the async one keys its signals by a per-process operation counter in
    the shared coordination service, where two processes' saves collide and wait forever) with this process as its
    only participant and its own barrier names.
    """
    import jax
    import orbax.checkpoint as ocp

    if jax.process_count() == 1:
        return ocp.StandardCheckpointer()
    me = jax.process_index()
    alone = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me},
                                               barrier_sync_key_prefix=f"sigmascale-process-{me}")
    return ocp.Checkpointer(ocp.StandardCheckpointHandler(multiprocessing_options=alone), multiprocessing_options=alone)


def load_pytree(path: Path) -> Any:
    """Restore an Orbax checkpoint written by `save_pytree` (structure from its own metadata)."""

    path = Path(path).resolve()
    if not path.is_dir():
        raise UserError(f"no Orbax checkpoint at {path}")
    try:
        return _checkpointer().restore(path)
    except Exception as e:
        raise UserError(f"cannot restore the Orbax checkpoint at {path} ({root_cause(e)}); the folder is damaged: "
                        "write it again") from None


def root_cause(e: BaseException, limit: int = 240) -> str:
    """The innermost exception `e` wraps, as `Type: message` on one line (its start and end where too long):
    Orbax wraps the cause (a missing file, a bad header) in layers of context."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    text = f"{type(e).__name__}: {' '.join(str(e).split())}"
    return text if len(text) <= limit else f"{text[: limit // 2 - 2]} ... {text[-(limit // 2 - 3):]}"


def read_report(folder: Path) -> dict:
    """`compression.json` of a compressed folder, its format and model config checked."""
    path = folder / REPORT_FILE
    report = read_json(path)
    if not isinstance(report, dict) or report.get("format_version") != FORMAT_VERSION or "model_config" not in report:
        raise UserError(f"{path} is not a sigmascale_jax compression report (format {FORMAT_VERSION})")
    report_config(report, path)
    return report


def report_config(report: dict, path: Path) -> ModelConfig:
    """The `model_config` of a report, each size a positive whole number; a UserError naming the field if not."""
    raw = report.get("model_config")
    sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
             "max_position_embeddings")
    if not isinstance(raw, dict) or not isinstance(raw.get("rope"), dict):
        raise UserError(f"{path}: model_config is not an object with a rope entry; the report is damaged")
    for key in sizes:
        if not (_whole(raw.get(key)) and raw[key] >= 1):
            raise UserError(f"{path}: model_config.{key} is {raw.get(key)!r}, not a positive whole number; "
                            "the report is damaged")
    try:
        return ModelConfig.from_dict(raw)
    except (TypeError, ValueError, KeyError) as e:
        raise UserError(f"{path}: model_config cannot be read ({e}); the report is damaged") from None


def _whole(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(x: Any) -> bool:
    import math

    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def matrix_records(report: dict, cfg: ModelConfig, path: Path) -> dict[tuple[int, str], dict]:
    """compression.json's `matrices`, one record per block and projection, checked against `cfg`: `{(block, name):
    record}`, each record with its `shape`, `dense` (a bool) and, unless dense, a `rank` in 1..min(shape).

    A report read from disk is validated, not trusted: every departure is a UserError naming the entry.
    """
    from sigmascale_jax.model.modeling import PROJECTIONS

    matrices = report.get("matrices")
    if not isinstance(matrices, list):
        raise UserError(f"{path} lists no matrices; give a compression.json written by sigmascale_jax.compress")
    shapes = cfg.projection_shapes()
    out: dict[tuple[int, str], dict] = {}
    for j, m in enumerate(matrices):
        if not isinstance(m, dict):
            raise UserError(f"{path}: matrices[{j}] is {type(m).__name__}, not an object; the report is damaged")
        i, name = m.get("block"), m.get("name")
        if not (_whole(i) and 0 <= i < cfg.num_layers and name in shapes):
            raise UserError(f"{path}: matrix {name!r} of block {i!r} does not exist in this model "
                            f"({cfg.num_layers} blocks); the run was made for another architecture")
        where = f"{path}: block {i} {name}"
        if m.get("shape") != list(shapes[name]):
            raise UserError(f"{where} is {m.get('shape')} there but {list(shapes[name])} in this model; "
                            "the run was made for another model")
        if not isinstance(m.get("dense"), bool):
            raise UserError(f"{where}: 'dense' is {m.get('dense')!r}, not true or false; the report is damaged")
        k = m.get("rank")
        if not m["dense"] and not (_whole(k) and 1 <= k <= min(shapes[name])):
            raise UserError(f"{where}: rank {k!r} outside 1..{min(shapes[name])}; the report is damaged")
        for key in ("stored", "bytes"):
            if key in m and not _number(m[key]):
                raise UserError(f"{where}: '{key}' is {m[key]!r}, not a number; the report is damaged")
        if (i, name) in out:
            raise UserError(f"{where} is listed twice; the report is damaged")
        out[i, name] = m
    missing = [(i, n) for i in range(cfg.num_layers) for n in PROJECTIONS if (i, n) not in out]
    if missing:
        raise UserError(f"{path} records no rank for {len(missing)} matrices (first: block {missing[0][0]} "
                        f"{missing[0][1]}); the run was made for another model")
    return out


def check_params(params: Any, cfg: ModelConfig, folder: Path) -> None:
    """The restored params have the config's number of blocks and outer shapes; a UserError naming the first
    mismatch (an edited `model_config`)."""
    fix = f"{folder / REPORT_FILE} does not describe {folder / PARAMS_DIR} (edited or damaged); recompress, or " \
          "restore the folder from a copy"
    if not isinstance(params, dict) or not isinstance(params.get("blocks"), list):
        raise UserError(f"{folder / PARAMS_DIR} holds no blocks; the folder is damaged: recompress")
    if len(params["blocks"]) != cfg.num_layers:
        raise UserError(f"model_config says {cfg.num_layers} blocks, the params hold {len(params['blocks'])}: {fix}")
    want = {"embed": (cfg.vocab_size, cfg.hidden_size), "final_norm": (cfg.hidden_size,),
            "lm_head": (cfg.vocab_size, cfg.hidden_size)}
    for key, shape in want.items():
        if key in params and tuple(params[key].shape) != shape:
            raise UserError(f"model_config makes {key} {list(shape)}, the params hold {list(params[key].shape)}: {fix}")


def write_derived(folder: Path, stored: dict, report: dict, src: Path) -> None:
    """A compressed folder's files in `folder` for params derived from the compressed folder `src` (re-encoded,
    healed): `stored` (the saved form, `pipeline.stored_params`), `report`, and `src`'s tokenizer and spectra."""
    import shutil

    from sigmascale_jax.io.fileio import write_json_atomic

    save_pytree(folder / PARAMS_DIR, stored)
    shutil.copytree(src / TOKENIZER_DIR, folder / TOKENIZER_DIR)
    if (src / SPECTRA_FILE).is_file():
        shutil.copy2(src / SPECTRA_FILE, folder / SPECTRA_FILE)
    write_json_atomic(folder / REPORT_FILE, report)


def report_store_dtype(report: dict) -> str:
    """What a folder's float tensors are written as (`--store-dtype`; its report leaves float32 out)."""
    return report.get("encode", {}).get("store_dtype", "float32")


def stored_floats_as_float32(tree: Any) -> Any:
    """A restored tree with the float tensors written as bfloat16 (`--store-dtype bfloat16`) back in float32, the
    precision models compute in by default (exactly: every bfloat16 is a float32). Codes are written as integers,
    so nothing else is bfloat16 on disk."""
    import numpy as np

    return jax.tree.map(lambda x: np.asarray(x, np.float32) if getattr(x, "dtype", None) == jnp.bfloat16 else x, tree)


def load_compressed(folder: Path, dtype: Any = None) -> tuple[ModelConfig, dict]:
    """Config and params of a compressed folder, each projection as the typed leaf `compression.json` records.

    The report is checked against the params once, here, for every command that reads a folder: the number of
    blocks, every projection's shape, rank, encoding and quantization groups; a mismatch is a UserError naming it.
    """
    from sigmascale_jax.model.leaves import as_matrix, read_leaf
    from sigmascale_jax.model.modeling import PROJECTIONS, cast_params

    folder = Path(folder)
    report = read_report(folder)
    cfg = report_config(report, folder / REPORT_FILE)
    params = stored_floats_as_float32(load_pytree(folder / PARAMS_DIR))
    for key in ("embed", "lm_head"):  # quantized tables (--quantize-embeddings), read by their saved grid
        if isinstance(params.get(key), dict):
            params[key] = as_matrix(params[key])
    check_params(params, cfg, folder)
    records = matrix_records(report, cfg, folder / REPORT_FILE)
    for i, block in enumerate(params["blocks"]):
        for name in PROJECTIONS:
            record = records[i, name]
            try:
                leaf = read_leaf(block[name], record)
                leaf.check(tuple(record["shape"]), None if record["dense"] else record["rank"])
            except (UserError, ValueError, KeyError, TypeError, AttributeError) as e:
                detail = f"its params lack {e}" if isinstance(e, KeyError) else " ".join(str(e).split())
                form = "dense" if record["dense"] else f"rank {record['rank']}"
                groups = f", group size {record['group_size']}" if record.get("group_size") else ""
                raise UserError(f"{folder / REPORT_FILE} records block {i} {name} as {record.get('encoding', 'plain')} "
                                f"{form}{groups}, but {detail}: the folder was edited or damaged; "
                                "recompress, or restore it from a copy") from None
            block[name] = leaf
    if dtype is not None:
        params = cast_params(params, dtype)
    # Orbax hands some leaves back as numpy arrays; on the device once, or every jit call would copy them again
    return cfg, jax.device_put(params)
