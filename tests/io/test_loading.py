"""Loading each checkpoint format into the params pytree."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import DATA, SMOLLM2_GGUF, STORIES, require, torch_logits

from sigmascale_jax.errors import UserError
from sigmascale_jax.io.hf_map import load_block, load_params
from sigmascale_jax.io.readers import unpermute_qk
from sigmascale_jax.io.sources import detect_kind, load_model, open_model
from sigmascale_jax.model.modeling import forward_jit


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `convert_hf_to_gguf.py` permutation, written out independently of ours."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("shape", [(12, 5), (12,)])
def test_unpermute_inverts_llama_cpp_permutation(shape):
    w = np.random.default_rng(0).standard_normal(shape)
    assert np.array_equal(unpermute_qk(llama_cpp_permute(w, 3), 3), w)
    assert not np.array_equal(llama_cpp_permute(w, 3), w)


def test_sharded_safetensors_load_like_single_file(tmp_path, tiny_models):
    single_folder, torch_model = tiny_models["llama"]
    sharded = tmp_path / "sharded"
    torch_model.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    _, a, _ = load_model(str(single_folder))
    cfg, b, _ = load_model(str(sharded))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.array_equal(np.asarray(x), np.asarray(y))


def test_one_block_loads_alone_and_matches_full_load():
    source = open_model(str(require(STORIES)))
    full = load_params(source.reader, source.cfg)
    block3 = load_block(source.reader, source.cfg, 3)
    assert set(block3) == {"attn_norm", "mlp_norm", "q", "k", "v", "o", "gate", "up", "down"}
    assert block3["k"]["w"].shape == (4 * 8, 64)  # GQA: 4 KV heads of 8
    assert np.array_equal(np.asarray(block3["down"]["w"]), np.asarray(full["blocks"][3]["down"]["w"]))


def test_gguf_folder_and_file_resolve_the_same():
    require(SMOLLM2_GGUF)
    assert detect_kind(SMOLLM2_GGUF) == "gguf"
    assert detect_kind(SMOLLM2_GGUF.parent) == "gguf"
    a, b = open_model(str(SMOLLM2_GGUF)), open_model(str(SMOLLM2_GGUF.parent))
    assert a.cfg == b.cfg and a.cfg.tie_word_embeddings
    w = a.reader.get("model.layers.5.self_attn.k_proj.weight")
    assert w.shape == (192, 576) and w.dtype == np.float32
    assert np.array_equal(w, b.reader.get("model.layers.5.self_attn.k_proj.weight"))


def test_lean_gguf_reader_sees_the_same_tensors_and_scalars():
    """Skipping the array fields (seconds of per-element views in gguf) changes no tensor and no scalar field."""
    import gguf

    from sigmascale_jax.io.readers import lean_gguf_reader

    lean, full = lean_gguf_reader(require(SMOLLM2_GGUF)), gguf.GGUFReader(str(SMOLLM2_GGUF))
    assert lean.data_offset == full.data_offset and len(lean.tensors) == len(full.tensors) == 272
    for a, b in zip(lean.tensors, full.tensors):
        assert (a.name, a.tensor_type, a.data_offset) == (b.name, b.tensor_type, b.data_offset)
        assert np.array_equal(a.shape, b.shape) and np.array_equal(np.asarray(a.data), np.asarray(b.data))
    assert list(lean.fields) == list(full.fields)
    skipped = [k for k, f in lean.fields.items() if not f.data]
    assert "tokenizer.ggml.tokens" in skipped and "tokenizer.ggml.merges" in skipped
    assert all(full.fields[k].types[0] == gguf.GGUFValueType.ARRAY for k in skipped)
    for k, f in lean.fields.items():
        if k not in skipped:
            assert str(f.contents()) == str(full.fields[k].contents()), k


def test_bfloat16_params(tiny_models):
    folder, torch_model = tiny_models["qwen3"]
    cfg, params, _ = load_model(str(folder), dtype=jnp.bfloat16)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(params))
    ids = np.arange(12)[None] % cfg.vocab_size
    ours = np.asarray(forward_jit(params, jnp.asarray(ids), cfg))
    ref = torch_logits(torch_model, ids)
    assert np.isfinite(ours).all()
    # bf16 keeps ~3 significant digits: close, not equal
    assert np.abs(ours - ref).max() < 0.1 * np.abs(ref).max()


def test_hub_id_offline_and_uncached_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(UserError, match="HF_HUB_OFFLINE"):
        open_model("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_hub_id_resolves_from_the_local_cache(monkeypatch, tmp_path, tiny_models):
    """A hub id found in the huggingface_hub cache loads with HF_HUB_OFFLINE=1."""
    folder, _ = tiny_models["qwen2"]
    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny-qwen2" / "snapshots" / ("0" * 40)
    shutil.copytree(folder, snap)
    (cache / "models--acme--tiny-qwen2" / "refs").mkdir(parents=True)
    (cache / "models--acme--tiny-qwen2" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    cfg, params, _ = load_model("acme/tiny-qwen2")
    assert cfg.model_type == "qwen2" and len(params["blocks"]) == 2


def test_compressed_folder_is_detected(tmp_path):
    (tmp_path / "compression.json").write_text(json.dumps({"method": "svd"}))
    assert detect_kind(tmp_path) == "compressed"


def test_untied_head_is_loaded_and_tied_head_is_not(tiny_models):
    _, llama, _ = load_model(str(tiny_models["llama"][0]))
    _, qwen2, _ = load_model(str(tiny_models["qwen2"][0]))
    assert "lm_head" in llama and "lm_head" not in qwen2



def test_gguf_config_and_tokenizer_are_converted_once(tmp_path, monkeypatch):
    """The second open of a GGUF file reads its converted config and tokenizer from the disk cache."""
    import transformers

    from sigmascale_jax.io.sources import open_model

    gguf = str(require(SMOLLM2_GGUF))
    text = "Hello world! Über naïve café 1234\n\n<|im_start|>user\nhi<|im_end|>"
    monkeypatch.setenv("SIGMASCALE_CACHE", "off")
    plain = open_model(gguf)
    plain_tok = plain.tokenizer()
    monkeypatch.setenv("SIGMASCALE_CACHE", str(tmp_path))
    first = open_model(gguf)
    first.tokenizer()

    def no_conversion(*a, **k):
        raise AssertionError("converted again")

    real_config = transformers.AutoConfig.from_pretrained
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained",
                        lambda *a, **k: no_conversion() if "gguf_file" in k else real_config(*a, **k))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: no_conversion() if "gguf_file" in k else real_from_pretrained(*a, **k))
    second = open_model(gguf)
    tok = second.tokenizer()
    assert second.cfg == first.cfg == plain.cfg
    assert tok(text).input_ids == plain_tok(text).input_ids
    chat = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(chat, tokenize=False) == plain_tok.apply_chat_template(chat, tokenize=False)
    assert (tok.eos_token_id, tok.bos_token_id) == (plain_tok.eos_token_id, plain_tok.bos_token_id)
    # a compression's output gets the cached conversion's files, copied without loading the tokenizer
    third = open_model(gguf)
    third.save_tokenizer(tmp_path / "out_tok")
    assert third._tokenizer is None
    copied = real_from_pretrained(str(tmp_path / "out_tok"))
    assert copied(text).input_ids == plain_tok(text).input_ids
    assert copied.apply_chat_template(chat, tokenize=False) == plain_tok.apply_chat_template(chat, tokenize=False)


def test_calibration_ids_are_cached_and_equal(tmp_path, monkeypatch):
    """The second compression's calibration windows come from the cache, token for token the same."""
    from sigmascale_jax.compress.pipeline import run_windows
    from sigmascale_jax.compress.plan import RunSpec
    from sigmascale_jax.io.sources import open_model

    spec = RunSpec(model=str(STORIES), ratio=0.3, nsamples=6, seq_len=64, calib="wikitext2-valid")
    data = str(require(DATA))
    monkeypatch.setenv("SIGMASCALE_CACHE", "off")
    plain = run_windows(open_model(str(STORIES)), spec, data)
    monkeypatch.setenv("SIGMASCALE_CACHE", str(tmp_path))
    first = run_windows(open_model(str(STORIES)), spec, data)
    src = open_model(str(STORIES))
    monkeypatch.setattr(type(src), "tokenizer", lambda self: (_ for _ in ()).throw(AssertionError("tokenized again")))
    second = run_windows(src, spec, data)
    assert (tmp_path / "calibration-ids").is_dir()
    np.testing.assert_array_equal(first, plain)
    np.testing.assert_array_equal(second, plain)
    assert second.dtype == np.int32 and second.shape == (6, 64)


def test_cache_keys_follow_the_weights_content_not_where_they_lie(tmp_path, monkeypatch):
    """A copied model folder (new path, new modification times) hits the cache; a changed byte does not."""
    from sigmascale_jax.io.diskcache import cached, model_fingerprint

    monkeypatch.setenv("SIGMASCALE_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "copy"
    shutil.copytree(require(STORIES), copy)  # copytree keeps mtimes; the copy must not
    for f in copy.iterdir():
        os.utime(f, ns=(1, 1))
    key = model_fingerprint(open_model(str(STORIES)))
    assert model_fingerprint(open_model(str(copy))) == key
    assert cached("probe", {"model": key}, lambda: 1) == (1, False)
    assert cached("probe", {"model": model_fingerprint(open_model(str(copy)))}, lambda: 2) == (1, True)
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    changed = model_fingerprint(open_model(str(copy)))
    assert changed != key and cached("probe", {"model": changed}, lambda: 3) == (3, False)


from transformers import AutoTokenizer as _AutoTokenizer  # noqa: E402

real_from_pretrained = _AutoTokenizer.from_pretrained


def test_command_lines_keep_compiled_programs_in_the_cache_folder(tmp_path):
    """`use_compilation_cache` (called first by compress / eval / generate) makes JAX write compiled programs under
    $SIGMASCALE_CACHE/xla; off, nothing is written; a folder the user chose wins."""
    from sigmascale_jax.io.diskcache import use_compilation_cache

    assert use_compilation_cache() == Path(os.environ["JAX_COMPILATION_CACHE_DIR"])  # conftest's choice is kept
    probe = ("import sys; from sigmascale_jax.io.diskcache import use_compilation_cache; "
             "print(use_compilation_cache(sys.argv[1] == 'on')); import jax, jax.numpy as jnp; "
             "jax.jit(lambda x: jnp.tanh(x @ x.T) + 1)(jnp.ones((32, 32))).block_until_ready()")
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    for mode in ("off", "on"):
        cache = tmp_path / mode
        proc = subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True, timeout=300,
                              env={**env, "SIGMASCALE_CACHE": str(cache)})
        assert proc.returncode == 0, proc.stderr
        files = [f for f in (cache / "xla").rglob("*") if f.is_file()] if (cache / "xla").exists() else []
        if mode == "on":
            assert proc.stdout.strip() == str(cache / "xla") and files
        else:
            assert proc.stdout.strip() == "None" and not files
