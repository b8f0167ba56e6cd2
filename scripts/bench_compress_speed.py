"""Compression throughput: this project's svd-llm compression beside a PyTorch pass doing the same Gram accumulation.

In one run on one machine:
- `python -m sigmascale_jax.compress --method svd-llm` (sequential and not), whole-process
  wall time and its own per-stage timings (compression.json);
- a PyTorch reference (transformers forward, float32, hooks): the Gram matrix of every
  projection's input accumulated over the same calibration windows, q/k/v sharing one
  and gate/up sharing one, as the compressor's statistics pass does.
Prints a table with each stage's seconds and the ratios; writes OUT.md and OUT.json.

    python scripts/bench_compress_speed.py --out results/compress_speed
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DEFAULT_MODEL = str(REPO.parent / "shared" / "models" / "smollm2-135m-instruct-q4_1")


def ours(args, sequential: bool) -> dict:
    out = REPO / args.runs_dir / f"speed-svd-llm-{'seq' if sequential else 'noseq'}"
    cmd = [sys.executable, "-m", "sigmascale_jax.compress", "--model", args.model, "--method", "svd-llm",
           "--ratio", str(args.ratio), "--nsamples", str(args.nsamples), "--seq-len", str(args.seq_len),
           "--out", str(out), "--overwrite", "--no-progress", "--sequential" if sequential else "--no-sequential"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    report = json.loads((out / "compression.json").read_text())
    return {"run": f"sigmascale_jax svd-llm ({'sequential' if sequential else 'no-sequential'})", "wall_s": wall,
            "stages_s": report["timings_s"]}


def torch_gram_pass(args) -> dict:
    """transformers forward over the calibration windows, accumulating every projection input's Gram matrix."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from sigmascale_jax.compress.pipeline import run_windows
    from sigmascale_jax.compress.plan import RunSpec
    from sigmascale_jax.io.sources import open_model

    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    src = open_model(args.model)
    windows = run_windows(src, RunSpec(model=args.model, ratio=args.ratio, nsamples=args.nsamples,
                                               seq_len=args.seq_len), None)
    p = Path(args.model)
    gguf = next(iter(p.glob("*.gguf")), None) if p.is_dir() else (p if p.suffix == ".gguf" else None)
    kw = {"gguf_file": gguf.name} if gguf else {}
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent if gguf else p), dtype=torch.float32, **kw).eval()
    t1 = time.perf_counter()
    grams: dict[str, torch.Tensor] = {}

    def hook(key):
        def fn(module, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1])
            grams[key] = grams[key] + x.T @ x if key in grams else x.T @ x
        return fn

    handles = []
    for i, layer in enumerate(model.model.layers):  # one tap per distinct input: q (for q/k/v), o, gate (gate/up), down
        for name, module in (("attn_in", layer.self_attn.q_proj), ("o_in", layer.self_attn.o_proj),
                             ("mlp_in", layer.mlp.gate_proj), ("down_in", layer.mlp.down_proj)):
            handles.append(module.register_forward_pre_hook(hook(f"{i}.{name}")))
    with torch.no_grad():
        for s in range(0, len(windows), args.batch_size):
            model(torch.from_numpy(np.asarray(windows[s : s + args.batch_size], np.int64)))
    for h in handles:
        h.remove()
    t2 = time.perf_counter()
    return {"run": "PyTorch reference: transformers forward + Gram hooks (float32)", "wall_s": t2 - t0,
            "stages_s": {"load": t1 - t0, "stats": t2 - t1}, "grams": len(grams)}


def markdown(rows: list[dict], args, cpu: str) -> str:
    ref = next(r for r in rows if r["run"].startswith("PyTorch"))
    lines = [f"# Compression throughput on {Path(args.model).name}\n",
             f"{cpu}, {os.cpu_count()} cores; calibration {args.nsamples} × {args.seq_len} C4 tokens; ratio {args.ratio}; "
             "caches warm (converted GGUF tokenizer and config, calibration token ids). "
             f"Command: `python {' '.join(sys.argv)}`\n",
             "| run | wall s | vs PyTorch wall | stats s | vs PyTorch stats pass | stages (s) |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        st = r["stages_s"]
        stages = ", ".join(f"{k} {v:.1f}" for k, v in st.items())
        lines.append(f"| {r['run']} | {r['wall_s']:.1f} | {r['wall_s'] / ref['wall_s']:.2f}× | {st.get('stats', 0):.1f} | "
                     f"{st.get('stats', 0) / ref['stages_s']['stats']:.2f}× | {stages} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--runs-dir", default="runs/speed")
    p.add_argument("--out", default="results/compress_speed")
    args = p.parse_args()
    import benchlib

    rows = [torch_gram_pass(args), ours(args, True), ours(args, False)]
    cpu = benchlib.cpu_name()
    benchlib.write(args.out, {"args": vars(args), "cpu": cpu, "rows": rows}, markdown(rows, args, cpu))
    print(markdown(rows, args, cpu))
    return 0


if __name__ == "__main__":
    sys.exit(main())
