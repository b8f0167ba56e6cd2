"""Export a (compressed) model as a Hugging Face checkpoint that PyTorch users can load.

    python -m sigmascale_jax.export --model runs/smollm2-sigmascale-0.2 --out exports/dense --format dense
    python -m sigmascale_jax.export --model runs/smollm2-sigmascale-0.2 --out exports/factored --format factored

`dense`: a stock checkpoint (config.json, model.safetensors, tokenizer) with every
projection's matrix reconstructed; `AutoModelForCausalLM.from_pretrained` loads it with
no extra code (no size gain: for tools that need stock layers).
`factored`: the factors themselves, each projection's form and rank in config.json's
`"sigmascale"` entry; `sigmascale_jax.deploy.torch_lowrank.load_factored` builds the
transformers model with low-rank layers, whose parameter count is the compressed one.
Quantized matrices are written dequantized (float32): the HF formats have no place for
this project's groups and scales.

Tensor names come from `io/hf_map.block_tensors` / `outer_tensors`, the table the
loader reads checkpoints with, so import and export cannot drift.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from sigmascale_jax.errors import ArgumentParser, UserError

FORMATS = ("dense", "factored")


def _leaf_tensors(hf_prefix: str, leaf: Any, factored: bool) -> tuple[dict[str, np.ndarray], dict]:
    """HF tensors of one projection (`hf_prefix` = e.g. `model.layers.3.self_attn.q_proj`) and its form record."""
    from sigmascale_jax.model.leaves import as_leaf, dense_export

    leaf = as_leaf(leaf)
    return leaf.export_tensors(hf_prefix) if factored else dense_export(leaf, hf_prefix)


def export(model: str, out: str | Path, fmt: str = "dense", *, overwrite: bool = False) -> dict[str, Any]:
    """Write `model` (any source: a folder, a .gguf, a compressed folder) to `out` as `fmt`;
    returns `{"tensors", "parameters", "format"}`.

    `out` is written under a lock, staged in a hidden folder beside it and renamed into place when complete;
    it may not be (or lie inside, or hold) the model being exported."""
    from sigmascale_jax.io.outputs import model_input, writing_folder
    from sigmascale_jax.io.sources import load_model

    check_format(fmt)
    with writing_folder(out, overwrite, model_input(model, "the model being exported")) as staging:
        cfg, params, source = load_model(model)
        return _write_hf(staging, params, cfg, source.tokenizer(), fmt, str(model))


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")


def export_params(params: dict, cfg, tokenizer, out: str | Path, fmt: str = "dense", *, source: str = "in-memory",
                  overwrite: bool = False) -> dict[str, Any]:
    """Write an in-memory params pytree (dense or any compressed form) as a Hugging Face folder `out`.

    `tokenizer`: a transformers tokenizer (`load_model(...)[2].tokenizer()`); `fmt`: "dense" (stock layers,
    reconstructed weights) or "factored" (the factors; `deploy.torch_lowrank.load_factored` loads them).
    `source`: where the params came from (recorded; a path there is never overwritten).
    Returns `{"tensors", "parameters", "format"}`.
    """
    from sigmascale_jax.io.outputs import model_input, writing_folder

    check_format(fmt)
    with writing_folder(out, overwrite, model_input(source, "the model the params came from")) as staging:
        return _write_hf(staging, params, cfg, tokenizer, fmt, source)


def _write_hf(folder: Path, params: dict, cfg, tokenizer, fmt: str, source: str) -> dict[str, Any]:
    """The Hugging Face files of `params` in `folder` (an empty staging folder)."""
    from safetensors.numpy import save_file
    from transformers import AutoConfig

    from sigmascale_jax.io.fileio import write_json_atomic
    from sigmascale_jax.io.hf_map import block_tensors, outer_tensors
    from sigmascale_jax.model.config import to_hf_dict
    from sigmascale_jax.model.leaves import host_array
    from sigmascale_jax.model.modeling import PROJECTIONS

    factored = fmt == "factored"
    tensors: dict[str, np.ndarray] = {}
    forms: dict[str, dict] = {}
    for path, (name, _) in outer_tensors(cfg).items():
        tensors[name] = host_array(params[path[0]])  # a quantized embedding table, dequantized
    for i, block in enumerate(params["blocks"]):
        for path, (name, _) in block_tensors(cfg, i).items():
            if path[0] in PROJECTIONS:
                if path[1] == "w":  # one entry per projection: its tensors come from the leaf
                    t, form = _leaf_tensors(name[: -len(".weight")], block[path[0]], factored)
                    tensors.update(t)
                    forms[f"{i}.{path[0]}"] = form
            else:
                tensors[name] = np.asarray(block[path[0]], np.float32)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    hf = AutoConfig.for_model(**to_hf_dict(cfg), bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id)
    hf.save_pretrained(str(folder))
    if factored:
        raw = json.loads((folder / "config.json").read_text())
        raw["sigmascale"] = {"format": "factored", "source": source, "projections": forms,
                             "loader": "sigmascale_jax.deploy.torch_lowrank.load_factored"}
        write_json_atomic(folder / "config.json", raw)
    tokenizer.save_pretrained(str(folder))
    counted = sum(v.size for k, v in tensors.items() if not k.endswith(".perm"))
    return {"format": fmt, "tensors": len(tensors), "parameters": int(counted)}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m sigmascale_jax.export", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="a compressed folder (or any model source)")
    p.add_argument("--out", required=True, help="the Hugging Face folder to write")
    p.add_argument("--format", choices=FORMATS, default="dense",
                   help="dense: stock layers, reconstructed weights; factored: the factors, loaded with "
                        "sigmascale_jax.deploy.torch_lowrank.load_factored")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    info = export(args.model, args.out, args.format, overwrite=args.overwrite)
    loader = ("AutoModelForCausalLM.from_pretrained" if args.format == "dense"
              else "sigmascale_jax.deploy.torch_lowrank.load_factored")
    print(f"wrote {args.out}: {info['tensors']} tensors, {info['parameters']:,} parameters ({args.format}); "
          f"load it with {loader}({args.out!r})")
    return 0
