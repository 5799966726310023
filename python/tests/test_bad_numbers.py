"""Issue 15, "silently wrong numbers", through the C ABI from Python: a weight of tiny or huge
magnitude decomposes exactly (the SVD is scale-invariant), and a weight the layer's f32 factors
cannot hold raises SVD_FAILED with the figure in the message, never a layer with wrong numbers.
Run: scripts/test-python.sh -k bad_numbers."""

import numpy as np
import pytest

from svft import Layer, SvftError

TOL = 1e-5  # f32 vs f64, relative Frobenius (SVFT.md section 4)


def _weight(d_out, d_in, seed, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal((d_out, d_in)).astype(dtype)


def _rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / np.linalg.norm(want)


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_tiny_and_huge_weights_decompose_exactly(scale):
    w = (_weight(37, 23, 1) * np.float32(scale)).astype(np.float32)
    layer = Layer.from_weight(w, "plain", "zero")
    assert layer.svd_residual < TOL, layer.svd_residual
    x = _weight(5, 23, 2)
    # M = 0, no gate: the layer is W0.
    want = x.astype(np.float64) @ w.astype(np.float64).T
    assert _rel_err(layer.forward(x), want) < TOL
    # Truncated: the residual is what the spectrum predicts.
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    layer = Layer.from_weight(w, "plain", "zero", rank=10)
    predicted = np.sqrt((s[10:] ** 2).sum() / (s**2).sum())
    assert abs(layer.svd_residual - predicted) < TOL, (layer.svd_residual, predicted)


def _svd_failed(w, **kw):
    with pytest.raises(SvftError) as info:
        Layer.from_weight(w, "plain", "zero", **kw)
    assert info.value.status == "SVD_FAILED", (info.value.status, info.value.message)
    return info.value.message


def test_weights_f32_cannot_hold_raise_with_the_figure():
    w = _weight(37, 23, 3, np.float64) * 1e-200
    s0 = np.linalg.svd(w / 1e-200, compute_uv=False)[0] * 1e-200
    msg = _svd_failed(w, rank=4)
    assert "largest singular value" in msg and f"e{int(np.floor(np.log10(s0)))}" in msg, msg
    assert "all zeros" in _svd_failed(np.zeros((6, 5), np.float32))
