// core_apply.cu: apply the SVFT core C = diag(s) + g*M to a batch of rows.
//
//   forward   S = X C^T    S[b,i] = s_i X[b,i] + g * sum_{(i,j) in Omega} M_ij X[b,j]
//   backward  Y = X C      Y[b,j] = s_j X[b,j] + g * sum_{(i,j) in Omega} X[b,i] M_ij
//
// X and Y are n x r, row-major (leading dimension r), in the activation dtype (f32/bf16/f16);
// s (r), M (|Omega|) and g are f32, accumulation is f32, Y is rounded once on store.
// Y must not alias X. g is sigmoid(gamma) or 1, read from device memory (`const float* g`, one
// f32 the layer keeps on the device: a gate trained on the device never makes a host round trip).
//
// The same kernels are the "fold" operations (C moved onto the frozen factors), with the
// factor's rows as the batch:
//   U_C = U C    (d_out x r) = backward form, X = U, n = d_out
//   V_C = V C^T  (d_in  x r) = forward form,  X = V, n = d_in
//
// Banded(d) (Plain is d = 0), M in canonical row-major band order (see svft_common.cuh):
//   band_apply_fwd_{f32,bf16,f16}(const T* X, T* Y, const float* s, const float* M,
//                                 const float* g, int n, int r, int d)
//   band_apply_bwd_{f32,bf16,f16}(same arguments)
// A shifted-diagonal stencil. Each block owns a tile of blockDim.x consecutive columns and walks
// the batch in groups of SVFT_APPLY_ROWS rows: the group's rows, columns [i0-d, i0+B+d), are
// staged in shared memory (as f32), then each thread produces its column for the whole group,
// loading each M coefficient once per group (APPLY_ROWS-fold reuse).
//   block  (B, 1, 1), B a multiple of 32 (e.g. 128 or 256)
//   grid   (gx, gy, 1), any gx >= 1, gy >= 1; loops are grid-strided:
//          full coverage is gx = ceil(r / B), gy = ceil(n / SVFT_APPLY_ROWS)
//   dynamic shared memory: 4 * SVFT_APPLY_ROWS * (B + 2d) bytes (must fit the device limit,
//          48 KiB without opt-in; for wider bands use the CSR kernel below with the band's CSR)
//
// COO patterns (Random, TopK; duplicates allowed, their values add), through a CSR prepared once
// by the host for the fixed pattern:
//   coo_apply_{f32,bf16,f16}(const T* X, T* Y, const float* s, const float* M,
//                            const int* ptr, const int* idx, const int* perm,
//                            const float* g, int n, int r)
//   forward : ptr/idx/perm = CSR by row    (ptr[r+1], idx = column, perm = canonical index k)
//   backward: ptr/idx/perm = CSR by column (ptr[r+1], idx = row,    perm = canonical index k)
//   Y[b,i] = s_i X[b,i] + g * sum_{e in [ptr[i], ptr[i+1])} M[perm[e]] * X[b, idx[e]]
// A gather: each thread owns one output column i and SVFT_APPLY_ROWS batch rows; no atomics,
// no shared memory. block (B,1,1), B a multiple of 32; grid (gx, gy, 1) any, grid-strided;
// full coverage gx = ceil(r / B), gy = ceil(n / SVFT_APPLY_ROWS). 0 bytes dynamic smem.
#include "svft_common.cuh"

// Batch rows handled per thread per pass (registers: one f32 accumulator each).
#define SVFT_APPLY_ROWS 4

template <typename T, bool TRANSPOSE>
__device__ __forceinline__ void band_apply(const T* __restrict__ X, T* __restrict__ Y,
                                           const float* __restrict__ s,
                                           const float* __restrict__ M, float g, int n, int r,
                                           int d) {
  SVFT_DYNAMIC_SMEM(float, xs);  // [SVFT_APPLY_ROWS][W]
  d = imin(d, r - 1);
  const int B = blockDim.x;
  const int W = B + 2 * d;  // window: the tile plus a halo of d columns on each side
  const int tx = threadIdx.x;

  for (int i0 = blockIdx.x * B; i0 < r; i0 += gridDim.x * B) {
    const int i = i0 + tx;  // this thread's output column
    // Offsets o = j - i present in the band for column i (an empty range when i >= r).
    const int o_lo = imax(-d, -i);
    const int o_hi = i < r ? imin(d, r - 1 - i) : o_lo - 1;

    for (int b0 = blockIdx.y * SVFT_APPLY_ROWS; b0 < n; b0 += gridDim.y * SVFT_APPLY_ROWS) {
      // Stage X[b0 .. b0+ROWS) x [i0-d, i0+B+d) as f32; zero outside the matrix.
#pragma unroll
      for (int rb = 0; rb < SVFT_APPLY_ROWS; ++rb) {
        const int b = b0 + rb;
        for (int c = tx; c < W; c += B) {
          const int col = i0 - d + c;
          xs[rb * W + c] = (b < n && col >= 0 && col < r) ? to_f32(X[(size_t)b * r + col]) : 0.f;
        }
      }
      __syncthreads();  // [sync:apply-staged]

      float acc[SVFT_APPLY_ROWS];
#pragma unroll
      for (int rb = 0; rb < SVFT_APPLY_ROWS; ++rb) acc[rb] = 0.f;

      for (int o = o_lo; o <= o_hi; ++o) {
        const int j = i + o;
        // forward reads row i of M (entry (i, j)); backward reads column i (entry (j, i)).
        const float m = TRANSPOSE ? M[band_index(j, i, r, d)] : M[band_index(i, j, r, d)];
#pragma unroll
        for (int rb = 0; rb < SVFT_APPLY_ROWS; ++rb) acc[rb] += m * xs[rb * W + tx + d + o];
      }

      if (i < r) {
        const float si = s[i];
#pragma unroll
        for (int rb = 0; rb < SVFT_APPLY_ROWS; ++rb) {
          const int b = b0 + rb;
          if (b < n) Y[(size_t)b * r + i] = from_f32<T>(si * xs[rb * W + tx + d] + g * acc[rb]);
        }
      }
      __syncthreads();  // [sync:apply-reuse] xs is restaged by the next group
    }
  }
}

template <typename T>
__device__ __forceinline__ void csr_apply(const T* __restrict__ X, T* __restrict__ Y,
                                          const float* __restrict__ s,
                                          const float* __restrict__ M,
                                          const int* __restrict__ ptr,
                                          const int* __restrict__ idx,
                                          const int* __restrict__ perm, float g, int n, int r) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < r; i += gridDim.x * blockDim.x) {  // [bound:csr-cols]
    const int e_begin = ptr[i];
    const int e_end = ptr[i + 1];
    const float si = s[i];
    for (int b0 = blockIdx.y * SVFT_APPLY_ROWS; b0 < n; b0 += gridDim.y * SVFT_APPLY_ROWS) {
      // Rows past n read row n-1 (valid memory) and are never stored: no divergence in the loop.
      size_t row[SVFT_APPLY_ROWS];
#pragma unroll
      for (int rb = 0; rb < SVFT_APPLY_ROWS; ++rb) row[rb] = (size_t)imin(b0 + rb, n - 1) * r;

      float acc[SVFT_APPLY_ROWS];
#pragma unroll
      for (int rb = 0; rb < SVFT_APPLY_ROWS; ++rb) acc[rb] = 0.f;

      for (int e = e_begin; e < e_end; ++e) {
        const float m = M[perm[e]];
        const int j = idx[e];
#pragma unroll
        for (int rb = 0; rb < SVFT_APPLY_ROWS; ++rb) acc[rb] += m * to_f32(X[row[rb] + j]);
      }
#pragma unroll
      for (int rb = 0; rb < SVFT_APPLY_ROWS; ++rb) {
        if (b0 + rb < n) Y[row[rb] + i] = from_f32<T>(si * to_f32(X[row[rb] + i]) + g * acc[rb]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// extern "C" entry points, one per dtype.
#define SVFT_STAMP_CORE_APPLY(SUFFIX, T)                                                        \
  extern "C" __global__ void band_apply_fwd_##SUFFIX(const T* X, T* Y, const float* s,          \
                                                     const float* M, const float* g, int n,     \
                                                     int r, int d) {                            \
    band_apply<T, false>(X, Y, s, M, *g, n, r, d);                                              \
  }                                                                                             \
  extern "C" __global__ void band_apply_bwd_##SUFFIX(const T* X, T* Y, const float* s,          \
                                                     const float* M, const float* g, int n,     \
                                                     int r, int d) {                            \
    band_apply<T, true>(X, Y, s, M, *g, n, r, d);                                               \
  }                                                                                             \
  extern "C" __global__ void coo_apply_##SUFFIX(const T* X, T* Y, const float* s,               \
                                                const float* M, const int* ptr, const int* idx, \
                                                const int* perm, const float* g, int n,         \
                                                int r) {                                        \
    csr_apply<T>(X, Y, s, M, ptr, idx, perm, *g, n, r);                                         \
  }

SVFT_STAMP_CORE_APPLY(f32, float)
SVFT_STAMP_CORE_APPLY(bf16, __nv_bfloat16)
SVFT_STAMP_CORE_APPLY(f16, __half)
