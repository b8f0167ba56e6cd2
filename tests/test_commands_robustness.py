"""No command may destroy a model, and every command keeps the error promise (issue 28).

One case per class the probe found, across compress, eval, generate and export: an
output over an input, writers without a lock, a folder whose report does not match its
params, tracebacks from odd values, settings found bad only when they fail, the
streamed text at the seam, and the small ones. Each error case checks: exit code 2, a
single `error:` line, no traceback, the inputs byte-identical afterwards, nothing
complete-looking left.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA, REPO, STORIES, assert_one_line_error, compress_cli, eval_cli, require, run_in_process

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
FAST = ["--method", "svd-llm", "--ratio", "0.3", "--nsamples", "8", "--seq-len", "32", "--batch-size", "4",
        "--data-dir", str(DATA)]
INT4 = [*FAST, "--quantize", "int4", "--group-size", "16"]


def generate_cli(capsys, *args: str) -> subprocess.CompletedProcess:
    from sigmascale_jax.deploy.generate import main

    return run_in_process(capsys, main, *args)


def export_cli(capsys, *args: str) -> subprocess.CompletedProcess:
    from sigmascale_jax.deploy.export import main

    return run_in_process(capsys, main, *args)


def command(module: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", f"sigmascale_jax.{module}", *args], cwd=REPO, env=ENV, **kw)


def snapshot(root: Path) -> dict[str, str]:
    """sha1 of every file under `root` (and `root` itself if a file): compared before and after a command."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root.parent)): hashlib.sha1(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A plain and an int4 compressed stories260k, made once (copy before editing)."""
    import sigmascale_jax

    root = tmp_path_factory.mktemp("compressed")
    common = dict(nsamples=8, seq_len=32, batch_size=4, data_dir=str(DATA), progress=False)
    sigmascale_jax.compress(str(require(STORIES)), "svd-llm", 0.3, root / "plain", **common)
    sigmascale_jax.compress(str(STORIES), "svd-llm", 0.3, root / "int4", quantize="int4", group_size=16, **common)
    return root


def copy_of(folders: Path, name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(folders / name, dst)
    return dst


def left_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------ 1. an output over an input


@pytest.mark.parametrize("target", ["compression.json", "params/manifest.ocdbt", "tokenizer/tokenizer.json",
                                    "new.json"])
def test_eval_json_never_writes_into_the_model_being_read(tmp_path, capsys, folders, target):
    model = copy_of(folders, "plain", tmp_path)
    before = snapshot(model)
    proc = eval_cli(capsys, "--model", str(model), "--tasks", "c4", "--seq-len", "32", "--max-windows", "1",
                    "--json", str(model / target))
    assert_one_line_error(proc, "--json", "would replace the model being evaluated")
    assert snapshot(model) == before


def test_eval_json_never_replaces_an_hf_model_file_or_the_data(tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(require(STORIES), model)
    link = tmp_path / "link.json"
    link.symlink_to(model / "config.json")
    data = tmp_path / "data"
    shutil.copytree(DATA / "c4", data / "c4")
    before, data_before = snapshot(model), snapshot(data)
    for target in (model / "config.json", link, data / "c4" / "c4_validation_2k.jsonl"):
        proc = eval_cli(capsys, "--model", str(model), "--tasks", "c4", "--seq-len", "32", "--max-windows", "1",
                        "--data-dir", str(data), "--json", str(target))
        assert_one_line_error(proc, "--json", "would replace")
    assert snapshot(model) == before and snapshot(data) == data_before


@pytest.mark.parametrize("where", ["inside", "itself", "parent"])
def test_export_and_compress_never_write_over_or_inside_their_model(tmp_path, capsys, folders, where):
    model = copy_of(folders, "plain", tmp_path)
    out = {"inside": model / "params" / "x", "itself": model, "parent": tmp_path}[where]
    before = snapshot(model)
    assert_one_line_error(export_cli(capsys, "--model", str(model), "--out", str(out), "--overwrite"),
                          "would replace the model being exported")
    hf = tmp_path / "hf"
    shutil.copytree(STORIES, hf)
    hf_out = {"inside": hf / "sub", "itself": hf, "parent": tmp_path}[where]
    assert_one_line_error(compress_cli(capsys, "--model", str(hf), *FAST, "--out", str(hf_out), "--overwrite"),
                          "would replace the model being compressed")
    assert snapshot(model) == before
    assert not (hf / "sub").exists() and (hf / "model.safetensors").is_file()


# ------------------------------------------------------------------ 2. writers without a lock


def test_an_export_waits_for_no_one_it_is_refused_while_another_writer_holds_the_folder(tmp_path, capsys, folders):
    from sigmascale_jax.io.outputs import out_lock

    out = tmp_path / "e"
    with out_lock(out):
        proc = export_cli(capsys, "--model", str(folders / "plain"), "--out", str(out))
    assert_one_line_error(proc, "another sigmascale_jax command is writing")
    assert not out.exists() and left_in(tmp_path) == []


def test_two_concurrent_exports_leave_one_complete_folder(tmp_path, folders):
    out = tmp_path / "e"
    procs = [command("export", "--model", str(folders / "plain"), "--out", str(out), "--overwrite",
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (stdout, err) in zip(procs, results):
        if p.returncode:  # the loser of the race: one line naming the lock, nothing else
            assert p.returncode == 2 and err.strip().count("\n") == 0 and "is writing" in err, err
        else:
            assert stdout.startswith("wrote "), err
    assert any(p.returncode == 0 for p in procs)
    assert left_in(tmp_path) == ["e"]  # no staging folder, no lock file
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= set(left_in(out))
    from safetensors.numpy import load_file

    assert len(load_file(out / "model.safetensors")) > 0
    mask = os.umask(0)
    os.umask(mask)
    for f in out.iterdir():  # safetensors writes 0600; every output gets the normal mode
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f


# ------------------------------------------------------------------ 3. a folder checked against its report


def _edit(folder: Path, change) -> None:
    path = folder / "compression.json"
    report = json.loads(path.read_text())
    change(report)
    path.write_text(json.dumps(report))


def _layers(r):
    r["model_config"]["num_layers"] = 3


def _rank(r):
    m = next(m for m in r["matrices"] if not m["dense"])
    m["rank"] -= 1


def _group(r):
    for m in r["matrices"]:
        m["group_size"] = 32


@pytest.mark.parametrize("name,change,fragment", [
    ("plain", _layers, "model_config says 3 blocks, the params hold 5"),
    ("plain", _rank, "records block 0 q as plain rank"),
    ("int4", _rank, "records block 0 q as plain rank"),
    ("int4", _group, "group size 32"),
])
def test_a_report_that_does_not_match_its_params_is_one_line_for_every_command(tmp_path, capsys, folders, name,
                                                                                change, fragment):
    model = copy_of(folders, name, tmp_path)
    _edit(model, change)
    before = snapshot(model)
    runs = [
        generate_cli(capsys, "--model", str(model), "--prompt", "Once", "--max-new-tokens", "2"),
        eval_cli(capsys, "--model", str(model), "--tasks", "c4", "--seq-len", "32", "--max-windows", "1"),
        export_cli(capsys, "--model", str(model), "--out", str(tmp_path / "e")),
    ]
    for proc in runs:
        assert_one_line_error(proc, fragment, "edited or damaged")
        assert proc.stdout == ""
    assert snapshot(model) == before and not (tmp_path / "e").exists()
    assert left_in(tmp_path) == [name]


def test_a_missing_tokenizer_or_a_damaged_checkpoint_says_what_is_wrong(tmp_path, capsys, folders):
    model = copy_of(folders, "plain", tmp_path)
    shutil.rmtree(model / "tokenizer")
    assert_one_line_error(generate_cli(capsys, "--model", str(model), "--prompt", "Once"), "tokenizer",
                          "incomplete")
    model = copy_of(folders, "int4", tmp_path)
    (model / "params" / "_METADATA").unlink()
    proc = export_cli(capsys, "--model", str(model), "--out", str(tmp_path / "e"))
    assert_one_line_error(proc, "cannot restore the Orbax checkpoint", "damaged")
    assert "Error:" in proc.stderr  # the cause, not only the wrapper's first words


# ------------------------------------------------------------------ 4. tracebacks outside compress


def test_seeds_beyond_a_prng_key_are_refused(tmp_path, capsys, folders):
    big = str(2**63)
    assert_one_line_error(generate_cli(capsys, "--model", str(folders / "plain"), "--prompt", "Once", "--seed", big),
                          "--seed must lie in 0..4294967295")
    assert_one_line_error(compress_cli(capsys, "--model", str(STORIES), *FAST, "--seed", big,
                                       "--out", str(tmp_path / "o")), "--seed must be at most 4294967295")
    assert left_in(tmp_path) == []


def test_a_prompt_that_is_not_utf8(capsys, folders):
    proc = generate_cli(capsys, "--model", str(folders / "plain"), "--prompt", "caf\udce9")
    assert_one_line_error(proc, "--prompt is not valid UTF-8")
    assert proc.stdout == ""


def test_a_closed_stdout_ends_generate_quietly(folders):
    proc = command("generate", "--model", str(folders / "plain"), "--prompt", "Once upon a time",
                   "--max-new-tokens", "200", "--ignore-eos", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert len(proc.stdout.read(10)) == 10
    proc.stdout.close()  # as `| head -c 10` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == "", err


def _null_ratio(r):
    r["ratio_requested"] = None


def _text_ratio(r):
    r["ratio_requested"] = "0.3"


def _list_entry(r):
    r["matrices"][4] = [1, 2]


def _text_stored(r):
    r["matrices"][2]["stored"] = "many"


def _bool_block(r):
    r["matrices"][7]["block"] = True


@pytest.mark.parametrize("change,fragment", [
    (_null_ratio, "ratio_requested is None"), (_text_ratio, "ratio_requested is '0.3'"),
    (_list_entry, "matrices[4] is list, not an object"), (_text_stored, "'stored' is 'many', not a number"),
    (_bool_block, "of block True does not exist"), (_rank, "records rank"),
])
def test_a_ranks_from_report_is_validated_not_trusted(tmp_path, capsys, folders, change, fragment):
    run = copy_of(folders, "plain", tmp_path)
    _edit(run, change)
    before = snapshot(run)
    proc = compress_cli(capsys, "--model", str(STORIES), *FAST, "--ranks", "from-run", "--ranks-from", str(run),
                        "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, fragment)
    assert "--encoding" not in proc.stderr  # an edited report is not an encoding mismatch
    assert snapshot(run) == before and left_in(tmp_path) == ["plain"]


# ------------------------------------------------------------------ 5. settings bounded before any work


def test_a_group_size_longer_than_any_row_is_refused_before_any_work(tmp_path, capsys, count_calls):
    from sigmascale_jax.compress import pipeline

    calls = count_calls(pipeline, "run_windows")
    huge = str(10**10)
    proc = compress_cli(capsys, "--model", str(STORIES), *FAST, "--quantize", "int4", "--group-size", huge,
                        "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, f"--group-size {huge} is longer than any row", "at most 172")
    assert calls["n"] == 0 and left_in(tmp_path) == []
    proc = eval_cli(capsys, "--model", str(STORIES), "--quantize", "int8", "--group-size", huge, "--tasks", "c4")
    assert_one_line_error(proc, "is longer than any row")


@pytest.mark.parametrize("ranks", ["uniform", "zs-svd", "fermigrad"])
def test_every_allocator_refuses_a_ratio_rank_1_cannot_meet(tmp_path, capsys, ranks):
    proc = compress_cli(capsys, "--model", str(STORIES), *FAST, "--ratio", "0.999", "--ranks", ranks,
                        "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, "--ratio 0.999")
    assert left_in(tmp_path) == []


# ------------------------------------------------------------------ 6. the streamed text


def test_streamed_text_equals_the_decoded_sequence(capsys, folders):
    from sigmascale_jax.deploy.generate import generate
    from sigmascale_jax.io.sources import load_model

    prompt = "Once upon a time"
    cfg, params, source = load_model(str(folders / "int4"))
    tok = source.tokenizer()
    ids = tok(prompt).input_ids
    assert tok.decode(ids, skip_special_tokens=True) == prompt
    tokens = generate(params, cfg, np.asarray([ids]), 40)[0]
    want = tok.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert " " in want[len(prompt):len(prompt) + 40]  # the seam and the words after it carry spaces
    for temperature in ("0", "1e-45"):  # a vanishing temperature is greedy, not a BOS-only stream
        proc = generate_cli(capsys, "--model", str(folders / "int4"), "--prompt", prompt, "--max-new-tokens", "40",
                            "--ignore-eos", "--temperature", temperature)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == want + "\n"


def test_text_stream_holds_back_what_may_still_change():
    from sigmascale_jax.deploy.generate import TextStream

    tok = require_tokenizer()
    ids = tok("Once upon a time").input_ids
    more = tok("Once upon a time there was a café").input_ids[len(ids):]
    pieces: list[str] = []
    stream = TextStream(tok, ids, pieces.append)
    for t in more:
        stream(np.asarray([t]))
        assert "\ufffd" not in "".join(pieces)
    stream.end()
    assert "".join(pieces) == " there was a café"
    assert len(pieces) > 1  # streamed, not all at the end


def require_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(require(STORIES)))


# ------------------------------------------------------------------ 7. small ones


def test_a_too_long_prompt_is_refused_before_it_is_echoed(capsys, folders):
    proc = generate_cli(capsys, "--model", str(folders / "plain"), "--prompt", "Once upon a time " * 200)
    assert_one_line_error(proc, "exceeds the model's 512 positions")
    assert proc.stdout == ""


def test_calibration_that_cannot_fit_in_memory_is_refused_before_any_work(tmp_path, capsys):
    proc = compress_cli(capsys, "--model", str(STORIES), *FAST, "--nsamples", str(10**10), "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, "--nsamples 10000000000", "GiB of host memory")
    assert left_in(tmp_path) == []


def test_eval_batch_sizes_beyond_the_data_are_not_allocated(capsys):
    proc = eval_cli(capsys, "--model", str(STORIES), "--tasks", "c4", "--seq-len", "32", "--max-windows", "2",
                    "--batch-size", str(10**12))
    assert proc.returncode == 0, proc.stderr
    proc = eval_cli(capsys, "--model", str(STORIES), "--tasks", "arc_easy", "--limit", "2",
                    "--tokens-per-batch", str(10**12))
    assert proc.returncode == 0, proc.stderr
