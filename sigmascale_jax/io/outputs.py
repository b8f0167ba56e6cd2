"""Where a command may write: never over what it reads, one writer per folder, finished folders renamed into place.

Every command that writes goes through here: `compress --out`, `export --out`,
`save_compressed`, re-encoding (folders) and `eval --json` (a file). An output is
refused when it is one of the run's inputs, lies inside a model folder being read,
or would replace a folder that holds an input; folders are written under an
exclusive lock and appear at their path only when complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

from sigmascale_jax.errors import UserError
from sigmascale_jax.io.fileio import check_writable_dir, check_writable_file, current_umask


class Input(NamedTuple):
    """A path a command reads. `whole`: nothing may be written anywhere inside it (a model folder), not only
    the path itself."""

    path: str | os.PathLike
    role: str  # "the model being compressed", "the calibration file", ...
    whole: bool = True


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_not_input(out: str | os.PathLike, inputs: Iterable[Input], flag: str) -> None:
    """A UserError if writing `out` (a file or a folder) could change an input.

    Refused: `out` is an input (also through a link), lies inside an input that is whole (a model folder), or
    holds an input (replacing the folder would delete it).
    """
    dst = Path(out).expanduser().resolve()
    for inp in inputs:
        src = Path(inp.path).expanduser()
        if not src.exists():
            continue  # a hub id, or a file the run checks later
        src = src.resolve()
        is_input = dst.exists() and os.path.samefile(dst, src)  # also through a hard link
        inside_input = inp.whole and src in dst.parents
        holds_input = _inside(src, dst)  # replacing `dst` would delete it
        if is_input or inside_input or holds_input:
            raise UserError(f"{flag} {out} would replace {inp.role} ({inp.path}) or write inside it; "
                            f"choose another {flag}")


def model_input(model: str | os.PathLike | None, role: str) -> list[Input]:
    """The model a command reads, as an `Input`: its folder (all of it), or its .gguf file."""
    return [] if not model else [Input(model, role)]


def check_out_file(path: str | os.PathLike, inputs: Iterable[Input], flag: str) -> None:
    """A file output (`eval --json`): writable, not a folder, and not over an input."""
    check_not_input(path, inputs, flag)
    check_writable_file(path, flag)


def check_out(out: Path, overwrite: bool, inputs: Iterable[Input], flag: str = "--out") -> None:
    """A folder output: can be written, and replacing it harms nothing else; checked before any work."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out} exists and is not a folder")
    check_not_input(out, inputs, flag)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{flag} {out} is not empty; pass --overwrite to replace it")
    check_writable_dir(out.parent, flag)
    if out.is_dir():  # replacing it at the end renames it aside and deletes it: both need write access to it
        check_writable_dir(out, flag)


@contextlib.contextmanager
def out_lock(out: Path):
    """Hold an exclusive lock on `out` for this run; a second writer of the same folder gets a one-line error.

    The lock is a `flock` on `.OUT.lock` beside it, released by the kernel however
    the process ends (so a killed run never leaves a stale lock).
    """
    path = out.with_name(f".{out.name}.lock")
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"another sigmascale_jax command is writing {out} (it holds {path}); wait for it or "
                            "choose another output folder") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:  # not a lock file another run just removed
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def replace_folder(staging: Path, out: Path) -> None:
    """Put the finished `staging` folder at `out`: an old `out` is set aside first, then removed."""
    old = out.with_name(f".{out.name}.replaced")
    if out.exists():
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
    staging.rename(out)
    if old.exists():
        shutil.rmtree(old)


def normal_modes(folder: Path) -> None:
    """Give every file in `folder` mode 0666 and every folder 0777, less the umask (some writers make 0600 files)."""
    mask = current_umask()
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~mask)


@contextlib.contextmanager
def writing_folder(out: str | os.PathLike, overwrite: bool, inputs: Iterable[Input], flag: str = "--out") -> Iterator[Path]:
    """Check `out`, lock it, and yield an empty staging folder; on success it is renamed to `out`.

    The staging folder (`.OUT.writing`, hidden) is removed if the body fails; one left by a killed
    writer is removed by the next (which holds the lock). `out` is checked again under the lock:
    a writer that finished meanwhile is not overwritten without `overwrite`.
    """
    out = Path(out)
    inputs = list(inputs)
    check_out(out, overwrite, inputs, flag)
    with out_lock(out):
        check_out(out, overwrite, inputs, flag)
        staging = out.with_name(f".{out.name}.writing")
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        try:
            yield staging
            normal_modes(staging)
            replace_folder(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
