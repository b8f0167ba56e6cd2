"""Round 4 (issue 41): every path a run reads is an input no output may replace, and bad arguments — on the command
line and from Python — are one-line errors that name them, found before any long work."""

from __future__ import annotations

import hashlib
import shutil
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA, STORIES, assert_one_line_error, compress_cli, require

FAST = ["--model", str(STORIES), "--method", "svd-llm", "--ratio", "0.3", "--nsamples", "8", "--seq-len", "32",
        "--batch-size", "4", "--data-dir", str(DATA)]


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ data loss: every path a run reads is an input


def test_the_healing_text_is_an_input_that_out_cannot_replace(tmp_path, capsys):
    folder = tmp_path / "texts"
    folder.mkdir()
    text = folder / "text.txt"
    text.write_text("Once upon a time there was a little dog. " * 400)
    before = text.read_bytes()
    proc = compress_cli(capsys, *FAST, "--heal-steps", "2", "--heal-calib", str(text), "--out", str(folder),
                        "--overwrite")
    assert_one_line_error(proc, "--out", "would replace the healing text")
    assert text.read_bytes() == before and not (tmp_path / "texts.partial").exists()


def test_the_run_that_supplies_the_ranks_is_an_input(tmp_path, capsys):
    src = tmp_path / "src"
    assert compress_cli(capsys, *FAST, "--out", str(src)).returncode == 0
    before = snapshot(src)
    proc = compress_cli(capsys, *FAST, "--ranks", "from-run", "--ranks-from", str(src), "--out", str(src),
                        "--overwrite")
    assert_one_line_error(proc, "--out", "would replace the run that supplies the ranks")
    assert snapshot(src) == before
    report = src / "compression.json"
    proc = compress_cli(capsys, *FAST, "--ranks", "from-run", "--ranks-from", str(report), "--out", str(src),
                        "--overwrite")  # its report named as a file: the folder holding it is still refused
    assert_one_line_error(proc, "--out", "would replace the run that supplies the ranks")
    assert snapshot(src) == before


def test_the_config_file_is_an_input(tmp_path, capsys):
    folder = tmp_path / "cfg"
    folder.mkdir()
    config = folder / "run.yaml"
    config.write_text(f"model: {STORIES}\nmethod: svd-llm\nratio: 0.3\nnsamples: 8\nseq-len: 32\n")
    proc = compress_cli(capsys, "--config", str(config), "--data-dir", str(DATA), "--out", str(folder), "--overwrite")
    assert_one_line_error(proc, "--out", "would replace the config file")
    assert config.is_file()


def test_a_missing_healing_text_is_refused_before_any_work(tmp_path, capsys):
    proc = compress_cli(capsys, *FAST, "--heal-steps", "2", "--heal-calib", str(tmp_path / "none.txt"), "--out",
                        str(tmp_path / "o"))
    assert_one_line_error(proc, "--heal-calib", "no such file")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_healing_windows_beyond_the_machines_memory_are_refused_before_any_work(tmp_path, capsys):
    proc = compress_cli(capsys, *FAST, "--heal-steps", "2", "--heal-samples", str(10**12), "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, "--heal-samples", "host memory")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


# ------------------------------------------------------------------ Python callers: errors that name the argument


@pytest.fixture(scope="module")
def stories():
    import jax

    import sigmascale_jax as ssj

    cfg, params, source = ssj.load_model(str(require(STORIES)))
    return cfg, jax.device_get(params)


@pytest.mark.parametrize("kwargs,fragment", [
    ({"temperature": -1.0}, "temperature must be a finite number"),
    ({"temperature": float("nan")}, "temperature must be a finite number"),
    ({"top_p": 0.0}, "top_p must lie in (0, 1]"),
    ({"top_p": 1.5}, "top_p must lie in (0, 1]"),
    ({"max_new_tokens": 0}, "max_new_tokens must be a whole number"),
    ({"max_new_tokens": 10**6}, "max_new_tokens 1000000 after a prompt of 3 tokens exceeds"),
    ({"prompt": [1, 2, 3]}, "prompt must be an integer array [batch, tokens]"),
    ({"prompt": [[0.5, 1.0]]}, "prompt must be an integer array"),
    ({"prompt": [[1, 10**6]]}, "prompt holds token ids outside"),
    ({"seed": -3}, "seed must lie in"),
])
def test_generate_refuses_bad_arguments_by_name(stories, kwargs, fragment):
    import sigmascale_jax as ssj

    cfg, params = stories
    args = {"prompt": [[1, 2, 3]], "max_new_tokens": 2, **kwargs}
    prompt, n = args.pop("prompt"), args.pop("max_new_tokens")
    with pytest.raises(ssj.UserError) as err:
        ssj.generate(params, cfg, prompt, n, **args)
    assert fragment in str(err.value) and "--" not in str(err.value)  # Python callers see argument names


@pytest.mark.parametrize("windows,fragment", [
    (np.zeros((2, 16), np.float32), "windows must be an integer array"),
    (np.full((2, 16), 10**6), "windows hold token ids outside"),
    (np.zeros(16, np.int32), "windows must be an integer array"),
    (np.zeros((2, 1), np.int32), "at least one window of 2 tokens"),
])
def test_perplexity_refuses_bad_windows_by_name(stories, windows, fragment):
    import sigmascale_jax as ssj

    cfg, params = stories
    with pytest.raises(ssj.UserError, match=fragment.replace("(", r"\(")):
        ssj.perplexity(params, cfg, windows, progress=False)


def test_quantize_and_factorizers_refuse_bad_arguments_by_name():
    import jax.numpy as jnp

    import sigmascale_jax as ssj

    w = np.random.default_rng(0).standard_normal((8, 6)).astype(np.float32)
    with pytest.raises(ssj.UserError, match="group must be a whole number of columns ≥ 1, got 0"):
        ssj.quantize(w, "int8", 0)
    with pytest.raises(ssj.UserError, match="group must be even for int4"):
        ssj.quantize(w, "int4", 3)
    with pytest.raises(ssj.UserError, match="kind must be one of"):
        ssj.quantize(w, "int5", 2)
    with pytest.raises(ssj.UserError, match="x must be a float matrix"):
        ssj.quantize(w[0], "int8", 2)
    gram = jnp.asarray(w.T @ w + np.eye(6, dtype=np.float32))
    for fn in (lambda k: ssj.svd_llm_factors(jnp.asarray(w), gram, k), lambda k: ssj.svd_factors(jnp.asarray(w), k)):
        with pytest.raises(ssj.UserError, match=r"rank must be a whole number in 1\.\.6 for a 8x6 matrix, got 7"):
            fn(7)
        with pytest.raises(ssj.UserError, match="rank must be a whole number"):
            fn(0)
    b, c = ssj.svd_llm_factors(jnp.asarray(w), gram, 6)  # full rank is allowed
    assert b.shape == (8, 6) and c.shape == (6, 6)


def test_compress_params_refuses_params_that_disagree_with_cfg(stories):
    import dataclasses

    import sigmascale_jax as ssj

    cfg, params = stories
    windows = np.zeros((4, 16), np.int32)
    wrong = dataclasses.replace(cfg, intermediate_size=cfg.intermediate_size - 44)  # 172-wide weights, cfg says 128
    with pytest.raises(ssj.UserError, match=r"params blocks/0/gate/w is \[172, 64\] but cfg implies \[128, 64\]"):
        ssj.compress_params(params, wrong, windows, ssj.make_plan("svd"), 0.3)
    short = {**params, "blocks": params["blocks"][:3]}
    with pytest.raises(ssj.UserError, match="params must hold a list of 5 blocks"):
        ssj.compress_params(short, cfg, windows, ssj.make_plan("svd"), 0.3)
    with pytest.raises(ssj.UserError, match="windows hold token ids outside"):
        ssj.compress_params(params, cfg, windows + 10**6, ssj.make_plan("svd"), 0.3)


# ------------------------------------------------------------------ commands: one line, before any long work


@pytest.mark.parametrize("args,fragment", [
    (["--gptq-damp", "1e300", "--quantize", "int4", "--quantizer", "gptq"], "--gptq-damp must be at most 100"),
    (["--mesh", "data=²"], "--mesh takes data=N,model=M"),
    (["--heal-steps", "2", "--heal-seq-len", "100000"], "--heal-seq-len 100000 exceeds"),
])
def test_bad_settings_are_one_line_errors_before_any_work(tmp_path, capsys, args, fragment):
    proc = compress_cli(capsys, *FAST, *args, "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, fragment)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


@pytest.mark.parametrize("size", ["1.2.3GB", "1e999GB", "0GB", "-5GB"])
def test_plan_only_refuses_bad_device_memory(capsys, size):
    proc = compress_cli(capsys, "--model", "tests/data/configs/llama-3.1-8b.json", "--method", "svd-llm", "--ratio",
                        "0.2", "--plan-only", "--device-memory", size)
    assert_one_line_error(proc, "--device-memory")


def test_plan_only_refuses_a_config_with_a_negative_size(tmp_path, capsys):
    cfg = json.loads(Path("tests/data/configs/llama-3.1-8b.json").read_text())
    cfg["hidden_size"] = -4096
    (tmp_path / "bad.json").write_text(json.dumps(cfg))
    proc = compress_cli(capsys, "--model", str(tmp_path / "bad.json"), "--method", "svd-llm", "--ratio", "0.2",
                        "--plan-only")
    assert_one_line_error(proc, "hidden_size=-4096", "whole number")


def test_an_immutable_out_is_refused_before_the_run(tmp_path, capsys):
    import subprocess

    out = tmp_path / "locked"
    out.mkdir()
    (out / "old.txt").write_text("x")
    if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode:
        pytest.skip("this file system or user cannot make a folder immutable (chattr +i)")
    try:
        proc = compress_cli(capsys, *FAST, "--out", str(out), "--overwrite")
        assert_one_line_error(proc, "cannot write --out", str(out))
        assert not (tmp_path / "locked.partial").exists()
    finally:
        subprocess.run(["chattr", "-i", str(out)], check=True)


def test_heal_compressed_checks_its_settings_and_keys_its_checkpoint_by_the_source(tmp_path, capsys):
    import sigmascale_jax as ssj
    from sigmascale_jax.compress.refine import heal

    common = {"nsamples": 8, "seq_len": 32, "batch_size": 4, "data_dir": str(DATA), "progress": False}
    ssj.compress(str(require(STORIES)), "svd-llm", 0.3, tmp_path / "a", **common)
    with pytest.raises(ssj.UserError, match="exceeds the model's maximum"):
        heal.heal_compressed(tmp_path / "a", tmp_path / "h", heal_steps=2, heal_seq_len=100000, data_dir=str(DATA),
                             progress=False)
    assert not (tmp_path / "h").exists() and not (tmp_path / "h.partial").exists()
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # another folder (the same report, elsewhere)
    keys = []
    real = heal._Checkpoint.__init__

    def record(self, staging, key):
        keys.append(key)
        real(self, staging, key)

    kw = dict(heal_steps=2, heal_samples=8, heal_holdout=4, heal_eval_every=2, data_dir=str(DATA), progress=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(heal._Checkpoint, "__init__", record)
        heal.heal_compressed(tmp_path / "a", tmp_path / "ha", **kw)
        heal.heal_compressed(tmp_path / "b", tmp_path / "hb", **kw)
    assert keys[0]["source"] != keys[1]["source"] and keys[0] != keys[1]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("who,fragment", [("0", "0 of the 1 other processes joined"), ("1", "no process 0 answered")])
def test_a_process_without_its_peers_stops_with_one_line_in_bounded_time(tmp_path, capsys, who, fragment):
    import time

    port = _free_port()
    t0 = time.monotonic()
    proc = compress_cli(capsys, *FAST, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                        "--process-id", who, "--join-timeout", "3", "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, "--coordinator", fragment)
    assert time.monotonic() - t0 < 30 and not (tmp_path / "o.partial").exists()


@pytest.mark.parametrize("address", ["127.0.0.1:99999", "127.0.0.1:0", "127.0.0.1:65535", "127.0.0.1:x"])
def test_a_bad_coordinator_port_is_refused(tmp_path, capsys, address):
    proc = compress_cli(capsys, *FAST, "--coordinator", address, "--num-processes", "2", "--process-id", "0",
                        "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, "--coordinator takes HOST:PORT")


def test_coordinator_auto_off_a_cluster_is_one_line(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import REPO

    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "OMPI", "TPU", "MEGASCALE"))}
    proc = subprocess.run([sys.executable, "-m", "sigmascale_jax.compress", *FAST, "--coordinator", "auto",
                           "--out", str(tmp_path / "o"), "--no-progress"], capture_output=True, text=True, cwd=REPO,
                          env={**env, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert_one_line_error(proc, "--coordinator auto")
