// TEST-ONLY: a minimal synchronous implementation of vgpu.h plus the handful of driver entry
// points vgpu/tests/blas_selftest.cpp calls, so the cuBLAS / cuSOLVER faces can be tested
// without the real driver face (vgpu/driver.cpp). Not part of libsvft_vgpu.so: vgpu/build.sh
// compiles vgpu/*.cpp only, never vgpu/tests/. Work "enqueued" here runs at once.
#include "vgpu.h"

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>

namespace {
std::mutex mu;
std::map<uintptr_t, size_t> allocs;  // base -> size (device memory)
bool inited = false;
CUresult sticky = CUDA_SUCCESS;
thread_local CUcontext current = nullptr;
int fake_ctx_storage;
int fake_stream_storage[16];
}  // namespace

namespace vgpu {

const Config& config() {
  static Config c = [] {
    Config c;
    const char* f = std::getenv("SVFT_VGPU_FAULTS");
    if (f && std::strstr(f, "cublas-create")) c.fail_cublas_create = true;
    if (f && std::strstr(f, "cusolver-create")) c.fail_cusolver_create = true;
    c.trace = std::getenv("SVFT_VGPU_TRACE") != nullptr;
    return c;
  }();
  return c;
}

void trace(const char* fmt, ...) {
  if (!config().trace) return;
  va_list ap;
  va_start(ap, fmt);
  std::fprintf(stderr, "svft-vgpu trace: ");
  std::vfprintf(stderr, fmt, ap);
  std::fprintf(stderr, "\n");
  va_end(ap);
}

bool initialized() { return inited; }
CUresult sticky_error() { return sticky; }
void fault(CUresult err, const std::string& why) {
  std::lock_guard<std::mutex> g(mu);
  if (sticky == CUDA_SUCCESS) sticky = err;
  std::fprintf(stderr, "svft-vgpu (stub) fault: %s\n", why.c_str());
}

CUresult mem_alloc(size_t bytes, MemKind, void** out) {
  if (bytes == 0) return CUDA_ERROR_INVALID_VALUE;
  void* p = std::malloc(bytes);
  std::memset(p, 0xff, bytes);
  std::lock_guard<std::mutex> g(mu);
  allocs[reinterpret_cast<uintptr_t>(p)] = bytes;
  *out = p;
  return CUDA_SUCCESS;
}

CUresult mem_free(void* base) {
  std::lock_guard<std::mutex> g(mu);
  auto it = allocs.find(reinterpret_cast<uintptr_t>(base));
  if (it == allocs.end()) return CUDA_ERROR_INVALID_VALUE;
  std::free(base);
  allocs.erase(it);
  return CUDA_SUCCESS;
}

PtrInfo ptr_info(uintptr_t p) {
  std::lock_guard<std::mutex> g(mu);
  PtrInfo info;
  auto it = allocs.upper_bound(p);
  if (it == allocs.begin()) return info;
  --it;
  if (p < it->first + it->second) {
    info.live = true;
    info.base = it->first;
    info.size = it->second;
  }
  return info;
}

bool range_ok(uintptr_t p, size_t bytes) {
  if (bytes == 0) return true;
  PtrInfo i = ptr_info(p);
  return i.live && p + bytes <= i.base + i.size;
}

bool check_range(uintptr_t p, size_t bytes, const char* what) {
  if (range_ok(p, bytes)) return true;
  char buf[256];
  std::snprintf(buf, sizeof buf, "%s: [0x%llx, +%zu) is not inside one live allocation", what,
                (unsigned long long)p, bytes);
  fault(CUDA_ERROR_ILLEGAL_ADDRESS, buf);
  return false;
}

bool check_redzones(uintptr_t, const char*) { return true; }
void mem_info(size_t* f, size_t* t) { *f = *t = size_t(80) << 30; }

CUresult enqueue(CUstream, std::function<void()> op, const char*) {
  if (sticky != CUDA_SUCCESS) return sticky;
  op();
  return CUDA_SUCCESS;
}
CUresult stream_sync(CUstream) { return sticky; }
CUresult device_sync() { return sticky; }

}  // namespace vgpu

extern "C" {
CUresult cuInit(unsigned) {
  inited = true;
  return CUDA_SUCCESS;
}
CUresult cuDeviceGet(CUdevice* d, int ordinal) {
  if (!inited) return CUDA_ERROR_NOT_INITIALIZED;
  if (ordinal != 0) return CUDA_ERROR_INVALID_DEVICE;
  *d = 0;
  return CUDA_SUCCESS;
}
CUresult cuDevicePrimaryCtxRetain(CUcontext* c, CUdevice) {
  *c = reinterpret_cast<CUcontext>(&fake_ctx_storage);
  return CUDA_SUCCESS;
}
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return CUDA_SUCCESS; }
CUresult cuCtxSetCurrent(CUcontext c) {
  current = c;
  return CUDA_SUCCESS;
}
CUresult cuCtxGetCurrent(CUcontext* c) {
  if (!inited) return CUDA_ERROR_NOT_INITIALIZED;
  *c = current;
  return CUDA_SUCCESS;
}
CUresult cuCtxGetDevice(CUdevice* d) {
  if (!current) return CUDA_ERROR_INVALID_CONTEXT;
  *d = 0;
  return CUDA_SUCCESS;
}
CUresult cuCtxSynchronize() { return sticky; }
CUresult cuStreamCreate(CUstream* s, unsigned) {
  static int next = 0;
  *s = reinterpret_cast<CUstream>(&fake_stream_storage[next++ % 16]);
  return CUDA_SUCCESS;
}
CUresult cuStreamDestroy_v2(CUstream) { return CUDA_SUCCESS; }
CUresult cuStreamSynchronize(CUstream) { return sticky; }
CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
  void* q = nullptr;
  CUresult r = vgpu::mem_alloc(bytes, vgpu::MemKind::Device, &q);
  *p = reinterpret_cast<CUdeviceptr>(q);
  return r;
}
CUresult cuMemFree_v2(CUdeviceptr p) { return vgpu::mem_free(reinterpret_cast<void*>(p)); }
CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t bytes) {
  if (sticky) return sticky;
  if (!vgpu::range_ok(dst, bytes)) return CUDA_ERROR_INVALID_VALUE;
  std::memcpy(reinterpret_cast<void*>(dst), src, bytes);
  return CUDA_SUCCESS;
}
CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t bytes) {
  if (sticky) return sticky;
  if (!vgpu::range_ok(src, bytes)) return CUDA_ERROR_INVALID_VALUE;
  std::memcpy(dst, reinterpret_cast<const void*>(src), bytes);
  return CUDA_SUCCESS;
}
CUresult cuGetErrorName(CUresult e, const char** s) {
  *s = e == CUDA_SUCCESS ? "CUDA_SUCCESS" : e == CUDA_ERROR_ILLEGAL_ADDRESS ? "CUDA_ERROR_ILLEGAL_ADDRESS" : "CUDA_ERROR";
  return CUDA_SUCCESS;
}
}
