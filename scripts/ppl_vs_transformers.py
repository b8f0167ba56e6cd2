"""Perplexity of the Flax decoder beside transformers (PyTorch, CPU) on the same weights and windows.

transformers loads the checkpoint with its own converter (GGUF dequantization and
Q/K un-permutation included), so this also checks our loader independently.

    python scripts/ppl_vs_transformers.py --model ../shared/models/smollm2-135m-instruct-q4_1 \\
        --tasks wikitext2,c4 --seq-len 2048 --out results/ppl_vs_transformers_smollm2.json
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sigmascale_jax.io.data import find_data_dir, perplexity_text  # noqa: E402
from sigmascale_jax.io.fileio import write_json_atomic  # noqa: E402
from sigmascale_jax.eval.perplexity import make_windows  # noqa: E402
from sigmascale_jax.io.sources import load_model  # noqa: E402


def load_torch_model(source):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(str(source.folder), dtype=torch.float32, **kwargs)
    return model.eval()


def torch_nll_sum(model, window: np.ndarray) -> float:
    import torch

    with torch.no_grad():
        ids = torch.from_numpy(window[None].astype(np.int64))
        logits = model(ids).logits[0, :-1].float()
        return float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--tasks", default="wikitext2,c4")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--out", required=True, help="JSON output")
    args = p.parse_args()

    import jax.numpy as jnp
    import torch
    from tqdm.auto import tqdm

    from sigmascale_jax.eval.perplexity import _window_nll_sums

    torch.set_num_threads(args.threads)
    cfg, params, source = load_model(args.model)
    tok = source.tokenizer()
    model = load_torch_model(source)
    data_dir = find_data_dir(args.data_dir)
    results = {"model": args.model, "seq_len": args.seq_len, "torch": torch.__version__}
    for task in args.tasks.split(","):
        ids = np.asarray(tok(perplexity_text(task, data_dir)).input_ids, dtype=np.int32)
        windows = make_windows(ids, args.seq_len, args.max_windows)
        jax_sum = torch_sum = 0.0
        jax_s = torch_s = 0.0
        max_window_rel = 0.0
        for w in tqdm(windows, desc=task, unit="win"):
            t0 = time.perf_counter()
            j = float(np.asarray(_window_nll_sums(params, jnp.asarray(w[None]), cfg))[0])
            t1 = time.perf_counter()
            t = torch_nll_sum(model, w)
            t2 = time.perf_counter()
            jax_s += t1 - t0
            torch_s += t2 - t1
            jax_sum += j
            torch_sum += t
            max_window_rel = max(max_window_rel, abs(j - t) / abs(t))
        n_tok = len(windows) * (args.seq_len - 1)
        ppl_j, ppl_t = math.exp(jax_sum / n_tok), math.exp(torch_sum / n_tok)
        results[task] = {
            "ppl_flax": ppl_j,
            "ppl_transformers": ppl_t,
            "rel_diff": abs(ppl_j - ppl_t) / ppl_t,
            "max_window_nll_rel_diff": max_window_rel,
            "tokens": n_tok,
            "windows": len(windows),
            "seconds_flax": round(jax_s, 1),
            "seconds_transformers": round(torch_s, 1),
        }
        print(f"{task}: flax {ppl_j:.4f}  transformers {ppl_t:.4f}  rel diff {results[task]['rel_diff']:.2e}  "
              f"({len(windows)} windows, {n_tok} tokens)", flush=True)
    write_json_atomic(args.out, results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
