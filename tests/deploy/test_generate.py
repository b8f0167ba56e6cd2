"""Generation with the KV cache: the same tokens as argmax over repeated full forward passes, and as transformers."""

from __future__ import annotations

import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import DATA, REPO, STORIES, assert_one_line_error, require, run_in_process

import sigmascale_jax
from sigmascale_jax.deploy.generate import generate, sample
from sigmascale_jax.io.sources import load_model
from sigmascale_jax.model.modeling import forward_jit


def argmax_by_full_passes(params, cfg, prompt: np.ndarray, n: int) -> np.ndarray:
    """Greedy decoding by full forward passes over the sequence so far. The sequence is held at its final length
    (zeros after the tokens decoded so far): a causal model's logits at a position do not see what follows it, and
    one shape compiles once."""
    prompt = np.asarray(prompt)
    t0 = prompt.shape[1]
    tokens = np.zeros((prompt.shape[0], t0 + n), prompt.dtype)
    tokens[:, :t0] = prompt
    for cur in range(t0, t0 + n):
        logits = np.asarray(forward_jit(params, jnp.asarray(tokens), cfg))
        tokens[:, cur] = logits[:, cur - 1].argmax(-1)
    return tokens


def test_greedy_with_the_cache_equals_argmax_of_full_passes_on_stories260k():
    cfg, params, source = load_model(str(require(STORIES)))
    prompt = np.asarray([source.tokenizer()("Once upon a time, there was a").input_ids])
    got = generate(params, cfg, prompt, 24)
    np.testing.assert_array_equal(got, argmax_by_full_passes(params, cfg, prompt, 24))


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen3"])
def test_greedy_with_the_cache_on_tiny_gqa_models(tiny_models, model_type):
    """Grouped-query attention (2 KV heads for 4), Mistral's sliding window of 7, Qwen3's q/k norms; batch of 2."""
    folder, _ = tiny_models[model_type]
    cfg, params, _ = load_model(str(folder))
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 9))
    got = generate(params, cfg, prompt, 12)  # 21 positions: past the sliding window
    np.testing.assert_array_equal(got, argmax_by_full_passes(params, cfg, prompt, 12))


def test_every_projection_form_decodes_alike(tmp_path):
    """PivGa with int8 factors through the cache equals the same model's full passes."""
    out = tmp_path / "p"
    sigmascale_jax.compress(str(STORIES), "svd-llm", 0.3, out, encoding="pivga", quantize="int8", nsamples=8,
                            seq_len=64, batch_size=4, data_dir=str(DATA), progress=False)
    cfg, params, source = load_model(str(out))
    prompt = np.asarray([source.tokenizer()("The cat sat").input_ids])
    np.testing.assert_array_equal(generate(params, cfg, prompt, 16), argmax_by_full_passes(params, cfg, prompt, 16))


def test_greedy_equals_transformers_generate_on_stories260k():
    import torch
    from transformers import AutoModelForCausalLM

    cfg, params, source = load_model(str(require(STORIES)))
    prompt = np.asarray([source.tokenizer()("Lily went to the park and").input_ids])
    model = AutoModelForCausalLM.from_pretrained(str(STORIES), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model.generate(torch.from_numpy(prompt.astype(np.int64)), max_new_tokens=30, do_sample=False,
                             eos_token_id=None, pad_token_id=0).numpy()
    np.testing.assert_array_equal(generate(params, cfg, prompt, 30), ref)


def test_sampling_keeps_to_the_nucleus():
    import jax

    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    draws = [int(sample(logits, jax.random.key(i), 1.0, 0.7)[0]) for i in range(200)]
    assert set(draws) == {0, 1}  # 0.5 + 0.3 reach 0.7: the rest never comes up
    assert int(sample(logits, jax.random.key(0), 0.0, 0.7)[0]) == 0


def test_generate_cli_streams_and_checks_its_input(capsys):
    from sigmascale_jax.deploy.generate import main

    proc = subprocess.run([sys.executable, "-m", "sigmascale_jax.generate", "--model", str(STORIES), "--prompt",
                           "Once upon a time", "--max-new-tokens", "12"], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Once upon a time") and len(proc.stdout) > len("Once upon a time") + 10
    for args, fragment in ((["--top-p", "0"], "--top-p"), (["--temperature", "-1"], "--temperature"),
                           (["--max-new-tokens", "0"], "--max-new-tokens"), (["--max-new-tokens", "600"], "positions"),
                           (["--chat"], "no chat template")):
        res = run_in_process(capsys, main, "--model", str(STORIES), "--prompt", "Hi", *args)
        assert_one_line_error(res, fragment)
