// svft_interp.h: the C ABI of interpret mode (kernels/interpret/interpret.cpp), for Rust FFI and the
// C++ test drivers. One wrapper per CUDA kernel: svft_interp_<kernel name>(cfg, <the kernel's
// arguments, in the same order>). The kernel runs on CPU threads (see cuda_interpret.h) over the
// grid/block in cfg, with cfg.shared_mem_bytes of dynamic shared memory, exactly as the CUDA
// launch would; it returns when the whole grid is done. Pointers are host pointers.
// bf16 and f16 activations are passed as their 16-bit patterns (uint16_t; Rust: u16,
// half::bf16, half::f16). Return value: 0 ok, 1 a grid dimension is 0, 2 block has 0 or more
// than 1024 threads. Launches are serialised process-wide (safe to call from many threads).
// Argument meanings, layouts and launch requirements: kernels/*.cu headers and docs/KERNELS.md.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Same fields and order as cudarc's LaunchConfig { grid_dim, block_dim, shared_mem_bytes }.
typedef struct svft_launch_cfg {
  uint32_t grid_x, grid_y, grid_z;
  uint32_t block_x, block_y, block_z;
  uint32_t shared_mem_bytes;
} svft_launch_cfg;

// Compile-time constants of the kernels that the host needs to size launches
// (SVFT_APPLY_ROWS in core_apply.cu, SVFT_SDDMM_OFFSETS in sddmm.cu, SVFT_FUSED_OFFSETS in
// fused_bwd.cu, SVFT_SKINNY_* in skinny_gemm.cu).
enum {
  SVFT_INTERP_APPLY_ROWS = 4,
  SVFT_INTERP_SDDMM_OFFSETS = 4,
  SVFT_INTERP_FUSED_OFFSETS = 4,
  SVFT_INTERP_SKINNY_TOKENS = 16,
  SVFT_INTERP_SKINNY_NN_KT = 128,
  SVFT_INTERP_SKINNY_NT_KT = 256,
  SVFT_INTERP_SKINNY_NT_ROWS = 2
};

// Dynamic shared memory of the band kernels (d already clamped to r-1 or not: larger is fine).
static inline uint32_t svft_band_apply_smem_bytes(uint32_t block_x, int d) {
  return 4u * SVFT_INTERP_APPLY_ROWS * (block_x + 2u * (uint32_t)d);
}
static inline uint32_t svft_band_sddmm_smem_bytes(uint32_t block_x, int d, int chunk_rows) {
  return 4u * (uint32_t)chunk_rows *
         (2u * block_x + 2u * (uint32_t)d + SVFT_INTERP_SDDMM_OFFSETS - 1u);
}
static inline uint32_t svft_band_sddmm_apply_bwd_smem_bytes(uint32_t block_x, int d,
                                                            int chunk_rows) {
  return 4u * (uint32_t)chunk_rows *
         (2u * block_x + 4u * (uint32_t)d + SVFT_INTERP_FUSED_OFFSETS - 1u);
}

// Dynamic shared memory of the skinny kernels for n tokens: the staged tile of the largest token
// chunk, min(n, 16) rounded up to 1, 2, 4, 8 or 16 tokens (row stride NT, or NT + 4 from 8 up).
static inline uint32_t svft_skinny_stride(int n) {
  const int t = n >= SVFT_INTERP_SKINNY_TOKENS ? SVFT_INTERP_SKINNY_TOKENS : (n < 1 ? 1 : n);
  const uint32_t nt = t <= 1 ? 1u : t <= 2 ? 2u : t <= 4 ? 4u : t <= 8 ? 8u : 16u;
  return nt <= 4u ? nt : nt + 4u;
}
static inline uint32_t svft_skinny_nn_smem_bytes(int n) {
  return 4u * SVFT_INTERP_SKINNY_NN_KT * svft_skinny_stride(n);
}
static inline uint32_t svft_skinny_nt_smem_bytes(int n) {
  return 4u * SVFT_INTERP_SKINNY_NT_KT * svft_skinny_stride(n);
}

int svft_interp_band_apply_fwd_f32(
    svft_launch_cfg cfg, const float* X, float* Y, const float* s, const float* M, float g, int n,
    int r, int d);
int svft_interp_band_apply_fwd_bf16(
    svft_launch_cfg cfg, const uint16_t* X, uint16_t* Y, const float* s, const float* M, float g,
    int n, int r, int d);
int svft_interp_band_apply_fwd_f16(
    svft_launch_cfg cfg, const uint16_t* X, uint16_t* Y, const float* s, const float* M, float g,
    int n, int r, int d);

int svft_interp_band_apply_bwd_f32(
    svft_launch_cfg cfg, const float* X, float* Y, const float* s, const float* M, float g, int n,
    int r, int d);
int svft_interp_band_apply_bwd_bf16(
    svft_launch_cfg cfg, const uint16_t* X, uint16_t* Y, const float* s, const float* M, float g,
    int n, int r, int d);
int svft_interp_band_apply_bwd_f16(
    svft_launch_cfg cfg, const uint16_t* X, uint16_t* Y, const float* s, const float* M, float g,
    int n, int r, int d);

int svft_interp_coo_apply_f32(
    svft_launch_cfg cfg, const float* X, float* Y, const float* s, const float* M,
    const int32_t* ptr, const int32_t* idx, const int32_t* perm, float g, int n, int r);
int svft_interp_coo_apply_bf16(
    svft_launch_cfg cfg, const uint16_t* X, uint16_t* Y, const float* s, const float* M,
    const int32_t* ptr, const int32_t* idx, const int32_t* perm, float g, int n, int r);
int svft_interp_coo_apply_f16(
    svft_launch_cfg cfg, const uint16_t* X, uint16_t* Y, const float* s, const float* M,
    const int32_t* ptr, const int32_t* idx, const int32_t* perm, float g, int n, int r);

// The bank kernels (bank.cu): g is one gate value per slot, in (host) memory.
int svft_interp_bank_apply_fwd_f32(
    svft_launch_cfg cfg, const float* X, float* Y, const float* s, const float* M, const float* g,
    const int32_t* info, const int32_t* ptr, const int32_t* idx, const int32_t* perm,
    const int32_t* tiles, int ntiles, int r);
int svft_interp_bank_apply_bwd_f32(
    svft_launch_cfg cfg, const float* X, float* Y, const float* s, const float* M, const float* g,
    const int32_t* info, const int32_t* ptr, const int32_t* idx, const int32_t* perm,
    const int32_t* tiles, int ntiles, int r);

int svft_interp_bank_apply_fwd_bf16(
    svft_launch_cfg cfg, const uint16_t* X, uint16_t* Y, const float* s, const float* M, const float* g,
    const int32_t* info, const int32_t* ptr, const int32_t* idx, const int32_t* perm,
    const int32_t* tiles, int ntiles, int r);
int svft_interp_bank_apply_bwd_bf16(
    svft_launch_cfg cfg, const uint16_t* X, uint16_t* Y, const float* s, const float* M, const float* g,
    const int32_t* info, const int32_t* ptr, const int32_t* idx, const int32_t* perm,
    const int32_t* tiles, int ntiles, int r);

int svft_interp_bank_apply_fwd_f16(
    svft_launch_cfg cfg, const uint16_t* X, uint16_t* Y, const float* s, const float* M, const float* g,
    const int32_t* info, const int32_t* ptr, const int32_t* idx, const int32_t* perm,
    const int32_t* tiles, int ntiles, int r);
int svft_interp_bank_apply_bwd_f16(
    svft_launch_cfg cfg, const uint16_t* X, uint16_t* Y, const float* s, const float* M, const float* g,
    const int32_t* info, const int32_t* ptr, const int32_t* idx, const int32_t* perm,
    const int32_t* tiles, int ntiles, int r);

int svft_interp_band_sddmm_atomic_f32(
    svft_launch_cfg cfg, const float* A, const float* X, float* dC, int n, int r, int d,
    int chunk_rows);
int svft_interp_band_sddmm_atomic_bf16(
    svft_launch_cfg cfg, const uint16_t* A, const uint16_t* X, float* dC, int n, int r, int d,
    int chunk_rows);
int svft_interp_band_sddmm_atomic_f16(
    svft_launch_cfg cfg, const uint16_t* A, const uint16_t* X, float* dC, int n, int r, int d,
    int chunk_rows);

int svft_interp_band_sddmm_partial_f32(
    svft_launch_cfg cfg, const float* A, const float* X, float* workspace, int n, int r, int d,
    int chunk_rows);
int svft_interp_band_sddmm_partial_bf16(
    svft_launch_cfg cfg, const uint16_t* A, const uint16_t* X, float* workspace, int n, int r,
    int d, int chunk_rows);
int svft_interp_band_sddmm_partial_f16(
    svft_launch_cfg cfg, const uint16_t* A, const uint16_t* X, float* workspace, int n, int r,
    int d, int chunk_rows);

int svft_interp_coo_sddmm_atomic_f32(
    svft_launch_cfg cfg, const float* A, const float* X, const int32_t* rows, const int32_t* cols,
    const int32_t* order, float* dC, int n, int r, int nnz, int chunk_rows);
int svft_interp_coo_sddmm_atomic_bf16(
    svft_launch_cfg cfg, const uint16_t* A, const uint16_t* X, const int32_t* rows,
    const int32_t* cols, const int32_t* order, float* dC, int n, int r, int nnz, int chunk_rows);
int svft_interp_coo_sddmm_atomic_f16(
    svft_launch_cfg cfg, const uint16_t* A, const uint16_t* X, const int32_t* rows,
    const int32_t* cols, const int32_t* order, float* dC, int n, int r, int nnz, int chunk_rows);

int svft_interp_coo_sddmm_partial_f32(
    svft_launch_cfg cfg, const float* A, const float* X, const int32_t* rows, const int32_t* cols,
    const int32_t* order, float* workspace, int n, int r, int nnz, int chunk_rows);
int svft_interp_coo_sddmm_partial_bf16(
    svft_launch_cfg cfg, const uint16_t* A, const uint16_t* X, const int32_t* rows,
    const int32_t* cols, const int32_t* order, float* workspace, int n, int r, int nnz,
    int chunk_rows);
int svft_interp_coo_sddmm_partial_f16(
    svft_launch_cfg cfg, const uint16_t* A, const uint16_t* X, const int32_t* rows,
    const int32_t* cols, const int32_t* order, float* workspace, int n, int r, int nnz,
    int chunk_rows);

int svft_interp_band_sddmm_apply_bwd_atomic_f32(
    svft_launch_cfg cfg, const float* A, const float* X, float* dC, float* AC,
    const float* s, const float* M, float g, int n, int r, int d, int chunk_rows);
int svft_interp_band_sddmm_apply_bwd_atomic_bf16(
    svft_launch_cfg cfg, const uint16_t* A, const uint16_t* X, float* dC, uint16_t* AC,
    const float* s, const float* M, float g, int n, int r, int d, int chunk_rows);
int svft_interp_band_sddmm_apply_bwd_atomic_f16(
    svft_launch_cfg cfg, const uint16_t* A, const uint16_t* X, float* dC, uint16_t* AC,
    const float* s, const float* M, float g, int n, int r, int d, int chunk_rows);

int svft_interp_band_sddmm_apply_bwd_partial_f32(
    svft_launch_cfg cfg, const float* A, const float* X, float* workspace, float* AC,
    const float* s, const float* M, float g, int n, int r, int d, int chunk_rows);
int svft_interp_band_sddmm_apply_bwd_partial_bf16(
    svft_launch_cfg cfg, const uint16_t* A, const uint16_t* X, float* workspace, uint16_t* AC,
    const float* s, const float* M, float g, int n, int r, int d, int chunk_rows);
int svft_interp_band_sddmm_apply_bwd_partial_f16(
    svft_launch_cfg cfg, const uint16_t* A, const uint16_t* X, float* workspace, uint16_t* AC,
    const float* s, const float* M, float g, int n, int r, int d, int chunk_rows);

int svft_interp_skinny_nn_f32(
    svft_launch_cfg cfg, const float* X, const float* B, float* partial, int n, int k, int c,
    int splits);
int svft_interp_skinny_nn_bf16(
    svft_launch_cfg cfg, const uint16_t* X, const uint16_t* B, float* partial, int n, int k, int c,
    int splits);
int svft_interp_skinny_nn_f16(
    svft_launch_cfg cfg, const uint16_t* X, const uint16_t* B, float* partial, int n, int k, int c,
    int splits);

int svft_interp_skinny_reduce_f32(
    svft_launch_cfg cfg, const float* partial, float* Y, int splits, int count);
int svft_interp_skinny_reduce_bf16(
    svft_launch_cfg cfg, const float* partial, uint16_t* Y, int splits, int count);
int svft_interp_skinny_reduce_f16(
    svft_launch_cfg cfg, const float* partial, uint16_t* Y, int splits, int count);

int svft_interp_skinny_nt_f32(
    svft_launch_cfg cfg, const float* X, const float* B, float* Y, int n, int k, int m);
int svft_interp_skinny_nt_bf16(
    svft_launch_cfg cfg, const uint16_t* X, const uint16_t* B, uint16_t* Y, int n, int k, int m);
int svft_interp_skinny_nt_f16(
    svft_launch_cfg cfg, const uint16_t* X, const uint16_t* B, uint16_t* Y, int n, int k, int m);

int svft_interp_sddmm_epilogue(
    svft_launch_cfg cfg, const float* partial, int nchunks, const float* M, float g, float* dM,
    float* gate_partial, int nnz, int accumulate);
int svft_interp_gate_grad_reduce(
    svft_launch_cfg cfg, const float* gate_partial, int nparts, float g, float* dgamma,
    int accumulate);
// The gate's device state from a gamma in memory: state[0] = g, state[1] = gamma.
int svft_interp_gate_from_gamma(svft_launch_cfg cfg, const float* gamma, int gate, float* state);

#ifdef __cplusplus
}  // extern "C"
#endif
