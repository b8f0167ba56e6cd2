"""Checkpoint mapping: Hugging Face tensor names -> the params pytree of `modeling`.

Tensors are read one at a time through a `TensorReader`, so a model (or a single
block) is loaded without holding the checkpoint twice.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from sigmascale_jax.config import ModelConfig
from sigmascale_jax.errors import UserError
from sigmascale_jax.readers import TensorReader

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


def load_block(reader: TensorReader, cfg: ModelConfig, i: int, dtype: Any = jnp.float32) -> dict:
    """Params of decoder block `i` (dense projections)."""
    pre = f"model.layers.{i}."
    d = cfg.hidden_size
    block: dict[str, Any] = {
        "attn_norm": _tensor(reader, pre + "input_layernorm.weight", (d,), dtype),
        "mlp_norm": _tensor(reader, pre + "post_attention_layernorm.weight", (d,), dtype),
    }
    for name, (out_dim, in_dim) in cfg.projection_shapes().items():
        hf = pre + HF_PROJECTIONS[name]
        p = {"w": _tensor(reader, hf + ".weight", (out_dim, in_dim), dtype)}
        if _has_bias(cfg, name):
            p["bias"] = _tensor(reader, hf + ".bias", (out_dim,), dtype)
        block[name] = p
    if cfg.qk_norm:
        block["q_norm"] = _tensor(reader, pre + "self_attn.q_norm.weight", (cfg.head_dim,), dtype)
        block["k_norm"] = _tensor(reader, pre + "self_attn.k_norm.weight", (cfg.head_dim,), dtype)
    return block


def load_outer(reader: TensorReader, cfg: ModelConfig, dtype: Any = jnp.float32) -> dict:
    """Everything but the blocks: embeddings, final norm and (untied) LM head."""
    v, d = cfg.vocab_size, cfg.hidden_size
    params = {
        "embed": _tensor(reader, "model.embed_tokens.weight", (v, d), dtype),
        "final_norm": _tensor(reader, "model.norm.weight", (d,), dtype),
    }
    # Some tied checkpoints still carry a copy of the head; tying decides.
    if not cfg.tie_word_embeddings:
        params["lm_head"] = _tensor(reader, "lm_head.weight", (v, d), dtype)
    return params


def load_params(reader: TensorReader, cfg: ModelConfig, dtype: Any = jnp.float32, progress: bool = False) -> dict:
    """The whole params pytree."""
    from tqdm.auto import tqdm

    params = load_outer(reader, cfg, dtype)
    params["blocks"] = [
        load_block(reader, cfg, i, dtype)
        for i in tqdm(range(cfg.num_layers), desc="loading blocks", disable=not progress, leave=False)
    ]
    return params
