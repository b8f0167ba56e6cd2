"""Perplexity as the SVD papers compute it, checked against transformers on real data."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from conftest import DATA, REPO, STORIES, require

from sigmascale_jax.eval.perplexity import make_windows, perplexity
from sigmascale_jax.io.data import c4_docs, find_data_dir, perplexity_text, wikitext2_rows
from sigmascale_jax.io.sources import load_model


def test_windows_are_non_overlapping_and_drop_the_tail():
    ids = np.arange(10)
    w = make_windows(ids, 3)
    assert w.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert make_windows(ids, 3, max_windows=2).shape == (2, 3)


def test_wikitext2_rows_follow_the_hf_dataset():
    rows = wikitext2_rows(require(DATA / "wikitext-2-raw" / "wiki.test.raw"))
    assert len(rows) == 4358
    assert rows[0] == "" and rows[1] == " = Robert Boulter = \n"
    assert all(r == "" or r.endswith("\n") for r in rows)


def test_c4_eval_docs_are_1000_to_1999():
    path = require(DATA / "c4" / "c4_validation_2k.jsonl")
    docs = c4_docs(path, range(1000, 2000))
    with path.open() as f:
        lines = f.readlines()
    assert len(docs) == 1000
    assert docs[0] == json.loads(lines[1000])["text"] and docs[-1] == json.loads(lines[1999])["text"]
    assert perplexity_text("c4", find_data_dir(str(DATA))).startswith(docs[0] + "\n\n")


def test_perplexity_equals_transformers_on_stories260k_and_is_batch_invariant():
    import torch
    from transformers import AutoModelForCausalLM

    cfg, params, source = load_model(str(require(STORIES)))
    tok = source.tokenizer()
    ids = np.asarray(tok(perplexity_text("c4", find_data_dir(str(DATA)))).input_ids)
    windows = make_windows(ids, 128, max_windows=7)
    ours = perplexity(params, cfg, windows, batch_size=1, progress=False)
    batched = perplexity(params, cfg, windows, batch_size=3, progress=False)  # 7 = 3 + 3 + 1 padded
    model = AutoModelForCausalLM.from_pretrained(str(STORIES), dtype=torch.float32).eval()
    with torch.no_grad():
        t = torch.from_numpy(windows.astype(np.int64))
        logits = model(t).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), t[:, 1:].reshape(-1))
    assert ours["tokens"] == 7 * 127 and ours["windows"] == 7
    assert ours["ppl"] == pytest.approx(math.exp(float(nll)), rel=1e-5)
    assert batched["ppl"] == pytest.approx(ours["ppl"], rel=1e-6)
    assert 1.5 < ours["ppl"] < 200  # trained weights: far from the ~520 of random ones


def test_eval_cli_writes_table_and_json(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "sigmascale_jax.eval", "--model", str(require(STORIES)), "--tasks", "wikitext2,c4",
         "--seq-len", "256", "--max-windows", "3", "--batch-size", "2", "--data-dir", str(DATA), "--json", str(out),
         "--no-progress"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert res["model"] == str(STORIES) and res["seconds"] > 0
    for task in ("wikitext2", "c4"):
        assert res[task]["windows"] == 3 and res[task]["seq_len"] == 256 and res[task]["tokens"] == 3 * 255
        assert math.isfinite(res[task]["ppl"]) and res[task]["ppl"] > 1
        assert f"{res[task]['ppl']:.4f}" in proc.stdout
