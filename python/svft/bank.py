"""`Bank`: many SVFT adapters of one base layer, served together (the `svft_bank_*` C ABI).

Adapters of one base share U, s and V and differ only in their index set, coefficients M and
gate. A bank runs the two big products of a mixed batch once, `T = X V` and `Y = S U^T`, and
each contiguous segment of rows through its own adapter's core in between (inference only).
A bank lives where the layer it is made from lives: a CPU bank computes in float32 on NumPy
arrays (or host addresses); a CUDA bank computes in its layer's dtype on device memory, through
`SVFTBank` (torch CUDA tensors, on the current stream) or `forward_ptr` (device addresses).

A segment table is a sequence of `(start, end, adapter)` rows that tiles `0..n` in order
(empty segments allowed); `adapter` is an id given to `add` (0 to 2**32 - 1), or `BASE` (or
None) for the base weight alone. `segments_from_ids` builds one from an adapter id per row.

`SVFTBank` (`svft.SVFTBank` or `svft.bank.SVFTBank`; defined on first use, so NumPy users never
import torch) wraps a Bank as a `torch.nn.Module` for CPU or CUDA tensors.
"""

import ctypes

import numpy as np

from ._lib import BACKENDS, DTYPES, Handle, call
from .layer import Layer, _addr, _f32

BASE = -1
"""The adapter id of a segment served by the base weight alone (SVFT_BANK_BASE)."""

SEGMENT = np.dtype([("start", np.uintp), ("end", np.uintp), ("adapter", np.int64)], align=True)
"""The layout of one SvftSegment (size_t start, end; int64_t adapter)."""

_size = ctypes.c_size_t


def segment_table(segments):
    """`segments` (an array of SEGMENT, or (start, end, adapter) rows; adapter None = BASE) as a
    contiguous SEGMENT array."""
    if isinstance(segments, np.ndarray) and segments.dtype == SEGMENT:
        return np.ascontiguousarray(segments)
    rows = []
    for k, seg in enumerate(segments):
        try:
            start, end, adapter = seg
        except (TypeError, ValueError):
            raise ValueError(f"segment {k}: expected (start, end, adapter), got {seg!r}") from None
        start, end = int(start), int(end)
        if start < 0 or end < 0:
            raise ValueError(f"segment {k}: negative row ({start}, {end})")
        rows.append((start, end, BASE if adapter is None else int(adapter)))
    return np.array(rows, dtype=SEGMENT)


def segments_from_ids(ids):
    """The table of contiguous runs of a per-row adapter id sequence (None or BASE: the base)."""
    ids = [BASE if i is None else int(i) for i in np.asarray(ids, dtype=object).reshape(-1)]
    table, start = [], 0
    for k in range(1, len(ids) + 1):
        if k == len(ids) or ids[k] != ids[start]:
            table.append((start, k, ids[start]))
            start = k
    return segment_table(table)


def segments_from_lengths(lengths, ids):
    """Consecutive segments of `lengths[k]` rows served by `ids[k]` (e.g. one per request)."""
    if len(lengths) != len(ids):
        raise ValueError(f"{len(lengths)} lengths but {len(ids)} ids")
    table, start = [], 0
    for length, adapter in zip(lengths, ids):
        table.append((start, start + int(length), adapter))
        start += int(length)
    return segment_table(table)


class Bank(Handle):
    """The adapters of one base layer (see the module doc). Build it with `Bank.from_layer`
    (the base of a `Layer`: its factors and bias, on its backend) or `Bank.from_factors` (CPU);
    free it with `close()` (or a `with` block; also when garbage-collected). `backend` ("cpu"
    or "cuda") and `dtype` ("float32", "bfloat16", "float16") say what its forward takes."""

    _DESTROY = "svft_bank_destroy"

    def __init__(self, handle):
        super().__init__(handle)
        d_out, d_in, rank = _size(), _size(), _size()
        call("svft_bank_info", handle, ctypes.byref(d_out), ctypes.byref(d_in), ctypes.byref(rank), None)
        self.d_out, self.d_in, self.rank = d_out.value, d_in.value, rank.value
        backend, dtype = ctypes.c_int32(), ctypes.c_int32()
        call("svft_bank_backend", handle, ctypes.byref(backend), ctypes.byref(dtype))
        self.backend = next(k for k, v in BACKENDS.items() if v == backend.value)
        self.dtype = next(k for k, v in DTYPES.items() if v == dtype.value)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_layer(cls, layer):
        """An empty bank over a layer's base (copied: the layer stays independent), on the layer's
        backend (a CUDA layer's device and dtype). Add the layer's own adapter with
        `add(id, layer)` if it should be served too."""
        out = ctypes.c_void_p()
        call("svft_bank_from_layer", layer.handle, ctypes.byref(out))
        return cls(out.value)

    @classmethod
    def from_factors(cls, u, s, v, bias=None):
        """An empty CPU bank over factors `u` (d_out x r), `s` (r), `v` (d_in x r) and an
        optional bias (for a CUDA bank, use `from_layer` on a CUDA layer)."""
        u, s, v = _f32(u, "u"), _f32(s, "s"), _f32(v, "v")
        if u.ndim != 2 or v.ndim != 2 or s.ndim != 1:
            raise ValueError("u and v must be 2-D, s 1-D")
        b = None if bias is None else _f32(bias, "bias")
        out = ctypes.c_void_p()
        call(
            "svft_bank_from_factors", u.shape[0], v.shape[0], s.size, _addr(u), u.size, _addr(s), s.size, _addr(v),
            v.size, None if b is None else _addr(b), 0 if b is None else b.size, ctypes.byref(out),
        )
        return cls(out.value)

    # ---- adapters -----------------------------------------------------------------------
    def __len__(self):
        count = _size()
        call("svft_bank_info", self.handle, None, None, None, ctypes.byref(count))
        return count.value

    def __contains__(self, adapter_id):
        out = ctypes.c_bool()
        call("svft_bank_contains", self.handle, _id(adapter_id), ctypes.byref(out))
        return out.value

    def add(self, adapter_id, layer=None, *, pattern=None, rows=None, cols=None, m=None, gamma=0.0, gate=False):
        """Adds adapter `adapter_id`: the adapter of a `Layer` over this bank's base (its
        index set, coefficients, gamma and gate, copied), or one from its parts: `pattern` (a
        spec naming the index set: "plain"/"banded:D" must be that band's own indices in
        row-major order, "random:D"/"topk:D" name any other set), `rows`, `cols` (coefficient k
        at (rows[k], cols[k]) of the rank x rank core), `m`, `gamma`, `gate`. An id already in
        the bank is an error (SvftError INVALID_ARGUMENT); nothing changes on an error."""
        self._put("add", adapter_id, layer, pattern, rows, cols, m, gamma, gate)

    def replace(self, adapter_id, layer=None, *, pattern=None, rows=None, cols=None, m=None, gamma=0.0, gate=False):
        """Replaces resident adapter `adapter_id` (arguments as `add`); the others are untouched."""
        self._put("replace", adapter_id, layer, pattern, rows, cols, m, gamma, gate)

    def remove(self, adapter_id):
        """Removes resident adapter `adapter_id`; a later segment naming it is an error."""
        call("svft_bank_remove", self.handle, _id(adapter_id))

    def _put(self, what, adapter_id, layer, pattern, rows, cols, m, gamma, gate):
        if layer is not None:
            if any(a is not None for a in (pattern, rows, cols, m)):
                raise ValueError("pass a layer or the adapter's parts, not both")
            if not isinstance(layer, Layer):
                raise TypeError(f"expected an svft.Layer, got {type(layer).__name__}")
            call(f"svft_bank_{what}_layer", self.handle, _id(adapter_id), layer.handle)
            return
        if pattern is None or rows is None or cols is None or m is None:
            raise ValueError("pass a layer, or pattern, rows, cols and m")
        r = np.ascontiguousarray(np.asarray(rows).reshape(-1), dtype=np.uint32)
        c = np.ascontiguousarray(np.asarray(cols).reshape(-1), dtype=np.uint32)
        mm = np.ascontiguousarray(np.asarray(m).reshape(-1), dtype=np.float32)
        if not r.size == c.size == mm.size:
            raise ValueError(f"rows, cols and m differ in length ({r.size}, {c.size}, {mm.size})")
        call(
            f"svft_bank_{what}", self.handle, _id(adapter_id), pattern.encode(), _addr(r), _addr(c), r.size, _addr(mm),
            float(gamma), bool(gate),
        )

    # ---- compute ------------------------------------------------------------------------
    def forward(self, x, segments):
        """`y` for a mixed batch: x of shape (n, d_in) (or (..., d_in), rows flattened), each
        row through the adapter of the segment holding it; returns (..., d_out) float32. CPU banks
        only (a CUDA bank takes device memory: `SVFTBank` or `forward_ptr`)."""
        if self.backend != "cpu":
            raise ValueError(f"this bank lives on {self.backend}: pass torch tensors to SVFTBank, or device "
                             "addresses to forward_ptr")
        x = _f32(x, "x")
        if x.shape[-1] != self.d_in:
            raise ValueError(f"x has {x.shape[-1]} features, the bank takes {self.d_in}")
        n = x.size // self.d_in
        table = segment_table(segments)
        y = np.empty(x.shape[:-1] + (self.d_out,), np.float32)
        self.forward_ptr(_addr(x), x.size, n, table, _addr(y), y.size)
        return y

    def forward_ptr(self, x_ptr, x_len, n, segments, y_ptr, y_len, stream=None):
        """`forward` on raw addresses of the bank's dtype: host memory for a CPU bank (`stream`
        None); device memory on the bank's device for a CUDA bank, with `stream` a CUstream
        address (None: the legacy default stream). `segments` as `forward` takes them."""
        table = segment_table(segments)
        call(
            "svft_bank_forward", self.handle, DTYPES[self.dtype], x_ptr, x_len, n,
            _addr(table) if table.size else None, table.size, y_ptr, y_len, stream,
        )

    def __repr__(self):
        state = "closed" if self._handle is None else f"{len(self)} adapters"
        return f"Bank({self.d_out}x{self.d_in}, rank {self.rank}, {state})"


def _id(adapter_id):
    i = int(adapter_id)
    if not 0 <= i < 2**32:
        raise ValueError(f"adapter id {adapter_id} out of range: ids are 0 to 2**32 - 1")
    return i


_torch_classes = {}


def _torch_bank_class():
    """`SVFTBank`, defined on first use so that NumPy users of this module never import torch."""
    if "SVFTBank" in _torch_classes:
        return _torch_classes["SVFTBank"]
    import torch
    from torch import nn

    class SVFTBank(nn.Module):
        """A `torch.nn.Module` serving many SVFT adapters of one base linear layer (inference:
        no gradients). `forward(x, segments)` runs each segment of rows of
        `x` (n, d_in), or (..., d_in) with rows flattened, through its adapter; `segments` as
        `Bank.forward` takes them, or `row_adapters=` an adapter id per row (a tensor or
        sequence; BASE or None for the base weight).

        Build it with `SVFTBank.from_svft_linear(module)` (the base of an `SVFTLinear`, on its
        device: CPU float32, or CUDA in the module's dtype, on the current stream) or
        `SVFTBank(bank)`; add adapters with `add(id, svft_linear)` (its current `m` and `gamma`
        are copied in: a later training step does not change the bank until `replace`)."""

        def __init__(self, bank):
            super().__init__()
            self.bank = bank
            self.in_features, self.out_features = bank.d_in, bank.d_out

        @classmethod
        def from_svft_linear(cls, module):
            """An empty bank over the base (factors and bias) of an `SVFTLinear`, on its device."""
            return cls(Bank.from_layer(module._layer))

        @staticmethod
        def _sync(module):
            """The module's library layer with its current parameters."""
            layer = module._layer
            layer.coefficients = module.m.detach().cpu().numpy()
            if module.gamma is not None:
                layer.gamma = float(module.gamma.detach().cpu())
            return layer

        def add(self, adapter_id, module):
            """Adds the adapter of an `SVFTLinear` over this bank's base."""
            self.bank.add(adapter_id, self._sync(module))

        def replace(self, adapter_id, module):
            """Replaces resident adapter `adapter_id` by an `SVFTLinear`'s adapter."""
            self.bank.replace(adapter_id, self._sync(module))

        def remove(self, adapter_id):
            self.bank.remove(adapter_id)

        def __len__(self):
            return len(self.bank)

        def __contains__(self, adapter_id):
            return adapter_id in self.bank

        def forward(self, x, segments=None, row_adapters=None):
            if (segments is None) == (row_adapters is None):
                raise ValueError("pass segments or row_adapters (one of them)")
            if x.is_cuda != (self.bank.backend == "cuda"):
                raise ValueError(f"this bank lives on {self.bank.backend}: pass a tensor there, not on {x.device}")
            want = getattr(torch, self.bank.dtype)
            if x.dtype != want:
                raise TypeError(f"this bank computes in {want}, not {x.dtype}")
            if x.shape[-1] != self.in_features:
                raise ValueError(f"x has {x.shape[-1]} features, the bank takes {self.in_features}")
            if row_adapters is not None:
                if isinstance(row_adapters, torch.Tensor):
                    row_adapters = row_adapters.detach().cpu().reshape(-1).tolist()
                segments = segments_from_ids(row_adapters)
            x = x.detach().contiguous()
            n = x.numel() // self.in_features
            y = x.new_empty(tuple(x.shape[:-1]) + (self.out_features,))
            # On CUDA the bank orders itself after the work on the current stream and before
            # what is queued there later (the host is not blocked); a tensor on another device
            # than the bank's is the library's INVALID_ARGUMENT.
            stream = torch.cuda.current_stream(x.device).cuda_stream if x.is_cuda else None
            self.bank.forward_ptr(x.data_ptr(), x.numel(), n, segments, y.data_ptr(), y.numel(), stream)
            return y

        def extra_repr(self):
            return f"in_features={self.in_features}, out_features={self.out_features}, adapters={len(self.bank)}"

    SVFTBank.__module__, SVFTBank.__qualname__ = __name__, "SVFTBank"
    _torch_classes["SVFTBank"] = SVFTBank
    return SVFTBank


def __getattr__(name):
    if name == "SVFTBank":
        return _torch_bank_class()
    raise AttributeError(name)
