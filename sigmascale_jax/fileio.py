"""Writing outputs so that a crash never leaves a half-written file that looks complete."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def _write_atomic(path: str | os.PathLike, write: Callable[[Any], None], mode: str) -> None:
    """Call `write(file)` on a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
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


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
