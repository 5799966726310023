#!/usr/bin/env bash
# The Python package's tests (python/svft over the C ABI):
# 1. a venv in .cache/py-venv with NumPy (created once; --system-site-packages, so a
#    system-wide PyTorch is visible to the PyTorch tests);
# 2. the shared library: $SVFT_LIB if set, else `cargo build --release --lib $SVFT_CARGO_ARGS`
#    (pass the same features as the preceding cargo test, e.g. SVFT_CARGO_ARGS="--features
#    interpret", so nothing rebuilds);
# 3. python/tests with pytest when the venv has it, else python/tests/run.py. The NumPy tests
#    run everywhere; the PyTorch tests skip with a printed reason where torch is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=.cache/py-venv
PY="$VENV/bin/python"
if ! "$PY" -c "import numpy" 2>/dev/null; then
    echo "== Python venv with NumPy in $VENV"
    python3 -m venv --system-site-packages "$VENV"
    "$PY" -m pip install --quiet --disable-pip-version-check numpy
fi

if [ -z "${SVFT_LIB:-}" ]; then
    echo "== libsvft.so (cargo build --release --lib ${SVFT_CARGO_ARGS:-})"
    # shellcheck disable=SC2086
    cargo build --release --lib ${SVFT_CARGO_ARGS:-}
    SVFT_LIB="$(pwd)/target/release/libsvft.so"
fi
export SVFT_LIB

echo "== python/tests against $SVFT_LIB"
if "$PY" -c "import pytest" 2>/dev/null; then
    "$PY" -m pytest -q -rs python/tests
else
    "$PY" python/tests/run.py
fi
