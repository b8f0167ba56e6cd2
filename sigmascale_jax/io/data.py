"""Evaluation and calibration text, read from local files (no machine here reaches the hub).

Conventions follow `shared/data/README.md`: WikiText-2 test rows joined with
"\\n\\n"; C4 perplexity on documents 1000-1999 joined with "\\n\\n" (0-999 are
reserved for calibration).
"""

from __future__ import annotations

import os
from pathlib import Path

from sigmascale_jax.errors import UserError
from sigmascale_jax.io.fileio import jsonl_texts, read_text

DATA_ENV = "SIGMASCALE_DATA"
C4_FILE = "c4/c4_validation_2k.jsonl"
WIKITEXT2_TEST = "wikitext-2-raw/wiki.test.raw"
C4_EVAL_DOCS = range(1000, 2000)
PERPLEXITY_TASKS = ("wikitext2", "c4")


def default_data_dir() -> Path | None:
    """`../shared/data` beside the repository checkout, if it exists."""
    here = Path(__file__).resolve().parents[2]  # the repository checkout
    candidate = here.parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


def find_data_dir(arg: str | None = None) -> Path:
    """`--data-dir`, else `$SIGMASCALE_DATA`, else `../shared/data` beside the repo."""
    if arg:
        where, path = "--data-dir", Path(arg)
    elif os.environ.get(DATA_ENV):
        where, path = f"${DATA_ENV}", Path(os.environ[DATA_ENV])
    else:
        path = default_data_dir()
        if path is None:
            raise UserError(f"no data directory: pass --data-dir DIR or set ${DATA_ENV} (expected ../shared/data beside the repo)")
        where = "the default"
    if not path.is_dir():
        raise UserError(f"data directory {path} (from {where}) does not exist")
    return path


def data_file(data_dir: Path, rel: str) -> Path:
    path = data_dir / rel
    if not path.is_file():
        raise UserError(f"missing data file {rel}: looked for {path}")
    return path


def wikitext2_rows(path: Path) -> list[str]:
    """The HF `wikitext-2-raw-v1` rows: the file's lines with their newlines, blank lines as ""."""
    lines = read_text(path).splitlines(keepends=True)
    return ["" if not line.strip() else line for line in lines]


def c4_docs(path: Path, docs: range) -> list[str]:
    """Texts of the C4 documents with the given indices (line numbers of the jsonl)."""
    out = jsonl_texts(path, docs)
    if len(out) < len(docs):
        raise UserError(f"{path} has {len(out) + docs.start} documents, need {docs.stop}")
    return out


def perplexity_text(task: str, data_dir: Path) -> str:
    """The joined evaluation text of a perplexity task."""
    if task == "wikitext2":
        return "\n\n".join(wikitext2_rows(data_file(data_dir, WIKITEXT2_TEST)))
    if task == "c4":
        return "\n\n".join(c4_docs(data_file(data_dir, C4_FILE), C4_EVAL_DOCS))
    raise UserError(f"unknown perplexity task {task!r}; known: {', '.join(PERPLEXITY_TASKS)}")
