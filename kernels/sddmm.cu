// sddmm.cu: the gradient of the core on its pattern, a sampled dense-dense product (SDDMM),
// and the epilogue that turns it into dM and the gate gradient.
//
//   dC_k = sum_b A[b,i] X[b,j]          for every entry k = (i, j) of Omega
//   dM_k = g * dC_k                     dgamma = g (1-g) * sum_k M_k dC_k
//
// A (= G U) and X (= T = X_in V, saved by the forward) are n x r row-major in the activation
// dtype (f32/bf16/f16); dC, dM, M, the workspaces and every accumulator are f32. Entries are in
// the canonical order of the pattern: the band's row-major order, or the COO arrays' order
// (duplicates each get the full dC of their position, as their values add in C).
//
// Two modes, the same arithmetic per batch chunk (chunk_rows consecutive batch rows, summed in
// ascending b by one thread):
//   fast          *_sddmm_atomic_*: each chunk's partial is atomicAdd'ed into dC[nnz]; the host
//                 zeroes dC first (or leaves a previous dC there to accumulate). Run-to-run order
//                 of the chunk additions is not fixed.
//   deterministic *_sddmm_partial_*: chunk c writes workspace[c * nnz + k] (every entry of every
//                 chunk is written, no zeroing needed); sddmm_epilogue then sums the chunks in
//                 ascending c. Bitwise reproducible for a fixed chunk_rows and epilogue launch
//                 (block and grid sizes of the SDDMM itself do not change the result).
//   nchunks = ceil(n / chunk_rows); workspace = nchunks * nnz floats.
//
// Banded(d) (Plain d = 0), nnz = r(2d+1) - d(d+1), 0 <= d < r:
//   band_sddmm_atomic_{f32,bf16,f16}(const T* A, const T* X, float* dC,
//                                    int n, int r, int d, int chunk_rows)
//   band_sddmm_partial_{f32,bf16,f16}(const T* A, const T* X, float* workspace,
//                                     int n, int r, int d, int chunk_rows)
// A shifted-diagonal stencil tiled over the batch: block (x, y) stages A[chunk, tile] and
// X[chunk, tile +- d] in shared memory, then thread t computes the entries of row i = i0 + t,
// SVFT_SDDMM_OFFSETS diagonals at a time (one A load feeds that many FMAs).
//   block (B, 1, 1), B a multiple of 32; grid (gx, gy, 1), any, grid-strided;
//   full coverage gx = ceil(r / B), gy = nchunks.
//   dynamic shared memory: 4 * chunk_rows * (2B + 2d + SVFT_SDDMM_OFFSETS - 1) bytes
//   (e.g. B = 128, chunk_rows = 32, d = 16: 37,248 bytes).
//
// COO (Random, TopK), nnz entries (rows[k], cols[k]) in canonical order:
//   coo_sddmm_atomic_{f32,bf16,f16}(const T* A, const T* X, const int* rows, const int* cols,
//                                   const int* order, float* dC,
//                                   int n, int r, int nnz, int chunk_rows)
//   coo_sddmm_partial_{f32,bf16,f16}(same, writing workspace[nchunks * nnz])
// One thread per entry and chunk, no shared memory. `order` (nullable) is the order in which
// threads visit entries: pass the by-row CSR's perm so a warp shares rows of A (NULL = canonical
// order). Results are written at the canonical index and do not depend on `order`.
//   block (B, 1, 1), B a multiple of 32; grid (gx, gy, 1), any, grid-strided;
//   full coverage gx = ceil(nnz / B), gy = nchunks. 0 bytes dynamic smem.
//
// Epilogue (f32 only), deterministic:
//   sddmm_epilogue(const float* partial, int nchunks, const float* M, const float* g, float* dM,
//                  float* gate_partial, int nnz, int accumulate)
//     dC_k = sum_{c < nchunks} partial[c * nnz + k]   (ascending c; nchunks = 1 for the fast
//            mode's dC), dM_k = g * dC_k (accumulate != 0: dM_k += g * dC_k). dM may alias
//            partial. If gate_partial != NULL: gate_partial[blockIdx.x] = this block's
//            sum_k M_k dC_k (fixed order); M may be NULL when gate_partial is NULL.
//     block (B, 1, 1), B a multiple of 32 (<= 1024); grid (G, 1, 1) any G >= 1 (grid-strided);
//     gate_partial needs G floats. 0 bytes dynamic smem (128 bytes static).
//   gate_grad_reduce(const float* gate_partial, int nparts, const float* g, float* dgamma,
//                    int accumulate)
//     *dgamma (=, or += when accumulate) g (1-g) * sum_{p < nparts} gate_partial[p].
//     block (B, 1, 1), B a multiple of 32; grid (1, 1, 1) exactly.
//   g is one f32 in device memory (sigmoid(gamma) or 1), as in core_apply.cu.
//
// The gate's state on the device, from a gamma in device memory (no host round trip):
//   gate_from_gamma(const float* gamma, int gate, float* state)
//     state[0] = gate ? 1 / (1 + exp(-gamma)) : 1   (g, which every kernel above reads)
//     state[1] = gamma
//     block (1, 1, 1), grid (1, 1, 1). gamma may alias state + 1.
#include "svft_common.cuh"

// Diagonals accumulated together by one thread in the band SDDMM.
#define SVFT_SDDMM_OFFSETS 4

template <typename T, bool ATOMIC>
__device__ __forceinline__ void band_sddmm(const T* __restrict__ A, const T* __restrict__ X,
                                           float* __restrict__ out, int n, int r, int d,
                                           int chunk_rows) {
  SVFT_DYNAMIC_SMEM(float, smem);
  d = imin(d, r - 1);
  const int B = blockDim.x;
  const int W = B + 2 * d + SVFT_SDDMM_OFFSETS - 1;  // X window: tile, halo d, group padding
  float* as = smem;                                   // [chunk_rows][B]: A[b, i0 + t]
  float* xs = smem + (size_t)chunk_rows * B;          // [chunk_rows][W]: X[b, i0 - d + c]
  const int nnz = band_size(r, d);
  const int nchunks = ceil_div(n, chunk_rows);
  const int tx = threadIdx.x;

  for (int i0 = blockIdx.x * B; i0 < r; i0 += gridDim.x * B) {
    const int i = i0 + tx;  // this thread's row of C
    const int j_lo = imax(0, i - d);
    const int j_hi = i < r ? imin(r - 1, i + d) : j_lo - 1;  // empty when i >= r
    const int base = i < r ? band_row_offset(i, r, d) - j_lo : 0;  // entry (i, j) is base + j

    for (int c = blockIdx.y; c < nchunks; c += gridDim.y) {
      const int b0 = c * chunk_rows;
      const int rows = imin(chunk_rows, n - b0);
      for (int rb = 0; rb < rows; ++rb) {
        const size_t row = (size_t)(b0 + rb) * r;
        as[rb * B + tx] = i < r ? to_f32(A[row + i]) : 0.f;
        for (int cc = tx; cc < W; cc += B) {
          const int col = i0 - d + cc;
          xs[rb * W + cc] = (col >= 0 && col < r) ? to_f32(X[row + col]) : 0.f;
        }
      }
      __syncthreads();  // [sync:sddmm-staged]

      for (int j = j_lo; j <= j_hi; j += SVFT_SDDMM_OFFSETS) {
        float acc[SVFT_SDDMM_OFFSETS];
#pragma unroll
        for (int q = 0; q < SVFT_SDDMM_OFFSETS; ++q) acc[q] = 0.f;
        const int xoff = tx + d + (j - i);  // window column of X[b, j]
        for (int rb = 0; rb < rows; ++rb) {
          const float a = as[rb * B + tx];
          const float* xr = xs + rb * W + xoff;
#pragma unroll
          for (int q = 0; q < SVFT_SDDMM_OFFSETS; ++q) acc[q] += a * xr[q];
        }
#pragma unroll
        for (int q = 0; q < SVFT_SDDMM_OFFSETS; ++q) {
          if (j + q <= j_hi) {
            const int e = base + j + q;
            if (ATOMIC)
              atomicAdd(&out[e], acc[q]);
            else
              out[(size_t)c * nnz + e] = acc[q];
          }
        }
      }
      __syncthreads();  // [sync:sddmm-reuse] the next chunk restages as/xs
    }
  }
}

template <typename T, bool ATOMIC>
__device__ __forceinline__ void coo_sddmm(const T* __restrict__ A, const T* __restrict__ X,
                                          const int* __restrict__ rows,
                                          const int* __restrict__ cols,
                                          const int* __restrict__ order, float* __restrict__ out,
                                          int n, int r, int nnz, int chunk_rows) {
  const int nchunks = ceil_div(n, chunk_rows);
  for (int q = blockIdx.x * blockDim.x + threadIdx.x; q < nnz; q += gridDim.x * blockDim.x) {
    const int k = order ? order[q] : q;
    const int i = rows[k];
    const int j = cols[k];
    for (int c = blockIdx.y; c < nchunks; c += gridDim.y) {
      const int b0 = c * chunk_rows;
      const int b1 = imin(n, b0 + chunk_rows);
      float acc = 0.f;
      for (int b = b0; b < b1; ++b) acc += to_f32(A[(size_t)b * r + i]) * to_f32(X[(size_t)b * r + j]);
      if (ATOMIC)
        atomicAdd(&out[k], acc);
      else
        out[(size_t)c * nnz + k] = acc;
    }
  }
}

#define SVFT_STAMP_SDDMM(SUFFIX, T)                                                              \
  extern "C" __global__ void band_sddmm_atomic_##SUFFIX(const T* A, const T* X, float* dC,       \
                                                        int n, int r, int d, int chunk_rows) {   \
    band_sddmm<T, true>(A, X, dC, n, r, d, chunk_rows);                                          \
  }                                                                                              \
  extern "C" __global__ void band_sddmm_partial_##SUFFIX(const T* A, const T* X,                 \
                                                         float* workspace, int n, int r, int d,  \
                                                         int chunk_rows) {                       \
    band_sddmm<T, false>(A, X, workspace, n, r, d, chunk_rows);                                  \
  }                                                                                              \
  extern "C" __global__ void coo_sddmm_atomic_##SUFFIX(const T* A, const T* X, const int* rows,  \
                                                       const int* cols, const int* order,        \
                                                       float* dC, int n, int r, int nnz,         \
                                                       int chunk_rows) {                         \
    coo_sddmm<T, true>(A, X, rows, cols, order, dC, n, r, nnz, chunk_rows);                      \
  }                                                                                              \
  extern "C" __global__ void coo_sddmm_partial_##SUFFIX(const T* A, const T* X, const int* rows, \
                                                        const int* cols, const int* order,       \
                                                        float* workspace, int n, int r, int nnz, \
                                                        int chunk_rows) {                        \
    coo_sddmm<T, false>(A, X, rows, cols, order, workspace, n, r, nnz, chunk_rows);              \
  }

SVFT_STAMP_SDDMM(f32, float)
SVFT_STAMP_SDDMM(bf16, __nv_bfloat16)
SVFT_STAMP_SDDMM(f16, __half)

// ---------------------------------------------------------------------------------------------
extern "C" __global__ void sddmm_epilogue(const float* partial, int nchunks, const float* M,
                                          const float* g_ptr, float* dM, float* gate_partial,
                                          int nnz, int accumulate) {
  const float g = *g_ptr;
  float gate = 0.f;
  for (int k = blockIdx.x * blockDim.x + threadIdx.x; k < nnz; k += gridDim.x * blockDim.x) {
    float dc = 0.f;
    for (int c = 0; c < nchunks; ++c) dc += partial[(size_t)c * nnz + k];
    const float v = g * dc;
    dM[k] = accumulate ? dM[k] + v : v;
    if (gate_partial) gate += M[k] * dc;
  }
  if (gate_partial) {  // uniform across the block: every thread takes the same branch
    const float total = block_sum(gate);
    if (threadIdx.x == 0) gate_partial[blockIdx.x] = total;
  }
}

extern "C" __global__ void gate_grad_reduce(const float* gate_partial, int nparts,
                                            const float* g_ptr, float* dgamma, int accumulate) {
  const float g = *g_ptr;
  float sum = 0.f;
  for (int p = threadIdx.x; p < nparts; p += blockDim.x) sum += gate_partial[p];
  const float total = block_sum(sum);
  if (threadIdx.x == 0) {
    const float v = g * (1.f - g) * total;
    *dgamma = accumulate ? *dgamma + v : v;
  }
}

extern "C" __global__ void gate_from_gamma(const float* gamma, int gate, float* state) {
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    const float v = *gamma;  // read before the stores: gamma may alias state + 1
    state[0] = gate ? 1.f / (1.f + expf(-v)) : 1.f;
    state[1] = v;
  }
}
