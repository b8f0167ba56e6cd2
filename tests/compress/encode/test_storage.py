"""How what is left is stored: PivGa (lossless, k(m+n) − k² numbers) and int8/int4 quantized matrices, in bytes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import DATA, STORIES, assert_one_line_error, compress_cli, eval_cli, require

import sigmascale_jax
from sigmascale_jax.compress.encode.pivga import PivGa, pivga_from_factors, pivga_leaf
from sigmascale_jax.compress.encode.quant import quantize
from sigmascale_jax.model.leaves import LowRank

SMALL = dict(nsamples=12, seq_len=64, batch_size=4, data_dir=str(DATA), progress=False)


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("st") / "plain"
    report = sigmascale_jax.compress(str(require(STORIES)), "svd-llm", 0.3, out, **SMALL)
    return out, report


# ------------------------------------------------------------------ PivGa


def test_pivga_reconstructs_random_factors_and_stores_k_m_plus_n_minus_k_squared():
    rng = np.random.default_rng(0)
    for m, n, k in ((40, 70, 13), (70, 40, 25), (32, 32, 32), (50, 20, 20)):
        b, c = rng.normal(size=(m, k)), rng.normal(size=(k, n))
        leaf = pivga_leaf(b, c)
        assert isinstance(leaf, PivGa) and leaf.num_params == k * (m + n) - k * k
        assert leaf.b.size + leaf.r.size == k * (m + n) - k * k
        ref = (b @ c).astype(np.float32)
        np.testing.assert_allclose(np.asarray(leaf.matrix()), ref, atol=1e-5 * np.abs(ref).max())
        x = rng.normal(size=(3, 5, n)).astype(np.float32)
        np.testing.assert_allclose(np.asarray(leaf.apply(jnp.asarray(x))), x @ ref.T, atol=1e-4 * np.abs(x @ ref.T).max())


def test_pivoting_keeps_r_bounded_on_an_ill_conditioned_c():
    rng = np.random.default_rng(1)
    k, n = 12, 60
    c = rng.normal(size=(k, n))
    c[:, 1] = c[:, 0] + 1e-9 * rng.normal(size=k)  # the first k columns are nearly dependent
    c[:, 2:k] *= 1e-6
    b = rng.normal(size=(30, k))
    bp, r, perm = pivga_from_factors(b, c)
    naive = np.linalg.solve(c[:, :k], c[:, k:])  # the gauge without pivoting: first k columns
    assert np.abs(naive).max() > 1e5 and np.abs(r).max() < 10
    leaf = pivga_leaf(b, c)
    ref = b @ c
    np.testing.assert_allclose(np.asarray(leaf.matrix()), ref, atol=1e-5 * np.abs(ref).max())
    assert sorted(perm) == list(range(n))


def test_pivga_model_logits_equal_the_plain_model(plain_run):
    from sigmascale_jax.io.sources import load_model
    from sigmascale_jax.model.modeling import forward_jit

    out, _ = plain_run
    cfg, params, source = load_model(str(out))
    piv = {**params, "blocks": []}
    for block in params["blocks"]:
        new = dict(block)
        for n in ("q", "k", "v", "o", "gate", "up", "down"):
            leaf = block[n]
            assert isinstance(leaf, LowRank)
            new[n] = pivga_leaf(leaf.b, leaf.c)
        piv["blocks"].append(new)
    tokens = jnp.asarray(source.tokenizer()("Once upon a time there was a tiny robot who wanted to sing.").input_ids)[None]
    a, b = np.asarray(forward_jit(params, tokens, cfg)), np.asarray(forward_jit(piv, tokens, cfg))
    assert np.abs(a).max() > 1 and np.abs(a - b).max() <= 1e-4


def test_pivga_keeps_more_components_at_the_same_size():
    from sigmascale_jax.compress.allocate.uniform import largest_rank
    from sigmascale_jax.compress.encode.pivga import pivga_params
    from sigmascale_jax.compress.plan import Budget
    from sigmascale_jax.compress.ranks import factored_params, uniform_rank

    assert uniform_rank(576, 576, 0.2) == 230 == largest_rank(576, 576, Budget(0.2, factored_params))
    assert largest_rank(576, 576, Budget(0.2, pivga_params)) == 318  # the example
    for m, n in ((576, 576), (192, 576), (1536, 576)):  # never stored larger than dense: no break-even
        assert all(pivga_params(m, n, k) <= m * n for k in range(1, min(m, n) + 1))


# ------------------------------------------------------------------ quantization


@pytest.mark.parametrize("kind,group", [("int8", 128), ("int8", 7), ("int4", 64), ("int4", 10)])
def test_round_trip_error_is_within_half_a_step(kind, group):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(37, 301)) * rng.uniform(0.01, 3, size=(37, 1))
    x[:, 5] = 0.0
    q = quantize(x, kind, group)
    back = np.asarray(q.dequantize(), np.float64)
    assert back.shape == x.shape
    steps = np.repeat(np.asarray(q.scale, np.float64), group, axis=1)[:, : x.shape[1]]
    err = np.abs(back - x)
    assert (err <= steps / 2 * (1 + 1e-5) + 1e-7).all()
    assert (err > steps / 4).any()  # it does round (the bound is not vacuous)
    bits = 8 if kind == "int8" else 4
    assert np.dtype(q.values.dtype) == (np.int8 if bits == 8 else np.uint8)
    assert q.values.shape[1] == (x.shape[1] if bits == 8 else (x.shape[1] + 1) // 2)  # no padding stored


def test_quantized_compression_saves_loads_and_counts_bytes(tmp_path, plain_run):
    from sigmascale_jax.compress.encode.quant import QuantMatrix
    from sigmascale_jax.io.checkpoint import load_pytree
    from sigmascale_jax.io.sources import load_model
    from sigmascale_jax.model.modeling import forward_jit

    _, ref = plain_run
    reports = {}
    for enc, quant in (("pivga", "int4"), ("plain", "int8")):
        out = tmp_path / f"{enc}-{quant}"
        reports[enc, quant] = r = sigmascale_jax.compress(str(STORIES), "svd-llm", 0.3, out, encoding=enc,
                                                          quantize=quant, group_size=32, **SMALL)
        assert sum(m["bytes"] for m in r["matrices"]) == r["bytes"]["compressible_compressed"]
        assert all(m["encoding"] == enc and m["quantize"] == quant and m["group_size"] == 32 for m in r["matrices"])
        cfg, params, source = load_model(str(out))
        leaf = params["blocks"][1]["down"]
        assert isinstance(leaf.b, QuantMatrix) and leaf.b.bits == (4 if quant == "int4" else 8)
        raw = load_pytree(out / "params")["blocks"][1]["down"]["b"]
        assert raw["values"].dtype == (np.uint8 if quant == "int4" else np.int8)  # packed as stored
        np.testing.assert_array_equal(np.asarray(raw["values"]), leaf.b.values.numpy())
        tokens = jnp.asarray(source.tokenizer()("The little dog ran to the park.").input_ids)[None]
        assert np.isfinite(np.asarray(forward_jit(params, tokens, cfg))).all()
    i4, i8 = reports["pivga", "int4"], reports["plain", "int8"]
    assert i8["params"]["compressible_compressed"] == ref["params"]["compressible_compressed"]  # same numbers,
    assert i8["bytes"]["compressible_compressed"] < 0.3 * ref["bytes"]["compressible_compressed"]  # a quarter of bytes
    assert i4["byte_ratio"] > i8["byte_ratio"] > ref["byte_ratio"] == pytest.approx(ref["ratio_achieved"])
    assert i4["ratio_achieved"] >= 0.3  # pivga: more components in the same numbers, the budget still met


@pytest.mark.parametrize("extra,fragment", [
    (["--group-size", "64"], "--group-size sets the quantization groups"),
    (["--quantize", "int4", "--group-size", "33"], "must be even"),
    (["--quantize", "int3"], "invalid choice: 'int3'"),
    (["--encoding", "magic"], "invalid choice: 'magic'"),
])
def test_bad_storage_combinations_are_one_line_errors(tmp_path, capsys, extra, fragment):
    proc = compress_cli(capsys, "--model", str(STORIES), "--method", "svd-llm", "--ratio", "0.3",
                        "--out", str(tmp_path / "o"), *extra)
    assert_one_line_error(proc, fragment)
    assert list(tmp_path.iterdir()) == []


def test_eval_quantizes_dense_models_only(capsys, plain_run):
    out, _ = plain_run
    assert_one_line_error(eval_cli(capsys, "--model", str(out), "--quantize", "int8", "--max-windows", "1"),
                          "is a compressed model")
    assert_one_line_error(eval_cli(capsys, "--model", str(STORIES), "--group-size", "64"), "needs --quantize")


def test_reencoding_a_folder_equals_compressing_with_that_encoding(tmp_path):
    from sigmascale_jax.compress.reencode import reencode
    from sigmascale_jax.io.checkpoint import load_pytree

    kw = dict(encoding="pivga", **SMALL)
    sigmascale_jax.compress(str(STORIES), "svd-llm", 0.3, tmp_path / "f32", **kw)
    direct = sigmascale_jax.compress(str(STORIES), "svd-llm", 0.3, tmp_path / "direct", quantize="int8", **kw)
    again = reencode(tmp_path / "f32", tmp_path / "again", quantize="int8")
    assert again["bytes"] == direct["bytes"] and again["reencoded_from"] == str(tmp_path / "f32")
    a, b = load_pytree(tmp_path / "again" / "params"), load_pytree(tmp_path / "direct" / "params")
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    with pytest.raises(sigmascale_jax.errors.UserError, match="quantized"):
        reencode(tmp_path / "direct", tmp_path / "twice", quantize="int4")
