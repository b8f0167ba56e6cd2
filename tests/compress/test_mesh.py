"""A data mesh of 8 simulated CPU devices, and a (data, model) mesh of 2 × 4, give the factors, perplexities,
healing steps and generated tokens of one device.

JAX fixes its device count when it starts, so the comparison runs in a subprocess started
with `XLA_FLAGS=--xla_force_host_platform_device_count=8`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import DATA, REPO, STORIES, require

SCRIPT = r"""
import json, sys
import numpy as np, jax
import sigmascale_jax
from sigmascale_jax.io.checkpoint import load_pytree
from sigmascale_jax.eval.cli import evaluate

assert jax.local_device_count() == 8, jax.local_device_count()
model, data, tmp = sys.argv[1:4]
kw = dict(nsamples=18, seq_len=32, batch_size=8, data_dir=data, progress=False)
out = {}
# SigmaScale with the refit after it: both learn on the data mesh
for method, extra in (("svd-llm", {}), ("sigmascale", {"steps": 2, "step_windows": 8, "eval_every": 1, "refit_steps": 2,
                                                       "refit_eval_every": 1, "refit_windows": 8})):
    trees, reports = [], []
    for mesh in ("data=1", "data=8"):
        folder = f"{tmp}/{method}-{mesh[5:]}"
        reports.append(sigmascale_jax.compress(model, method, 0.3, folder, mesh=mesh, **kw, **extra))
        trees.append(load_pytree(folder + "/params"))
    out[method + "_rel_loss"] = max(abs(x["rel_loss"] - y["rel_loss"]) / x["rel_loss"]
                                    for x, y in zip(reports[0]["matrices"], reports[1]["matrices"]))
    if method == "svd-llm":  # the factors themselves
        a, b = (jax.tree.leaves(t) for t in trees)
    else:  # products B C: where a block's singular values nearly tie, the refit's float32 rounding (its inputs are
        # the refitted blocks before it) may rotate which B and C make the same product
        from sigmascale_jax.model.modeling import PROJECTIONS, typed_params
        loaded = (typed_params(sigmascale_jax.load_model(f"{tmp}/{method}-{m}")[1]) for m in ("1", "8"))
        a, b = ([np.asarray(blk[n].matrix()) for blk in t["blocks"] for n in PROJECTIONS] for t in loaded)
        out["refit_trace"] = max(abs(x[1] - y[1]) / x[1] for ra, rb in zip(reports[0]["blocks"], reports[1]["blocks"])
                                 for x, y in zip(ra["refit"]["holdout_trace"], rb["refit"]["holdout_trace"]))
    out[method] = max(float(np.abs(np.asarray(x) - np.asarray(y)).max() / (np.abs(np.asarray(x)).max() + 1e-30))
                      for x, y in zip(a, b))
# the library with a user's Mesh object: the folder's factors exactly
from jax.sharding import Mesh
from sigmascale_jax.compress.pipeline import stored_params
cfg, params, source = sigmascale_jax.load_model(model)
windows = sigmascale_jax.calibration_windows(source, "c4", 18, 32, 0, data_dir=data)
cparams, _ = sigmascale_jax.compress_params(params, cfg, windows, sigmascale_jax.make_plan("svd-llm"), 0.3,
                                            mesh=Mesh(jax.local_devices(), ("data",)), batch_size=8)
mine, disk = jax.tree.leaves(stored_params(cparams)), jax.tree.leaves(load_pytree(f"{tmp}/svd-llm-8/params"))
out["in_memory_mesh_equal"] = len(mine) == len(disk) and all(
    np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(mine, disk))
ppl = [evaluate(f"{tmp}/svd-llm-1", ["c4"], seq_len=64, max_windows=16, batch_size=8, data_dir=data, progress=False,
                mesh=m)["c4"]["ppl"] for m in ("data=1", "data=8", "data=2,model=4")]
out["ppl"] = ppl
# (data, model) = 2 x 4: weights split over model in the statistics pass; compare products B C (the split of a
# matrix between B and C may differ)
sigmascale_jax.compress(model, "svd-llm", 0.3, f"{tmp}/svd-llm-2x4", mesh="data=2,model=4", **kw)
from sigmascale_jax.parallel import make_mesh, on_device
from sigmascale_jax.model.modeling import PROJECTIONS, typed_params
one, two = (typed_params(sigmascale_jax.load_model(f"{tmp}/{f}")[1]) for f in ("svd-llm-1", "svd-llm-2x4"))
out["product_2x4"] = max(
    float(np.abs(np.asarray(x[n].matrix()) - np.asarray(y[n].matrix())).max() / np.abs(np.asarray(x[n].matrix())).max())
    for x, y in zip(one["blocks"], two["blocks"]) for n in PROJECTIONS)
placed = on_device(one, make_mesh("data=2,model=4"))
out["q_split"] = str(placed["blocks"][0]["q"].b.sharding.spec), str(placed["embed"].sharding.spec)
cfg1 = sigmascale_jax.load_model(f"{tmp}/svd-llm-1")[0]
prompt = np.asarray([[1, 403, 29], [1, 87, 5]], np.int32)
gen = [sigmascale_jax.generate(one, cfg1, prompt, 12, mesh=make_mesh(m)).tolist() for m in ("data=1", "data=2,model=4")]
out["generate_equal"] = gen[0] == gen[1]
# a user's mesh with its own axis names, through a Layout
from sigmascale_jax.eval.perplexity import perplexity
from sigmascale_jax.parallel import Layout
lay = Layout(Mesh(np.asarray(jax.devices()).reshape(2, 4), ("dp", "tp")),
             {"batch": "dp", "heads": "tp", "mlp": "tp", "vocab": "tp"})
toks = np.random.default_rng(0).integers(0, cfg1.vocab_size, (8, 48)).astype(np.int32)
out["layout_ppl"] = [perplexity(one, cfg1, toks, 4, progress=False, mesh=m)["ppl"] for m in (None, lay)]
out["layout_split"] = str(on_device(one, lay)["blocks"][0]["down"].c.sharding.spec)
# healing on a data mesh (the optimizer's state placed with the factors): the one-device run's held-out losses
from sigmascale_jax.compress.refine.heal import heal_compressed
heal = dict(heal_steps=2, heal_samples=16, heal_holdout=8, heal_batch=8, heal_eval_every=2, heal_lr=1e-3,
            heal_seq_len=32, data_dir=data, progress=False)
out["heal"] = [heal_compressed(f"{tmp}/svd-llm-1", f"{tmp}/heal-{m[5:]}", mesh=m, **heal)["refine"][-1]["trace"]
               for m in ("data=1", "data=8")]
# distill_step with the user's tokens split over a data mesh: the one-device update (sgd: linear in the gradient)
import optax
from jax.sharding import NamedSharding, PartitionSpec as P
wins = sigmascale_jax.calibration_windows(source, "c4", nsamples=24, seq_len=32, seed=0, data_dir=data)
cp, _ = sigmascale_jax.compress_params(params, cfg, wins[:8], sigmascale_jax.make_plan("svd-llm", encoding="pivga"), 0.3)
tx = sigmascale_jax.heal_optimizer(optax.sgd(0.01), cp)
data_mesh = Mesh(np.array(jax.devices()), ("data",))
stepped = []
for sharded in (False, True):
    p, s = cp, tx.init(cp)
    for batch in wins[8:24].reshape(2, 8, -1):
        tokens = jax.device_put(batch, NamedSharding(data_mesh, P("data"))) if sharded else batch
        p, s, loss = sigmascale_jax.distill_step(p, s, params, tokens, cfg=cfg, optimizer=tx)
    stepped.append(p)
a, b = (jax.tree.leaves(t) for t in stepped)
out["distill_sharded"] = {
    "max_rel": max(float(np.abs(np.asarray(x) - np.asarray(y)).max() / (np.abs(np.asarray(x)).max() + 1e-30))
                   for x, y in zip(a, b)),
    "moved": max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(jax.tree.leaves(cp), a))}
print("RESULT " + json.dumps(out))
"""


def test_eight_devices_give_the_factors_and_perplexity_of_one(tmp_path):
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"  # the suite's flags too
    env = {**os.environ, "XLA_FLAGS": flags, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(require(STORIES)), str(DATA), str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])
    # the same factors up to float32 summation order (Gram matrices summed across devices, then whitened)
    assert res["svd-llm"] < 1e-3 and res["svd-llm_rel_loss"] < 1e-4, res
    assert res["sigmascale"] < 5e-2 and res["sigmascale_rel_loss"] < 1e-3, res  # SigmaScale and the refit: products
    assert res["refit_trace"] < 1e-4, res  # the refit's held-out errors, step by step (3e-5 measured)
    assert res["in_memory_mesh_equal"], res
    a, b, c = res["ppl"]
    assert abs(a - b) <= 1e-5 * a and abs(a - c) <= 1e-5 * a, res
    # 2 x 4: the block's outputs gathered over heads and MLP width sum in another order: the same products to
    # float32 rounding carried through the Gram matrices and the whitening
    assert res["product_2x4"] < 1e-3, res
    assert res["q_split"] == ["P('model',)", "P('model',)"], res  # no full replica
    assert res["generate_equal"], res
    a, b = res["layout_ppl"]
    assert abs(a - b) <= 1e-5 * a and res["layout_split"] == "P(None, 'tp')", res  # down's C: [k, in] over MLP width
    one, eight = res["heal"]  # [step, train loss, held-out loss] per measurement
    assert [t[0] for t in one] == [t[0] for t in eight] == [0, 2], res
    for x, y in zip(one, eight):
        assert abs(x[2] - y[2]) <= 1e-4 * abs(x[2]), res
    # distill_step on tokens split over the data mesh: the steps did train, and gave the one-device factors to float32
    # rounding (7e-8 measured; Adam's steps would amplify it to 2e-4, hence sgd)
    assert res["distill_sharded"]["moved"] > 1e-4, res
    assert res["distill_sharded"]["max_rel"] < 1e-5, res


def test_a_bad_mesh_is_a_one_line_error(tmp_path, capsys):
    from conftest import assert_one_line_error, compress_cli

    for spec, fragment in (("pipe=2", "--mesh takes data=N,model=M"), ("data=9", "only 1 available"),
                           ("data=1,model=2", "needs 2 devices")):
        proc = compress_cli(capsys, "--model", str(STORIES), "--method", "svd-llm", "--ratio", "0.3", "--mesh", spec,
                            "--out", str(tmp_path / "o"))
        assert_one_line_error(proc, fragment)
