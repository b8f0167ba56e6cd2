"""--plan-only: each stage's device and host memory from a config alone (Llama-3.1-8B and 70B, no weights here)."""

from __future__ import annotations

import re

from conftest import REPO, compress_cli

from sigmascale_jax.compress.memory import EVAL_STAGE, GiB, compression_peak, memory_plan, parse_bytes
from sigmascale_jax.compress.plan import RunSpec, make_plan
from sigmascale_jax.io.sources import read_config

CONFIGS = REPO / "tests" / "data" / "configs"


def test_the_8b_plan_fits_an_80gb_device_and_reads_only_the_config(capsys, tmp_path):
    proc = compress_cli(capsys, "--model", str(CONFIGS / "llama-3.1-8b.json"), "--method", "sigmascale",
                        "--ratio", "0.2", "--steps", "50", "--step-windows", "4", "--plan-only",
                        "--device-memory", "80GB")
    assert proc.returncode == 0, proc.stderr
    rows = {m.group(1).strip(): (float(m.group(2)), float(m.group(3)))
            for m in re.finditer(r"^(\w[\w (),-]*?)\s+([\d.]+)\s+([\d.]+)\s+(yes|NO)", proc.stdout, re.M)}
    assert set(rows) == {"statistics", "propagate", "factorize (sigmascale)", EVAL_STAGE}, proc.stdout
    acts = 64 * 512 * 4096 * 4 / GiB  # one copy of the calibration activations: 0.5 GiB
    assert 2 * acts < rows["statistics"][0] < 16 and rows["statistics"][1] > acts
    assert 2 * acts < rows["factorize (sigmascale)"][0] < 40  # xs and ys of every window, then the learning scan
    model = 8.03e9 * 4 / GiB  # float32 weights of the 8B model
    assert model < rows[EVAL_STAGE][0] < 1.3 * model
    assert "fits a device of 74.5 GiB" in proc.stdout
    assert not any(tmp_path.iterdir())


def test_the_70b_plan_compresses_on_80gb_but_cannot_evaluate_there():
    cfg = read_config(str(CONFIGS / "llama-3.1-70b.json"))
    assert (cfg.num_layers, cfg.hidden_size) == (80, 8192)
    stages = memory_plan(cfg, RunSpec(model="x", ratio=0.2), make_plan("svd-llm"))
    by_name = {s.name: s for s in stages}
    peak = compression_peak(stages)
    assert peak.device < parse_bytes("80GB") < by_name[EVAL_STAGE].device  # 70B in float32: 263 GB of weights
    assert by_name["factorize (svd-llm)"].device > 0


def test_a_bad_device_memory_is_one_line(capsys):
    proc = compress_cli(capsys, "--model", str(CONFIGS / "llama-3.1-8b.json"), "--method", "svd-llm",
                        "--ratio", "0.2", "--plan-only", "--device-memory", "eighty")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--device-memory" in proc.stderr


def test_the_zs_svd_and_fermigrad_passes_are_in_the_plan():
    from conftest import STORIES, require

    cfg = read_config(str(require(STORIES)))
    spec = RunSpec(model="x", ratio=0.2, nsamples=32, seq_len=64)
    by_name = {s.name: s for s in memory_plan(cfg, spec, make_plan("svd-llm", ranks="zs-svd", grad_samples=16))}
    zs = by_name["allocate (zs-svd)"]
    grads = cfg.num_layers * sum(m * n for m, n in cfg.projection_shapes().values()) * 4
    inputs = cfg.num_layers * 16 * 64 * cfg.hidden_size * 4  # every block's inputs on the 16 gradient windows
    assert zs.device > 2 * 16 * 64 * cfg.hidden_size * 4 and zs.host >= grads + inputs, zs
    fermi = {s.name: s for s in memory_plan(cfg, spec, make_plan("svd-llm", ranks="fermigrad"))}["allocate (fermigrad)"]
    fermi_form = cfg.num_layers * sum(min(m, n) * (m + n) for m, n in cfg.projection_shapes().values()) * 4
    assert fermi.device > fermi_form and fermi.host > fermi_form, fermi  # every projection's A and B at full rank
