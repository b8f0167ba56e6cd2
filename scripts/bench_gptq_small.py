"""GPTQ against round-to-nearest on small matrices (stories260k: 64-wide inputs), off the calibration domain.

    python scripts/bench_gptq_small.py --out results/gptq_small_stories260k

Quantization alone (ratio 0) at int4 and int3, calibrated on C4 (64 x 256 tokens). Every GPTQ setting (group size,
damping, activation order) and round-to-nearest are scored on held-out text only: C4 calibration-text windows
clear of the calibration windows (in domain) and WikiText-2 *validation* windows (off domain). The default is
chosen on those; WikiText-2 test and C4 evaluation perplexity (the first 16 windows of 256) are then reported for
the chosen settings and round-to-nearest alone, as a check nothing was tuned on. Writes OUT.md and OUT.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np

import benchlib

MODEL = "../shared/models/stories260k"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(benchlib.REPO.parent / "shared" / "models" / "stories260k"))
    p.add_argument("--kinds", default="int4,int3")
    p.add_argument("--groups", default="16,32,128")
    p.add_argument("--damps", default="0.01,0.1,1.0")
    p.add_argument("--out", default="results/gptq_small_stories260k")
    args = p.parse_args()

    import sigmascale_jax as ssj
    from sigmascale_jax.compress.calibration import calibration_ids, fresh_windows, window_starts
    from sigmascale_jax.eval.perplexity import make_windows
    from sigmascale_jax.io.data import perplexity_text

    data = str(benchlib.REPO.parent / "shared" / "data")
    cfg, params, source = ssj.load_model(args.model)
    n, t = 64, 256
    windows = ssj.calibration_windows(source, "c4", nsamples=n, seq_len=t, seed=0, data_dir=data)
    c4_ids = calibration_ids(source, "c4", data)
    taken = [(int(s), t) for s in window_starts(len(c4_ids), n, t, 0)]
    held_c4, disjoint = fresh_windows(c4_ids, taken, 32, t, 1)
    assert disjoint
    held_wiki = make_windows(calibration_ids(source, "wikitext2-valid", data), t, 32)
    tok = source.tokenizer()
    test = {task: make_windows(np.asarray(tok(perplexity_text(task, Path(data))).input_ids), t, 16)
            for task in ("wikitext2", "c4")}

    def ppl(tree, w) -> float:
        return ssj.perplexity(tree, cfg, w, batch_size=8, progress=False)["ppl"]

    rows = [{"kind": "float32", "quantizer": "dense", "held_c4": ppl(params, held_c4),
             "held_wiki_valid": ppl(params, held_wiki)}]
    for kind in args.kinds.split(","):
        settings = [("rtn", dict(group_size=g)) for g in map(int, args.groups.split(","))]
        settings += [("gptq", dict(group_size=g, gptq_damp=d, act_order=a)) for g, d, a in itertools.product(
            map(int, args.groups.split(",")), map(float, args.damps.split(",")), (True, False))]
        for quantizer, kw in settings:
            plan = ssj.make_plan("none", quantize=kind, quantizer=quantizer, **kw)
            tree, _ = ssj.compress_params(params, cfg, windows, plan, 0.0)
            row = {"kind": kind, "quantizer": quantizer, **kw, "held_c4": ppl(tree, held_c4),
                   "held_wiki_valid": ppl(tree, held_wiki)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    # the choice, on held-out text only: the GPTQ setting with the lowest geometric mean over both domains
    chosen = {}
    for kind in args.kinds.split(","):
        cands = [r for r in rows if r["kind"] == kind and r["quantizer"] == "gptq"]
        best = min(cands, key=lambda r: np.log(r["held_c4"]) + np.log(r["held_wiki_valid"]))
        rtn = min((r for r in rows if r["kind"] == kind and r["quantizer"] == "rtn"),
                  key=lambda r: np.log(r["held_c4"]) + np.log(r["held_wiki_valid"]))
        checks = {}
        for name, r in (("gptq", best), ("rtn", rtn)):
            kw = {k: r[k] for k in ("group_size", "gptq_damp", "act_order") if k in r}
            plan = ssj.make_plan("none", quantize=kind, quantizer=name, **kw)
            tree, _ = ssj.compress_params(params, cfg, windows, plan, 0.0)
            checks[name] = {"settings": kw, **{task: ppl(tree, w) for task, w in test.items()}}
        chosen[kind] = checks
    checks = {"dense": {task: ppl(params, w) for task, w in test.items()}}
    payload = {"model": "../shared/models/stories260k", "cpu": benchlib.cpu_name(), "command": benchlib.command_line(),
               "rows": rows, "chosen": chosen, "dense_test": checks["dense"]}
    benchlib.write(args.out, payload, table(payload))
    print(table(payload))


def table(payload: dict) -> str:
    lines = [f"# GPTQ vs round-to-nearest on small matrices ({payload['model']})", "",
             f"Command: `{payload['command']}`. Quantization alone (ratio 0), calibrated on 64 x 256 C4 tokens. "
             "Held-out perplexity (256-token windows): 32 C4 calibration-text windows clear of the calibration "
             "windows (in domain) and 32 WikiText-2 validation windows (off domain); settings are chosen on these.",
             "", "| kind | quantizer | group | damp | act order | held-out C4 | held-out WikiText-2 valid |",
             "| --- | --- | ---: | ---: | --- | ---: | ---: |"]
    for r in payload["rows"]:
        lines.append(f"| {r['kind']} | {r['quantizer']} | {r.get('group_size', '')} | {r.get('gptq_damp', '')} | "
                     f"{'' if 'act_order' not in r else ('on' if r['act_order'] else 'off')} | {r['held_c4']:.2f} | "
                     f"{r['held_wiki_valid']:.2f} |")
    lines += ["", "Chosen on held-out text, then checked once on the evaluation sets (first 16 windows of 256; "
              f"dense {payload['dense_test']['wikitext2']:.2f} / {payload['dense_test']['c4']:.2f}):", "",
              "| kind | quantizer | settings | WikiText-2 | C4 |", "| --- | --- | --- | ---: | ---: |"]
    for kind, checks in payload["chosen"].items():
        for name, c in checks.items():
            lines.append(f"| {kind} | {name} | {c['settings']} | {c['wikitext2']:.2f} | {c['c4']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
