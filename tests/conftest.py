"""Shared fixtures: the real models in ../shared/models and tiny random transformers models."""

from __future__ import annotations

import os
import subprocess
import tempfile
import warnings
from pathlib import Path

# One persistent XLA compilation cache for the whole run, this process and the command lines it starts: the same
# block functions are compiled once, not once per test and per subprocess. Set before JAX is imported (it reads
# these at import) and inherited by subprocesses through the environment.
_OWN_XLA_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ  # pytest-xdist's workers inherit the controller's
if _OWN_XLA_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="sigmascale-tests-xla-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# The suite is compile-bound (tiny models, thousands of programs): without LLVM's optimization passes XLA:CPU
# compiles about a third faster (the refit and compile-once tests: 165 s -> 110 s on 2 cores) while the SmolLM2
# tests that compute run about as fast (82 s either way). Set before JAX starts; subprocesses inherit it.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

import sigmascale_jax  # noqa: F401,E402  (first: it sets XLA and OpenBLAS thread settings before they load)

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
STORIES = SHARED / "models" / "stories260k"
SMOLLM2_DIR = SHARED / "models" / "smollm2-135m-instruct-q4_1"
SMOLLM2_GGUF = SMOLLM2_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = SHARED / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No disk cache of allocations / sensitivity tables unless a test turns one on (with a tmp_path): results stay
# independent of earlier runs.
os.environ["SIGMASCALE_CACHE"] = "off"


def pytest_sessionfinish(session, exitstatus):
    if _OWN_XLA_CACHE and not hasattr(session.config, "workerinput"):  # the process that made it, not a worker
        import shutil

        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


# The longest tests (60-110 s each here; every other test is under 30 s) go first: pytest-xdist's two workers then
# start them at once and even out their loads with the short tests that remain (longest-first scheduling), instead
# of one worker starting a 100-second test while the other is running out of work.
LONGEST_FIRST = ("test_mesh.py::test_eight_devices_give_the_factors_and_perplexity_of_one",
                 "test_multihost.py::test_two_processes_resume_and_give_the_model_of_one",
                 "test_sigmascale.py::test_gram_eigh_learns_what_the_svd_path_learns_on_a_smollm2_block",
                 "test_parity.py::test_smollm2_gguf_matches_transformers_gguf_loader")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not item.nodeid.endswith(LONGEST_FIRST))  # stable: the rest keep their order


def require(path: Path) -> Path:
    # In CI ../shared is always present; a missing file there is a failure, not a skip.
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} missing: CI needs ../shared beside the repo")
        pytest.skip(f"{path} not present")
    return path


TINY_COMMON = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
)

TINY_CONFIGS = {
    "llama": dict(
        TINY_COMMON,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "mistral": dict(TINY_COMMON, sliding_window=7, head_dim=32, tie_word_embeddings=False),
    "qwen2": dict(TINY_COMMON, tie_word_embeddings=True, use_sliding_window=False),
    "qwen3": dict(TINY_COMMON, head_dim=24, tie_word_embeddings=False, use_sliding_window=False),
}


def randomize_(model, seed: int = 0) -> None:
    """Give every parameter (biases and norms too) a random value, so no path is exercised by zeros or ones."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.15 * noise)


def build_tiny(model_type: str, folder: Path):
    """Save a random `model_type` model with transformers; return the torch model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, **TINY_CONFIGS[model_type])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").to(torch.float32).eval()
    randomize_(model, seed=list(TINY_CONFIGS).index(model_type))
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{model_type: (folder, torch model)} for every supported architecture."""
    out = {}
    for mt in TINY_CONFIGS:
        folder = tmp_path_factory.mktemp(f"tiny_{mt}")
        out[mt] = (folder, build_tiny(mt, folder))
    return out


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(ids, dtype=np.int64))).logits.float().numpy()


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def run_in_process(capsys, main, *args: str) -> subprocess.CompletedProcess:
    """A command line's `main` run in this process, as `run_cli` runs it; for errors found before any heavy work.

    Much faster than a subprocess (no JAX start-up); its stderr is captured with `capsys`.
    """
    from sigmascale_jax.errors import run_cli

    capsys.readouterr()
    try:
        code = run_cli(main, list(args))
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def compress_cli(capsys, *args: str) -> subprocess.CompletedProcess:
    from sigmascale_jax.compress.cli import main

    return run_in_process(capsys, main, *args, "--no-progress")


def eval_cli(capsys, *args: str) -> subprocess.CompletedProcess:
    from sigmascale_jax.eval.cli import main

    return run_in_process(capsys, main, *args, "--no-progress")


@pytest.fixture
def count_calls(monkeypatch):
    """`count_calls(module, name)` wraps `module.name` for this test and returns `{"n": calls so far}`."""

    def wrap(module, name: str) -> dict:
        calls = {"n": 0}
        real = getattr(module, name)

        def counted(*a, **k):
            calls["n"] += 1
            return real(*a, **k)

        monkeypatch.setattr(module, name, counted)
        return calls

    return wrap


@pytest.fixture
def interrupt_call(monkeypatch):
    """`interrupt_call(module, name, at)` makes call number `at` of `module.name` raise KeyboardInterrupt (a Ctrl-C
    mid-run) and returns `(calls, restore)`: `{"n": calls so far}` and a function that puts the real one back."""

    def wrap(module, name: str, at: int):
        calls = {"n": 0}
        real = getattr(module, name)

        def interrupted(*a, **k):
            calls["n"] += 1
            if calls["n"] == at:
                raise KeyboardInterrupt("simulated interruption")
            return real(*a, **k)

        monkeypatch.setattr(module, name, interrupted)
        return calls, lambda: monkeypatch.setattr(module, name, real)

    return wrap
