// driver_selftest.cpp: self-test of the virtual GPU's CUDA driver face (vgpu/context.cpp,
// memory.cpp, streams.cpp, kernels.cpp), linked against libcuda.so from $LD_LIBRARY_PATH
// (vgpu/build.sh --test runs it). Exits non-zero on the first failed check.
//
// Why: the crate's tests exercise the driver only the way the crate uses it; this checks the
// documented behaviour itself (init order, attributes, errors, red zones, sticky faults,
// stream order, events, launch limits, fault injection). Tests that kill the context (sticky
// errors) or need a different environment run in a re-executed child process.
#include <cuda.h>
#include <dlfcn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

static int g_checks = 0;
#define CHECK(cond)                                                              \
  do {                                                                           \
    ++g_checks;                                                                  \
    if (!(cond)) {                                                               \
      fprintf(stderr, "driver_selftest: FAILED %s:%d: %s\n", __FILE__, __LINE__, #cond); \
      exit(1);                                                                   \
    }                                                                            \
  } while (0)
#define EXPECT(call, want)                                                                  \
  do {                                                                                      \
    ++g_checks;                                                                             \
    CUresult _r = (call);                                                                   \
    if (_r != (want)) {                                                                     \
      fprintf(stderr, "driver_selftest: FAILED %s:%d: %s returned %d, want %d (%s)\n", __FILE__, \
              __LINE__, #call, (int)_r, (int)(want), #want);                                \
      exit(1);                                                                              \
    }                                                                                       \
  } while (0)
#define OK(call) EXPECT(call, CUDA_SUCCESS)

static const char* g_self = nullptr;

// Re-runs this program as `self <mode>` with extra environment; returns its exit status.
static int child(const char* mode, const char* env = nullptr) {
  pid_t pid = fork();
  if (pid == 0) {
    if (env) putenv(strdup(env));
    execl(g_self, g_self, mode, (char*)nullptr);
    _exit(127);
  }
  int st = 0;
  waitpid(pid, &st, 0);
  return WIFEXITED(st) ? WEXITSTATUS(st) : 128;
}

static std::vector<char> fatbin() {
  std::vector<char> img;
  if (const char* p = getenv("SVFT_VGPU_SELFTEST_FATBIN")) {
    std::ifstream in(p, std::ios::binary);
    if (in) img.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  if (img.size() < 16) {  // no built fatbin: a minimal image with the fatbin magic
    img.assign(64, 0);
    const unsigned magic = 0xBA55ED50u;
    memcpy(img.data(), &magic, 4);
  }
  return img;
}

static CUcontext setup() {
  OK(cuInit(0));
  CUdevice dev;
  OK(cuDeviceGet(&dev, 0));
  CUcontext ctx;
  OK(cuDevicePrimaryCtxRetain(&ctx, dev));
  OK(cuCtxSetCurrent(ctx));
  return ctx;
}

static CUfunction get_fn(CUmodule mod, const char* name) {
  CUfunction f;
  OK(cuModuleGetFunction(&f, mod, name));
  return f;
}

// ---- children: each ends the process --------------------------------------------------------

static int child_oob_copy() {
  setup();
  CUdeviceptr d;
  OK(cuMemAlloc(&d, 256));
  std::vector<char> h(512);
  EXPECT(cuMemcpyDtoH(h.data(), d, 257), CUDA_ERROR_ILLEGAL_ADDRESS);  // one byte past the end
  CUdeviceptr d2;
  EXPECT(cuMemAlloc(&d2, 16), CUDA_ERROR_ILLEGAL_ADDRESS);  // sticky
  EXPECT(cuCtxSynchronize(), CUDA_ERROR_ILLEGAL_ADDRESS);
  return 0;
}

static int child_kernel_overrun() {
  setup();
  std::vector<char> img = fatbin();
  CUmodule mod;
  OK(cuModuleLoadData(&mod, img.data()));
  CUfunction f = get_fn(mod, "gate_from_gamma");
  CUdeviceptr gamma, state;
  OK(cuMemAlloc(&gamma, 4));
  OK(cuMemAlloc(&state, 4));  // the kernel writes 2 floats: state[1] lands in the red zone
  float g = 0.f;
  OK(cuMemcpyHtoD(gamma, &g, 4));
  int gate = 1;
  void* params[] = {&gamma, &gate, &state};
  OK(cuLaunchKernel(f, 1, 1, 1, 32, 1, 1, 0, nullptr, params, nullptr));
  EXPECT(cuCtxSynchronize(), CUDA_ERROR_ILLEGAL_ADDRESS);
  CUfunction f2;
  EXPECT(cuLaunchKernel(f, 1, 1, 1, 32, 1, 1, 0, nullptr, params, nullptr), CUDA_ERROR_ILLEGAL_ADDRESS);
  (void)f2;
  return 0;
}

static int child_use_after_free() {
  setup();
  CUstream s1, s2;
  OK(cuStreamCreate(&s1, CU_STREAM_NON_BLOCKING));
  OK(cuStreamCreate(&s2, CU_STREAM_NON_BLOCKING));
  CUdeviceptr a, b;
  OK(cuMemAllocAsync(&a, 1024, s1));
  OK(cuMemAllocAsync(&b, 1024, s1));
  OK(cuMemFreeAsync(a, s1));
  OK(cuStreamSynchronize(s1));
  // a is freed: a copy from it on another stream faults when it runs.
  OK(cuMemcpyDtoDAsync(b, a, 16, s2));
  EXPECT(cuStreamSynchronize(s2), CUDA_ERROR_ILLEGAL_ADDRESS);
  return 0;
}

static int child_alloc_fault() {  // SVFT_VGPU_FAULTS=alloc:2
  setup();
  CUdeviceptr a, b, c;
  OK(cuMemAlloc(&a, 64));
  EXPECT(cuMemAlloc(&b, 64), CUDA_ERROR_OUT_OF_MEMORY);
  OK(cuMemAlloc(&c, 64));
  return 0;
}

static int child_ctx_fault() {  // SVFT_VGPU_FAULTS=ctx-create
  OK(cuInit(0));
  CUcontext ctx;
  EXPECT(cuDevicePrimaryCtxRetain(&ctx, 0), CUDA_ERROR_OUT_OF_MEMORY);
  return 0;
}

static int child_no_pools() {  // SVFT_VGPU_NO_POOLS=1
  setup();
  int v = -1;
  OK(cuDeviceGetAttribute(&v, CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED, 0));
  CHECK(v == 0);
  return 0;
}

// ---- the main test --------------------------------------------------------------------------

static void test_init_and_device() {
  int n = -1;
  EXPECT(cuDeviceGetCount(&n), CUDA_ERROR_NOT_INITIALIZED);
  const char* s = nullptr;
  OK(cuGetErrorName(CUDA_ERROR_ILLEGAL_ADDRESS, &s));
  CHECK(strcmp(s, "CUDA_ERROR_ILLEGAL_ADDRESS") == 0);
  OK(cuInit(0));
  OK(cuDeviceGetCount(&n));
  CHECK(n == 1);
  CUdevice dev;
  EXPECT(cuDeviceGet(&dev, 1), CUDA_ERROR_INVALID_DEVICE);
  OK(cuDeviceGet(&dev, 0));
  char name[128];
  OK(cuDeviceGetName(name, sizeof name, dev));
  CHECK(strstr(name, "virtual") != nullptr);
  int v;
  OK(cuDeviceGetAttribute(&v, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev));
  CHECK(v == 9);
  OK(cuDeviceGetAttribute(&v, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev));
  CHECK(v == 132);
  OK(cuDeviceGetAttribute(&v, CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, dev));
  CHECK(v == 232448);
  OK(cuDeviceGetAttribute(&v, CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED, dev));
  CHECK(v == 1);
  EXPECT(cuDeviceGetAttribute(&v, (CUdevice_attribute)99999, dev), CUDA_ERROR_INVALID_VALUE);
  int ver = 0;
  OK(cuDriverGetVersion(&ver));
  CHECK(ver == 13000);
  size_t total = 0;
  OK(cuDeviceTotalMem(&total, dev));
  CHECK(total == (size_t(80) << 30));
}

static CUcontext test_context() {
  CUcontext none;
  OK(cuCtxGetCurrent(&none));
  CHECK(none == nullptr);
  CUdeviceptr d;
  EXPECT(cuMemAlloc(&d, 16), CUDA_ERROR_INVALID_CONTEXT);  // no current context
  CUcontext a, b;
  OK(cuDevicePrimaryCtxRetain(&a, 0));
  OK(cuDevicePrimaryCtxRetain(&b, 0));
  CHECK(a == b);
  unsigned flags;
  int active;
  OK(cuDevicePrimaryCtxGetState(0, &flags, &active));
  CHECK(active == 1);
  OK(cuDevicePrimaryCtxRelease(0));
  OK(cuCtxPushCurrent(a));
  CUcontext cur;
  OK(cuCtxGetCurrent(&cur));
  CHECK(cur == a);
  OK(cuCtxPopCurrent(&cur));
  CHECK(cur == a);
  OK(cuCtxGetCurrent(&cur));
  CHECK(cur == nullptr);
  OK(cuCtxSetCurrent(a));
  return a;
}

static void test_memory() {
  CUdeviceptr d;
  EXPECT(cuMemAlloc(&d, 0), CUDA_ERROR_INVALID_VALUE);
  OK(cuMemAlloc(&d, 1000));
  std::vector<unsigned char> h(1000, 0);
  OK(cuMemcpyDtoH(h.data(), d, 1000));
  for (unsigned char c : h) CHECK(c == 0xFF);  // new memory is poisoned
  for (int i = 0; i < 1000; ++i) h[i] = (unsigned char)i;
  OK(cuMemcpyHtoD(d, h.data(), 1000));
  std::vector<unsigned char> back(1000, 0);
  OK(cuMemcpyDtoH(back.data(), d, 1000));
  CHECK(back == h);
  OK(cuMemsetD8(d + 10, 7, 5));
  OK(cuMemcpyDtoH(back.data(), d, 1000));
  CHECK(back[9] == 9 && back[10] == 7 && back[14] == 7 && back[15] == 15);
  size_t fr, tot;
  OK(cuMemGetInfo(&fr, &tot));
  CHECK(fr < tot);
  // pointer attributes
  unsigned mt = 99;
  OK(cuPointerGetAttribute(&mt, CU_POINTER_ATTRIBUTE_MEMORY_TYPE, d + 999));
  CHECK(mt == CU_MEMORYTYPE_DEVICE);
  int host_var = 0;
  EXPECT(cuPointerGetAttribute(&mt, CU_POINTER_ATTRIBUTE_MEMORY_TYPE, (CUdeviceptr)&host_var),
         CUDA_ERROR_INVALID_VALUE);
  CUpointer_attribute attrs[3] = {CU_POINTER_ATTRIBUTE_MEMORY_TYPE, CU_POINTER_ATTRIBUTE_IS_MANAGED,
                                  CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL};
  unsigned long long vals[3] = {0, 0, 0};
  void* data[3] = {&vals[0], &vals[1], &vals[2]};
  OK(cuPointerGetAttributes(3, attrs, data, (CUdeviceptr)&host_var));  // unknown: defaults, no error
  CHECK(vals[0] == 0 && (vals[1] & 0xff) == 0);
  CUdeviceptr m;
  OK(cuMemAllocManaged(&m, 64, CU_MEM_ATTACH_GLOBAL));
  vals[0] = vals[1] = vals[2] = 0;
  OK(cuPointerGetAttributes(3, attrs, data, m));
  CHECK((vals[1] & 0xff) == 1);
  void* pinned;
  OK(cuMemHostAlloc(&pinned, 64, 0));
  vals[0] = vals[1] = vals[2] = 0;
  OK(cuPointerGetAttributes(3, attrs, data, (CUdeviceptr)pinned));
  CHECK(vals[0] == CU_MEMORYTYPE_HOST);
  OK(cuMemFreeHost(pinned));
  OK(cuMemFree(m));
  // free: quarantined, no longer a live allocation; double free is an error
  OK(cuMemFree(d));
  EXPECT(cuMemFree(d), CUDA_ERROR_INVALID_VALUE);
  vals[0] = 5;
  OK(cuPointerGetAttributes(3, attrs, data, d));
  CHECK(vals[0] == 0);
  CUdeviceptr d2;
  OK(cuMemAlloc(&d2, 1000));
  CHECK(d2 != d);  // quarantine: the freed range is not handed out again at once
  OK(cuMemFree(d2));
}

static void test_streams_events() {
  CUstream s1, s2;
  EXPECT(cuStreamCreate(&s1, 0x40), CUDA_ERROR_INVALID_VALUE);
  OK(cuStreamCreate(&s1, CU_STREAM_NON_BLOCKING));
  OK(cuStreamCreate(&s2, CU_STREAM_NON_BLOCKING));
  const size_t n = 1 << 20;
  CUdeviceptr a, b;
  OK(cuMemAllocAsync(&a, n, s1));
  OK(cuMemAllocAsync(&b, n, s1));
  std::vector<unsigned char> h(n, 3), back(n, 0);
  // FIFO on s1: memset then a copy over part of it.
  OK(cuMemsetD8Async(a, 1, n, s1));
  OK(cuMemcpyHtoDAsync(a, h.data(), n / 2, s1));
  std::fill(h.begin(), h.end(), 9);  // pageable source was staged at call time
  CUevent e, t0, t1, nt;
  OK(cuEventCreate(&e, CU_EVENT_DISABLE_TIMING));
  OK(cuEventCreate(&t0, 0));
  OK(cuEventCreate(&t1, 0));
  OK(cuEventCreate(&nt, 0));
  float ms = -1;
  EXPECT(cuEventElapsedTime(&ms, t0, nt), CUDA_ERROR_INVALID_HANDLE);  // not recorded
  OK(cuEventQuery(nt));  // never recorded: success
  OK(cuEventRecord(t0, s1));
  OK(cuEventRecord(e, s1));
  OK(cuStreamWaitEvent(s2, e, 0));
  OK(cuMemcpyDtoDAsync(b, a, n, s2));
  OK(cuEventRecord(t1, s2));
  OK(cuMemcpyDtoHAsync(back.data(), b, n, s2));  // pageable destination: returns when done
  CHECK(back[0] == 3 && back[n / 2 - 1] == 3 && back[n / 2] == 1 && back[n - 1] == 1);
  OK(cuEventSynchronize(t1));
  OK(cuEventElapsedTime(&ms, t0, t1));
  CHECK(ms >= 0.f);
  EXPECT(cuEventElapsedTime(&ms, t0, e), CUDA_ERROR_INVALID_HANDLE);  // DISABLE_TIMING
  OK(cuStreamQuery(s2));
  // Legacy stream orders itself after blocking streams.
  CUstream blk;
  OK(cuStreamCreate(&blk, 0));
  OK(cuMemsetD8Async(a, 5, n, blk));
  OK(cuMemcpyDtoH(back.data(), a, n));  // legacy: waits for blk's memset
  CHECK(back[0] == 5 && back[n - 1] == 5);
  OK(cuStreamDestroy(blk));
  EXPECT(cuStreamSynchronize(blk), CUDA_ERROR_INVALID_HANDLE);
  OK(cuMemFreeAsync(a, s2));
  EXPECT(cuMemFreeAsync(a, s2), CUDA_ERROR_INVALID_VALUE);  // already being freed
  OK(cuMemFreeAsync(b, s2));
  OK(cuStreamSynchronize(s2));
  OK(cuEventDestroy(e));
  OK(cuEventDestroy(t0));
  OK(cuEventDestroy(t1));
  OK(cuEventDestroy(nt));
  OK(cuStreamDestroy(s1));
  OK(cuStreamDestroy(s2));
  OK(cuCtxSynchronize());
}

static void test_kernels() {
  CUmodule mod;
  const char junk[16] = "not a fatbin";
  EXPECT(cuModuleLoadData(&mod, junk), CUDA_ERROR_INVALID_IMAGE);
  std::vector<char> img = fatbin();
  OK(cuModuleLoadData(&mod, img.data()));
  CUfunction f;
  EXPECT(cuModuleGetFunction(&f, mod, "no_such_kernel"), CUDA_ERROR_NOT_FOUND);
  // gate_from_gamma: state = (sigmoid(gamma), gamma)
  CUfunction gate = get_fn(mod, "gate_from_gamma");
  CUdeviceptr gamma, state;
  OK(cuMemAlloc(&gamma, 4));
  OK(cuMemAlloc(&state, 8));
  float gv = 0.5f;
  OK(cuMemcpyHtoD(gamma, &gv, 4));
  int on = 1;
  void* gp[] = {&gamma, &on, &state};
  OK(cuLaunchKernel(gate, 1, 1, 1, 32, 1, 1, 0, nullptr, gp, nullptr));
  gv = 7.f;  // parameters were copied at enqueue: changing the host variable has no effect
  float st[2] = {0, 0};
  OK(cuMemcpyDtoH(st, state, 8));
  CHECK(std::fabs(st[0] - 1.f / (1.f + std::exp(-0.5f))) < 1e-6f && st[1] == 0.5f);

  // band_apply_fwd_f32 with d = 0: Y[b,i] = (s_i + g M_i) X[b,i]
  CUfunction fwd = get_fn(mod, "band_apply_fwd_f32");
  const int n = 5, r = 40, d = 0;
  std::vector<float> X(n * r), s(r), M(r), Y(n * r);
  for (int i = 0; i < n * r; ++i) X[i] = 0.25f * (float)(i % 7) - 0.5f;
  for (int i = 0; i < r; ++i) {
    s[i] = 1.f + 0.01f * (float)i;
    M[i] = 0.5f - 0.02f * (float)i;
  }
  const float g = st[0];
  CUdeviceptr dX, dY, ds, dM;
  OK(cuMemAlloc(&dX, X.size() * 4));
  OK(cuMemAlloc(&dY, Y.size() * 4));
  OK(cuMemAlloc(&ds, r * 4));
  OK(cuMemAlloc(&dM, r * 4));
  OK(cuMemcpyHtoD(dX, X.data(), X.size() * 4));
  OK(cuMemcpyHtoD(ds, s.data(), r * 4));
  OK(cuMemcpyHtoD(dM, M.data(), r * 4));
  CUdeviceptr dg = state;  // g = state[0]
  int nn = n, rr = r, dd = d;
  void* fp[] = {&dX, &dY, &ds, &dM, &dg, &nn, &rr, &dd};
  const unsigned B = 32, smem = 4u * 4u * (B + 2u * d);
  OK(cuLaunchKernel(fwd, (r + B - 1) / B, (n + 3) / 4, 1, B, 1, 1, smem, nullptr, fp, nullptr));
  OK(cuMemcpyDtoH(Y.data(), dY, Y.size() * 4));
  for (int b = 0; b < n; ++b)
    for (int i = 0; i < r; ++i) {
      const float want = (s[i] + g * M[i]) * X[b * r + i];
      CHECK(std::fabs(Y[b * r + i] - want) <= 1e-5f * (1.f + std::fabs(want)));
    }

  // launch validation
  EXPECT(cuLaunchKernel(fwd, 1, 1, 1, 1025, 1, 1, smem, nullptr, fp, nullptr), CUDA_ERROR_INVALID_VALUE);
  EXPECT(cuLaunchKernel(fwd, 1, 65536, 1, 32, 1, 1, smem, nullptr, fp, nullptr), CUDA_ERROR_INVALID_VALUE);
  EXPECT(cuLaunchKernel(fwd, 0, 1, 1, 32, 1, 1, smem, nullptr, fp, nullptr), CUDA_ERROR_INVALID_VALUE);
  EXPECT(cuLaunchKernel(fwd, 1, 1, 1, 32, 1, 65, smem, nullptr, fp, nullptr), CUDA_ERROR_INVALID_VALUE);
  EXPECT(cuLaunchKernel(fwd, 1, 1, 1, 32, 1, 1, 49153, nullptr, fp, nullptr), CUDA_ERROR_INVALID_VALUE);
  void* extra[] = {nullptr};
  EXPECT(cuLaunchKernel(fwd, 1, 1, 1, 32, 1, 1, smem, nullptr, fp, extra), CUDA_ERROR_INVALID_VALUE);
  EXPECT(cuFuncSetAttribute(fwd, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, 232449),
         CUDA_ERROR_INVALID_VALUE);
  OK(cuFuncSetAttribute(fwd, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, 100000));
  int v = 0;
  OK(cuFuncGetAttribute(&v, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, fwd));
  CHECK(v == 100000);
  OK(cuFuncGetAttribute(&v, CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK, fwd));
  CHECK(v == 1024);
  OK(cuLaunchKernel(fwd, 1, 1, 1, 32, 1, 1, 60000, nullptr, fp, nullptr));
  OK(cuCtxSynchronize());
  for (CUdeviceptr p : {gamma, state, dX, dY, ds, dM}) OK(cuMemFree(p));
  OK(cuModuleUnload(mod));
  EXPECT(cuLaunchKernel(fwd, 1, 1, 1, 32, 1, 1, 0, nullptr, fp, nullptr), CUDA_ERROR_INVALID_HANDLE);
}

int main(int argc, char** argv) {
  g_self = argv[0];
  if (argc > 1) {
    std::string m = argv[1];
    if (m == "oob-copy") return child_oob_copy();
    if (m == "kernel-overrun") return child_kernel_overrun();
    if (m == "use-after-free") return child_use_after_free();
    if (m == "alloc-fault") return child_alloc_fault();
    if (m == "ctx-fault") return child_ctx_fault();
    if (m == "no-pools") return child_no_pools();
    return 2;
  }
  test_init_and_device();
  test_context();
  test_memory();
  test_streams_events();
  test_kernels();
  struct {
    const char* mode;
    const char* env;
  } kids[] = {{"oob-copy", nullptr},
              {"kernel-overrun", nullptr},
              {"use-after-free", nullptr},
              {"alloc-fault", "SVFT_VGPU_FAULTS=alloc:2"},
              {"ctx-fault", "SVFT_VGPU_FAULTS=ctx-create"},
              {"no-pools", "SVFT_VGPU_NO_POOLS=1"},
              {"use-after-free", "SVFT_VGPU_ADVERSARIAL=7"}};
  for (auto& k : kids) {
    int st = child(k.mode, k.env);
    ++g_checks;
    if (st != 0) {
      fprintf(stderr, "driver_selftest: FAILED child '%s' (%s) exited %d\n", k.mode,
              k.env ? k.env : "", st);
      return 1;
    }
  }
  fprintf(stderr, "driver_selftest: all %d checks passed\n", g_checks);
  return 0;
}
