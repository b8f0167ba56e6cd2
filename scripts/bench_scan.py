"""Scan or unroll: the decoder's blocks as one `lax.scan` over stacked (padded) blocks, against the loop unrolled into
the program, on a real compressed model with mixed ranks: compile seconds plus run seconds of healing steps,
evaluation and generation.

    python scripts/bench_scan.py --models runs/scan/smollm2-zs-svd-llm-0.2,runs/scan/smollm2-uniform-svd-llm-0.2 \
        --out results/scan_smollm2

`--models`: compressed folders (plain factors: healing trains them), e.g. one at mixed ranks and one at uniform. Each mode runs in a process of its own (so
every program compiles), with `--no-compile-cache` semantics (no persistent cache). Measured per mode:

- heal: `heal_step` on 4 x 512 tokens (the quick start's batch), the first step (compile + run) and the mean of
  the next `--steps`; teacher hidden states cached as the stage does;
- eval: perplexity windows of 2048 tokens, the first (compile + run) and the mean of the next `--windows - 1`;
- generate: a 32-token prompt and `--tokens` new tokens, the first call (compile) and the mean per token.

"unrolled" makes `stacking.stack_blocks` refuse every stack, which is the code path of trees that do not stack.
Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import benchlib

MODES = ("scan", "unrolled")


def measure(mode: str, model: str, steps: int, windows: int, tokens: int, eval_len: int = 2048,
            heal_len: int = 512) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from sigmascale_jax.compress.report import CompileCounter
    from sigmascale_jax.model import kvcache, stacking

    if mode == "unrolled":
        stacking.stack_blocks = kvcache.stack_blocks = lambda *a, **k: None
    else:  # stacked however much padding it takes: what the scan costs is what is measured
        real = stacking.stack_blocks
        stacking.stack_blocks = kvcache.stack_blocks = lambda b, pad=True, tolerance=None: real(b, pad, float("inf"))
    import sigmascale_jax as ssj
    from sigmascale_jax.compress.refine import heal
    from sigmascale_jax.io.data import perplexity_text
    from sigmascale_jax.io.sources import open_model
    from sigmascale_jax.model.modeling import stack_params, token_nll

    counter = CompileCounter()
    cfg, params, source = ssj.load_model(model)
    params = jax.device_get(params)
    report = json.loads((Path(model) / "compression.json").read_text())
    dense = open_model(report["model"])
    from sigmascale_jax.io.hf_map import load_params

    teacher = jax.device_get(load_params(dense.reader, dense.cfg))
    tok = source.tokenizer()
    data = benchlib.REPO.parent / "shared" / "data"
    ids = np.asarray(tok(perplexity_text("c4", data)).input_ids, np.int32)
    out: dict = {"mode": mode, "model": model}
    blocks = jax.device_get(params["blocks"])
    out["padding_overhead"] = stacking.padding_overhead([{k: v.to_tree() if hasattr(v, "to_tree") else v
                                                         for k, v in b.items()} for b in blocks])

    def timed(fn, *args):
        c0 = counter.snapshot()
        t0 = time.perf_counter()
        res = fn(*args)
        jax.block_until_ready(res)
        n, secs = counter.since(c0)
        return res, time.perf_counter() - t0, n, secs

    # heal: the stage's step on the quick start's batch
    batch = ids[: 4 * heal_len * (steps + 1)].reshape(steps + 1, 4, heal_len)
    states = heal.teacher_states(teacher, batch.reshape(-1, heal_len), cfg, 4).reshape(steps + 1, 4, heal_len, -1)
    tree = stack_params({**params, "blocks": jax.device_get(params["blocks"])})
    labels = heal.heal_labels(tree)
    split = heal.Split.of(tree, labels)
    train, frozen = split.partition(tree)
    tx = optax.adamw(1e-5, weight_decay=0.0)
    opt = jax.jit(tx.init)(train)
    train, frozen, opt = jax.device_put((train, frozen, opt))
    times = []
    for i in range(steps + 1):
        (train, opt, loss), secs, n, csecs = timed(lambda t, o, i=i: heal.heal_step(
            t, o, frozen, jnp.asarray(states[i]), jnp.asarray(batch[i]), split=split, cfg=cfg, optimizer=tx),
            train, opt)
        times.append((secs, n, csecs))
    out["heal"] = {"first_s": times[0][0], "compiles": times[0][1], "compile_s": times[0][2],
                   "step_s": float(np.mean([t[0] for t in times[1:]])), "stacked": isinstance(tree["blocks"], dict)}

    # eval: perplexity windows of 2048 tokens
    evalp = jax.device_put(stack_params(params))
    nll = jax.jit(token_nll, static_argnames="cfg")
    wins = ids[: windows * eval_len].reshape(windows, 1, eval_len)
    runs = [timed(lambda w: nll(evalp, jnp.asarray(w), cfg=cfg), w) for w in wins]
    out["eval"] = {"first_s": runs[0][1], "compiles": runs[0][2], "compile_s": runs[0][3],
                   "window_s": float(np.mean([r[1] for r in runs[1:]]))}

    # generation: prefill 32 tokens, then `tokens` decoding steps
    cache = kvcache.init_cache(cfg, 1, 32 + tokens)
    prompt = jnp.asarray(ids[None, :32])
    (logits, cache), secs, n, csecs = timed(lambda c: kvcache.step(evalp, prompt, cfg, c), cache)
    nxt = jnp.argmax(logits[:, -1:], axis=-1).astype(jnp.int32)
    (logits, cache), secs1, n1, csecs1 = timed(lambda c: kvcache.step(evalp, nxt, cfg, c), cache)
    per = []
    for _ in range(tokens - 1):
        nxt = jnp.argmax(logits[:, -1:], axis=-1).astype(jnp.int32)
        (logits, cache), s, _, _ = timed(lambda c: kvcache.step(evalp, nxt, cfg, c), cache)
        per.append(s)
    out["generate"] = {"prefill_first_s": secs, "decode_first_s": secs1, "compiles": n + n1,
                       "compile_s": csecs + csecs1, "token_s": float(np.mean(per))}
    out["process_compiles"] = counter.count
    return out


def table(payload: dict) -> str:
    lines = [f"# Scan or unroll (CPU: {payload['cpu']})", "",
             f"Command: `{payload['command']}`. `scan` stacks the blocks (factors padded to the widest rank of each "
             "projection, dense-kept matrices as loop constants) and runs one `lax.scan`; `unrolled` lists the blocks "
             "in the program. Healing: `heal_step` on 4 x 512 tokens without rematerialization; evaluation: windows "
             "of 2048 tokens; generation: a 32-token prompt, then one token a step. Seconds are wall-clock on this "
             "CPU; `first` includes the compile. Padding: the multiply-adds the padded stack adds to the projections'.",
             ""]
    for model in dict.fromkeys(r["model"] for r in payload["rows"]):
        rows = {r["mode"]: r for r in payload["rows"] if r["model"] == model}
        pad = next(iter(rows.values()))["padding_overhead"]
        lines += [f"## {model} (padding +{100 * pad:.1f}%)", "",
                  "| part | mode | compiles | compile s | first s | then ms (each) |",
                  "| --- | --- | ---: | ---: | ---: | ---: |"]
        for part, each in (("heal", "step_s"), ("eval", "window_s"), ("generate", "token_s")):
            for mode in MODES:
                if mode not in rows:
                    continue
                r = rows[mode][part]
                first = r.get("first_s", r.get("prefill_first_s", 0.0) + r.get("decode_first_s", 0.0))
                lines.append(f"| {part} | {mode} | {r['compiles']} | {r['compile_s']:.1f} | {first:.1f} | "
                             f"{1000 * r[each]:.1f} |")
        if all(m in rows for m in MODES):
            s, u = rows["scan"], rows["unrolled"]
            lines += ["", "Which is ahead over a run (steps, windows, tokens):"]
            for part, each in (("heal", "step_s"), ("eval", "window_s"), ("generate", "token_s")):
                dc = u[part]["compile_s"] - s[part]["compile_s"]
                dr = s[part][each] - u[part][each]
                if dc >= 0 and dr <= 0:
                    verdict = "scan is ahead from the first"
                elif dc <= 0 and dr >= 0:
                    verdict = "unrolled is ahead from the first"
                elif dr > 0:
                    verdict = f"scan is ahead for fewer than {dc / dr:.0f}, unrolled after"
                else:
                    verdict = f"unrolled is ahead for fewer than {dc / dr:.0f}, scan after"
                lines.append(f"- {part}: scan saves {dc:.1f} s of compiling and costs {1000 * dr:+.1f} ms each: "
                             f"{verdict}")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", required=True, help="compressed folders, comma-separated")
    p.add_argument("--model", help=argparse.SUPPRESS)  # one folder (internal, with --mode)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--eval-len", type=int, default=2048)
    p.add_argument("--heal-len", type=int, default=512)
    p.add_argument("--out", default="results/scan_smollm2")
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # one mode, in this process (internal)
    p.add_argument("--json", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        Path(args.json).write_text(json.dumps(measure(args.mode, args.model, args.steps, args.windows, args.tokens,
                                                      args.eval_len, args.heal_len)))
        return
    rows = []
    for model in args.models.split(","):
        for mode in MODES:
            tmp = benchlib.REPO / "runs" / f"bench_scan_{mode}.json"
            tmp.parent.mkdir(exist_ok=True)
            env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
            cmd = [sys.executable, __file__, "--models", model, "--model", model, "--steps", str(args.steps),
                   "--windows", str(args.windows), "--tokens", str(args.tokens), "--eval-len", str(args.eval_len),
                   "--heal-len", str(args.heal_len), "--mode", mode, "--json", str(tmp)]
            proc = subprocess.run(cmd, cwd=benchlib.REPO, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                                  text=True)
            if proc.returncode:
                raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
            rows.append(json.loads(tmp.read_text()))
            print(json.dumps(rows[-1]), flush=True)
    payload = {"cpu": benchlib.cpu_name(), "command": benchlib.command_line(), "rows": rows}
    benchlib.write(args.out, payload, table(payload))
    print(table(payload))


if __name__ == "__main__":
    main()
