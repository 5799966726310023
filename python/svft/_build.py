"""Building library layers for `SVFTLinear` from factors, and from explicit index sets (torch side).

An index set read from a file (an adapter, a state dict, the official layer's `s_row`/`s_col`) is
handed to the library as it is (`svft_layer_from_factors_indexed`), with the pattern spec that
names it: a band spec when the set is that band (the library checks it, and runs the band
kernels), else a `random:D` label (any set: duplicates add up, as in the official layer).
"""

import numpy as np
import torch

from ._lib import DTYPES, SvftError
from .layer import Layer

_CODES = {torch.float32: DTYPES["float32"], torch.bfloat16: DTYPES["bfloat16"], torch.float16: DTYPES["float16"]}


def band_size(r, d):
    """|Omega| of a band of half-width d in an r x r core: r(2d+1) - d(d+1)."""
    return r * (2 * d + 1) - d * (d + 1)


def random_label(r, nnz):
    """The `random:D` spec naming an explicit set of nnz pairs: D the smallest half-width whose
    band holds as many (the label sizes the pattern; the indices are what counts)."""
    d = next((d for d in range(r) if band_size(r, d) >= nnz), r - 1)
    return f"random:{d}"


def build_layer(u, s, v, bias, pattern, init, gate, seed, device, dtype, rows=None, cols=None):
    """A library layer over factors u (d_out x r), s (r), v (d_in x r) (tensors or arrays): on
    the CPU in f32; on a CUDA device in `dtype` (f32, bf16 or f16; s rounds through it). Its
    index set is the spec `pattern`'s, or with `rows`, `cols` given, exactly those pairs (a band
    spec that does not match them becomes a random label). Returns (layer, spec used)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    dt = dtype if cuda else torch.float32
    if dt not in _CODES:
        raise TypeError(f"unsupported dtype {dt}: use float32, bfloat16 or float16")
    u, s, v = (torch.as_tensor(a).detach().to(device=device, dtype=dt).contiguous() for a in (u, s, v))
    if u.ndim != 2 or v.ndim != 2 or s.ndim != 1 or u.shape[1] != s.numel() or v.shape[1] != s.numel():
        raise ValueError(f"factors must be u (d_out x r), s (r), v (d_in x r); got {tuple(u.shape)}, "
                         f"{tuple(s.shape)}, {tuple(v.shape)}")
    b = None if bias is None else torch.as_tensor(bias).detach().to(device=device, dtype=dt).contiguous()
    if cuda:
        torch.cuda.current_stream(device).synchronize()  # creation reads the factors synchronously
    if rows is not None:
        rows = np.asarray(torch.as_tensor(rows).detach().cpu(), np.int64).reshape(-1)
        cols = np.asarray(torch.as_tensor(cols).detach().cpu(), np.int64).reshape(-1)
        r = s.numel()
        if rows.size == 0 or rows.size != cols.size:
            raise ValueError(f"the index set needs as many rows as cols (got {rows.size} and {cols.size})")
        if min(rows.min(), cols.min()) < 0 or max(rows.max(), cols.max()) >= r:
            raise ValueError(f"an index of the pattern lies outside the rank {r}")

    def make(spec):
        return Layer.from_factors_ptr(
            "cuda" if cuda else "cpu", _CODES[dt], u.shape[0], v.shape[0], s.numel(), u.data_ptr(), s.data_ptr(),
            v.data_ptr(), spec, init, gate, None if b is None else b.data_ptr(), 0 if b is None else b.numel(),
            seed=int(seed), rows=rows, cols=cols,
        )

    if rows is None or not (pattern == "plain" or pattern.startswith("banded")):
        return make(pattern), pattern
    try:
        return make(pattern), pattern
    except SvftError as e:
        if e.status != "INVALID_ARGUMENT":
            raise
        label = random_label(s.numel(), rows.size)  # not that band: the set as given, on COO kernels
        return make(label), label
