"""The CLI's file formats in NumPy: factor files and adapter files (safetensors), their FNV-1a
checksums, and the per-module seeds `svft init-adapter` uses. No torch needed.

Formats (as `src/formats/adapter.rs` writes and reads them, format version 2):

- **Factor file**: `{module}.svft_u` (d_out x r), `{module}.svft_s` (r), `{module}.svft_v`
  (d_in x r), f32 or the model's bf16/f16; metadata `format = svft-factors`, `format_version`,
  `crate_version`, `source`, `storage_dtype`, and `modules` (JSON): `{module: {weight, d_out,
  d_in, rank, dtype, checksum, residual, meta_checksum}}`.
- **Adapter file**: `{module}.s_edge` (M, f32), `{module}.gate` (gamma, f32, shape [1]),
  `{module}.s_row` / `{module}.s_col` (i64); metadata `format = svft-adapter`, ..., and
  `modules`: `{module: {weight, pattern, rank, topk_criterion, init, gate, seed, d_out, d_in,
  dtype, base_checksum, data_checksum, meta_checksum}}`.

A module's name is its weight's tensor name without `.weight`: for a checkpoint saved from a
PyTorch model (`model.state_dict()`, `save_pretrained`), that is the module's qualified name in
`model.named_modules()`.

Checksums are 64-bit FNV-1a, written `fnv1a64:` and 16 hex digits. The base checksum runs over
d_out, d_in, r (u64 little-endian), then the f32 bit patterns of U, s, V (row-major) as stored;
the data checksum over M and gamma (f32), then rows and cols (i64); the meta checksum over every
other field of the module's metadata (`meta_checksum` below), so no field can be edited unseen. They are computed in pure
Python here (a few MB/s): factor files' recorded checksums are trusted unless `verify=True`.

Seeds: `module_seed(seed, name) = splitmix64(seed ^ fnv1a64(name.encode()))` (u64 arithmetic),
the Rust `svft::adapter::module_seed`. Module `name` gets M's official init seeded with
`module_seed(seed, name)`; a random pattern `random:D:seed=S` becomes
`random:D:seed={module_seed(S, name)}` (S = `seed` when the spec names none).
"""

import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np

FORMAT_VERSION = 2
FACTORS_FORMAT = "svft-factors"
ADAPTER_FORMAT = "svft-adapter"
_M64 = (1 << 64) - 1
_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3

#: The weights `svft decompose` targets by default (src/formats/checkpoint.rs DEFAULT_TARGETS),
#: matched with re.search against a weight's tensor name (`{module}.weight`).
DEFAULT_TARGETS = (
    r"(^|\.)(q_proj|k_proj|v_proj|o_proj|out_proj|qkv_proj|query|key|value|query_key_value|gate_proj|up_proj|"
    r"down_proj|fc1|fc2|c_attn|c_proj|c_fc|dense_h_to_4h|dense_4h_to_h|wq|wk|wv|wo|w1|w2|w3|attention\.output\.dense|"
    r"intermediate\.dense|output\.dense)\.weight$"
)


# ---- hashing and seeds ------------------------------------------------------------------------
def fnv1a64(data, h=_FNV_OFFSET):
    """64-bit FNV-1a of `data` (bytes-like), continuing from state `h`."""
    for b in bytes(data):
        h = ((h ^ b) * _FNV_PRIME) & _M64
    return h


def splitmix64(x):
    """SplitMix64's output for state `x` (the Rust `svft::adapter::splitmix64`)."""
    z = (x + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def module_seed(seed, name):
    """The seed module `name` gets from base `seed`: splitmix64(seed ^ fnv1a64(name utf-8))."""
    return splitmix64((int(seed) & _M64) ^ fnv1a64(name.encode()))


def module_pattern(spec, seed, name):
    """The pattern spec module `name` gets from a config's `spec`: random patterns get a
    per-module seed (`random:D[:seed=S]` -> `random:D:seed={module_seed(S or seed, name)}`);
    every other spec is returned as given."""
    parts = spec.strip().split(":")
    if parts[0].lower() != "random":
        return spec
    if len(parts) < 2 or len(parts) > 3:
        raise ValueError(f"bad pattern spec `{spec}`: expected random:D[:seed=S]")
    base = seed
    if len(parts) == 3:
        if not parts[2].startswith("seed="):
            raise ValueError(f"bad pattern spec `{spec}`: expected `seed=S` after `random:D:`")
        base = int(parts[2][len("seed="):])
    return f"random:{int(parts[1])}:seed={module_seed(base, name)}"


def _u64s(*values):
    return b"".join(struct.pack("<Q", int(v)) for v in values)


def factors_checksum(u, s, v):
    """The base checksum of factors u (d_out x r), s (r), v (d_in x r), over their f32 values."""
    u, s, v = (np.ascontiguousarray(a, dtype="<f4") for a in (u, s, v))
    h = fnv1a64(_u64s(u.shape[0], v.shape[0], s.size))
    for a in (u, s, v):
        h = fnv1a64(a.tobytes(), h)
    return f"fnv1a64:{h:016x}"


def data_checksum(coefficients, gamma, rows, cols):
    """The data checksum of one adapter module."""
    h = fnv1a64(np.ascontiguousarray(coefficients, dtype="<f4").tobytes())
    h = fnv1a64(np.asarray([gamma], dtype="<f4").tobytes(), h)
    h = fnv1a64(np.ascontiguousarray(rows, dtype="<i8").tobytes(), h)
    h = fnv1a64(np.ascontiguousarray(cols, dtype="<i8").tobytes(), h)
    return f"fnv1a64:{h:016x}"


def meta_checksum(obj):
    """The checksum of one module's metadata dict: FNV-1a over `key=value\\n` for every key but
    `meta_checksum`, keys sorted, strings as UTF-8, ints in decimal, bools as true/false, floats
    as their f64 bit pattern in 16 hex digits (src/formats/meta.rs `meta_checksum`)."""
    h = _FNV_OFFSET
    for k in sorted(obj):
        if k == "meta_checksum":
            continue
        v = obj[k]
        if isinstance(v, bool):
            text = "true" if v else "false"
        elif isinstance(v, int):
            text = str(v)
        elif isinstance(v, float):
            text = f"{struct.unpack('<Q', struct.pack('<d', v))[0]:016x}"
        elif isinstance(v, str):
            text = v
        else:
            text = json.dumps(v, separators=(",", ":"))
        h = fnv1a64(f"{k}={text}\n".encode(), h)
    return f"fnv1a64:{h:016x}"


def file_checksum(metadata):
    """The checksum of a whole `__metadata__` string map: FNV-1a over `key=value\\n` for every key
    but `file_checksum`, sorted (src/formats/meta.rs `file_checksum`)."""
    h = _FNV_OFFSET
    for k in sorted(metadata):
        if k != "file_checksum":
            h = fnv1a64(f"{k}={metadata[k]}\n".encode(), h)
    return f"fnv1a64:{h:016x}"


def seal_file(metadata):
    """Adds (or renews) `file_checksum`; call it after the last change to the metadata."""
    metadata = {str(k): str(v) for k, v in metadata.items() if k != "file_checksum"}
    metadata["file_checksum"] = file_checksum(metadata)
    return metadata


def _sealed(obj):
    obj = dict(obj)
    obj["meta_checksum"] = meta_checksum(obj)
    return obj


def _check_module(path, name, info, keys):
    """What every module entry must satisfy (as the Rust reader checks it)."""
    if not isinstance(info, dict):
        raise ValueError(f"{path}: corrupt metadata for `{name}`")
    for key in keys:
        if key not in info:
            raise ValueError(f"{path}: corrupt metadata: module `{name}` lacks `{key}`")
    got = meta_checksum(info)
    if info.get("meta_checksum") != got:
        raise ValueError(f"{path}: corrupt metadata: the fields of module `{name}` have checksum {got} but the "
                         f"file records {info.get('meta_checksum')} (edited or damaged)")
    if module_name(info["weight"]) != name:
        raise ValueError(f"{path}: corrupt metadata: module `{name}` names the weight `{info['weight']}`, which is "
                         f"not its own")
    d_out, d_in, rank = (info[k] for k in ("d_out", "d_in", "rank"))
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (d_out, d_in, rank)) or not (
            d_out > 0 and d_in > 0 and 0 < rank <= min(d_out, d_in)):
        raise ValueError(f"{path}: corrupt metadata: module `{name}` is {d_out}x{d_in} of rank {rank}")


# ---- safetensors --------------------------------------------------------------------------------
_ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4", "U8": "u1",
              "I8": "i1", "BOOL": "?"}
_NP_TO_ST = {np.dtype("<f8"): "F64", np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<i8"): "I64",
             np.dtype("<i4"): "I32", np.dtype("u1"): "U8", np.dtype("i1"): "I8", np.dtype("?"): "BOOL"}


def bf16_to_f32(bits):
    """bf16 bit patterns (uint16) to float32, exactly."""
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(values):
    """float32 to bf16 bit patterns (uint16), rounding to nearest even (as the `half` crate)."""
    x = np.ascontiguousarray(values, np.float32).view(np.uint32)
    nan = (x & 0x7FFFFFFF) > 0x7F800000
    rounded = ((x + 0x7FFF + ((x >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(nan, ((x >> 16) | 0x40).astype(np.uint16), rounded)


def read_safetensors(path):
    """(tensors, metadata) of one safetensors file: {name: (st_dtype, ndarray)} (BF16 as uint16
    bit patterns) and the `__metadata__` string map."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < 8:
        raise ValueError(f"{path}: truncated or not a safetensors file ({len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > len(data):
        raise ValueError(f"{path}: truncated header")
    header = json.loads(data[8:8 + n].decode())
    meta = header.pop("__metadata__", {}) or {}
    body = memoryview(data)[8 + n:]
    tensors = {}
    for name, info in header.items():
        dt = info["dtype"]
        if dt not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor `{name}` has unsupported dtype {dt}")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        arr = np.frombuffer(body[begin:end], dtype=_ST_DTYPES[dt])
        if arr.size != int(np.prod(shape, dtype=np.int64)):
            raise ValueError(f"{path}: tensor `{name}` does not fit its shape {shape}")
        tensors[name] = (dt, arr.reshape(shape).copy())
    return tensors, dict(meta)


def write_safetensors(path, tensors, metadata):
    """Writes {name: ndarray or (st_dtype, ndarray)} with a `__metadata__` string map, through a
    temporary file renamed into place (as the CLI does)."""
    path = Path(path)
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name]
        dt, arr = t if isinstance(t, tuple) else (_NP_TO_ST[np.asarray(t).dtype.newbyteorder("<")], t)
        arr = np.ascontiguousarray(arr, dtype=_ST_DTYPES[dt])
        raw = arr.tobytes()
        header[name] = {"dtype": dt, "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    # Sorted keys: the same tensors and metadata give the same bytes (as the CLI's writer).
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    text += b" " * (-len(text) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for raw in chunks:
                f.write(raw)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _base_metadata(fmt, modules):
    from . import version

    try:
        crate = version()
    except Exception:  # the library is not needed to write a file
        crate = "python"
    return {"format": fmt, "format_version": str(FORMAT_VERSION), "crate_version": crate,
            "modules": json.dumps(modules, sort_keys=True, separators=(",", ":"))}


def _check_format(path, meta, want):
    what = "adapter" if want == ADAPTER_FORMAT else "factor file"
    got = meta.get("format")
    if got != want:
        raise ValueError(f"{path}: not an SVFT {what} (its format is `{got}`)")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise ValueError(f"{path}: unsupported {what} format version `{meta.get('format_version')}` "
                         f"(this package reads version {FORMAT_VERSION})")
    if meta.get("file_checksum") != file_checksum(meta):
        raise ValueError(f"{path}: corrupt metadata: it has checksum {file_checksum(meta)} but the file records "
                         f"{meta.get('file_checksum')} (edited or damaged)")
    try:
        modules = json.loads(meta["modules"])
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: corrupt metadata: `modules` ({e})") from None
    if not isinstance(modules, dict):
        raise ValueError(f"{path}: corrupt metadata: `modules` is not a JSON object")
    return modules


def module_name(weight):
    """A weight's module name: its tensor name without a trailing `.weight`."""
    return weight[: -len(".weight")] if weight.endswith(".weight") else weight


# ---- factor files -------------------------------------------------------------------------------
def _to_f32(dt, arr):
    if dt == "BF16":
        return bf16_to_f32(arr)
    if dt in ("F32", "F16"):
        return arr.astype(np.float32)
    raise ValueError(f"factor tensors must be f32, bf16 or f16, got {dt}")


class FactorFile:
    """An opened factor file (`svft decompose`'s output, or `write_factors`'). `modules`:
    {module: info dict}; `load(module)` returns (u, s, v) as float32 arrays."""

    def __init__(self, path):
        self.path = Path(path)
        self._tensors, meta = read_safetensors(self.path)
        self.metadata = meta
        self.modules = _check_format(self.path, meta, FACTORS_FORMAT)
        for name, info in self.modules.items():
            _check_module(self.path, name, info, ("weight", "d_out", "d_in", "rank", "dtype", "checksum", "residual"))
            for suffix, shape in (("u", (info["d_out"], info["rank"])), ("s", (info["rank"],)),
                                  ("v", (info["d_in"], info["rank"]))):
                t = self._tensors.get(f"{name}.svft_{suffix}")
                if t is None or t[1].shape != shape:
                    raise ValueError(f"{self.path}: corrupt: `{name}.svft_{suffix}` missing or not of shape {shape}")

    def load(self, module, verify=False):
        """(u, s, v) float32 of `module`; with verify, checks them against the recorded checksum."""
        if module not in self.modules:
            raise KeyError(f"{self.path}: no module `{module}` in this factor file")
        u, s, v = (_to_f32(*self._tensors[f"{module}.svft_{x}"]) for x in "usv")
        if verify:
            got, want = factors_checksum(u, s, v), self.modules[module]["checksum"]
            if got != want:
                raise ValueError(f"{self.path}: corrupt: the factors of `{module}` have checksum {got}, "
                                 f"the file records {want}")
        return u, s, v


def write_factors(path, modules, source="python"):
    """Writes a factor file (f32) from {module: dict(weight, dtype, u, s, v[, residual])}
    (dtype: the weight's "f32", "bf16" or "f16"). Returns {module: checksum}."""
    tensors, meta, sums = {}, {}, {}
    for name, m in modules.items():
        u, s, v = (np.ascontiguousarray(m[k], np.float32) for k in ("u", "s", "v"))
        sums[name] = factors_checksum(u, s, v)
        meta[name] = _sealed({"weight": m.get("weight", f"{name}.weight"), "d_out": int(u.shape[0]),
                              "d_in": int(v.shape[0]), "rank": int(s.size), "dtype": m.get("dtype", "f32"),
                              "checksum": sums[name], "residual": float(m.get("residual", 0.0))})
        if module_name(meta[name]["weight"]) != name:
            raise ValueError(f"module `{name}`: its weight must be `{name}.weight` (or `{name}`), not "
                             f"`{meta[name]['weight']}`")
        tensors[f"{name}.svft_u"], tensors[f"{name}.svft_s"], tensors[f"{name}.svft_v"] = u, s, v
    metadata = _base_metadata(FACTORS_FORMAT, meta)
    metadata.update(source=str(source), storage_dtype="f32")
    write_safetensors(path, tensors, seal_file(metadata))
    return sums


# ---- adapter files ------------------------------------------------------------------------------
def _criterion(spec):
    parts = spec.strip().lower().split(":")
    if parts[0] not in ("topk", "top_k"):
        return "none"
    return "official" if len(parts) > 2 and parts[2] == "official" else "paper"


def read_adapter(path):
    """{module: dict(weight, pattern, rank, topk_criterion, init, gate, seed, d_out, d_in, dtype,
    base_checksum, coefficients (f32), gamma (float), rows, cols (int64))}, every module's data
    checksum and index range checked."""
    path = Path(path)
    tensors, meta = read_safetensors(path)
    modules = _check_format(path, meta, ADAPTER_FORMAT)
    out = {}
    for name, info in modules.items():
        _check_module(path, name, info, ("weight", "pattern", "rank", "topk_criterion", "init", "gate", "seed",
                                         "d_out", "d_in", "dtype", "base_checksum", "data_checksum"))

        def get(suffix, dtype):
            t = tensors.get(f"{name}.{suffix}")
            if t is None:
                raise ValueError(f"{path}: corrupt: no tensor `{name}.{suffix}`")
            if t[0] != dtype:
                raise ValueError(f"{path}: `{name}.{suffix}` is {t[0]}, expected {dtype}")
            return t[1].reshape(-1)

        m, gate = get("s_edge", "F32"), get("gate", "F32")
        rows, cols = get("s_row", "I64"), get("s_col", "I64")
        rank = int(info["rank"])
        if gate.size != 1 or rows.size != m.size or cols.size != m.size:
            raise ValueError(f"{path}: corrupt: the tensors of module `{name}` have mismatched sizes")
        for arr, what in ((rows, "s_row"), (cols, "s_col")):
            if arr.size and (arr.min() < 0 or arr.max() >= rank):
                raise ValueError(f"{path}: corrupt: `{name}.{what}` holds an index outside the rank {rank}")
        entry = dict(info)
        entry.update(coefficients=m.astype(np.float32), gamma=float(gate[0]), rows=rows.astype(np.int64),
                     cols=cols.astype(np.int64))
        got = data_checksum(m, gate[0], rows, cols)
        if got != info.get("data_checksum"):
            raise ValueError(f"{path}: corrupt: the data of module `{name}` has checksum {got} but the file "
                             f"records {info.get('data_checksum')}")
        out[name] = entry
    return out


def write_adapter(path, modules):
    """Writes an adapter file from {module: dict(weight, pattern, rank, init, gate, seed, d_out,
    d_in, dtype, base_checksum, coefficients, gamma, rows, cols)}."""
    tensors, meta = {}, {}
    for name, m in modules.items():
        coeffs = np.ascontiguousarray(m["coefficients"], np.float32).reshape(-1)
        rows = np.ascontiguousarray(m["rows"], np.int64).reshape(-1)
        cols = np.ascontiguousarray(m["cols"], np.int64).reshape(-1)
        if rows.size != coeffs.size or cols.size != coeffs.size:
            raise ValueError(f"module `{name}`: pattern and coefficients differ in size")
        gamma = np.float32(m["gamma"])
        if m["dtype"] not in ("f32", "bf16", "f16"):
            raise ValueError(f"module `{name}`: the adapter format records f32, bf16 or f16 weights, not {m['dtype']}")
        if module_name(m["weight"]) != name:
            raise ValueError(f"module `{name}`: its weight must be `{name}.weight` (or `{name}`), not `{m['weight']}`")
        meta[name] = _sealed({
            "weight": m["weight"], "pattern": m["pattern"], "rank": int(m["rank"]),
            "topk_criterion": _criterion(m["pattern"]), "init": m["init"], "gate": bool(m["gate"]),
            "seed": int(m["seed"]) & _M64, "d_out": int(m["d_out"]), "d_in": int(m["d_in"]), "dtype": m["dtype"],
            "base_checksum": m["base_checksum"], "data_checksum": data_checksum(coeffs, gamma, rows, cols),
        })
        tensors[f"{name}.s_edge"] = coeffs
        tensors[f"{name}.gate"] = np.asarray([gamma], np.float32)
        tensors[f"{name}.s_row"], tensors[f"{name}.s_col"] = rows, cols
    write_safetensors(path, tensors, seal_file(_base_metadata(ADAPTER_FORMAT, meta)))
