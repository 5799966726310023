// bank.cu: many adapters in one batch -- every tile of rows through its own adapter's core.
//
//   forward   S[b,i] = s_i T[b,i] + g_a * sum_{(i,j) in Omega_a} M_a[(i,j)] T[b,j]    (S = T C_a^T)
//   backward  Y[b,j] = s_j X[b,j] + g_a * sum_{(i,j) in Omega_a} X[b,i] M_a[(i,j)]    (Y = X C_a)
//
// for every row b of a tile served by adapter slot a; a tile of the base weight (slot -1) gets
// the diagonal alone, S[b,i] = s_i T[b,i]. Adapters of one base share U, s and V, so a mixed
// batch runs the two big products once (T = X V, Y = S U^T, cuBLAS) and only this pass differs
// per row: it is core_apply.cu's pass with the pattern, coefficients and gate looked up per tile.
// X and Y are n x r, row-major, in the activation dtype (f32/bf16/f16); s, M, g are f32,
// accumulation is f32, Y is rounded once on store. Y must not alias X.
//
// Tiles, not segments: the host cuts its segment table (contiguous row ranges, one adapter
// each, empty ones dropped) into tiles of at most a few dozen rows, so one large segment still
// spreads over many blocks and a batch of one-row segments costs one tile each. A tile's rows
// share one adapter, so a block never diverges on the pattern kind.
//   tiles : 3 ints per tile: first row, row count (>= 1), slot (-1: the base weight).
//           The host guarantees first row + row count <= n and slot < number of slots.
//   info  : 4 ints per slot: d, M offset, ptr offset, idx offset.
//           d >= 0: a band of half-width d (0 <= d < r), its |Omega| coefficients at M[M offset
//           + k] in canonical row-major band order (svft_common.cuh); the offsets after it unused.
//           d == -1: any pattern through a CSR prepared once by the host: row pointers
//           ptr[ptr offset + 0 .. ptr offset + r] (values relative to the slot's entries),
//           entries idx[idx offset + e] (the other index) and perm[idx offset + e] (the
//           canonical coefficient index, into M[M offset + .]). CSR by row for the forward
//           kernels, by column for the backward ones (as coo_apply in core_apply.cu).
//   g     : one f32 per slot (sigmoid(gamma) or 1), in device memory.
//
//   bank_apply_fwd_{f32,bf16,f16}(const T* X, T* Y, const float* s, const float* M,
//                                 const float* g, const int* info, const int* ptr,
//                                 const int* idx, const int* perm, const int* tiles,
//                                 int ntiles, int r)
//   bank_apply_bwd_{f32,bf16,f16}(same arguments)
//
// Each thread owns one output column i and walks the tile's rows in groups of SVFT_BANK_ROWS
// (one f32 accumulator each), loading each coefficient once per group. No shared memory, no
// atomics: every output element is written by exactly one thread.
//   block  (B, 1, 1), B a multiple of 32
//   grid   (gx, gy, 1), any gx >= 1, gy >= 1; grid-strided over columns (x) and tiles (y):
//          full coverage is gx = ceil(r / B), gy = ntiles. 0 bytes of dynamic shared memory.
#include "svft_common.cuh"

// Tile rows handled per thread per pass.
#define SVFT_BANK_ROWS 4

template <typename T, bool TRANSPOSE>
__device__ __forceinline__ void bank_apply(const T* __restrict__ X, T* __restrict__ Y,
                                           const float* __restrict__ s,
                                           const float* __restrict__ M,
                                           const float* __restrict__ g,
                                           const int* __restrict__ info,
                                           const int* __restrict__ ptr,
                                           const int* __restrict__ idx,
                                           const int* __restrict__ perm,
                                           const int* __restrict__ tiles, int ntiles, int r) {
  for (int tile = blockIdx.y; tile < ntiles; tile += gridDim.y) {
    const int row0 = tiles[3 * tile];
    const int row_end = row0 + tiles[3 * tile + 1];
    const int slot = tiles[3 * tile + 2];
    // The base weight (d = -2): neither coefficient loop below runs, ga = 0.
    int d = -2, m_off = 0, p_off = 0, i_off = 0;
    float ga = 0.f;
    if (slot >= 0) {
      d = info[4 * slot];
      m_off = info[4 * slot + 1];
      p_off = info[4 * slot + 2];
      i_off = info[4 * slot + 3];
      ga = g[slot];
    }
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < r; i += gridDim.x * blockDim.x) {
      const float si = s[i];
      for (int b0 = row0; b0 < row_end; b0 += SVFT_BANK_ROWS) {
        // Rows past the tile read its last row (valid memory) and are never stored.
        size_t row[SVFT_BANK_ROWS];
#pragma unroll
        for (int rb = 0; rb < SVFT_BANK_ROWS; ++rb) row[rb] = (size_t)imin(b0 + rb, row_end - 1) * r;
        float acc[SVFT_BANK_ROWS];
#pragma unroll
        for (int rb = 0; rb < SVFT_BANK_ROWS; ++rb) acc[rb] = 0.f;

        if (d >= 0) {
          // Band: column i meets rows/columns j in [i-d, i+d] clipped to the core.
          const int lo = imax(0, i - d);
          const int hi = imin(r - 1, i + d);
          for (int j = lo; j <= hi; ++j) {
            // forward reads row i of M (entry (i, j)); backward reads column i (entry (j, i)).
            const float m = TRANSPOSE ? M[m_off + band_index(j, i, r, d)] : M[m_off + band_index(i, j, r, d)];
#pragma unroll
            for (int rb = 0; rb < SVFT_BANK_ROWS; ++rb) acc[rb] += m * to_f32(X[row[rb] + j]);
          }
        } else if (d == -1) {
          const int e_begin = i_off + ptr[p_off + i];
          const int e_end = i_off + ptr[p_off + i + 1];
          for (int e = e_begin; e < e_end; ++e) {
            const float m = M[m_off + perm[e]];
            const int j = idx[e];
#pragma unroll
            for (int rb = 0; rb < SVFT_BANK_ROWS; ++rb) acc[rb] += m * to_f32(X[row[rb] + j]);
          }
        }
#pragma unroll
        for (int rb = 0; rb < SVFT_BANK_ROWS; ++rb) {
          if (b0 + rb < row_end) Y[row[rb] + i] = from_f32<T>(si * to_f32(X[row[rb] + i]) + ga * acc[rb]);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// extern "C" entry points, one per dtype.
#define SVFT_STAMP_BANK(SUFFIX, T)                                                              \
  extern "C" __global__ void bank_apply_fwd_##SUFFIX(                                           \
      const T* X, T* Y, const float* s, const float* M, const float* g, const int* info,        \
      const int* ptr, const int* idx, const int* perm, const int* tiles, int ntiles, int r) {   \
    bank_apply<T, false>(X, Y, s, M, g, info, ptr, idx, perm, tiles, ntiles, r);                \
  }                                                                                             \
  extern "C" __global__ void bank_apply_bwd_##SUFFIX(                                           \
      const T* X, T* Y, const float* s, const float* M, const float* g, const int* info,        \
      const int* ptr, const int* idx, const int* perm, const int* tiles, int ntiles, int r) {   \
    bank_apply<T, true>(X, Y, s, M, g, info, ptr, idx, perm, tiles, ntiles, r);                 \
  }

SVFT_STAMP_BANK(f32, float)
SVFT_STAMP_BANK(bf16, __nv_bfloat16)
SVFT_STAMP_BANK(f16, __half)
