"""A disk cache for results that are expensive and reusable: sensitivity tables and rank allocations.

Entries live in `$SIGMASCALE_CACHE` (default `~/.cache/sigmascale_jax`; `off` disables
the cache) as `<kind>/<sha1 of the key>.json`, each holding its full key, so a hit is
an exact match of everything the value depends on: the model files (path, size,
modification time), the calibration tokens' hash, the settings, and the package's
own source code (any change to it starts a fresh cache).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

from sigmascale_jax.fileio import write_json_atomic

CACHE_ENV = "SIGMASCALE_CACHE"


def cache_dir() -> Path | None:
    value = os.environ.get(CACHE_ENV, "")
    if value.lower() == "off":
        return None
    return Path(value).expanduser() if value else Path.home() / ".cache" / "sigmascale_jax"


def code_version() -> str:
    """sha1 of the package's Python sources: cached results never outlive the code that made them."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha1()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def model_fingerprint(source) -> dict[str, Any]:
    """What identifies a model's weights without reading them: its files' paths, sizes and modification times."""
    folder = Path(source.folder).resolve()
    names = [source.gguf_file] if getattr(source, "gguf_file", None) else sorted(
        p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".json"))
    files = []
    for name in names:
        st = (folder / name).stat()
        files.append([name, st.st_size, st.st_mtime_ns])
    return {"folder": str(folder), "files": files}


def cached(kind: str, key: dict[str, Any], compute: Callable[[], Any]) -> tuple[Any, bool]:
    """`(value, hit)`: the cached value for `key`, else `compute()` stored under it (JSON-able values only)."""
    root = cache_dir()
    if root is None:
        return compute(), False
    key = {**key, "code": code_version()}
    blob = json.dumps(key, sort_keys=True)
    path = root / kind / f"{hashlib.sha1(blob.encode()).hexdigest()}.json"
    if path.is_file():
        try:
            entry = json.loads(path.read_text())
            if entry.get("key") == json.loads(blob):
                return entry["value"], True
        except (OSError, ValueError, KeyError):
            pass  # a damaged entry is recomputed and replaced
    value = compute()
    try:
        write_json_atomic(path, {"key": key, "value": value})
    except OSError:
        pass  # an unwritable cache costs only the reuse
    return value, False
