#!/usr/bin/env bash
# Build machine (no GPU needed): build the GPU test binaries, the criterion CUDA bench
# (bench-cuda) and the svft binary in release with the
# kernels embedded, and copy them, stripped, with scripts/gpu-run.sh into gpu-bundle/
# (git-ignored). Carry gpu-bundle/ to a GPU machine and run `gpu-bundle/gpu-run.sh` there from
# the repository root; it needs the NVIDIA driver and CUDA libraries, not Rust.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CUDA_HOME="$(scripts/install-cuda-toolchain.sh | tail -n 1 | xargs dirname | xargs dirname)"
export CUDA_HOME SVFT_REQUIRE_KERNELS=1

bundle=gpu-bundle
rm -rf "$bundle" && mkdir -p "$bundle"
# Test binaries: cargo prints each executable's path as JSON; keep the GPU-facing ones.
cargo test --release --no-run --test gpu --test gpu_bench --test ffi_cuda --test bank_gpu --test ffi_bank_cuda --test layer --message-format=json 2>/dev/null \
  | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])
' | while read -r name exe; do cp "$exe" "$bundle/test-$name"; done
# The criterion bench of the headline CUDA cases (benches/cuda.rs), as bench-cuda.
cargo bench --no-run --bench cuda --message-format=json 2>/dev/null \
  | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["bench"]:
        print(m["executable"])
' | while read -r exe; do cp "$exe" "$bundle/bench-cuda"; done
cargo build --release --bin svft
cp target/release/svft "$bundle/svft"
strip "$bundle"/* 2>/dev/null || true
cp scripts/gpu-run.sh "$bundle/"
ls -la "$bundle"
du -sh "$bundle"
# Rehearse gpu-run.sh here (tests skip without a GPU, tiny grids on the CPU), so a script error
# cannot cost device time.
rehearsal="$(mktemp -d)"
SVFT_GPU_RUN_REHEARSE=1 "$bundle/gpu-run.sh" "$rehearsal" > "$rehearsal.log" 2>&1 || true
ls "$rehearsal"
for f in summary.txt bench-table.md bench.jsonl memory-table.md adapters-table.md logs.tar.gz; do
  [ -s "$rehearsal/$f" ] || { echo "gpu-run.sh rehearsal did not write $f (see $rehearsal.log)"; exit 1; }
done
grep -q "grid-bf16: ok" "$rehearsal/summary.txt" || { cat "$rehearsal/summary.txt"; exit 1; }
echo "gpu-run.sh rehearsal: ok ($(grep -c '^|' "$rehearsal/bench-table.md") table lines)"
