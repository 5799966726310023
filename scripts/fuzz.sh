#!/usr/bin/env bash
# Runs the fuzz suite (tests/fuzz.rs: seeded mutation of real CLI-written files, in-process and
# through the CLI, under `ulimit -v`) and the C ABI property tests (tests/ffi_props.rs), and
# prints the counts table: inputs tried, accepted-identical, faithfully-read others, clean
# errors, panics, aborts, hangs, wrong results. Fails on any panic, abort, hang or wrong result.
#
#   scripts/fuzz.sh            # 60 s budget, the default seed
#   scripts/fuzz.sh 300 12345  # budget in seconds, seed
#   SVFT_FUZZ_TARGETS=lib:,cli:merge scripts/fuzz.sh   # only some targets (name prefixes)
#   SVFT_FUZZ_SEED=S SVFT_FUZZ_REPRO=lib:adapter:131 scripts/fuzz.sh   # one input again
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export SVFT_FUZZ_SECONDS="${1:-${SVFT_FUZZ_SECONDS:-60}}"
if [[ $# -ge 2 ]]; then export SVFT_FUZZ_SEED="$2"; fi
features=(--features interpret)
status=0
cargo test --release "${features[@]}" --test ffi_props || status=1
cargo test --release "${features[@]}" --test fuzz -- --nocapture --test-threads 2 || status=1
exit $status
