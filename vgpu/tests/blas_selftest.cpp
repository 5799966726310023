// blas_selftest.cpp: tests of the virtual GPU's cuBLAS and cuSOLVER faces through their public
// entry points only (plus the driver calls a program makes: cuInit, a context, cuMemAlloc,
// copies, synchronisation), so the same source runs against the test stub
// (vgpu/tests/core_stub.cpp) and against the real target/vgpu/libsvft_vgpu.so.
//
//   g++ -std=c++17 -O2 -pthread -I vgpu -I .toolchain/cuda/include vgpu/tests/blas_selftest.cpp
//       vgpu/cublas.cpp vgpu/cusolver.cpp vgpu/tests/core_stub.cpp -o /tmp/blas_selftest   # stub
//   g++ -std=c++17 -O2 -pthread -I vgpu -I .toolchain/cuda/include vgpu/tests/blas_selftest.cpp
//       -L target/vgpu -lsvft_vgpu -Wl,-rpath,$PWD/target/vgpu -o /tmp/blas_selftest_lib  # real
//
// The last test plants an out-of-range operand, which kills the context (sticky
// CUDA_ERROR_ILLEGAL_ADDRESS), so it runs last.
#include "cublas_decl.h"
#include "cusolver_decl.h"
#include "blas_half.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

using namespace vgpu::half;

static int failures = 0;
static int checks = 0;

#define CHECK(cond, ...)                                         \
  do {                                                           \
    checks++;                                                    \
    if (!(cond)) {                                               \
      failures++;                                                \
      std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);  \
      std::fprintf(stderr, __VA_ARGS__);                         \
      std::fprintf(stderr, "\n");                                \
    }                                                            \
  } while (0)

#define CU(x)                                                                   \
  do {                                                                          \
    CUresult r_ = (x);                                                          \
    if (r_ != CUDA_SUCCESS) {                                                   \
      std::fprintf(stderr, "FATAL %s:%d: %s = %d\n", __FILE__, __LINE__, #x, int(r_)); \
      std::exit(2);                                                             \
    }                                                                           \
  } while (0)

static CUstream g_stream;
static std::mt19937_64 rng(12345);

static CUdeviceptr dalloc(size_t bytes) {
  CUdeviceptr p;
  CU(cuMemAlloc(&p, bytes));
  return p;
}
template <class T>
static CUdeviceptr upload(const std::vector<T>& v) {
  CUdeviceptr p = dalloc(v.size() * sizeof(T));
  CU(cuMemcpyHtoD(p, v.data(), v.size() * sizeof(T)));
  return p;
}
template <class T>
static std::vector<T> download(CUdeviceptr p, size_t count) {
  std::vector<T> v(count);
  CU(cuStreamSynchronize(g_stream));
  CU(cuMemcpyDtoH(v.data(), p, count * sizeof(T)));
  return v;
}

enum class Ty { F32, BF16, F16 };
static cudaDataType dt(Ty t) { return t == Ty::F32 ? CUDA_R_32F : t == Ty::BF16 ? CUDA_R_16BF : CUDA_R_16F; }
static size_t tsize(Ty t) { return t == Ty::F32 ? 4 : 2; }
static const char* tname(Ty t) { return t == Ty::F32 ? "f32" : t == Ty::BF16 ? "bf16" : "f16"; }

// Values exactly representable in the type, stored as raw bytes of that type.
struct Mat {
  Ty t;
  std::vector<float> val;       // the represented values (NaN where poisoned)
  std::vector<uint8_t> bytes;  // the stored form
};

static Mat make(Ty t, size_t count, bool random, float poison_nan = false) {
  Mat m{t, std::vector<float>(count), std::vector<uint8_t>(count * tsize(t))};
  std::uniform_real_distribution<float> u(-2.0f, 2.0f);
  for (size_t i = 0; i < count; i++) {
    float x = random ? u(rng) : std::nanf("");
    if (poison_nan) x = std::nanf("");
    if (t == Ty::F32) {
      std::memcpy(&m.bytes[4 * i], &x, 4);
    } else {
      uint16_t h = t == Ty::BF16 ? f32_to_bf16(x) : f32_to_f16(x);
      x = t == Ty::BF16 ? bf16_to_f32(h) : f16_to_f32(h);
      std::memcpy(&m.bytes[2 * i], &h, 2);
    }
    m.val[i] = x;
  }
  return m;
}

static float decode(Ty t, const uint8_t* p) {
  if (t == Ty::F32) {
    float f;
    std::memcpy(&f, p, 4);
    return f;
  }
  uint16_t h;
  std::memcpy(&h, p, 2);
  return t == Ty::BF16 ? bf16_to_f32(h) : f16_to_f32(h);
}

// ---- conversions ------------------------------------------------------------------------------
static void test_conversions() {
  // Every f16 and bf16 value round-trips exactly through f32.
  int bad16 = 0, badbf = 0;
  for (uint32_t h = 0; h < 65536; h++) {
    float f = f16_to_f32(uint16_t(h));
    if (std::isnan(f)) continue;
    if (f32_to_f16(f) != h) bad16++;
    float g = bf16_to_f32(uint16_t(h));
    if (!std::isnan(g) && f32_to_bf16(g) != h) badbf++;
  }
  CHECK(bad16 == 0, "%d f16 values do not round-trip", bad16);
  CHECK(badbf == 0, "%d bf16 values do not round-trip", badbf);
  // Rounding: nearest, ties to even; against a double-precision reference.
  std::uniform_int_distribution<uint32_t> any;
  int wrong16 = 0, wrongbf = 0;
  auto nearest = [](double x, auto decode_fn, uint16_t lo, uint16_t hi) {
    double a = decode_fn(lo), b = decode_fn(hi);
    if (std::fabs(x - a) < std::fabs(x - b)) return lo;
    if (std::fabs(x - a) > std::fabs(x - b)) return hi;
    return (lo & 1) ? hi : lo;
  };
  for (int i = 0; i < 200000; i++) {
    uint32_t u = any(rng);
    float f;
    std::memcpy(&f, &u, 4);
    if (!std::isfinite(f)) continue;
    uint16_t h = f32_to_f16(f);
    float back = f16_to_f32(h);
    if (std::fabs(f) < 65504.0f) {
      // Neighbours of the result must not be closer.
      uint16_t down = uint16_t(h - 1), up = uint16_t(h + 1);
      double e = std::fabs(double(f) - back);
      if ((h & 0x7fff) != 0 && (down & 0x7c00) != 0x7c00 && std::fabs(double(f) - f16_to_f32(down)) < e) wrong16++;
      if ((up & 0x7c00) != 0x7c00 && std::fabs(double(f) - f16_to_f32(up)) < e) wrong16++;
    } else if (std::fabs(f) >= 65520.0f) {
      if (!std::isinf(back)) wrong16++;
    }
    uint16_t b = f32_to_bf16(f);
    uint16_t lo = uint16_t(u >> 16), hi = uint16_t(lo + 1);  // truncation and next (same sign)
    uint16_t want = (u & 0xffff) == 0 ? lo : nearest(double(f), bf16_to_f32, lo, hi);
    if ((hi & 0x7f80) == 0x7f80 && (u & 0xffff) >= 0x8000) want = hi;  // IEEE overflow: to infinity
    if (b != want) wrongbf++;
  }
  CHECK(wrong16 == 0, "%d f32->f16 roundings not nearest", wrong16);
  CHECK(wrongbf == 0, "%d f32->bf16 roundings not nearest-even", wrongbf);
  CHECK(f32_to_f16(65519.0f) == 0x7bff && f32_to_f16(65520.0f) == 0x7c00, "f16 overflow threshold");
  CHECK(f32_to_f16(0x1p-25f) == 0 && f32_to_f16(0x1.8p-25f) == 1 && f32_to_f16(0x1.8p-24f) == 2,
        "f16 subnormal ties to even");
  CHECK(std::isnan(f16_to_f32(f32_to_f16(std::nanf("")))) && std::isnan(bf16_to_f32(f32_to_bf16(std::nanf("")))),
        "NaN stays NaN");
}

// ---- gemm -------------------------------------------------------------------------------------
static void gemm_case(cublasHandle_t h, Ty in, Ty out, bool use_sgemm, cublasOperation_t ta, cublasOperation_t tb,
                      int m, int n, int k, float alpha, float beta, int pad) {
  const int a_rows = ta == CUBLAS_OP_N ? m : k, a_cols = ta == CUBLAS_OP_N ? k : m;
  const int b_rows = tb == CUBLAS_OP_N ? k : n, b_cols = tb == CUBLAS_OP_N ? n : k;
  const int lda = std::max(1, a_rows + pad), ldb = std::max(1, b_rows + pad), ldc = std::max(1, m + pad);
  // Padding rows hold NaN: reading one would poison the result.
  Mat A = make(in, size_t(lda) * std::max(1, a_cols), true), B = make(in, size_t(ldb) * std::max(1, b_cols), true);
  for (int c = 0; c < a_cols; c++)
    for (int r = a_rows; r < lda; r++) {
      Mat nan1 = make(in, 1, false);
      std::memcpy(&A.bytes[(r + size_t(c) * lda) * tsize(in)], nan1.bytes.data(), tsize(in));
    }
  for (int c = 0; c < b_cols; c++)
    for (int r = b_rows; r < ldb; r++) {
      Mat nan1 = make(in, 1, false);
      std::memcpy(&B.bytes[(r + size_t(c) * ldb) * tsize(in)], nan1.bytes.data(), tsize(in));
    }
  Mat C = make(out, size_t(ldc) * std::max(1, n), true);
  if (beta == 0.0f) C = make(out, size_t(ldc) * std::max(1, n), false);  // all NaN
  CUdeviceptr dA = upload(A.bytes), dB = upload(B.bytes), dC = upload(C.bytes);
  cublasStatus_t s;
  if (use_sgemm)
    s = cublasSgemm_v2(h, ta, tb, m, n, k, &alpha, (const float*)dA, lda, (const float*)dB, ldb, &beta, (float*)dC,
                       ldc);
  else
    s = cublasGemmEx(h, ta, tb, m, n, k, &alpha, (const void*)dA, dt(in), lda, (const void*)dB, dt(in), ldb, &beta,
                     (void*)dC, dt(out), ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  CHECK(s == CUBLAS_STATUS_SUCCESS, "gemm status %d", int(s));
  std::vector<uint8_t> got = download<uint8_t>(dC, C.bytes.size());
  int bad = 0;
  double worst = 0;
  for (int j = 0; j < std::max(1, n); j++)
    for (int i = 0; i < ldc; i++) {
      size_t ci = i + size_t(j) * ldc;
      float g = decode(out, &got[ci * tsize(out)]);
      if (i >= m || j >= n) {  // padding of C, or nothing to do: untouched bytes
        if (std::memcmp(&got[ci * tsize(out)], &C.bytes[ci * tsize(out)], tsize(out)) != 0) bad++;
        continue;
      }
      double ref = 0, mag = 0;
      for (int p = 0; p < k; p++) {
        double a = ta == CUBLAS_OP_N ? A.val[i + size_t(p) * lda] : A.val[p + size_t(i) * lda];
        double b = tb == CUBLAS_OP_N ? B.val[p + size_t(j) * ldb] : B.val[j + size_t(p) * ldb];
        ref += a * b;
        mag += std::fabs(a * b);
      }
      ref *= alpha;
      mag *= std::fabs(alpha);
      if (beta != 0.0f) {
        ref += double(beta) * C.val[ci];
        mag += std::fabs(double(beta) * C.val[ci]);
      }
      double ulp_out = out == Ty::F32 ? 0x1p-24 : out == Ty::BF16 ? 0x1p-8 : 0x1p-11;
      double tol = (k + 3) * 0x1p-24 * mag + ulp_out * std::fabs(ref) * 1.0001 + 1e-30;
      if (out == Ty::F16) tol += 0x1p-25;  // f16 subnormal spacing
      double err = std::fabs(double(g) - ref);
      if (!(err <= tol)) {
        if (bad < 3)
          std::fprintf(stderr, "  (%d,%d): got %g want %g (tol %g)\n", i, j, double(g), ref, tol);
        bad++;
      }
      if (std::isfinite(err) && mag > 0) worst = std::max(worst, err / mag);
    }
  CHECK(bad == 0, "gemm %s->%s %s %c%c m=%d n=%d k=%d alpha=%g beta=%g pad=%d: %d bad elements", tname(in),
        tname(out), use_sgemm ? "Sgemm" : "GemmEx", "NTC"[ta], "NTC"[tb], m, n, k, alpha, beta, pad, bad);
  cuMemFree(dA);
  cuMemFree(dB);
  cuMemFree(dC);
}

static void test_gemm(cublasHandle_t h) {
  const int dims[][3] = {{1, 1, 1}, {7, 5, 3}, {33, 17, 9}, {64, 64, 64}, {13, 1, 29}, {1, 19, 31},
                         {37, 23, 0}, {0, 5, 3}, {5, 0, 3}, {45, 61, 77}};
  const cublasOperation_t ops[] = {CUBLAS_OP_N, CUBLAS_OP_T, CUBLAS_OP_C};
  int cases = 0;
  for (auto& d : dims)
    for (auto ta : ops)
      for (auto tb : ops) {
        if (ta == CUBLAS_OP_C && tb != CUBLAS_OP_C && d[0] > 40) continue;  // keep it quick
        for (int variant = 0; variant < 6; variant++) {
          float alpha = variant == 3 ? 0.0f : (variant % 2 ? -1.5f : 1.0f);
          float beta = variant < 2 ? 0.0f : (variant == 4 ? 1.0f : 0.75f);
          int pad = variant % 3;
          Ty in = variant == 0 || variant == 4 ? Ty::F32 : variant % 2 ? Ty::BF16 : Ty::F16;
          Ty out = (variant == 5) ? Ty::F32 : in;
          gemm_case(h, in, out, false, ta, tb, d[0], d[1], d[2], alpha, beta, pad);
          cases++;
        }
        gemm_case(h, Ty::F32, Ty::F32, true, ta, tb, d[0], d[1], d[2], 1.0f, 0.0f, 1);
        gemm_case(h, Ty::F32, Ty::F32, true, ta, tb, d[0], d[1], d[2], 0.5f, -2.0f, 0);
        cases += 2;
      }
  std::printf("gemm: %d cases\n", cases);
}

static void test_gemm_validation(cublasHandle_t h) {
  std::vector<float> z(4096, 0.0f);
  CUdeviceptr d = upload(z);
  const float* p = (const float*)d;
  float* c = (float*)d;
  float one = 1.0f, zero = 0.0f;
  auto sg = [&](cublasHandle_t hh, int ta, int tb, int m, int n, int k, int lda, int ldb, int ldc) {
    return cublasSgemm_v2(hh, cublasOperation_t(ta), cublasOperation_t(tb), m, n, k, &one, p, lda, p, ldb, &zero, c,
                          ldc);
  };
  const cublasStatus_t INV = CUBLAS_STATUS_INVALID_VALUE;
  CHECK(sg(h, 0, 0, 4, 4, 4, 4, 4, 4) == CUBLAS_STATUS_SUCCESS, "valid call");
  CHECK(sg(nullptr, 0, 0, 4, 4, 4, 4, 4, 4) == CUBLAS_STATUS_NOT_INITIALIZED, "null handle");
  CHECK(sg(h, 0, 0, -1, 4, 4, 4, 4, 4) == INV, "m < 0");
  CHECK(sg(h, 0, 0, 4, -1, 4, 4, 4, 4) == INV, "n < 0");
  CHECK(sg(h, 0, 0, 4, 4, -1, 4, 4, 4) == INV, "k < 0");
  CHECK(sg(h, 3, 0, 4, 4, 4, 4, 4, 4) == INV, "transa CONJG");
  CHECK(sg(h, 0, 9, 4, 4, 4, 4, 4, 4) == INV, "transb 9");
  CHECK(sg(h, 0, 0, 5, 4, 3, 4, 3, 5) == INV, "lda < m (N)");
  CHECK(sg(h, 1, 0, 5, 4, 3, 2, 3, 5) == INV, "lda < k (T)");
  CHECK(sg(h, 1, 0, 5, 4, 3, 3, 3, 5) == CUBLAS_STATUS_SUCCESS, "lda = k (T)");
  CHECK(sg(h, 0, 0, 5, 4, 3, 5, 2, 5) == INV, "ldb < k (N)");
  CHECK(sg(h, 0, 1, 5, 4, 3, 5, 3, 5) == INV, "ldb < n (T)");
  CHECK(sg(h, 0, 1, 5, 4, 3, 5, 4, 5) == CUBLAS_STATUS_SUCCESS, "ldb = n (T)");
  CHECK(sg(h, 0, 0, 5, 4, 3, 5, 3, 4) == INV, "ldc < m");
  CHECK(sg(h, 0, 0, 0, 0, 0, 0, 1, 1) == INV, "lda = 0 < max(1, 0)");
  CHECK(sg(h, 0, 0, 0, 0, 0, 1, 1, 1) == CUBLAS_STATUS_SUCCESS, "empty product");
  CHECK(cublasSgemm_v2(h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 2, nullptr, p, 2, p, 2, &zero, c, 2) == INV, "alpha NULL");
  auto ex = [&](int at, int bt, int ct, int compute, int algo) {
    return cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, 4, 4, 4, &one, p, cudaDataType(at), 4, p, cudaDataType(bt), 4,
                        &zero, c, cudaDataType(ct), 4, cublasComputeType_t(compute), cublasGemmAlgo_t(algo));
  };
  CHECK(ex(CUDA_R_16BF, CUDA_R_16BF, CUDA_R_16BF, CUBLAS_COMPUTE_32F, -1) == CUBLAS_STATUS_SUCCESS, "bf16");
  CHECK(ex(CUDA_R_16F, CUDA_R_16F, CUDA_R_32F, CUBLAS_COMPUTE_32F, 99) == CUBLAS_STATUS_SUCCESS, "f16 -> f32");
  CHECK(ex(CUDA_R_32F, CUDA_R_32F, CUDA_R_32F, CUBLAS_COMPUTE_32F_FAST_TF32, -1) == CUBLAS_STATUS_SUCCESS, "tf32");
  CHECK(ex(CUDA_R_16BF, CUDA_R_16F, CUDA_R_32F, CUBLAS_COMPUTE_32F, -1) == CUBLAS_STATUS_NOT_SUPPORTED, "mixed in");
  CHECK(ex(CUDA_R_32F, CUDA_R_32F, CUDA_R_16BF, CUBLAS_COMPUTE_32F, -1) == CUBLAS_STATUS_NOT_SUPPORTED,
        "f32 -> bf16");
  CHECK(ex(CUDA_R_16F, CUDA_R_16F, CUDA_R_16F, CUBLAS_COMPUTE_16F, -1) == CUBLAS_STATUS_NOT_SUPPORTED, "compute 16F");
  CHECK(ex(CUDA_R_16BF, CUDA_R_16BF, CUDA_R_16BF, CUBLAS_COMPUTE_32F_FAST_16BF, -1) == CUBLAS_STATUS_NOT_SUPPORTED,
        "fast 16bf with bf16 inputs");
  CHECK(ex(CUDA_R_32F, CUDA_R_32F, CUDA_R_32F, 12345, -1) == INV, "unknown compute type");
  CHECK(ex(CUDA_R_32F, CUDA_R_32F, CUDA_R_32F, CUBLAS_COMPUTE_32F, 50) == INV, "unknown algo");
  CHECK(ex(99, CUDA_R_32F, CUDA_R_32F, CUBLAS_COMPUTE_32F, -1) == INV, "unknown data type");
  CU(cuStreamSynchronize(g_stream));
  cuMemFree(d);
}

static void test_handles() {
  cublasHandle_t h = nullptr;
  CHECK(cublasCreate_v2(nullptr) == CUBLAS_STATUS_INVALID_VALUE, "create(NULL)");
  // A thread with no current context cannot create a handle.
  cublasStatus_t s_thread = CUBLAS_STATUS_SUCCESS;
  cusolverStatus_t d_thread = CUSOLVER_STATUS_SUCCESS;
  std::thread t([&] {
    cublasHandle_t hh;
    s_thread = cublasCreate_v2(&hh);
    cusolverDnHandle_t dd;
    d_thread = cusolverDnCreate(&dd);
  });
  t.join();
  CHECK(s_thread == CUBLAS_STATUS_NOT_INITIALIZED, "cublasCreate without a context: %d", int(s_thread));
  CHECK(d_thread == CUSOLVER_STATUS_NOT_INITIALIZED, "cusolverDnCreate without a context: %d", int(d_thread));
  CHECK(cublasCreate_v2(&h) == CUBLAS_STATUS_SUCCESS, "create");
  cudaStream_t st = reinterpret_cast<cudaStream_t>(1);
  CHECK(cublasGetStream_v2(h, &st) == CUBLAS_STATUS_SUCCESS && st == nullptr, "default stream is NULL");
  CHECK(cublasSetStream_v2(h, reinterpret_cast<cudaStream_t>(g_stream)) == CUBLAS_STATUS_SUCCESS, "set stream");
  CHECK(cublasGetStream_v2(h, &st) == CUBLAS_STATUS_SUCCESS && st == reinterpret_cast<cudaStream_t>(g_stream),
        "get stream");
  cublasPointerMode_t pm;
  CHECK(cublasGetPointerMode_v2(h, &pm) == CUBLAS_STATUS_SUCCESS && pm == CUBLAS_POINTER_MODE_HOST, "pointer mode");
  CHECK(cublasSetMathMode(h, CUBLAS_TF32_TENSOR_OP_MATH) == CUBLAS_STATUS_SUCCESS, "math mode");
  CHECK(cublasSetMathMode(h, cublasMath_t(77)) == CUBLAS_STATUS_INVALID_VALUE, "bad math mode");
  CHECK(cublasDestroy_v2(h) == CUBLAS_STATUS_SUCCESS, "destroy");
  CHECK(cublasDestroy_v2(h) == CUBLAS_STATUS_NOT_INITIALIZED, "double destroy");
  CHECK(cublasSetStream_v2(h, nullptr) == CUBLAS_STATUS_NOT_INITIALIZED, "destroyed handle");
}

static void test_device_pointer_mode(cublasHandle_t h) {
  CHECK(cublasSetPointerMode_v2(h, CUBLAS_POINTER_MODE_DEVICE) == CUBLAS_STATUS_SUCCESS, "device mode");
  std::vector<float> a = {1, 2, 3, 4}, b = {1, 0, 0, 1}, c = {10, 10, 10, 10}, ab = {2.0f, 0.5f};
  CUdeviceptr dA = upload(a), dB = upload(b), dC = upload(c), dS = upload(ab);
  const float* alpha = (const float*)dS;
  const float* beta = alpha + 1;
  CHECK(cublasSgemm_v2(h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 2, alpha, (const float*)dA, 2, (const float*)dB, 2, beta,
                       (float*)dC, 2) == CUBLAS_STATUS_SUCCESS,
        "sgemm device scalars");
  auto got = download<float>(dC, 4);
  CHECK(got[0] == 7 && got[1] == 9 && got[2] == 11 && got[3] == 13, "device scalars: %g %g %g %g", got[0], got[1],
        got[2], got[3]);
  CHECK(cublasSetPointerMode_v2(h, CUBLAS_POINTER_MODE_HOST) == CUBLAS_STATUS_SUCCESS, "host mode");
  cuMemFree(dA);
  cuMemFree(dB);
  cuMemFree(dC);
  cuMemFree(dS);
}

static void test_speed(cublasHandle_t h) {
  const int n = 512;
  std::vector<float> a(size_t(n) * n, 0.25f);
  CUdeviceptr dA = upload(a), dB = upload(a), dC = dalloc(a.size() * 4);
  float one = 1, zero = 0;
  auto t0 = std::chrono::steady_clock::now();
  CHECK(cublasSgemm_v2(h, CUBLAS_OP_N, CUBLAS_OP_T, n, n, n, &one, (const float*)dA, n, (const float*)dB, n, &zero,
                       (float*)dC, n) == CUBLAS_STATUS_SUCCESS,
        "512^3");
  CU(cuStreamSynchronize(g_stream));
  double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  auto got = download<float>(dC, 1);
  CHECK(got[0] == 32.0f, "512^3 value %g", got[0]);
  std::printf("sgemm 512x512x512: %.1f ms\n", ms);
  CHECK(ms < 1000, "512^3 sgemm took %.0f ms", ms);
  cuMemFree(dA);
  cuMemFree(dB);
  cuMemFree(dC);
}

// ---- gesvdj -------------------------------------------------------------------------------------
static void svd_case(cusolverDnHandle_t sh, gesvdjInfo_t params, int m, int n, bool econ, bool vectors, int rank) {
  const int p = std::min(m, n), lda = m + 1, ldu = m + 2, ldv = n + 1;
  const int ucols = econ ? p : m, vcols = econ ? p : n;
  std::normal_distribution<double> g;
  std::vector<float> a(size_t(lda) * n, std::nanf(""));
  // A random matrix of the given rank (full if rank >= p).
  int r = std::min(rank, p);
  std::vector<double> x(size_t(m) * r), y(size_t(n) * r);
  for (auto& v : x) v = g(rng);
  for (auto& v : y) v = g(rng);
  for (int c = 0; c < n; c++)
    for (int i = 0; i < m; i++) {
      double s = 0;
      for (int t = 0; t < r; t++) s += x[i + size_t(t) * m] * y[c + size_t(t) * n];
      a[i + size_t(c) * lda] = float(s);
    }
  CUdeviceptr dA = upload(a), dS = dalloc(std::max(1, p) * 4), dU = dalloc(size_t(ldu) * ucols * 4 + 4),
              dV = dalloc(size_t(ldv) * vcols * 4 + 4), dI = dalloc(4);
  cusolverEigMode_t jobz = vectors ? CUSOLVER_EIG_MODE_VECTOR : CUSOLVER_EIG_MODE_NOVECTOR;
  int lwork = -1;
  CHECK(cusolverDnSgesvdj_bufferSize(sh, jobz, econ, m, n, (const float*)dA, lda, (const float*)dS,
                                     (const float*)dU, ldu, (const float*)dV, ldv, &lwork,
                                     params) == CUSOLVER_STATUS_SUCCESS &&
            lwork > 0,
        "bufferSize");
  CUdeviceptr dW = dalloc(size_t(lwork) * 4);
  // Too small a workspace: INVALID_VALUE and info = -13.
  CHECK(cusolverDnSgesvdj(sh, jobz, econ, m, n, (float*)dA, lda, (float*)dS, (float*)dU, ldu, (float*)dV, ldv,
                          (float*)dW, lwork - 1, (int*)dI, params) == CUSOLVER_STATUS_INVALID_VALUE,
        "lwork - 1");
  CHECK(download<int>(dI, 1)[0] == -13, "info after lwork - 1");
  CHECK(cusolverDnSgesvdj(sh, jobz, econ, m, n, (float*)dA, m - 1, (float*)dS, (float*)dU, ldu, (float*)dV, ldv,
                          (float*)dW, lwork, (int*)dI, params) == CUSOLVER_STATUS_INVALID_VALUE,
        "lda < m");
  CHECK(download<int>(dI, 1)[0] == -6, "info after lda < m");
  CHECK(cusolverDnSgesvdj(sh, jobz, econ, m, n, (float*)dA, lda, (float*)dS, (float*)dU, ldu, (float*)dV, ldv,
                          (float*)dW, lwork, (int*)dI, params) == CUSOLVER_STATUS_SUCCESS,
        "gesvdj");
  int info = download<int>(dI, 1)[0];
  CHECK(info == 0, "gesvdj %dx%d info %d", m, n, info);
  auto S = download<float>(dS, p);
  auto Af = download<float>(dA, a.size());
  bool destroyed = true;
  for (int c = 0; c < n; c++)
    for (int i = 0; i < m; i++) destroyed = destroyed && std::isnan(Af[i + size_t(c) * lda]);
  CHECK(destroyed, "A is destroyed (poisoned) on exit");
  bool sorted = true;
  for (int i = 1; i < p; i++) sorted = sorted && S[i] <= S[i - 1];
  CHECK(sorted, "singular values descending");
  if (!vectors) {
    cuMemFree(dA), cuMemFree(dS), cuMemFree(dU), cuMemFree(dV), cuMemFree(dI), cuMemFree(dW);
    return;
  }
  auto U = download<float>(dU, size_t(ldu) * ucols);
  auto V = download<float>(dV, size_t(ldv) * vcols);
  // Orthogonality of U (ucols columns) and V.
  auto ortho = [](const std::vector<float>& q, int rows, int cols, int ld) {
    double worst = 0;
    for (int i = 0; i < cols; i++)
      for (int j = 0; j <= i; j++) {
        double d = 0;
        for (int r = 0; r < rows; r++) d += double(q[r + size_t(i) * ld]) * q[r + size_t(j) * ld];
        worst = std::max(worst, std::fabs(d - (i == j ? 1.0 : 0.0)));
      }
    return worst;
  };
  double ou = ortho(U, m, ucols, ldu), ov = ortho(V, n, vcols, ldv);
  CHECK(ou < 1e-5 && ov < 1e-5, "%dx%d econ=%d rank %d: orthogonality U %g V %g", m, n, econ, rank, ou, ov);
  double num = 0, den = 0;
  for (int c = 0; c < n; c++)
    for (int i = 0; i < m; i++) {
      double s = 0;
      for (int t = 0; t < p; t++) s += double(U[i + size_t(t) * ldu]) * S[t] * V[c + size_t(t) * ldv];
      double w = a[i + size_t(c) * lda];
      num += (s - w) * (s - w);
      den += w * w;
    }
  double rel = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  CHECK(rel < 1e-6, "%dx%d econ=%d rank %d: reconstruction %g", m, n, econ, rank, rel);
  // Padding rows of U and V untouched (allocations are poisoned with 0xFF = NaN).
  bool pad_ok = true;
  for (int c = 0; c < ucols; c++)
    for (int r = m; r < ldu; r++) pad_ok = pad_ok && std::isnan(U[r + size_t(c) * ldu]);
  CHECK(pad_ok, "U padding untouched");
  double res = -1;
  int sweeps = -1;
  CHECK(cusolverDnXgesvdjGetResidual(sh, params, &res) == CUSOLVER_STATUS_SUCCESS && res >= 0 && res < 1e-6 * 1e3,
        "residual %g", res);
  CHECK(cusolverDnXgesvdjGetSweeps(sh, params, &sweeps) == CUSOLVER_STATUS_SUCCESS && sweeps > 0 && sweeps <= 100,
        "sweeps %d", sweeps);
  cuMemFree(dA), cuMemFree(dS), cuMemFree(dU), cuMemFree(dV), cuMemFree(dI), cuMemFree(dW);
}

static void test_gesvdj() {
  cusolverDnHandle_t sh;
  CHECK(cusolverDnCreate(&sh) == CUSOLVER_STATUS_SUCCESS, "cusolverDnCreate");
  CHECK(cusolverDnSetStream(sh, reinterpret_cast<cudaStream_t>(g_stream)) == CUSOLVER_STATUS_SUCCESS, "set stream");
  gesvdjInfo_t params;
  CHECK(cusolverDnCreateGesvdjInfo(&params) == CUSOLVER_STATUS_SUCCESS, "params");
  CHECK(cusolverDnXgesvdjSetTolerance(params, 1e-7) == CUSOLVER_STATUS_SUCCESS, "tolerance");
  CHECK(cusolverDnXgesvdjSetMaxSweeps(params, 100) == CUSOLVER_STATUS_SUCCESS, "sweeps");
  const int shapes[][2] = {{23, 37}, {41, 19}, {1, 1}, {1, 9}, {9, 1}, {30, 30}, {64, 17}, {17, 64}};
  auto t0 = std::chrono::steady_clock::now();
  for (auto& s : shapes) {
    svd_case(sh, params, s[0], s[1], true, true, 1000);
    svd_case(sh, params, s[0], s[1], false, true, 1000);
    svd_case(sh, params, s[0], s[1], true, false, 1000);
    svd_case(sh, params, s[0], s[1], true, true, 3);   // rank deficient: completed U / V
    svd_case(sh, params, s[0], s[1], false, true, 0);  // zero matrix
  }
  auto t1 = std::chrono::steady_clock::now();
  svd_case(sh, params, 300, 300, true, true, 1000);
  auto t2 = std::chrono::steady_clock::now();
  std::printf("gesvdj: shapes %.0f ms, 300x300 %.0f ms\n", std::chrono::duration<double, std::milli>(t1 - t0).count(),
              std::chrono::duration<double, std::milli>(t2 - t1).count());
  // Argument errors without a device write target.
  int lw;
  CHECK(cusolverDnSgesvdj_bufferSize(sh, cusolverEigMode_t(5), 1, 4, 4, nullptr, 4, nullptr, nullptr, 4, nullptr, 4,
                                     &lw, params) == CUSOLVER_STATUS_INVALID_VALUE,
        "bad jobz");
  CHECK(cusolverDnSgesvdj_bufferSize(sh, CUSOLVER_EIG_MODE_VECTOR, 1, 4, 4, nullptr, 4, nullptr, nullptr, 3, nullptr,
                                     4, &lw, params) == CUSOLVER_STATUS_INVALID_VALUE,
        "ldu < m");
  CHECK(cusolverDnSgesvdj_bufferSize(sh, CUSOLVER_EIG_MODE_VECTOR, 1, 4, 5, nullptr, 4, nullptr, nullptr, 4, nullptr,
                                     4, &lw, params) == CUSOLVER_STATUS_INVALID_VALUE,
        "ldv < n");
  CHECK(cusolverDnSgesvdj_bufferSize(nullptr, CUSOLVER_EIG_MODE_VECTOR, 1, 4, 4, nullptr, 4, nullptr, nullptr, 4,
                                     nullptr, 4, &lw, params) == CUSOLVER_STATUS_NOT_INITIALIZED,
        "null handle");
  CHECK(cusolverDnDestroyGesvdjInfo(params) == CUSOLVER_STATUS_SUCCESS, "destroy params");
  CHECK(cusolverDnDestroy(sh) == CUSOLVER_STATUS_SUCCESS, "destroy");
  CHECK(cusolverDnDestroy(sh) == CUSOLVER_STATUS_NOT_INITIALIZED, "double destroy");
}

// Last: an operand one element short kills the context.
static void test_out_of_range(cublasHandle_t h) {
  const int m = 9, n = 7, k = 5;
  CUdeviceptr dA = dalloc(size_t(m) * k * 4 - 4), dB = dalloc(size_t(k) * n * 4), dC = dalloc(size_t(m) * n * 4);
  float one = 1, zero = 0;
  cublasStatus_t s = cublasSgemm_v2(h, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &one, (const float*)dA, m,
                                    (const float*)dB, k, &zero, (float*)dC, m);
  CHECK(s == CUBLAS_STATUS_SUCCESS, "the call itself succeeds (the fault is asynchronous)");
  CUresult r = cuStreamSynchronize(g_stream);
  CHECK(r == CUDA_ERROR_ILLEGAL_ADDRESS, "stream sync after out-of-range A: %d", int(r));
  CHECK(cuCtxSynchronize() == CUDA_ERROR_ILLEGAL_ADDRESS, "sticky");
  s = cublasSgemm_v2(h, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &one, (const float*)dB, m, (const float*)dB, k, &zero,
                     (float*)dC, m);
  CHECK(s == CUBLAS_STATUS_EXECUTION_FAILED, "later gemm on a dead context: %d", int(s));
}

int main() {
  test_conversions();
  CU(cuInit(0));
  CUdevice dev;
  CU(cuDeviceGet(&dev, 0));
  CUcontext ctx;
  CU(cuDevicePrimaryCtxRetain(&ctx, dev));
  CU(cuCtxSetCurrent(ctx));
  CU(cuStreamCreate(&g_stream, CU_STREAM_NON_BLOCKING));
  test_handles();
  cublasHandle_t h;
  CHECK(cublasCreate_v2(&h) == CUBLAS_STATUS_SUCCESS, "create");
  CHECK(cublasSetStream_v2(h, reinterpret_cast<cudaStream_t>(g_stream)) == CUBLAS_STATUS_SUCCESS, "stream");
  test_gemm_validation(h);
  test_device_pointer_mode(h);
  test_gemm(h);
  test_speed(h);
  test_gesvdj();
  test_out_of_range(h);
  std::printf("%d checks, %d failures\n", checks, failures);
  return failures ? 1 : 0;
}
