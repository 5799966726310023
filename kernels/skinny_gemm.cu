// skinny_gemm.cu: the dense products of the small-n plan (a handful of tokens, n <= 64), where
// each pass is memory-bound on the frozen factor U or V and cuBLAS's tiles are mostly idle.
//
// The factored plan's four products take two forms (X, S, G, A C: n x k activations; U, V: the
// frozen factors, row-major, in the activation dtype):
//
//   nn  out[n x c] = in[n x k] * B[k x c]     T = X V   (k = d_in,  c = r)
//                                             A = G U   (k = d_out, c = r)
//   nt  out[n x m] = in[n x k] * B[m x k]^T   Y = S U^T (k = r, m = d_out)
//                                             dX = (A C) V^T (k = r, m = d_in)
//
// Both walk B exactly once per chunk of up to SVFT_SKINNY_TOKENS tokens, accumulate in f32
// registers (one accumulator per token), and stage the small `in` operand in shared memory as
// f32, transposed to [kk][token] with a row stride of skinny_stride(NT) floats so that one
// thread reads all its tokens for one kk with 128-bit loads. The token count of a chunk is
// rounded up to NT in {1, 2, 4, 8, 16} (a template parameter: an n = 1 pass does one FMA per
// element of B, not 16); the padding tokens are staged as zeros and never stored.
//
// skinny_nn_{f32,bf16,f16}(const T* X, const T* B, float* partial, int n, int k, int c,
//                          int splits)
//   Split-K column sums: thread t of block (x, y, z) owns column col = x*blockDim.x + t of B and
//   reads B's rows (coalesced across the warp), for the k-range of split y:
//     [y*kc, min(k, (y+1)*kc)), kc = ceil(k / splits)
//   and the tokens [16 z, 16 z + 16). It writes the split's partial sums
//     partial[(split * n + b) * c + col] = sum_{kk in split} X[b, kk] B[kk, col]   (f32)
//   in ascending kk (every slot of [splits x n x c] is written, empty splits as 0: no zeroing).
//   skinny_reduce then sums the splits in a fixed order, so the result depends on `splits` only,
//   never on the grid: bitwise reproducible.
//     block (B, 1, 1), B a multiple of 32; grid (gx, gy, gz), any, grid-strided in all three:
//     full coverage gx = ceil(c / B), gy = splits, gz = ceil(n / 16).
//     dynamic shared memory: 4 * SVFT_SKINNY_NN_KT * skinny_stride(pad(min(n, 16))) bytes
//     (pad rounds up to 1, 2, 4, 8, 16; stride: NT for NT <= 4, else NT + 4): at most 10,240 B.
//
// skinny_reduce_{f32,bf16,f16}(const float* partial, T* out, int splits, int count)
//   out[i] = sum_{s < splits} partial[s * count + i], s ascending, rounded once to T
//   (count = n * c). block (B, 1, 1); grid (G, 1, 1), any G >= 1, grid-strided. 0 B smem.
//
// skinny_nt_{f32,bf16,f16}(const T* X, const T* B, T* out, int n, int k, int m)
//   Row dot products: each warp owns SVFT_SKINNY_NT_ROWS rows of B per pass, its lanes read a
//   row's k elements coalesced (lane l: kk = l, l + 32, ...) for every token of the chunk, then
//   a butterfly warp_sum per (row, token) gives out[b, row] (lane `token` stores it). Fixed
//   order: bitwise reproducible for any grid, no workspace.
//     block (B, 1, 1), B a multiple of 32; grid (gx, gy, 1), any, grid-strided:
//     full coverage gx = ceil(m / (SVFT_SKINNY_NT_ROWS * B / 32)), gy = ceil(n / 16).
//     dynamic shared memory: 4 * SVFT_SKINNY_NT_KT * skinny_stride(pad(min(n, 16))) bytes
//     (at most 20,480 B).
//
// Every loop that contains a __syncthreads() has a block-uniform trip count (columns, rows and
// tokens past the end are clamped for loads and skipped for stores), and every warp_sum is
// reached by all 32 lanes.
#include "svft_common.cuh"

// Tokens per chunk (accumulators per thread per row of B).
#define SVFT_SKINNY_TOKENS 16
// k rows staged per shared-memory tile: nn (the rows of B one split walks per tile) and nt (the
// columns of B one warp pass covers per tile).
#define SVFT_SKINNY_NN_KT 128
#define SVFT_SKINNY_NT_KT 256
// Rows of B per warp in skinny_nt (each staged activation value feeds this many rows).
#define SVFT_SKINNY_NT_ROWS 2

// Row stride (floats) of the staged [kk][token] tile for NT tokens: NT + 4 for NT >= 8 keeps the
// 128-bit reads of the nt kernel (consecutive kk across lanes) free of bank conflicts.
__device__ __forceinline__ constexpr int skinny_stride(int nt) { return nt <= 4 ? nt : nt + 4; }

// The NT staged tokens of one kk (p is 16-byte aligned when NT % 4 == 0).
template <int NT>
__device__ __forceinline__ void skinny_load_tokens(const float* p, float (&x)[NT]) {
  if constexpr (NT % 4 == 0) {
#pragma unroll
    for (int q = 0; q < NT / 4; ++q) {
      const float4 v = reinterpret_cast<const float4*>(p)[q];
      x[4 * q] = v.x;
      x[4 * q + 1] = v.y;
      x[4 * q + 2] = v.z;
      x[4 * q + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int t = 0; t < NT; ++t) x[t] = p[t];
  }
}

// Stages X[t0 .. t0+NT) x [k0, k0+kt) into xs[kk * stride + token] as f32 (tokens past nt as 0).
// Consecutive threads read consecutive kk of one token row: coalesced.
template <typename T, int NT>
__device__ __forceinline__ void skinny_stage(const T* __restrict__ X, float* xs, int k, int t0,
                                             int nt, int k0, int kt) {
  constexpr int S = skinny_stride(NT);
  for (int e = threadIdx.x; e < NT * kt; e += blockDim.x) {
    const int tok = e / kt;
    const int kk = e - tok * kt;
    xs[kk * S + tok] = tok < nt ? to_f32(X[(size_t)(t0 + tok) * k + k0 + kk]) : 0.f;
  }
}

// ---------------------------------------------------------------------------------------------
// nn: one token chunk of NT (padded) tokens starting at t0, nt of them real.
template <typename T, int NT>
__device__ __forceinline__ void skinny_nn_chunk(const T* __restrict__ X, const T* __restrict__ B,
                                                float* __restrict__ partial, float* xs, int n,
                                                int k, int c, int splits, int t0, int nt) {
  constexpr int S = skinny_stride(NT);
  const int kc = ceil_div(k, splits);
  for (int sp = blockIdx.y; sp < splits; sp += gridDim.y) {
    const int kb = imin(k, sp * kc);  // sp * kc < k + kc: no overflow (k, kc < 2^30)
    const int ke = imin(k, kb + kc);
    for (int c0 = blockIdx.x * blockDim.x; c0 < c; c0 += gridDim.x * blockDim.x) {
      const int col = c0 + threadIdx.x;
      const int colc = imin(col, c - 1);  // columns past c load column c-1 and store nothing
      float acc[NT];
#pragma unroll
      for (int t = 0; t < NT; ++t) acc[t] = 0.f;

      for (int k0 = kb; k0 < ke; k0 += SVFT_SKINNY_NN_KT) {
        const int kt = imin(SVFT_SKINNY_NN_KT, ke - k0);
        skinny_stage<T, NT>(X, xs, k, t0, nt, k0, kt);
        __syncthreads();  // [sync:skinny-nn-staged]
        const T* brow = B + (size_t)k0 * c + colc;
#pragma unroll 8
        for (int kk = 0; kk < kt; ++kk) {
          const float b = to_f32(brow[(size_t)kk * c]);
          float x[NT];
          skinny_load_tokens<NT>(xs + kk * S, x);  // the same address for the whole warp
#pragma unroll
          for (int t = 0; t < NT; ++t) acc[t] += x[t] * b;
        }
        __syncthreads();  // [sync:skinny-nn-reuse] the next tile restages xs
      }
      if (col < c) {
#pragma unroll
        for (int t = 0; t < NT; ++t)
          if (t < nt) partial[((size_t)sp * n + t0 + t) * c + col] = acc[t];
      }
    }
  }
}

template <typename T>
__device__ __forceinline__ void skinny_nn(const T* __restrict__ X, const T* __restrict__ B,
                                          float* __restrict__ partial, int n, int k, int c,
                                          int splits) {
  SVFT_DYNAMIC_SMEM(float, xs);
  for (int t0 = blockIdx.z * SVFT_SKINNY_TOKENS; t0 < n; t0 += gridDim.z * SVFT_SKINNY_TOKENS) {
    const int nt = imin(SVFT_SKINNY_TOKENS, n - t0);  // block-uniform: every thread branches alike
    if (nt == 1)
      skinny_nn_chunk<T, 1>(X, B, partial, xs, n, k, c, splits, t0, nt);
    else if (nt == 2)
      skinny_nn_chunk<T, 2>(X, B, partial, xs, n, k, c, splits, t0, nt);
    else if (nt <= 4)
      skinny_nn_chunk<T, 4>(X, B, partial, xs, n, k, c, splits, t0, nt);
    else if (nt <= 8)
      skinny_nn_chunk<T, 8>(X, B, partial, xs, n, k, c, splits, t0, nt);
    else
      skinny_nn_chunk<T, 16>(X, B, partial, xs, n, k, c, splits, t0, nt);
  }
}

template <typename T>
__device__ __forceinline__ void skinny_reduce(const float* __restrict__ partial, T* __restrict__ out,
                                              int splits, int count) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < count; i += gridDim.x * blockDim.x) {
    float v = 0.f;
    for (int sp = 0; sp < splits; ++sp) v += partial[(size_t)sp * count + i];
    out[i] = from_f32<T>(v);
  }
}

// ---------------------------------------------------------------------------------------------
// nt: one token chunk.
template <typename T, int NT>
__device__ __forceinline__ void skinny_nt_chunk(const T* __restrict__ X, const T* __restrict__ B,
                                                T* __restrict__ out, float* xs, int k, int m,
                                                int t0, int nt) {
  constexpr int S = skinny_stride(NT);
  constexpr int R = SVFT_SKINNY_NT_ROWS;
  const int lane = threadIdx.x % SVFT_WARP;
  const int warp = threadIdx.x / SVFT_WARP;
  const int rows_per_block = R * (blockDim.x / SVFT_WARP);
  for (int base = blockIdx.x * rows_per_block; base < m; base += gridDim.x * rows_per_block) {
    const T* brow[R];
#pragma unroll
    for (int q = 0; q < R; ++q) brow[q] = B + (size_t)imin(base + warp * R + q, m - 1) * k;
    float acc[R][NT];
#pragma unroll
    for (int q = 0; q < R; ++q)
#pragma unroll
      for (int t = 0; t < NT; ++t) acc[q][t] = 0.f;

    for (int k0 = 0; k0 < k; k0 += SVFT_SKINNY_NT_KT) {
      const int kt = imin(SVFT_SKINNY_NT_KT, k - k0);
      skinny_stage<T, NT>(X, xs, k, t0, nt, k0, kt);
      __syncthreads();  // [sync:skinny-nt-staged]
#pragma unroll 4
      for (int kk = lane; kk < kt; kk += SVFT_WARP) {
        float b[R];
#pragma unroll
        for (int q = 0; q < R; ++q) b[q] = to_f32(brow[q][k0 + kk]);
        float x[NT];
        skinny_load_tokens<NT>(xs + kk * S, x);
#pragma unroll
        for (int q = 0; q < R; ++q)
#pragma unroll
          for (int t = 0; t < NT; ++t) acc[q][t] += x[t] * b[q];
      }
      __syncthreads();  // [sync:skinny-nt-reuse] the next tile restages xs
    }

#pragma unroll
    for (int q = 0; q < R; ++q) {
      const int row = base + warp * R + q;
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        const float v = warp_sum(acc[q][t]);  // all 32 lanes, whatever row and t
        if (lane == t && t < nt && row < m) out[(size_t)(t0 + t) * m + row] = from_f32<T>(v);
      }
    }
  }
}

template <typename T>
__device__ __forceinline__ void skinny_nt(const T* __restrict__ X, const T* __restrict__ B,
                                          T* __restrict__ out, int n, int k, int m) {
  SVFT_DYNAMIC_SMEM(float, xs);
  for (int t0 = blockIdx.y * SVFT_SKINNY_TOKENS; t0 < n; t0 += gridDim.y * SVFT_SKINNY_TOKENS) {
    const int nt = imin(SVFT_SKINNY_TOKENS, n - t0);
    if (nt == 1)
      skinny_nt_chunk<T, 1>(X, B, out, xs, k, m, t0, nt);
    else if (nt == 2)
      skinny_nt_chunk<T, 2>(X, B, out, xs, k, m, t0, nt);
    else if (nt <= 4)
      skinny_nt_chunk<T, 4>(X, B, out, xs, k, m, t0, nt);
    else if (nt <= 8)
      skinny_nt_chunk<T, 8>(X, B, out, xs, k, m, t0, nt);
    else
      skinny_nt_chunk<T, 16>(X, B, out, xs, k, m, t0, nt);
  }
}

// ---------------------------------------------------------------------------------------------
#define SVFT_STAMP_SKINNY(SUFFIX, T)                                                             \
  extern "C" __global__ void skinny_nn_##SUFFIX(const T* X, const T* B, float* partial, int n,   \
                                                int k, int c, int splits) {                      \
    skinny_nn<T>(X, B, partial, n, k, c, splits);                                                \
  }                                                                                              \
  extern "C" __global__ void skinny_reduce_##SUFFIX(const float* partial, T* out, int splits,    \
                                                    int count) {                                 \
    skinny_reduce<T>(partial, out, splits, count);                                               \
  }                                                                                              \
  extern "C" __global__ void skinny_nt_##SUFFIX(const T* X, const T* B, T* out, int n, int k,    \
                                                int m) {                                         \
    skinny_nt<T>(X, B, out, n, k, m);                                                            \
  }

SVFT_STAMP_SKINNY(f32, float)
SVFT_STAMP_SKINNY(bf16, __nv_bfloat16)
SVFT_STAMP_SKINNY(f16, __half)
