"""Zero-shot accuracy: score every choice of every document, then `acc` and `acc_norm` as the harness computes them.

`acc` = argmax of the summed log-likelihoods is the gold choice; `acc_norm` divides
each log-likelihood by the length of its choice string in characters first (the
harness's `len(choice)`, which equals the byte length for ASCII text). Standard
errors are the sample standard deviation (n − 1) over √n. Ties go to the first choice.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from sigmascale_jax.eval.loglikelihood import encode_pair, score_requests
from sigmascale_jax.eval.tasks import TASKS, MultipleChoice, load_task
from sigmascale_jax.model.config import ModelConfig
from sigmascale_jax.model.modeling import Params


def mean_and_stderr(values: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error with the sample standard deviation (n − 1)."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, math.nan
    return mean, float(np.std(values, ddof=1) / math.sqrt(len(values)))


def predictions(built: list[MultipleChoice], lls: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Per document: `pred` (argmax ll), `pred_norm` (argmax ll / len(choice)) and `gold`."""
    pred = np.array([int(np.argmax(ll)) for ll in lls])
    pred_norm = np.array([int(np.argmax(ll / np.array([float(len(c)) for c in mc.choices]))) for mc, ll in zip(built, lls)])
    return {"pred": pred, "pred_norm": pred_norm, "gold": np.array([mc.gold for mc in built])}


def task_metrics(name: str, built: list[MultipleChoice], lls: list[np.ndarray]) -> dict[str, Any]:
    """`{"acc", "acc_stderr", ["acc_norm", "acc_norm_stderr"], "n"}` of one task."""
    p = predictions(built, lls)
    out: dict[str, Any] = {}
    for metric, key in (("acc", "pred"), ("acc_norm", "pred_norm")):
        if metric in TASKS[name].metrics:
            out[metric], out[f"{metric}_stderr"] = mean_and_stderr((p[key] == p["gold"]).astype(np.float64))
    out["n"] = len(built)
    return out


def score_task(
    params: Params, cfg: ModelConfig, tok: Any, built: list[MultipleChoice], desc: str, tokens_per_batch: int, progress: bool
) -> list[np.ndarray]:
    """Summed log-likelihood of every choice of every document: a list of `[n_choices]` arrays."""
    pairs = [encode_pair(tok, ctx, cont) for mc in built for ctx, cont in zip(mc.contexts, mc.continuations)]
    flat = score_requests(params, cfg, pairs, tokens_per_batch=tokens_per_batch, desc=desc, progress=progress)
    out, at = [], 0
    for mc in built:
        out.append(flat[at : at + len(mc.contexts)])
        at += len(mc.contexts)
    return out


def evaluate_task(
    name: str,
    params: Params,
    cfg: ModelConfig,
    tok: Any,
    data_dir: Path,
    limit: int | None = None,
    tokens_per_batch: int = 4096,
    progress: bool = True,
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Metrics of one task on its first `limit` documents, and the per-choice log-likelihoods."""
    _, built = load_task(name, data_dir, limit)
    lls = score_task(params, cfg, tok, built, name, tokens_per_batch, progress)
    return task_metrics(name, built, lls), lls


def average(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Unweighted mean over tasks of `acc`, and of `acc_norm` where a task reports it (else its `acc`)."""
    tasks = sorted(results)
    return {
        "acc": float(np.mean([results[t]["acc"] for t in tasks])),
        "acc_norm_or_acc": float(np.mean([results[t].get("acc_norm", results[t]["acc"]) for t in tasks])),
        "tasks": tasks,
    }
