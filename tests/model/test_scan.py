"""The decoder as one loop: stacked blocks run as a `lax.scan` and give the unrolled program's logits on every form
of compressed tree; mixed ranks padded to one width are the same model; the streamed KL is the whole-sequence KL."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import DATA, STORIES, require

import sigmascale_jax as ssj
from sigmascale_jax.model import modeling, stacking


@pytest.fixture(scope="module")
def stories():
    cfg, params, source = ssj.load_model(str(require(STORIES)))
    windows = ssj.calibration_windows(source, "c4", nsamples=8, seq_len=64, seed=0, data_dir=str(DATA))
    return cfg, jax.device_get(params), windows


def mixed_ranks(cfg, seed: int = 0):
    """An allocator giving every matrix its own rank (some kept dense): the hardest case for compile-once code."""
    from sigmascale_jax.compress.plan import Allocation, RankAllocator
    from sigmascale_jax.compress.ranks import break_even_rank

    rng = np.random.default_rng(seed)
    shapes = cfg.projection_shapes()

    def allocate(ctx, budget):
        ranks = [{p: int(rng.integers(1, break_even_rank(*shapes[p]))) for p in shapes} for _ in range(cfg.num_layers)]
        ranks[1]["v"] = None  # one matrix kept dense
        return Allocation(ranks, {})

    return RankAllocator("mixed", ssj.make_plan("svd").allocate.settings, allocate, costly=False)


@pytest.mark.parametrize("form", ["dense", "plain", "pivga", "int8", "mixed-plain"])
def test_scan_and_unrolled_forwards_give_the_same_logits(stories, form):
    cfg, params, windows = stories
    if form == "dense":
        tree = params
    elif form == "mixed-plain":  # ranks differ per block: padded to stack (one matrix dense)
        tree, _ = ssj.compress_params(params, cfg, windows, ssj.make_plan("svd-llm", ranks=mixed_ranks(cfg)), 0.3)
    else:
        kw = {"pivga": {"encoding": "pivga"}, "int8": {"quantize": "int8"}}.get(form, {})
        tree, _ = ssj.compress_params(params, cfg, windows, ssj.make_plan("svd-llm", **kw), 0.3)
    tokens = windows[:2]
    fwd = jax.jit(ssj.forward, static_argnames=("cfg", "scan", "pad"))
    unrolled = np.asarray(fwd(tree, tokens, cfg=cfg, scan=False))
    scanned = np.asarray(fwd(tree, tokens, cfg=cfg))
    stacked = np.asarray(fwd(modeling.stack_params(tree), tokens, cfg=cfg))
    scale = np.abs(unrolled).max()
    assert np.abs(scanned - unrolled).max() <= 1e-5 * scale
    assert np.abs(stacked - unrolled).max() <= 1e-5 * scale
    if form != "mixed-plain":
        assert stacking.stack_blocks(tree["blocks"], pad=False) is not None  # equal shapes stack as they are
        return
    assert stacking.stack_blocks(tree["blocks"], pad=False) is None  # mixed ranks need padding
    overhead = stacking.padding_overhead(tree["blocks"])
    assert overhead > stacking.PAD_TOLERANCE  # random ranks: padding would add more work than it may
    assert stacking.stack_blocks(tree["blocks"]) is None  # so they run unrolled (the scanned forward above)
    stacked = stacking.stack_blocks(tree["blocks"], tolerance=overhead)  # padded to each projection's widest rank
    width = max(b["q"].b.shape[1] for b in tree["blocks"])
    assert stacked["q"].b.shape == (cfg.num_layers, tree["blocks"][0]["q"].b.shape[0], width)
    assert isinstance(stacked["v"], stacking.Switched)  # v is dense in block 1 only: dense beside factored
    back = stacking.unstack_blocks(stacked, like=tree["blocks"])  # each block's own form and rank, exactly
    for a, b in zip(back, tree["blocks"]):
        assert jax.tree.structure(a) == jax.tree.structure(b)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    padded = np.asarray(fwd({**tree, "blocks": stacked}, tokens, cfg=cfg))  # the padded scan: the same model
    assert np.abs(padded - unrolled).max() <= 1e-5 * scale


def test_padded_factors_keep_zero_gradients(stories):
    """Zero columns of B and rows of C get zero gradient: training a padded stack never fills the padding."""
    cfg, params, windows = stories
    tree, _ = ssj.compress_params(params, cfg, windows, ssj.make_plan("svd", ranks=mixed_ranks(cfg, seed=1)), 0.4)
    blocks = tree["blocks"]
    stacked = {**tree, "blocks": stacking.stack_blocks(blocks, tolerance=float("inf"))}
    grads = jax.grad(lambda p: jnp.sum(ssj.forward(p, windows[:2], cfg) ** 2))(stacked)["blocks"]
    factored = [i for i, b in enumerate(blocks) if hasattr(b["v"], "b")]
    assert np.all(np.asarray(grads["v"].b)[[i for i in range(len(blocks)) if i not in factored]] == 0)
    for name in ("q", "down"):
        ks = [b[name].b.shape[1] for b in blocks]
        for i, k in enumerate(ks):
            assert np.all(np.asarray(grads[name].b[i, :, k:]) == 0) and np.all(np.asarray(grads[name].c[i, k:]) == 0)
        assert np.abs(np.asarray(grads[name].b)).max() > 0


def test_attention_segments_cover_every_chunk_once():
    for t in (1, 127, 128, 129, 512, 700, 2048, 4099):
        segs = modeling.segments(t)
        chunks = [c for first, count, _ in segs for c in range(first, first + count)]
        assert chunks == list(range(-(-t // modeling.ATTENTION_CHUNK)))
        assert len(segs) <= modeling.ATTENTION_SEGMENTS
        assert all(keys >= min((first + count) * modeling.ATTENTION_CHUNK, t) for first, count, keys in segs)


def test_long_sequences_match_the_unchunked_attention(stories):
    """T = 300: three chunks, one of them short, in scans: the same as attending to everything under a causal mask."""
    cfg, params, _ = stories
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, cfg.num_kv_heads, cfg.group_size, 300, cfg.head_dim)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((1, cfg.num_kv_heads, 300, cfg.head_dim)), jnp.float32) for _ in "kv")
    got = modeling.attention_core(q, k, v, cfg)
    mask = jnp.tril(jnp.ones((300, 300), bool))
    ref = modeling._attend(q, k, v, mask, cfg.head_dim, False)
    ref = ref.transpose(0, 3, 1, 2, 4).reshape(1, 300, -1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-6)


def test_streamed_kl_equals_the_whole_sequence_kl_and_its_gradient():
    from sigmascale_jax.compress.refine.heal import streamed_kl_ce

    rng = np.random.default_rng(0)
    b, t, d, v = 2, 45, 16, 37
    hs, ht = (jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32) for _ in range(2))
    head_s, head_t = (jnp.asarray(rng.standard_normal((v, d)) * 0.3, jnp.float32) for _ in range(2))
    tokens = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)

    def full(hs, head_s):
        student = jax.nn.log_softmax(hs @ head_s.T, axis=-1)
        teacher = jax.nn.log_softmax(ht @ head_t.T, axis=-1)
        kl = jnp.mean(jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1))
        ce = -jnp.mean(jnp.take_along_axis(student[:, :-1], tokens[:, 1:, None], axis=-1))
        return kl + 0.3 * ce

    def streamed(hs, head_s):
        kl, ce = streamed_kl_ce(hs, ht, head_s, head_t, tokens, chunk=7)  # 45 = 6 chunks of 7 + 3
        return kl + 0.3 * ce

    want, got = full(hs, head_s), streamed(hs, head_s)
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    for gw, gg in zip(jax.grad(full, argnums=(0, 1))(hs, head_s), jax.grad(streamed, argnums=(0, 1))(hs, head_s)):
        np.testing.assert_allclose(np.asarray(gg), np.asarray(gw), rtol=1e-5, atol=1e-5 * float(jnp.abs(gw).max()))
