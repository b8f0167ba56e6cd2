"""Calibration windows: seeded random token windows from text that evaluation never uses."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sigmascale_jax.errors import UserError
from sigmascale_jax.io.data import C4_FILE, c4_docs, data_file
from sigmascale_jax.io.fileio import jsonl_texts, read_text

WIKITEXT2_VALID = "wikitext-2-tokenized/valid.txt"
C4_CALIB_DOCS = range(0, 1000)
CALIB_SOURCES = ("c4", "wikitext2-valid")


def calibration_text(spec: str, data_dir: Path) -> str:
    """`c4` (documents 0-999), `wikitext2-valid`, or a path to a .txt / .jsonl ("text" per line) file."""
    if spec == "c4":
        return "\n\n".join(c4_docs(data_file(data_dir, C4_FILE), C4_CALIB_DOCS))
    if spec == "wikitext2-valid":
        return read_text(data_file(data_dir, WIKITEXT2_VALID))
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"--calib {spec}: not one of {', '.join(CALIB_SOURCES)} and no such file")
    if path.suffix == ".jsonl":
        return "\n\n".join(jsonl_texts(path))
    return read_text(path)


def sample_windows(ids: np.ndarray, nsamples: int, seq_len: int, seed: int) -> np.ndarray:
    """`[nsamples, seq_len]` windows at seeded random offsets of `ids: [T]`."""
    if nsamples < 1:
        raise UserError(f"--nsamples must be at least 1, got {nsamples}")
    if len(ids) <= seq_len:
        raise UserError(f"calibration text has {len(ids)} tokens, need more than --seq-len {seq_len}")
    starts = window_starts(len(ids), nsamples, seq_len, seed)
    return np.stack([ids[s : s + seq_len] for s in starts]).astype(np.int32)


def window_starts(n_ids: int, nsamples: int, seq_len: int, seed: int) -> np.ndarray:
    """The offsets `sample_windows` takes its windows at."""
    return np.random.default_rng(seed).integers(0, n_ids - seq_len, size=nsamples)


def fresh_windows(ids: np.ndarray, taken: list[tuple[int, int]], n: int, seq_len: int,
                  seed: int) -> tuple[np.ndarray, bool]:
    """`n` windows `[n, seq_len]` of `ids: [T]`, overlapping neither each other nor the `(start, length)` spans
    in `taken`, where the text has room; and whether it had (else the rest are drawn anywhere, as
    `sample_windows` draws them)."""
    free = np.ones(len(ids), bool)
    for start, length in taken:
        free[start : start + length] = False
    rng = np.random.default_rng([seed, 1])
    starts: list[int] = []
    for s in rng.permutation(max(0, len(ids) - seq_len)):
        if free[s : s + seq_len].all():
            starts.append(int(s))
            free[s : s + seq_len] = False
            if len(starts) == n:
                break
    disjoint = len(starts) == n
    if not disjoint:
        starts += [int(s) for s in rng.integers(0, len(ids) - seq_len, size=n - len(starts))]
    return np.stack([ids[s : s + seq_len] for s in starts]).astype(np.int32), disjoint


def calibration_windows(source, calib: str = "c4", nsamples: int = 64, seq_len: int = 512, seed: int = 0, *,
                        data_dir: str | None = None) -> np.ndarray:
    """int32 `[nsamples, seq_len]` calibration windows of `source`'s tokenizer: the windows the CLI would use.

    `source`: a `ModelSource` (`load_model(...)[2]`); `calib`: "c4" (documents 0-999), "wikitext2-valid" or a
    .txt / .jsonl file; `seed` draws the window offsets. The data folder is `data_dir`, else `$SIGMASCALE_DATA`,
    else `../shared/data` beside the repository.
    """
    return sample_windows(calibration_ids(source, calib, data_dir), nsamples, seq_len, seed)


def calibration_ids(source, calib: str = "c4", data_dir: str | None = None) -> np.ndarray:
    """int32 `[T]`: the whole calibration text in `source`'s tokens (windows are drawn from it)."""
    import hashlib
    from importlib.metadata import version

    from sigmascale_jax.io.data import find_data_dir
    from sigmascale_jax.io.diskcache import cached, model_fingerprint

    text = calibration_text(calib, find_data_dir(data_dir) if calib in CALIB_SOURCES else Path("."))
    # Tokenizing the text is seconds a run; the ids depend only on the tokenizer's files and the text.
    key = {"model": model_fingerprint(source), "transformers": version("transformers"),
           "text_sha1": hashlib.sha1(text.encode()).hexdigest()}
    ids, _ = cached("calibration-ids", key, lambda: source.tokenizer()(text).input_ids)
    return np.asarray(ids, dtype=np.int32)
