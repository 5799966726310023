"""The part of the package build that pyproject.toml cannot state: the Rust library.

setuptools-rust runs cargo on Cargo.toml (release profile) and copies the crate's cdylib into the
`svft` package as svft/libsvft<EXT_SUFFIX> (e.g. libsvft.cpython-311-x86_64-linux-gnu.so), where
svft/_lib.py looks for it. Binding.NoBinding: the library is a plain C ABI loaded with ctypes, not
a Python extension module, so no PyO3 or Python headers are involved.

Environment:
  SVFT_CARGO_FEATURES  extra cargo features, comma- or space-separated (scripts/test-python.sh
                       passes `interpret`, the features of the build that scripts/test.sh just
                       made, so cargo finds that build up to date instead of compiling again).
  CUDA_HOME, NVCC, SVFT_REQUIRE_KERNELS, ...
                       read by build.rs exactly as for `cargo build`: the CUDA kernels are
                       compiled in when nvcc is found (scripts/install-cuda-toolchain.sh).
  CARGO_TARGET_DIR     cargo's usual override; by default pip builds in the checkout (in-tree),
                       so cargo uses the repository's target/ and reuses whatever it has built.
"""

import os

from setuptools import setup
from setuptools_rust import Binding, RustExtension

features = os.environ.get("SVFT_CARGO_FEATURES", "").replace(",", " ").split()

library = RustExtension(
    "svft.libsvft",
    path="Cargo.toml",
    binding=Binding.NoBinding,
    features=features,
    # A C ABI library: the file name must not claim a stable-ABI (abi3) Python module.
    py_limited_api=False,
)
# setuptools-rust builds with `cargo rustc --lib --crate-type cdylib`; a crate-type set other than
# Cargo.toml's is another build of the crate to cargo, so the next `cargo build` would compile it
# again, and so on back and forth. Asking for exactly the [lib] crate types of Cargo.toml makes
# this the very build that `cargo build --release --lib` does: with the same features and
# environment it is up to date. They come from cargo's metadata, which setuptools-rust loads for
# its build anyway (cached per `quiet` flag; False is the one its build asks with).
try:
    metadata = library.metadata(quiet=False)
except OSError as e:
    raise SystemExit(f"installing svft builds its Rust library, and cargo could not run ({e}): install Rust (rustup.rs)")
package = next(p for p in metadata["packages"] if p["id"] == metadata["resolve"]["root"])
crate_types = next(t["crate_types"] for t in package["targets"] if "lib" in t["kind"] or "cdylib" in t["kind"])
if "cdylib" not in crate_types:
    raise SystemExit(f"Cargo.toml's [lib] crate-type {crate_types} has no cdylib: there is no libsvft to install")
library.args = ("--crate-type", ",".join(crate_types))

setup(
    rust_extensions=[library],
    # setuptools' staging directories go under target/ (already git-ignored build output)
    # instead of a build/ and python/svft.egg-info in the checkout.
    options={
        "build": {"build_base": "target/python-build"},
        "egg_info": {"egg_base": "target/python-build"},
    },
    zip_safe=False,  # ctypes loads the library from a real file
)
