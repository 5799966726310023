"""svft: SVFT (Singular Vectors guided Fine-Tuning) layers over the libsvft C ABI (ctypes).

- `Layer`: the NumPy-level API (CPU backend; float32 activations).
- `SVFTLinear` (in `svft.nn`, imported lazily so NumPy users never import torch): a
  `torch.nn.Module` whose autograd function calls the C ABI on CPU and CUDA tensors.

The shared library is found through $SVFT_LIB, else the repository's target/release/libsvft.so.
"""

import ctypes

from ._lib import SvftError, call, library_path
from .layer import Layer

__all__ = ["Layer", "SvftError", "SVFTLinear", "version", "backend_available", "library_path"]


def version():
    """The library's version string."""
    out = ctypes.c_char_p()
    call("svft_version", ctypes.byref(out))
    return out.value.decode()


def backend_available(backend):
    """Whether "cpu" or "cuda" can run in this process."""
    from ._lib import BACKENDS

    out = ctypes.c_bool()
    call("svft_backend_available", BACKENDS[backend], ctypes.byref(out))
    return out.value


def __getattr__(name):
    if name == "SVFTLinear":
        from .nn import SVFTLinear

        return SVFTLinear
    raise AttributeError(name)
