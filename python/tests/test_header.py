"""The package's ctypes declarations (svft/_lib.py) against include/svft.h, the generated C header:
every exported function is declared, with the C parameter list's types, and the enumerations have
the header's values. A wrong ctypes signature is undefined behaviour that no other test sees on
x86-64 (a size_t declared as c_int32 still works for small values), so it is checked by reading
the header, not by calling. Needs no library build."""

import ctypes
import re
from pathlib import Path

from svft import _lib

HEADER = Path(__file__).resolve().parents[2] / "include" / "svft.h"

# C scalar types of the header and the ctypes type each must be declared as.
SCALARS = {
    "int32_t": ctypes.c_int32,
    "uint32_t": ctypes.c_uint32,
    "uint64_t": ctypes.c_uint64,
    "size_t": ctypes.c_size_t,
    "bool": ctypes.c_bool,
    "float": ctypes.c_float,
    "double": ctypes.c_double,
    # The enumerations cross the ABI as int32_t (cbindgen: `typedef int32_t SvftBackend`).
    "SvftStatus": ctypes.c_int32,
    "SvftBackend": ctypes.c_int32,
    "SvftDtype": ctypes.c_int32,
    "SvftInit": ctypes.c_int32,
    "SvftPlan": ctypes.c_int32,
}


def header_text():
    text = HEADER.read_text()
    return re.sub(r"//[^\n]*", "", re.sub(r"/\*.*?\*/", "", text, flags=re.S))


def header_functions():
    """{name: (return type, [parameter type, ...])} of every function the header declares."""
    out = {}
    for ret, name, params in re.findall(r"(\w+)\s+(svft_\w+)\s*\(([^)]*)\)\s*;", header_text()):
        params = " ".join(params.split())
        types = []
        if params and params != "void":
            for p in params.split(","):
                # "const struct SvftLayer *layer" -> "const struct SvftLayer *"
                m = re.fullmatch(r"\s*(.*?[\s*])(\w+)\s*", p)
                assert m, f"cannot parse parameter {p!r} of {name}"
                types.append(" ".join(m.group(1).replace("*", " * ").split()))
        out[name] = (ret, types)
    return out


def accepts(c_type, declared):
    """Whether ctypes type `declared` is a correct declaration of C type `c_type`."""
    words = c_type.replace("const ", "").replace("*", " * ").split()
    depth = words.count("*")
    base = " ".join(w for w in words if w != "*")
    if depth == 0:
        return declared is SCALARS[base]
    if depth == 2:
        # char ** (an out-pointer to a C string), struct SvftLayer ** (an out-handle).
        return declared is ctypes.POINTER(ctypes.c_char_p if base == "char" else ctypes.c_void_p)
    if base == "char":
        return declared in (ctypes.c_char_p, ctypes.c_void_p)  # a C string, or a buffer to fill
    # One level: an opaque handle or buffer is c_void_p; a typed out-scalar may be POINTER(T).
    return declared is ctypes.c_void_p or (base in SCALARS and declared is ctypes.POINTER(SCALARS[base]))


def test_every_header_function_is_declared_with_its_c_types():
    functions = header_functions()
    assert len(functions) >= 20, f"parsed only {sorted(functions)} from {HEADER}"
    declared = _lib._SIGNATURES
    assert sorted(functions) == sorted(declared), (
        f"header only: {sorted(set(functions) - set(declared))}; "
        f"_lib.py only: {sorted(set(declared) - set(functions))}"
    )
    for name, (ret, params) in functions.items():
        assert ret == "SvftStatus", f"{name} returns {ret}; _lib.py declares every restype as c_int32"
        argtypes = declared[name]
        assert len(argtypes) == len(params), f"{name}: header has {len(params)} parameters, _lib.py {len(argtypes)}"
        for i, (c_type, t) in enumerate(zip(params, argtypes)):
            assert accepts(c_type, t), f"{name} parameter {i}: header {c_type!r}, _lib.py {t}"


def test_enumerations_have_the_header_values():
    text = header_text()
    values = {k: int(v) for k, v in re.findall(r"\b(SVFT_[A-Z0-9_]+)\s*=\s*(-?\d+)", text)}
    for prefix, table, spell in [
        ("SVFT_BACKEND_", _lib.BACKENDS, {"cpu": "CPU", "cuda": "CUDA"}),
        ("SVFT_DTYPE_", _lib.DTYPES, {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}),
        ("SVFT_INIT_", _lib.INITS, {"zero": "ZERO", "official": "OFFICIAL"}),
        ("SVFT_PLAN_", _lib.PLANS, {"auto": "AUTO", "factored": "FACTORED", "merged": "MERGED", "small-n": "SMALL_N"}),
    ]:
        in_header = {k: v for k, v in values.items() if k.startswith(prefix)}
        assert sorted(in_header) == sorted(prefix + s for s in spell.values()), f"{prefix}*: {sorted(in_header)}"
        for py_name, value in table.items():
            assert in_header[prefix + spell[py_name]] == value, f"{py_name}: header {in_header[prefix + spell[py_name]]}"
    version = re.search(r"#define\s+SVFT_ABI_VERSION\s+(\d+)", HEADER.read_text())
    assert version, "SVFT_ABI_VERSION not found in the header"
    assert int(version.group(1)) == _lib.ABI_VERSION


def test_the_check_itself_rejects_wrong_declarations():
    # A size_t declared as int32, a pointer as a scalar, a handle out-pointer as a plain pointer.
    assert not accepts("size_t", ctypes.c_int32)
    assert not accepts("float *", ctypes.c_float)
    assert not accepts("struct SvftLayer **", ctypes.c_void_p)
    assert not accepts("double *", ctypes.POINTER(ctypes.c_float))
    assert accepts("const struct SvftLayer *", ctypes.c_void_p)
    assert accepts("const char **", ctypes.POINTER(ctypes.c_char_p))
