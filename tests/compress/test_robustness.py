"""Bad inputs and interruptions through the command lines: one error line, the right exit code, nothing half-written.

Each class of the probe that found holes here (issue 12) has a case: config values,
output paths, malformed data files, settings found bad late, Ctrl-C, concurrent runs,
corrupt unfinished runs, dangerous paths, bad weights.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA, REPO, STORIES, assert_one_line_error, compress_cli, eval_cli, require

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
FAST = ["--method", "svd-llm", "--ratio", "0.3", "--nsamples", "8", "--seq-len", "32", "--batch-size", "4"]


def start_compress(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sigmascale_jax.compress", "--no-progress", "--data-dir", str(DATA),
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=ENV)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    end = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() < end, f"{path} did not appear"
        time.sleep(0.05)


def model_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(require(STORIES), dst)
    return dst


# ------------------------------------------------------------------ 1. config values


@pytest.mark.parametrize("line,fragment", [("sequential: 'no'", "sequential in"), ("alpha: .nan", "finite"),
                                           ("seed: -1", "--seed must be at least 0")])
def test_config_values_are_typed_like_flags(tmp_path, capsys, line, fragment):
    conf = tmp_path / "c.yaml"
    method = "asvd" if "alpha" in line else "svd-llm"
    conf.write_text(f"model: {STORIES}\nmethod: {method}\nratio: 0.3\n{line}\n")
    out = tmp_path / "o"
    assert_one_line_error(compress_cli(capsys, "--config", str(conf), "--out", str(out)), fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


# ------------------------------------------------------------------ 2. output paths


@pytest.mark.parametrize("where", ["proc", "under_file"])
def test_unwritable_out_fails_before_any_work(tmp_path, capsys, where):
    if where == "proc":
        out = Path("/proc/sigmascale-test/out")
    else:
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out"
    assert_one_line_error(compress_cli(capsys, "--model", str(STORIES), *FAST, "--out", str(out)), "cannot write --out")


def test_eval_json_is_checked_before_the_evaluation(tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    for target, fragment in ((tmp_path / "folder", "is a folder"), (Path("/proc/x/y.json"), "cannot write --json")):
        proc = eval_cli(capsys, "--model", str(STORIES), "--tasks", "c4", "--seq-len", "64", "--max-windows", "1",
                        "--json", str(target))
        assert_one_line_error(proc, fragment)
        assert "c4" not in proc.stdout  # nothing was evaluated


def test_full_disk_is_one_line_and_resumable(tmp_path, monkeypatch, capsys):
    """ENOSPC while saving block 2 (simulated in-process): one line, the finished blocks kept, the rerun finishes."""
    import errno

    from sigmascale_jax.compress import cli
    from sigmascale_jax.errors import run_cli
    from sigmascale_jax.io.checkpoint import save_pytree as real_save

    calls = {"n": 0}

    def full_on_third(path, tree):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(path, tree)

    monkeypatch.setattr("sigmascale_jax.io.checkpoint.save_pytree", full_on_third)
    out = tmp_path / "o"
    argv = ["--model", str(STORIES), *FAST, "--out", str(out), "--data-dir", str(DATA), "--no-progress"]
    assert run_cli(cli.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no space left") and "rerun" in err[0]
    assert len(list((tmp_path / "o.partial" / "blocks").glob("*.json"))) == 2
    monkeypatch.setattr("sigmascale_jax.io.checkpoint.save_pytree", real_save)
    assert run_cli(cli.main, argv) == 0
    assert json.loads((out / "compression.json").read_text())["resumed"]


# ------------------------------------------------------------------ 3. malformed data files


def test_config_json_that_is_not_json(tmp_path, capsys):
    model = model_copy(tmp_path)
    (model / "config.json").write_text("{not json")
    for proc in (compress_cli(capsys, "--model", str(model), *FAST, "--out", str(tmp_path / "o")),
                 eval_cli(capsys, "--model", str(model), "--max-windows", "1")):
        assert_one_line_error(proc, "config.json is not valid JSON")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


@pytest.mark.parametrize("content,fragment", [
    ('{"text": "fine"}\n{"text": 5}\n', "line 2"),
    ('{"text": "fine"}\nnull\n', "line 2"),
    ('["text"]\n', "line 1"),
    (b'{"text": "caf\xe9"}\n', "not UTF-8"),
])
def test_malformed_calibration_file(tmp_path, capsys, content, fragment):
    calib = tmp_path / "calib.jsonl"
    calib.write_bytes(content if isinstance(content, bytes) else content.encode())
    proc = compress_cli(capsys, "--model", str(STORIES), *FAST, "--calib", str(calib), "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, fragment)
    assert not (tmp_path / "o.partial").exists()


@pytest.mark.parametrize("bad", ["null", "[1, 2]", '{"text": null}'])
def test_malformed_c4_line(tmp_path, capsys, bad):
    data = tmp_path / "data"
    shutil.copytree(DATA / "c4", data / "c4")
    path = data / "c4" / "c4_validation_2k.jsonl"
    lines = path.read_text().splitlines()
    lines[4] = bad
    path.write_text("\n".join(lines) + "\n")
    proc = compress_cli(capsys, "--data-dir", str(data), "--model", str(STORIES), *FAST, "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, "line 5")


# ------------------------------------------------------------------ 4. settings found bad late


@pytest.mark.parametrize("extra,fragment", [
    (["--method", "sigmascale", "--lr", "nan"], "--lr must be a finite number"),
    (["--method", "sigmascale", "--holdout", "0.99"], "leaves none to learn on"),
    (["--method", "asvd", "--alpha", "inf"], "--alpha must be a finite number"),
])
def test_settings_are_checked_before_anything_is_written(tmp_path, capsys, extra, fragment):
    args = ["--model", str(STORIES), "--ratio", "0.3", "--nsamples", "8", "--out", str(tmp_path / "o"), *extra]
    assert_one_line_error(compress_cli(capsys, *args), fragment)
    assert list(tmp_path.iterdir()) == []


def test_reports_are_strict_json_with_normal_permissions(tmp_path):
    from sigmascale_jax.io.fileio import write_json_atomic

    write_json_atomic(tmp_path / "r.json", {"a": float("nan"), "b": [float("inf"), 1.0]})
    assert json.loads((tmp_path / "r.json").read_text(), parse_constant=lambda c: pytest.fail(c)) == {"a": None, "b": [None, 1.0]}
    mode = stat.S_IMODE((tmp_path / "r.json").stat().st_mode)
    mask = os.umask(0)
    os.umask(mask)
    assert mode == 0o666 & ~mask


# ------------------------------------------------------------------ 5. interrupts


@pytest.mark.parametrize("method", ["svd-llm", "sigmascale"])
def test_ctrl_c_stops_cleanly_and_the_rerun_resumes_bit_exactly(tmp_path, capsys, method):
    """SIGINT once block 0 is finished (for sigmascale: while block 1 learns): exit 130, one line, resumable."""
    if method == "sigmascale":
        extra = ["--method", method, "--ratio", "0.3", "--nsamples", "8", "--seq-len", "32", "--steps", "40",
                 "--step-windows", "2"]
    else:  # one window per device call, so that each block takes long enough to be interrupted in
        extra = ["--method", method, "--ratio", "0.3", "--nsamples", "64", "--seq-len", "256", "--batch-size", "1"]
    out = tmp_path / "o"
    proc = start_compress("--model", str(STORIES), *extra, "--out", str(out))
    wait_for(tmp_path / "o.partial" / "blocks" / "0000.json", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "interrupted" in lines[0] and "rerun the same command" in lines[0], err
    assert not out.exists() and (tmp_path / "o.partial" / "blocks" / "0000.json").is_file()
    data = ["--data-dir", str(DATA)]
    done = compress_cli(capsys, "--model", str(STORIES), *extra, "--out", str(out), *data)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "compression.json").read_text())["resumed"]
    ref = compress_cli(capsys, "--model", str(STORIES), *extra, "--out", str(tmp_path / "ref"), *data)
    assert ref.returncode == 0, ref.stderr
    import jax

    from sigmascale_jax.io.checkpoint import load_pytree

    a, b = load_pytree(out / "params"), load_pytree(tmp_path / "ref" / "params")
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_ctrl_c_while_starting_up_is_not_swallowed(tmp_path):
    proc = start_compress("--model", str(STORIES), *FAST, "--out", str(tmp_path / "o"))
    time.sleep(1.5)  # JAX is still loading
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


# ------------------------------------------------------------------ 6. concurrent runs


def test_a_second_run_on_the_same_out_is_refused(tmp_path, capsys):
    out = tmp_path / "o"
    # long enough (compiles and 12 steps a block) that the second run starts while the first holds the lock
    slow = ["--method", "sigmascale", "--ratio", "0.3", "--nsamples", "8", "--seq-len", "32", "--steps", "12"]
    first = start_compress("--model", str(STORIES), *slow, "--out", str(out))
    wait_for(tmp_path / "o.partial" / "spec.json", first)
    second = compress_cli(capsys, "--model", str(STORIES), *slow, "--out", str(out), "--overwrite")
    assert_one_line_error(second, "another sigmascale_jax command is writing")
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert (out / "compression.json").is_file() and not (tmp_path / ".o.lock").exists()


# ------------------------------------------------------------------ 7. unfinished runs


def test_a_corrupt_unfinished_run_names_the_block_and_overwrite_discards_it(tmp_path, capsys):
    out = tmp_path / "o"
    proc = start_compress("--model", str(STORIES), *FAST, "--out", str(out))
    wait_for(tmp_path / "o.partial" / "blocks" / "0001.json", proc)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    shutil.rmtree(tmp_path / "o.partial" / "blocks" / "0000")
    (tmp_path / "o.partial" / "blocks" / "0000").mkdir()
    data = ["--data-dir", str(DATA)]
    assert_one_line_error(compress_cli(capsys, "--model", str(STORIES), *FAST, "--out", str(out), *data),
                          "block 0", "--overwrite")
    # evaluating the unfinished folder, or the folder that does not exist yet, says what it is
    assert_one_line_error(eval_cli(capsys, "--model", str(tmp_path / "o.partial")), "unfinished compression run")
    assert_one_line_error(eval_cli(capsys, "--model", str(out)), "unfinished compression")
    done = compress_cli(capsys, "--model", str(STORIES), *FAST, "--out", str(out), "--overwrite", *data)
    assert done.returncode == 0, done.stderr
    assert not json.loads((out / "compression.json").read_text())["resumed"]


# ------------------------------------------------------------------ 8. dangerous or confusing paths


def test_out_that_would_replace_the_model_is_refused(tmp_path, capsys):
    model = model_copy(tmp_path)
    for out in (model, tmp_path):
        assert_one_line_error(compress_cli(capsys, "--model", str(model), *FAST, "--out", str(out), "--overwrite"),
                              "would replace the model")
    assert (model / "model.safetensors").is_file()


def test_compressing_a_compressed_model_is_refused(tmp_path, capsys):
    first = compress_cli(capsys, "--model", str(STORIES), *FAST, "--out", str(tmp_path / "c"), "--data-dir", str(DATA))
    assert first.returncode == 0, first.stderr
    assert stat.S_IMODE((tmp_path / "c" / "compression.json").stat().st_mode) & 0o044 == 0o044  # readable by all
    assert_one_line_error(compress_cli(capsys, "--model", str(tmp_path / "c"), *FAST, "--out", str(tmp_path / "d")),
                          "already a compressed model")


# ------------------------------------------------------------------ 9. bad weights


@pytest.mark.parametrize("block,left", [(0, False), (2, True)])
def test_nan_weights_stop_the_run_and_leave_only_resumable_work(tmp_path, capsys, block, left):
    from safetensors.numpy import load_file, save_file

    model = model_copy(tmp_path)
    tensors = load_file(model / "model.safetensors")
    name = f"model.layers.{block}.mlp.down_proj.weight"
    tensors[name] = tensors[name].copy()
    tensors[name][3, 5] = np.nan
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    proc = compress_cli(capsys, "--model", str(model), *FAST, "--out", str(tmp_path / "o"), "--data-dir", str(DATA))
    assert_one_line_error(proc, name, "NaN")
    assert (tmp_path / "o.partial").exists() == left  # finished blocks 0-1 are kept to resume; nothing else is
    assert not (tmp_path / "o").exists()


def test_wrong_tensor_shape_is_found_before_any_work(tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    model = model_copy(tmp_path)
    tensors = load_file(model / "model.safetensors")
    name = "model.layers.4.self_attn.o_proj.weight"
    tensors[name] = tensors[name][:, :-1].copy()
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    assert_one_line_error(compress_cli(capsys, "--model", str(model), *FAST, "--out", str(tmp_path / "o")), name, "shape")
    assert not (tmp_path / "o.partial").exists()
