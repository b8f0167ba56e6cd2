"""User-facing errors, and the CLI wrapper that turns them (and Ctrl-C) into one line and an exit code."""

from __future__ import annotations

import argparse
import os
import errno
import signal
import sys
import threading
from typing import Callable


class UserError(Exception):
    """Bad input from the user: reported as one line, exit code 2, no traceback."""

    def cli(self) -> str:
        """The message as the command line says it."""
        return str(self)


class ArgError(UserError):
    """A bad value of one setting: `ratio must be ...` to Python callers, `--ratio must be ...` on the command line."""

    def __init__(self, arg: str, problem: str):
        super().__init__(f"{arg} {problem}")
        self.arg, self.problem = arg, problem

    def cli(self) -> str:
        return f"--{self.arg.replace('_', '-')} {self.problem}"


BROKEN_PIPE = 128 + signal.SIGPIPE  # the status a shell shows for a tool that SIGPIPE ended


def no_space(e: BaseException) -> bool:
    """Whether `e` (or an exception it wraps) says the disk is full."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(e):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run `main(argv)`; a UserError (or a full disk) becomes `error: <message>` on stderr and exit code 2.

    Ctrl-C is exit code 130; a closed stdout (the reader of a pipe left) ends the run quietly with 141.
    """

    try:
        code = main(argv)
    except UserError as e:
        print(f"error: {e.cli()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout left (`... | head`): stop quietly, as Unix tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # what is still buffered goes nowhere instead of raising again
        return BROKEN_PIPE
    except Exception as e:
        if no_space(e):
            print(f"error: no space left on the device ({e}); free space and rerun the same command "
                  "(a compression resumes where it stopped)", file=sys.stderr)
            return 2
        raise
    return int(code or 0)


def exit_on_interrupt(message: str) -> None:
    """Make Ctrl-C (SIGINT) print `error: <message>` and end the process at once with exit code 130.

    Python runs signal handlers only between bytecodes of the main thread, so a
    long XLA computation would delay a KeyboardInterrupt by minutes, a JAX callback
    can swallow it, and unwinding through live XLA threads has ended in a segfault.
    Instead the signal's C-level handler writes to a wakeup socket, and a watcher
    thread (which runs while the main thread waits inside XLA) exits with
    `os._exit`: no teardown runs. Every output is written atomically and the
    compressor's checkpoints are marked finished last, so what is on disk stays
    consistent, as after `kill -9`.
    """
    import socket

    reader, writer = socket.socketpair()
    writer.setblocking(False)
    signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    signal.signal(signal.SIGINT, lambda signum, frame: None)  # the watcher acts; the main thread goes on meanwhile

    def watch(keep_open=writer) -> None:  # the thread holds the write end: closing it would void the wakeup fd
        while True:
            data = reader.recv(1)
            if data and data[0] == signal.SIGINT:
                os.write(2, f"\nerror: {message}\n".encode())
                os._exit(130)

    threading.Thread(target=watch, name="sigint-watcher", daemon=True).start()


def finish(code: int) -> None:
    """End a command-line run with `code`.

    A failed run exits with `os._exit` after flushing its output: background threads
    (Orbax's, XLA's) still alive at interpreter teardown printed tracebacks after the
    one-line error ("Event loop is closed").
    """
    sys.stdout.flush()
    sys.stderr.flush()
    if code:
        os._exit(code)
    sys.exit(0)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with usage errors as one `error:` line and exit code 2 (the usage is in --help)."""

    def error(self, message: str):  # type: ignore[override]
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def make_callable(module_name: str, fn: Callable) -> None:
    """Let `import sigmascale_jax.X; sigmascale_jax.X(...)` call `fn` while `python -m sigmascale_jax.X` runs the CLI.

    An entry-point module and the public function of the same name share one attribute of the
    package (importing the module sets it), so the module itself forwards calls to the function.
    """
    import types

    class _CallableModule(types.ModuleType):
        __doc__ = fn.__doc__

        def __call__(self, *args, **kwargs):
            return fn(*args, **kwargs)

    sys.modules[module_name].__class__ = _CallableModule
