"""Generate text with a dense or compressed model: KV cache, greedy or nucleus sampling, streamed.

    python -m sigmascale_jax.generate --model runs/smollm2-sigmascale-0.2 --chat \\
        --prompt "What is the capital of France?" --max-new-tokens 64
    python -m sigmascale_jax.generate --model ../shared/models/stories260k --prompt "Once upon a time" \\
        --temperature 0.8 --top-p 0.9 --seed 1

The prompt is run once (prefill), then one token at a time against the cache, each a
jit-compiled `kvcache.step`. Temperature 0 is greedy decoding.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

import numpy as np

from sigmascale_jax.compress.plan import MAX_SEED
from sigmascale_jax.errors import ArgError, ArgumentParser, UserError
from sigmascale_jax.io.diskcache import COMPILE_CACHE_HELP, use_compilation_cache

from sigmascale_jax.model.config import GREEDY_BELOW  # noqa: E402  (JAX-free: the help text reads it)


def __getattr__(name: str):
    if name == "sample":  # the sampler is device code (`model.sampling`): importing it loads JAX, so only on use
        from sigmascale_jax.model.sampling import sample

        return sample
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def generate(
    params, cfg, prompt: np.ndarray, max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
    seed: int = 0, eos_id: int | None = None, on_tokens: Callable[[np.ndarray], None] | None = None,
    key=None, mesh=None,
) -> np.ndarray:
    """`[B, T0 + n]` tokens: `prompt: [B, T0]` (int) and up to `max_new_tokens` more (all rows stop at EOS together).

    `params`: dense or compressed (any leaf form); `temperature` 0 (or below `GREEDY_BELOW`) is greedy, else
    nucleus sampling with `top_p`, drawn with the PRNG `key` (default `jax.random.key(seed)`, seed in
    0..2**32 - 1). `on_tokens(new [B])` is called after each new token (streaming: see `TextStream`).
    `mesh`: a `(data, model)` mesh or `parallel.Layout` (weights and the cache's heads split over model, rows over
    data), None for one device. Everything goes to the device before the loop; inside it only each new token
    comes back to the host (explicitly, for EOS and streaming), under `jax.transfer_guard("disallow")`.
    """
    import jax

    from sigmascale_jax.model.kvcache import init_cache, step
    from sigmascale_jax.model.modeling import stack_params
    from sigmascale_jax.model.sampling import next_tokens
    from sigmascale_jax.parallel import fetch, on_device, place_cache, shard

    prompt = check_generate_args(prompt, max_new_tokens, temperature, top_p, cfg)
    b, t0 = prompt.shape
    total = t0 + max_new_tokens
    if key is None and not 0 <= seed <= MAX_SEED:
        raise ArgError("seed", f"must lie in 0..{MAX_SEED}, got {seed}")
    key = jax.random.key(seed) if key is None else key
    params, cache = on_device(stack_params(params), mesh), place_cache(init_cache(cfg, b, total), mesh)
    tokens, key, i = shard(prompt, mesh), on_device(key, mesh), on_device(np.int32(0), mesh)
    out = [prompt]
    done = np.zeros(b, bool)
    with jax.transfer_guard("disallow"):
        logits, cache = step(params, tokens, cfg, cache)
        for n in range(max_new_tokens):
            tokens, i = next_tokens(logits, key, i, temperature, top_p)
            if n + 1 < max_new_tokens:  # queued before the host waits for this token
                logits, cache = step(params, tokens, cfg, cache)
            nxt = fetch(tokens)[:, 0]
            out.append(nxt[:, None])
            if on_tokens:
                on_tokens(nxt)
            if eos_id is not None:
                done |= nxt == eos_id
                if done.all():
                    break
    return np.concatenate(out, axis=1)


def check_length(prompt_tokens: int, max_new_tokens: int, cfg) -> None:
    if prompt_tokens + max_new_tokens > cfg.max_position_embeddings:
        raise ArgError("max_new_tokens", f"{max_new_tokens} after a prompt of {prompt_tokens} tokens exceeds the model's "
                                         f"{cfg.max_position_embeddings} positions; shorten the prompt or lower it")


def check_generate_args(prompt: Any, max_new_tokens: int, temperature: float, top_p: float, cfg) -> np.ndarray:
    """`prompt` as int32 `[B, T]` after checking every argument of `generate` (an `ArgError` naming the first bad
    one: `temperature must be ...` to Python callers, `--temperature must be ...` on the command line)."""
    import math

    arr = np.asarray(prompt)
    if arr.ndim != 2 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise ArgError("prompt", f"must be an integer array [batch, tokens], got {arr.dtype} {list(arr.shape)}; "
                                 "wrap one sequence as [ids]")
    if arr.shape[1] == 0 or arr.shape[0] == 0:
        raise ArgError("prompt", f"holds no tokens ({list(arr.shape)})")
    if arr.min() < 0 or arr.max() >= cfg.vocab_size:
        raise ArgError("prompt", f"holds token ids outside 0..{cfg.vocab_size - 1}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ArgError("max_new_tokens", f"must be a whole number ≥ 1, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ArgError("temperature", f"must be a finite number ≥ 0, got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ArgError("top_p", f"must lie in (0, 1], got {top_p!r}")
    check_length(arr.shape[1], max_new_tokens, cfg)
    return arr.astype(np.int32)


class TextStream:
    """Writes the text of generated tokens as they come, each piece exactly once.

    A token decoded alone loses the space that begins it ("time" + "they" would print
    "timethey"), so the whole sequence, prompt included, is decoded each time and only
    what lies beyond the text already written is written, as transformers' `TextStreamer`
    decodes incrementally. The last word is held back until a space or newline follows
    (a later token may change how it decodes), and so is half a multi-byte character.
    """

    def __init__(self, tok, prompt_ids: list[int], write: Callable[[str], None], skip: int | None = None):
        self.tok, self.ids, self.write, self.skip = tok, list(prompt_ids), write, skip
        self.start = len(self._text())  # the prompt's own text: the caller shows it (or not)
        self.shown = 0

    def _text(self) -> str:
        ids = [t for t in self.ids if t != self.skip]
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def __call__(self, new: np.ndarray) -> None:
        """Add the next token (`new[0]`: the first row's) and write what is settled."""
        self.ids.append(int(np.asarray(new).reshape(-1)[0]))
        text = self._text()[self.start:]
        if text.endswith("\ufffd"):
            return
        settled = max(text.rfind(" "), text.rfind("\n")) + 1
        self._show(text[:settled])

    def end(self) -> None:
        """Write the rest (the last word)."""
        self._show(self._text()[self.start:])

    def _show(self, text: str) -> None:
        if len(text) > self.shown:
            self.write(text[self.shown:])
            self.shown = len(text)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m sigmascale_jax.generate", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="HF folder, .gguf file, hub id, or a folder written by the compressor")
    p.add_argument("--prompt", required=True, help="the text to continue (with --chat: the user's message)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0,
                   help=f"0: greedy (so is anything below {GREEDY_BELOW}); else the sampling temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the top tokens holding this mass")
    p.add_argument("--seed", type=int, default=0, help=f"sampling seed, 0..{MAX_SEED}")
    p.add_argument("--ignore-eos", action="store_true", help="go on past the end-of-sequence token")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype of the weights")
    p.add_argument("--mesh", default=None, help="data=N,model=M: split the weights and the cache's heads over M "
                                                "devices (rows over N); default: one device")
    p.add_argument("--no-compile-cache", action="store_true", help=COMPILE_CACHE_HELP)
    return p


def check_args(args: argparse.Namespace) -> None:
    import math

    if args.max_new_tokens < 1:
        raise ArgError("max_new_tokens", f"must be at least 1, got {args.max_new_tokens}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ArgError("temperature", f"must be a finite number ≥ 0, got {args.temperature}")
    if not (0 < args.top_p <= 1):
        raise ArgError("top_p", f"must lie in (0, 1], got {args.top_p}")
    if not 0 <= args.seed <= MAX_SEED:
        raise ArgError("seed", f"must lie in 0..{MAX_SEED}, got {args.seed}")
    if not args.prompt and not args.chat:
        raise UserError("--prompt is empty; give the text to continue")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # bytes that are not UTF-8 reach Python as lone surrogates
        raise UserError(f"--prompt is not valid UTF-8 (bad byte at character {e.start}); pass UTF-8 text") from None


def prompt_ids(tok, text: str, chat: bool) -> list[int]:
    if chat:
        if not getattr(tok, "chat_template", None):
            raise UserError("--chat: this model's tokenizer has no chat template; drop --chat")
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)
    ids = tok(text).input_ids
    if not ids:
        raise UserError("the prompt encodes to no tokens")
    return list(ids)


def main(argv: list[str] | None = None) -> int:
    import jax.numpy as jnp

    from sigmascale_jax.io.sources import load_model
    from sigmascale_jax.parallel import make_mesh

    args = build_parser().parse_args(argv)
    check_args(args)
    mesh = make_mesh(args.mesh or "data=1")  # a bad --mesh fails before the model loads
    use_compilation_cache(not args.no_compile_cache)
    cfg, params, source = load_model(args.model, getattr(jnp, args.dtype))
    tok = source.tokenizer()
    ids = prompt_ids(tok, args.prompt, args.chat)
    check_length(len(ids), args.max_new_tokens, cfg)  # before the prompt is echoed
    eos = None if args.ignore_eos else tok.eos_token_id

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    stream = TextStream(tok, ids, write, skip=eos)
    if not args.chat:
        write(args.prompt)
    generate(params, cfg, np.asarray([ids]), args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
             seed=args.seed, eos_id=eos, on_tokens=stream, mesh=mesh)
    stream.end()
    write("\n")
    return 0
