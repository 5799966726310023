// svft_common.cuh: helpers shared by every SVFT kernel family.
//
// - dtype conversion: activations (T, A, S, U, V) are f32, bf16 or f16 in memory; every kernel
//   widens them to f32 on load (`to_f32`) and narrows once on store (`from_f32`, round to
//   nearest even). s, M, gamma, gradients and all accumulators are f32.
// - the banded pattern's index arithmetic in closed form (no row_off table is passed);
// - deterministic warp / block sums (xor butterfly, fixed order);
// - SVFT_DYNAMIC_SMEM: the dynamic shared memory array, spelled so that the same source also
//   compiles on the CPU (kernels/interpret/cuda_interpret.h defines it before this header).
//
// Banded(d) pattern, canonical (official) order: entries (i, j) with |i - j| <= d, listed row by
// row, columns ascending. Row i holds columns [max(0, i-d), min(r-1, i+d)]. The kernels require
// 0 <= d < r (the host clamps d to r-1; d = 0 is the Plain pattern) and |Omega| < 2^31.
//   |Omega| = band_size(r, d) = r(2d+1) - d(d+1)
//   index of (i, j) = band_row_offset(i, r, d) + j - max(0, i-d)
#pragma once

#ifndef SVFT_INTERPRET
#include <cuda_bf16.h>
#include <cuda_fp16.h>
// One dynamic shared memory array per kernel, sized by the launch's sharedMemBytes.
#define SVFT_DYNAMIC_SMEM(type, name) extern __shared__ type name[]
#endif

#define SVFT_WARP 32

// ---------------------------------------------------------------------------------------------
// dtype conversion
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }

// ---------------------------------------------------------------------------------------------
// small integer helpers (named so they never clash with host min/max)
__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }
__device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// Banded pattern, closed form. Row t of an r x r band of half-width d has
//   cnt(t) = (2d+1) - max(0, d-t) - max(0, t+d-(r-1))
// entries (the two max terms are the columns cut off at the left and right edges).
// band_row_offset(i) = sum_{t<i} cnt(t): the canonical index of row i's first entry.
__device__ __forceinline__ int band_row_offset(int i, int r, int d) {
  const int m = imin(i, d);                  // rows t < i cut at the left: t = 0 .. m-1
  const int left = m * d - m * (m - 1) / 2;  // sum_{t<m} (d - t)
  const int t0 = imax(0, r - d);             // first row cut at the right
  const int q = imax(0, i - t0);             // rows t0 .. i-1
  const int right = q * (t0 + d - r + 1) + q * (q - 1) / 2;
  return i * (2 * d + 1) - left - right;
}
__device__ __forceinline__ int band_size(int r, int d) { return band_row_offset(r, r, d); }
// Canonical index of entry (i, j); requires |i - j| <= d, 0 <= i, j < r.
__device__ __forceinline__ int band_index(int i, int j, int r, int d) {
  return band_row_offset(i, r, d) + j - imax(0, i - d);
}

// ---------------------------------------------------------------------------------------------
// Deterministic reductions. All 32 lanes of the warp must call warp_sum; every lane gets the
// same value, summed in a fixed butterfly order.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = SVFT_WARP / 2; offset > 0; offset >>= 1)
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum of v over the block (blockDim.x a multiple of 32, at most 1024). Every thread of the
// block must call it (it contains __syncthreads); the result is valid in thread 0. Fixed order:
// butterfly within each warp, then warp partials in warp order. Reusable back to back.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_partial[SVFT_WARP];
  const int lane = threadIdx.x % SVFT_WARP;
  const int warp = threadIdx.x / SVFT_WARP;
  const int nwarps = blockDim.x / SVFT_WARP;
  v = warp_sum(v);
  if (lane == 0) warp_partial[warp] = v;
  __syncthreads();  // [sync:block-sum-publish]
  float total = 0.f;
  if (warp == 0) total = warp_sum(lane < nwarps ? warp_partial[lane] : 0.f);
  __syncthreads();  // warp_partial may be rewritten by the next call
  return total;
}
