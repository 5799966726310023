// context.cpp: the virtual GPU's configuration, error state, and the driver API's device and
// context face (cuInit, cuDevice*, cuDevicePrimaryCtx*, cuCtx*, cuGetError*, cuDriverGetVersion).
//
// Why: cudarc's CudaContext::new reaches the driver through exactly these calls; they are written
// from NVIDIA's driver API documentation (not from what the crate expects), so a host-code
// misuse (no current context, a context released too early, cuInit skipped) shows up as the
// error a real driver would return. Devices report an H100's limits; memory is host memory.
#include <cuda.h>

#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "vgpu.h"

namespace vgpu {

namespace {

Config load_config() {
  Config c;
  if (const char* v = getenv("SVFT_VGPU_DEVICES")) {
    int n = atoi(v);
    if (n >= 1 && n <= 16) c.devices = n;
  }
  if (const char* v = getenv("SVFT_VGPU_NO_POOLS")) c.pools = !(v[0] == '1');
  if (const char* v = getenv("SVFT_VGPU_ADVERSARIAL")) {
    if (v[0] && strcmp(v, "0") != 0) {
      c.adversarial = true;
      c.adversarial_seed = strtoull(v, nullptr, 0);
    }
  }
  if (const char* v = getenv("SVFT_VGPU_TRACE")) c.trace = v[0] == '1';
  if (const char* v = getenv("SVFT_VGPU_FAULTS")) {
    std::string spec(v);
    size_t pos = 0;
    while (pos <= spec.size()) {
      size_t end = spec.find(',', pos);
      if (end == std::string::npos) end = spec.size();
      std::string item = spec.substr(pos, end - pos);
      if (item.rfind("alloc:", 0) == 0) c.fail_alloc = atol(item.c_str() + 6);
      else if (item == "cublas-create") c.fail_cublas_create = true;
      else if (item == "cusolver-create") c.fail_cusolver_create = true;
      else if (item == "ctx-create") c.fail_ctx_create = true;
      else if (!item.empty()) fprintf(stderr, "[vgpu] unknown SVFT_VGPU_FAULTS item '%s'\n", item.c_str());
      pos = end + 1;
    }
  }
  return c;
}

std::atomic<bool> g_init{false};
std::atomic<int> g_sticky{CUDA_SUCCESS};

// A context: primary (one per device, refcounted) or created by cuCtxCreate.
struct Ctx {
  int device;
  bool primary;
  int refcount;  // primary: retain count; created: 1 until destroyed
  bool alive;
  unsigned flags;
};

std::mutex& g_ctx_mu = *new std::mutex;
std::vector<Ctx*>& g_contexts = *new std::vector<Ctx*>;  // never freed: handles stay unique
std::vector<Ctx*>& g_primary = *new std::vector<Ctx*>;  // per device

thread_local std::vector<CUcontext> t_stack;

Ctx* lookup(CUcontext c) {
  for (Ctx* x : g_contexts)
    if ((CUcontext)x == c) return x;
  return nullptr;
}

void ensure_primary() {
  if (!g_primary.empty()) return;
  for (int d = 0; d < config().devices; ++d) {
    Ctx* c = new Ctx{d, true, 0, false, 0};
    g_primary.push_back(c);
    g_contexts.push_back(c);
  }
}

}  // namespace

const Config& config() {
  static Config c = load_config();
  return c;
}

void trace(const char* fmt, ...) {
  if (!config().trace) return;
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  fprintf(stderr, "[vgpu] %s\n", buf);
}

bool initialized() { return g_init.load(); }

CUresult sticky_error() { return (CUresult)g_sticky.load(); }

void fault(CUresult err, const std::string& why) {
  int expected = CUDA_SUCCESS;
  if (g_sticky.compare_exchange_strong(expected, (int)err)) {
    fprintf(stderr, "[vgpu] FAULT (context now dead, sticky error %d): %s\n", (int)err, why.c_str());
  } else {
    fprintf(stderr, "[vgpu] further fault (context already dead): %s\n", why.c_str());
  }
}

CUcontext current_ctx() { return t_stack.empty() ? nullptr : t_stack.back(); }

int ctx_device(CUcontext ctx) {
  std::lock_guard<std::mutex> l(g_ctx_mu);
  Ctx* c = lookup(ctx);
  return c && c->alive ? c->device : -1;
}

CUresult require_ctx() {
  if (!initialized()) return CUDA_ERROR_NOT_INITIALIZED;
  CUcontext cur = current_ctx();
  if (!cur) return CUDA_ERROR_INVALID_CONTEXT;
  std::lock_guard<std::mutex> l(g_ctx_mu);
  Ctx* c = lookup(cur);
  if (!c) return CUDA_ERROR_INVALID_CONTEXT;
  if (!c->alive) return c->primary ? CUDA_ERROR_INVALID_CONTEXT : CUDA_ERROR_CONTEXT_IS_DESTROYED;
  return CUDA_SUCCESS;
}

}  // namespace vgpu

using namespace vgpu;

#define NEED_INIT()                                      \
  do {                                                   \
    if (!initialized()) return CUDA_ERROR_NOT_INITIALIZED; \
  } while (0)

static bool dev_ok(CUdevice d) { return d >= 0 && d < config().devices; }

// ---- init, version, errors ---------------------------------------------------------------------

VGPU_EXPORT CUresult cuInit(unsigned int flags) {
  trace("cuInit(%u)", flags);
  if (flags != 0) return CUDA_ERROR_INVALID_VALUE;
  g_init.store(true);
  return CUDA_SUCCESS;
}

VGPU_EXPORT CUresult cuDriverGetVersion(int* v) {
  trace("cuDriverGetVersion");
  if (!v) return CUDA_ERROR_INVALID_VALUE;
  *v = 13000;
  return CUDA_SUCCESS;
}

namespace {
struct ErrName {
  CUresult code;
  const char* name;
  const char* text;
};
const ErrName kErrors[] = {
    {CUDA_SUCCESS, "CUDA_SUCCESS", "no error"},
    {CUDA_ERROR_INVALID_VALUE, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {CUDA_ERROR_OUT_OF_MEMORY, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {CUDA_ERROR_NOT_INITIALIZED, "CUDA_ERROR_NOT_INITIALIZED", "initialization error"},
    {CUDA_ERROR_DEINITIALIZED, "CUDA_ERROR_DEINITIALIZED", "driver shutting down"},
    {CUDA_ERROR_NO_DEVICE, "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected"},
    {CUDA_ERROR_INVALID_DEVICE, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
    {CUDA_ERROR_INVALID_IMAGE, "CUDA_ERROR_INVALID_IMAGE", "device kernel image is invalid"},
    {CUDA_ERROR_INVALID_CONTEXT, "CUDA_ERROR_INVALID_CONTEXT", "invalid device context"},
    {CUDA_ERROR_CONTEXT_IS_DESTROYED, "CUDA_ERROR_CONTEXT_IS_DESTROYED", "context is destroyed"},
    {CUDA_ERROR_INVALID_HANDLE, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle"},
    {CUDA_ERROR_NOT_FOUND, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
    {CUDA_ERROR_NOT_READY, "CUDA_ERROR_NOT_READY", "device not ready"},
    {CUDA_ERROR_ILLEGAL_ADDRESS, "CUDA_ERROR_ILLEGAL_ADDRESS",
     "an illegal memory access was encountered"},
    {CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES, "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES",
     "too many resources requested for launch"},
    {CUDA_ERROR_LAUNCH_FAILED, "CUDA_ERROR_LAUNCH_FAILED", "unspecified launch failure"},
    {CUDA_ERROR_NOT_SUPPORTED, "CUDA_ERROR_NOT_SUPPORTED", "operation not supported"},
    {CUDA_ERROR_NOT_PERMITTED, "CUDA_ERROR_NOT_PERMITTED", "operation not permitted"},
    {CUDA_ERROR_INVALID_PTX, "CUDA_ERROR_INVALID_PTX", "a PTX JIT compilation failed"},
    {CUDA_ERROR_INVALID_SOURCE, "CUDA_ERROR_INVALID_SOURCE", "device kernel image is invalid"},
    {CUDA_ERROR_FILE_NOT_FOUND, "CUDA_ERROR_FILE_NOT_FOUND", "file not found"},
    {CUDA_ERROR_PRIMARY_CONTEXT_ACTIVE, "CUDA_ERROR_PRIMARY_CONTEXT_ACTIVE",
     "primary context active"},
    {CUDA_ERROR_CONTEXT_ALREADY_IN_USE, "CUDA_ERROR_CONTEXT_ALREADY_IN_USE",
     "context already in use"},
    {CUDA_ERROR_UNKNOWN, "CUDA_ERROR_UNKNOWN", "unknown error"},
};
}  // namespace

VGPU_EXPORT CUresult cuGetErrorName(CUresult e, const char** s) {
  if (!s) return CUDA_ERROR_INVALID_VALUE;
  for (const ErrName& x : kErrors)
    if (x.code == e) {
      *s = x.name;
      return CUDA_SUCCESS;
    }
  *s = nullptr;
  return CUDA_ERROR_INVALID_VALUE;
}

VGPU_EXPORT CUresult cuGetErrorString(CUresult e, const char** s) {
  if (!s) return CUDA_ERROR_INVALID_VALUE;
  for (const ErrName& x : kErrors)
    if (x.code == e) {
      *s = x.text;
      return CUDA_SUCCESS;
    }
  *s = nullptr;
  return CUDA_ERROR_INVALID_VALUE;
}

// ---- devices -----------------------------------------------------------------------------------

VGPU_EXPORT CUresult cuDeviceGetCount(int* n) {
  trace("cuDeviceGetCount");
  NEED_INIT();
  if (!n) return CUDA_ERROR_INVALID_VALUE;
  *n = config().devices;
  return CUDA_SUCCESS;
}

VGPU_EXPORT CUresult cuDeviceGet(CUdevice* d, int ordinal) {
  trace("cuDeviceGet(%d)", ordinal);
  NEED_INIT();
  if (!d) return CUDA_ERROR_INVALID_VALUE;
  if (!dev_ok(ordinal)) return CUDA_ERROR_INVALID_DEVICE;
  *d = ordinal;
  return CUDA_SUCCESS;
}

VGPU_EXPORT CUresult cuDeviceGetName(char* name, int len, CUdevice d) {
  trace("cuDeviceGetName(%d)", d);
  NEED_INIT();
  if (!name || len <= 0) return CUDA_ERROR_INVALID_VALUE;
  if (!dev_ok(d)) return CUDA_ERROR_INVALID_DEVICE;
  snprintf(name, (size_t)len, "svft virtual GPU (H100 limits)");
  return CUDA_SUCCESS;
}

static void fill_uuid(CUuuid* u, CUdevice d) {
  const char tag[16] = {'s', 'v', 'f', 't', '-', 'v', 'g', 'p', 'u', '-', 'h', '1', '0', '0', '-', 0};
  memcpy(u->bytes, tag, 16);
  u->bytes[15] = (char)d;
}

VGPU_EXPORT CUresult cuDeviceGetUuid(CUuuid* u, CUdevice d) {
  trace("cuDeviceGetUuid(%d)", d);
  NEED_INIT();
  if (!u) return CUDA_ERROR_INVALID_VALUE;
  if (!dev_ok(d)) return CUDA_ERROR_INVALID_DEVICE;
  fill_uuid(u, d);
  return CUDA_SUCCESS;
}

// cuda.h maps cuDeviceGetUuid to _v2 (defined just above); export the original name as well.
#undef cuDeviceGetUuid
VGPU_EXPORT CUresult cuDeviceGetUuid(CUuuid* u, CUdevice d) { return cuDeviceGetUuid_v2(u, d); }

VGPU_EXPORT CUresult cuDeviceTotalMem(size_t* bytes, CUdevice d) {
  trace("cuDeviceTotalMem(%d)", d);
  NEED_INIT();
  if (!bytes) return CUDA_ERROR_INVALID_VALUE;
  if (!dev_ok(d)) return CUDA_ERROR_INVALID_DEVICE;
  size_t free_b, total;
  mem_info(&free_b, &total);
  *bytes = total;
  return CUDA_SUCCESS;
}

static bool attribute_value(CUdevice_attribute a, int* v) {
  switch (a) {
    case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *v = 1024; return true;
    case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_X: *v = 1024; return true;
    case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Y: *v = 1024; return true;
    case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Z: *v = 64; return true;
    case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X: *v = 2147483647; return true;
    case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y: *v = 65535; return true;
    case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Z: *v = 65535; return true;
    case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK: *v = 49152; return true;
    case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: *v = 232448; return true;
    case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR: *v = 233472; return true;
    case CU_DEVICE_ATTRIBUTE_RESERVED_SHARED_MEMORY_PER_BLOCK: *v = 1024; return true;
    case CU_DEVICE_ATTRIBUTE_TOTAL_CONSTANT_MEMORY: *v = 65536; return true;
    case CU_DEVICE_ATTRIBUTE_WARP_SIZE: *v = 32; return true;
    case CU_DEVICE_ATTRIBUTE_MAX_PITCH: *v = 2147483647; return true;
    case CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_BLOCK: *v = 65536; return true;
    case CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_MULTIPROCESSOR: *v = 65536; return true;
    case CU_DEVICE_ATTRIBUTE_CLOCK_RATE: *v = 1980000; return true;
    case CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE: *v = 2619000; return true;
    case CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH: *v = 5120; return true;
    case CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE: *v = 52428800; return true;
    case CU_DEVICE_ATTRIBUTE_TEXTURE_ALIGNMENT: *v = 512; return true;
    case CU_DEVICE_ATTRIBUTE_GPU_OVERLAP: *v = 1; return true;
    case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: *v = 132; return true;
    case CU_DEVICE_ATTRIBUTE_KERNEL_EXEC_TIMEOUT: *v = 0; return true;
    case CU_DEVICE_ATTRIBUTE_INTEGRATED: *v = 0; return true;
    case CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY: *v = 1; return true;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_MODE: *v = CU_COMPUTEMODE_DEFAULT; return true;
    case CU_DEVICE_ATTRIBUTE_CONCURRENT_KERNELS: *v = 1; return true;
    case CU_DEVICE_ATTRIBUTE_ECC_ENABLED: *v = 1; return true;
    case CU_DEVICE_ATTRIBUTE_PCI_BUS_ID: *v = 0; return true;
    case CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID: *v = 0; return true;
    case CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID: *v = 0; return true;
    case CU_DEVICE_ATTRIBUTE_TCC_DRIVER: *v = 0; return true;
    case CU_DEVICE_ATTRIBUTE_ASYNC_ENGINE_COUNT: *v = 3; return true;
    case CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING: *v = 1; return true;
    case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR: *v = 2048; return true;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: *v = 9; return true;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: *v = 0; return true;
    case CU_DEVICE_ATTRIBUTE_STREAM_PRIORITIES_SUPPORTED: *v = 1; return true;
    case CU_DEVICE_ATTRIBUTE_GLOBAL_L1_CACHE_SUPPORTED: *v = 1; return true;
    case CU_DEVICE_ATTRIBUTE_LOCAL_L1_CACHE_SUPPORTED: *v = 1; return true;
    case CU_DEVICE_ATTRIBUTE_MANAGED_MEMORY: *v = 1; return true;
    case CU_DEVICE_ATTRIBUTE_MULTI_GPU_BOARD: *v = 0; return true;
    case CU_DEVICE_ATTRIBUTE_MULTI_GPU_BOARD_GROUP_ID: *v = 0; return true;
    case CU_DEVICE_ATTRIBUTE_HOST_NATIVE_ATOMIC_SUPPORTED: *v = 0; return true;
    case CU_DEVICE_ATTRIBUTE_PAGEABLE_MEMORY_ACCESS: *v = 0; return true;
    case CU_DEVICE_ATTRIBUTE_CONCURRENT_MANAGED_ACCESS: *v = 1; return true;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_PREEMPTION_SUPPORTED: *v = 1; return true;
    case CU_DEVICE_ATTRIBUTE_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM: *v = 1; return true;
    case CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH: *v = 1; return true;
    case CU_DEVICE_ATTRIBUTE_MAX_BLOCKS_PER_MULTIPROCESSOR: *v = 32; return true;
    case CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED: *v = config().pools ? 1 : 0; return true;
    case CU_DEVICE_ATTRIBUTE_MEMPOOL_SUPPORTED_HANDLE_TYPES: *v = 0; return true;
    case CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_SUPPORTED: *v = 0; return true;
    case CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED: *v = 0; return true;
    case CU_DEVICE_ATTRIBUTE_MAX_PERSISTING_L2_CACHE_SIZE: *v = 0; return true;
    case CU_DEVICE_ATTRIBUTE_MAX_ACCESS_POLICY_WINDOW_SIZE: *v = 0; return true;
    case CU_DEVICE_ATTRIBUTE_CLUSTER_LAUNCH: *v = 1; return true;
    case CU_DEVICE_ATTRIBUTE_DIRECT_MANAGED_MEM_ACCESS_FROM_HOST: *v = 0; return true;
    case CU_DEVICE_ATTRIBUTE_SINGLE_TO_DOUBLE_PRECISION_PERF_RATIO: *v = 2; return true;
    case CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED: *v = 0; return true;
    case CU_DEVICE_ATTRIBUTE_READ_ONLY_HOST_REGISTER_SUPPORTED: *v = 0; return true;
    case CU_DEVICE_ATTRIBUTE_SPARSE_CUDA_ARRAY_SUPPORTED: *v = 0; return true;
    case CU_DEVICE_ATTRIBUTE_GENERIC_COMPRESSION_SUPPORTED: *v = 0; return true;
    case CU_DEVICE_ATTRIBUTE_DEFERRED_MAPPING_CUDA_ARRAY_SUPPORTED: *v = 0; return true;
    case CU_DEVICE_ATTRIBUTE_IPC_EVENT_SUPPORTED: *v = 0; return true;
    default: return false;
  }
}

VGPU_EXPORT CUresult cuDeviceGetAttribute(int* v, CUdevice_attribute a, CUdevice d) {
  trace("cuDeviceGetAttribute(%d, dev %d)", (int)a, d);
  NEED_INIT();
  if (!v) return CUDA_ERROR_INVALID_VALUE;
  if (!dev_ok(d)) return CUDA_ERROR_INVALID_DEVICE;
  if (!attribute_value(a, v)) return CUDA_ERROR_INVALID_VALUE;
  return CUDA_SUCCESS;
}

// ---- primary contexts ------------------------------------------------------------------------

VGPU_EXPORT CUresult cuDevicePrimaryCtxRetain(CUcontext* pctx, CUdevice d) {
  trace("cuDevicePrimaryCtxRetain(%d)", d);
  NEED_INIT();
  if (!pctx) return CUDA_ERROR_INVALID_VALUE;
  if (!dev_ok(d)) return CUDA_ERROR_INVALID_DEVICE;
  std::lock_guard<std::mutex> l(g_ctx_mu);
  ensure_primary();
  Ctx* c = g_primary[(size_t)d];
  if (c->refcount == 0 && config().fail_ctx_create) {
    trace("  fault injection: ctx-create");
    return CUDA_ERROR_OUT_OF_MEMORY;
  }
  c->refcount++;
  c->alive = true;
  *pctx = (CUcontext)c;
  return CUDA_SUCCESS;
}

VGPU_EXPORT CUresult cuDevicePrimaryCtxRelease(CUdevice d) {
  trace("cuDevicePrimaryCtxRelease(%d)", d);
  NEED_INIT();
  if (!dev_ok(d)) return CUDA_ERROR_INVALID_DEVICE;
  std::lock_guard<std::mutex> l(g_ctx_mu);
  ensure_primary();
  Ctx* c = g_primary[(size_t)d];
  if (c->refcount == 0) return CUDA_ERROR_INVALID_CONTEXT;
  if (--c->refcount == 0) c->alive = false;  // "destroyed": calls with it current now fail
  return CUDA_SUCCESS;
}

VGPU_EXPORT CUresult cuDevicePrimaryCtxGetState(CUdevice d, unsigned int* flags, int* active) {
  trace("cuDevicePrimaryCtxGetState(%d)", d);
  NEED_INIT();
  if (!flags || !active) return CUDA_ERROR_INVALID_VALUE;
  if (!dev_ok(d)) return CUDA_ERROR_INVALID_DEVICE;
  std::lock_guard<std::mutex> l(g_ctx_mu);
  ensure_primary();
  Ctx* c = g_primary[(size_t)d];
  *flags = c->flags;
  *active = c->refcount > 0 ? 1 : 0;
  return CUDA_SUCCESS;
}

VGPU_EXPORT CUresult cuDevicePrimaryCtxSetFlags(CUdevice d, unsigned int flags) {
  trace("cuDevicePrimaryCtxSetFlags(%d, %u)", d, flags);
  NEED_INIT();
  if (!dev_ok(d)) return CUDA_ERROR_INVALID_DEVICE;
  std::lock_guard<std::mutex> l(g_ctx_mu);
  ensure_primary();
  g_primary[(size_t)d]->flags = flags;
  return CUDA_SUCCESS;
}

// ---- created contexts ------------------------------------------------------------------------

VGPU_EXPORT CUresult cuCtxCreate(CUcontext* pctx, CUctxCreateParams* params, unsigned int flags,
                                 CUdevice d) {
  (void)params;
  trace("cuCtxCreate_v4(dev %d, flags %u)", d, flags);
  NEED_INIT();
  if (!pctx) return CUDA_ERROR_INVALID_VALUE;
  if (!dev_ok(d)) return CUDA_ERROR_INVALID_DEVICE;
  if (config().fail_ctx_create) return CUDA_ERROR_OUT_OF_MEMORY;
  Ctx* c = new Ctx{d, false, 1, true, flags};
  {
    std::lock_guard<std::mutex> l(g_ctx_mu);
    ensure_primary();
    g_contexts.push_back(c);
  }
  *pctx = (CUcontext)c;
  t_stack.push_back(*pctx);  // documented: the new context is made current
  return CUDA_SUCCESS;
}

VGPU_EXPORT CUresult cuCtxDestroy(CUcontext ctx) {
  trace("cuCtxDestroy(%p)", (void*)ctx);
  NEED_INIT();
  std::lock_guard<std::mutex> l(g_ctx_mu);
  Ctx* c = lookup(ctx);
  if (!c || !c->alive) return CUDA_ERROR_INVALID_CONTEXT;
  if (c->primary) return CUDA_ERROR_INVALID_CONTEXT;
  c->alive = false;
  for (auto& x : t_stack)
    if (x == ctx) x = nullptr;
  while (!t_stack.empty() && t_stack.back() == nullptr) t_stack.pop_back();
  return CUDA_SUCCESS;
}

// ---- current context ---------------------------------------------------------------------------

VGPU_EXPORT CUresult cuCtxGetCurrent(CUcontext* pctx) {
  trace("cuCtxGetCurrent");
  NEED_INIT();
  if (!pctx) return CUDA_ERROR_INVALID_VALUE;
  *pctx = current_ctx();
  return CUDA_SUCCESS;
}

VGPU_EXPORT CUresult cuCtxSetCurrent(CUcontext ctx) {
  trace("cuCtxSetCurrent(%p)", (void*)ctx);
  NEED_INIT();
  if (ctx == nullptr) {
    if (!t_stack.empty()) t_stack.pop_back();
    return CUDA_SUCCESS;
  }
  {
    std::lock_guard<std::mutex> l(g_ctx_mu);
    Ctx* c = lookup(ctx);
    if (!c || !c->alive) return CUDA_ERROR_INVALID_CONTEXT;
  }
  if (t_stack.empty()) t_stack.push_back(ctx);
  else t_stack.back() = ctx;
  return CUDA_SUCCESS;
}

VGPU_EXPORT CUresult cuCtxPushCurrent(CUcontext ctx) {
  trace("cuCtxPushCurrent(%p)", (void*)ctx);
  NEED_INIT();
  std::lock_guard<std::mutex> l(g_ctx_mu);
  Ctx* c = lookup(ctx);
  if (!c || !c->alive) return CUDA_ERROR_INVALID_CONTEXT;
  t_stack.push_back(ctx);
  return CUDA_SUCCESS;
}

VGPU_EXPORT CUresult cuCtxPopCurrent(CUcontext* pctx) {
  trace("cuCtxPopCurrent");
  NEED_INIT();
  if (t_stack.empty()) return CUDA_ERROR_INVALID_CONTEXT;
  if (pctx) *pctx = t_stack.back();
  t_stack.pop_back();
  return CUDA_SUCCESS;
}

VGPU_EXPORT CUresult cuCtxGetDevice(CUdevice* d) {
  trace("cuCtxGetDevice");
  if (CUresult e = require_ctx()) return e;
  if (!d) return CUDA_ERROR_INVALID_VALUE;
  *d = ctx_device(current_ctx());
  return CUDA_SUCCESS;
}

VGPU_EXPORT CUresult cuCtxSynchronize(void) {
  trace("cuCtxSynchronize");
  if (CUresult e = require_ctx()) return e;
  return device_sync();
}

VGPU_EXPORT CUresult cuCtxSetFlags(unsigned int flags) {
  trace("cuCtxSetFlags(%u)", flags);
  if (CUresult e = require_ctx()) return e;
  std::lock_guard<std::mutex> l(g_ctx_mu);
  lookup(current_ctx())->flags = flags;
  return CUDA_SUCCESS;
}

VGPU_EXPORT CUresult cuCtxGetFlags(unsigned int* flags) {
  if (CUresult e = require_ctx()) return e;
  if (!flags) return CUDA_ERROR_INVALID_VALUE;
  std::lock_guard<std::mutex> l(g_ctx_mu);
  *flags = lookup(current_ctx())->flags;
  return CUDA_SUCCESS;
}

VGPU_EXPORT CUresult cuCtxGetLimit(size_t* v, CUlimit limit) {
  trace("cuCtxGetLimit(%d)", (int)limit);
  if (CUresult e = require_ctx()) return e;
  if (!v) return CUDA_ERROR_INVALID_VALUE;
  switch (limit) {
    case CU_LIMIT_STACK_SIZE: *v = 1024; return CUDA_SUCCESS;
    case CU_LIMIT_PRINTF_FIFO_SIZE: *v = 1 << 20; return CUDA_SUCCESS;
    case CU_LIMIT_MALLOC_HEAP_SIZE: *v = 8 << 20; return CUDA_SUCCESS;
    default: return CUDA_ERROR_UNSUPPORTED_LIMIT;
  }
}

VGPU_EXPORT CUresult cuCtxSetLimit(CUlimit limit, size_t v) {
  trace("cuCtxSetLimit(%d, %zu)", (int)limit, v);
  if (CUresult e = require_ctx()) return e;
  if (limit == CU_LIMIT_STACK_SIZE || limit == CU_LIMIT_PRINTF_FIFO_SIZE ||
      limit == CU_LIMIT_MALLOC_HEAP_SIZE)
    return CUDA_SUCCESS;
  return CUDA_ERROR_UNSUPPORTED_LIMIT;
}

VGPU_EXPORT CUresult cuCtxGetCacheConfig(CUfunc_cache* c) {
  if (CUresult e = require_ctx()) return e;
  if (!c) return CUDA_ERROR_INVALID_VALUE;
  *c = CU_FUNC_CACHE_PREFER_NONE;
  return CUDA_SUCCESS;
}

VGPU_EXPORT CUresult cuCtxSetCacheConfig(CUfunc_cache c) {
  (void)c;
  if (CUresult e = require_ctx()) return e;
  return CUDA_SUCCESS;
}

VGPU_EXPORT CUresult cuCtxGetStreamPriorityRange(int* least, int* greatest) {
  if (CUresult e = require_ctx()) return e;
  if (least) *least = 0;
  if (greatest) *greatest = -5;
  return CUDA_SUCCESS;
}
