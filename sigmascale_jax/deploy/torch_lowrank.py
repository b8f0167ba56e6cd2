"""Load a `--format factored` export into transformers, with low-rank projections (PyTorch; `pip install torch`).

    from sigmascale_jax.deploy.torch_lowrank import load_factored
    model = load_factored("exports/smollm2-sigmascale-0.2")      # a transformers model, eval mode
    model.num_parameters()                                          # the compressed count

The export's `config.json` is a stock transformers config plus a `"sigmascale"` entry
naming each projection's form (`"<layer>.<projection>": {"form": "lowrank" | "pivga" |
"dense", "rank": k}`). The model is built from the config, each low-rank projection's
`nn.Linear` is replaced by

- `LowRankLinear`: `c` (in → k, no bias) then `b` (k → out, the original bias):
  tensors `<proj>.c.weight [k, in]`, `<proj>.b.weight [out, k]`;
- `PivGaLinear`: `y = B'(x_P + R x_R)`: tensors `<proj>.r.weight [k, in − k]`,
  `<proj>.b.weight [out, k]` and the buffer `<proj>.perm [in]`;

and the safetensors state dict is loaded strictly (only a tied head may be absent).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

PROJECTION_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                      "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


class LowRankLinear(nn.Module):
    """`y = B (C x) + bias` with `C: [k, in]`, `B: [out, k]`: k(in + out) parameters."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.c = nn.Linear(in_features, rank, bias=False)
        self.b = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.c(x))


class PivGaLinear(nn.Module):
    """`y = B' (x_P + R x_R) + bias`: k(in + out) − k² parameters and a permutation buffer."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.register_buffer("perm", torch.arange(in_features, dtype=torch.int64))
        self.r = nn.Linear(in_features - rank, rank, bias=False)
        self.b = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xp = x.index_select(-1, self.perm)
        z = xp[..., : self.rank]
        if self.in_features > self.rank:
            z = z + self.r(xp[..., self.rank:])
        return self.b(z)


FORMS = {"lowrank": LowRankLinear, "pivga": PivGaLinear}


def load_factored(path: str | Path, dtype: torch.dtype = torch.float32):
    """The transformers model of a factored export, its low-rank projections as `LowRankLinear` / `PivGaLinear`."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    forms = raw.get("sigmascale", {}).get("projections")
    if forms is None:
        raise ValueError(f"{path / 'config.json'} has no 'sigmascale' projections: not a factored export")
    config = AutoConfig.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    layers = model.model.layers
    for key, spec in forms.items():
        if spec["form"] == "dense":
            continue
        i, name = key.split(".")
        parent_name, attr = PROJECTION_MODULES[name].split(".")
        parent = getattr(layers[int(i)], parent_name)
        old = getattr(parent, attr)
        new = FORMS[spec["form"]](old.in_features, old.out_features, spec["rank"], old.bias is not None)
        setattr(parent, attr, new.to(dtype))
    state = load_file(str(path / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - allowed or unexpected:
        raise ValueError(f"{path}: tensors missing {sorted(set(missing) - allowed)[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()
