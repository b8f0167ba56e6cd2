"""A disk cache for results that are expensive and reusable: sensitivity tables and rank allocations.

Entries live in `$SIGMASCALE_CACHE` (default `~/.cache/sigmascale_jax`; `off` disables
the cache) as `<kind>/<sha1 of the key>.json`, each holding its full key, so a hit is
an exact match of everything the value depends on: the model files (names, sizes and
content sha1s, see `file_sha1`), the calibration tokens' hash, the settings, and the package's
own source code (any change to it starts a fresh cache).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

from sigmascale_jax.io.fileio import write_json_atomic

CACHE_ENV = "SIGMASCALE_CACHE"


def cache_dir() -> Path | None:
    value = os.environ.get(CACHE_ENV, "")
    if value.lower() == "off":
        return None
    return Path(value).expanduser() if value else Path.home() / ".cache" / "sigmascale_jax"


def code_version() -> str:
    """sha1 of the package's Python sources: cached results never outlive the code that made them."""
    root = Path(__file__).resolve().parents[1]  # the package, not this folder
    h = hashlib.sha1()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def file_sha1(path: Path) -> str:
    """sha1 of a file's bytes, hashed once per (path, size, modification time) and remembered in the cache.

    Content, not modification times, identifies weights in cache keys: a model folder copied
    or re-laid elsewhere keeps its hours-long sensitivity table and allocations. The memo
    outlives code changes (hashing does not depend on this package's code)."""
    path = Path(path).resolve()
    st = path.stat()

    def digest() -> str:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha1").hexdigest()

    key = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return cached("file-sha1", key, digest, versioned=False)[0]


def model_fingerprint(source) -> dict[str, Any]:
    """What identifies a model's weights: its files' names, sizes and content hashes (not where they lie)."""
    folder = Path(source.folder).resolve()
    names = [source.gguf_file] if getattr(source, "gguf_file", None) else sorted(
        p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".json"))
    if cache_dir() is None:  # nothing is stored or looked up, so the key need not be hashed
        return {"folder": str(folder), "files": names}
    return {"files": [[name, (folder / name).stat().st_size, file_sha1(folder / name)] for name in names]}


def cached(kind: str, key: dict[str, Any], compute: Callable[[], Any], versioned: bool = True) -> tuple[Any, bool]:
    """`(value, hit)`: the cached value for `key`, else `compute()` stored under it (JSON-able values only).

    `versioned`: the key includes the package's code version (off only for values no code here shapes).
    A key whose "model" is None (weights held in memory, with no files to identify them) is never cached."""
    root = cache_dir()
    if root is None or ("model" in key and key["model"] is None):
        return compute(), False
    if versioned:
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


COMPILE_CACHE_HELP = ("do not keep compiled XLA programs in the cache folder ($SIGMASCALE_CACHE/xla, default "
                      "~/.cache/sigmascale_jax/xla), where a later run with the same shapes skips their compilation")


def use_compilation_cache(enabled: bool = True) -> Path | None:
    """Turn on JAX's persistent compilation cache in `<cache folder>/xla` for this process; returns its folder.

    The command lines call it first thing (`--no-compile-cache` turns it off): each block function is compiled
    once per shape, and a second run of the same model and settings loads them instead of compiling again. A
    folder the user already chose (`JAX_COMPILATION_CACHE_DIR` or `jax.config`) is kept as it is;
    `SIGMASCALE_CACHE=off` turns this off too. The library never calls it on import: a user's process keeps
    JAX's configuration unless they call it.
    """
    import jax

    chosen = jax.config.jax_compilation_cache_dir
    if chosen:
        return Path(chosen)
    root = cache_dir()
    if not enabled or root is None:
        return None
    folder = root / "xla"
    jax.config.update("jax_compilation_cache_dir", str(folder))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        # JAX keeps only programs that took a second to compile; a block's functions take 0.1-1 s each on a CPU
        # and there are dozens of them, which is the time a second run should not spend again
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    return folder
