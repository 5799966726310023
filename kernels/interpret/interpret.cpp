// interpret.cpp: every kernels/*.cu compiled as C++ for the CPU (see cuda_interpret.h), and one
// extern "C" launch wrapper per kernel (declared in svft_interp.h). The wrappers take the gate
// value g by value and hand the kernels its address (they read g from memory; launches here
// run to completion before the wrapper returns). Built by build.rs with the
// `interpret` feature, and by scripts/sanitize-kernels.sh with the C++ drivers in tests/kernels.
//
// Build: g++ -std=c++17 -O2 -pthread -I <cuda>/include -I kernels kernels/interpret/interpret.cpp
#include "cuda_interpret.h"

#include "../bank.cu"
#include "../core_apply.cu"
#include "../fused_bwd.cu"
#include "../sddmm.cu"
#include "../skinny_gemm.cu"

#include "svft_interp.h"

static_assert(SVFT_INTERP_APPLY_ROWS == SVFT_APPLY_ROWS, "svft_interp.h out of date");
static_assert(SVFT_INTERP_SDDMM_OFFSETS == SVFT_SDDMM_OFFSETS, "svft_interp.h out of date");
static_assert(SVFT_INTERP_FUSED_OFFSETS == SVFT_FUSED_OFFSETS, "svft_interp.h out of date");
static_assert(SVFT_INTERP_SKINNY_TOKENS == SVFT_SKINNY_TOKENS, "svft_interp.h out of date");
static_assert(SVFT_INTERP_SKINNY_NN_KT == SVFT_SKINNY_NN_KT, "svft_interp.h out of date");
static_assert(SVFT_INTERP_SKINNY_NT_KT == SVFT_SKINNY_NT_KT, "svft_interp.h out of date");
static_assert(SVFT_INTERP_SKINNY_NT_ROWS == SVFT_SKINNY_NT_ROWS, "svft_interp.h out of date");

namespace {

svft_interp::LaunchCfg to_cfg(const svft_launch_cfg& c) {
  return {c.grid_x, c.grid_y, c.grid_z, c.block_x, c.block_y, c.block_z, c.shared_mem_bytes};
}

template <typename T>
const T* in(const void* p) {
  return static_cast<const T*>(p);
}
template <typename T>
T* out(void* p) {
  return static_cast<T*>(p);
}

}  // namespace

// SUFFIX: kernel dtype suffix; CT: the C ABI element type; KT: the kernel's element type.
#define SVFT_WRAP_DTYPE(SUFFIX, CT, KT)                                                          \
  int svft_interp_band_apply_fwd_##SUFFIX(svft_launch_cfg cfg, const CT* X, CT* Y,               \
                                          const float* s, const float* M, float g, int n, int r, \
                                          int d) {                                               \
    return svft_interp::launch(to_cfg(cfg), band_apply_fwd_##SUFFIX, in<KT>(X), out<KT>(Y), s,   \
                               M, &g, n, r, d);                                                  \
  }                                                                                              \
  int svft_interp_band_apply_bwd_##SUFFIX(svft_launch_cfg cfg, const CT* X, CT* Y,               \
                                          const float* s, const float* M, float g, int n, int r, \
                                          int d) {                                               \
    return svft_interp::launch(to_cfg(cfg), band_apply_bwd_##SUFFIX, in<KT>(X), out<KT>(Y), s,   \
                               M, &g, n, r, d);                                                  \
  }                                                                                              \
  int svft_interp_coo_apply_##SUFFIX(svft_launch_cfg cfg, const CT* X, CT* Y, const float* s,    \
                                     const float* M, const int32_t* ptr, const int32_t* idx,     \
                                     const int32_t* perm, float g, int n, int r) {               \
    return svft_interp::launch(to_cfg(cfg), coo_apply_##SUFFIX, in<KT>(X), out<KT>(Y), s, M,     \
                               ptr, idx, perm, &g, n, r);                                        \
  }                                                                                              \
  int svft_interp_band_sddmm_atomic_##SUFFIX(svft_launch_cfg cfg, const CT* A, const CT* X,      \
                                             float* dC, int n, int r, int d, int chunk_rows) {   \
    return svft_interp::launch(to_cfg(cfg), band_sddmm_atomic_##SUFFIX, in<KT>(A), in<KT>(X),    \
                               dC, n, r, d, chunk_rows);                                         \
  }                                                                                              \
  int svft_interp_band_sddmm_partial_##SUFFIX(svft_launch_cfg cfg, const CT* A, const CT* X,     \
                                              float* workspace, int n, int r, int d,             \
                                              int chunk_rows) {                                  \
    return svft_interp::launch(to_cfg(cfg), band_sddmm_partial_##SUFFIX, in<KT>(A), in<KT>(X),   \
                               workspace, n, r, d, chunk_rows);                                  \
  }                                                                                              \
  int svft_interp_coo_sddmm_atomic_##SUFFIX(svft_launch_cfg cfg, const CT* A, const CT* X,       \
                                            const int32_t* rows, const int32_t* cols,            \
                                            const int32_t* order, float* dC, int n, int r,       \
                                            int nnz, int chunk_rows) {                           \
    return svft_interp::launch(to_cfg(cfg), coo_sddmm_atomic_##SUFFIX, in<KT>(A), in<KT>(X),     \
                               rows, cols, order, dC, n, r, nnz, chunk_rows);                    \
  }                                                                                              \
  int svft_interp_coo_sddmm_partial_##SUFFIX(svft_launch_cfg cfg, const CT* A, const CT* X,      \
                                             const int32_t* rows, const int32_t* cols,           \
                                             const int32_t* order, float* workspace, int n,      \
                                             int r, int nnz, int chunk_rows) {                   \
    return svft_interp::launch(to_cfg(cfg), coo_sddmm_partial_##SUFFIX, in<KT>(A), in<KT>(X),    \
                               rows, cols, order, workspace, n, r, nnz, chunk_rows);             \
  }                                                                                              \
  int svft_interp_band_sddmm_apply_bwd_atomic_##SUFFIX(                                          \
      svft_launch_cfg cfg, const CT* A, const CT* X, float* dC, CT* AC, const float* s,          \
      const float* M, float g, int n, int r, int d, int chunk_rows) {                            \
    return svft_interp::launch(to_cfg(cfg), band_sddmm_apply_bwd_atomic_##SUFFIX, in<KT>(A),     \
                               in<KT>(X), dC, out<KT>(AC), s, M, &g, n, r, d, chunk_rows);       \
  }                                                                                              \
  int svft_interp_band_sddmm_apply_bwd_partial_##SUFFIX(                                         \
      svft_launch_cfg cfg, const CT* A, const CT* X, float* workspace, CT* AC, const float* s,   \
      const float* M, float g, int n, int r, int d, int chunk_rows) {                            \
    return svft_interp::launch(to_cfg(cfg), band_sddmm_apply_bwd_partial_##SUFFIX, in<KT>(A),    \
                               in<KT>(X), workspace, out<KT>(AC), s, M, &g, n, r, d,            \
                               chunk_rows);                                                      \
  }                                                                                              \
  int svft_interp_skinny_nn_##SUFFIX(svft_launch_cfg cfg, const CT* X, const CT* B,              \
                                     float* partial, int n, int k, int c, int splits) {          \
    return svft_interp::launch(to_cfg(cfg), skinny_nn_##SUFFIX, in<KT>(X), in<KT>(B), partial,   \
                               n, k, c, splits);                                                 \
  }                                                                                              \
  int svft_interp_skinny_reduce_##SUFFIX(svft_launch_cfg cfg, const float* partial, CT* Y,       \
                                         int splits, int count) {                                \
    return svft_interp::launch(to_cfg(cfg), skinny_reduce_##SUFFIX, partial, out<KT>(Y), splits, \
                               count);                                                           \
  }                                                                                              \
  int svft_interp_skinny_nt_##SUFFIX(svft_launch_cfg cfg, const CT* X, const CT* B, CT* Y,       \
                                     int n, int k, int m) {                                      \
    return svft_interp::launch(to_cfg(cfg), skinny_nt_##SUFFIX, in<KT>(X), in<KT>(B), out<KT>(Y), \
                               n, k, m);                                                         \
  }

// The bank kernels (bank.cu) take one gate value per slot, from memory, as they are.
#define SVFT_WRAP_BANK(SUFFIX, CT, KT)                                                           \
  int svft_interp_bank_apply_fwd_##SUFFIX(svft_launch_cfg cfg, const CT* X, CT* Y,               \
                                          const float* s, const float* M, const float* g,        \
                                          const int32_t* info, const int32_t* ptr,               \
                                          const int32_t* idx, const int32_t* perm,               \
                                          const int32_t* tiles, int ntiles, int r) {             \
    return svft_interp::launch(to_cfg(cfg), bank_apply_fwd_##SUFFIX, in<KT>(X), out<KT>(Y), s,   \
                               M, g, info, ptr, idx, perm, tiles, ntiles, r);                    \
  }                                                                                              \
  int svft_interp_bank_apply_bwd_##SUFFIX(svft_launch_cfg cfg, const CT* X, CT* Y,               \
                                          const float* s, const float* M, const float* g,        \
                                          const int32_t* info, const int32_t* ptr,               \
                                          const int32_t* idx, const int32_t* perm,               \
                                          const int32_t* tiles, int ntiles, int r) {             \
    return svft_interp::launch(to_cfg(cfg), bank_apply_bwd_##SUFFIX, in<KT>(X), out<KT>(Y), s,   \
                               M, g, info, ptr, idx, perm, tiles, ntiles, r);                    \
  }

extern "C" {

SVFT_WRAP_BANK(f32, float, float)
SVFT_WRAP_BANK(bf16, uint16_t, __nv_bfloat16)
SVFT_WRAP_BANK(f16, uint16_t, __half)

SVFT_WRAP_DTYPE(f32, float, float)
SVFT_WRAP_DTYPE(bf16, uint16_t, __nv_bfloat16)
SVFT_WRAP_DTYPE(f16, uint16_t, __half)

int svft_interp_sddmm_epilogue(svft_launch_cfg cfg, const float* partial, int nchunks,
                               const float* M, float g, float* dM, float* gate_partial, int nnz,
                               int accumulate) {
  return svft_interp::launch(to_cfg(cfg), sddmm_epilogue, partial, nchunks, M, &g, dM,
                             gate_partial, nnz, accumulate);
}

int svft_interp_gate_grad_reduce(svft_launch_cfg cfg, const float* gate_partial, int nparts,
                                 float g, float* dgamma, int accumulate) {
  return svft_interp::launch(to_cfg(cfg), gate_grad_reduce, gate_partial, nparts, &g, dgamma,
                             accumulate);
}

int svft_interp_gate_from_gamma(svft_launch_cfg cfg, const float* gamma, int gate, float* state) {
  return svft_interp::launch(to_cfg(cfg), gate_from_gamma, gamma, gate, state);
}

}  // extern "C"
