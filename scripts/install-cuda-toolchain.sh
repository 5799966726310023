#!/usr/bin/env bash
# Install a CUDA 13.0 compiler toolchain (nvcc, cicc, ptxas, crt, runtime/bf16/fp16 headers,
# CCCL) from NVIDIA's PyPI wheels into <repo>/.toolchain/, without touching the system Python.
#
# Layout after install:
#   .toolchain/pip/                 pip --target directory (the wheels as installed)
#   .toolchain/cuda -> pip/nvidia/cu13
#                                   a CUDA_HOME-like tree: bin/nvcc, bin/ptxas, nvvm/bin/cicc,
#                                   nvvm/libdevice, include/{cuda_runtime.h,cuda_bf16.h,...},
#                                   include/crt, include/cccl, lib/
#   .toolchain/.stamp               the requirement set that was installed; when it matches and
#                                   nvcc runs, the script exits at once.
#
# nvcc here can only compile (--fatbin / -cubin / -ptx); there is no driver to link against or run.
# build.rs finds .toolchain/cuda/bin/nvcc by itself; or export CUDA_HOME=<repo>/.toolchain/cuda.
#
# Usage: scripts/install-cuda-toolchain.sh [--force]
# Prints the absolute path of nvcc as its last line.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TC="$ROOT/.toolchain"
PY="${PYTHON:-python3}"
REQS=(
  'nvidia-cuda-nvcc==13.0.*'
  'nvidia-cuda-crt==13.0.*'
  'nvidia-cuda-runtime==13.0.*'
  'nvidia-nvvm==13.0.*'
  'nvidia-cuda-cccl==13.0.*'
)
STAMP_TEXT="v1 ${REQS[*]}"
NVCC="$TC/cuda/bin/nvcc"

if [[ "${1:-}" != "--force" && -f "$TC/.stamp" && "$(cat "$TC/.stamp")" == "$STAMP_TEXT" ]] \
   && "$NVCC" --version >/dev/null 2>&1; then
  echo "$NVCC"
  exit 0
fi

echo "installing CUDA toolchain wheels into $TC/pip ..." >&2
rm -rf "$TC/pip.new"
mkdir -p "$TC"
# --target keeps everything inside .toolchain; --no-deps: these wheels need nothing else for nvcc.
PIP_ROOT_USER_ACTION=ignore "$PY" -m pip install --quiet --disable-pip-version-check --no-deps --no-warn-script-location \
  --target "$TC/pip.new" "${REQS[@]}" >&2
rm -rf "$TC/pip"
mv "$TC/pip.new" "$TC/pip"

HOME_DIR="$TC/pip/nvidia/cu13"
[[ -x "$HOME_DIR/bin/nvcc" ]] || { echo "error: $HOME_DIR/bin/nvcc missing after install" >&2; exit 1; }
ln -sfn "pip/nvidia/cu13" "$TC/cuda"

# The wheels already form a CUDA_HOME tree (bin/nvcc.profile points cicc at ../nvvm/bin and
# includes ../include). Make sure the pieces nvcc looks up are where it looks.
for f in bin/nvcc bin/ptxas bin/fatbinary bin/cudafe++ nvvm/bin/cicc nvvm/libdevice \
         include/cuda_runtime.h include/cuda_bf16.h include/cuda_fp16.h include/crt; do
  [[ -e "$TC/cuda/$f" ]] || { echo "error: toolchain is missing $f" >&2; exit 1; }
done
# Some tools look for lib64/; the wheels ship lib/.
[[ -e "$TC/cuda/lib64" ]] || ln -sfn lib "$TC/cuda/lib64"

# Smoke test: compile a bf16/fp16 kernel to a fatbin for the architectures build.rs uses.
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cat > "$tmp/smoke.cu" <<'CU'
#include <cuda_bf16.h>
#include <cuda_fp16.h>
extern "C" __global__ void smoke(float* y, const __nv_bfloat16* a, const __half* b, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = __bfloat162float(a[i]) + __half2float(b[i]);
}
CU
"$NVCC" --fatbin -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a \
  -gencode arch=compute_80,code=compute_80 -o "$tmp/smoke.fatbin" "$tmp/smoke.cu" >&2
[[ -s "$tmp/smoke.fatbin" ]] || { echo "error: smoke compile produced nothing" >&2; exit 1; }

echo "$STAMP_TEXT" > "$TC/.stamp"
"$NVCC" --version | tail -n 2 >&2
echo "$NVCC"
