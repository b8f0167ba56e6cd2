"""Model configuration: the architecture facts the decoder needs, read from a Hugging Face config."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from sigmascale_jax.errors import UserError

# Temperatures below this decode greedily: the sampling distribution is argmax to float precision. Here, where no
# JAX is loaded, so the generate command's help reads it cheaply (model/sampling.py samples with it).
GREEDY_BELOW = 1e-5

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (hashable, so a config can be a static jit argument)."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder architecture (Llama family with grouped-query attention)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool
    qkv_bias: bool = False  # Qwen2: q/k/v carry a bias, o does not
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k, per head
    sliding_window: int | None = None  # Mistral: each query sees only the last `sliding_window` keys

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """`{name: (out, in)}` of the seven compressible projections of one block."""
        d, hd, f = self.hidden_size, self.head_dim, self.intermediate_size
        return {
            "q": (self.num_heads * hd, d),
            "k": (self.num_kv_heads * hd, d),
            "v": (self.num_kv_heads * hd, d),
            "o": (d, self.num_heads * hd),
            "gate": (f, d),
            "up": (f, d),
            "down": (d, f),
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        d["rope"] = RopeConfig(**d["rope"])
        return cls(**d)


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def _rope_from_hf(hf: Any) -> RopeConfig:
    # transformers v5 keeps rope_theta inside `rope_parameters`; v4 configs have
    # `rope_theta` at the top and an optional `rope_scaling` dict.
    params = dict(_get(hf, "rope_parameters") or {})
    scaling = _get(hf, "rope_scaling")
    if isinstance(scaling, dict):
        params = {**scaling, **params}
    theta = params.get("rope_theta", _get(hf, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UserError(
            f"unsupported rope type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0) or 1.0),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", _get(hf, "max_position_embeddings", 8192))
        ),
    )


def config_from_hf(hf: Any) -> ModelConfig:
    """Build a ModelConfig from a transformers `PretrainedConfig` (or its dict)."""
    model_type = _get(hf, "model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings"):
        value = _get(hf, key)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise UserError(f"the model's config has {key}={value!r}; it must be a whole number ≥ 1")
    hidden = int(_get(hf, "hidden_size"))
    heads = int(_get(hf, "num_attention_heads"))
    kv_heads = int(_get(hf, "num_key_value_heads") or heads)
    head_dim = int(_get(hf, "head_dim") or hidden // heads)
    if heads % kv_heads:
        raise UserError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    act = _get(hf, "hidden_act", "silu")
    if act != "silu":
        raise UserError(f"unsupported hidden_act {act!r}; supported: silu")
    sliding = None
    if model_type == "mistral":
        sliding = _get(hf, "sliding_window")
    elif model_type in ("qwen2", "qwen3") and _get(hf, "use_sliding_window", False):
        # Qwen applies the window only from `max_window_layers` on; we do not model
        # per-layer windows, so refuse rather than silently mis-evaluate.
        raise UserError(f"{model_type} with use_sliding_window=true is not supported")
    attention_bias = bool(_get(hf, "attention_bias", False))
    return ModelConfig(
        model_type=model_type,
        vocab_size=int(_get(hf, "vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(_get(hf, "intermediate_size")),
        num_layers=int(_get(hf, "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(_get(hf, "rms_norm_eps", 1e-6)),
        max_position_embeddings=int(_get(hf, "max_position_embeddings", 2048)),
        rope=_rope_from_hf(hf),
        tie_word_embeddings=bool(_get(hf, "tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=attention_bias and model_type != "qwen2",
        mlp_bias=bool(_get(hf, "mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        sliding_window=int(sliding) if sliding else None,
    )


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies `[head_dim // 2]` after the configured scaling.

    Computed in float32 exactly as transformers does, so angles agree bit for bit
    at long positions.
    """
    r = cfg.rope
    dim = cfg.head_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv = (np.float32(1.0) / (np.float32(r.theta) ** exponent)).astype(np.float32)
    if r.rope_type == "linear":
        inv = inv / np.float32(r.factor)
    elif r.rope_type == "llama3":
        old = r.original_max_position_embeddings
        low_wavelen = old / r.low_freq_factor
        high_wavelen = old / r.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / r.factor, inv)
        smooth = (old / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor)
        smoothed = (1 - smooth) * scaled / r.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def to_hf_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The transformers config fields (v5 names) that say what `cfg` says: `config_from_hf(to_hf_dict(cfg)) == cfg`."""
    r = cfg.rope
    rope: dict[str, Any] = {"rope_type": r.rope_type, "rope_theta": r.theta}
    if r.rope_type in ("linear", "llama3"):
        rope["factor"] = r.factor
    if r.rope_type == "llama3":
        rope.update(low_freq_factor=r.low_freq_factor, high_freq_factor=r.high_freq_factor,
                    original_max_position_embeddings=r.original_max_position_embeddings)
    out: dict[str, Any] = {
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu",
    }
    if cfg.model_type in ("llama", "mistral", "qwen3"):
        out["attention_bias"] = cfg.qkv_bias
    if cfg.model_type == "llama":
        out["mlp_bias"] = cfg.mlp_bias
    if cfg.model_type == "mistral":
        out["sliding_window"] = cfg.sliding_window
    if cfg.model_type in ("qwen2", "qwen3"):
        out["use_sliding_window"] = False
    return out


def check_token_windows(windows: Any, cfg: "ModelConfig", name: str = "windows") -> np.ndarray:
    """`windows` as int32 `[N, T]` (T ≥ 2) of ids the model knows, or an `ArgError` naming the argument."""
    from sigmascale_jax.errors import ArgError

    arr = np.asarray(windows)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise ArgError(name, f"must be an integer array [N, T] of token ids, got {arr.dtype} {list(arr.shape)}")
    if arr.shape[0] < 1 or arr.shape[1] < 2:
        raise ArgError(name, f"must hold at least one window of 2 tokens, got {list(arr.shape)}")
    if arr.min() < 0 or arr.max() >= cfg.vocab_size:
        raise ArgError(name, f"hold token ids outside 0..{cfg.vocab_size - 1}")
    if arr.shape[1] > cfg.max_position_embeddings:
        raise ArgError(name, f"are {arr.shape[1]} tokens long, past the model's {cfg.max_position_embeddings} "
                             "positions")
    return arr.astype(np.int32)
