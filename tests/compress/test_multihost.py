"""Two processes of one run (JAX's multi-controller model, gloo collectives on CPU) compress a model into the
factors one process makes; a two-process run killed after its first block resumes where it stopped.

Each process is a command line of its own (`--coordinator --num-processes --process-id`), as on a cluster;
they split every batch of calibration windows over their devices and sum the statistics with XLA collectives.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
from conftest import DATA, REPO, STORIES, require

RUN = ["--method", "svd-llm", "--ratio", "0.3", "--nsamples", "32", "--seq-len", "256", "--batch-size", "2",
       "--no-progress"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(out, logs, *extra: str) -> subprocess.Popen:
    """The command line on `out`, its stdout and stderr in files under `logs` (a pipe nobody reads while the test
    waits could fill and stop it)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    flags = env.get("XLA_FLAGS", "").split()
    env["XLA_FLAGS"] = " ".join(f for f in flags if "device_count" not in f)  # one CPU device per process
    logs.mkdir(exist_ok=True)
    n = len(list(logs.iterdir()))
    files = (logs / f"{n}.out", logs / f"{n}.err")
    with open(files[0], "w") as out_f, open(files[1], "w") as err_f:
        proc = subprocess.Popen([sys.executable, "-m", "sigmascale_jax.compress", "--model", str(require(STORIES)),
                                 *RUN, "--data-dir", str(DATA), "--out", str(out), *extra],
                                cwd=REPO, env=env, stdout=out_f, stderr=err_f)
    proc.logs = files
    return proc


def _two(out, logs) -> list[subprocess.Popen]:
    port = _port()
    return [_start(out, logs, "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i))
            for i in (0, 1)]


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    """Wait for `proc`; its exit code, stdout and stderr."""
    proc.wait(timeout=timeout)
    return proc.returncode, *(f.read_text() for f in proc.logs)


def _products(folder) -> dict[str, np.ndarray]:
    from sigmascale_jax.io.sources import load_model
    from sigmascale_jax.model.modeling import PROJECTIONS, typed_params

    params = typed_params(load_model(str(folder))[1])
    return {f"{i}.{n}": np.asarray(b[n].matrix()) for i, b in enumerate(params["blocks"]) for n in PROJECTIONS}


def test_two_processes_resume_and_give_the_model_of_one(tmp_path):
    import time

    two, logs = tmp_path / "two", tmp_path.parent / f"{tmp_path.name}-logs"
    procs = _two(two, logs)
    first = tmp_path / "two.partial" / "blocks" / "0000.json"
    deadline = time.time() + 300
    while not first.exists():
        assert all(p.poll() is None for p in procs), [_finish(p)[2][-2000:] for p in procs]
        assert time.time() < deadline, "no block finished in 300 s"
        time.sleep(0.1)
    for p in procs:  # a preempted job: both processes gone at once, no clean-up
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert not two.exists()

    one = _start(tmp_path / "one", logs)  # meanwhile the reference, one process
    outs = [_finish(p) for p in _two(two, logs)]
    assert [o[0] for o in outs] == [0, 0], [o[2][-3000:] for o in outs]
    assert "wrote" in outs[0][1] and "wrote" not in outs[1][1]  # process 0 reports and writes; process 1 neither
    assert "WARNING" not in outs[1][2], outs[1][2][-2000:]  # no Orbax chatter from the scratch checkpoints
    code, _, err = _finish(one)
    assert code == 0, err[-3000:]

    report = json.loads((two / "compression.json").read_text())
    assert report["resumed"]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["one", "two"]  # nothing else written, no partial left
    a, b = _products(tmp_path / "one"), _products(two)
    # the Gram matrices are summed across processes in another order: the same factors to float32 rounding
    worst = max(float(np.abs(a[k] - b[k]).max() / np.abs(a[k]).max()) for k in a)
    assert worst < 1e-4, worst
    ref = json.loads((tmp_path / "one" / "compression.json").read_text())
    assert [m["rank"] for m in report["matrices"]] == [m["rank"] for m in ref["matrices"]]


def test_bad_process_flags_are_one_line_errors(tmp_path, capsys):
    from conftest import assert_one_line_error, compress_cli

    base = ["--model", str(STORIES), "--method", "svd-llm", "--ratio", "0.3", "--out", str(tmp_path / "o")]
    for extra, fragment in ((["--num-processes", "2"], "need --coordinator"),
                            (["--coordinator", "nohost"], "--coordinator takes HOST:PORT"),
                            (["--coordinator", "localhost:1234"], "needs --num-processes N and --process-id I"),
                            (["--coordinator", "localhost:1234", "--num-processes", "2", "--process-id", "2"],
                             "--process-id must lie in 0..1")):
        assert_one_line_error(compress_cli(capsys, *base, *extra), fragment)
