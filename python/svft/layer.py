"""`Layer`: one SVFT layer behind an opaque libsvft handle, with a NumPy-level API.

All arrays are row-major; activations are float32 (the CPU backend computes in f32), weights
may be float16, float32 or float64. The `*_ptr` methods take raw addresses and element
counts (used by `svft.nn` for torch tensors on CPU and CUDA).
"""

import ctypes

import numpy as np

from ._lib import BACKENDS, DTYPES, INITS, PLANS, Handle, call

_size = ctypes.c_size_t


def _addr(a):
    return a.ctypes.data


def _f32(a, name):
    a = np.ascontiguousarray(a, dtype=np.float32)
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    return a


def _dtype_code(a):
    name = str(a.dtype)
    if name not in DTYPES:
        raise TypeError(f"unsupported dtype {a.dtype}: use one of {sorted(DTYPES)}")
    return DTYPES[name]


class Layer(Handle):
    """An SVFT layer `y = x (U (diag(s) + g M) V^T)^T + bias`.

    Build it with `Layer.from_weight` or `Layer.from_factors`; free it with `close()` (or a
    `with` block; it is also freed when garbage-collected). A closed layer raises SvftError
    with status INVALID_HANDLE.
    """

    _DESTROY = "svft_layer_destroy"

    def __init__(self, handle):
        super().__init__(handle)
        d_out, d_in, rank, nnz = _size(), _size(), _size(), _size()
        call("svft_layer_shape", handle, *(ctypes.byref(v) for v in (d_out, d_in, rank, nnz)))
        self.d_out, self.d_in, self.rank, self.nnz = d_out.value, d_in.value, rank.value, nnz.value
        backend, gate, trainable = ctypes.c_int32(), ctypes.c_bool(), _size()
        call("svft_layer_info", handle, ctypes.byref(backend), ctypes.byref(gate), ctypes.byref(trainable))
        self.backend = {v: k for k, v in BACKENDS.items()}[backend.value]
        self.gate = gate.value
        self.trainable_params = trainable.value

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_weight(cls, weight, pattern="plain", init="zero", gate=False, bias=None, rank=None, seed=0):
        """Decomposes a `(d_out, d_in)` weight (float16/32/64 array) with a thin SVD."""
        w = np.ascontiguousarray(weight)
        if w.ndim != 2:
            raise ValueError(f"weight must be 2-D, got shape {w.shape}")
        b = None if bias is None else np.ascontiguousarray(bias, dtype=w.dtype)
        return cls.from_weight_ptr(
            "cpu", _addr(w), _dtype_code(w), w.shape[0], w.shape[1], pattern, init, gate,
            None if b is None else _addr(b), 0 if b is None else b.size, rank, seed,
        )

    @classmethod
    def from_weight_ptr(cls, backend, weight_ptr, dtype_code, d_out, d_in, pattern, init, gate, bias_ptr, bias_len,
                        rank=None, seed=0):
        """`from_weight` on a raw address (host on "cpu", device on "cuda"); bias has the weight's dtype."""
        out = ctypes.c_void_p()
        call(
            "svft_layer_from_weight", BACKENDS[backend], weight_ptr, dtype_code, d_out * d_in, d_out, d_in,
            rank or 0, pattern.encode(), INITS[init], bool(gate), seed, bias_ptr, bias_len, ctypes.byref(out),
        )
        return cls(out.value)

    @classmethod
    def from_factors(cls, u, s, v, pattern="plain", init="zero", gate=False, bias=None, seed=0):
        """A layer over saved factors `u` (d_out x r), `s` (r), `v` (d_in x r)."""
        u, s, v = _f32(u, "u"), _f32(s, "s"), _f32(v, "v")
        if u.ndim != 2 or v.ndim != 2 or s.ndim != 1:
            raise ValueError("u and v must be 2-D, s 1-D")
        b = None if bias is None else _f32(bias, "bias")
        out = ctypes.c_void_p()
        call(
            "svft_layer_from_factors", BACKENDS["cpu"], DTYPES["float32"], u.shape[0], v.shape[0], s.size,
            _addr(u), u.size, _addr(s), s.size, _addr(v), v.size, pattern.encode(), INITS[init], bool(gate), seed,
            None if b is None else _addr(b), 0 if b is None else b.size, ctypes.byref(out),
        )
        return cls(out.value)

    @classmethod
    def from_factors_ptr(cls, backend, dtype_code, d_out, d_in, rank, u_ptr, s_ptr, v_ptr, pattern, init, gate,
                         bias_ptr, bias_len, seed=0, rows=None, cols=None):
        """`from_factors` on raw addresses (host on "cpu", device on "cuda"): u (d_out x rank),
        s (rank), v (d_in x rank) and the bias (d_out, or NULL) all of one dtype; on CUDA the
        layer goes to their device and computes in that dtype. With `rows`, `cols` (host
        integer arrays) the index set is theirs, named by `pattern` (svft_layer_from_factors_indexed:
        a band spec must match them exactly; "random:D" names any other set)."""
        out = ctypes.c_void_p()
        head = (BACKENDS[backend], dtype_code, d_out, d_in, rank, u_ptr, d_out * rank, s_ptr, rank, v_ptr,
                d_in * rank, pattern.encode())
        tail = (INITS[init], bool(gate), seed, bias_ptr, bias_len, ctypes.byref(out))
        if rows is None:
            call("svft_layer_from_factors", *head, *tail)
        else:
            r = np.ascontiguousarray(np.asarray(rows).reshape(-1), dtype=np.uint32)
            c = np.ascontiguousarray(np.asarray(cols).reshape(-1), dtype=np.uint32)
            if r.size != c.size:
                raise ValueError(f"rows and cols differ in length ({r.size} and {c.size})")
            call("svft_layer_from_factors_indexed", *head, _addr(r), _addr(c), r.size, *tail)
        return cls(out.value)

    # ---- queries ------------------------------------------------------------------------
    def memory(self, n):
        """Bytes for n tokens: {"workspace", "saved", "persistent"} (see svft.h)."""
        vals = [_size(), _size(), _size()]
        call("svft_layer_memory", self.handle, n, *(ctypes.byref(v) for v in vals))
        return dict(zip(("workspace", "saved", "persistent"), (v.value for v in vals)))

    @property
    def svd_residual(self):
        out = ctypes.c_double()
        call("svft_layer_svd_residual", self.handle, ctypes.byref(out))
        return out.value

    def set_plan(self, plan):
        """"auto", "factored", "merged" or "small-n"."""
        call("svft_layer_set_plan", self.handle, PLANS[plan])

    def calibrate(self, tokens=None, seconds=0.05, use_cache=True):
        """Times every plan at each token count (default 1, 4, ..., 16384) and makes "auto"
        follow the measurements; with use_cache the table is kept in the plan cache
        (SVFT_PLAN_CACHE, default ~/.cache/svft/plans.json) and reused."""
        if tokens is None:
            call("svft_layer_calibrate", self.handle, None, 0, float(seconds), int(bool(use_cache)))
            return
        arr = np.ascontiguousarray(np.asarray(tokens, dtype=np.uintp))
        call("svft_layer_calibrate", self.handle, _addr(arr), arr.size, float(seconds), int(bool(use_cache)))

    def plan_for(self, n):
        """The plan ("factored", "merged" or "small-n") forward runs for n tokens."""
        out = ctypes.c_int32()
        call("svft_layer_plan_for", self.handle, int(n), ctypes.byref(out))
        return {v: k for k, v in PLANS.items()}[out.value]

    def factors(self):
        """(u, s, v) as float32 arrays."""
        u = np.empty((self.d_out, self.rank), np.float32)
        s = np.empty(self.rank, np.float32)
        v = np.empty((self.d_in, self.rank), np.float32)
        call("svft_layer_factors", self.handle, _addr(u), u.size, _addr(s), s.size, _addr(v), v.size)
        return u, s, v

    def indices(self):
        """(rows, cols): coefficient k sits at (rows[k], cols[k]) of the r x r core."""
        rows, cols = np.empty(self.nnz, np.uint32), np.empty(self.nnz, np.uint32)
        call("svft_layer_indices", self.handle, _addr(rows), _addr(cols), self.nnz)
        return rows, cols

    # ---- parameters ---------------------------------------------------------------------
    @property
    def coefficients(self):
        m = np.empty(self.nnz, np.float32)
        call("svft_layer_get_coefficients", self.handle, _addr(m), m.size)
        return m

    @coefficients.setter
    def coefficients(self, m):
        m = np.ascontiguousarray(m, dtype=np.float32).reshape(-1)
        call("svft_layer_set_coefficients", self.handle, _addr(m), m.size)

    @property
    def gamma(self):
        out = ctypes.c_float()
        call("svft_layer_get_gamma", self.handle, ctypes.byref(out))
        return out.value

    @gamma.setter
    def gamma(self, value):
        call("svft_layer_set_gamma", self.handle, float(value))

    # ---- compute ------------------------------------------------------------------------
    def forward(self, x):
        """`y = x W^T + bias` for x of shape (..., d_in); returns (..., d_out) float32."""
        x = _f32(x, "x")
        if x.shape[-1] != self.d_in:
            raise ValueError(f"x has {x.shape[-1]} features, the layer takes {self.d_in}")
        n = x.size // self.d_in
        y = np.empty(x.shape[:-1] + (self.d_out,), np.float32)
        self.forward_ptr(DTYPES["float32"], _addr(x), x.size, n, _addr(y), y.size)
        return y

    def backward(self, grad_y):
        """(dx, dm, dgamma) for dL/dy of the preceding forward (same number of tokens)."""
        gy = _f32(grad_y, "grad_y")
        if gy.shape[-1] != self.d_out:
            raise ValueError(f"grad_y has {gy.shape[-1]} features, the layer outputs {self.d_out}")
        n = gy.size // self.d_out
        dx = np.empty(gy.shape[:-1] + (self.d_in,), np.float32)
        dm = np.empty(self.nnz, np.float32)
        dgamma = np.zeros(1, np.float32)
        self.backward_ptr(DTYPES["float32"], _addr(gy), gy.size, n, _addr(dx), dx.size, _addr(dm), _addr(dgamma))
        return dx, dm, float(dgamma[0])

    def merge(self):
        """The dense adapted weight U C V^T, (d_out, d_in) float32 (bias not included)."""
        w = np.empty((self.d_out, self.d_in), np.float32)
        self.merge_ptr(DTYPES["float32"], _addr(w), w.size)
        return w

    # ---- raw addresses (host on "cpu", device on "cuda"; stream: a CUstream address or None)
    def forward_ptr(self, dtype_code, x_ptr, x_len, n, y_ptr, y_len, stream=None):
        call("svft_layer_forward", self.handle, dtype_code, x_ptr, x_len, n, y_ptr, y_len, stream)

    def backward_ptr(self, dtype_code, gy_ptr, gy_len, n, dx_ptr, dx_len, dm_ptr, dgamma_ptr, stream=None):
        call(
            "svft_layer_backward", self.handle, dtype_code, gy_ptr, gy_len, n, dx_ptr, dx_len, dm_ptr, self.nnz,
            dgamma_ptr, stream,
        )

    def forward_saving_ptr(self, dtype_code, x_ptr, x_len, n, y_ptr, y_len, t_ptr, t_len, stream=None):
        """Forward that writes the saved activations T = X V (n x rank, the activations' dtype)
        to `t_ptr` instead of keeping them in the layer (see svft_layer_forward_saving)."""
        call("svft_layer_forward_saving", self.handle, dtype_code, x_ptr, x_len, n, y_ptr, y_len, t_ptr, t_len, stream)

    def backward_saved_ptr(self, dtype_code, t_ptr, t_len, gy_ptr, gy_len, n, dx_ptr, dx_len, dm_ptr, dgamma_ptr,
                           stream=None):
        """Backward of a `forward_saving_ptr` from its T, with the layer's current M and gamma."""
        call(
            "svft_layer_backward_saved", self.handle, dtype_code, t_ptr, t_len, gy_ptr, gy_len, n, dx_ptr, dx_len,
            dm_ptr, self.nnz, dgamma_ptr, stream,
        )

    def merge_ptr(self, dtype_code, w_ptr, w_len, stream=None):
        call("svft_layer_merge", self.handle, dtype_code, w_ptr, w_len, stream)

    def load_parameters_ptr(self, m_ptr, gamma_ptr=None, stream=None):
        """M (nnz float32) and, unless None, gamma (one float32) from addresses in the layer's
        memory (host on "cpu", device on "cuda"), ordered on `stream` (a CUstream address, None
        on the CPU); on CUDA the host never waits."""
        call("svft_layer_load_parameters", self.handle, m_ptr, self.nnz, gamma_ptr, stream)

    def __repr__(self):
        return (f"Layer({self.d_out}x{self.d_in}, rank {self.rank}, nnz {self.nnz}, gate={self.gate}, "
                f"backend={self.backend})")
