// fused_bwd.cu: the band SDDMM and the backward core apply of the factored plan in one pass.
//
//   dC_k    = sum_b A[b,i] X[b,j]                       every entry k = (i, j) of the band
//   AC[b,j] = s_j A[b,j] + g * sum_{(i,j) in band} A[b,i] M_ij     (AC = A C, C = diag(s) + g M)
//
// The backward of the factored plan runs, after A = G U (cuBLAS), the band SDDMM (sddmm.cu) and
// the band apply on A (core_apply.cu, backward form), then dX = AC V^T (cuBLAS). Both passes read
// A; here one block stages A[chunk, tile +- d] and X[chunk, tile +- d] once and produces both the
// chunk's dC contribution for the tile's rows of C and AC for the chunk's rows and the tile's
// columns. Same arithmetic as the unfused kernels, entry by entry:
//   - dC: each entry's chunk partial sums b ascending over the chunk, exactly as
//     band_sddmm_{atomic,partial}; the partial mode writes the same workspace[c * nnz + k], so
//     with the same chunk_rows the deterministic result (after sddmm_epilogue) equals the unfused
//     one bit for bit (tested in interpret mode);
//   - AC: per output element the same sum over offsets o ascending, then s_j A + g acc, as
//     band_apply_bwd (bit for bit in interpret mode).
// A (= G U), X (= T, saved by the forward) and AC are n x r row-major in the activation dtype
// (f32/bf16/f16); s, M, dC, the workspace and every accumulator are f32. AC must not alias A.
//
// Banded(d) (Plain d = 0), 0 <= d < r (clamped), M and dC in canonical row-major band order:
//   band_sddmm_apply_bwd_atomic_{f32,bf16,f16}(const T* A, const T* X, float* dC, T* AC,
//       const float* s, const float* M, const float* g, int n, int r, int d, int chunk_rows)
// (g: one f32 in device memory, as in core_apply.cu)
//   band_sddmm_apply_bwd_partial_{f32,bf16,f16}(same, float* workspace instead of dC)
// fast (atomic): the host zeroes dC first; deterministic (partial): every slot of
// workspace[nchunks * nnz] is written, nchunks = ceil(n / chunk_rows); then sddmm_epilogue.
//   block (B, 1, 1), B a multiple of 32; grid (gx, gy, 1), any, grid-strided;
//   full coverage gx = ceil(r / B), gy = nchunks.
//   dynamic shared memory: 4 * chunk_rows * (2B + 4d + SVFT_FUSED_OFFSETS - 1) bytes
//   (A window B + 2d wide, X window B + 2d + 3; e.g. B = 128, chunk_rows = 32, d = 16:
//   41,344 bytes). The host falls back to the unfused pair when this does not fit.
#include "svft_common.cuh"

// Diagonals of dC accumulated together by one thread (one A load feeds that many FMAs); the
// same grouping as SVFT_SDDMM_OFFSETS (the grouping does not change any entry's sum).
#define SVFT_FUSED_OFFSETS 4
// Batch rows of AC per thread per M load (registers: one f32 accumulator each).
#define SVFT_FUSED_APPLY_ROWS 4

template <typename T, bool ATOMIC>
__device__ __forceinline__ void band_sddmm_apply_bwd(const T* __restrict__ A,
                                                     const T* __restrict__ X,
                                                     float* __restrict__ out, T* __restrict__ AC,
                                                     const float* __restrict__ s,
                                                     const float* __restrict__ M, float g, int n,
                                                     int r, int d, int chunk_rows) {
  SVFT_DYNAMIC_SMEM(float, smem);
  d = imin(d, r - 1);
  const int B = blockDim.x;
  const int WA = B + 2 * d;                           // A window: tile and halo d
  const int WX = B + 2 * d + SVFT_FUSED_OFFSETS - 1;  // X window: also the group padding
  float* as = smem;                                   // [chunk_rows][WA]: A[b, i0 - d + c]
  float* xs = smem + (size_t)chunk_rows * WA;         // [chunk_rows][WX]: X[b, i0 - d + c]
  const int nnz = band_size(r, d);
  const int nchunks = ceil_div(n, chunk_rows);
  const int tx = threadIdx.x;

  for (int i0 = blockIdx.x * B; i0 < r; i0 += gridDim.x * B) {
    const int i = i0 + tx;  // this thread's row of dC and column of AC
    // dC row i: columns [j_lo, j_hi] (empty when i >= r).
    const int j_lo = imax(0, i - d);
    const int j_hi = i < r ? imin(r - 1, i + d) : j_lo - 1;
    const int base = i < r ? band_row_offset(i, r, d) - j_lo : 0;  // entry (i, j) is base + j
    // AC column i: offsets o = row - i of the band's entries (row, i) (empty when i >= r).
    const int o_lo = imax(-d, -i);
    const int o_hi = i < r ? imin(d, r - 1 - i) : o_lo - 1;

    for (int c = blockIdx.y; c < nchunks; c += gridDim.y) {
      const int b0 = c * chunk_rows;
      const int rows = imin(chunk_rows, n - b0);
      for (int rb = 0; rb < rows; ++rb) {
        const size_t row = (size_t)(b0 + rb) * r;
        for (int cc = tx; cc < WX; cc += B) {
          const int col = i0 - d + cc;
          const bool in = col >= 0 && col < r;
          if (cc < WA) as[rb * WA + cc] = in ? to_f32(A[row + col]) : 0.f;
          xs[rb * WX + cc] = in ? to_f32(X[row + col]) : 0.f;
        }
      }
      __syncthreads();  // [sync:fused-staged]

      // dC: as band_sddmm, with A[b, i] at window column tx + d.
      for (int j = j_lo; j <= j_hi; j += SVFT_FUSED_OFFSETS) {
        float acc[SVFT_FUSED_OFFSETS];
#pragma unroll
        for (int q = 0; q < SVFT_FUSED_OFFSETS; ++q) acc[q] = 0.f;
        const int xoff = tx + d + (j - i);  // window column of X[b, j]
        for (int rb = 0; rb < rows; ++rb) {
          const float a = as[rb * WA + tx + d];
          const float* xr = xs + rb * WX + xoff;
#pragma unroll
          for (int q = 0; q < SVFT_FUSED_OFFSETS; ++q) acc[q] += a * xr[q];
        }
#pragma unroll
        for (int q = 0; q < SVFT_FUSED_OFFSETS; ++q) {
          if (j + q <= j_hi) {
            const int e = base + j + q;
            if (ATOMIC)
              atomicAdd(&out[e], acc[q]);
            else
              out[(size_t)c * nnz + e] = acc[q];
          }
        }
      }

      // AC: as band_apply_bwd, SVFT_FUSED_APPLY_ROWS staged rows per M load. Rows of the last
      // group past `rows` read the chunk's last staged row (never stored).
      for (int rb0 = 0; rb0 < rows; rb0 += SVFT_FUSED_APPLY_ROWS) {
        int off[SVFT_FUSED_APPLY_ROWS];
        float acc[SVFT_FUSED_APPLY_ROWS];
#pragma unroll
        for (int q = 0; q < SVFT_FUSED_APPLY_ROWS; ++q) {
          off[q] = imin(rb0 + q, rows - 1) * WA + tx + d;
          acc[q] = 0.f;
        }
        for (int o = o_lo; o <= o_hi; ++o) {
          const float m = M[band_index(i + o, i, r, d)];  // entry (i + o, i): column i of M
#pragma unroll
          for (int q = 0; q < SVFT_FUSED_APPLY_ROWS; ++q) acc[q] += m * as[off[q] + o];
        }
        if (i < r) {
          const float si = s[i];
#pragma unroll
          for (int q = 0; q < SVFT_FUSED_APPLY_ROWS; ++q) {
            if (rb0 + q < rows)
              AC[(size_t)(b0 + rb0 + q) * r + i] = from_f32<T>(si * as[off[q]] + g * acc[q]);
          }
        }
      }
      __syncthreads();  // [sync:fused-reuse] the next chunk restages as/xs
    }
  }
}

#define SVFT_STAMP_FUSED_BWD(SUFFIX, T)                                                         \
  extern "C" __global__ void band_sddmm_apply_bwd_atomic_##SUFFIX(                              \
      const T* A, const T* X, float* dC, T* AC, const float* s, const float* M, const float* g, \
      int n, int r, int d, int chunk_rows) {                                                    \
    band_sddmm_apply_bwd<T, true>(A, X, dC, AC, s, M, *g, n, r, d, chunk_rows);                 \
  }                                                                                             \
  extern "C" __global__ void band_sddmm_apply_bwd_partial_##SUFFIX(                             \
      const T* A, const T* X, float* workspace, T* AC, const float* s, const float* M,          \
      const float* g, int n, int r, int d, int chunk_rows) {                                    \
    band_sddmm_apply_bwd<T, false>(A, X, workspace, AC, s, M, *g, n, r, d, chunk_rows);         \
  }

SVFT_STAMP_FUSED_BWD(f32, float)
SVFT_STAMP_FUSED_BWD(bf16, __nv_bfloat16)
SVFT_STAMP_FUSED_BWD(f16, __half)
