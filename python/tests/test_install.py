"""The package under test is the installed one (`pip install .`, scripts/test-python.sh): `svft`
imports from the environment's site-packages, not from python/ of the checkout, and loads the
library installed inside the package, the version of Cargo.toml, with the CUDA kernels compiled
in whenever the build was asked to require them."""

import importlib.metadata
import os
import re
import struct
import sys
import sysconfig
from pathlib import Path

import _support  # noqa: F401  (ALLOWED_SKIPS, used by conftest.py)

import svft
from svft import _lib

ROOT = Path(__file__).resolve().parents[2]
# The header of a CUDA fat binary (fatbinary.h: FATBIN_MAGIC 0xBA55ED50, little-endian); build.rs
# embeds one in the library when nvcc compiled the kernels.
FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)


def cargo_version():
    text = (ROOT / "Cargo.toml").read_text()
    package = text.split("[package]", 1)[1].split("\n[", 1)[0]
    return re.search(r'^version\s*=\s*"([^"]+)"', package, re.M).group(1)


def test_imports_the_installed_package():
    package = Path(svft.__file__).resolve().parent
    site = {Path(sysconfig.get_path(k)).resolve() for k in ("purelib", "platlib")}
    assert any(package.parent == s for s in site), (
        f"svft imported from {package}, not from this interpreter's site-packages {sorted(map(str, site))}: "
        "the tests must run against the installed package (scripts/test-python.sh)"
    )
    assert sys.prefix != sys.base_prefix, f"{sys.executable} is not a venv's interpreter"
    assert Path(sys.prefix).resolve() in package.parents, f"{package} is not inside the venv {sys.prefix}"
    assert ROOT / "python" not in package.parents, f"{package} is the source checkout's python/svft"


def test_loads_the_library_inside_the_package(monkeypatch):
    package = Path(svft.__file__).resolve().parent
    shipped = package / ("libsvft" + sysconfig.get_config_var("EXT_SUFFIX"))
    assert shipped.is_file(), f"pip install did not put the library at {shipped}: {sorted(p.name for p in package.iterdir())}"
    # SVFT_LIB is an override (scripts/test-python.sh unsets it); without it the package's own copy wins.
    monkeypatch.delenv("SVFT_LIB", raising=False)
    assert _lib.library_path() == shipped
    # And the library this process has loaded is that file.
    assert Path(_lib.lib()._name).resolve() == shipped, _lib.lib()._name
    assert svft.version() == cargo_version()
    assert svft.backend_available("cpu"), svft.backend_unavailable_reason("cpu")
    # build.rs compiles the kernels in when it finds nvcc, and fails without them under
    # SVFT_REQUIRE_KERNELS=1 (scripts/test.sh and test-python.sh set it): then they must be here.
    if os.environ.get("SVFT_REQUIRE_KERNELS") == "1":
        assert FATBIN_MAGIC in shipped.read_bytes(), f"SVFT_REQUIRE_KERNELS=1 but {shipped} embeds no CUDA fatbin"


def test_distribution_metadata():
    assert importlib.metadata.version("svft") == cargo_version(), "pyproject.toml's version must be Cargo.toml's"
    requires = importlib.metadata.requires("svft") or []
    assert any(re.match(r"numpy\b", r) for r in requires), requires
    assert any(re.match(r"torch\b.*extra == \"torch\"", r) for r in requires), requires
    files = {str(f) for f in importlib.metadata.files("svft")}
    assert "svft/libsvft" + sysconfig.get_config_var("EXT_SUFFIX") in files, sorted(files)
