"""Checkpoint mapping: Hugging Face tensor names -> the params pytree of `modeling`.

Tensors are read one at a time through a `TensorReader`, so a model (or a single
block) is loaded without holding the checkpoint twice.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from sigmascale_jax.errors import UserError
from sigmascale_jax.io.readers import TensorReader
from sigmascale_jax.model.config import ModelConfig

# our projection name -> HF module path inside a layer
HF_PROJECTIONS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


def _has_bias(cfg: ModelConfig, name: str) -> bool:
    if name in ("q", "k", "v"):
        return cfg.qkv_bias
    if name == "o":
        return cfg.o_bias
    return cfg.mlp_bias


def _tensor(reader: TensorReader, name: str, shape: tuple[int, ...], dtype: Any) -> jnp.ndarray:
    a = reader.get(name)
    if tuple(a.shape) != tuple(shape):
        raise UserError(f"tensor {name} has shape {tuple(a.shape)}, the config implies {tuple(shape)}")
    a = np.asarray(a, dtype=np.float32) if a.dtype != np.float32 else a
    if not np.isfinite(a).all():
        raise UserError(f"tensor {name} holds NaN or Inf values")
    return jnp.asarray(a, dtype=dtype)


def block_tensors(cfg: ModelConfig, i: int) -> dict[tuple[str, ...], tuple[str, tuple[int, ...]]]:
    """Block `i`'s params as `{pytree path: (HF tensor name, shape)}`."""
    pre = f"model.layers.{i}."
    d = cfg.hidden_size
    out = {
        ("attn_norm",): (pre + "input_layernorm.weight", (d,)),
        ("mlp_norm",): (pre + "post_attention_layernorm.weight", (d,)),
    }
    for name, (out_dim, in_dim) in cfg.projection_shapes().items():
        hf = pre + HF_PROJECTIONS[name]
        out[(name, "w")] = (hf + ".weight", (out_dim, in_dim))
        if _has_bias(cfg, name):
            out[(name, "bias")] = (hf + ".bias", (out_dim,))
    if cfg.qk_norm:
        out[("q_norm",)] = (pre + "self_attn.q_norm.weight", (cfg.head_dim,))
        out[("k_norm",)] = (pre + "self_attn.k_norm.weight", (cfg.head_dim,))
    return out


def outer_tensors(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[str, tuple[int, ...]]]:
    """Everything but the blocks, as `{pytree path: (HF tensor name, shape)}`."""
    v, d = cfg.vocab_size, cfg.hidden_size
    out = {("embed",): ("model.embed_tokens.weight", (v, d)), ("final_norm",): ("model.norm.weight", (d,))}
    # Some tied checkpoints still carry a copy of the head; tying decides.
    if not cfg.tie_word_embeddings:
        out[("lm_head",)] = ("lm_head.weight", (v, d))
    return out


def _load(reader: TensorReader, tensors: dict, dtype: Any) -> dict:
    tree: dict[str, Any] = {}
    for path, (name, shape) in tensors.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = _tensor(reader, name, shape, dtype)
    return tree


def load_block(reader: TensorReader, cfg: ModelConfig, i: int, dtype: Any = jnp.float32) -> dict:
    """Params of decoder block `i` (dense projections)."""
    return _load(reader, block_tensors(cfg, i), dtype)


def load_outer(reader: TensorReader, cfg: ModelConfig, dtype: Any = jnp.float32) -> dict:
    """Everything but the blocks: embeddings, final norm and (untied) LM head."""
    return _load(reader, outer_tensors(cfg), dtype)


def check_dense_params(params: dict, cfg: ModelConfig) -> None:
    """Every array of a dense params pytree has the shape `cfg` implies (what `load_model` would give it), checked
    once where params enter the library: an `ArgError` naming the first that does not, or that is missing."""
    from sigmascale_jax.errors import ArgError

    def at(tree: Any, path: tuple) -> Any:
        for key in path:
            if isinstance(tree, dict) and key in tree:
                tree = tree[key]
            elif hasattr(tree, key if isinstance(key, str) else "_"):  # a Dense leaf's w / bias
                tree = getattr(tree, key)
            elif isinstance(tree, (list, tuple)) and isinstance(key, int) and key < len(tree):
                tree = tree[key]
            else:
                return None
        return tree

    blocks = params.get("blocks") if isinstance(params, dict) else None
    if not isinstance(blocks, (list, tuple)) or len(blocks) != cfg.num_layers:
        got = len(blocks) if isinstance(blocks, (list, tuple)) else type(blocks).__name__
        raise ArgError("params", f"must hold a list of {cfg.num_layers} blocks as cfg says, got {got}")
    wanted = dict(outer_tensors(cfg))
    for i in range(cfg.num_layers):
        wanted.update({("blocks", i, *k): v for k, v in block_tensors(cfg, i).items()})
    for path, (_, shape) in wanted.items():
        got = at(params, path)
        where = "/".join(map(str, path))
        if got is None:
            raise ArgError("params", f"have no {where} (cfg implies one of shape {list(shape)})")
        if tuple(np.shape(got)) != tuple(shape):
            raise ArgError("params", f"{where} is {list(np.shape(got))} but cfg implies {list(shape)}: params and "
                                     "cfg describe different models")


def check_checkpoint(reader: TensorReader, cfg: ModelConfig) -> None:
    """Every tensor the model needs is present with the shape the config implies (metadata only, no data read)."""
    tensors = dict(outer_tensors(cfg))
    for i in range(cfg.num_layers):
        tensors.update({("blocks", i, *k): v for k, v in block_tensors(cfg, i).items()})
    for name, shape in tensors.values():
        got = tuple(reader.shape(name))
        if got != tuple(shape):
            raise UserError(f"tensor {name} has shape {got}, the config implies {tuple(shape)}")


def load_params(reader: TensorReader, cfg: ModelConfig, dtype: Any = jnp.float32, progress: bool = False) -> dict:
    """The whole params pytree."""
    from tqdm.auto import tqdm

    params = load_outer(reader, cfg, dtype)
    params["blocks"] = [
        load_block(reader, cfg, i, dtype)
        for i in tqdm(range(cfg.num_layers), desc="loading blocks", disable=not progress, leave=False)
    ]
    return params
