"""Loads the svft shared library and declares the C ABI of include/svft.h for ctypes.

The library is found by `library_path()`: $SVFT_LIB, else the copy `pip install .` put inside
this package, else target/release/ of the source checkout.
"""

import ctypes
import os
import sysconfig
import threading
from ctypes import POINTER, c_bool, c_char_p, c_double, c_float, c_int32, c_size_t, c_uint32, c_uint64, c_void_p
from pathlib import Path

# Enumerations of svft.h (SvftStatus values are looked up by name through svft_status_name).
BACKENDS = {"cpu": 0, "cuda": 1}
DTYPES = {"float32": 0, "bfloat16": 1, "float16": 2, "float64": 3}
INITS = {"zero": 0, "official": 1}
PLANS = {"auto": 0, "factored": 1, "merged": 2, "small-n": 3}
ABI_VERSION = 1


class SvftError(RuntimeError):
    """A failed svft call: `status` is the SvftStatus name (e.g. "SHAPE"), `code` its value."""

    def __init__(self, code, status, message):
        super().__init__(f"{status}: {message}")
        self.code = code
        self.status = status
        self.message = message


_c_size_p = POINTER(c_size_t)
_c_float_p = POINTER(c_float)
_c_uint32_p = POINTER(c_uint32)
_handle_p = POINTER(c_void_p)

_SIGNATURES = {
    "svft_version": [POINTER(c_char_p)],
    "svft_abi_version": [POINTER(c_uint32)],
    "svft_backend_available": [c_int32, POINTER(c_bool)],
    "svft_last_error": [c_void_p, c_size_t, _c_size_p],
    "svft_status_name": [c_int32, POINTER(c_char_p)],
    "svft_selftest_panic": [],
    "svft_layer_from_weight": [
        c_int32, c_void_p, c_int32, c_size_t, c_size_t, c_size_t, c_size_t, c_char_p, c_int32, c_bool, c_uint64,
        c_void_p, c_size_t, _handle_p,
    ],
    "svft_layer_from_factors": [
        c_int32, c_int32, c_size_t, c_size_t, c_size_t, c_void_p, c_size_t, c_void_p, c_size_t, c_void_p, c_size_t,
        c_char_p, c_int32, c_bool, c_uint64, c_void_p, c_size_t, _handle_p,
    ],
    "svft_layer_from_factors_indexed": [
        c_int32, c_int32, c_size_t, c_size_t, c_size_t, c_void_p, c_size_t, c_void_p, c_size_t, c_void_p, c_size_t,
        c_char_p, c_void_p, c_void_p, c_size_t, c_int32, c_bool, c_uint64, c_void_p, c_size_t, _handle_p,
    ],
    "svft_layer_destroy": [c_void_p],
    "svft_layer_shape": [c_void_p, _c_size_p, _c_size_p, _c_size_p, _c_size_p],
    "svft_layer_info": [c_void_p, POINTER(c_int32), POINTER(c_bool), _c_size_p],
    "svft_layer_memory": [c_void_p, c_size_t, _c_size_p, _c_size_p, _c_size_p],
    "svft_layer_svd_residual": [c_void_p, POINTER(c_double)],
    "svft_layer_set_plan": [c_void_p, c_int32],
    "svft_layer_calibrate": [c_void_p, c_void_p, c_size_t, c_double, c_int32],
    "svft_layer_plan_for": [c_void_p, c_size_t, POINTER(c_int32)],
    "svft_layer_forward": [c_void_p, c_int32, c_void_p, c_size_t, c_size_t, c_void_p, c_size_t, c_void_p],
    "svft_layer_backward": [
        c_void_p, c_int32, c_void_p, c_size_t, c_size_t, c_void_p, c_size_t, c_void_p, c_size_t, c_void_p, c_void_p,
    ],
    "svft_layer_forward_saving": [
        c_void_p, c_int32, c_void_p, c_size_t, c_size_t, c_void_p, c_size_t, c_void_p, c_size_t, c_void_p,
    ],
    "svft_layer_backward_saved": [
        c_void_p, c_int32, c_void_p, c_size_t, c_void_p, c_size_t, c_size_t, c_void_p, c_size_t, c_void_p, c_size_t,
        c_void_p, c_void_p,
    ],
    "svft_layer_get_coefficients": [c_void_p, c_void_p, c_size_t],
    "svft_layer_set_coefficients": [c_void_p, c_void_p, c_size_t],
    "svft_layer_get_gamma": [c_void_p, _c_float_p],
    "svft_layer_set_gamma": [c_void_p, c_float],
    "svft_layer_load_parameters": [c_void_p, c_void_p, c_size_t, c_void_p, c_void_p],
    "svft_layer_merge": [c_void_p, c_int32, c_void_p, c_size_t, c_void_p],
    "svft_layer_factors": [c_void_p, c_void_p, c_size_t, c_void_p, c_size_t, c_void_p, c_size_t],
    "svft_layer_indices": [c_void_p, c_void_p, c_void_p, c_size_t],
    # The adapter bank (svft.bank): many adapters of one base layer, one mixed batch per call.
    "svft_bank_from_layer": [c_void_p, _handle_p],
    "svft_bank_from_factors": [
        c_size_t, c_size_t, c_size_t, c_void_p, c_size_t, c_void_p, c_size_t, c_void_p, c_size_t, c_void_p, c_size_t,
        _handle_p,
    ],
    "svft_bank_destroy": [c_void_p],
    "svft_bank_info": [c_void_p, _c_size_p, _c_size_p, _c_size_p, _c_size_p],
    "svft_bank_contains": [c_void_p, c_uint32, POINTER(c_bool)],
    "svft_bank_backend": [c_void_p, POINTER(c_int32), POINTER(c_int32)],
    "svft_bank_add_layer": [c_void_p, c_uint32, c_void_p],
    "svft_bank_replace_layer": [c_void_p, c_uint32, c_void_p],
    "svft_bank_add": [c_void_p, c_uint32, c_char_p, c_void_p, c_void_p, c_size_t, c_void_p, c_float, c_bool],
    "svft_bank_replace": [c_void_p, c_uint32, c_char_p, c_void_p, c_void_p, c_size_t, c_void_p, c_float, c_bool],
    "svft_bank_remove": [c_void_p, c_uint32],
    "svft_bank_forward": [
        c_void_p, c_int32, c_void_p, c_size_t, c_size_t, c_void_p, c_size_t, c_void_p, c_size_t, c_void_p,
    ],
}

_lock = threading.Lock()
_lib = None


def library_path():
    """Where libsvft is loaded from, the first of:
    1. $SVFT_LIB (an override: any build of the library);
    2. the library installed inside this package (`pip install .` puts it next to this file as
       libsvft<EXT_SUFFIX>, e.g. libsvft.cpython-311-x86_64-linux-gnu.so: setuptools-rust names
       it like an extension module, see setup.py);
    3. target/release/ of the source checkout this package sits in (python/svft, run in place
       after `cargo build --release --lib`)."""
    env = os.environ.get("SVFT_LIB")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    installed = here / ("libsvft" + (sysconfig.get_config_var("EXT_SUFFIX") or ".so"))
    if installed.exists():
        return installed
    root = here.parents[1]
    for name in ("libsvft.so", "libsvft.dylib", "svft.dll"):
        candidate = root / "target" / "release" / name
        if candidate.exists():
            return candidate
    raise OSError(
        f"libsvft not found: not installed in {here} (`pip install .` from the checkout builds and installs it), "
        f"nor built in {root / 'target' / 'release'} (`cargo build --release --lib`); "
        "or point SVFT_LIB at a libsvft.so"
    )


def lib():
    """The loaded library (loaded once, with every signature declared)."""
    global _lib
    with _lock:
        if _lib is None:
            handle = ctypes.CDLL(str(library_path()))
            for name, argtypes in _SIGNATURES.items():
                fn = getattr(handle, name)
                fn.argtypes = argtypes
                fn.restype = c_int32
            abi = c_uint32()
            if handle.svft_abi_version(ctypes.byref(abi)) != 0 or abi.value != ABI_VERSION:
                raise OSError(f"libsvft ABI {abi.value}, this package speaks {ABI_VERSION}")
            _lib = handle
        return _lib


def status_name(code):
    name = c_char_p()
    if lib().svft_status_name(code, ctypes.byref(name)) != 0:
        return f"UNKNOWN({code})"
    return name.value.decode().removeprefix("SVFT_STATUS_")


def last_error():
    """The calling thread's last error message."""
    needed = c_size_t()
    lib().svft_last_error(None, 0, ctypes.byref(needed))
    buf = ctypes.create_string_buffer(needed.value + 1)
    lib().svft_last_error(buf, len(buf), None)
    return buf.value.decode(errors="replace")


_functions = {}  # name -> the library's function: one dict lookup per call, no lock


def call(name, *args):
    """Calls `name` and raises SvftError on a nonzero status."""
    fn = _functions.get(name)
    if fn is None:
        fn = _functions[name] = getattr(lib(), name)
    code = fn(*args)
    if code:
        message = last_error()  # first: every other svft call clears it
        raise SvftError(code, status_name(code), message)


class Handle:
    """An owned library handle (a layer's or a bank's): freed once, by `close()`, at the end of
    a `with` block, or when garbage-collected. `_DESTROY` names the C call that frees it."""

    _DESTROY = None

    def __init__(self, handle):
        self._handle = handle

    def close(self):
        """Destroys the handle (idempotent on the Python side)."""
        handle, self._handle = self._handle, None
        if handle is not None:
            call(self._DESTROY, handle)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def handle(self):
        """The raw handle (an int; 0 once closed, which the library reports as NULL_POINTER)."""
        return self._handle or 0
