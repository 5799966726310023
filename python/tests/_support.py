"""Shared by the test modules: skip exception, NumPy f64 reference.

The tests import `svft` as installed (scripts/test-python.sh runs `pip install .` into its venv
first): nothing here puts python/ on the import path, so they test the package users get, with
the library it ships (test_install.py checks that).
"""

import unittest

# pytest reports it as a skip; conftest.py fails the run unless the reason starts with one of
# ALLOWED_SKIPS.
Skip = unittest.SkipTest

# The only reasons a test may skip for (a prefix of the reason): the machine has no CUDA device.
# Every other missing piece (PyTorch, transformers, the CLI binary, the CUDA backend of the
# library on a machine with a device) fails the run instead of passing it unnoticed.
ALLOWED_SKIPS = ("needs a CUDA device",)


def reference(layer, m=None, gamma=None, bias=None):
    """The layer's math in NumPy f64 from its own factors and index set (SVFT.md section 2):
    returns (W, forward(x), backward(x, gy) -> (dx, dm, dgamma))."""
    import numpy as np

    u, s, v = (a.astype(np.float64) for a in layer.factors())
    rows, cols = layer.indices()
    m = (layer.coefficients if m is None else m).astype(np.float64)
    gamma = layer.gamma if gamma is None else gamma
    g = 1.0 / (1.0 + np.exp(-gamma)) if layer.gate else 1.0
    r = layer.rank
    core = np.diag(s)
    np.add.at(core, (rows, cols), g * m)  # duplicates add up
    w = u @ core @ v.T
    b = np.zeros(layer.d_out) if bias is None else np.asarray(bias, np.float64)

    def forward(x):
        return np.asarray(x, np.float64) @ w.T + b

    def backward(x, gy):
        x, gy = np.asarray(x, np.float64).reshape(-1, layer.d_in), np.asarray(gy, np.float64).reshape(-1, layer.d_out)
        dx = gy @ w
        dc = u.T @ (gy.T @ x) @ v  # r x r
        dc_omega = dc[rows, cols]
        dm = g * dc_omega
        dgamma = g * (1 - g) * float(np.sum(m * dc_omega)) if layer.gate else 0.0
        assert dc.shape == (r, r)
        return dx, dm, dgamma

    return w, forward, backward


def rel_err(got, want):
    import numpy as np

    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if not np.all(np.isfinite(got)):
        return float("inf")
    den = np.linalg.norm(want)
    num = np.linalg.norm(got - want)
    return num / den if den > 0 else num
