#!/usr/bin/env bash
# The Python package's tests (python/svft over the C ABI), against the package as users install it:
# 1. a venv in .cache/py-venv with the exact pins of python/requirements-test.txt (PyTorch from
#    PyPI with its NVIDIA CUDA runtime wheels, transformers, peft, pytest, the build backend). It
#    is rebuilt from scratch only when that file (or python3's version) changes: their hash is kept
#    in the venv, so a re-run starts at once; pip's download cache (~/.cache/pip) spares a fresh
#    clone's first run the downloads when the machine keeps it.
# 2. `pip install .[torch]` of this checkout into it (not editable): setuptools-rust runs cargo
#    (features: $SVFT_CARGO_FEATURES, default `interpret`, those of scripts/test.sh's build, so
#    cargo finds the crate it just built up to date) and installs libsvft inside the package.
# 3. pytest on python/tests, run from python/tests/ so that `import svft` can only find the
#    installed package (test_install.py checks it). -rfEs lists failures, errors and every skip
#    with its reason; conftest.py makes every skip a failure but those for a machine without a
#    CUDA device.
# Arguments go to pytest (e.g. scripts/test-python.sh -k numpy).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"

# The build environment of scripts/test.sh: build.rs re-runs, and cargo recompiles the crate, when
# CUDA_HOME or SVFT_REQUIRE_KERNELS differ from the last build's.
if [ -z "${CUDA_HOME:-}" ]; then
    CUDA_HOME="$(scripts/install-cuda-toolchain.sh | tail -n 1 | xargs dirname | xargs dirname)"
    export CUDA_HOME
fi
export SVFT_REQUIRE_KERNELS="${SVFT_REQUIRE_KERNELS-1}"
FEATURES="${SVFT_CARGO_FEATURES-interpret}"

VENV=.cache/py-venv
PY="$ROOT/$VENV/bin/python"  # absolute: pytest runs from python/tests
REQS=python/requirements-test.txt
STAMP="$VENV/requirements-test.stamp"
want="$(sha256sum "$REQS" | cut -d' ' -f1) $(python3 --version 2>&1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ] || ! "$PY" -c '' 2>/dev/null; then
    echo "== Python venv in $VENV from $REQS (first run: PyTorch and its CUDA wheels, a few GB)"
    start=$SECONDS
    rm -rf "$VENV"  # from scratch: nothing left over from older pins
    python3 -m venv "$VENV"
    "$PY" -m pip install --quiet --disable-pip-version-check -r "$REQS"
    printf '%s\n' "$want" > "$STAMP"  # last: an interrupted install is redone next time
    echo "   venv ready in $((SECONDS - start)) s"
fi

echo "== pip install .[torch] (libsvft by cargo through setuptools-rust, features: ${FEATURES:-none})"
# setuptools stages the package in target/python-build (setup.py) and never deletes from there:
# start empty, so a module removed from python/svft is not installed from a stale copy.
rm -rf target/python-build
# --no-build-isolation: the build backend comes pinned from the venv (no download), and PATH stays
# as it is; pip's isolated build prepends its own bin directories to PATH, and build.rs re-runs
# on a PATH change (it looks for nvcc there), so the crate would compile here and again in the
# next cargo command.
start=$SECONDS
SVFT_CARGO_FEATURES="$FEATURES" "$PY" -m pip install --quiet --disable-pip-version-check --no-build-isolation ".[torch]"
echo "   installed in $((SECONDS - start)) s"
"$PY" -m pip check --disable-pip-version-check  # the pins and the package agree with every dependency

# The CLI tests (test_adapter_files, test_workflow) run the svft binary; scripts/test.sh's cargo
# test has built it, with these features, so this is a no-op there.
cargo build --release --features "$FEATURES" --bin svft
export SVFT_CLI="$ROOT/target/release/svft"

if [ -n "${SVFT_LIB:-}" ]; then
    echo "(unsetting SVFT_LIB=$SVFT_LIB: these tests load the library installed in the package)"
    unset SVFT_LIB
fi

echo "== pytest python/tests against the installed package"
cd python/tests
"$PY" -m pytest -q -rfEs -o cache_dir="$ROOT/.cache/pytest" "$@"
