"""Zero-shot accuracy of the Flax model beside lm-evaluation-harness's own HF backend, example by example.

Both read the same local files: the documents our loaders produce (Hugging Face
schema) are written as JSON lines, and the harness runs its own task YAMLs on them
(its prompts, HellaSwag preprocessing, WinoGrande partial scoring, MathQA parsing,
tokenization, scoring and metrics) through `HFLM` over transformers + torch (CPU,
float32) on the same weights. Our side is `sigmascale_jax.eval.zeroshot`. For every
document the script compares the chosen answer (acc and acc_norm) and the
log-likelihoods, and explains each differing choice by the two models' margins.

Needs lm-eval (not a dependency of the package): `pip install lm-eval==0.4.13`.

    python scripts/zeroshot_vs_harness.py --model ../shared/models/smollm2-135m-instruct-q4_1 \\
        --limit 200 --out results/zeroshot_vs_harness_smollm2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sigmascale_jax.io.data import find_data_dir  # noqa: E402
from sigmascale_jax.io.fileio import write_json_atomic, write_text_atomic  # noqa: E402
from sigmascale_jax.eval.tasks import TASKS, ZEROSHOT_TASKS, load_task  # noqa: E402
from sigmascale_jax.eval.zeroshot import predictions, score_task, task_metrics  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def harness_task_yaml(name: str, docs_file: Path) -> str:
    """A task that includes the harness's own YAML and only swaps the dataset for a local JSON-lines file."""
    import lm_eval

    tasks_dir = Path(lm_eval.__file__).parent / "tasks"
    original = {"piqa": "piqa/piqa.yaml", "hellaswag": "hellaswag/hellaswag.yaml", "winogrande": "winogrande/default.yaml",
                "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
                "openbookqa": "openbookqa/openbookqa.yaml", "mathqa": "mathqa/mathqa.yaml"}[name]
    return (
        f"include: {tasks_dir / original}\n"
        f"task: local_{name}\n"
        "tag: []\n"
        "dataset_path: json\n"
        "dataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {docs_file}\n"
        "training_split: null\n"
        "validation_split: null\n"
        "test_split: test\n"
    )


def run_harness(torch_model, tok, tasks: list[str], docs: dict[str, list[dict]], limit: int, batch_size: int) -> dict:
    """Per task: the harness's per-document log-likelihoods `[n_choices]` (doc order) and its aggregated metrics."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as tmp:
        for name in tasks:
            path = Path(tmp) / f"{name}.jsonl"
            path.write_text("".join(json.dumps(d) + "\n" for d in docs[name]))
            (Path(tmp) / f"local_{name}.yaml").write_text(harness_task_yaml(name, path))
        lm = HFLM(pretrained=torch_model, tokenizer=tok, batch_size=batch_size)
        out = simple_evaluate(
            model=lm, tasks=[f"local_{n}" for n in tasks], num_fewshot=0, limit=limit, log_samples=True,
            task_manager=TaskManager(include_path=tmp, include_defaults=False), bootstrap_iters=0,
        )
    res = {}
    for name in tasks:
        samples = sorted(out["samples"][f"local_{name}"], key=lambda s: s["doc_id"])
        lls = [np.array([float(r[0]) for r in s["filtered_resps"]]) for s in samples]
        metrics = out["results"][f"local_{name}"]
        res[name] = {"lls": lls, "acc": metrics.get("acc,none"), "acc_norm": metrics.get("acc_norm,none"),
                     "args": [s["arguments"] for s in samples]}
    return res


def harness_requests(arguments) -> list[tuple[str, str]]:
    """`(context, continuation)` pairs of one logged harness sample (a dict of `gen_args_i` or a list)."""
    items = arguments.values() if isinstance(arguments, dict) else arguments
    return [(a["arg_0"], a["arg_1"]) if isinstance(a, dict) else (a[0], a[1]) for a in items]


def compare(name: str, built, ours: list[np.ndarray], theirs: list[np.ndarray], their_args: list) -> dict:
    """Per-example agreement of the requests and chosen answers, and each differing choice with both models' margins."""
    same_requests = sum(
        harness_requests(args) == list(zip(mc.contexts, mc.continuations)) for mc, args in zip(built, their_args)
    )
    p, q = predictions(built, ours), predictions(built, theirs)
    diffs = []
    for key in ("pred", "pred_norm") if "acc_norm" in TASKS[name].metrics else ("pred",):
        for i in np.flatnonzero(p[key] != q[key]):
            a, b = int(p[key][i]), int(q[key][i])
            scale = (lambda ll: ll / np.array([float(len(c)) for c in built[i].choices])) if key == "pred_norm" else (lambda ll: ll)
            diffs.append({
                "doc": int(i), "metric": "acc" if key == "pred" else "acc_norm", "ours": a, "harness": b,
                "gold": int(p["gold"][i]),
                "margin_ours": float(scale(ours[i])[a] - scale(ours[i])[b]),
                "margin_harness": float(scale(theirs[i])[b] - scale(theirs[i])[a]),
                "max_abs_ll_diff": float(np.abs(ours[i] - theirs[i]).max()),
            })
    all_diff = np.concatenate([np.abs(a - b) for a, b in zip(ours, theirs)])
    return {
        "n": len(built),
        "same_requests": int(same_requests),
        "same_pred": int((p["pred"] == q["pred"]).sum()),
        "same_pred_norm": int((p["pred_norm"] == q["pred_norm"]).sum()),
        "max_abs_ll_diff": float(all_diff.max()),
        "mean_abs_ll_diff": float(all_diff.mean()),
        "differences": diffs,
    }


def norm_agreement(name: str, c: dict) -> str:
    return f"{c['same_pred_norm']}/{c['n']}" if "acc_norm" in TASKS[name].metrics else "-"


def markdown(report: dict) -> str:
    lines = [
        f"# Zero-shot: sigmascale_jax vs lm-evaluation-harness {report['lm_eval']} (HF backend)\n",
        f"Model: `{report['model']}` (dense, float32 on both sides). First {report['limit']} examples of each task, "
        "read from the same local files. Machine: CPU. Command: `" + report["command"] + "`\n",
        "| task | n | same prompts | acc (ours) | acc (harness) | acc_norm (ours) | acc_norm (harness) | same choice acc | same choice acc_norm | max abs ll diff |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in report["tasks"].items():
        c = r["comparison"]
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        lines.append(f"| {name} | {c['n']} | {c['same_requests']}/{c['n']} | {fmt(r['ours'].get('acc'))} | {fmt(r['harness']['acc'])} | "
                     f"{fmt(r['ours'].get('acc_norm'))} | {fmt(r['harness']['acc_norm'])} | {c['same_pred']}/{c['n']} | "
                     f"{norm_agreement(name, c)} | {c['max_abs_ll_diff']:.2e} |")
    diffs = [(n, d) for n, r in report["tasks"].items() for d in r["comparison"]["differences"]]
    lines.append("")
    if not diffs:
        lines.append("Every example gets the same choice on both sides, for acc and acc_norm.")
    else:
        lines.append("Differing choices (margins: how far each side's pick leads the other side's pick, in log-likelihood "
                     "or, for acc_norm, log-likelihood per character):\n")
        lines.append("| task | doc | metric | ours | harness | gold | margin ours | margin harness |")
        lines.append("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
        for n, d in diffs:
            lines.append(f"| {n} | {d['doc']} | {d['metric']} | {d['ours']} | {d['harness']} | {d['gold']} | "
                         f"{d['margin_ours']:.2e} | {d['margin_harness']:.2e} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO.parent / "shared" / "models" / "smollm2-135m-instruct-q4_1"))
    p.add_argument("--tasks", default=",".join(ZEROSHOT_TASKS))
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16, help="harness batch size")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="results/zeroshot_vs_harness_smollm2", help="writes OUT.json and OUT.md")
    p.add_argument("--harness-cache", default="runs/zeroshot_harness_cache.json",
                   help="keeps the harness's per-example log-likelihoods; reused when model, data, tasks, limit and "
                        "lm-eval/torch versions match (the harness side does not depend on this repo's code)")
    args = p.parse_args()

    import lm_eval
    import torch
    from transformers import AutoModelForCausalLM

    from sigmascale_jax.io.sources import load_model

    torch.set_num_threads(args.threads)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    data_dir = find_data_dir(args.data_dir)
    cfg, params, source = load_model(args.model)
    tok = source.tokenizer()
    loaded = {t: load_task(t, data_dir, args.limit) for t in tasks}

    t0 = time.perf_counter()
    ours = {t: score_task(params, cfg, tok, loaded[t][1], t, 4096, True) for t in tasks}
    ours_s = time.perf_counter() - t0

    cache = REPO / args.harness_cache
    key = {"model": str(Path(args.model).resolve()), "data": str(data_dir.resolve()), "tasks": tasks, "limit": args.limit,
           "lm_eval": lm_eval.__version__, "torch": torch.__version__}
    cached = json.loads(cache.read_text()) if cache.is_file() else None
    if cached and cached["key"] == key:
        theirs = {t: {**v, "lls": [np.array(x) for x in v["lls"]]} for t, v in cached["tasks"].items()}
        theirs_s = cached["seconds"]
        print(f"harness log-likelihoods reused from {cache}")
    else:
        kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch_model = AutoModelForCausalLM.from_pretrained(str(source.folder), dtype=torch.float32, **kwargs).eval()
        t0 = time.perf_counter()
        theirs = run_harness(torch_model, tok, tasks, {t: loaded[t][0] for t in tasks}, args.limit, args.batch_size)
        theirs_s = time.perf_counter() - t0
        write_json_atomic(cache, {"key": key, "seconds": theirs_s, "tasks": {
            t: {**v, "lls": [x.tolist() for x in v["lls"]]} for t, v in theirs.items()}})

    report = {
        "model": args.model, "limit": args.limit, "lm_eval": lm_eval.__version__, "torch": torch.__version__,
        "command": "python " + " ".join(sys.argv), "seconds_ours": round(ours_s, 1), "seconds_harness": round(theirs_s, 1),
        "tasks": {},
    }
    for t in tasks:
        built = loaded[t][1]
        report["tasks"][t] = {
            "ours": task_metrics(t, built, ours[t]),
            "harness": {"acc": theirs[t]["acc"], "acc_norm": theirs[t]["acc_norm"] if "acc_norm" in TASKS[t].metrics else None},
            "comparison": compare(t, built, ours[t], theirs[t]["lls"], theirs[t]["args"]),
        }
        c = report["tasks"][t]["comparison"]
        print(f"{t:<14} acc ours {report['tasks'][t]['ours']['acc']:.4f} harness {theirs[t]['acc']:.4f}  "
              f"same prompts {c['same_requests']}/{c['n']}  same choice {c['same_pred']}/{c['n']} (acc) {c['same_pred_norm']}/{c['n']} (acc_norm)  "
              f"max |Δll| {c['max_abs_ll_diff']:.2e}", flush=True)
    write_json_atomic(REPO / f"{args.out}.json", report)
    write_text_atomic(REPO / f"{args.out}.md", markdown(report))
    print(f"wrote {args.out}.json and {args.out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
