"""Export to Hugging Face: stock dense checkpoints and factored ones, loaded by transformers, equal to the Flax model."""

from __future__ import annotations

import json
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import DATA, STORIES, TINY_CONFIGS, assert_one_line_error, randomize_, require, run_in_process

import sigmascale_jax
from sigmascale_jax.deploy.export import export
from sigmascale_jax.io.sources import load_model
from sigmascale_jax.model.modeling import forward_jit

SMALL = dict(nsamples=8, seq_len=64, batch_size=4, data_dir=str(DATA), progress=False)


def torch_logits_of(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(ids.astype(np.int64))).logits.float().numpy()


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory):
    """A random Qwen3 (q/k norms, GQA) sharing stories260k's tokenizer (vocab 512), so it can be calibrated."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("qwen3")
    cfg = AutoConfig.for_model("qwen3", **{**TINY_CONFIGS["qwen3"], "vocab_size": 512, "max_position_embeddings": 256})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").to(torch.float32).eval()
    randomize_(model, seed=7)
    model.save_pretrained(folder)
    for f in require(STORIES).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(f, folder / f.name)
    return folder


@pytest.mark.parametrize("source,encoding", [("stories", "plain"), ("stories", "pivga"), ("qwen3", "plain")])
def test_both_formats_load_in_transformers_with_the_flax_logits(tmp_path, tiny_qwen3, source, encoding):
    import torch
    from transformers import AutoModelForCausalLM

    from sigmascale_jax.deploy.torch_lowrank import load_factored

    model = str(STORIES) if source == "stories" else str(tiny_qwen3)
    run = tmp_path / "run"
    report = sigmascale_jax.compress(model, "svd-llm", 0.3, run, encoding=encoding, **SMALL)
    cfg, params, src = load_model(str(run))
    ids = np.asarray([src.tokenizer()("Once upon a time there was a little dog who liked to run.").input_ids])
    ours = np.asarray(forward_jit(params, jnp.asarray(ids), cfg))
    assert np.abs(ours).max() > 1
    export(str(run), tmp_path / "dense", "dense")
    export(str(run), tmp_path / "factored", "factored")
    dense = AutoModelForCausalLM.from_pretrained(str(tmp_path / "dense"), dtype=torch.float32).eval()
    factored = load_factored(tmp_path / "factored")
    assert np.abs(torch_logits_of(dense, ids) - ours).max() <= 1e-4
    assert np.abs(torch_logits_of(factored, ids) - ours).max() <= 1e-4
    assert factored.num_parameters() == report["params"]["model_compressed"]
    assert dense.num_parameters() == report["params"]["model_dense"]
    forms = json.loads((tmp_path / "factored" / "config.json").read_text())["sigmascale"]["projections"]
    assert {f["form"] for f in forms.values()} == {"lowrank" if encoding == "plain" else "pivga"}


def test_dense_export_round_trips_bit_for_bit(tmp_path):
    cfg, params, _ = load_model(str(require(STORIES)))
    export(str(STORIES), tmp_path / "again", "dense")
    cfg2, params2, src2 = load_model(str(tmp_path / "again"))
    assert cfg2 == cfg
    assert jax.tree.structure(params2) == jax.tree.structure(params)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)))
    assert src2.tokenizer()("Once upon a time").input_ids == load_model(str(STORIES))[2].tokenizer()("Once upon a time").input_ids


def test_export_cli_errors(tmp_path, capsys):
    from sigmascale_jax.deploy.export import main

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    assert_one_line_error(run_in_process(capsys, main, "--model", str(STORIES), "--out", str(tmp_path / "full")),
                          "--overwrite")
    assert_one_line_error(run_in_process(capsys, main, "--model", str(STORIES), "--out", str(tmp_path / "o"),
                                         "--format", "gguf"), "invalid choice: 'gguf'")
    assert_one_line_error(run_in_process(capsys, main, "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")),
                          "does not exist")
