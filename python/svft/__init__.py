"""svft: SVFT (Singular Vectors guided Fine-Tuning) layers over the libsvft C ABI (ctypes).

- `Layer`: the NumPy-level API (CPU backend; float32 activations).
- `Bank` (in `svft.bank`, with `BASE`, `segments_from_ids`): many adapters of one base layer
  served in one mixed batch (CPU, inference); `SVFTBank` (lazily, with torch) its torch module.
- `SVFTLinear` (in `svft.nn`, imported lazily so NumPy users never import torch): a
  `torch.nn.Module` whose autograd function calls the C ABI on CPU and CUDA tensors.
- `SVFTConfig`, `get_svft_model` (alias `inject`), `SVFTModel`, `load_adapter` (in
  `svft.peft`, lazily too): PEFT-style adaptation of any torch model.
- `svft.files` (NumPy only): the CLI's factor and adapter files, checksums, per-module seeds.

The shared library (libsvft, the crate's C ABI) is the one `pip install .` built and installed
inside this package; $SVFT_LIB overrides it, and a source checkout used in place falls back to
the repository's target/release/libsvft.so (`library_path()` says which one is used).
"""

import ctypes
import os
import sys

# torch's OpenMP threads spin-wait after each parallel region by default, on the very cores the
# library's own threads need next: a CPU training step of SVFTLinear measured 16.3 ms with the
# default policy and 8.9 ms with PASSIVE (1024x1024, n = 64, 2 cores; docs/PERF.md 2d), the
# latter equal to the same step in Rust. The policy is read when torch loads OpenMP, so it can
# only be set here when torch is not imported yet; svft.nn warns otherwise (CPU only).
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from ._lib import SvftError, call, library_path
from .bank import BASE, Bank, segments_from_ids
from .layer import Layer

__all__ = [
    "Layer", "Bank", "BASE", "segments_from_ids", "SVFTBank", "SvftError", "SVFTLinear", "version",
    "backend_available", "backend_unavailable_reason", "library_path",
    "SVFTConfig", "SVFTModel", "get_svft_model", "inject", "load_adapter",
]


def version():
    """The library's version string."""
    out = ctypes.c_char_p()
    call("svft_version", ctypes.byref(out))
    return out.value.decode()


def backend_available(backend):
    """Whether "cpu" or "cuda" can run in this process (for "cuda": the library's device probe)."""
    return backend_unavailable_reason(backend) == ""


def backend_unavailable_reason(backend):
    """Why `backend` cannot run here ("" when it can): e.g. no CUDA driver, no device, or a
    library built without the CUDA kernels."""
    from ._lib import BACKENDS, last_error

    out = ctypes.c_bool()
    call("svft_backend_available", BACKENDS[backend], ctypes.byref(out))
    if out.value:
        return ""
    return last_error() or f"the {backend} backend is unavailable"


_PEFT_NAMES = ("SVFTConfig", "SVFTModel", "get_svft_model", "inject", "load_adapter")


def __getattr__(name):
    if name == "SVFTBank":
        from .bank import _torch_bank_class

        return _torch_bank_class()
    if name == "SVFTLinear":
        from .nn import SVFTLinear

        return SVFTLinear
    if name in _PEFT_NAMES:  # PyTorch, PEFT-style (svft.peft): imported lazily too
        from . import peft

        return getattr(peft, name)
    raise AttributeError(name)
