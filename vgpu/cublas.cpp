// cublas.cpp: the cuBLAS face of the virtual GPU: handles, streams, pointer/math modes, and
// column-major GEMM (cublasSgemm_v2, cublasGemmEx), written from NVIDIA's cuBLAS documentation.
//
// Semantics: C = alpha op(A) op(B) + beta C, column-major, op(X) = X or X^T (CUBLAS_OP_C is
// X^T for real types). Arguments are validated at the call, as documented; the product is
// enqueued on the handle's stream and computed when the stream's worker reaches it. Then the
// exact footprint of every operand it touches (ld * (cols - 1) + rows elements of the stored
// shape) must lie in one live allocation, else the context gets CUDA_ERROR_ILLEGAL_ADDRESS and
// nothing is written.
//
// Numerics: 16-bit inputs are widened to f32 exactly; products and sums are f32 (single
// rounding per multiply and per add, k ascending for every element; no FMA contraction since
// the library is built without -mfma), then alpha * acc + beta * C in f32, rounded once to the
// output type (nearest even). beta == 0 never reads C (C may hold NaN). k == 0 or alpha == 0
// reads neither A nor B and gives C = beta C.
#include "vgpu.h"
#include "cublas_decl.h"
#include "blas_half.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>
#include <unordered_set>
#include <vector>

struct cublasContext {
  CUcontext ctx = nullptr;
  int device = 0;
  CUstream stream = nullptr;  // the legacy default stream until cublasSetStream
  cublasPointerMode_t pointer_mode = CUBLAS_POINTER_MODE_HOST;
  cublasMath_t math_mode = CUBLAS_DEFAULT_MATH;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

namespace {

std::mutex& g_mu = *new std::mutex;
std::unordered_set<cublasContext*>& live_handles() {
  static auto* s = new std::unordered_set<cublasContext*>;  // never destroyed (exit-order safe)
  return *s;
}

// A copy of the handle's state, or nullptr for a null, destroyed or foreign handle.
bool lookup(cublasHandle_t h, cublasContext* out) {
  if (!h) return false;
  std::lock_guard<std::mutex> g(g_mu);
  if (!live_handles().count(h)) return false;
  *out = *h;
  return true;
}

void complain(const char* fn, const std::string& why) {
  std::fprintf(stderr, "svft-vgpu: %s: %s\n", fn, why.c_str());
}

enum class Elt { F32, BF16, F16 };

size_t elt_size(Elt t) { return t == Elt::F32 ? 4 : 2; }
const char* elt_name(Elt t) { return t == Elt::F32 ? "f32" : t == Elt::BF16 ? "bf16" : "f16"; }

inline float load(Elt t, const void* base, size_t i) {
  switch (t) {
    case Elt::F32: return static_cast<const float*>(base)[i];
    case Elt::BF16: return vgpu::half::bf16_to_f32(static_cast<const uint16_t*>(base)[i]);
    default: return vgpu::half::f16_to_f32(static_cast<const uint16_t*>(base)[i]);
  }
}

inline void store(Elt t, void* base, size_t i, float v) {
  switch (t) {
    case Elt::F32: static_cast<float*>(base)[i] = v; break;
    case Elt::BF16: static_cast<uint16_t*>(base)[i] = vgpu::half::f32_to_bf16(v); break;
    default: static_cast<uint16_t*>(base)[i] = vgpu::half::f32_to_f16(v); break;
  }
}

struct Gemm {
  const char* fn;
  bool ta, tb;  // op is a transpose
  int m, n, k;
  Elt at, bt, ct;
  uintptr_t a, b, c;
  int lda, ldb, ldc;
  float alpha, beta;          // pointer mode host: copied at the call
  bool device_scalars;        // pointer mode device: read when the op runs
  uintptr_t alpha_p, beta_p;  // device addresses of alpha and beta (device mode)
  int device;                 // the handle's device
};

// Stored shape of an operand: op N is rows x cols as given, op T the transpose.
size_t footprint(int ld, int rows, int cols) {
  if (rows <= 0 || cols <= 0) return 0;
  return size_t(ld) * size_t(cols - 1) + size_t(rows);
}

// check_range plus: device memory of another device is not this handle's to touch.
bool check_operand(const Gemm& g, uintptr_t p, size_t bytes, const char* what) {
  if (bytes == 0) return true;
  std::string label = std::string(g.fn) + " " + what;
  if (!vgpu::check_range(p, bytes, label.c_str())) return false;
  vgpu::PtrInfo info = vgpu::ptr_info(p);
  if (info.kind == vgpu::MemKind::Device && info.device != g.device) {
    char buf[200];
    std::snprintf(buf, sizeof buf, "%s: 0x%llx is memory of device %d, the cuBLAS handle's device is %d",
                  label.c_str(), (unsigned long long)p, info.device, g.device);
    vgpu::fault(CUDA_ERROR_ILLEGAL_ADDRESS, buf);
    return false;
  }
  return true;
}

typedef float v4 __attribute__((vector_size(16)));
constexpr int MR = 8;  // rows per packed panel of op(A)
constexpr int NR = 4;  // columns of C per micro-kernel

// acc[m x n] (column-major, ld m) = op(A) op(B), f32 sums in k order.
// ap: op(A) packed by panels of MR rows: panel q holds rows q*MR.., element (r, p) at
// ap[q*MR*k + p*MR + r], zero-padded. bp: op(B) column-major k x n (ld k).
void multiply(const float* ap, const float* bp, float* acc, int m, int n, int k) {
  int panels = (m + MR - 1) / MR;
  for (int q = 0; q < panels; q++) {
    const float* pa = ap + size_t(q) * MR * k;
    int r0 = q * MR, rows = std::min(MR, m - r0);
    int j = 0;
    for (; j + NR <= n; j += NR) {
      v4 c00 = {0, 0, 0, 0}, c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
      const float* b0 = bp + size_t(j) * k;
      const float* b1 = b0 + k;
      const float* b2 = b1 + k;
      const float* b3 = b2 + k;
      for (int p = 0; p < k; p++) {
        v4 a0, a1;
        std::memcpy(&a0, pa + size_t(p) * MR, 16);
        std::memcpy(&a1, pa + size_t(p) * MR + 4, 16);
        float x0 = b0[p], x1 = b1[p], x2 = b2[p], x3 = b3[p];
        c00 += a0 * x0;
        c01 += a1 * x0;
        c10 += a0 * x1;
        c11 += a1 * x1;
        c20 += a0 * x2;
        c21 += a1 * x2;
        c30 += a0 * x3;
        c31 += a1 * x3;
      }
      float tmp[NR][MR];
      std::memcpy(&tmp[0][0], &c00, 16);
      std::memcpy(&tmp[0][4], &c01, 16);
      std::memcpy(&tmp[1][0], &c10, 16);
      std::memcpy(&tmp[1][4], &c11, 16);
      std::memcpy(&tmp[2][0], &c20, 16);
      std::memcpy(&tmp[2][4], &c21, 16);
      std::memcpy(&tmp[3][0], &c30, 16);
      std::memcpy(&tmp[3][4], &c31, 16);
      for (int c = 0; c < NR; c++)
        for (int r = 0; r < rows; r++) acc[size_t(j + c) * m + r0 + r] = tmp[c][r];
    }
    for (; j < n; j++) {
      v4 c0 = {0, 0, 0, 0}, c1 = c0;
      const float* b0 = bp + size_t(j) * k;
      for (int p = 0; p < k; p++) {
        v4 a0, a1;
        std::memcpy(&a0, pa + size_t(p) * MR, 16);
        std::memcpy(&a1, pa + size_t(p) * MR + 4, 16);
        c0 += a0 * b0[p];
        c1 += a1 * b0[p];
      }
      float tmp[MR];
      std::memcpy(&tmp[0], &c0, 16);
      std::memcpy(&tmp[4], &c1, 16);
      for (int r = 0; r < rows; r++) acc[size_t(j) * m + r0 + r] = tmp[r];
    }
  }
}

// Runs on the stream's worker.
void run_gemm(const Gemm& g) {
  float alpha = g.alpha, beta = g.beta;
  if (g.device_scalars) {
    if (!check_operand(g, g.alpha_p, 4, "alpha") || !check_operand(g, g.beta_p, 4, "beta")) return;
    std::memcpy(&alpha, reinterpret_cast<const void*>(g.alpha_p), 4);
    std::memcpy(&beta, reinterpret_cast<const void*>(g.beta_p), 4);
  }
  const int m = g.m, n = g.n, k = g.k;
  const bool reads_ab = k > 0 && alpha != 0.0f;
  const bool reads_c = beta != 0.0f;
  // Stored shapes: op(A) is m x k, op(B) is k x n.
  const int a_rows = g.ta ? k : m, a_cols = g.ta ? m : k;
  const int b_rows = g.tb ? n : k, b_cols = g.tb ? k : n;
  if (reads_ab) {
    if (!check_operand(g, g.a, footprint(g.lda, a_rows, a_cols) * elt_size(g.at), "A")) return;
    if (!check_operand(g, g.b, footprint(g.ldb, b_rows, b_cols) * elt_size(g.bt), "B")) return;
  }
  if (!check_operand(g, g.c, footprint(g.ldc, m, n) * elt_size(g.ct), reads_c ? "C (read and written)" : "C"))
    return;

  std::vector<float> acc;
  if (reads_ab) {
    const void* A = reinterpret_cast<const void*>(g.a);
    const void* B = reinterpret_cast<const void*>(g.b);
    int panels = (m + MR - 1) / MR;
    std::vector<float> ap(size_t(panels) * MR * k, 0.0f), bp(size_t(k) * n);
    for (int p = 0; p < k; p++)
      for (int i = 0; i < m; i++) {
        size_t src = g.ta ? size_t(p) + size_t(i) * g.lda : size_t(i) + size_t(p) * g.lda;
        ap[size_t(i / MR) * MR * k + size_t(p) * MR + (i % MR)] = load(g.at, A, src);
      }
    for (int j = 0; j < n; j++)
      for (int p = 0; p < k; p++) {
        size_t src = g.tb ? size_t(j) + size_t(p) * g.ldb : size_t(p) + size_t(j) * g.ldb;
        bp[size_t(j) * k + p] = load(g.bt, B, src);
      }
    acc.resize(size_t(m) * n);
    multiply(ap.data(), bp.data(), acc.data(), m, n, k);
  }
  void* C = reinterpret_cast<void*>(g.c);
  for (int j = 0; j < n; j++)
    for (int i = 0; i < m; i++) {
      size_t ci = size_t(i) + size_t(j) * g.ldc;
      float v = reads_ab ? alpha * acc[size_t(j) * m + i] : 0.0f;
      if (reads_c) v += beta * load(g.ct, C, ci);
      store(g.ct, C, ci, v);
    }
}

bool op_ok(cublasOperation_t op) { return op == CUBLAS_OP_N || op == CUBLAS_OP_T || op == CUBLAS_OP_C; }

const char* op_name(cublasOperation_t op) {
  switch (op) {
    case CUBLAS_OP_N: return "N";
    case CUBLAS_OP_T: return "T";
    case CUBLAS_OP_C: return "C";
    default: return "?";
  }
}

// The documented argument checks of cublas<t>gemm / cublasGemmEx (CUBLAS_STATUS_INVALID_VALUE).
cublasStatus_t check_dims(const char* fn, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, int lda,
                          int ldb, int ldc, const void* alpha, const void* beta) {
  char buf[256];
  auto bad = [&](const char* what) {
    complain(fn, std::string("CUBLAS_STATUS_INVALID_VALUE: ") + what);
    return CUBLAS_STATUS_INVALID_VALUE;
  };
  if (m < 0 || n < 0 || k < 0) {
    std::snprintf(buf, sizeof buf, "m = %d, n = %d, k = %d (none may be negative)", m, n, k);
    return bad(buf);
  }
  if (!op_ok(ta) || !op_ok(tb)) {
    std::snprintf(buf, sizeof buf, "transa = %d, transb = %d (N, T or C)", int(ta), int(tb));
    return bad(buf);
  }
  int a_rows = ta == CUBLAS_OP_N ? m : k, b_rows = tb == CUBLAS_OP_N ? k : n;
  if (lda < std::max(1, a_rows)) {
    std::snprintf(buf, sizeof buf, "lda = %d < max(1, %d) (rows of A stored for transa = %s)", lda, a_rows,
                  op_name(ta));
    return bad(buf);
  }
  if (ldb < std::max(1, b_rows)) {
    std::snprintf(buf, sizeof buf, "ldb = %d < max(1, %d) (rows of B stored for transb = %s)", ldb, b_rows,
                  op_name(tb));
    return bad(buf);
  }
  if (ldc < std::max(1, m)) {
    std::snprintf(buf, sizeof buf, "ldc = %d < max(1, m = %d)", ldc, m);
    return bad(buf);
  }
  if (!alpha || !beta) return bad("alpha or beta is NULL");
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t launch(const char* fn, const cublasContext& h, cublasOperation_t ta, cublasOperation_t tb, int m,
                      int n, int k, const void* alpha, const void* A, Elt at, int lda, const void* B, Elt bt,
                      int ldb, const void* beta, void* C, Elt ct, int ldc) {
  Gemm g;
  g.fn = fn;
  g.ta = ta != CUBLAS_OP_N;
  g.tb = tb != CUBLAS_OP_N;
  g.m = m;
  g.n = n;
  g.k = k;
  g.at = at;
  g.bt = bt;
  g.ct = ct;
  g.a = reinterpret_cast<uintptr_t>(A);
  g.b = reinterpret_cast<uintptr_t>(B);
  g.c = reinterpret_cast<uintptr_t>(C);
  g.lda = lda;
  g.ldb = ldb;
  g.ldc = ldc;
  g.device = h.device;
  g.device_scalars = h.pointer_mode == CUBLAS_POINTER_MODE_DEVICE;
  g.alpha = g.beta = 0.0f;
  g.alpha_p = reinterpret_cast<uintptr_t>(alpha);
  g.beta_p = reinterpret_cast<uintptr_t>(beta);
  if (!g.device_scalars) {  // host pointers: read now, as cuBLAS does before returning
    std::memcpy(&g.alpha, alpha, 4);
    std::memcpy(&g.beta, beta, 4);
  }
  if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;  // quick return: nothing to compute
  CUresult r = vgpu::enqueue(h.stream, [g] { run_gemm(g); }, fn);
  if (r != CUDA_SUCCESS) {
    const char* name = nullptr;
    cuGetErrorName(r, &name);
    complain(fn, std::string("CUBLAS_STATUS_EXECUTION_FAILED: could not enqueue on the handle's stream: ") +
                     (name ? name : "?"));
    return CUBLAS_STATUS_EXECUTION_FAILED;
  }
  return CUBLAS_STATUS_SUCCESS;
}

bool elt_of(cudaDataType t, Elt* out) {
  switch (t) {
    case CUDA_R_32F: *out = Elt::F32; return true;
    case CUDA_R_16BF: *out = Elt::BF16; return true;
    case CUDA_R_16F: *out = Elt::F16; return true;
    default: return false;
  }
}

bool known_data_type(int t) {
  // library_types.h: 0..36 are defined (R/C of 16F, 32F, 64F, 8I, 8U, 32I, 32U, 16BF, 4I, 4U,
  // 16I, 16U, 64I, 64U, 8F_E4M3, 8F_E5M2, ...); anything else is not a data type at all.
  return t >= 0 && t <= 36;
}

bool known_compute_type(int c) { return (c >= 64 && c <= 75) || (c >= 77 && c <= 79); }

bool known_algo(int a) { return (a >= -1 && a <= 23) || (a >= 99 && a <= 115); }

}  // namespace

VGPU_EXPORT cublasStatus_t cublasCreate_v2(cublasHandle_t* handle) {
  vgpu::trace("cublasCreate_v2");
  if (!handle) {
    complain("cublasCreate_v2", "CUBLAS_STATUS_INVALID_VALUE: handle is NULL");
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  if (vgpu::config().fail_cublas_create) {
    complain("cublasCreate_v2", "CUBLAS_STATUS_NOT_INITIALIZED (fault injected by SVFT_VGPU_FAULTS=cublas-create)");
    return CUBLAS_STATUS_NOT_INITIALIZED;
  }
  if (!vgpu::initialized()) {
    complain("cublasCreate_v2", "CUBLAS_STATUS_NOT_INITIALIZED: cuInit has not been called");
    return CUBLAS_STATUS_NOT_INITIALIZED;
  }
  CUcontext ctx = nullptr;
  CUdevice dev = 0;
  if (cuCtxGetCurrent(&ctx) != CUDA_SUCCESS || !ctx || cuCtxGetDevice(&dev) != CUDA_SUCCESS) {
    complain("cublasCreate_v2",
             "CUBLAS_STATUS_NOT_INITIALIZED: no current CUDA context on this thread (real cuBLAS would "
             "silently use device 0's primary context, whichever device the caller meant)");
    return CUBLAS_STATUS_NOT_INITIALIZED;
  }
  auto* h = new cublasContext;
  h->ctx = ctx;
  h->device = int(dev);
  {
    std::lock_guard<std::mutex> g(g_mu);
    live_handles().insert(h);
  }
  *handle = h;
  return CUBLAS_STATUS_SUCCESS;
}

VGPU_EXPORT cublasStatus_t cublasDestroy_v2(cublasHandle_t handle) {
  vgpu::trace("cublasDestroy_v2(%p)", (void*)handle);
  {
    std::lock_guard<std::mutex> g(g_mu);
    if (!handle || !live_handles().erase(handle)) {
      complain("cublasDestroy_v2", "CUBLAS_STATUS_NOT_INITIALIZED: not a live cuBLAS handle");
      return CUBLAS_STATUS_NOT_INITIALIZED;
    }
  }
  delete handle;
  // Documented: releasing the handle's resources implicitly synchronises the device.
  (void)vgpu::device_sync();
  return CUBLAS_STATUS_SUCCESS;
}

VGPU_EXPORT cublasStatus_t cublasGetVersion_v2(cublasHandle_t handle, int* version) {
  cublasContext h;
  if (!lookup(handle, &h)) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (!version) return CUBLAS_STATUS_INVALID_VALUE;
  *version = 130000;
  return CUBLAS_STATUS_SUCCESS;
}

VGPU_EXPORT cublasStatus_t cublasSetStream_v2(cublasHandle_t handle, cudaStream_t stream) {
  vgpu::trace("cublasSetStream_v2(%p, %p)", (void*)handle, (void*)stream);
  std::lock_guard<std::mutex> g(g_mu);
  if (!handle || !live_handles().count(handle)) {
    complain("cublasSetStream_v2", "CUBLAS_STATUS_NOT_INITIALIZED: not a live cuBLAS handle");
    return CUBLAS_STATUS_NOT_INITIALIZED;
  }
  handle->stream = reinterpret_cast<CUstream>(stream);
  return CUBLAS_STATUS_SUCCESS;
}

VGPU_EXPORT cublasStatus_t cublasGetStream_v2(cublasHandle_t handle, cudaStream_t* stream) {
  cublasContext h;
  if (!lookup(handle, &h)) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (!stream) return CUBLAS_STATUS_INVALID_VALUE;
  *stream = reinterpret_cast<cudaStream_t>(h.stream);
  return CUBLAS_STATUS_SUCCESS;
}

VGPU_EXPORT cublasStatus_t cublasSetPointerMode_v2(cublasHandle_t handle, cublasPointerMode_t mode) {
  std::lock_guard<std::mutex> g(g_mu);
  if (!handle || !live_handles().count(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (mode != CUBLAS_POINTER_MODE_HOST && mode != CUBLAS_POINTER_MODE_DEVICE) {
    complain("cublasSetPointerMode_v2", "CUBLAS_STATUS_INVALID_VALUE: unknown pointer mode");
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  handle->pointer_mode = mode;
  return CUBLAS_STATUS_SUCCESS;
}

VGPU_EXPORT cublasStatus_t cublasGetPointerMode_v2(cublasHandle_t handle, cublasPointerMode_t* mode) {
  cublasContext h;
  if (!lookup(handle, &h)) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (!mode) return CUBLAS_STATUS_INVALID_VALUE;
  *mode = h.pointer_mode;
  return CUBLAS_STATUS_SUCCESS;
}

VGPU_EXPORT cublasStatus_t cublasSetMathMode(cublasHandle_t handle, cublasMath_t mode) {
  std::lock_guard<std::mutex> g(g_mu);
  if (!handle || !live_handles().count(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  int base = int(mode) & ~int(CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION);
  if (!((base >= 0 && base <= 4) || base == 8)) {
    complain("cublasSetMathMode", "CUBLAS_STATUS_INVALID_VALUE: unknown math mode");
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  handle->math_mode = mode;  // the virtual GPU computes every mode the same way (f32, no TF32)
  return CUBLAS_STATUS_SUCCESS;
}

VGPU_EXPORT cublasStatus_t cublasGetMathMode(cublasHandle_t handle, cublasMath_t* mode) {
  cublasContext h;
  if (!lookup(handle, &h)) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (!mode) return CUBLAS_STATUS_INVALID_VALUE;
  *mode = h.math_mode;
  return CUBLAS_STATUS_SUCCESS;
}

VGPU_EXPORT cublasStatus_t cublasSetWorkspace_v2(cublasHandle_t handle, void* workspace, size_t bytes) {
  std::lock_guard<std::mutex> g(g_mu);
  if (!handle || !live_handles().count(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (bytes > 0 && !workspace) {
    complain("cublasSetWorkspace_v2", "CUBLAS_STATUS_INVALID_VALUE: NULL workspace of non-zero size");
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  // The documented requirement: a 256-byte aligned workspace.
  if (workspace && (reinterpret_cast<uintptr_t>(workspace) % 256) != 0) {
    complain("cublasSetWorkspace_v2", "CUBLAS_STATUS_INVALID_VALUE: workspace not 256-byte aligned");
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  handle->workspace = workspace;  // not used: the virtual GPU computes in host memory
  handle->workspace_bytes = bytes;
  return CUBLAS_STATUS_SUCCESS;
}

VGPU_EXPORT const char* cublasGetStatusName(cublasStatus_t status) {
  switch (status) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
    default: return "CUBLAS_STATUS_UNKNOWN";
  }
}

VGPU_EXPORT const char* cublasGetStatusString(cublasStatus_t status) {
  switch (status) {
    case CUBLAS_STATUS_SUCCESS: return "success";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "the library was not initialized";
    case CUBLAS_STATUS_ALLOC_FAILED: return "the resource allocation failed";
    case CUBLAS_STATUS_INVALID_VALUE: return "an invalid numeric value was used as an argument";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "an absent device architectural feature is required";
    case CUBLAS_STATUS_MAPPING_ERROR: return "an access to GPU memory space failed";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "the GPU program failed to execute";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "an internal operation failed";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "the functionality requested is not supported";
    case CUBLAS_STATUS_LICENSE_ERROR: return "error detected trying to check the license";
    default: return "unknown error";
  }
}

VGPU_EXPORT cublasStatus_t cublasSgemm_v2(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb,
                                          int m, int n, int k, const float* alpha, const float* A, int lda,
                                          const float* B, int ldb, const float* beta, float* C, int ldc) {
  const char* fn = "cublasSgemm_v2";
  vgpu::trace("%s(%s%s, m=%d n=%d k=%d, A=%p lda=%d, B=%p ldb=%d, C=%p ldc=%d)", fn, op_name(transa),
              op_name(transb), m, n, k, (const void*)A, lda, (const void*)B, ldb, (void*)C, ldc);
  cublasContext h;
  if (!lookup(handle, &h)) {
    complain(fn, "CUBLAS_STATUS_NOT_INITIALIZED: not a live cuBLAS handle");
    return CUBLAS_STATUS_NOT_INITIALIZED;
  }
  cublasStatus_t s = check_dims(fn, transa, transb, m, n, k, lda, ldb, ldc, alpha, beta);
  if (s != CUBLAS_STATUS_SUCCESS) return s;
  return launch(fn, h, transa, transb, m, n, k, alpha, A, Elt::F32, lda, B, Elt::F32, ldb, beta, C, Elt::F32, ldc);
}

VGPU_EXPORT cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb,
                                        int m, int n, int k, const void* alpha, const void* A, cudaDataType Atype,
                                        int lda, const void* B, cudaDataType Btype, int ldb, const void* beta, void* C,
                                        cudaDataType Ctype, int ldc, cublasComputeType_t computeType,
                                        cublasGemmAlgo_t algo) {
  const char* fn = "cublasGemmEx";
  vgpu::trace("%s(%s%s, m=%d n=%d k=%d, A=%p type %d lda=%d, B=%p type %d ldb=%d, C=%p type %d ldc=%d, compute %d)",
              fn, op_name(transa), op_name(transb), m, n, k, A, int(Atype), lda, B, int(Btype), ldb, C, int(Ctype),
              ldc, int(computeType));
  cublasContext h;
  if (!lookup(handle, &h)) {
    complain(fn, "CUBLAS_STATUS_NOT_INITIALIZED: not a live cuBLAS handle");
    return CUBLAS_STATUS_NOT_INITIALIZED;
  }
  cublasStatus_t s = check_dims(fn, transa, transb, m, n, k, lda, ldb, ldc, alpha, beta);
  if (s != CUBLAS_STATUS_SUCCESS) return s;
  char buf[256];
  if (!known_data_type(Atype) || !known_data_type(Btype) || !known_data_type(Ctype) ||
      !known_compute_type(computeType) || !known_algo(algo)) {
    std::snprintf(buf, sizeof buf,
                  "CUBLAS_STATUS_INVALID_VALUE: Atype %d, Btype %d, Ctype %d, computeType %d or algo %d is not a "
                  "valid value",
                  int(Atype), int(Btype), int(Ctype), int(computeType), int(algo));
    complain(fn, buf);
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  // The documented cublasGemmEx type table, the rows the virtual GPU implements (scale type f32):
  //   CUBLAS_COMPUTE_32F / _PEDANTIC: A = B = 16BF, C = 16BF or 32F; A = B = 16F, C = 16F or
  //   32F; A = B = C = 32F.
  //   CUBLAS_COMPUTE_32F_FAST_16F / _FAST_16BF / _FAST_TF32 / _EMULATED_16BFX9: A = B = C = 32F
  //   (computed in full f32 here).
  // Other documented rows (8I inputs, 16F/64F/32I compute, complex) and every combination the
  // table lacks: CUBLAS_STATUS_NOT_SUPPORTED.
  Elt at, bt, ct;
  bool ok = elt_of(Atype, &at) && elt_of(Btype, &bt) && elt_of(Ctype, &ct) && at == bt;
  if (ok) {
    switch (computeType) {
      case CUBLAS_COMPUTE_32F:
      case CUBLAS_COMPUTE_32F_PEDANTIC: ok = ct == at || ct == Elt::F32; break;
      case CUBLAS_COMPUTE_32F_FAST_16F:
      case CUBLAS_COMPUTE_32F_FAST_16BF:
      case CUBLAS_COMPUTE_32F_FAST_TF32:
      case CUBLAS_COMPUTE_32F_EMULATED_16BFX9: ok = at == Elt::F32 && ct == Elt::F32; break;
      default: ok = false;
    }
  }
  if (!ok) {
    std::snprintf(buf, sizeof buf,
                  "CUBLAS_STATUS_NOT_SUPPORTED: Atype %d, Btype %d, Ctype %d with computeType %d is not a "
                  "combination the virtual GPU implements (see the cublasGemmEx type table)",
                  int(Atype), int(Btype), int(Ctype), int(computeType));
    complain(fn, buf);
    return CUBLAS_STATUS_NOT_SUPPORTED;
  }
  (void)elt_name;
  return launch(fn, h, transa, transb, m, n, k, alpha, A, at, lda, B, bt, ldb, beta, C, ct, ldc);
}
