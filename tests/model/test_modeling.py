"""Dense, factored and mixed projections in one code path; the NNX module; composition with jit/grad/vmap."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from conftest import STORIES, require
from flax import nnx

from sigmascale_jax.io.sources import load_model
from sigmascale_jax.model.modeling import Decoder, forward, forward_jit, project


def full_rank_factors(w: jax.Array) -> dict:
    """`w = B C` exactly (up to rounding), via SVD at full rank."""
    u, s, vt = np.linalg.svd(np.asarray(w, dtype=np.float64), full_matrices=False)
    return {"b": jnp.asarray(u * np.sqrt(s), jnp.float32), "c": jnp.asarray(np.sqrt(s)[:, None] * vt, jnp.float32)}


def test_factored_projection_applies_b_after_c():
    rng = np.random.default_rng(0)
    b, c, x = rng.standard_normal((5, 2)), rng.standard_normal((2, 7)), rng.standard_normal((3, 7))
    bias = rng.standard_normal(5)
    y = project({"b": jnp.asarray(b), "c": jnp.asarray(c), "bias": jnp.asarray(bias)}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), x @ (b @ c).T + bias, rtol=1e-5)


def test_mixed_dense_and_factored_model_runs_the_same_code_path():
    cfg, params, _ = load_model(str(require(STORIES)))
    mixed = jax.tree.map(lambda a: a, params)
    mixed["blocks"][0]["q"] = full_rank_factors(params["blocks"][0]["q"]["w"])
    mixed["blocks"][2]["down"] = full_rank_factors(params["blocks"][2]["down"]["w"])
    ids = jnp.asarray(np.arange(30)[None] % cfg.vocab_size)
    np.testing.assert_allclose(forward_jit(mixed, ids, cfg), forward_jit(params, ids, cfg), atol=1e-4)
    # a low-rank factor really changes the output
    u = full_rank_factors(params["blocks"][2]["down"]["w"])
    mixed["blocks"][2]["down"] = {"b": u["b"][:, :4], "c": u["c"][:4]}
    assert np.abs(np.asarray(forward_jit(mixed, ids, cfg) - forward_jit(params, ids, cfg))).max() > 1e-2


def test_nnx_decoder_matches_forward_and_splits():
    cfg, params, _ = load_model(str(require(STORIES)))
    model = Decoder(cfg, params)
    ids = jnp.asarray(np.arange(20)[None] % cfg.vocab_size)
    np.testing.assert_allclose(np.asarray(model(ids)), np.asarray(forward_jit(params, ids, cfg)), atol=1e-4)
    graphdef, state = nnx.split(model)
    assert len(jax.tree.leaves(state)) == len(jax.tree.leaves(params))

    @nnx.jit
    def run(m, t):
        return m(t)

    np.testing.assert_allclose(np.asarray(run(model, ids)), np.asarray(model(ids)), atol=1e-5)


def test_forward_composes_with_grad_and_vmap():
    cfg, params, _ = load_model(str(require(STORIES)))
    ids = jnp.asarray(np.arange(16)[None] % cfg.vocab_size)

    def loss(scale):
        p = dict(params, final_norm=params["final_norm"] * scale)
        return forward(p, ids, cfg).mean()

    g = jax.jit(jax.grad(loss))(1.0)
    eps = 1e-3
    fd = (loss(1.0 + eps) - loss(1.0 - eps)) / (2 * eps)
    assert np.isfinite(g) and abs(float(g) - float(fd)) < 1e-2 * max(1.0, abs(float(fd)))
    batched = jax.vmap(lambda t: forward(params, t[None], cfg)[0])(jnp.concatenate([ids, ids[:, ::-1]]))
    np.testing.assert_allclose(np.asarray(batched[0]), np.asarray(forward_jit(params, ids, cfg)[0]), atol=1e-5)
