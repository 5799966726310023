#!/usr/bin/env bash
# Runs a command against the virtual GPU (vgpu/: the CUDA driver, cuBLAS and cuSOLVER on host
# memory and CPU threads): builds it if needed (vgpu/build.sh), puts its libcuda / libcublas /
# libcusolver first on the loader path and exports SVFT_VGPU_LIB (the tests find the variant
# folders from it). Timings taken on it are never speeds; svft says so when it bench-marks it.
#
#   scripts/with-vgpu.sh cargo run --release -- bench --backend cuda
#   scripts/with-vgpu.sh target/release/svft demo --backend cuda --steps 5
#   SVFT_VGPU_ADVERSARIAL=7 scripts/with-vgpu.sh cargo test --release --test gpu
#
# Its other switches (SVFT_VGPU_DEVICES, _NO_POOLS, _FAULTS, _TRACE, _MEM_LIMIT) are described in
# docs/VGPU.md.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${CUDA_HOME:-}" ]]; then
  CUDA_HOME="$("$repo/scripts/install-cuda-toolchain.sh" | tail -n 1 | xargs dirname | xargs dirname)"
  export CUDA_HOME
fi
if [[ $# -eq 0 ]]; then
  echo "usage: scripts/with-vgpu.sh COMMAND [ARGS...]" >&2
  exit 2
fi
SVFT_VGPU_LIB="$("$repo/vgpu/build.sh" | tail -n 1)"
export SVFT_VGPU_LIB
export LD_LIBRARY_PATH="$SVFT_VGPU_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec "$@"
