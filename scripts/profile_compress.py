"""Where svd-llm compression's time goes, op by op, and how fast this machine's matmuls are in XLA vs PyTorch.

One SmolLM2 block and one statistics chunk (8 windows x 512 tokens, the compressor's
batch), each piece jit-compiled alone and timed (median of --reps after a warm-up); the
FLOPs of each piece come from XLA's own `cost_analysis()`. Then the two matmul shapes
that dominate the pass, in XLA, PyTorch (float32, this CPU's threads) and NumPy; then
the set-up stages (opening the GGUF, the tokenizer, the calibration windows); then
evaluation's shape (one 2048-token window): block forward, attention core and LM head,
the last two beside PyTorch's fused attention and matmul on the same arrays.

    python scripts/profile_compress.py --out results/compress_profile

Run it on an idle machine: every number is a wall-clock time on this CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DEFAULT_MODEL = str(REPO.parent / "shared" / "models" / "smollm2-135m-instruct-q4_1")


def median_time(fn, reps: int) -> float:
    import jax
    import numpy as np

    jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def xla_flops(jitted, *args) -> float:
    cost = jitted.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0))


def block_pieces(args) -> list[dict]:
    """The statistics chunk and its parts: `[{"piece", "s", "gflop", "gflops"}]`."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import sigmascale_jax.model.modeling as M
    from sigmascale_jax.io.hf_map import load_block
    from sigmascale_jax.io.sources import open_model
    from sigmascale_jax.compress.stats import block_stats_chunk

    src = open_model(args.model)
    cfg = src.cfg
    block = load_block(src.reader, cfg, args.block)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((args.batch, args.seq_len, cfg.hidden_size)).astype(np.float32))
    cos, sin = M.rope_cos_sin(cfg, jnp.arange(args.seq_len))
    taps = jax.jit(lambda b, x: M.block_forward_taps(b, x, cfg, cos, sin)[1])(block, x)
    q, k, v = jax.jit(lambda b, x: M.queries_keys_values(b, x, cfg, cos, sin))(block, x)

    def core(q, k, v):
        return M.attention_core(q, k, v, cfg)

    def gram(a):
        f = a.reshape(-1, a.shape[-1])
        return f.T @ f

    pieces = [
        ("stats chunk (forward + Gram matrices)", lambda b, x: block_stats_chunk(b, x, cfg), (block, x)),
        ("stats chunk without the block output (--sequential)", lambda b, x: block_stats_chunk(b, x, cfg, False), (block, x)),
        ("block forward", lambda b, x: M.block_forward(b, x, cfg, cos, sin), (block, x)),
        ("  q/k/v projections + rope", lambda b, x: M.queries_keys_values(b, x, cfg, cos, sin), (block, x)),
        ("  attention core (scores, softmax, values)", core, (q, k, v)),
        ("  o projection", lambda b, a: M.project(b["o"], a), (block, taps["o_in"])),
        ("  gate/up projections + SiLU", lambda b, a: M.mlp_hidden(b, a), (block, taps["mlp_in"])),
        ("  down projection", lambda b, a: M.project(b["down"], a), (block, taps["down_in"])),
    ] + [(f"Gram of {name} [{a.shape[-1]}]", gram, (a,)) for name, a in taps.items()]
    rows = []
    for name, fn, fargs in pieces:
        jitted = jax.jit(fn)
        s = median_time(lambda: jitted(*fargs), args.reps)
        flops = xla_flops(jitted, *fargs)
        rows.append({"piece": name, "s": s, "gflop": flops / 1e9, "gflops": flops / 1e9 / s})
        print(f"{name:55s} {s * 1e3:8.1f} ms {flops / 1e9:7.2f} GFLOP {flops / 1e9 / s:7.1f} GFLOP/s", flush=True)
    return rows


def matmuls(args) -> list[dict]:
    """The pass's two dominant matmul shapes in XLA, PyTorch and NumPy (float32)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    tokens = args.batch * args.seq_len
    rng = np.random.default_rng(0)
    shapes = [("x W_upᵀ: [%d,576] x [576,1536]" % tokens, (tokens, 576), (1536, 576), "xwT"),
              ("Gram Xᵀ X: [%d,1536]" % tokens, (tokens, 1536), None, "gram")]
    rows = []
    for label, xs, ws, kind in shapes:
        a = rng.standard_normal(xs).astype(np.float32)
        w = rng.standard_normal(ws).astype(np.float32) if ws else None
        flops = 2 * xs[0] * xs[1] * (ws[0] if ws else xs[1])
        ja, jw = jnp.asarray(a), (jnp.asarray(w) if ws else None)
        ta, tw = torch.from_numpy(a), (torch.from_numpy(w) if ws else None)
        if kind == "xwT":
            f_xla = jax.jit(lambda a, w: a @ w.T)
            runs = {"xla": lambda: f_xla(ja, jw), "torch": lambda: ta @ tw.T, "numpy": lambda: a @ w.T}
        else:
            f_xla = jax.jit(lambda a: a.T @ a)
            runs = {"xla": lambda: f_xla(ja), "torch": lambda: ta.T @ ta, "numpy": lambda: a.T @ a}
        row = {"matmul": label, "gflop": flops / 1e9}
        for lib, fn in runs.items():
            row[f"{lib}_s"] = median_time(fn, args.reps)
        rows.append(row)
        print(f"{label:40s} " + "  ".join(f"{lib} {row[f'{lib}_s'] * 1e3:7.1f} ms ({flops / 1e9 / row[f'{lib}_s']:6.1f} GFLOP/s)"
                                          for lib in runs), flush=True)
    return rows


def eval_forward(args) -> list[dict]:
    """Evaluation's shape (1 window of --eval-seq-len): block forward, attention core and LM head, ours vs PyTorch."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    import sigmascale_jax.model.modeling as M
    from sigmascale_jax.io.hf_map import load_block, load_outer
    from sigmascale_jax.io.sources import open_model

    torch.set_num_threads(os.cpu_count() or 1)
    src = open_model(args.model)
    cfg = src.cfg
    block, head = load_block(src.reader, cfg, args.block), M.lm_head(load_outer(src.reader, cfg))
    t = args.eval_seq_len
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, t, cfg.hidden_size)).astype(np.float32))
    cos, sin = M.rope_cos_sin(cfg, jnp.arange(t))
    q, k, v = jax.jit(lambda b, x: M.queries_keys_values(b, x, cfg, cos, sin))(block, x)

    def core(q, k, v):
        return M.attention_core(q, k, v, cfg)

    # the same q/k/v for PyTorch's fused attention: [B, H, T, hd] queries, [B, Hkv, T, hd] keys and values
    tq = torch.from_numpy(np.asarray(q).reshape(1, cfg.num_heads, t, cfg.head_dim).copy())
    tk, tv = torch.from_numpy(np.asarray(k).copy()), torch.from_numpy(np.asarray(v).copy())
    th, tx = torch.from_numpy(np.asarray(head)), torch.from_numpy(np.asarray(x)[0])
    sdpa = torch.nn.functional.scaled_dot_product_attention
    jit_fwd = jax.jit(lambda b, x: M.block_forward(b, x, cfg, cos, sin))
    jit_core, jit_head = jax.jit(core), jax.jit(lambda h, x: x[0] @ h.T)
    rows = [
        {"piece": "block forward", "ours_s": median_time(lambda: jit_fwd(block, x), args.reps)},
        {"piece": "attention core", "ours_s": median_time(lambda: jit_core(q, k, v), args.reps),
         "torch_s": median_time(lambda: sdpa(tq, tk, tv, is_causal=True, enable_gqa=True), args.reps)},
        {"piece": f"LM head [{t},{cfg.hidden_size}] x [{cfg.hidden_size},{head.shape[0]}]",
         "ours_s": median_time(lambda: jit_head(head, x), args.reps),
         "torch_s": median_time(lambda: tx @ th.T, args.reps)},
    ]
    for r in rows:
        print(f"eval shape 1 x {t}: {r['piece']:45s} ours {r['ours_s'] * 1e3:7.1f} ms"
              + (f"  PyTorch {r['torch_s'] * 1e3:7.1f} ms" if "torch_s" in r else ""), flush=True)
    return rows


def setup_stages(args) -> dict:
    """Seconds of the compressor's set-up: open the model, build the tokenizer, tokenize the calibration text."""
    from sigmascale_jax.compress.pipeline import run_windows
    from sigmascale_jax.compress.plan import RunSpec
    from sigmascale_jax.io.sources import open_model

    t0 = time.perf_counter()
    src = open_model(args.model)
    t1 = time.perf_counter()
    src.tokenizer()
    t2 = time.perf_counter()
    run_windows(src, RunSpec(model=args.model, ratio=0.4, nsamples=64, seq_len=512), None)
    t3 = time.perf_counter()
    out = {"open_model_s": t1 - t0, "tokenizer_s": t2 - t1, "calibration_windows_s": t3 - t2}
    print("set-up: " + ", ".join(f"{k} {v:.2f}" for k, v in out.items()), flush=True)
    return out


def markdown(payload: dict) -> str:
    lines = [f"# Where svd-llm compression's time goes ({Path(payload['model']).name})", "",
             f"Machine: {payload['machine']}. One block (block {payload['block']}), one statistics chunk of "
             f"{payload['batch']} x {payload['seq_len']} tokens; median of {payload['reps']} runs after a warm-up; "
             "GFLOP from XLA's `cost_analysis()`. Command: `python scripts/profile_compress.py --out "
             "results/compress_profile`.", "",
             "| piece | ms | GFLOP | GFLOP/s |", "| --- | ---: | ---: | ---: |"]
    for r in payload["pieces"]:
        lines.append(f"| {r['piece'].strip() if not r['piece'].startswith('  ') else '… ' + r['piece'].strip()} | "
                     f"{r['s'] * 1e3:.1f} | {r['gflop']:.2f} | {r['gflops']:.1f} |")
    lines += ["", "Matmul throughput on this CPU, float32 (same shapes, same machine, same run):", "",
              "| matmul | GFLOP | XLA ms | PyTorch ms | NumPy ms | PyTorch / XLA speed |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in payload["matmuls"]:
        lines.append(f"| {r['matmul']} | {r['gflop']:.1f} | {r['xla_s'] * 1e3:.1f} | {r['torch_s'] * 1e3:.1f} | "
                     f"{r['numpy_s'] * 1e3:.1f} | {r['xla_s'] / r['torch_s']:.2f}x |")
    lines += ["", f"Evaluation's shape (1 window of {payload['eval_seq_len']} tokens, one block; PyTorch on the same "
              "q/k/v and weights: `scaled_dot_product_attention(is_causal=True, enable_gqa=True)`, `x @ Wᵀ`):", "",
              "| piece | ours ms | PyTorch ms | PyTorch / ours speed |", "| --- | ---: | ---: | ---: |"]
    for r in payload["eval_forward"]:
        torch_ms = f"{r['torch_s'] * 1e3:.1f}" if "torch_s" in r else ""
        speed = f"{r['ours_s'] / r['torch_s']:.2f}x" if "torch_s" in r else ""
        lines.append(f"| {r['piece']} | {r['ours_s'] * 1e3:.1f} | {torch_ms} | {speed} |")
    s = payload["setup"]
    lines += ["", f"Set-up: open the model {s['open_model_s']:.2f} s, tokenizer {s['tokenizer_s']:.2f} s, "
              f"tokenize the calibration text into 64 x 512 windows {s['calibration_windows_s']:.2f} s.", ""]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--block", type=int, default=3)
    p.add_argument("--batch", type=int, default=8, help="windows per statistics chunk (the compressor's --batch-size)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-seq-len", type=int, default=2048, help="window length of the evaluation-shape section")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--out", default="results/compress_profile", help="writes OUT.md and OUT.json")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from benchlib import cpu_name
    from sigmascale_jax.io.fileio import write_json_atomic, write_text_atomic

    payload = {"model": args.model, "block": args.block, "batch": args.batch, "seq_len": args.seq_len, "reps": args.reps,
               "machine": f"{cpu_name()}, {os.cpu_count()} cores",
               "eval_seq_len": args.eval_seq_len, "setup": setup_stages(args), "pieces": block_pieces(args),
               "matmuls": matmuls(args), "eval_forward": eval_forward(args)}
    out = REPO / args.out
    write_json_atomic(out.with_suffix(".json"), payload)
    write_text_atomic(out.with_suffix(".md"), markdown(payload))
    print(f"wrote {out}.md and {out}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
