// vgpu.h: the internals shared by the virtual GPU's three faces (the CUDA driver: context.cpp,
// memory.cpp, streams.cpp, kernels.cpp; cuBLAS: cublas.cpp; cuSOLVER: cusolver.cpp). Not a
// public header: callers see only the NVIDIA entry points
// (declared by the toolkit's cuda.h for the driver; by our own cublas_decl.h / cusolver_decl.h,
// written from NVIDIA's documentation, for the libraries, since their headers are not installed).
//
// The virtual GPU is host memory and CPU threads pretending to be an H100, stricter than one:
//   - device memory is host memory with red zones before and after every allocation; freed
//     blocks are poisoned and quarantined before their address range can be reused;
//   - every range an operation touches (copy, memset, cuBLAS operand, kernel pointer argument)
//     must lie inside one live allocation, checked when the operation runs on its stream; a miss
//     (or a red zone found written after a kernel) makes the context's sticky error
//     CUDA_ERROR_ILLEGAL_ADDRESS, returned by every later call, as real hardware does;
//   - work is deferred: one FIFO queue per stream, drained by its own worker thread, so a missing
//     cross-stream join is a race (an adversarial mode delays and interleaves streams).
//
// Threading: every function here is safe to call from any thread.
#pragma once

#include <cuda.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

namespace vgpu {

// ---- configuration (read once from the environment) -------------------------------------------
// SVFT_VGPU_DEVICES=N          number of devices (default 1)
// SVFT_VGPU_NO_POOLS=1         report CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED = 0
// SVFT_VGPU_ADVERSARIAL=SEED   random delays before each stream op (seeded), interleaving streams
// SVFT_VGPU_FAULTS=spec[,spec] fault injection: alloc:K (the K-th allocation, 1-based, fails with
//                              CUDA_ERROR_OUT_OF_MEMORY), cublas-create, cusolver-create (handle
//                              creation fails), ctx-create
// SVFT_VGPU_TRACE=1            one line per API call on stderr
struct Config {
  int devices = 1;
  bool pools = true;
  bool adversarial = false;
  uint64_t adversarial_seed = 0;
  long fail_alloc = 0;  // 0 = never
  bool fail_cublas_create = false;
  bool fail_cusolver_create = false;
  bool fail_ctx_create = false;
  bool trace = false;
};
const Config& config();

// One line on stderr when SVFT_VGPU_TRACE=1 (printf-style).
void trace(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// ---- errors --------------------------------------------------------------------------------
// Whether cuInit has run (else driver calls return CUDA_ERROR_NOT_INITIALIZED).
bool initialized();
// The sticky error of the context (CUDA_SUCCESS when none). Async faults set it.
CUresult sticky_error();
// Records an async fault: sets the sticky error (first one wins) and prints `why` on stderr,
// so that the test log says which operation touched which address.
void fault(CUresult err, const std::string& why);

// ---- memory ----------------------------------------------------------------------------------
enum class MemKind { Device, Managed, PinnedHost };

// Allocates `bytes` (0 is CUDA_ERROR_INVALID_VALUE) of the given kind: red zones both sides,
// content poisoned (0xFF bytes: NaN for f32/bf16/f16), registered. Counts toward fail_alloc.
CUresult mem_alloc(size_t bytes, MemKind kind, void** out);
// Frees a live allocation's base pointer (else CUDA_ERROR_INVALID_VALUE): checks its red zones
// (a written red zone is a fault), poisons it and quarantines it.
CUresult mem_free(void* base);

// What a pointer is, for cuPointerGetAttribute(s) and the range checks.
struct PtrInfo {
  bool live = false;  // inside a live allocation
  MemKind kind = MemKind::Device;
  uintptr_t base = 0;  // the allocation's first byte
  size_t size = 0;     // its size in bytes (as requested)
  int device = 0;
};
PtrInfo ptr_info(uintptr_t p);

// Whether [p, p + bytes) lies inside one live allocation whose kind is device-accessible
// (Device, Managed or PinnedHost). bytes == 0 checks nothing and returns true.
bool range_ok(uintptr_t p, size_t bytes);
// range_ok, or fault(CUDA_ERROR_ILLEGAL_ADDRESS, "<what>: [p, p+bytes) is not inside one live
// allocation (nearest: ...)") and false. Call it when the operation runs, not when enqueued.
bool check_range(uintptr_t p, size_t bytes, const char* what);
// Checks the red zones of the allocation containing p (if any); a written one is a fault
// naming `what`. Called after every kernel for each of its pointer arguments.
bool check_redzones(uintptr_t p, const char* what);

// Total and free bytes the device reports (cuMemGetInfo).
void mem_info(size_t* free_bytes, size_t* total_bytes);

// ---- streams ---------------------------------------------------------------------------------
// A stream's work runs on the stream's worker thread, in FIFO order. The legacy default stream
// (CU_STREAM_LEGACY, or NULL) orders itself against every blocking stream as documented;
// CU_STREAM_PER_THREAD is treated as the legacy stream.
//
// enqueue: appends `op` to `stream` (after the implicit legacy-stream joins); the op runs later
// on the worker. It must do its own range checks (check_range) and return false after a fault.
// Ops after a fault still run (as on a GPU, where the context is dead anyway) but are skipped
// once the sticky error is set. Returns CUDA_ERROR_INVALID_HANDLE for an unknown stream, the
// sticky error if one is set.
CUresult enqueue(CUstream stream, std::function<void()> op, const char* what);
// Blocks until everything enqueued on `stream` so far has run; returns the sticky error.
CUresult stream_sync(CUstream stream);
// Blocks until every stream is idle; returns the sticky error.
CUresult device_sync();

// ---- additions (driver face; the declarations above keep their meaning) -----------------------
// Exported API entry points carry VGPU_EXPORT; everything else is hidden (-fvisibility=hidden),
// so the crate's own statically linked interpret-mode kernels never interpose on ours.
#define VGPU_EXPORT extern "C" __attribute__((visibility("default")))

// The context a thread has current (nullptr when none). Contexts are the driver's CUcontext.
CUcontext current_ctx();
// The device ordinal of a context handle, or -1 when the handle is not a live context.
int ctx_device(CUcontext ctx);
// CUDA_SUCCESS when initialized and a usable context is current; else the error a driver call
// with no current context returns (CUDA_ERROR_NOT_INITIALIZED / CUDA_ERROR_INVALID_CONTEXT).
CUresult require_ctx();
// Whether `stream` is a stream handle the driver knows (NULL, CU_STREAM_LEGACY,
// CU_STREAM_PER_THREAD or a created, not yet destroyed stream).
bool stream_valid(CUstream stream);
// Pinned host memory or not, for the documented pageable-vs-pinned copy semantics.
bool is_pinned_host(const void* p, size_t bytes);
// Human-readable description of the allocation nearest to p (for fault messages).
std::string describe_nearest(uintptr_t p);

}  // namespace vgpu

// Returns the CUresult of `e` from the enclosing function unless it is CUDA_SUCCESS.
#define RETURN_IF(e)                   \
  do {                                 \
    CUresult _e = (e);                 \
    if (_e != CUDA_SUCCESS) return _e; \
  } while (0)
