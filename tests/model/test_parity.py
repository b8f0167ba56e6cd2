"""The Flax decoder's logits match transformers (PyTorch, float32) to 1e-4."""

from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SMOLLM2_GGUF, STORIES, require, torch_logits

from sigmascale_jax.io.sources import load_model
from sigmascale_jax.model.modeling import forward_jit

TOL = 1e-4


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_tiny_random_models_match_transformers(tiny_models, model_type):
    folder, torch_model = tiny_models[model_type]
    cfg, params, _ = load_model(str(folder))
    assert cfg.model_type == model_type
    # 40 tokens: longer than Mistral's window of 7 and past llama3 scaling's original length of 16.
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 40))
    ours = np.asarray(forward_jit(params, jnp.asarray(ids), cfg))
    ref = torch_logits(torch_model, ids)
    assert np.abs(ref).max() > 1.0  # random weights give logits large enough to matter
    assert np.abs(ours - ref).max() <= TOL


def test_architecture_specifics_are_read(tiny_models):
    cfgs = {mt: load_model(str(folder))[0] for mt, (folder, _) in tiny_models.items()}
    assert cfgs["llama"].rope.rope_type == "llama3" and cfgs["llama"].rope.factor == 8.0
    assert cfgs["mistral"].sliding_window == 7 and cfgs["mistral"].head_dim == 32
    assert cfgs["qwen2"].qkv_bias and not cfgs["qwen2"].o_bias and cfgs["qwen2"].tie_word_embeddings
    assert cfgs["qwen3"].qk_norm and cfgs["qwen3"].head_dim == 24
    assert all(c.num_kv_heads == 2 and c.num_heads == 4 for c in cfgs.values())


def test_stories260k_matches_transformers():
    import torch
    from transformers import AutoModelForCausalLM

    cfg, params, source = load_model(str(require(STORIES)))
    ids = np.asarray(source.tokenizer()("Once upon a time, there was a little girl named Lily. She loved to play.").input_ids)[None]
    model = AutoModelForCausalLM.from_pretrained(str(STORIES), dtype=torch.float32).eval()
    ours = np.asarray(forward_jit(params, jnp.asarray(ids), cfg))
    assert np.abs(ours - torch_logits(model, ids)).max() <= TOL


def test_smollm2_gguf_matches_transformers_gguf_loader():
    """transformers dequantizes and un-permutes the GGUF itself: an independent check of our reader."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg, params, source = load_model(str(require(SMOLLM2_GGUF)))
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.num_layers) == (9, 3, 30)
    text = "The tower is 324 metres tall, about the same height as an 81-storey building."
    ids = np.asarray(source.tokenizer()(text).input_ids)[None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(
            str(SMOLLM2_GGUF.parent), gguf_file=SMOLLM2_GGUF.name, dtype=torch.float32
        ).eval()
    ours = np.asarray(forward_jit(params, jnp.asarray(ids), cfg))
    ref = torch_logits(model, ids)
    # SmolLM2's residual stream carries activations of ~2.3e4 (float32 ulp 2e-3 there),
    # so summation order alone moves logits by ~1e-4: measured 0.9-1.4e-4 against
    # transformers, whose own float32 logits are 5e-5 off its float64 ones. The
    # bound is therefore 2e-4 here (1e-5 of the logit scale), 1e-4 elsewhere.
    assert np.abs(ours - ref).max() <= 2 * TOL
    assert (ours.argmax(-1) == ref.argmax(-1)).all()
