"""Round 4 (issue 41): every path a run reads is an input no output may replace, and bad arguments — on the command
line and from Python — are one-line errors that name them, found before any long work."""

from __future__ import annotations

import hashlib
import json
import shutil
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
