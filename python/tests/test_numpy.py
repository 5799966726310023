"""NumPy tests of the svft package on the CPU backend: forward/backward/merge against a NumPy
f64 reference, construction paths, parameters, and errors. Run: scripts/test-python.sh (installs
the package into its venv, then runs pytest on python/tests)."""

from _support import reference, rel_err

import numpy as np

import svft
from svft import Layer, SvftError

TOL = 1e-5  # f32 vs f64, relative Frobenius (SVFT.md section 4)


def _weight(d_out, d_in, seed, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal((d_out, d_in)).astype(dtype)


def _check(layer, x, gy, bias=None, what=""):
    w, fwd, bwd = reference(layer, bias=bias)
    y = layer.forward(x)
    dx, dm, dgamma = layer.backward(gy)
    dx_ref, dm_ref, dgamma_ref = bwd(x, gy)
    assert y.shape == x.shape[:-1] + (layer.d_out,) and dx.shape == x.shape
    assert rel_err(y, fwd(x)) < TOL, (what, "y", rel_err(y, fwd(x)))
    assert rel_err(dx.reshape(-1, layer.d_in), dx_ref) < TOL, (what, "dx")
    assert rel_err(dm, dm_ref) < TOL, (what, "dm", rel_err(dm, dm_ref))
    if layer.gate:
        scale = abs(dgamma_ref) + 1e-3 * np.abs(dm_ref).sum()
        assert abs(dgamma - dgamma_ref) <= 1e-4 * scale, (what, "dgamma", dgamma, dgamma_ref)
    else:
        assert dgamma == 0.0
    assert rel_err(layer.merge(), w) < TOL, (what, "merge")


def test_version_and_backends():
    assert svft.version().count(".") == 2
    assert svft.backend_available("cpu")
    assert isinstance(svft.backend_available("cuda"), bool)


def test_forward_backward_every_pattern_and_plan():
    rng = np.random.default_rng(0)
    cases = [
        (12, 9, None, "plain", "zero", False),
        (13, 17, None, "banded:2", "official", True),
        (16, 11, 8, "random:2:seed=5", "official", True),  # duplicates possible
        (10, 10, None, "topk:1", "official", False),
        (10, 10, None, "topk:2:official", "official", True),
    ]
    for d_out, d_in, rank, pattern, init, gate in cases:
        bias = rng.standard_normal(d_out).astype(np.float32)
        with Layer.from_weight(_weight(d_out, d_in, 1), pattern, init, gate, bias=bias, rank=rank, seed=3) as layer:
            if gate:
                layer.gamma = 0.4
            layer.coefficients = rng.standard_normal(layer.nnz).astype(np.float32) * 0.3
            for plan in ("factored", "merged", "auto"):
                layer.set_plan(plan)
                for n in (1, 5, 40):
                    x = rng.standard_normal((n, d_in)).astype(np.float32)
                    gy = rng.standard_normal((n, d_out)).astype(np.float32)
                    _check(layer, x, gy, bias, f"{pattern} {plan} n={n}")


def test_batched_leading_dims():
    rng = np.random.default_rng(1)
    with Layer.from_weight(_weight(8, 6, 2), "banded:1", "official", True) as layer:
        x = rng.standard_normal((2, 3, 6)).astype(np.float32)
        gy = rng.standard_normal((2, 3, 8)).astype(np.float32)
        _check(layer, x, gy)


def test_zero_init_reproduces_weight_and_svd():
    for dtype in (np.float32, np.float64, np.float16):
        w = _weight(9, 7, 3, dtype)
        with Layer.from_weight(w, "banded:1") as layer:
            assert (layer.rank, layer.nnz, layer.trainable_params) == (7, 19, 19)
            assert layer.svd_residual < 1e-5
            assert np.all(layer.coefficients == 0) and layer.gamma == 0.0
            assert rel_err(layer.merge(), w.astype(np.float64)) < 1e-5, dtype


def test_official_init_statistics_and_gate():
    with Layer.from_weight(_weight(64, 64, 4), "banded:4", "official", True, seed=9) as layer:
        m = layer.coefficients
        assert layer.trainable_params == layer.nnz + 1
        assert abs(m.std() - np.sqrt(2.0 / layer.nnz)) < 0.1 * np.sqrt(2.0 / layer.nnz)
        # gamma = 0 -> g = 0.5: merge = U (diag(s) + 0.5 M) V^T, not W0
        w, _, _ = reference(layer)
        assert rel_err(layer.merge(), w) < TOL


def test_from_factors_round_trip():
    rng = np.random.default_rng(5)
    with Layer.from_weight(_weight(10, 8, 6), "random:1:seed=2", "official", True) as a:
        a.gamma = -0.3
        u, s, v = a.factors()
        with Layer.from_factors(u, s, v, "random:1:seed=2", gate=True) as b:
            assert all(np.array_equal(p, q) for p, q in zip(a.indices(), b.indices()))
            b.coefficients, b.gamma = a.coefficients, a.gamma
            x = rng.standard_normal((4, 8)).astype(np.float32)
            np.testing.assert_array_equal(a.forward(x), b.forward(x))
            assert np.isnan(b.svd_residual)


def test_calibration_picks_a_measured_plan():
    with Layer.from_weight(_weight(33, 21, 3), "banded:1") as layer:
        assert layer.plan_for(8) in ("factored", "merged")
        layer.calibrate(tokens=[1, 8, 64], seconds=0.0, use_cache=False)
        assert layer.plan_for(8) in ("factored", "merged")
        layer.set_plan("merged")
        assert layer.plan_for(8) == "merged", "a fixed plan overrides the calibration"
        layer.set_plan("small-n")
        assert layer.plan_for(8) == "small-n"
        _raises("SHAPE", layer.calibrate, [0], 0.0, False)


def test_memory_query():
    with Layer.from_weight(_weight(32, 24, 7), "banded:2") as layer:
        layer.set_plan("factored")
        mem = layer.memory(10)
        assert mem["saved"] == 4 * 10 * 24
        assert mem["workspace"] >= mem["saved"] and mem["persistent"] > 4 * (32 + 24) * 24
        layer.set_plan("merged")
        assert layer.memory(10)["saved"] == 4 * 10 * 24  # X is n x d_in = 10 x 24 too


def _raises(status, fn, *args):
    try:
        fn(*args)
    except SvftError as e:
        assert e.status == status, (e.status, status, e.message)
        assert e.message, "empty message"
        return e
    raise AssertionError(f"expected {status}")


def test_errors():
    w = _weight(6, 5, 8)
    _raises("PATTERN", Layer.from_weight, w, "bogus")
    _raises("PATTERN", Layer.from_weight, w, "banded:7")
    _raises("NON_FINITE", Layer.from_weight, np.full((3, 3), np.nan, np.float32))
    _raises("SHAPE", Layer.from_weight, w, "plain", "zero", False, np.zeros(4, np.float32))
    _raises("INVALID_ARGUMENT", Layer.from_weight, w, "plain", "zero", False, None, 9)
    # On CUDA the checks that need no device come first; then a host pointer is refused as
    # such with a device, or the backend is unavailable (with the probe's reason) without one.
    _raises("NULL_POINTER", Layer.from_weight_ptr, "cuda", 0, 0, 6, 5, "plain", "zero", False, None, 0)
    _raises("UNSUPPORTED_DTYPE", Layer.from_weight_ptr, "cuda", w.ctypes.data, 9, 6, 5, "plain", "zero", False, None, 0)
    if svft.backend_available("cuda"):
        e = _raises("INVALID_ARGUMENT", Layer.from_weight_ptr, "cuda", w.ctypes.data, 0, 6, 5, "plain", "zero", False,
                    None, 0)
        assert "not CUDA memory" in e.message, e.message
    else:
        reason = svft.backend_unavailable_reason("cuda")
        assert reason
        e = _raises("CUDA_UNAVAILABLE", Layer.from_weight_ptr, "cuda", w.ctypes.data, 0, 6, 5, "plain", "zero", False,
                    None, 0)
        assert reason in e.message, (reason, e.message)
    layer = Layer.from_weight(w, "banded:1")
    _raises("NO_FORWARD", layer.backward, np.ones((2, 6), np.float32))
    layer.forward(np.ones((3, 5), np.float32))
    _raises("NO_FORWARD", layer.backward, np.ones((2, 6), np.float32))
    _raises("SHAPE", setattr, layer, "coefficients", np.zeros(3, np.float32))
    _raises("NON_FINITE", setattr, layer, "gamma", float("inf"))
    e = _raises("SHAPE", layer.forward_ptr, 0, layer.coefficients.ctypes.data, 7, 3, layer.coefficients.ctypes.data, 18)
    assert "x (n x d_in)" in e.message
    layer.close()
    layer.close()  # idempotent in Python
    _raises("NULL_POINTER", layer.forward, np.ones((1, 5), np.float32))


def test_load_parameters_from_host_memory():
    layer = Layer.from_weight(_weight(7, 5, 10), "banded:1", gate=True)
    m = np.random.default_rng(3).standard_normal(layer.nnz).astype(np.float32)
    gamma = np.array([0.4], np.float32)
    layer.load_parameters_ptr(m.ctypes.data, gamma.ctypes.data)
    assert np.array_equal(layer.coefficients, m) and layer.gamma == np.float32(0.4)
    layer.load_parameters_ptr((m * 2).ctypes.data)  # gamma kept
    assert np.array_equal(layer.coefficients, m * 2) and layer.gamma == np.float32(0.4)
    bad = np.array([np.nan], np.float32)
    _raises("NON_FINITE", layer.load_parameters_ptr, m.ctypes.data, bad.ctypes.data)
    assert np.array_equal(layer.coefficients, m * 2) and layer.gamma == np.float32(0.4)  # nothing lost
    _raises("INVALID_ARGUMENT", layer.load_parameters_ptr, m.ctypes.data, None, 1234)  # a CPU layer takes no stream
    _raises("NULL_POINTER", layer.load_parameters_ptr, 0)
    layer.close()


def test_use_after_destroy_is_detected():
    a = Layer.from_weight(_weight(4, 4, 9), "plain")
    handle = a.handle
    a.close()
    b = Layer.__new__(Layer)
    b._handle, b.d_in, b.d_out, b.nnz = handle, 4, 4, 4
    _raises("INVALID_HANDLE", b.forward, np.ones((1, 4), np.float32))
    b._handle = None


def test_panic_is_caught():
    from svft._lib import call

    e = _raises("PANIC", call, "svft_selftest_panic")
    assert "deliberate panic" in e.message
    with Layer.from_weight(_weight(4, 3, 10), "plain") as layer:  # still healthy
        layer.forward(np.ones((2, 3), np.float32))
