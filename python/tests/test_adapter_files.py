"""The CLI's file formats from Python (svft.files, NumPy only): per-module seeds pinned against
the Rust constants and the CLI's `init-adapter`, factor-file checksums against `decompose`'s,
adapters written here merged by `svft merge` and read back by `svft inspect`, and corruption
caught on both sides. The CLI tests need the `svft` binary ($SVFT_CLI, else next to the
library, else target/release/svft: `cargo build --release --features interpret`, the features
of the library); without it they fail, saying so."""

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import _support
from _support import rel_err

import numpy as np

import svft
from svft import Layer, files

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-5


def cli_path():
    """The svft binary (a missing one fails the test: it is part of what these tests check)."""
    candidates = [os.environ.get("SVFT_CLI")]
    try:
        candidates.append(str(Path(svft.library_path()).resolve().parent / "svft"))
    except (OSError, AttributeError):
        pass
    candidates.append(str(ROOT / "target" / "release" / "svft"))
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    raise AssertionError("the svft CLI binary is not built: cargo build --release --features interpret "
                         "(or point SVFT_CLI at it)")


def cli(*args, ok=True):
    """Runs the CLI; returns stdout (ok) or the failure's stderr (ok=False)."""
    p = subprocess.run([cli_path(), *map(str, args)], capture_output=True, text=True, timeout=300)
    if ok:
        assert p.returncode == 0, f"svft {' '.join(map(str, args))} failed:\n{p.stderr}"
        return p.stdout
    assert p.returncode != 0, f"svft {' '.join(map(str, args))} should have failed"
    return p.stderr


class TempDir:
    def __enter__(self):
        self.path = Path(tempfile.mkdtemp(prefix="svft-files-"))
        return self.path

    def __exit__(self, *exc):
        shutil.rmtree(self.path, ignore_errors=True)


# Modules of a tiny BERT-like checkpoint: square attention, rectangular MLP (d_out != d_in).
SHAPES = {
    "encoder.layer.0.attention.self.query": (20, 20),
    "encoder.layer.0.attention.self.value": (20, 20),
    "encoder.layer.0.intermediate.dense": (33, 20),
    "encoder.layer.0.output.dense": (20, 33),
}


def _checkpoint(path, seed=0):
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in SHAPES.items():
        tensors[f"{name}.weight"] = rng.standard_normal(shape).astype(np.float32)
        tensors[f"{name}.bias"] = rng.standard_normal(shape[0]).astype(np.float32)
    tensors["embeddings.word_embeddings.weight"] = rng.standard_normal((11, 20)).astype(np.float32)
    files.write_safetensors(path, tensors, {"format": "pt"})
    return tensors


def test_meta_checksum_is_pinned_and_matches_rust():
    # The same object and value as src/formats/meta.rs `meta_checksum_is_pinned_and_covers_every_field`.
    obj = {"weight": "fc1.weight", "d_out": 12, "d_in": 7, "rank": 7, "dtype": "bf16",
           "checksum": "fnv1a64:0123456789abcdef", "residual": 1.5e-7, "gate": True, "seed": 2**64 - 1,
           "meta_checksum": "ignored"}
    assert files.meta_checksum(obj) == "fnv1a64:95150d8bbf921c56"
    src = (ROOT / "src" / "formats" / "meta.rs").read_text()
    assert '"fnv1a64:95150d8bbf921c56"' in src, "the Rust pin changed: change both"
    for key in obj:
        if key != "meta_checksum":
            assert files.meta_checksum({**obj, key: "other"}) != files.meta_checksum(obj), key


def test_module_seed_is_pinned_and_matches_rust():
    # FNV-1a's published vectors, SplitMix64, and the golden values of src/formats/meta.rs.
    assert files.fnv1a64(b"") == 0xCBF29CE484222325
    assert files.fnv1a64(b"a") == 0xAF63DC4C8601EC8C
    assert files.fnv1a64(b"foobar") == 0x85944171F73967E8
    assert files.splitmix64(0) == 0xE220A8397B1DCDAF
    names = ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.key", "fc1"]
    got = [files.module_seed(42, n) for n in names]
    assert got == [0x9967B7F4C37261C1, 0xFE88682435DFA0A1, 0x300F459BE75AE763], [hex(g) for g in got]
    src = (ROOT / "src" / "formats" / "meta.rs").read_text()
    golden = re.search(r"const GOLDEN: \[u64; 3\] = \[([^\]]*)\]", src)
    assert golden, "GOLDEN constant not found in meta.rs"
    rust = [int(x.strip().replace("_", ""), 16) for x in golden.group(1).split(",")]
    assert rust == got, "the Rust and Python module_seed goldens differ"
    # Random specs derive per module; S is the base when given; others pass through.
    n = names[0]
    assert files.module_pattern("random:3", 9, n) == f"random:3:seed={files.module_seed(9, n)}"
    assert files.module_pattern("random:3:seed=7", 9, n) == f"random:3:seed={files.module_seed(7, n)}"
    assert files.module_pattern("banded:2", 9, n) == "banded:2"
    assert files.module_seed(2**64 + 5, n) == files.module_seed(5, n)  # u64 arithmetic


def test_default_targets_match_the_cli():
    src = (ROOT / "src" / "formats" / "checkpoint.rs").read_text()
    m = re.search(r'pub const DEFAULT_TARGETS: &str = r"(.*)";', src)
    assert m and m.group(1) == files.DEFAULT_TARGETS


def test_adapter_round_trip_is_bitwise_and_corruption_is_caught():
    rng = np.random.default_rng(1)
    entry = {
        "weight": "a.b.weight", "pattern": "random:2:seed=99", "rank": 9, "init": "official", "gate": True,
        "seed": 2**64 - 3, "d_out": 9, "d_in": 14, "dtype": "bf16", "base_checksum": "fnv1a64:0123456789abcdef",
        "coefficients": rng.standard_normal(41).astype(np.float32), "gamma": -0.3125,
        "rows": rng.integers(0, 9, 41), "cols": rng.integers(0, 9, 41),
    }
    with TempDir() as d:
        path = d / "a.safetensors"
        files.write_adapter(path, {"a.b": entry})
        back = files.read_adapter(path)["a.b"]
        assert back["coefficients"].tobytes() == entry["coefficients"].tobytes()
        assert np.float32(back["gamma"]) == np.float32(entry["gamma"])
        assert np.array_equal(back["rows"], entry["rows"]) and np.array_equal(back["cols"], entry["cols"])
        assert back["rows"].dtype == np.int64
        for k in ("weight", "pattern", "rank", "init", "gate", "seed", "d_out", "d_in", "dtype", "base_checksum"):
            assert back[k] == entry[k], k
        assert back["topk_criterion"] == "none"
        # One flipped bit in a coefficient: the data checksum refuses the file.
        tensors, meta = files.read_safetensors(path)
        dt, m = tensors["a.b.s_edge"]
        m = m.copy()
        m.view(np.uint32)[3] ^= 1
        tensors["a.b.s_edge"] = (dt, m)
        files.write_safetensors(path, tensors, meta)
        try:
            files.read_adapter(path)
        except ValueError as e:
            assert "checksum" in str(e) and "a.b" in str(e)
        else:
            raise AssertionError("a corrupt adapter loaded")


def test_factor_checksums_and_init_adapter_agree_with_the_cli():
    """`svft decompose` checksums verify here; `svft init-adapter` (random pattern, official
    init) equals the same adapter made here with the same config: patterns and coefficients
    bitwise, per-module seeds as documented."""
    with TempDir() as d:
        _checkpoint(d / "model.safetensors")
        cli("decompose", d / "model.safetensors", "-o", d / "f.safetensors", "--backend", "cpu")
        ff = files.FactorFile(d / "f.safetensors")
        assert sorted(ff.modules) == sorted(SHAPES)
        for name in SHAPES:
            ff.load(name, verify=True)  # the checksum computed here equals the Rust one
        for pattern, seed in (("random:2", 5), ("random:3:seed=7", 1), ("banded:1", 3)):
            out = d / "a.safetensors"
            cli("init-adapter", "--factors", d / "f.safetensors", "-o", out, "--pattern", pattern, "--init",
                "official", "--seed", seed)
            adapter = files.read_adapter(out)
            assert sorted(adapter) == sorted(SHAPES)
            for name, e in adapter.items():
                assert e["seed"] == files.module_seed(seed, name)
                spec = files.module_pattern(pattern, seed, name)
                assert e["pattern"] == spec, (e["pattern"], spec)
                assert e["base_checksum"] == ff.modules[name]["checksum"]
                u, s, v = ff.load(name)
                with Layer.from_factors(u, s, v, pattern=spec, init="official", gate=True, seed=e["seed"]) as layer:
                    rows, cols = layer.indices()
                    assert np.array_equal(rows, e["rows"]) and np.array_equal(cols, e["cols"]), name
                    assert layer.coefficients.tobytes() == e["coefficients"].tobytes(), name
            if pattern.startswith("random"):  # per module: the square modules' patterns differ
                assert not np.array_equal(adapter[list(SHAPES)[0]]["rows"], adapter[list(SHAPES)[1]]["rows"])


def test_adapter_written_here_merges_with_the_cli():
    with TempDir() as d:
        _checkpoint(d / "model.safetensors", seed=3)
        cli("decompose", d / "model.safetensors", "-o", d / "f.safetensors", "--backend", "cpu")
        ff = files.FactorFile(d / "f.safetensors")
        rng = np.random.default_rng(4)
        entries, want = {}, {}
        for name in SHAPES:
            u, s, v = ff.load(name)
            spec = files.module_pattern("random:2:seed=3", 0, name)
            with Layer.from_factors(u, s, v, pattern=spec, init="official", gate=True, seed=1) as layer:
                layer.coefficients = rng.standard_normal(layer.nnz).astype(np.float32)
                layer.gamma = 0.4
                rows, cols = layer.indices()
                w64, _, _ = _support.reference(layer)
                want[name] = w64
                entries[name] = {
                    "weight": f"{name}.weight", "pattern": spec, "rank": layer.rank, "init": "official",
                    "gate": True, "seed": 1, "d_out": layer.d_out, "d_in": layer.d_in, "dtype": "f32",
                    "base_checksum": ff.modules[name]["checksum"], "coefficients": layer.coefficients,
                    "gamma": layer.gamma, "rows": rows, "cols": cols,
                }
        files.write_adapter(d / "a.safetensors", entries)
        info = json.loads(cli("inspect", d / "a.safetensors", "--json"))
        assert info["kind"] == "svft-adapter" and len(info["modules"]) == len(SHAPES)
        cli("merge", "--factors", d / "f.safetensors", "--adapter", d / "a.safetensors", "-o", d / "m.safetensors")
        merged, _ = files.read_safetensors(d / "m.safetensors")
        for name in SHAPES:
            dt, w = merged[f"{name}.weight"]
            assert dt == "F32" and w.shape == SHAPES[name]
            assert rel_err(w, want[name]) < TOL, (name, rel_err(w, want[name]))
        # A wrong base checksum: the CLI refuses to merge, naming the module.
        entries[name]["base_checksum"] = "fnv1a64:0000000000000000"
        files.write_adapter(d / "bad.safetensors", entries)
        err = cli("merge", "--factors", d / "f.safetensors", "--adapter", d / "bad.safetensors", "-o",
                  d / "x.safetensors", ok=False)
        assert "wrong base" in err and name in err, err
