#!/usr/bin/env bash
# vgpu/build.sh: builds the virtual GPU (every vgpu/*.cpp) into <target>/vgpu/libsvft_vgpu.so and
# the loader directories that make it answer for libcuda / libcublas / libcusolver:
#   <target>/vgpu/lib/          cuda + cublas + cusolver (one object: they share state)
#   <target>/vgpu/driver-only/  libcuda only (cuBLAS and cuSOLVER "not installed")
#   <target>/vgpu/no-cusolver/  libcuda + libcublas
# Point LD_LIBRARY_PATH at one of them. <target> is $CARGO_TARGET_DIR, else <repo>/target.
# Idempotent: recompiles only when a source is newer than the library. Prints the lib dir last.
#
#   vgpu/build.sh           build
#   vgpu/build.sh --test    build, then build and run vgpu/tests/driver_selftest and blas_selftest
#                           (non-zero on failure)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
target="${CARGO_TARGET_DIR:-$repo/target}"
case "$target" in /*) ;; *) target="$repo/$target" ;; esac
out="$target/vgpu"

# CUDA headers, found as build.rs finds them.
inc=""
for cand in "${SVFT_CUDA_INCLUDE:-}" "${CUDA_HOME:+$CUDA_HOME/include}" "${CUDA_PATH:+$CUDA_PATH/include}" \
            /usr/local/cuda/include "$repo/.toolchain/cuda/include"; do
  if [ -n "$cand" ] && [ -f "$cand/cuda.h" ] && [ -f "$cand/cuda_bf16.h" ]; then inc="$cand"; break; fi
done
if [ -z "$inc" ]; then
  echo "vgpu/build.sh: cuda.h not found (set CUDA_HOME, or run scripts/install-cuda-toolchain.sh)" >&2
  exit 1
fi

CXX="${CXX:-g++}"
CXXFLAGS=(-std=c++17 -O2 -g -fPIC -pthread -fvisibility=hidden -fvisibility-inlines-hidden
          -Wall -Wextra -Wno-unused-parameter -Wno-unknown-pragmas -I "$inc" -I "$repo/kernels")
mkdir -p "$out/obj"

lib="$out/libsvft_vgpu.so"
deps=("$here"/*.cpp "$here"/*.h "$repo"/kernels/*.cu "$repo"/kernels/*.cuh "$repo"/kernels/interpret/*.h "$here/build.sh")
objs=()
need_link=0
[ -f "$lib" ] || need_link=1
for src in "$here"/*.cpp; do
  obj="$out/obj/$(basename "${src%.cpp}").o"
  objs+=("$obj")
  rebuild=0
  if [ ! -f "$obj" ]; then rebuild=1; else
    for d in "$src" "$here"/*.h "$here/build.sh"; do [ "$d" -nt "$obj" ] && rebuild=1 && break; done
    if [ "$rebuild" = 0 ] && [ "$(basename "$src")" = kernels.cpp ]; then
      for d in "$repo"/kernels/*.cu "$repo"/kernels/*.cuh "$repo"/kernels/interpret/*.h; do
        [ "$d" -nt "$obj" ] && rebuild=1 && break
      done
    fi
  fi
  if [ "$rebuild" = 1 ]; then
    echo "vgpu: compiling $(basename "$src")" >&2
    "$CXX" "${CXXFLAGS[@]}" -c "$src" -o "$obj.tmp"
    mv "$obj.tmp" "$obj"
    need_link=1
  fi
  [ "$obj" -nt "$lib" ] && need_link=1
done
# A removed source leaves a stale object: drop it.
for obj in "$out"/obj/*.o; do
  [ -f "$here/$(basename "${obj%.o}").cpp" ] || { rm -f "$obj"; need_link=1; }
done
if [ "$need_link" = 1 ]; then
  echo "vgpu: linking $lib" >&2
  # Export only the API entry points (C++ template instantiations stay local as well).
  printf '{ global: cu*; cublas*; cusolver*; local: *; };\n' > "$out/exports.map"
  "$CXX" -shared -pthread -Wl,-Bsymbolic -Wl,--version-script="$out/exports.map" \
    -Wl,-soname,libsvft_vgpu.so -o "$lib.tmp" "${objs[@]}" -ldl
  mv "$lib.tmp" "$lib"
fi

# Loader directories. cudarc tries lib<name>.so first, then versioned names; provide the usual ones.
mk() {  # dir, names...
  local dir="$out/$1"; shift
  mkdir -p "$dir"
  for n in "$@"; do ln -sfn ../libsvft_vgpu.so "$dir/$n"; done
}
cuda_names=(libcuda.so libcuda.so.1)
cublas_names=(libcublas.so libcublas.so.13 libcublas.so.12)
cusolver_names=(libcusolver.so libcusolver.so.12 libcusolver.so.11)
mk lib "${cuda_names[@]}" "${cublas_names[@]}" "${cusolver_names[@]}"
mk driver-only "${cuda_names[@]}"
mk no-cusolver "${cuda_names[@]}" "${cublas_names[@]}"

if [ "${1:-}" = "--test" ]; then
  t="$out/driver_selftest"
  src="$here/tests/driver_selftest.cpp"
  if [ ! -f "$t" ] || [ "$src" -nt "$t" ] || [ "$lib" -nt "$t" ]; then
    echo "vgpu: compiling driver_selftest" >&2
    "$CXX" -std=c++17 -O1 -g -pthread -I "$inc" "$src" -o "$t" -L "$out/lib" -l:libcuda.so -Wl,-rpath,"$out/lib" -Wl,-rpath,"$out"
  fi
  fatbin="$(ls -t "$target"/*/build/svft-*/out/svft_kernels.fatbin 2>/dev/null | head -1 || true)"
  SVFT_VGPU_SELFTEST_FATBIN="$fatbin" LD_LIBRARY_PATH="$out/lib" "$t" >&2
  # The cuBLAS and cuSOLVER faces through their public entry points, against the library.
  b="$out/blas_selftest"
  bsrc="$here/tests/blas_selftest.cpp"
  if [ ! -f "$b" ] || [ "$bsrc" -nt "$b" ] || [ "$lib" -nt "$b" ]; then
    echo "vgpu: compiling blas_selftest" >&2
    "$CXX" -std=c++17 -O2 -pthread -I "$here" -I "$inc" "$bsrc" -o "$b" -L "$out" -lsvft_vgpu -Wl,-rpath,"$out"
  fi
  LD_LIBRARY_PATH="$out/lib" "$b" >&2
fi

echo "$out/lib"
