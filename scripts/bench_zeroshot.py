"""Zero-shot accuracy of dense and compressed models on the full task sets: a table of acc / acc_norm per task.

Each model is evaluated by the public command line (`sigmascale_jax.eval --tasks
zeroshot`), one process each; an evaluation is reused when its recorded command
matches (see benchlib). Compressed models are folders written by the compressor,
e.g. the benchmarks' runs.

    python scripts/bench_zeroshot.py --models dense=../shared/models/smollm2-135m-instruct-q4_1,\\
svd-llm@0.4=runs/bench/svd-llm-0.4,sigmascale-block@0.4=runs/bench/sigmascale-block-0.4 \\
        --out results/zeroshot_smollm2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import benchlib

from sigmascale_jax.eval.tasks import TASKS, ZEROSHOT_TASKS


def evaluate(label: str, model: str, args) -> dict:
    # A --limit run keeps its own file so that it never overwrites (or is mistaken for) a full-set one.
    suffix = f"-limit{args.limit}" if args.limit else ""
    out = benchlib.REPO / args.runs_dir / f"zeroshot-{label.replace('@', '-')}{suffix}.json"
    cmd = [sys.executable, "-m", "sigmascale_jax.eval", "--model", model, "--tasks", "zeroshot",
           "--tokens-per-batch", str(args.tokens_per_batch), "--json", str(out), "--no-progress"]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    benchlib.cached(cmd, out, out.with_suffix(".cmd.json"))
    return json.loads(out.read_text())


def markdown(results: dict[str, dict], args) -> str:
    labels = list(results)
    first = results[labels[0]]
    head = (f"# Zero-shot accuracy on {'the first ' + str(args.limit) + ' examples of each task' if args.limit else 'the full task sets'}\n\n"
            "Tasks and metrics as lm-evaluation-harness v0.4 defines them (`sigmascale_jax/tasks.py`); "
            "`acc_norm` where the harness reports it. ± is the standard error. "
            f"Command: `{benchlib.command_line()}`\n\n" + (f"{args.note}\n\n" if args.note else ""))
    lines = ["| task | n | metric | " + " | ".join(labels) + " |", "| --- | ---: | --- | " + " | ".join("---:" for _ in labels) + " |"]
    for t in ZEROSHOT_TASKS:
        for metric in TASKS[t].metrics:
            cells = [f"{r[t][metric]:.4f} ± {r[t][metric + '_stderr']:.4f}" for r in results.values()]
            lines.append(f"| {t} | {first[t]['n']} | {metric} | " + " | ".join(cells) + " |")
    for key, name in (("acc", "acc"), ("acc_norm_or_acc", "acc_norm (acc where none)")):
        lines.append(f"| average | | {name} | " + " | ".join(f"{r['zeroshot_average'][key]:.4f}" for r in results.values()) + " |")
    models = "\n".join(f"- {label}: `{r['model']}` ({r['seconds']:.0f} s"
                       + (f"; recorded in `{r['recorded_in']}`, not run again)" if "recorded_in" in r else ")")
                       for label, r in results.items())
    return head + "\n".join(lines) + "\n\nModels:\n" + models + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", required=True, help="comma-separated LABEL=PATH")
    p.add_argument("--limit", type=int, default=None, help="only the first N examples of each task")
    p.add_argument("--tokens-per-batch", type=int, default=4096)
    p.add_argument("--runs-dir", default="runs/bench")
    p.add_argument("--out", default="results/zeroshot_smollm2", help="writes OUT.md and OUT.json")
    p.add_argument("--note", default="", help="a paragraph for the table's header (e.g. why a --limit)")
    p.add_argument("--recorded", default="",
                   help="comma-separated LABEL=JSON: that model's column from an earlier run of this script with the "
                        "same --limit (not evaluated again; the table says where it came from)")
    args = p.parse_args()
    models = dict(item.split("=", 1) for item in args.models.split(","))
    (benchlib.REPO / args.runs_dir).mkdir(parents=True, exist_ok=True)
    results = {}
    for label, path in (item.split("=", 1) for item in args.recorded.split(",") if item):
        earlier = json.loads((benchlib.REPO / path).read_text())
        if earlier["args"].get("limit") != args.limit or label not in earlier["results"]:
            raise SystemExit(f"{path} has no {label!r} column measured with --limit {args.limit}")
        results[label] = {**earlier["results"][label], "recorded_in": path}
    for label, path in models.items():
        if not Path(path).exists():
            raise SystemExit(f"{label}: {path} does not exist (run the compression benchmarks first)")
        results[label] = evaluate(label, path, args)
        print(f"{label:<24} average acc {results[label]['zeroshot_average']['acc']:.4f}  ({results[label]['seconds']:.0f} s)", flush=True)
        benchlib.write(args.out, {"args": vars(args), "results": results}, markdown(results, args))
    print(markdown(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
