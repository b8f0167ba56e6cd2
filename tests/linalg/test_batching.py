"""stacked_map: vmap's results without batched LAPACK calls on CPU, and the SigmaScale hang it prevents."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, SMOLLM2_GGUF, require

from sigmascale_jax.linalg import batching
from sigmascale_jax.linalg.batching import stacked_map


def truncated(a, s, k):
    u, sig, vt = jnp.linalg.svd(a @ s, full_matrices=False)
    return (u[:, :k] * sig[:k]) @ vt[:k]


@pytest.mark.parametrize("unroll", [True, False])
def test_stacked_map_equals_vmap(monkeypatch, unroll):
    monkeypatch.setattr(batching, "unroll_on_cpu", lambda: unroll)
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((3, 6, 5)), jnp.float32)
    s = jnp.asarray(rng.standard_normal((5, 5)), jnp.float32)
    ours = jax.jit(lambda a, s: stacked_map(truncated, in_axes=(0, None, None))(a, s, 2))(a, s)
    ref = jax.vmap(truncated, in_axes=(0, None, None))(a, s, 2)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=1e-5)
    # pytrees map leaf by leaf
    tree = stacked_map(lambda d: {"sum": d["x"].sum() + d["y"].sum()}, in_axes=(0,))({"x": a, "y": a})
    np.testing.assert_allclose(np.asarray(tree["sum"]), 2 * np.asarray(a.sum(axis=(1, 2))), rtol=1e-5)


def test_stacked_map_checks_its_arguments():
    with pytest.raises(ValueError, match="in_axes"):
        stacked_map(lambda x: x, in_axes=(1,))
    if batching.unroll_on_cpu():
        with pytest.raises(ValueError, match="leading size"):
            stacked_map(lambda x, y: x + y, in_axes=(0, 0))(jnp.zeros((2, 3)), jnp.zeros((3, 3)))


def test_sigmascale_steps_on_smollm2_sizes_finish():
    """Regression: with vmapped SVDs, learning SmolLM2's block scales hung XLA:CPU (jaxlib 0.10.2) after step 1."""
    require(SMOLLM2_GGUF)
    code = (
        "import numpy as np, sigmascale_jax\n"
        "from sigmascale_jax.io.sources import open_model\n"
        "from sigmascale_jax.io.hf_map import load_block, load_outer\n"
        "from sigmascale_jax.compress.stats import block_stats\n"
        "from sigmascale_jax.compress.ranks import block_ranks\n"
        "from sigmascale_jax.compress.factorize.sigmascale.block import sigmascale_block\n"
        f"src = open_model({str(SMOLLM2_GGUF)!r}); cfg = src.cfg\n"
        "ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(8, 128))\n"
        "xs = np.asarray(load_outer(src.reader, cfg)['embed'][ids])\n"
        "block = load_block(src.reader, cfg, 3)\n"
        "ys, stats = block_stats(block, xs, cfg, 8)\n"
        "res = sigmascale_block(block, stats, xs, ys, cfg, block_ranks(cfg, 0.3), steps=3, batch_windows=4, eval_every=1)\n"
        "assert res.block['holdout_best'] <= res.block['holdout_init']\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
