"""Reading inputs with one-line errors, and writing outputs so that a crash never leaves a complete-looking file."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from sigmascale_jax.errors import UserError

# ------------------------------------------------------------------ reading


def read_text(path: str | os.PathLike) -> str:
    """The UTF-8 text of `path`; a UserError (naming the file) if it cannot be read or is not UTF-8."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); convert it to UTF-8") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def read_json(path: str | os.PathLike) -> Any:
    """The parsed JSON of `path`; a UserError naming the file and the place if it is not JSON."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None


def jsonl_texts(path: Path, lines: range | None = None) -> list[str]:
    """The `"text"` string of each non-blank line of a JSON-lines file (only line indices in `lines` if given).

    Every line read must be a JSON object whose `text` is a string; anything else is a
    UserError naming the line.
    """
    out = []
    for i, line in enumerate(read_text(path).splitlines()):
        if lines is not None and i >= lines.stop:
            break
        if (lines is not None and i not in lines) or (lines is None and not line.strip()):
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"malformed line {i + 1} in {path}: not JSON") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
            raise UserError(f"malformed line {i + 1} in {path}: expected a JSON object with a string 'text' field")
        out.append(doc["text"])
    return out


# ------------------------------------------------------------------ writing


def current_umask() -> int:
    """The process's umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_atomic(path: str | os.PathLike, write: Callable[[Any], None], mode: str) -> None:
    """Call `write(file)` on a temporary file beside `path`, then rename it into place (mode 0666 less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; outputs get the same mode as every other file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    _write_atomic(path, lambda f: f.write(text), "w")


def write_npz_atomic(path: str | os.PathLike, arrays: dict[str, Any]) -> None:
    """`numpy.savez_compressed` of `arrays`, atomically."""
    import numpy as np

    _write_atomic(path, lambda f: np.savez_compressed(f, **arrays), "wb")


def finite_or_null(obj: Any) -> Any:
    """`obj` with every NaN or infinite float replaced by None, so it serializes as strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    return obj


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Strict JSON (a NaN becomes null, never the invalid token `NaN`), written atomically."""
    write_text_atomic(path, json.dumps(finite_or_null(obj), indent=2, sort_keys=False, allow_nan=False) + "\n")


def check_writable_dir(folder: Path, what: str) -> None:
    """Create `folder` if needed and prove a file can be written in it; a UserError saying why not."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write {what} in {folder}: {e.strerror or e}") from None


def check_writable_file(path: str | os.PathLike, what: str) -> None:
    """A file can be written at `path` (not a folder, its folder writable): checked before long work."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder; give a file path")
    check_writable_dir(path.parent, what)

