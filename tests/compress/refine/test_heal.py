"""Healing: the stage lowers the held-out distillation loss, trains only the factors, resumes bit for bit, and its
teacher sees only calibration text; the library step is jit-compiled and gives one device's result on a mesh."""

from __future__ import annotations

import json

import jax
import numpy as np
import optax
import pytest
from conftest import DATA, STORIES, compress_cli, require

import sigmascale_jax as ssj
from sigmascale_jax.compress.refine import heal
from sigmascale_jax.io.checkpoint import load_pytree

RUN = ["--method", "svd-llm", "--ratio", "0.3", "--nsamples", "8", "--seq-len", "32", "--batch-size", "4",
       "--data-dir", str(DATA)]
HEAL = ["--heal-steps", "12", "--heal-samples", "16", "--heal-holdout", "4", "--heal-eval-every", "4",
        "--heal-lr", "1e-3", "--heal-seq-len", "48"]


def leaves(folder) -> dict[str, np.ndarray]:
    tree = load_pytree(folder / "params")
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same compression without and with healing (in-process command lines); `runs / "seen"` holds every
    window the healed run's teacher saw (training steps and held-out measurements), as `[N, T]` int32."""
    from sigmascale_jax.compress.cli import main
    from sigmascale_jax.errors import run_cli

    root = tmp_path_factory.mktemp("heal")
    seen: list[np.ndarray] = []
    real_teacher, real_step, real_held = heal.teacher_states, heal.heal_step, heal._held_out

    def teacher(params, windows, *a, **kw):  # every window the dense teacher runs on
        seen.extend(np.asarray(windows))
        return real_teacher(params, windows, *a, **kw)

    def step(train, opt_state, frozen, teacher, tokens, **kw):  # and every window a step or a measurement reads
        seen.extend(np.asarray(tokens))
        return real_step(train, opt_state, frozen, teacher, tokens, **kw)

    def held(train, frozen, teacher, windows, *a, **kw):
        seen.extend(np.asarray(windows))
        return real_held(train, frozen, teacher, windows, *a, **kw)

    for name, extra in (("plain", []), ("healed", HEAL)):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(heal, "teacher_states", teacher)
            mp.setattr(heal, "heal_step", step)
            mp.setattr(heal, "_held_out", held)
            assert run_cli(main, ["--model", str(require(STORIES)), *RUN, *extra, "--out", str(root / name),
                                  "--no-progress"]) == 0
    np.save(root / "seen.npy", np.stack(seen))
    return root


def test_healing_lowers_the_held_out_loss_and_trains_only_the_factors(runs):
    record = json.loads((runs / "healed" / "compression.json").read_text())["refine"][0]
    assert record["name"] == "heal" and record["steps_run"] >= 4
    assert record["held_out_loss_after"] < 0.95 * record["held_out_loss_before"]
    assert record["tokens"] == record["steps_run"] * 4 * 48
    assert record["text"]["calib"] == "c4" and record["text"]["disjoint_from_calibration"]
    # where the stage's time went: compiling apart from the steps, held-out measurements, checkpoints, the teacher
    assert {"steps", "held_out", "checkpoint", "teacher", "compile"} <= set(record["time_s"])
    assert all(v >= 0 for v in record["time_s"].values()) and record["stacked"]  # uniform ranks: one scan
    assert record["compiles"]["total"] == sum(v for k, v in record["compiles"].items() if k != "total")
    plain, healed = leaves(runs / "plain"), leaves(runs / "healed")
    assert plain.keys() == healed.keys()
    changed = {k for k in plain if not np.array_equal(plain[k], healed[k])}
    factors = {k for k in plain if k.endswith(("['b']", "['c']"))}
    assert changed and changed <= factors  # embeddings, norms, head never move
    assert len(changed) > len(factors) // 2


def test_an_interrupted_heal_resumes_to_the_uninterrupted_factors(runs, tmp_path, monkeypatch, capsys):
    real_save = heal._Checkpoint.save
    saves = {"n": 0}

    def save_then_die(self, state, info):
        real_save(self, state, info)
        saves["n"] += 1
        if saves["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(heal._Checkpoint, "save", save_then_die)
    out = tmp_path / "o"
    args = ["--model", str(STORIES), *RUN, *HEAL, "--out", str(out)]
    assert compress_cli(capsys, *args).returncode == 130
    assert (tmp_path / "o.partial" / "heal" / "heal.json").is_file()
    monkeypatch.setattr(heal._Checkpoint, "save", real_save)
    done = compress_cli(capsys, *args)
    assert done.returncode == 0, done.stderr
    record = json.loads((out / "compression.json").read_text())["refine"][0]
    assert record["resumed_from_step"] == 8
    want, got = leaves(runs / "healed"), leaves(out)
    assert all(np.array_equal(want[k], got[k]) for k in want)


def _find(hay: bytes, needle: bytes) -> bool:
    """Whether the int32 token run `needle` occurs in `hay` at a token boundary."""
    at = hay.find(needle)
    while at != -1:
        if at % 4 == 0:
            return True
        at = hay.find(needle, at + 1)
    return False


def test_the_teacher_sees_only_calibration_text(runs):
    from sigmascale_jax.compress.calibration import calibration_ids, window_starts
    from sigmascale_jax.io.data import perplexity_text
    from sigmascale_jax.io.sources import open_model

    seen = np.load(runs / "seen.npy")
    source = open_model(str(STORIES))
    calib = calibration_ids(source, "c4", str(DATA))
    tok = source.tokenizer()
    evaluation = [np.asarray(tok(perplexity_text(t, DATA)).input_ids, np.int32).tobytes() for t in ("wikitext2", "c4")]
    taken = np.zeros(len(calib), bool)
    for s in window_starts(len(calib), 8, 32, 0):  # the windows that chose the factors
        taken[s : s + 32] = True
    assert len(seen) > 16
    hay = calib.tobytes()
    for w in seen:
        at = hay.find(w.tobytes())
        assert at != -1 and at % 4 == 0, "a window the teacher saw is not calibration text"
        assert not taken[at // 4 : at // 4 + len(w)].any(), "a window overlaps the compressor's calibration windows"
        assert not any(_find(e, w[:16].tobytes()) for e in evaluation), "evaluation text reached the teacher"


def test_distill_step_trains_factors_of_a_pivga_int8_tree_and_nothing_else():
    cfg, params, source = ssj.load_model(str(require(STORIES)))
    windows = ssj.calibration_windows(source, "c4", nsamples=16, seq_len=32, seed=0, data_dir=str(DATA))
    plan = ssj.make_plan("svd-llm", encoding="pivga", quantize="int8")
    cparams, _ = ssj.compress_params(params, cfg, windows[:8], plan, 0.3)
    tx = ssj.heal_optimizer(optax.adam(1e-5), cparams)  # int8 scales are ~1e-3: Adam moves each by ~lr a step
    state = tx.init(cparams)
    first = heal.held_out_loss(cparams, params, windows[8:], cfg, batch=8)  # compiled once, for both measurements
    new = cparams
    for batch in windows[:8].reshape(2, 4, -1):
        new, state, _ = ssj.distill_step(new, state, params, batch, cfg=cfg, optimizer=tx)
    assert heal.held_out_loss(new, params, windows[8:], cfg, batch=8) < first
    same = {label: [] for label in ("factor", "frozen")}
    for label, a, b in zip(jax.tree.leaves(ssj.trainable(cparams)), jax.tree.leaves(cparams), jax.tree.leaves(new)):
        same[label].append(np.array_equal(np.asarray(a), np.asarray(b)))
    assert all(same["frozen"]) and len(same["frozen"]) > 100  # codes, permutations, embeddings, norms
    assert not any(same["factor"])  # every factor (B', R's scales) moved
    # recomputing the blocks' activations in the backward pass changes memory, not the step; remat=False spelled
    # out is the step the loop compiled (the default), and remat=True one more program
    compiled = heal._distill_step._cache_size()
    one, again = (ssj.distill_step(cparams, tx.init(cparams), params, windows[:4], cfg=cfg, optimizer=tx,
                                   remat=remat)[0] for remat in (False, True))
    assert heal._distill_step._cache_size() == compiled + 1
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(again)):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-5, atol=1e-7)


# distill_step on an 8-device data mesh (a user's sharded tokens) giving the one-device result is checked in the
# 8-device process tests/compress/test_mesh.py starts anyway (`distill_sharded`).


def test_a_finished_pivga_folder_heals_after_the_fact_and_a_quantized_one_is_refused(tmp_path):
    from sigmascale_jax.compress.refine.heal import heal_compressed
    from sigmascale_jax.errors import UserError

    common = {"nsamples": 8, "seq_len": 32, "batch_size": 4, "data_dir": str(DATA), "progress": False}
    ssj.compress(str(require(STORIES)), "svd-llm", 0.3, tmp_path / "p", encoding="pivga", **common)
    before = (tmp_path / "p" / "compression.json").read_bytes()
    report = heal_compressed(tmp_path / "p", tmp_path / "h", heal_steps=8, heal_samples=16, heal_holdout=4,
                             heal_eval_every=4, heal_lr=1e-3, data_dir=str(DATA), progress=False)
    record = report["refine"][-1]
    assert record["name"] == "heal" and record["held_out_loss_after"] < record["held_out_loss_before"]
    assert (tmp_path / "p" / "compression.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h", "p"]  # no staging or checkpoint left
    _, params, _ = ssj.load_model(str(tmp_path / "h"))  # the folder checks against its report
    assert type(params["blocks"][0]["q"]).__name__ == "PivGa"
    ssj.compress(str(STORIES), "svd-llm", 0.3, tmp_path / "q", quantize="int8", **common)
    with pytest.raises(UserError, match="quantized"):
        heal_compressed(tmp_path / "q", tmp_path / "qh", heal_steps=2, data_dir=str(DATA), progress=False)


def test_the_heal_bar_counts_a_step_once_its_loss_is_ready(monkeypatch):
    """JAX dispatches steps before they finish: the bar moves for a step only after its loss has been read back."""
    events: list[tuple[str, int]] = []
    real_step = heal.heal_step

    class Loss:  # a step's loss that says when it is read
        def __init__(self, value, i):
            self.value, self.i = value, i

        def __float__(self):
            events.append(("ready", self.i))
            return float(self.value)

        def __array__(self, dtype=None, copy=None):
            events.append(("ready", self.i))
            return np.asarray(self.value, dtype)

    calls = {"n": 0}

    def step(*a, **kw):
        train, opt_state, loss = real_step(*a, **kw)
        calls["n"] += 1
        return train, opt_state, Loss(jax.device_get(loss), calls["n"])

    class Bar:
        def __init__(self, *a, total=None, initial=0, **kw):
            self.n = initial

        def update(self, k=1):
            self.n += k
            events.append(("bar", self.n))

        def set_postfix(self, *a, **kw):
            pass

        def close(self):
            pass

    monkeypatch.setattr(heal, "heal_step", step)
    monkeypatch.setattr(heal, "tqdm", Bar)
    cfg, params, source = ssj.load_model(str(require(STORIES)))
    windows = ssj.calibration_windows(source, "c4", nsamples=24, seq_len=32, seed=0, data_dir=str(DATA))
    plan = ssj.make_plan("svd-llm", heal_steps=6, heal_samples=16, heal_holdout=4, heal_eval_every=3)
    ssj.compress_params(params, cfg, windows, plan, 0.3, progress=True)
    bars = [n for kind, n in events if kind == "bar"]
    assert bars == list(range(1, 7))
    for at, (kind, n) in enumerate(events):
        if kind == "bar" and n % 3:  # between measurements: step n's loss was read before the bar counted it
            assert ("ready", n) in events[:at], events
