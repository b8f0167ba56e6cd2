"""Zero-shot tasks as lm-evaluation-harness defines them, log-likelihood scoring against transformers, the eval CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import DATA, REPO, STORIES, assert_one_line_error, require

from sigmascale_jax.eval.loglikelihood import bucket_length, encode_pair, score_requests
from sigmascale_jax.eval.tasks import NO_GOLD, TASKS, hellaswag_preprocess, load_task, mathqa_choices
from sigmascale_jax.eval.zeroshot import mean_and_stderr, predictions, task_metrics

# Document counts of the shared copies (shared/data/README.md).
COUNTS = {"piqa": 1838, "hellaswag": 10042, "winogrande": 1267, "arc_easy": 2376, "arc_challenge": 1172,
          "openbookqa": 500, "mathqa": 2985}


@pytest.mark.parametrize("name", list(COUNTS))
def test_every_document_of_every_task_builds(name):
    docs, built = load_task(name, require(DATA))
    assert len(docs) == len(built) == COUNTS[name]
    for mc in built:
        assert len(mc.contexts) == len(mc.continuations) == len(mc.choices) >= 2
        assert all(c.startswith(" ") for c in mc.continuations)  # the harness's target delimiter
        assert all(ctx == ctx.rstrip(" ") or name == "winogrande" for ctx in mc.contexts)
        assert mc.gold == NO_GOLD or 0 <= mc.gold < len(mc.choices)
    golds = [mc.gold for mc in built]
    assert golds.count(NO_GOLD) == 0  # every shared document has its answer among its parsed choices
    assert len(set(golds)) >= 2  # answers spread over positions (a constant would hint at a misread key)


def test_limit_takes_the_first_documents():
    full, _ = load_task("arc_easy", DATA)
    docs, built = load_task("arc_easy", DATA, limit=7)
    assert docs == full[:7] and len(built) == 7


def test_prompts_follow_the_harness_yaml():
    (piqa,), (mc,) = [x[:1] for x in load_task("piqa", DATA, 1)]
    assert mc.contexts[0] == f"Question: {piqa['goal']}\nAnswer:"
    assert mc.continuations == (" " + piqa["sol1"], " " + piqa["sol2"])
    (arc,), (mc,) = [x[:1] for x in load_task("arc_challenge", DATA, 1)]
    assert mc.contexts[0] == f"Question: {arc['question']}\nAnswer:" and mc.choices == tuple(arc["choices"]["text"])
    assert mc.gold == arc["choices"]["label"].index(arc["answerKey"])
    (obqa,), (mc,) = [x[:1] for x in load_task("openbookqa", DATA, 1)]
    assert mc.contexts[0] == obqa["question_stem"]  # OpenBookQA: the bare stem, no "Question:" frame


def test_winogrande_scores_only_the_part_after_the_blank():
    (doc,), (mc,) = [x[:1] for x in load_task("winogrande", DATA, 1)]
    # "Sarah was a much better surgeon than Maria so _ always got the easier cases."
    assert doc["sentence"].startswith("Sarah was a much better surgeon than Maria so _")
    assert mc.contexts == ("Sarah was a much better surgeon than Maria so Sarah",
                           "Sarah was a much better surgeon than Maria so Maria")
    assert mc.continuations == (" always got the easier cases.",) * 2
    assert mc.gold == 1 and TASKS["winogrande"].metrics == ("acc",)


def test_hellaswag_preprocessing():
    # strip first, brackets after: the space left by "[header] " stays, as in the harness
    assert hellaswag_preprocess(" [header] How to x [title] Do y. [step] Z  w ") == " How to x. Do y. Z w"
    docs, built = load_task("hellaswag", DATA, 2)
    d, mc = docs[1], built[1]  # "Clean and jerk: A lady walks to a barbell. ... The lady"
    assert mc.contexts[0] == f"{d['activity_label']}: {d['ctx_a']} {d['ctx_b'].capitalize()}"
    assert mc.contexts[0].endswith("grabs the pole. The lady")


def test_mathqa_option_parsing():
    assert mathqa_choices("a ) 38 , b ) 27.675 , c ) 30 , d ) data inadequate , e ) none of these") == [
        "38", "27.675", "30", "data inadequate", "none of these"]
    assert mathqa_choices("a ) 1 , b ) 2") == ["1"]  # the harness's regex needs ", " after a-d, "$" after e


def test_metrics_and_ties():
    _, built = load_task("arc_easy", DATA, 3)
    lls = [np.zeros(len(mc.choices)) for mc in built]  # all tied: the first choice wins, as np.argmax
    lls[1][built[1].gold] = 1.0
    p = predictions(built, lls)
    assert p["pred"].tolist() == [0, built[1].gold, 0]
    m = task_metrics("arc_easy", built, lls)
    hits = (p["pred"] == p["gold"]).astype(float)
    assert m["acc"] == hits.mean() and m["n"] == 3 and "acc_norm" in m
    assert m["acc_stderr"] == pytest.approx(np.std(hits, ddof=1) / np.sqrt(3))
    assert mean_and_stderr(np.array([1.0]))[0] == 1.0 and np.isnan(mean_and_stderr(np.array([1.0]))[1])


def test_bucket_lengths():
    assert [bucket_length(n) for n in (1, 32, 33, 48, 49, 64, 65, 97, 200)] == [32, 32, 48, 48, 64, 64, 96, 128, 256]


@pytest.fixture(scope="module")
def stories():
    from sigmascale_jax.io.sources import load_model

    return load_model(str(require(STORIES)))


def test_encode_pair_moves_trailing_space_and_splits_the_whole_encoding(stories):
    _, _, source = stories
    tok = source.tokenizer()
    ctx, cont = encode_pair(tok, "The cat sat on the ", "mat.")
    assert ctx == tok("The cat sat on the").input_ids
    assert ctx + cont == tok("The cat sat on the mat.").input_ids
    ctx, cont = encode_pair(tok, "", " Once upon a time")
    assert len(ctx) == 1 and ctx[0] in (tok.bos_token_id, tok.eos_token_id)


def test_scores_equal_transformers_log_likelihoods(stories):
    """Batched, bucketed, padded JAX scoring = the sum of torch log-softmax over each continuation."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg, params, source = stories
    tok = source.tokenizer()
    _, built = load_task("hellaswag", DATA, 6)
    pairs = [encode_pair(tok, c, k) for mc in built for c, k in zip(mc.contexts, mc.continuations)]
    assert len({bucket_length(len(a + b)) for a, b in pairs}) > 1  # several buckets and a padded last batch
    ours = score_requests(params, cfg, pairs, tokens_per_batch=200, progress=False)
    model = AutoModelForCausalLM.from_pretrained(str(STORIES), dtype=torch.float32).eval()
    ref = []
    with torch.no_grad():
        for ctx, cont in pairs:
            ids = torch.tensor([ctx + cont])
            logp = torch.log_softmax(model(ids[:, :-1]).logits[0], dim=-1)
            pos = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
            ref.append(float(logp[pos, torch.tensor(cont)].sum()))
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=1e-5)
    assert np.ptp(ref) > 1.0  # the choices really differ


def harness_reference(torch_model, pairs, max_len):
    """Each request alone, the harness's way: the model reads (ctx + cont)[-(max_len + 1):][:-1]."""
    import torch

    out = []
    with torch.no_grad():
        for ctx, cont in pairs:
            inp = (ctx + cont)[-(max_len + 1) :][:-1]
            logp = torch.log_softmax(torch_model(torch.tensor([inp])).logits[0].double(), dim=-1)
            pos = torch.arange(len(inp) - len(cont), len(inp))
            out.append(float(logp[pos, torch.tensor(cont)].sum()))
    return np.array(out)


@pytest.mark.parametrize("model_type", ["mistral", "qwen3"])
def test_packed_rows_equal_one_request_per_sequence(tiny_models, model_type):
    """Shared contexts, length-1 continuations, several questions per row, different contexts per choice
    (WinoGrande), and a question too long for the window (split and left-truncated) all score as if alone.
    Mistral's sliding window (7) is measured in positions, which packing keeps."""
    from sigmascale_jax.eval.loglikelihood import group_requests
    from sigmascale_jax.io.sources import load_model

    folder, torch_model = tiny_models[model_type]
    cfg, params, _ = load_model(str(folder))
    rng = np.random.default_rng(0)
    ids = lambda n: rng.integers(1, cfg.vocab_size, n).tolist()  # noqa: E731
    a, b, long = ids(12), ids(5), ids(cfg.max_position_embeddings - 3)
    pairs = [(a, ids(4)), (a, ids(1)), (a, ids(9)),          # one question, three choices
             (b + ids(2), ids(3)), (b + ids(2), ids(3)),     # different contexts: no sharing
             (long, ids(6)), (long, ids(2))]                 # together longer than the window
    groups = group_requests(pairs, cfg.max_position_embeddings)
    assert [len(g.ids) for g in groups] == [3, 1, 1, 1, 1]
    ours = score_requests(params, cfg, pairs, tokens_per_batch=4 * cfg.max_position_embeddings, progress=False)
    ref = harness_reference(torch_model, pairs, cfg.max_position_embeddings)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-4)


def run_eval(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sigmascale_jax.eval", *args, "--no-progress"],
        capture_output=True, text=True, cwd=REPO, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def test_eval_cli_zeroshot_json_and_average(tmp_path):
    out = tmp_path / "zs.json"
    proc = run_eval("--model", str(require(STORIES)), "--tasks", "zeroshot,wikitext2", "--limit", "8", "--seq-len", "128",
                    "--max-windows", "2", "--data-dir", str(DATA), "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert res["limit"] == 8 and res["wikitext2"]["windows"] == 2
    for name in COUNTS:
        r = res[name]
        assert r["n"] == 8 and 0 <= r["acc"] <= 1 and r["acc_stderr"] >= 0
        assert ("acc_norm" in r) == (name != "winogrande")
        assert f"{r['acc']:.4f} ± {r['acc_stderr']:.4f}" in proc.stdout
    avg = res["zeroshot_average"]
    assert avg["acc"] == pytest.approx(np.mean([res[t]["acc"] for t in COUNTS])) and sorted(avg["tasks"]) == sorted(COUNTS)
    assert "average" in proc.stdout


def test_malformed_task_file_is_a_one_line_error_naming_it(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(DATA / "openbookqa", data / "openbookqa")
    lines = (data / "openbookqa" / "test.jsonl").read_text().splitlines()
    lines[3] = lines[3][:40]
    (data / "openbookqa" / "test.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "r.json"
    proc = run_eval("--model", str(require(STORIES)), "--tasks", "openbookqa", "--data-dir", str(data), "--json", str(out))
    assert_one_line_error(proc, "line 4", "openbookqa/test.jsonl")
    assert not out.exists()
    proc = run_eval("--model", str(STORIES), "--tasks", "piqa", "--data-dir", str(data))
    assert_one_line_error(proc, "piqa/valid.jsonl", str(data))


def test_bad_zeroshot_arguments():
    assert_one_line_error(run_eval("--model", str(require(STORIES)), "--tasks", "piqa", "--limit", "0"), "--limit")
    assert_one_line_error(run_eval("--model", str(STORIES), "--tasks", "boolq"), "'boolq'", "hellaswag")
