// cusolver.cpp: the cuSOLVER face of the virtual GPU: dense handles, gesvdjInfo parameters and
// the Jacobi SVD cusolverDnSgesvdj (with its buffer-size query), written from NVIDIA's cuSOLVER
// documentation.
//
// cusolverDnSgesvdj(jobz, econ, m, n, A, lda, S, U, ldu, V, ldv, work, lwork, info, params):
// A = U diag(S) V^T, A m x n column-major (destroyed on exit: poisoned with NaN here), S the
// min(m,n) singular values in descending order (unless cusolverDnXgesvdjSetSortEig(0)), U m x
// min(m,n) (econ != 0) or m x m, V n x min(m,n) or n x n, both column-major, written only for
// jobz = CUSOLVER_EIG_MODE_VECTOR. info (device memory) = 0 on success, -i when the i-th
// argument (not counting the handle) is wrong, min(m,n) + 1 when the sweeps did not reach the
// tolerance. Computed when the handle's stream runs it, by a one-sided (Hestenes) Jacobi SVD in
// f64 on the host, after the exact footprint of every operand has been range-checked; `work`
// (lwork floats, lwork at least what cusolverDnSgesvdj_bufferSize reports) is checked and
// overwritten with NaN, so nothing can rely on its contents.
#include "vgpu.h"
#include "cusolver_decl.h"

#include <algorithm>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <numeric>
#include <string>
#include <unordered_set>
#include <vector>

struct cusolverDnContext {
  CUcontext ctx = nullptr;
  int device = 0;
  CUstream stream = nullptr;
};

namespace {

// What one gesvdj run reports back through its params (cusolverDnXgesvdjGetResidual/Sweeps).
struct GesvdjResult {
  std::mutex mu;
  double residual = 0.0;
  int sweeps = 0;
};

}  // namespace

struct gesvdjInfo {
  double tolerance = 0.0;  // <= 0: the default, machine accuracy of the type (FLT_EPSILON)
  int max_sweeps = 100;    // documented default
  int sort = 1;            // documented default: sorted, descending
  std::shared_ptr<GesvdjResult> last = std::make_shared<GesvdjResult>();
};

namespace {

std::mutex& g_mu = *new std::mutex;
std::unordered_set<cusolverDnContext*>& live_handles() {
  static auto* s = new std::unordered_set<cusolverDnContext*>;
  return *s;
}
std::unordered_set<gesvdjInfo*>& live_params() {
  static auto* s = new std::unordered_set<gesvdjInfo*>;
  return *s;
}

bool lookup(cusolverDnHandle_t h, cusolverDnContext* out) {
  if (!h) return false;
  std::lock_guard<std::mutex> g(g_mu);
  if (!live_handles().count(h)) return false;
  *out = *h;
  return true;
}

bool params_live(gesvdjInfo_t p) {
  std::lock_guard<std::mutex> g(g_mu);
  return p && live_params().count(p);
}

void complain(const char* fn, const std::string& why) {
  std::fprintf(stderr, "svft-vgpu: %s: %s\n", fn, why.c_str());
}

size_t footprint(int ld, int rows, int cols) {
  if (rows <= 0 || cols <= 0) return 0;
  return size_t(ld) * size_t(cols - 1) + size_t(rows);
}

bool check_operand(const char* fn, int device, uintptr_t p, size_t bytes, const char* what) {
  if (bytes == 0) return true;
  std::string label = std::string(fn) + " " + what;
  if (!vgpu::check_range(p, bytes, label.c_str())) return false;
  vgpu::PtrInfo info = vgpu::ptr_info(p);
  if (info.kind == vgpu::MemKind::Device && info.device != device) {
    char buf[200];
    std::snprintf(buf, sizeof buf, "%s: 0x%llx is memory of device %d, the cuSOLVER handle's device is %d",
                  label.c_str(), (unsigned long long)p, info.device, device);
    vgpu::fault(CUDA_ERROR_ILLEGAL_ADDRESS, buf);
    return false;
  }
  return true;
}

// The workspace size reported by cusolverDnSgesvdj_bufferSize, in floats: what a Jacobi SVD of
// the taller orientation keeps (the matrix, the rotations, a few vectors). The virtual GPU
// computes on the host, but checks the caller provides (and does not rely on) this much.
long long gesvdj_lwork(int m, int n) {
  long long p = std::min(m, n), big = std::max(m, n);
  return std::max(1LL, big * p + p * p + 2 * big + 2 * p);
}

double dot(const double* x, const double* y, int n) {
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += x[i] * y[i];
    s1 += x[i + 1] * y[i + 1];
    s2 += x[i + 2] * y[i + 2];
    s3 += x[i + 3] * y[i + 3];
  }
  for (; i < n; i++) s0 += x[i] * y[i];
  return (s0 + s1) + (s2 + s3);
}

void rotate(double* x, double* y, int n, double c, double s) {
  for (int i = 0; i < n; i++) {
    double a = x[i], b = y[i];
    x[i] = c * a - s * b;
    y[i] = s * a + c * b;
  }
}

// Orthonormal columns: fills column `col` of u (M rows, column-major) with a unit vector
// orthogonal to the columns listed in `have`, trying e_0, e_1, ... from *next on.
void complete_column(std::vector<double>& u, int M, int col, const std::vector<int>& have, int* next) {
  std::vector<double> v(M);
  for (int tries = 0; tries < 2 * M + 2; tries++) {
    int k = (*next)++ % M;
    std::fill(v.begin(), v.end(), 0.0);
    v[k] = 1.0;
    // Twice is enough (three passes when much of e_k lay in the span): the residual is
    // orthogonal to working accuracy even when small, which the last columns' always are.
    double nrm = 1.0;
    for (int pass = 0; pass < 3 && (pass < 2 || nrm < 0.5); pass++) {
      for (int h : have) {
        const double* uh = &u[size_t(h) * M];
        double d = dot(uh, v.data(), M);
        for (int r = 0; r < M; r++) v[r] -= d * uh[r];
      }
      nrm = std::sqrt(dot(v.data(), v.data(), M));
    }
    if (nrm > 1e-3) {
      for (int r = 0; r < M; r++) u[size_t(col) * M + r] = v[r] / nrm;
      return;
    }
  }
}

struct SvdJob {
  const char* fn;
  int device;
  bool vectors;
  bool econ;
  int m, n, lda, ldu, ldv, lwork;
  uintptr_t a, s, u, v, work, info;
  double tolerance;
  int max_sweeps;
  bool sort;
  std::shared_ptr<GesvdjResult> result;
};

void write_info(uintptr_t info, int value) { std::memcpy(reinterpret_cast<void*>(info), &value, 4); }

void run_gesvdj(const SvdJob& j) {
  const int m = j.m, n = j.n, p = std::min(m, n);
  const int ucols = j.econ ? p : m, vcols = j.econ ? p : n;
  if (!check_operand(j.fn, j.device, j.a, footprint(j.lda, m, n) * 4, "A")) return;
  if (!check_operand(j.fn, j.device, j.s, size_t(p) * 4, "S")) return;
  if (j.vectors) {
    if (!check_operand(j.fn, j.device, j.u, footprint(j.ldu, m, ucols) * 4, "U")) return;
    if (!check_operand(j.fn, j.device, j.v, footprint(j.ldv, n, vcols) * 4, "V")) return;
  }
  if (!check_operand(j.fn, j.device, j.work, size_t(std::max(j.lwork, 0)) * 4, "work")) return;
  if (!check_operand(j.fn, j.device, j.info, 4, "info")) return;
  if (j.lwork > 0) std::memset(reinterpret_cast<void*>(j.work), 0xff, size_t(j.lwork) * 4);

  float* A = reinterpret_cast<float*>(j.a);
  float* S = reinterpret_cast<float*>(j.s);
  float* U = reinterpret_cast<float*>(j.u);
  float* V = reinterpret_cast<float*>(j.v);
  auto poison_a = [&] {
    for (int c = 0; c < n; c++) std::memset(A + size_t(c) * j.lda, 0xff, size_t(m) * 4);
  };
  if (m == 0 || n == 0) {
    // Nothing to decompose; a full U (or V) is the identity.
    if (j.vectors && !j.econ) {
      for (int c = 0; c < ucols; c++)
        for (int r = 0; r < m; r++) U[r + size_t(c) * j.ldu] = r == c ? 1.0f : 0.0f;
      for (int c = 0; c < vcols; c++)
        for (int r = 0; r < n; r++) V[r + size_t(c) * j.ldv] = r == c ? 1.0f : 0.0f;
    }
    write_info(j.info, 0);
    return;
  }

  // B: the taller orientation, M x N with M >= N, f64, column-major (ld M).
  const bool tall = m >= n;
  const int M = tall ? m : n, N = tall ? n : m;
  std::vector<double> b(size_t(M) * N);
  bool finite = true;
  for (int c = 0; c < n; c++)
    for (int r = 0; r < m; r++) {
      double x = A[r + size_t(c) * j.lda];
      finite = finite && std::isfinite(x);
      if (tall)
        b[r + size_t(c) * M] = x;
      else
        b[c + size_t(r) * M] = x;
    }
  std::vector<double> a0 = b;  // the input, for the residual
  if (!finite) {
    // No sweep converges on non-finite input: NaN results, info = min(m,n) + 1.
    const float nan = std::nanf("");
    for (int i = 0; i < p; i++) S[i] = nan;
    if (j.vectors) {
      for (int c = 0; c < ucols; c++)
        for (int r = 0; r < m; r++) U[r + size_t(c) * j.ldu] = nan;
      for (int c = 0; c < vcols; c++)
        for (int r = 0; r < n; r++) V[r + size_t(c) * j.ldv] = nan;
    }
    poison_a();
    {
      std::lock_guard<std::mutex> g(j.result->mu);
      j.result->residual = std::nan("");
      j.result->sweeps = 0;
    }
    write_info(j.info, p + 1);
    return;
  }

  // One-sided Jacobi: rotate pairs of columns of B (and of Q = I, N x N) until every pair is
  // orthogonal to rel_tol: B Q = B_final, so B = B_final Q^T, sigma_i = |b_i|, u_i = b_i / sigma_i.
  std::vector<double> q;
  q.assign(size_t(N) * N, 0.0);
  for (int i = 0; i < N; i++) q[i + size_t(i) * N] = 1.0;
  const double user_tol = std::max(j.tolerance > 0 ? j.tolerance : double(FLT_EPSILON), double(FLT_EPSILON));
  const double rot_tol = std::min(user_tol, 1e3 * DBL_EPSILON);  // converge to f64 accuracy
  int sweeps = 0;
  double off = 0.0;
  std::vector<double> norm2(N);
  for (; sweeps < j.max_sweeps;) {
    sweeps++;
    off = 0.0;
    bool rotated = false;
    // Squared column norms: recomputed each sweep, updated exactly by each rotation in between
    // (alpha' = alpha - t gamma, beta' = beta + t gamma).
    for (int i = 0; i < N; i++) norm2[i] = dot(&b[size_t(i) * M], &b[size_t(i) * M], M);
    for (int i = 0; i < N - 1; i++)
      for (int k = i + 1; k < N; k++) {
        double* bi = &b[size_t(i) * M];
        double* bk = &b[size_t(k) * M];
        double alpha = norm2[i], beta = norm2[k], gamma = dot(bi, bk, M);
        if (alpha == 0.0 || beta == 0.0) continue;
        double rel = std::fabs(gamma) / std::sqrt(alpha) / std::sqrt(beta);
        off = std::max(off, rel);
        if (!(rel > rot_tol)) continue;
        rotated = true;
        double zeta = (beta - alpha) / (2.0 * gamma);
        double t = std::copysign(1.0, zeta) / (std::fabs(zeta) + std::hypot(1.0, zeta));
        double c = 1.0 / std::sqrt(1.0 + t * t), s = c * t;
        rotate(bi, bk, M, c, s);
        norm2[i] = std::max(alpha - t * gamma, 0.0);
        norm2[k] = beta + t * gamma;
        rotate(&q[size_t(i) * N], &q[size_t(k) * N], N, c, s);
      }
    if (!rotated) break;
  }
  const bool converged = off <= user_tol;

  std::vector<double> sigma(N);
  for (int i = 0; i < N; i++) sigma[i] = std::sqrt(dot(&b[size_t(i) * M], &b[size_t(i) * M], M));
  std::vector<int> order(N);
  std::iota(order.begin(), order.end(), 0);
  if (j.sort) std::stable_sort(order.begin(), order.end(), [&](int x, int y) { return sigma[x] > sigma[y]; });

  // Left vectors of B (M x ub_cols): normalised columns in order, completed where sigma is 0
  // (and to M columns for a full U of the tall side).
  const int ub_cols = (j.vectors && !j.econ) ? M : N;
  std::vector<double> ub(size_t(M) * ub_cols, 0.0);
  std::vector<int> have, missing;
  for (int c = 0; c < N; c++) {
    double sg = sigma[order[c]];
    if (sg > DBL_MIN * 0x1p52) {
      const double* src = &b[size_t(order[c]) * M];
      for (int r = 0; r < M; r++) ub[size_t(c) * M + r] = src[r] / sg;
      have.push_back(c);
    } else {
      missing.push_back(c);
    }
  }
  for (int c = N; c < ub_cols; c++) missing.push_back(c);
  if (j.vectors) {
    int next = 0;
    for (int c : missing) {
      complete_column(ub, M, c, have, &next);
      have.push_back(c);
    }
  }
  // Right vectors of B: the columns of Q, in the same order (N x N, complete).
  std::vector<double> qs(size_t(N) * N);
  for (int c = 0; c < N; c++) std::copy(&q[size_t(order[c]) * N], &q[size_t(order[c]) * N] + N, &qs[size_t(c) * N]);

  // A = B (tall) or B^T: U_A = ub, V_A = qs (tall); U_A = qs, V_A = ub (wide).
  const std::vector<double>& ua = tall ? ub : qs;
  const std::vector<double>& va = tall ? qs : ub;
  const int ua_ld = tall ? M : N, va_ld = tall ? N : M;  // = m and n
  for (int i = 0; i < p; i++) S[i] = float(sigma[order[i]]);
  if (j.vectors) {
    for (int c = 0; c < ucols; c++)
      for (int r = 0; r < m; r++) U[r + size_t(c) * j.ldu] = float(ua[r + size_t(c) * ua_ld]);
    for (int c = 0; c < vcols; c++)
      for (int r = 0; r < n; r++) V[r + size_t(c) * j.ldv] = float(va[r + size_t(c) * va_ld]);
  }
  // Residual ||B Q - U_B S||_F over the first N columns (= ||A V - U S||_F), in f64.
  double res = 0.0;
  if (j.vectors) {
    std::vector<double> col(M);
    for (int c = 0; c < N; c++) {
      std::fill(col.begin(), col.end(), 0.0);
      for (int t = 0; t < N; t++) {
        double w = qs[t + size_t(c) * N];
        const double* bt = &a0[size_t(t) * M];
        for (int r = 0; r < M; r++) col[r] += bt[r] * w;
      }
      double sg = sigma[order[c]];
      for (int r = 0; r < M; r++) {
        double d = col[r] - ub[size_t(c) * M + r] * sg;
        res += d * d;
      }
    }
    res = std::sqrt(res);
  }
  {
    std::lock_guard<std::mutex> g(j.result->mu);
    j.result->residual = res;
    j.result->sweeps = sweeps;
  }
  poison_a();
  write_info(j.info, converged ? 0 : p + 1);
}

// The documented argument checks of gesvdj / gesvdj_bufferSize: 0, or the failing argument's
// position, not counting the handle (as info = -i reports it).
int check_args(const char* fn, cusolverEigMode_t jobz, int m, int n, int lda, int ldu, int ldv) {
  char buf[200];
  int bad = 0;
  if (jobz != CUSOLVER_EIG_MODE_NOVECTOR && jobz != CUSOLVER_EIG_MODE_VECTOR) {
    bad = 1;
    std::snprintf(buf, sizeof buf, "jobz = %d (CUSOLVER_EIG_MODE_NOVECTOR or _VECTOR)", int(jobz));
  } else if (m < 0) {
    bad = 3;
    std::snprintf(buf, sizeof buf, "m = %d < 0", m);
  } else if (n < 0) {
    bad = 4;
    std::snprintf(buf, sizeof buf, "n = %d < 0", n);
  } else if (lda < std::max(1, m)) {
    bad = 6;
    std::snprintf(buf, sizeof buf, "lda = %d < max(1, m = %d)", lda, m);
  } else if (ldu < std::max(1, m)) {
    bad = 9;
    std::snprintf(buf, sizeof buf, "ldu = %d < max(1, m = %d)", ldu, m);
  } else if (ldv < std::max(1, n)) {
    bad = 11;
    std::snprintf(buf, sizeof buf, "ldv = %d < max(1, n = %d)", ldv, n);
  }
  if (bad) complain(fn, std::string("CUSOLVER_STATUS_INVALID_VALUE: ") + buf);
  return bad;
}

cusolverStatus_t create_common(const char* fn, bool inject, const char* injected) {
  if (inject) {
    complain(fn, std::string("CUSOLVER_STATUS_NOT_INITIALIZED (fault injected by SVFT_VGPU_FAULTS=") + injected + ")");
    return CUSOLVER_STATUS_NOT_INITIALIZED;
  }
  if (!vgpu::initialized()) {
    complain(fn, "CUSOLVER_STATUS_NOT_INITIALIZED: cuInit has not been called");
    return CUSOLVER_STATUS_NOT_INITIALIZED;
  }
  return CUSOLVER_STATUS_SUCCESS;
}

}  // namespace

VGPU_EXPORT cusolverStatus_t cusolverDnCreate(cusolverDnHandle_t* handle) {
  const char* fn = "cusolverDnCreate";
  vgpu::trace("%s", fn);
  if (!handle) {
    complain(fn, "CUSOLVER_STATUS_INVALID_VALUE: handle is NULL");
    return CUSOLVER_STATUS_INVALID_VALUE;
  }
  cusolverStatus_t s = create_common(fn, vgpu::config().fail_cusolver_create, "cusolver-create");
  if (s != CUSOLVER_STATUS_SUCCESS) return s;
  CUcontext ctx = nullptr;
  CUdevice dev = 0;
  if (cuCtxGetCurrent(&ctx) != CUDA_SUCCESS || !ctx || cuCtxGetDevice(&dev) != CUDA_SUCCESS) {
    complain(fn,
             "CUSOLVER_STATUS_NOT_INITIALIZED: no current CUDA context on this thread (real cuSOLVER would "
             "silently use device 0's primary context, whichever device the caller meant)");
    return CUSOLVER_STATUS_NOT_INITIALIZED;
  }
  auto* h = new cusolverDnContext;
  h->ctx = ctx;
  h->device = int(dev);
  {
    std::lock_guard<std::mutex> g(g_mu);
    live_handles().insert(h);
  }
  *handle = h;
  return CUSOLVER_STATUS_SUCCESS;
}

VGPU_EXPORT cusolverStatus_t cusolverDnDestroy(cusolverDnHandle_t handle) {
  vgpu::trace("cusolverDnDestroy(%p)", (void*)handle);
  {
    std::lock_guard<std::mutex> g(g_mu);
    if (!handle || !live_handles().erase(handle)) {
      complain("cusolverDnDestroy", "CUSOLVER_STATUS_NOT_INITIALIZED: not a live cuSOLVER handle");
      return CUSOLVER_STATUS_NOT_INITIALIZED;
    }
  }
  delete handle;  // enqueued work holds copies of what it needs
  return CUSOLVER_STATUS_SUCCESS;
}

VGPU_EXPORT cusolverStatus_t cusolverDnSetStream(cusolverDnHandle_t handle, cudaStream_t stream) {
  vgpu::trace("cusolverDnSetStream(%p, %p)", (void*)handle, (void*)stream);
  std::lock_guard<std::mutex> g(g_mu);
  if (!handle || !live_handles().count(handle)) {
    complain("cusolverDnSetStream", "CUSOLVER_STATUS_NOT_INITIALIZED: not a live cuSOLVER handle");
    return CUSOLVER_STATUS_NOT_INITIALIZED;
  }
  handle->stream = reinterpret_cast<CUstream>(stream);
  return CUSOLVER_STATUS_SUCCESS;
}

VGPU_EXPORT cusolverStatus_t cusolverDnGetStream(cusolverDnHandle_t handle, cudaStream_t* stream) {
  cusolverDnContext h;
  if (!lookup(handle, &h)) return CUSOLVER_STATUS_NOT_INITIALIZED;
  if (!stream) return CUSOLVER_STATUS_INVALID_VALUE;
  *stream = reinterpret_cast<cudaStream_t>(h.stream);
  return CUSOLVER_STATUS_SUCCESS;
}

VGPU_EXPORT cusolverStatus_t cusolverDnCreateGesvdjInfo(gesvdjInfo_t* info) {
  vgpu::trace("cusolverDnCreateGesvdjInfo");
  if (!info) return CUSOLVER_STATUS_INVALID_VALUE;
  auto* p = new gesvdjInfo;
  {
    std::lock_guard<std::mutex> g(g_mu);
    live_params().insert(p);
  }
  *info = p;
  return CUSOLVER_STATUS_SUCCESS;
}

VGPU_EXPORT cusolverStatus_t cusolverDnDestroyGesvdjInfo(gesvdjInfo_t info) {
  vgpu::trace("cusolverDnDestroyGesvdjInfo(%p)", (void*)info);
  {
    std::lock_guard<std::mutex> g(g_mu);
    if (!info || !live_params().erase(info)) {
      complain("cusolverDnDestroyGesvdjInfo", "CUSOLVER_STATUS_INVALID_VALUE: not a live gesvdjInfo_t");
      return CUSOLVER_STATUS_INVALID_VALUE;
    }
  }
  delete info;  // a pending gesvdj keeps its own copy of the parameters and of the result slot
  return CUSOLVER_STATUS_SUCCESS;
}

VGPU_EXPORT cusolverStatus_t cusolverDnXgesvdjSetTolerance(gesvdjInfo_t info, double tolerance) {
  if (!params_live(info)) return CUSOLVER_STATUS_INVALID_VALUE;
  info->tolerance = tolerance;  // below machine accuracy: machine accuracy, as documented
  return CUSOLVER_STATUS_SUCCESS;
}

VGPU_EXPORT cusolverStatus_t cusolverDnXgesvdjSetMaxSweeps(gesvdjInfo_t info, int max_sweeps) {
  if (!params_live(info)) return CUSOLVER_STATUS_INVALID_VALUE;
  if (max_sweeps <= 0) {
    complain("cusolverDnXgesvdjSetMaxSweeps", "CUSOLVER_STATUS_INVALID_VALUE: max_sweeps must be positive");
    return CUSOLVER_STATUS_INVALID_VALUE;
  }
  info->max_sweeps = max_sweeps;
  return CUSOLVER_STATUS_SUCCESS;
}

VGPU_EXPORT cusolverStatus_t cusolverDnXgesvdjSetSortEig(gesvdjInfo_t info, int sort_svd) {
  if (!params_live(info)) return CUSOLVER_STATUS_INVALID_VALUE;
  info->sort = sort_svd != 0;
  return CUSOLVER_STATUS_SUCCESS;
}

VGPU_EXPORT cusolverStatus_t cusolverDnXgesvdjGetResidual(cusolverDnHandle_t handle, gesvdjInfo_t info,
                                                          double* residual) {
  cusolverDnContext h;
  if (!lookup(handle, &h)) return CUSOLVER_STATUS_NOT_INITIALIZED;
  if (!params_live(info) || !residual) return CUSOLVER_STATUS_INVALID_VALUE;
  (void)vgpu::stream_sync(h.stream);  // the last gesvdj's result is written when it runs
  std::lock_guard<std::mutex> g(info->last->mu);
  *residual = info->last->residual;
  return CUSOLVER_STATUS_SUCCESS;
}

VGPU_EXPORT cusolverStatus_t cusolverDnXgesvdjGetSweeps(cusolverDnHandle_t handle, gesvdjInfo_t info,
                                                        int* executed_sweeps) {
  cusolverDnContext h;
  if (!lookup(handle, &h)) return CUSOLVER_STATUS_NOT_INITIALIZED;
  if (!params_live(info) || !executed_sweeps) return CUSOLVER_STATUS_INVALID_VALUE;
  (void)vgpu::stream_sync(h.stream);
  std::lock_guard<std::mutex> g(info->last->mu);
  *executed_sweeps = info->last->sweeps;
  return CUSOLVER_STATUS_SUCCESS;
}

VGPU_EXPORT cusolverStatus_t cusolverDnSgesvdj_bufferSize(cusolverDnHandle_t handle, cusolverEigMode_t jobz, int econ,
                                                          int m, int n, const float* A, int lda, const float* S,
                                                          const float* U, int ldu, const float* V, int ldv,
                                                          int* lwork, gesvdjInfo_t params) {
  const char* fn = "cusolverDnSgesvdj_bufferSize";
  vgpu::trace("%s(jobz=%d econ=%d m=%d n=%d lda=%d ldu=%d ldv=%d)", fn, int(jobz), econ, m, n, lda, ldu, ldv);
  (void)A, (void)S, (void)U, (void)V;
  cusolverDnContext h;
  if (!lookup(handle, &h)) {
    complain(fn, "CUSOLVER_STATUS_NOT_INITIALIZED: not a live cuSOLVER handle");
    return CUSOLVER_STATUS_NOT_INITIALIZED;
  }
  if (check_args(fn, jobz, m, n, lda, ldu, ldv)) return CUSOLVER_STATUS_INVALID_VALUE;
  if (!lwork) {
    complain(fn, "CUSOLVER_STATUS_INVALID_VALUE: lwork is NULL");
    return CUSOLVER_STATUS_INVALID_VALUE;
  }
  if (!params_live(params)) {
    complain(fn, "CUSOLVER_STATUS_INVALID_VALUE: params is not a live gesvdjInfo_t");
    return CUSOLVER_STATUS_INVALID_VALUE;
  }
  long long need = gesvdj_lwork(m, n);
  if (need > INT_MAX) {
    complain(fn, "CUSOLVER_STATUS_INVALID_VALUE: the workspace would exceed INT_MAX elements");
    return CUSOLVER_STATUS_INVALID_VALUE;
  }
  *lwork = int(need);
  return CUSOLVER_STATUS_SUCCESS;
}

VGPU_EXPORT cusolverStatus_t cusolverDnSgesvdj(cusolverDnHandle_t handle, cusolverEigMode_t jobz, int econ, int m,
                                               int n, float* A, int lda, float* S, float* U, int ldu, float* V,
                                               int ldv, float* work, int lwork, int* info, gesvdjInfo_t params) {
  const char* fn = "cusolverDnSgesvdj";
  vgpu::trace("%s(jobz=%d econ=%d m=%d n=%d A=%p lda=%d S=%p U=%p ldu=%d V=%p ldv=%d work=%p lwork=%d info=%p)", fn,
              int(jobz), econ, m, n, (void*)A, lda, (void*)S, (void*)U, ldu, (void*)V, ldv, (void*)work, lwork,
              (void*)info);
  cusolverDnContext h;
  if (!lookup(handle, &h)) {
    complain(fn, "CUSOLVER_STATUS_NOT_INITIALIZED: not a live cuSOLVER handle");
    return CUSOLVER_STATUS_NOT_INITIALIZED;
  }
  if (!info) {
    complain(fn, "CUSOLVER_STATUS_INVALID_VALUE: info is NULL");
    return CUSOLVER_STATUS_INVALID_VALUE;
  }
  int bad = check_args(fn, jobz, m, n, lda, ldu, ldv);
  if (!bad && m >= 0 && n >= 0 && lwork < gesvdj_lwork(m, n)) {
    bad = 13;
    char buf[200];
    std::snprintf(buf, sizeof buf, "CUSOLVER_STATUS_INVALID_VALUE: lwork = %d < %lld (cusolverDnSgesvdj_bufferSize)",
                  lwork, gesvdj_lwork(m, n));
    complain(fn, buf);
  }
  if (!bad && !params_live(params)) {
    bad = 15;
    complain(fn, "CUSOLVER_STATUS_INVALID_VALUE: params is not a live gesvdjInfo_t");
  }
  if (bad) {
    // info = -i, written on the stream like the rest (only where info is a valid device int).
    uintptr_t ip = reinterpret_cast<uintptr_t>(info);
    if (vgpu::range_ok(ip, 4))
      (void)vgpu::enqueue(
          h.stream,
          [ip, bad] {
            if (vgpu::check_range(ip, 4, "cusolverDnSgesvdj info")) write_info(ip, -bad);
          },
          fn);
    return CUSOLVER_STATUS_INVALID_VALUE;
  }
  SvdJob j;
  j.fn = fn;
  j.device = h.device;
  j.vectors = jobz == CUSOLVER_EIG_MODE_VECTOR;
  j.econ = econ != 0;
  j.m = m;
  j.n = n;
  j.lda = lda;
  j.ldu = ldu;
  j.ldv = ldv;
  j.lwork = lwork;
  j.a = reinterpret_cast<uintptr_t>(A);
  j.s = reinterpret_cast<uintptr_t>(S);
  j.u = reinterpret_cast<uintptr_t>(U);
  j.v = reinterpret_cast<uintptr_t>(V);
  j.work = reinterpret_cast<uintptr_t>(work);
  j.info = reinterpret_cast<uintptr_t>(info);
  j.tolerance = params->tolerance;
  j.max_sweeps = params->max_sweeps;
  j.sort = params->sort != 0;
  j.result = std::make_shared<GesvdjResult>();
  params->last = j.result;
  CUresult r = vgpu::enqueue(h.stream, [j] { run_gesvdj(j); }, fn);
  if (r != CUDA_SUCCESS) {
    const char* name = nullptr;
    cuGetErrorName(r, &name);
    complain(fn, std::string("CUSOLVER_STATUS_EXECUTION_FAILED: could not enqueue on the handle's stream: ") +
                     (name ? name : "?"));
    return CUSOLVER_STATUS_EXECUTION_FAILED;
  }
  return CUSOLVER_STATUS_SUCCESS;
}
