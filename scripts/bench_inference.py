"""Inference speed: prefill and decode tokens/s, weight bytes and peak memory, dense vs compressed vs transformers.

Every model runs in its own process (peak memory is per model), on the same machine in
the same run: this project's jit-compiled decoder with its KV cache (`kvcache.step`) on
the dense model and on compressed ones, and transformers (PyTorch eager, its own KV
cache) on the dense model as the peer. Prefill: one `--prompt-len` prompt. Decode: after a
`--prompt-len` prompt, `--new-tokens` steps of one token, at batch 1 and `--batch`.
Compilation and the first call are excluded (warm-up), the best of `--repeats` kept.

    python scripts/bench_inference.py --out results/inference_smollm2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DEFAULT_MODEL = str(REPO.parent / "shared" / "models" / "smollm2-135m-instruct-q4_1")
RUNS = "runs/bench_ranks"
DEFAULT_MODELS = ",".join([
    f"dense={DEFAULT_MODEL}",
    f"svd-llm@0.2={RUNS}/svd-llm-uniform-0.2", f"svd-llm@0.4={RUNS}/svd-llm-uniform-0.4",
    f"pivga@0.2={RUNS}/svd-llm-pivga-0.2", f"pivga@0.4={RUNS}/svd-llm-pivga-0.4",
    f"pivga+int8@0.2={RUNS}/svd-llm-pivga-0.2-int8", f"pivga+int8@0.4={RUNS}/svd-llm-pivga-0.4-int8",
])


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up: compilation, first-call allocation
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def ours(path: str, args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import sigmascale_jax  # noqa: F401
    from sigmascale_jax.io.sources import load_model
    from sigmascale_jax.model.kvcache import init_cache, step
    from sigmascale_jax.model.leaves import stored_bytes
    from sigmascale_jax.model.modeling import stack_params
    from sigmascale_jax.parallel import on_device

    cfg, params, _ = load_model(path)
    report = Path(path) / "compression.json"
    # a folder's bytes as stored (bfloat16 floats, quantized embeddings: its report counts them); else the arrays'
    weight_bytes = (json.loads(report.read_text())["bytes"]["model_compressed"] if report.is_file()
                    else stored_bytes(params))
    # as `generate` runs them: stacked once and on the device once. Handed a list of blocks, `step` stacks them
    # inside every call, a copy of every weight per decoded token (what this script measured from the compile-once
    # rewrite until 2026-12-07: 3.6 tok/s for one sequence of the dense model instead of ~20)
    params = on_device(stack_params(params), None)
    rng = np.random.default_rng(0)
    total = args.prompt_len + args.new_tokens + 1
    out = {"weight_bytes": weight_bytes}
    for batch in (1, args.batch):
        prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, args.prompt_len)), jnp.int32)
        one = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, 1)), jnp.int32)

        def prefill():
            logits, _ = step(params, prompt, cfg, init_cache(cfg, batch, total))
            return jax.block_until_ready(logits)

        def decode():
            _, cache = step(params, prompt, cfg, init_cache(cfg, batch, total))
            jax.block_until_ready(cache.k)
            t = time.perf_counter()
            for _ in range(args.new_tokens):
                logits, cache = step(params, one, cfg, cache)
            jax.block_until_ready(logits)
            return time.perf_counter() - t

        if batch == 1:
            out["prefill_tok_s"] = args.prompt_len / best_time(prefill, args.repeats)
        decode()  # warm-up
        out[f"decode_b{batch}_tok_s"] = batch * args.new_tokens / min(decode() for _ in range(args.repeats))
    return out


def transformers_peer(path: str, args) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    p = Path(path)
    gguf = next(iter(p.glob("*.gguf")), None) if p.is_dir() else (p if p.suffix == ".gguf" else None)
    kw = {"gguf_file": gguf.name} if gguf else {}
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent if gguf else p), dtype=torch.float32,
                                                 attn_implementation="eager", **kw).eval()
    rng = np.random.default_rng(0)
    out = {"weight_bytes": sum(t.numel() * t.element_size() for t in model.parameters())}  # tied head counted once
    with torch.no_grad():
        for batch in (1, args.batch):
            prompt = torch.from_numpy(rng.integers(0, model.config.vocab_size, (batch, args.prompt_len)))
            one = torch.from_numpy(rng.integers(0, model.config.vocab_size, (batch, 1)))
            if batch == 1:
                out["prefill_tok_s"] = args.prompt_len / best_time(lambda: model(prompt, use_cache=True), args.repeats)

            def decode():
                past = model(prompt, use_cache=True).past_key_values
                t = time.perf_counter()
                for _ in range(args.new_tokens):
                    past = model(one, past_key_values=past, use_cache=True).past_key_values
                return time.perf_counter() - t

            decode()
            out[f"decode_b{batch}_tok_s"] = batch * args.new_tokens / min(decode() for _ in range(args.repeats))
    return out


def worker(kind: str, path: str, args) -> None:
    res = ours(path, args) if kind == "ours" else transformers_peer(path, args)
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(res))


def run_one(kind: str, label: str, path: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, path, "--prompt-len", str(args.prompt_len),
           "--new-tokens", str(args.new_tokens), "--batch", str(args.batch), "--repeats", str(args.repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise SystemExit(f"{label} failed:\n{proc.stderr[-2000:]}")
    row = {"label": label, "engine": "transformers eager" if kind == "torch" else "sigmascale_jax", "path": path,
           **json.loads(line[7:])}
    print(f"{label:<24} {row['engine']:<20} prefill {row['prefill_tok_s']:8.1f}  decode b1 {row['decode_b1_tok_s']:7.1f}  "
          f"b{args.batch} {row[f'decode_b{args.batch}_tok_s']:7.1f} tok/s  {row['weight_bytes'] / 2**20:7.1f} MB  "
          f"peak {row['peak_rss_mib']:.0f} MiB", flush=True)
    return row


def earlier_runs(previous: dict | None) -> list[dict]:
    """The runs a `--previous` JSON holds, newest first: its own, then those it kept (a chain, or a list)."""
    out = []
    while previous:
        out.append({k: v for k, v in previous.items() if k not in ("previous", "earlier")})
        out += previous.get("earlier", [])
        previous = previous.get("previous")
    return out


def shown_command() -> str:
    """This script's command line, a `--previous-note` paragraph shown as `"..."` (it is printed under its table)."""
    argv = list(sys.argv)
    for i, a in enumerate(argv[:-1]):
        if a == "--previous-note":
            argv[i + 1] = '"..."'
    return " ".join(argv)


def markdown(rows: list[dict], args, earlier: list[dict] = ()) -> str:
    lines = [f"# Inference speed on {Path(args.model).name}\n",
             f"{os.cpu_count()} CPU cores; prompt {args.prompt_len} tokens; decode {args.new_tokens} tokens after it; "
             f"best of {args.repeats} after a warm-up. Command: `python {shown_command()}`\n"]
    lines += table(rows, args.batch)
    for run in earlier:
        prev_args = argparse.Namespace(**run["args"])
        lines += ["", "## An earlier run (kept from `--previous`; its own dense and transformers rows)\n",
                  f"Command: `python scripts/bench_inference.py --models {prev_args.models}`. Prompt "
                  f"{prev_args.prompt_len}, decode {prev_args.new_tokens}, best of {prev_args.repeats}.\n"]
        if run.get("note"):
            lines += [run["note"] + "\n"]
        lines += table(run["rows"], prev_args.batch)
    return "\n".join(lines) + "\n"


def table(rows: list[dict], b: int) -> list[str]:
    """One run's rows, each against that run's dense model (ours) and transformers."""
    base = next(r for r in rows if r["label"] == "dense" and r["engine"] == "sigmascale_jax")
    peer = next((r for r in rows if r["engine"] == "transformers eager"), None)
    lines = [f"| model | engine | prefill tok/s | decode b1 tok/s | decode b{b} tok/s | weights MB | peak RSS MiB "
             f"| vs dense (prefill / b1 / b{b}) | vs transformers (prefill / b1 / b{b}) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    keys = ("prefill_tok_s", "decode_b1_tok_s", f"decode_b{b}_tok_s")
    for r in rows:
        if r.get("not_run"):
            lines.append(f"| {r['label']} | not run | | | | | | | |")
            continue
        vs = " / ".join(f"{r[k] / base[k]:.2f}×" for k in keys)
        vp = " / ".join(f"{r[k] / peer[k]:.2f}×" for k in keys) if peer else ""
        lines.append(f"| {r['label']} | {r['engine']} | {r[keys[0]]:.1f} | {r[keys[1]]:.1f} | {r[keys[2]]:.1f} "
                     f"| {r['weight_bytes'] / 2**20:.1f} | {r['peak_rss_mib']:.0f} | {vs} | {vp} |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="the dense model (also run by transformers)")
    p.add_argument("--models", default=DEFAULT_MODELS, help="label=path,... run by this project (missing: not run)")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="results/inference_smollm2")
    p.add_argument("--worker", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    p.add_argument("--previous", default=None, help="a results JSON of this script whose tables (its run and those it "
                   "kept) are kept below this run's (each run's rows compared with its own dense run)")
    p.add_argument("--previous-note", default=None, help="a paragraph kept under --previous's own run's table (what "
                   "was since found wrong with it, say)")
    args = p.parse_args()
    if args.worker:
        worker(*args.worker, args)
        return 0
    import benchlib

    shown = benchlib.shown_path  # results name models repo-relative (../shared/..., runs/...), not by this machine
    rows = [{**run_one("torch", "dense", args.model, args), "path": shown(args.model)}]
    for item in args.models.split(","):
        label, path = item.split("=", 1)
        full = path if Path(path).is_absolute() else str(REPO / path)
        if not Path(full).exists():
            print(f"{label:<24} not run ({path} missing)")
            rows.append({"label": label, "path": path, "not_run": True})
            continue
        rows.append({**run_one("ours", label, full, args), "path": shown(path)})
    earlier = earlier_runs(json.loads((REPO / args.previous).read_text()) if args.previous else None)
    if earlier and args.previous_note:
        earlier[0] = {**earlier[0], "note": args.previous_note}
    benchlib.write(args.out, {"args": vars(args), "rows": rows, "earlier": earlier},
                   markdown(rows, args, earlier))
    print(markdown(rows, args, earlier))
    return 0


if __name__ == "__main__":
    sys.exit(main())
