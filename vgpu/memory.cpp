// memory.cpp: the virtual GPU's memory: allocations with red zones, poisoning, quarantine, range
// checks (vgpu.h), and the driver API's memory face: cuMemAlloc*, cuMemFree*, cuMemHostAlloc,
// cuMemGetInfo, cuMemcpy*, cuMemset*, cuPointerGetAttribute(s), cuMemAdvise/Prefetch.
//
// Why: device memory here is host memory, so an out-of-bounds access by host code or a kernel
// would silently hit some other host object. Every allocation gets its own mmap with patterned
// red zones on both sides; every copy, memset and kernel pointer argument is checked against the
// live allocations when the operation runs on its stream; freed blocks stay mapped (poisoned,
// quarantined) for a while so a use-after-free reads NaN and is reported, not reused memory.
// Copies follow the documented pageable-vs-pinned synchronisation rules of the driver API.
#include <cuda.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "vgpu.h"

namespace vgpu {

namespace {

constexpr size_t kPage = 4096;
constexpr size_t kMinRedZone = 64 << 10;
constexpr size_t kQuarantineMax = size_t(512) << 20;
constexpr size_t kReportedTotal = size_t(80) << 30;
// Red-zone byte pattern: every aligned f32 read of it is a NaN (0x7FA0BAFF), so a kernel that
// reads past an allocation computes NaN; writes are found by comparing against the pattern. It
// is a *signalling* NaN: arithmetic returns it quieted (0x7FE0BAFF), so a kernel that reads one
// element past the end of a buffer and writes what it computed one past the end of another
// leaves a value that differs from the pattern (a quiet-NaN pattern propagates unchanged through
// x86 arithmetic, and such a write went unseen).
constexpr unsigned char kPattern[4] = {0xFF, 0xBA, 0xA0, 0x7F};

struct Alloc {
  uintptr_t base;
  size_t size;
  MemKind kind;
  int device;
  CUcontext ctx;
  unsigned char* map;
  size_t map_len;
  size_t rz_before;  // bytes of red zone before base
  unsigned long long id;
  bool free_pending;  // cuMemFreeAsync called, free not yet run
};

struct Freed {
  uintptr_t base;
  size_t size;
  unsigned char* map;
  size_t map_len;
};

std::mutex& g_mu = *new std::mutex;
std::map<uintptr_t, Alloc>& g_live = *new std::map<uintptr_t, Alloc>;  // by base
std::deque<Freed>& g_quarantine = *new std::deque<Freed>;
size_t g_quarantine_bytes = 0;
size_t g_live_bytes = 0;
std::atomic<long> g_alloc_count{0};
unsigned long long g_next_id = 1;

size_t live_limit() {
  static size_t lim = [] {
    if (const char* v = getenv("SVFT_VGPU_MEM_LIMIT")) {
      unsigned long long x = strtoull(v, nullptr, 0);
      if (x) return (size_t)x;
    }
    return size_t(16) << 30;
  }();
  return lim;
}

size_t round_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

void fill_pattern(unsigned char* p, size_t n, size_t phase) {
  for (size_t i = 0; i < n; ++i) p[i] = kPattern[(phase + i) & 3];
}

// First byte in [p, p+n) that differs from the pattern (phase: offset of p from the map start),
// or n when none does.
size_t first_bad(const unsigned char* p, size_t n, size_t phase) {
  // Word-wise fast path: the pattern repeats every 4 bytes, map starts page-aligned.
  size_t i = 0;
  while (i < n && ((phase + i) & 7) != 0) {
    if (p[i] != kPattern[(phase + i) & 3]) return i;
    ++i;
  }
  uint64_t word;
  unsigned char w8[8];
  for (int k = 0; k < 8; ++k) w8[k] = kPattern[k & 3];
  memcpy(&word, w8, 8);
  for (; i + 8 <= n; i += 8) {
    uint64_t v;
    memcpy(&v, p + i, 8);
    if (v != word) break;
  }
  for (; i < n; ++i)
    if (p[i] != kPattern[(phase + i) & 3]) return i;
  return n;
}

const char* kind_name(MemKind k) {
  switch (k) {
    case MemKind::Device: return "device";
    case MemKind::Managed: return "managed";
    case MemKind::PinnedHost: return "pinned host";
  }
  return "?";
}

// The live allocation containing p (lock held), or nullptr.
const Alloc* find_locked(uintptr_t p) {
  auto it = g_live.upper_bound(p);
  if (it == g_live.begin()) return nullptr;
  --it;
  const Alloc& a = it->second;
  if (p >= a.base && p < a.base + a.size) return &a;
  return nullptr;
}

// Red zones of `a` intact? Else a description of the first written byte. Lock held.
bool redzones_ok_locked(const Alloc& a, std::string* why) {
  size_t bad = first_bad(a.map, a.rz_before, 0);
  if (bad != a.rz_before) {
    char buf[256];
    snprintf(buf, sizeof buf,
             "red zone written %zu bytes before %s allocation [0x%lx, 0x%lx) (%zu bytes)",
             a.rz_before - bad, kind_name(a.kind), (unsigned long)a.base,
             (unsigned long)(a.base + a.size), a.size);
    *why = buf;
    return false;
  }
  const size_t after_off = a.rz_before + a.size;
  const size_t after_len = a.map_len - after_off;
  bad = first_bad(a.map + after_off, after_len, after_off);
  if (bad != after_len) {
    char buf[256];
    snprintf(buf, sizeof buf,
             "red zone written at byte %zu past the end of %s allocation [0x%lx, 0x%lx) (%zu bytes)",
             bad, kind_name(a.kind), (unsigned long)a.base, (unsigned long)(a.base + a.size),
             a.size);
    *why = buf;
    return false;
  }
  return true;
}

std::string describe_locked(uintptr_t p) {
  char buf[320];
  auto it = g_live.upper_bound(p);
  const Alloc* before = nullptr;
  const Alloc* after = it == g_live.end() ? nullptr : &it->second;
  if (it != g_live.begin()) before = &std::prev(it)->second;
  std::string s;
  if (before) {
    long long off = (long long)(p - before->base);
    snprintf(buf, sizeof buf, "nearest below: %s allocation [0x%lx, 0x%lx) (%zu bytes), offset %lld",
             kind_name(before->kind), (unsigned long)before->base,
             (unsigned long)(before->base + before->size), before->size, off);
    s += buf;
  }
  if (after) {
    snprintf(buf, sizeof buf, "%snearest above: %s allocation [0x%lx, 0x%lx) (%zu bytes), %zu bytes above p",
             s.empty() ? "" : "; ", kind_name(after->kind), (unsigned long)after->base,
             (unsigned long)(after->base + after->size), after->size, (size_t)(after->base - p));
    s += buf;
  }
  for (const Freed& f : g_quarantine)
    if (p >= f.base && p < f.base + f.size) {
      snprintf(buf, sizeof buf, "%sp is inside FREED allocation [0x%lx, 0x%lx) (use after free)",
               s.empty() ? "" : "; ", (unsigned long)f.base, (unsigned long)(f.base + f.size));
      s += buf;
    }
  if (s.empty()) s = "no live allocations";
  return s;
}

void quarantine_locked(const Alloc& a) {
  // Poison the user bytes; keep the mapping so stale reads see NaN, not someone else's data.
  memset(a.map + a.rz_before, 0xFF, a.size);
  g_quarantine.push_back({a.base, a.size, a.map, a.map_len});
  g_quarantine_bytes += a.map_len;
  while (g_quarantine_bytes > kQuarantineMax && !g_quarantine.empty()) {
    Freed f = g_quarantine.front();
    g_quarantine.pop_front();
    g_quarantine_bytes -= f.map_len;
    munmap(f.map, f.map_len);
  }
}

}  // namespace

CUresult mem_alloc(size_t bytes, MemKind kind, void** out) {
  if (!out || bytes == 0) return CUDA_ERROR_INVALID_VALUE;
  const long n = ++g_alloc_count;
  if (config().fail_alloc && n == config().fail_alloc) {
    trace("  fault injection: allocation #%ld fails", n);
    return CUDA_ERROR_OUT_OF_MEMORY;
  }
  const size_t rz = std::max(kMinRedZone, round_up(bytes / 4, kPage));
  if (bytes > (size_t(1) << 46)) return CUDA_ERROR_OUT_OF_MEMORY;
  const size_t rz_before = rz;
  const size_t map_len = rz_before + round_up(bytes + rz, kPage);
  {
    std::lock_guard<std::mutex> l(g_mu);
    if (g_live_bytes + bytes > live_limit()) return CUDA_ERROR_OUT_OF_MEMORY;
    g_live_bytes += bytes;  // reserve
  }
  void* m = mmap(nullptr, map_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                 -1, 0);
  if (m == MAP_FAILED) {
    std::lock_guard<std::mutex> l(g_mu);
    g_live_bytes -= bytes;
    return CUDA_ERROR_OUT_OF_MEMORY;
  }
  unsigned char* map = static_cast<unsigned char*>(m);
  fill_pattern(map, rz_before, 0);
  memset(map + rz_before, 0xFF, bytes);
  fill_pattern(map + rz_before + bytes, map_len - rz_before - bytes, rz_before + bytes);
  Alloc a;
  a.base = (uintptr_t)(map + rz_before);
  a.size = bytes;
  a.kind = kind;
  CUcontext cur = current_ctx();
  int dev = cur ? ctx_device(cur) : 0;
  a.device = dev < 0 ? 0 : dev;
  a.ctx = cur;
  a.map = map;
  a.map_len = map_len;
  a.rz_before = rz_before;
  a.free_pending = false;
  {
    std::lock_guard<std::mutex> l(g_mu);
    a.id = g_next_id++;
    g_live[a.base] = a;
  }
  *out = (void*)a.base;
  return CUDA_SUCCESS;
}

CUresult mem_free(void* base) {
  std::lock_guard<std::mutex> l(g_mu);
  auto it = g_live.find((uintptr_t)base);
  if (it == g_live.end()) return CUDA_ERROR_INVALID_VALUE;
  Alloc a = it->second;
  g_live.erase(it);
  g_live_bytes -= a.size;
  std::string why;
  if (!redzones_ok_locked(a, &why)) {
    // fault() takes no lock of ours; safe to call here.
    fault(CUDA_ERROR_ILLEGAL_ADDRESS, "found at free: " + why);
  }
  quarantine_locked(a);
  return CUDA_SUCCESS;
}

PtrInfo ptr_info(uintptr_t p) {
  std::lock_guard<std::mutex> l(g_mu);
  PtrInfo info;
  if (const Alloc* a = find_locked(p)) {
    info.live = true;
    info.kind = a->kind;
    info.base = a->base;
    info.size = a->size;
    info.device = a->device;
  }
  return info;
}

bool range_ok(uintptr_t p, size_t bytes) {
  if (bytes == 0) return true;
  std::lock_guard<std::mutex> l(g_mu);
  const Alloc* a = find_locked(p);
  if (!a) return false;
  return bytes <= a->size && p - a->base <= a->size - bytes;
}

std::string describe_nearest(uintptr_t p) {
  std::lock_guard<std::mutex> l(g_mu);
  return describe_locked(p);
}

bool check_range(uintptr_t p, size_t bytes, const char* what) {
  if (range_ok(p, bytes)) return true;
  char buf[200];
  snprintf(buf, sizeof buf, "%s: [0x%lx, 0x%lx) (%zu bytes) is not inside one live allocation (",
           what, (unsigned long)p, (unsigned long)(p + bytes), bytes);
  fault(CUDA_ERROR_ILLEGAL_ADDRESS, std::string(buf) + describe_nearest(p) + ")");
  return false;
}

bool check_redzones(uintptr_t p, const char* what) {
  std::string why;
  {
    std::lock_guard<std::mutex> l(g_mu);
    const Alloc* a = find_locked(p);
    if (!a) return true;
    if (redzones_ok_locked(*a, &why)) return true;
  }
  fault(CUDA_ERROR_ILLEGAL_ADDRESS, std::string(what) + ": " + why);
  return false;
}

void mem_info(size_t* free_bytes, size_t* total_bytes) {
  std::lock_guard<std::mutex> l(g_mu);
  *total_bytes = kReportedTotal;
  *free_bytes = kReportedTotal > g_live_bytes ? kReportedTotal - g_live_bytes : 0;
}

bool is_pinned_host(const void* p, size_t bytes) {
  std::lock_guard<std::mutex> l(g_mu);
  const Alloc* a = find_locked((uintptr_t)p);
  if (!a || a->kind != MemKind::PinnedHost) return false;
  return bytes <= a->size && (uintptr_t)p - a->base <= a->size - bytes;
}

// Marks a live allocation's base as being freed by a stream op (cuMemFreeAsync). False when p is
// not a live base or a free is already pending.
static bool mark_free_pending(uintptr_t p) {
  std::lock_guard<std::mutex> l(g_mu);
  auto it = g_live.find(p);
  if (it == g_live.end() || it->second.free_pending) return false;
  it->second.free_pending = true;
  return true;
}

static bool lookup_alloc(uintptr_t p, Alloc* out) {
  std::lock_guard<std::mutex> l(g_mu);
  const Alloc* a = find_locked(p);
  if (!a) return false;
  *out = *a;
  return true;
}

}  // namespace vgpu

using namespace vgpu;


// ---- allocation --------------------------------------------------------------------------------

VGPU_EXPORT CUresult cuMemAlloc(CUdeviceptr* dptr, size_t bytes) {
  trace("cuMemAlloc_v2(%zu)", bytes);
  RETURN_IF(require_ctx());
  RETURN_IF(sticky_error());
  if (!dptr) return CUDA_ERROR_INVALID_VALUE;
  void* p = nullptr;
  RETURN_IF(mem_alloc(bytes, MemKind::Device, &p));
  *dptr = (CUdeviceptr)p;
  trace("  -> 0x%lx", (unsigned long)*dptr);
  return CUDA_SUCCESS;
}

VGPU_EXPORT CUresult cuMemAllocAsync(CUdeviceptr* dptr, size_t bytes, CUstream stream) {
  trace("cuMemAllocAsync(%zu, stream %p)", bytes, (void*)stream);
  if (!initialized()) return CUDA_ERROR_NOT_INITIALIZED;
  if (!config().pools) return CUDA_ERROR_NOT_SUPPORTED;
  if (!stream_valid(stream)) return CUDA_ERROR_INVALID_HANDLE;
  // Allocated now: the memory is usable by work enqueued on `stream` after this call, which is
  // all the stream-ordered contract promises.
  return cuMemAlloc(dptr, bytes);
}

VGPU_EXPORT CUresult cuMemAllocManaged(CUdeviceptr* dptr, size_t bytes, unsigned int flags) {
  trace("cuMemAllocManaged(%zu, %u)", bytes, flags);
  RETURN_IF(require_ctx());
  RETURN_IF(sticky_error());
  if (!dptr) return CUDA_ERROR_INVALID_VALUE;
  if (flags != CU_MEM_ATTACH_GLOBAL && flags != CU_MEM_ATTACH_HOST) return CUDA_ERROR_INVALID_VALUE;
  void* p = nullptr;
  RETURN_IF(mem_alloc(bytes, MemKind::Managed, &p));
  *dptr = (CUdeviceptr)p;
  return CUDA_SUCCESS;
}

VGPU_EXPORT CUresult cuMemHostAlloc(void** pp, size_t bytes, unsigned int flags) {
  trace("cuMemHostAlloc(%zu, %u)", bytes, flags);
  RETURN_IF(require_ctx());
  RETURN_IF(sticky_error());
  if (!pp) return CUDA_ERROR_INVALID_VALUE;
  if (flags & ~(unsigned)(CU_MEMHOSTALLOC_PORTABLE | CU_MEMHOSTALLOC_DEVICEMAP |
                          CU_MEMHOSTALLOC_WRITECOMBINED))
    return CUDA_ERROR_INVALID_VALUE;
  return mem_alloc(bytes, MemKind::PinnedHost, pp);
}

VGPU_EXPORT CUresult cuMemAllocHost(void** pp, size_t bytes) {
  trace("cuMemAllocHost_v2(%zu)", bytes);
  return cuMemHostAlloc(pp, bytes, 0);
}

VGPU_EXPORT CUresult cuMemFreeHost(void* p) {
  trace("cuMemFreeHost(%p)", p);
  if (!initialized()) return CUDA_ERROR_NOT_INITIALIZED;
  PtrInfo info = ptr_info((uintptr_t)p);
  if (!info.live || info.kind != MemKind::PinnedHost || info.base != (uintptr_t)p)
    return CUDA_ERROR_INVALID_VALUE;
  // Documented to synchronise like cuMemFree: pending work that may use it completes first.
  device_sync();
  return mem_free(p);
}

VGPU_EXPORT CUresult cuMemFree(CUdeviceptr dptr) {
  trace("cuMemFree_v2(0x%lx)", (unsigned long)dptr);
  if (!initialized()) return CUDA_ERROR_NOT_INITIALIZED;
  if (dptr == 0) return CUDA_SUCCESS;
  PtrInfo info = ptr_info((uintptr_t)dptr);
  if (!info.live || info.kind == MemKind::PinnedHost || info.base != (uintptr_t)dptr)
    return CUDA_ERROR_INVALID_VALUE;
  if (!mark_free_pending((uintptr_t)dptr)) return CUDA_ERROR_INVALID_VALUE;
  // cuMemFree synchronises the device implicitly: work already enqueued that uses the memory
  // finishes before it is released.
  CUresult e = device_sync();
  CUresult f = mem_free((void*)dptr);
  return f != CUDA_SUCCESS ? f : e;
}

VGPU_EXPORT CUresult cuMemFreeAsync(CUdeviceptr dptr, CUstream stream) {
  trace("cuMemFreeAsync(0x%lx, stream %p)", (unsigned long)dptr, (void*)stream);
  if (!initialized()) return CUDA_ERROR_NOT_INITIALIZED;
  if (!stream_valid(stream)) return CUDA_ERROR_INVALID_HANDLE;
  RETURN_IF(sticky_error());
  PtrInfo info = ptr_info((uintptr_t)dptr);
  if (!info.live || info.kind != MemKind::Device || info.base != (uintptr_t)dptr)
    return CUDA_ERROR_INVALID_VALUE;
  if (!mark_free_pending((uintptr_t)dptr)) return CUDA_ERROR_INVALID_VALUE;
  void* p = (void*)dptr;
  // Freed when the stream reaches this point; work enqueued later on other streams without a
  // join may then touch freed memory and fault (the stream-ordered allocator's contract).
  return enqueue(stream, [p] { mem_free(p); }, "cuMemFreeAsync");
}

VGPU_EXPORT CUresult cuMemGetInfo(size_t* free_b, size_t* total) {
  trace("cuMemGetInfo_v2");
  RETURN_IF(require_ctx());
  if (!free_b || !total) return CUDA_ERROR_INVALID_VALUE;
  mem_info(free_b, total);
  return CUDA_SUCCESS;
}

VGPU_EXPORT CUresult cuMemGetAddressRange(CUdeviceptr* pbase, size_t* psize, CUdeviceptr dptr) {
  trace("cuMemGetAddressRange_v2(0x%lx)", (unsigned long)dptr);
  RETURN_IF(require_ctx());
  PtrInfo info = ptr_info((uintptr_t)dptr);
  if (!info.live) return CUDA_ERROR_NOT_FOUND;
  if (pbase) *pbase = info.base;
  if (psize) *psize = info.size;
  return CUDA_SUCCESS;
}

// ---- copies ------------------------------------------------------------------------------------
// Semantics (CUDA driver API, "API synchronization behavior"):
//  - sync HtoD: pageable source is staged before return; pinned source: synchronous. Here both
//    wait for the copy to finish (it runs in the legacy stream's order).
//  - sync DtoH: returns when the copy is done.  sync DtoD: no host synchronisation.
//  - async HtoD from pageable memory: the source is staged (copied) at call time.
//  - async DtoH to pageable memory: returns only once the copy has completed.
//  - async copies to/from pinned memory: fully asynchronous; the host buffer is read/written
//    when the copy runs.

static CUresult legacy_needs_ctx(CUstream s) {
  if (s == nullptr || s == CU_STREAM_LEGACY || s == CU_STREAM_PER_THREAD) return require_ctx();
  return CUDA_SUCCESS;
}

static CUresult htod(CUdeviceptr dst, const void* src, size_t n, CUstream s, bool async) {
  if (!initialized()) return CUDA_ERROR_NOT_INITIALIZED;
  if (!stream_valid(s)) return CUDA_ERROR_INVALID_HANDLE;
  RETURN_IF(legacy_needs_ctx(s));
  RETURN_IF(sticky_error());
  if (n == 0) return CUDA_SUCCESS;
  if (!src) return CUDA_ERROR_INVALID_VALUE;
  const bool pinned = is_pinned_host(src, n);
  std::function<void()> op;
  if (pinned) {
    op = [dst, src, n] {
      if (check_range((uintptr_t)src, n, "cuMemcpyHtoD source (pinned)") &&
          check_range((uintptr_t)dst, n, "cuMemcpyHtoD destination"))
        memcpy((void*)dst, src, n);
    };
  } else {
    auto staged = std::make_shared<std::vector<unsigned char>>((const unsigned char*)src,
                                                               (const unsigned char*)src + n);
    op = [dst, staged, n] {
      if (check_range((uintptr_t)dst, n, "cuMemcpyHtoD destination")) memcpy((void*)dst, staged->data(), n);
    };
  }
  RETURN_IF(enqueue(s, std::move(op), async ? "cuMemcpyHtoDAsync" : "cuMemcpyHtoD"));
  if (!async) return stream_sync(s);
  return CUDA_SUCCESS;
}

static CUresult dtoh(void* dst, CUdeviceptr src, size_t n, CUstream s, bool async) {
  if (!initialized()) return CUDA_ERROR_NOT_INITIALIZED;
  if (!stream_valid(s)) return CUDA_ERROR_INVALID_HANDLE;
  RETURN_IF(legacy_needs_ctx(s));
  RETURN_IF(sticky_error());
  if (n == 0) return CUDA_SUCCESS;
  if (!dst) return CUDA_ERROR_INVALID_VALUE;
  const bool pinned = is_pinned_host(dst, n);
  auto op = [dst, src, n, pinned] {
    if (check_range((uintptr_t)src, n, "cuMemcpyDtoH source") &&
        (!pinned || check_range((uintptr_t)dst, n, "cuMemcpyDtoH destination (pinned)")))
      memcpy(dst, (const void*)src, n);
  };
  RETURN_IF(enqueue(s, op, async ? "cuMemcpyDtoHAsync" : "cuMemcpyDtoH"));
  if (!async || !pinned) return stream_sync(s);
  return CUDA_SUCCESS;
}

static CUresult dtod(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s, bool async) {
  (void)async;
  if (!initialized()) return CUDA_ERROR_NOT_INITIALIZED;
  if (!stream_valid(s)) return CUDA_ERROR_INVALID_HANDLE;
  RETURN_IF(legacy_needs_ctx(s));
  RETURN_IF(sticky_error());
  if (n == 0) return CUDA_SUCCESS;
  auto op = [dst, src, n] {
    if (check_range((uintptr_t)src, n, "cuMemcpyDtoD source") &&
        check_range((uintptr_t)dst, n, "cuMemcpyDtoD destination"))
      memmove((void*)dst, (const void*)src, n);
  };
  return enqueue(s, op, "cuMemcpyDtoD");
}

VGPU_EXPORT CUresult cuMemcpyHtoD(CUdeviceptr dst, const void* src, size_t n) {
  trace("cuMemcpyHtoD_v2(0x%lx, %p, %zu)", (unsigned long)dst, src, n);
  return htod(dst, src, n, nullptr, false);
}
VGPU_EXPORT CUresult cuMemcpyHtoDAsync(CUdeviceptr dst, const void* src, size_t n, CUstream s) {
  trace("cuMemcpyHtoDAsync_v2(0x%lx, %p, %zu, stream %p)", (unsigned long)dst, src, n, (void*)s);
  return htod(dst, src, n, s, true);
}
VGPU_EXPORT CUresult cuMemcpyDtoH(void* dst, CUdeviceptr src, size_t n) {
  trace("cuMemcpyDtoH_v2(%p, 0x%lx, %zu)", dst, (unsigned long)src, n);
  return dtoh(dst, src, n, nullptr, false);
}
VGPU_EXPORT CUresult cuMemcpyDtoHAsync(void* dst, CUdeviceptr src, size_t n, CUstream s) {
  trace("cuMemcpyDtoHAsync_v2(%p, 0x%lx, %zu, stream %p)", dst, (unsigned long)src, n, (void*)s);
  return dtoh(dst, src, n, s, true);
}
VGPU_EXPORT CUresult cuMemcpyDtoD(CUdeviceptr dst, CUdeviceptr src, size_t n) {
  trace("cuMemcpyDtoD_v2(0x%lx, 0x%lx, %zu)", (unsigned long)dst, (unsigned long)src, n);
  return dtod(dst, src, n, nullptr, false);
}
VGPU_EXPORT CUresult cuMemcpyDtoDAsync(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) {
  trace("cuMemcpyDtoDAsync_v2(0x%lx, 0x%lx, %zu, stream %p)", (unsigned long)dst,
        (unsigned long)src, n, (void*)s);
  return dtod(dst, src, n, s, true);
}
VGPU_EXPORT CUresult cuMemcpyPeerAsync(CUdeviceptr dst, CUcontext dctx, CUdeviceptr src,
                                       CUcontext sctx, size_t n, CUstream s) {
  trace("cuMemcpyPeerAsync(%zu)", n);
  if (ctx_device(dctx) < 0 || ctx_device(sctx) < 0) return CUDA_ERROR_INVALID_CONTEXT;
  return dtod(dst, src, n, s, true);
}

// ---- memset ------------------------------------------------------------------------------------
// Asynchronous with respect to the host (documented), except that a sync memset of pinned host
// memory is synchronous; here the sync forms run in the legacy stream's order.

static CUresult memset_n(CUdeviceptr dst, unsigned v, size_t elem, size_t n, CUstream s,
                         const char* what) {
  if (!initialized()) return CUDA_ERROR_NOT_INITIALIZED;
  if (!stream_valid(s)) return CUDA_ERROR_INVALID_HANDLE;
  RETURN_IF(legacy_needs_ctx(s));
  RETURN_IF(sticky_error());
  if (n == 0) return CUDA_SUCCESS;
  if (elem == 4 && (dst & 3)) return CUDA_ERROR_INVALID_VALUE;
  auto op = [dst, v, elem, n, what] {
    if (!check_range((uintptr_t)dst, n * elem, what)) return;
    if (elem == 1) {
      memset((void*)dst, (int)(v & 0xFF), n);
    } else {
      uint32_t* p = (uint32_t*)dst;
      for (size_t i = 0; i < n; ++i) p[i] = v;
    }
  };
  return enqueue(s, op, what);
}

VGPU_EXPORT CUresult cuMemsetD8(CUdeviceptr dst, unsigned char v, size_t n) {
  trace("cuMemsetD8_v2(0x%lx, %u, %zu)", (unsigned long)dst, v, n);
  return memset_n(dst, v, 1, n, nullptr, "cuMemsetD8");
}
VGPU_EXPORT CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, CUstream s) {
  trace("cuMemsetD8Async(0x%lx, %u, %zu, stream %p)", (unsigned long)dst, v, n, (void*)s);
  return memset_n(dst, v, 1, n, s, "cuMemsetD8Async");
}
VGPU_EXPORT CUresult cuMemsetD32(CUdeviceptr dst, unsigned int v, size_t n) {
  trace("cuMemsetD32_v2(0x%lx, %u, %zu)", (unsigned long)dst, v, n);
  return memset_n(dst, v, 4, n, nullptr, "cuMemsetD32");
}
VGPU_EXPORT CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned int v, size_t n, CUstream s) {
  trace("cuMemsetD32Async(0x%lx, %u, %zu, stream %p)", (unsigned long)dst, v, n, (void*)s);
  return memset_n(dst, v, 4, n, s, "cuMemsetD32Async");
}

// ---- managed memory hints ----------------------------------------------------------------------

VGPU_EXPORT CUresult cuMemAdvise(CUdeviceptr p, size_t n, CUmem_advise advice, CUmemLocation loc) {
  (void)advice;
  (void)loc;
  trace("cuMemAdvise_v2(0x%lx, %zu)", (unsigned long)p, n);
  if (!initialized()) return CUDA_ERROR_NOT_INITIALIZED;
  PtrInfo info = ptr_info((uintptr_t)p);
  if (!info.live || info.kind != MemKind::Managed || !range_ok((uintptr_t)p, n))
    return CUDA_ERROR_INVALID_VALUE;
  return CUDA_SUCCESS;
}

VGPU_EXPORT CUresult cuMemPrefetchAsync(CUdeviceptr p, size_t n, CUmemLocation loc,
                                        unsigned int flags, CUstream s) {
  (void)loc;
  (void)flags;
  trace("cuMemPrefetchAsync_v2(0x%lx, %zu)", (unsigned long)p, n);
  if (!initialized()) return CUDA_ERROR_NOT_INITIALIZED;
  if (!stream_valid(s)) return CUDA_ERROR_INVALID_HANDLE;
  PtrInfo info = ptr_info((uintptr_t)p);
  if (!info.live || info.kind != MemKind::Managed || !range_ok((uintptr_t)p, n))
    return CUDA_ERROR_INVALID_VALUE;
  return enqueue(s, [] {}, "cuMemPrefetchAsync");
}

VGPU_EXPORT CUresult cuStreamAttachMemAsync(CUstream s, CUdeviceptr p, size_t n, unsigned int flags) {
  (void)flags;
  trace("cuStreamAttachMemAsync(0x%lx, %zu)", (unsigned long)p, n);
  if (!initialized()) return CUDA_ERROR_NOT_INITIALIZED;
  if (!stream_valid(s)) return CUDA_ERROR_INVALID_HANDLE;
  PtrInfo info = ptr_info((uintptr_t)p);
  if (!info.live || info.kind != MemKind::Managed) return CUDA_ERROR_INVALID_VALUE;
  return enqueue(s, [] {}, "cuStreamAttachMemAsync");
}

// ---- pointer attributes ------------------------------------------------------------------------

// One attribute of a pointer; `known` tells whether p is in one of our allocations. For unknown
// pointers, cuPointerGetAttribute fails (CUDA_ERROR_INVALID_VALUE) while cuPointerGetAttributes
// writes the documented default (NULL/zero) values and succeeds.
static CUresult one_attribute(void* data, CUpointer_attribute attr, uintptr_t p, bool known,
                              const Alloc& a) {
  switch (attr) {
    case CU_POINTER_ATTRIBUTE_CONTEXT:
      *(CUcontext*)data = known ? a.ctx : nullptr;
      return CUDA_SUCCESS;
    case CU_POINTER_ATTRIBUTE_MEMORY_TYPE:
      // Managed memory reports DEVICE (its IS_MANAGED attribute says the rest).
      *(unsigned int*)data = !known ? 0u
                             : a.kind == MemKind::PinnedHost ? (unsigned)CU_MEMORYTYPE_HOST
                                                             : (unsigned)CU_MEMORYTYPE_DEVICE;
      return CUDA_SUCCESS;
    case CU_POINTER_ATTRIBUTE_DEVICE_POINTER:
      *(CUdeviceptr*)data = known ? (CUdeviceptr)p : 0;
      return CUDA_SUCCESS;
    case CU_POINTER_ATTRIBUTE_HOST_POINTER:
      if (known && a.kind == MemKind::Device) return CUDA_ERROR_INVALID_VALUE;
      *(void**)data = known ? (void*)p : nullptr;
      return CUDA_SUCCESS;
    case CU_POINTER_ATTRIBUTE_IS_MANAGED:
      *(bool*)data = known && a.kind == MemKind::Managed;
      return CUDA_SUCCESS;
    case CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL:
      *(int*)data = known ? a.device : -2;
      return CUDA_SUCCESS;
    case CU_POINTER_ATTRIBUTE_BUFFER_ID:
      *(unsigned long long*)data = known ? a.id : 0;
      return CUDA_SUCCESS;
    case CU_POINTER_ATTRIBUTE_SYNC_MEMOPS:
      *(bool*)data = known;
      return CUDA_SUCCESS;
    case CU_POINTER_ATTRIBUTE_MAPPED:
      *(bool*)data = known;
      return CUDA_SUCCESS;
    case CU_POINTER_ATTRIBUTE_RANGE_START_ADDR:
      *(CUdeviceptr*)data = known ? a.base : 0;
      return CUDA_SUCCESS;
    case CU_POINTER_ATTRIBUTE_RANGE_SIZE:
      *(size_t*)data = known ? a.size : 0;
      return CUDA_SUCCESS;
    case CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE:
      *(bool*)data = false;
      return CUDA_SUCCESS;
    case CU_POINTER_ATTRIBUTE_ALLOWED_HANDLE_TYPES:
      *(unsigned long long*)data = 0;
      return CUDA_SUCCESS;
    case CU_POINTER_ATTRIBUTE_IS_GPU_DIRECT_RDMA_CAPABLE:
      *(bool*)data = false;
      return CUDA_SUCCESS;
    case CU_POINTER_ATTRIBUTE_MEMPOOL_HANDLE:
      *(CUmemoryPool*)data = nullptr;
      return CUDA_SUCCESS;
    default:
      return CUDA_ERROR_INVALID_VALUE;
  }
}

VGPU_EXPORT CUresult cuPointerGetAttribute(void* data, CUpointer_attribute attr, CUdeviceptr p) {
  trace("cuPointerGetAttribute(%d, 0x%lx)", (int)attr, (unsigned long)p);
  if (!initialized()) return CUDA_ERROR_NOT_INITIALIZED;
  if (!data) return CUDA_ERROR_INVALID_VALUE;
  Alloc a{};
  if (!lookup_alloc((uintptr_t)p, &a)) return CUDA_ERROR_INVALID_VALUE;
  return one_attribute(data, attr, (uintptr_t)p, true, a);
}

VGPU_EXPORT CUresult cuPointerGetAttributes(unsigned int n, CUpointer_attribute* attrs, void** data,
                                            CUdeviceptr p) {
  trace("cuPointerGetAttributes(%u, 0x%lx)", n, (unsigned long)p);
  if (!initialized()) return CUDA_ERROR_NOT_INITIALIZED;
  if (n == 0 || !attrs || !data) return CUDA_ERROR_INVALID_VALUE;
  Alloc a{};
  const bool known = lookup_alloc((uintptr_t)p, &a);
  for (unsigned i = 0; i < n; ++i) {
    if (!data[i]) return CUDA_ERROR_INVALID_VALUE;
    CUresult e = one_attribute(data[i], attrs[i], (uintptr_t)p, known, a);
    if (e == CUDA_ERROR_INVALID_VALUE && attrs[i] == CU_POINTER_ATTRIBUTE_HOST_POINTER) {
      *(void**)data[i] = nullptr;  // no host alias of device memory: NULL, not an error here
      continue;
    }
    if (e != CUDA_SUCCESS) return e;
  }
  return CUDA_SUCCESS;
}
