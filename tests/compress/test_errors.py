"""Bad input: a one-line error on stderr, exit code 2, no traceback, nothing written.

One case runs the real command in a process of its own; the others run its `main` in this process as `run_cli` does
(`conftest.eval_cli`): the same exit code and stderr without a JAX start-up each."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import DATA, REPO, STORIES, assert_one_line_error, eval_cli, require


def run_eval_process(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sigmascale_jax.eval", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        timeout=300,
    )


@pytest.fixture
def run_eval(capsys, monkeypatch):
    def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        for k, v in (env or {}).items():
            monkeypatch.setenv(k, v)
        return eval_cli(capsys, *args)

    return run


def test_missing_path(tmp_path):
    assert_one_line_error(run_eval_process("--model", str(tmp_path / "nope")), "does not exist")


def test_folder_without_config(tmp_path, run_eval):
    (tmp_path / "README.md").write_text("not a model")
    assert_one_line_error(run_eval("--model", str(tmp_path)), "no config.json")


def test_truncated_safetensors(tmp_path, run_eval):
    src = require(STORIES)
    model = tmp_path / "model"
    shutil.copytree(src, model)
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out.json"
    proc = run_eval("--model", str(model), "--max-windows", "1", "--seq-len", "64", "--json", str(out))
    assert_one_line_error(proc, "model.safetensors")
    assert not out.exists()


def test_unsupported_model_type(tmp_path, run_eval):
    src = require(STORIES)
    model = tmp_path / "model"
    shutil.copytree(src, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (model / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(run_eval("--model", str(model)), "'gpt2'", "llama, mistral, qwen2, qwen3")


def test_seq_len_above_model_maximum(run_eval):
    proc = run_eval("--model", str(require(STORIES)), "--seq-len", "4096", "--max-windows", "1")
    assert_one_line_error(proc, "--seq-len 4096", "512")


def test_unknown_task(run_eval):
    assert_one_line_error(run_eval("--model", str(require(STORIES)), "--tasks", "wikitext2,lambada"), "'lambada'")


def test_missing_data_file_names_file_and_place(tmp_path, run_eval):
    (tmp_path / "c4").mkdir()
    proc = run_eval("--model", str(require(STORIES)), "--tasks", "c4", "--data-dir", str(tmp_path))
    assert_one_line_error(proc, "c4/c4_validation_2k.jsonl", str(tmp_path))


def test_data_dir_from_environment_is_used(tmp_path, run_eval):
    proc = run_eval("--model", str(require(STORIES)), "--tasks", "wikitext2", env={"SIGMASCALE_DATA": str(tmp_path)})
    assert_one_line_error(proc, "wiki.test.raw", str(tmp_path))


def test_not_a_gguf_file(tmp_path, run_eval):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 10)
    assert_one_line_error(run_eval("--model", str(bad)), "cannot read GGUF")


@pytest.mark.parametrize("flag,value", [("--batch-size", "0"), ("--max-windows", "0"), ("--seq-len", "1")])
def test_bad_numbers(flag, value, run_eval):
    assert_one_line_error(run_eval("--model", str(require(STORIES)), flag, value), flag)


def test_data_present():
    require(DATA / "wikitext-2-raw" / "wiki.test.raw")
