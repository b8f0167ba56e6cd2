"""stacked_map: vmap's results without batched LAPACK calls on CPU, and the SigmaScale hang it prevents."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


# The SigmaScale hang stacked_map prevents (vmapped SVDs at SmolLM2's sizes hung XLA:CPU after step 1) is checked
# where SmolLM2's block scales are learned anyway, in a process of its own with a timeout:
# tests/compress/factorize/test_sigmascale.py::test_gram_eigh_learns_what_the_svd_path_learns_on_a_smollm2_block
