"""Tokens/s of the jit-compiled Flax forward vs transformers (PyTorch eager) on the same CPU, model and windows.

Both sides compute full logits of the same token windows in float32. The first
JAX call (compilation) is timed apart and excluded from the rate; torch gets one
warm-up pass too. Prints a table and writes JSON.

    python scripts/bench_forward.py --model ../shared/models/smollm2-135m-instruct-q4_1 \\
        --seq-len 2048 --batch-size 1 --windows 4 --out results/bench_forward_smollm2.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchlib import cpu_name  # noqa: E402
from sigmascale_jax.io.data import find_data_dir, perplexity_text  # noqa: E402
from sigmascale_jax.io.fileio import write_json_atomic  # noqa: E402
from sigmascale_jax.eval.perplexity import make_windows  # noqa: E402
from sigmascale_jax.io.sources import load_model  # noqa: E402


def time_calls(fn, batches, repeats: int) -> float:
    """Best-of-`repeats` seconds to run `fn` over all batches."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for b in batches:
            fn(b)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(Path(__file__).resolve().parents[2] / "shared/models/smollm2-135m-instruct-q4_1"))
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--windows", type=int, default=4, help="WikiText-2 windows per timed pass")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    p.add_argument("--out", default="results/bench_forward.json")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import torch
    from transformers import AutoModelForCausalLM

    from sigmascale_jax.model.modeling import forward_jit

    torch.set_num_threads(args.threads)
    cfg, params, source = load_model(args.model)
    ids = np.asarray(source.tokenizer()(perplexity_text("wikitext2", find_data_dir())).input_ids)
    windows = make_windows(ids, args.seq_len, args.windows)
    batches = [windows[i : i + args.batch_size] for i in range(0, len(windows), args.batch_size)]
    batches = [b for b in batches if len(b) == args.batch_size]
    tokens = sum(b.size for b in batches)

    jax_batches = [jnp.asarray(b) for b in batches]
    t0 = time.perf_counter()
    forward_jit(params, jax_batches[0], cfg).block_until_ready()
    compile_s = time.perf_counter() - t0
    jax_s = time_calls(lambda b: forward_jit(params, b, cfg).block_until_ready(), jax_batches, args.repeats)

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(str(source.folder), dtype=torch.float32, **kwargs).eval()
    torch_batches = [torch.from_numpy(b.astype(np.int64)) for b in batches]

    def torch_fwd(b):
        with torch.no_grad():
            return model(b).logits

    torch_fwd(torch_batches[0])
    torch_s = time_calls(torch_fwd, torch_batches, args.repeats)

    res = {
        "model": args.model,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "tokens_per_pass": tokens,
        "flax_tokens_per_s": tokens / jax_s,
        "transformers_tokens_per_s": tokens / torch_s,
        "ratio_flax_over_transformers": torch_s / jax_s,
        "flax_compile_s": round(compile_s, 2),
        "attn_implementation": model.config._attn_implementation,
        "jax": jax.__version__,
        "torch": torch.__version__,
        "device": jax.devices()[0].device_kind,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
    }
    print(f"{'impl':<28} {'tokens/s':>10}")
    print(f"{'flax (jit)':<28} {res['flax_tokens_per_s']:>10.1f}")
    print(f"{'transformers eager (' + res['attn_implementation'] + ')':<28} {res['transformers_tokens_per_s']:>10.1f}")
    print(f"ratio flax / transformers: {res['ratio_flax_over_transformers']:.2f}x  (compile {compile_s:.1f} s, excluded)")
    write_json_atomic(args.out, res)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
