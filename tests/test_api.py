"""The public library API (`sigmascale_jax/__init__.py`) as a JAX user calls it, on the real stories260k."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import DATA, REPO, SHARED, STORIES, compress_cli, eval_cli, require

import sigmascale_jax as ssj

SMALL = dict(nsamples=16, seq_len=128, seed=0)


@pytest.fixture(scope="module")
def model():
    cfg, params, source = ssj.load_model(str(require(STORIES)))
    windows = ssj.calibration_windows(source, "c4", data_dir=str(DATA), **SMALL)
    return cfg, params, source, windows


@pytest.fixture(scope="module")
def pivga_int8(model):
    cfg, params, _, windows = model
    plan = ssj.make_plan("svd-llm", encoding="pivga", quantize="int8", group_size=32)
    return ssj.compress_params(params, cfg, windows, plan, 0.3)


def nll(params, ids, cfg):
    logits = ssj.forward(params, ids[:, :-1], cfg)
    target = jnp.take_along_axis(logits, ids[:, 1:, None], axis=-1)[..., 0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - target)


def test_public_names_are_exported_with_docstrings():
    for name in ssj.__all__:
        obj = getattr(ssj, name)
        assert obj.__doc__, name
    assert callable(ssj.compress) and callable(ssj.generate) and callable(ssj.export)


def test_readme_python_example_runs(tmp_path, monkeypatch):
    readme = (REPO / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    assert "ssj.compress_params" in code and "ssj.save_compressed" in code
    code = code.replace("../shared", str(SHARED))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SIGMASCALE_DATA", str(DATA))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "runs" / "mine" / "compression.json").is_file()


@pytest.mark.parametrize("method,ratio,settings", [
    ("svd-llm", 0.3, {"encoding": "plain"}),
    ("svd-llm", 0.3, {"encoding": "pivga"}),
    # quantization alone by GPTQ, encoded inside the block loop from its Grams
    ("none", 0.0, {"encoding": "plain", "quantize": "int4", "quantizer": "gptq", "group_size": 32}),
])
def test_in_memory_compression_equals_the_cli_folder_bit_for_bit(model, tmp_path, capsys, method, ratio, settings):
    from sigmascale_jax.compress.pipeline import stored_params
    from sigmascale_jax.io.checkpoint import load_pytree

    cfg, params, _, windows = model
    out = tmp_path / "cli"
    flags = [tok for k, v in settings.items() for tok in (f"--{k.replace('_', '-')}", str(v))]
    proc = compress_cli(capsys, "--model", str(STORIES), "--method", method, "--ratio", str(ratio), *flags,
                        "--nsamples", "16", "--seq-len", "128", "--batch-size", "8", "--data-dir", str(DATA),
                        "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    cparams, report = ssj.compress_params(params, cfg, windows, ssj.make_plan(method, **settings), ratio)
    disk = load_pytree(out / "params")
    mine = jax.device_get(stored_params(cparams))
    assert jax.tree.structure(disk) == jax.tree.structure(mine)
    for a, b in zip(jax.tree.leaves(disk), jax.tree.leaves(mine)):
        assert np.asarray(a).dtype == np.asarray(b).dtype and np.array_equal(np.asarray(a), np.asarray(b))
    cli = json.loads((out / "compression.json").read_text())
    assert cli["matrices"] == report["matrices"] and cli["calibration"]["sha1"] == report["calibration"]["sha1"]


def test_saved_folder_evaluates_to_the_in_memory_perplexity(model, pivga_int8, tmp_path, capsys):
    from sigmascale_jax.eval.perplexity import make_windows
    from sigmascale_jax.io.data import perplexity_text

    cfg, _, source, _ = model
    cparams, report = pivga_int8
    out = ssj.save_compressed(cparams, cfg, report, tmp_path / "saved", source=source)
    ids = np.asarray(source.tokenizer()(perplexity_text("wikitext2", DATA)).input_ids, np.int32)
    mine = ssj.perplexity(cparams, cfg, make_windows(ids, 128, 3), progress=False)["ppl"]
    proc = eval_cli(capsys, "--model", str(out), "--tasks", "wikitext2", "--seq-len", "128", "--max-windows", "3",
                    "--data-dir", str(DATA), "--json", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "r.json").read_text())["wikitext2"]["ppl"] == pytest.approx(mine, rel=1e-5)
    cfg2, params2, _ = ssj.load_model(str(out))  # load_model reads it back as the same typed leaves
    assert jax.tree.structure(params2) == jax.tree.structure(cparams)


def test_optax_steps_with_trainable_train_only_the_factors_of_a_pivga_int8_tree(model, pivga_int8):
    cfg, _, _, windows = model
    cparams, _ = pivga_int8
    labels = ssj.trainable(cparams)
    assert labels["embed"] == "frozen" and labels["blocks"][0]["attn_norm"] == "frozen"
    assert labels["blocks"][0]["q"].b.scale == "factor" and labels["blocks"][0]["q"].perm.carrier == "frozen"
    tx = optax.multi_transform({"factor": optax.adam(1e-5), "frozen": optax.set_to_zero()}, labels)
    ids = jnp.asarray(windows[:4])
    state, p = tx.init(cparams), cparams
    step = jax.jit(lambda p, s: (lambda l, g: (l, *tx.update(g, s, p)))(*jax.value_and_grad(nll)(p, ids, cfg)))
    losses = []
    for _ in range(3):
        loss, updates, state = step(p, state)
        p = optax.apply_updates(p, updates)
        losses.append(float(loss))
    assert float(nll(p, ids, cfg)) < losses[0]
    flat_l, flat_a, flat_b = (jax.tree.leaves(t) for t in (labels, cparams, p))
    assert len(flat_l) == len(flat_a) == len(flat_b)
    changed = [not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(flat_a, flat_b)]
    assert not any(c for c, lab in zip(changed, flat_l) if lab == "frozen")
    assert any(c for c, lab in zip(changed, flat_l) if lab == "factor")


def test_nnx_optimizer_over_a_compressed_decoder(pivga_int8, model):
    from flax import nnx

    cfg = model[0]
    module = ssj.Decoder(cfg, pivga_int8[0])
    opt = nnx.Optimizer(module, optax.adam(1e-5), wrt=nnx.Param)
    ids = jnp.asarray(model[3][:2])

    @nnx.jit
    def step(module, opt):
        opt.update(module, nnx.grad(lambda m: nll(m.pytree(), ids, cfg))(module))

    before = module.pytree()
    step(module, opt)
    after = module.pytree()
    assert np.isfinite(float(nll(after, ids, cfg)))
    q0, q1 = before["blocks"][0]["q"], after["blocks"][0]["q"]
    assert np.array_equal(np.asarray(q0.perm.carrier), np.asarray(q1.perm.carrier))  # a Buffer: not trained
    assert not np.array_equal(np.asarray(q0.b.scale), np.asarray(q1.b.scale))  # a Factor: trained


def test_orbax_restore_without_a_target_runs_in_the_decoder(model, tmp_path):
    from sigmascale_jax.io.checkpoint import load_pytree, save_pytree

    cfg, params, _, windows = model
    cparams, _ = ssj.compress_params(params, cfg, windows, ssj.make_plan("svd", encoding="pivga"), 0.3)
    save_pytree(tmp_path / "ck", cparams)
    restored = load_pytree(tmp_path / "ck")  # plain dicts: no target given
    assert isinstance(restored["blocks"][0]["q"], dict)
    ids = jnp.asarray(windows[:2])
    jitted = jax.jit(ssj.forward, static_argnums=2)
    np.testing.assert_allclose(np.asarray(jitted(restored, ids, cfg)), np.asarray(jitted(cparams, ids, cfg)), atol=1e-5)
    assert type(ssj.typed_params(restored)["blocks"][0]["q"]) is type(cparams["blocks"][0]["q"])


def test_sigmascale_per_matrix_core_jits_and_learns_a_users_loss():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(24, 32)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(32, 200)) * np.exp(rng.uniform(-1, 1, (32, 1))), jnp.float32)
    gram = x @ x.T
    b, c, scales = jax.jit(ssj.sigmascale_factors, static_argnames=("rank", "steps"))(w, gram, rank=6, steps=20)
    b0, c0 = ssj.svd_llm_factors(w, gram, 6)
    start = float(ssj.relative_activation_loss(w, b0 @ c0, gram))
    assert b.shape == (24, 6) and c.shape == (6, 32) and np.isfinite(np.asarray(b @ c)).all()
    assert float(ssj.relative_activation_loss(w, b @ c, gram)) <= start * (1 + 1e-4)  # SVD-LLM is optimal there

    def outputs_loss(w_hat):  # a loss past the layer: a nonlinearity of its outputs
        return jnp.mean((jax.nn.silu(w_hat @ x) - jax.nn.silu(w @ x)) ** 2)

    b1, c1, _ = ssj.sigmascale_factors(w, gram, 6, steps=40, loss_fn=outputs_loss)
    assert float(outputs_loss(b1 @ c1)) < float(outputs_loss(b0 @ c0))


def test_generate_takes_a_prng_key(model, pivga_int8):
    cfg = model[0]
    prompt = np.asarray(model[3][:1, :6])
    a = ssj.generate(pivga_int8[0], cfg, prompt, 6, temperature=1.0, key=jax.random.key(3))
    b = ssj.generate(pivga_int8[0], cfg, prompt, 6, temperature=1.0, key=jax.random.key(3))
    assert a.shape == (1, 12) and np.array_equal(a, b) and np.array_equal(a[:, :6], prompt)


def test_python_errors_name_arguments_not_flags(model):
    cfg, params, _, windows = model
    with pytest.raises(ssj.UserError, match=r"^ratio must "):
        ssj.compress_params(params, cfg, windows, ssj.make_plan("svd"), 1.5)
    with pytest.raises(ssj.UserError, match="windows must be an integer array"):
        ssj.compress_params(params, cfg, windows.astype(np.float32), ssj.make_plan("svd"), 0.3)
    with pytest.raises(ssj.UserError, match=r"^method 'nope' is unknown; known: "):
        ssj.make_plan("nope")
    with pytest.raises(ssj.UserError, match=r"^alpha is a setting of asvd"):
        ssj.make_plan("svd-llm", alpha=0.5)


def test_export_writes_in_memory_params_that_pytorch_loads(model, pivga_int8, tmp_path):
    import torch

    from sigmascale_jax.deploy.torch_lowrank import load_factored

    cfg, _, source, windows = model
    cparams, report = pivga_int8
    info = ssj.export(cparams, cfg, source.tokenizer(), tmp_path / "hf", "factored")
    assert info["format"] == "factored"
    torch_model = load_factored(tmp_path / "hf")
    ids = np.asarray(windows[:1, :32])
    with torch.no_grad():
        theirs = torch_model(torch.from_numpy(ids.astype(np.int64))).logits.float().numpy()
    ours = np.asarray(jax.jit(ssj.forward, static_argnums=2)(cparams, jnp.asarray(ids), cfg))
    assert np.abs(theirs - ours).max() <= 1e-4 * max(1.0, np.abs(ours).max())


@pytest.mark.parametrize("plan_kw", [{"encoding": "pivga", "quantize": "int4", "group_size": 16},
                                     {"quantize": "int8", "group_size": 32}, {"quantize": "int3", "group_size": 16}])
def test_quantized_trees_restore_without_a_target(model, tmp_path, plan_kw):
    """What an Orbax restore without a target drops of a quantized matrix (bits, group, columns) rides with it as
    data: `typed_params` reads the tree back, from a direct save of the typed tree and from a saved folder."""
    from sigmascale_jax.io.checkpoint import PARAMS_DIR, load_pytree, save_pytree

    cfg, params, source, windows = model
    cparams, report = ssj.compress_params(params, cfg, windows, ssj.make_plan("svd-llm", **plan_kw), 0.3)
    ids = jnp.asarray(windows[:2])
    jitted = jax.jit(ssj.forward, static_argnums=2)
    want = np.asarray(jitted(cparams, ids, cfg))
    save_pytree(tmp_path / "ck", cparams)  # the typed tree as it is
    ssj.save_compressed(cparams, cfg, report, tmp_path / "folder", source=source)  # the folder format
    for restored in (load_pytree(tmp_path / "ck"), load_pytree(tmp_path / "folder" / PARAMS_DIR)):
        typed = ssj.typed_params(restored)
        leaf = typed["blocks"][0]["q"]
        assert type(leaf) is type(cparams["blocks"][0]["q"])
        np.testing.assert_allclose(np.asarray(jitted(typed, ids, cfg)), want, atol=1e-5)


def test_quantized_scales_take_a_learning_rate_of_their_own(model, pivga_int8):
    """Adam at 1e-3 suits float factors and overshoots int8 scales (~1e-3 of a weight's range): with `scale_tx`
    the scales step at 1e-5 beside it, and the held-out distillation loss goes down."""
    import optax

    cfg, params, _, windows = model
    cparams, _ = pivga_int8
    labels = jax.tree.leaves(ssj.trainable(cparams, scales="scale"))
    # every trainable leaf of an int8 tree is a scale (B' and R are quantized): all of them relabelled, nothing else
    assert "factor" not in labels and labels.count("scale") == jax.tree.leaves(ssj.trainable(cparams)).count("factor")
    tx = ssj.heal_optimizer(optax.adam(1e-3), cparams, scale_tx=optax.adam(1e-5))
    from sigmascale_jax.compress.refine.heal import distill_loss

    held = windows[-4:]
    before = float(distill_loss(cparams, params, held, cfg)[0])
    p, s = cparams, tx.init(cparams)
    for batch in windows[:8].reshape(2, 4, -1):
        p, s, _ = ssj.distill_step(p, s, params, batch, cfg=cfg, optimizer=tx)
    assert float(distill_loss(p, params, held, cfg)[0]) < before
