"""GPTQ against round-to-nearest and against a slow reference written from the paper's update rule."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from sigmascale_jax.compress.encode.quant import QuantSettings, quantize, quantize_gptq
from sigmascale_jax.linalg.gptq import gptq
from sigmascale_jax.linalg.grid import Grid


def correlated_gram(cols: int, seed: int = 0, tokens: int = 800) -> np.ndarray:
    """The Gram of inputs with correlated channels and a few loud ones (what LLM activations look like)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(tokens, cols)) @ rng.normal(size=(cols, cols)) * 0.3 + rng.normal(size=(tokens, cols))
    x[:, rng.choice(cols, 3, replace=False)] *= 8.0
    return x.T @ x


def output_error(w: np.ndarray, w_hat: np.ndarray, gram: np.ndarray) -> float:
    d = np.asarray(w_hat, np.float64) - w
    return float(np.trace(d @ gram @ d.T))


@pytest.mark.parametrize("kind", ["int8", "int4", "int3"])
def test_gptq_has_lower_output_error_than_round_to_nearest(kind):
    rng = np.random.default_rng(1)
    w = rng.normal(size=(48, 150))
    gram = correlated_gram(150)
    rtn = output_error(w, quantize(w, kind, 32).dequantize(), gram)
    for act_order in (False, True):
        q = quantize_gptq(w, gram, kind, 32, act_order=act_order)
        assert output_error(w, q.dequantize(), gram) < 0.75 * rtn
        assert q.nbytes == quantize(w, kind, 32).nbytes  # the same format: only the choice of codes differs


def slow_gptq(w, gram, bits, group, damp, act_order):
    """GPTQ as the paper states it, one column at a time with the explicit inverse Hessian and its OBS downdate
    (no Cholesky, no blocks), float64 numpy: unsigned codes [rows, cols]."""
    w = np.array(w, np.float64)
    h = np.array(gram, np.float64)
    rows, cols = w.shape
    dead = np.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    qmax = 2**bits - 1

    def params(x):  # one group's scale and zero point per row
        if bits == 8:
            s = np.abs(x).max(1) / 127.0
            return np.where(s > 0, s, 1.0), np.zeros(rows)
        lo, hi = np.minimum(x.min(1), 0.0), np.maximum(x.max(1), 0.0)
        s = (hi - lo) / qmax
        s = np.where(s > 0, s, 1.0)
        return s, np.clip(np.round(-lo / s), 0, qmax)

    def rnd(x, s, z):
        if bits == 8:
            q = np.clip(np.round(x / s), -127, 127)
            return q, q * s
        q = np.clip(np.round(x / s) + z, 0, qmax)
        return q, (q - z) * s

    order = np.argsort(-np.diagonal(h), kind="stable") if act_order else np.arange(cols)
    static = {g: params(w[:, g * group:(g + 1) * group]) for g in range(-(-cols // group))}
    hinv = np.linalg.inv(h + damp * np.mean(np.diagonal(h)) * np.eye(cols))
    groups, codes = dict(static), np.zeros((rows, cols), np.int64)
    left = list(order)
    for col in order:
        g = col // group
        if not act_order and col % group == 0:  # a group's scale from its columns as they stand now
            groups[g] = params(w[:, col:col + group])
        q, value = rnd(w[:, col], *groups[g])
        codes[:, col] = q
        err = (w[:, col] - value) / hinv[col, col]
        left.remove(col)
        w[:, left] -= np.outer(err, hinv[col, left])
        hinv = hinv - np.outer(hinv[:, col], hinv[col, :]) / hinv[col, col]
    return codes


@pytest.mark.parametrize("bits,act_order", [(4, False), (4, True), (3, True), (8, False)])
def test_gptq_equals_the_slow_reference(bits, act_order):
    rng = np.random.default_rng(bits)
    w = rng.normal(size=(24, 72)) * rng.uniform(0.2, 2.0, size=(24, 1))
    gram = correlated_gram(72, seed=bits)
    gram[5, :] = gram[:, 5] = 0.0  # an input that never fires
    with jax.enable_x64(True):  # both in float64: the same codes, not just close ones
        got = gptq(w, gram, Grid(bits, 16), damp=0.01, act_order=act_order)
        codes = np.asarray(got.codes)
    want = slow_gptq(w, gram, bits, 16, 0.01, act_order)
    np.testing.assert_array_equal(codes, want)


def test_an_identity_gram_gives_round_to_nearest():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(16, 100))
    for kind in ("int8", "int4", "int3"):
        for act_order in (False, True):
            got = quantize_gptq(w, np.eye(100), kind, 32, damp=0.0, act_order=act_order)
            want = quantize(w, kind, 32)
            np.testing.assert_array_equal(got.values.numpy(), want.values.numpy())
            # the same scales up to float32 rounding (computed per block inside the loop, or all at once)
            np.testing.assert_allclose(np.asarray(got.scale), np.asarray(want.scale), rtol=1e-6)


def test_sequential_orders_keep_the_factor_errors_from_multiplying():
    """B·C with one factor rounded first and the other refit to it and rounded after: lower output error than each
    factor rounded alone (GPTQ or RTN). Which of the two orders is better depends on the matrix
    (`scripts/quant_error.py` measures them on SmolLM2); "best" keeps the better per matrix."""
    rng = np.random.default_rng(4)
    m, n, k = 64, 96, 24
    gram = correlated_gram(n, seed=4)
    u, _, vt = np.linalg.svd(rng.normal(size=(m, n)), full_matrices=False)
    b, c = u[:, :k] * np.linspace(3, 0.5, k), vt[:k]
    settings = QuantSettings(quantize="int4", quantizer="gptq", group_size=16)
    errors = {}
    for order in ("inner-first", "independent", "outer-first", "best"):
        (qb, qc), info = settings.store_pair(b, c, gram, order=order)
        errors[order] = output_error(b @ c, np.asarray(qb.dequantize()) @ np.asarray(qc.dequantize()), gram)
    rtn = QuantSettings(quantize="int4", group_size=16)
    errors["rtn"] = output_error(b @ c, np.asarray(rtn.store(b).dequantize()) @ np.asarray(rtn.store(c).dequantize()),
                                 gram)
    assert max(errors["inner-first"], errors["outer-first"]) < errors["independent"] < errors["rtn"], errors
    assert errors["best"] == min(errors["inner-first"], errors["outer-first"])
    assert info["gptq_order_used"] in ("inner-first", "outer-first")
    assert info["output_error"] == min(info["output_error_orders"].values())


@pytest.mark.parametrize("bits", [8, 4])
def test_grid_rounding_equals_qwix_quantize(bits):
    """`Grid.codes` rounds to given scales with qwix's formula (qwix's own entry point for that is private): on the
    scales qwix computes for a matrix, it gives qwix.quantize's codes exactly."""
    import jax.numpy as jnp
    import qwix

    from sigmascale_jax.linalg.grid import _INT8_CALIBRATION, Grid

    grid = Grid(bits, 32)
    x = jnp.asarray(np.random.default_rng(bits).standard_normal((40, 96)) * 3, jnp.float32)
    q = qwix.quantize(x, grid.qtype, channelwise_axes=(0,), tiled_axes={1: 32},
                      calibration_method=_INT8_CALIBRATION if bits == 8 else "minmax")
    scale, zero = grid.params(x)
    ours = np.asarray(grid.codes(x, scale, zero)) - grid.offset
    np.testing.assert_array_equal(ours, np.asarray(q.qvalue.astype(jnp.int32)))
