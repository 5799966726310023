#!/usr/bin/env bash
# The GPU tests against the virtual GPU (vgpu/: the CUDA driver, cuBLAS and cuSOLVER on host
# memory and CPU threads, stricter than a real device). Builds it, then with it on the loader
# path and SVFT_REQUIRE_GPU=1 (a test that finds no device fails instead of skipping) runs
#   tests/gpu.rs, ffi_cuda.rs, gpu_bench.rs   the CUDA layer, the C ABI on device pointers, the bench
#   tests/bank_gpu.rs, ffi_bank_cuda.rs       the adapter bank (CudaBank, and through the C ABI) against the CPU bank
#   tests/ffi_c.rs                            the C programs, cuda_cycle.c on SVFT_BACKEND_CUDA
#   tests/cli_cuda.rs                         svft decompose / bench / demo --backend cuda
# once with plain stream scheduling and once with streams delayed and interleaved at random
# (SVFT_VGPU_ADVERSARIAL), and counts what ran from $SVFT_GPU_TEST_LOG: every GPU test must
# have run, none skipped. scripts/test.sh (CI) calls it. About 5 minutes on 2 cores, warm.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
START=$SECONDS

CUDA_HOME="$(scripts/install-cuda-toolchain.sh | tail -n 1 | xargs dirname | xargs dirname)"
export CUDA_HOME
export SVFT_REQUIRE_KERNELS=1

echo "== virtual GPU: build and self-tests (vgpu/build.sh --test)"
vgpu/build.sh --test >/dev/null
GPU_LOG="$(pwd)/target/vgpu/gpu-tests.log"
rm -f "$GPU_LOG"
with_vgpu() {
  SVFT_REQUIRE_GPU=1 SVFT_GPU_TEST_LOG="$GPU_LOG" scripts/with-vgpu.sh "$@"
}
TESTS=(--test gpu --test ffi_cuda --test gpu_bench --test ffi_c --test cli_cuda --test bank_gpu --test ffi_bank_cuda)

echo "== GPU tests on the virtual GPU"
with_vgpu cargo test --release --features interpret "${TESTS[@]}"

echo "== GPU tests again, streams delayed and interleaved at random (SVFT_VGPU_ADVERSARIAL)"
with_vgpu env SVFT_VGPU_ADVERSARIAL=7 cargo test --release --features interpret "${TESTS[@]}"

ran="$(grep -c '^ran:' "$GPU_LOG" || true)"
skipped="$(grep -c '^skipped:' "$GPU_LOG" || true)"
echo "GPU tests: $ran runs on the virtual GPU, $skipped skipped for want of a device ($((SECONDS - START)) s)"
if [[ "$ran" -eq 0 || "$skipped" -ne 0 ]]; then
  grep '^skipped:' "$GPU_LOG" || true
  echo "every GPU test must run on the virtual GPU" >&2
  exit 1
fi
