"""--precision float32 (TPU's path): the factorizations against float64, on hard Grams and on the real stories260k."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import DATA, STORIES, compress_cli, require

import sigmascale_jax as ssj
from sigmascale_jax.compress.allocate.zs_svd import component_deltas, zs_whitening
from sigmascale_jax.compress.factorize.svd_llm import refit_left, svd_llm_group
from sigmascale_jax.linalg.lowrank import relative_activation_loss
from sigmascale_jax.linalg.precision import default_precision, factor_precision, precision_key, resolve_precision
from sigmascale_jax.linalg.whitening import WHITEN_CHOLESKY, WHITEN_SHIFTED, whitening


def outlier_gram(n: int, tokens: int, seed: int = 0) -> np.ndarray:
    """`X Xᵀ` of activations whose channels span 10⁷ in scale, with a few 100× louder still (as LLMs have)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, tokens)) * np.exp(rng.uniform(-4, 4, n))[:, None]
    x[:8] *= 100
    return x @ x.T


def test_default_precision_follows_the_backend():
    assert default_precision("tpu") == "float32"
    assert default_precision("cpu") == default_precision("gpu") == "float64"
    assert resolve_precision(None) == default_precision()
    with pytest.raises(ValueError, match="float16"):
        resolve_precision("float16")
    # float64 keys stay as they were before the choice existed (old runs resume, caches hit)
    assert precision_key("float64") == {} and precision_key("float32") == {"precision": "float32"}


@pytest.mark.parametrize("tokens,route", [(1024, WHITEN_CHOLESKY), (100, WHITEN_SHIFTED)])  # 100 < n: singular G
def test_float32_svd_llm_matches_float64_on_outlier_channels(tokens, route):
    n, m, k = 128, 96, 32
    g = outlier_gram(n, tokens)
    w = np.random.default_rng(1).standard_normal((m, n))
    with factor_precision("float64") as dt:
        _, _, loss64, routes64 = svd_llm_group(jnp.asarray(w[None], dt), jnp.asarray(g[None], dt), k)
    with factor_precision("float32") as dt:
        assert dt == jnp.float32
        s32, route32 = whitening(jnp.asarray(g, dt))
        b, c, loss32, routes32 = svd_llm_group(jnp.asarray(w[None], dt), jnp.asarray(g[None], dt), k)
        b, c = b[:, :, :k], c[:, :k]  # full-width, zero past the rank
        refit = refit_left(jnp.asarray(w, dt), jnp.asarray(g, dt), c[0])
    assert s32.dtype == b.dtype == refit.dtype == jnp.float32
    assert routes32 == routes64 == [route] and int(route32) == route
    s = np.asarray(s32, np.float64)
    scale = np.sqrt(np.outer(np.diag(g), np.diag(g)))  # entrywise relative to each pair of channels' scale
    assert np.max(np.abs(s @ s.T - g) / scale) < 1e-3
    with factor_precision("float64") as dt:  # the float32 factors' loss, measured exactly
        true32 = float(relative_activation_loss(jnp.asarray(w, dt), jnp.asarray(b[0], dt) @ jnp.asarray(c[0], dt),
                                                jnp.asarray(g, dt)))
        refit_loss = float(relative_activation_loss(jnp.asarray(w, dt), jnp.asarray(refit, dt) @ jnp.asarray(c[0], dt),
                                                    jnp.asarray(g, dt)))
    assert true32 == pytest.approx(float(loss64[0]), rel=1e-3)
    assert refit_loss == pytest.approx(float(loss64[0]), rel=1e-3)  # refitting on G itself changes nothing


def test_float32_zs_svd_deltas_match_float64():
    n, m = 64, 48
    g = outlier_gram(n, 512)
    rng = np.random.default_rng(2)
    w, grad = rng.standard_normal((m, n)), rng.standard_normal((m, n)) * 1e-3
    out = {}
    for precision in ("float64", "float32"):
        with factor_precision(precision) as dt:
            l, ok = zs_whitening(jnp.asarray(g, dt), tokens=512)
            sigma, delta = component_deltas(jnp.asarray(w, dt), jnp.asarray(grad, dt), l, triangular=bool(ok))
            assert delta.dtype == dt
            out[precision] = np.asarray(sigma, np.float64), np.asarray(delta, np.float64)
    np.testing.assert_allclose(out["float32"][0], out["float64"][0], rtol=1e-4)
    big = np.abs(out["float64"][1]) > 1e-3 * np.abs(out["float64"][1]).max()  # the Δ that decide the selection
    np.testing.assert_allclose(out["float32"][1][big], out["float64"][1][big], rtol=1e-2)


@pytest.fixture(scope="module")
def stories():
    from sigmascale_jax.eval.perplexity import make_windows
    from sigmascale_jax.io.data import perplexity_text

    cfg, params, source = ssj.load_model(str(require(STORIES)))
    windows = ssj.calibration_windows(source, "c4", data_dir=str(DATA), nsamples=12, seq_len=64, seed=0)
    ids = np.asarray(source.tokenizer()(perplexity_text("wikitext2", DATA)).input_ids, np.int32)
    return cfg, params, windows, make_windows(ids, 256, 4)


@pytest.mark.parametrize("method,settings", [("svd-llm", {"update": False}),
                                             ("sigmascale", {"steps": 4, "eval_every": 2, "step_windows": 4})])
def test_float32_compression_is_within_a_percent_of_float64(stories, monkeypatch, method, settings):
    cfg, params, windows, ev = stories
    plan = ssj.make_plan(method, **settings)
    c64, r64 = ssj.compress_params(params, cfg, windows, plan, 0.3, precision="float64")

    def refuse(*a, **k):
        raise AssertionError("a float32 compression turned on 64-bit arrays")

    with monkeypatch.context() as m:  # nothing in a float32 run may make a float64 array
        m.setattr(jax, "enable_x64", refuse)
        c32, r32 = ssj.compress_params(params, cfg, windows, plan, 0.3, precision="float32")
    assert (r64["precision"], r32["precision"]) == ("float64", "float32")
    assert [m["rank"] for m in r32["matrices"]] == [m["rank"] for m in r64["matrices"]]
    ppl64 = ssj.perplexity(c64, cfg, ev, progress=False)["ppl"]
    ppl32 = ssj.perplexity(c32, cfg, ev, progress=False)["ppl"]
    assert abs(ppl32 / ppl64 - 1) < 0.01, (ppl32, ppl64)


def test_precision_flag_is_checked(capsys, tmp_path):
    proc = compress_cli(capsys, "--model", str(STORIES), "--method", "svd-llm", "--ratio", "0.3",
                        "--precision", "float16", "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "--precision" in proc.stderr and "float16" in proc.stderr
    assert not (tmp_path / "out").exists()
