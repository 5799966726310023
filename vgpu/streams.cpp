// streams.cpp: deferred execution for the virtual GPU: one FIFO queue per stream drained by its
// own worker thread, the legacy default stream's implicit joins, events, and the driver API's
// stream and event face (cuStream*, cuEvent*, cuLaunchHostFunc).
//
// Why: on a GPU nothing enqueued on a stream has happened when the call returns, and two streams
// run concurrently unless joined. Running every operation later, on a worker, reproduces that,
// so a missing cuStreamWaitEvent or a host read before a sync is a real race here; the
// adversarial mode (SVFT_VGPU_ADVERSARIAL=seed) adds seeded random delays before each operation
// to make such races show up reliably. Semantics follow NVIDIA's "stream synchronization
// behavior" documentation: the legacy default stream waits for all earlier work of blocking
// streams (flags 0) and they wait for it; CU_STREAM_NON_BLOCKING streams do neither.
#include <cuda.h>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include "vgpu.h"

namespace vgpu {

namespace {

using Clock = std::chrono::steady_clock;

// Completion of one operation.
struct Marker {
  std::mutex m;
  std::condition_variable cv;
  bool done = false;
  Clock::time_point when{};
  void set() {
    std::lock_guard<std::mutex> l(m);
    when = Clock::now();
    done = true;
    cv.notify_all();
  }
  void wait() {
    std::unique_lock<std::mutex> l(m);
    cv.wait(l, [&] { return done; });
  }
  bool is_done() {
    std::lock_guard<std::mutex> l(m);
    return done;
  }
};
using MarkerP = std::shared_ptr<Marker>;

MarkerP done_marker() {
  auto m = std::make_shared<Marker>();
  m->done = true;
  m->when = Clock::now();
  return m;
}

struct Op {
  std::function<void()> fn;
  std::vector<MarkerP> deps;
  MarkerP done;
  const char* what;
};

struct Stream : std::enable_shared_from_this<Stream> {
  int device = 0;
  bool legacy = false;
  bool blocking = true;
  unsigned flags = 0;
  int priority = 0;
  std::mutex m;
  std::condition_variable cv;
  std::deque<Op> q;
  bool destroyed = false;
  MarkerP tail = done_marker();  // completion of the last enqueued op (guarded by g_mu)
  std::mt19937_64 rng;
};
using StreamP = std::shared_ptr<Stream>;

// The registries below are heap objects never destroyed: detached workers may still be draining
// a queue while the process runs static destructors at exit, and must not touch a dead set.
std::mutex& g_mu = *new std::mutex;  // registry and cross-stream ordering
std::set<Stream*>& g_handles = *new std::set<Stream*>;  // valid created-stream handles
std::set<StreamP>& g_all = *new std::set<StreamP>;  // streams with a worker, until drained
std::vector<StreamP>& g_legacy = *new std::vector<StreamP>;  // per device
uint64_t g_stream_counter = 0;

void worker(StreamP s) {
  for (;;) {
    Op op;
    {
      std::unique_lock<std::mutex> l(s->m);
      s->cv.wait(l, [&] { return !s->q.empty() || s->destroyed; });
      if (s->q.empty()) break;
      op = std::move(s->q.front());
      s->q.pop_front();
    }
    for (auto& d : op.deps) d->wait();
    if (config().adversarial) {
      unsigned us = (unsigned)(s->rng() % 2001);
      std::this_thread::sleep_for(std::chrono::microseconds(us));
    }
    if (sticky_error() == CUDA_SUCCESS && op.fn) {
      trace("  run %s on stream %p", op.what, (void*)s.get());
      op.fn();
    }
    op.done->set();
  }
  std::lock_guard<std::mutex> l(g_mu);
  g_all.erase(s);
}

StreamP make_stream(int device, bool legacy, unsigned flags, int priority) {
  auto s = std::make_shared<Stream>();
  s->device = device;
  s->legacy = legacy;
  s->flags = flags;
  s->blocking = !(flags & CU_STREAM_NON_BLOCKING);
  s->priority = priority;
  s->rng.seed(config().adversarial_seed * 0x9E3779B97F4A7C15ull + (++g_stream_counter));
  g_all.insert(s);
  std::thread(worker, s).detach();
  return s;
}

bool is_legacy_handle(CUstream h) {
  return h == nullptr || h == CU_STREAM_LEGACY || h == CU_STREAM_PER_THREAD;
}

// The stream behind a handle (g_mu held), or nullptr when unknown.
StreamP resolve_locked(CUstream h) {
  if (is_legacy_handle(h)) {
    CUcontext c = current_ctx();
    int dev = c ? ctx_device(c) : 0;
    if (dev < 0) dev = 0;
    if (g_legacy.empty()) g_legacy.resize((size_t)config().devices);
    if ((size_t)dev >= g_legacy.size()) return nullptr;
    if (!g_legacy[(size_t)dev]) g_legacy[(size_t)dev] = make_stream(dev, true, 0, 0);
    return g_legacy[(size_t)dev];
  }
  Stream* s = reinterpret_cast<Stream*>(h);
  if (!g_handles.count(s)) return nullptr;
  return s->shared_from_this();
}

// Appends an op (g_mu taken here). Returns its completion marker, or nullptr for a bad handle.
MarkerP push(CUstream h, std::function<void()> fn, const char* what, std::vector<MarkerP> deps) {
  std::lock_guard<std::mutex> l(g_mu);
  StreamP s = resolve_locked(h);
  if (!s) return nullptr;
  // Legacy default stream semantics.
  if (s->legacy) {
    for (const StreamP& o : g_all)
      if (o != s && !o->legacy && o->blocking && o->device == s->device) deps.push_back(o->tail);
  } else if (s->blocking) {
    if (!g_legacy.empty() && (size_t)s->device < g_legacy.size() && g_legacy[(size_t)s->device])
      deps.push_back(g_legacy[(size_t)s->device]->tail);
  }
  auto done = std::make_shared<Marker>();
  {
    std::lock_guard<std::mutex> sl(s->m);
    s->q.push_back(Op{std::move(fn), std::move(deps), done, what});
  }
  s->tail = done;
  s->cv.notify_one();
  return done;
}

struct Event {
  unsigned flags = 0;
  MarkerP done;  // nullptr until recorded
};
std::mutex& g_ev_mu = *new std::mutex;
std::set<Event*>& g_events = *new std::set<Event*>;

Event* event_locked(CUevent e) {
  Event* ev = reinterpret_cast<Event*>(e);
  return g_events.count(ev) ? ev : nullptr;
}

}  // namespace

bool stream_valid(CUstream h) {
  if (is_legacy_handle(h)) return true;
  std::lock_guard<std::mutex> l(g_mu);
  return g_handles.count(reinterpret_cast<Stream*>(h)) != 0;
}

CUresult enqueue(CUstream stream, std::function<void()> op, const char* what) {
  if (CUresult e = sticky_error()) return e;
  if (!push(stream, std::move(op), what, {})) return CUDA_ERROR_INVALID_HANDLE;
  return CUDA_SUCCESS;
}

CUresult stream_sync(CUstream stream) {
  MarkerP tail;
  {
    std::lock_guard<std::mutex> l(g_mu);
    StreamP s = resolve_locked(stream);
    if (!s) return CUDA_ERROR_INVALID_HANDLE;
    tail = s->tail;
  }
  tail->wait();
  return sticky_error();
}

CUresult device_sync() {
  std::vector<MarkerP> tails;
  {
    std::lock_guard<std::mutex> l(g_mu);
    for (const StreamP& s : g_all) tails.push_back(s->tail);
  }
  for (auto& t : tails) t->wait();
  return sticky_error();
}

}  // namespace vgpu

using namespace vgpu;


// ---- streams -----------------------------------------------------------------------------------

static CUresult create_stream(CUstream* ph, unsigned flags, int priority) {
  RETURN_IF(require_ctx());
  RETURN_IF(sticky_error());
  if (!ph) return CUDA_ERROR_INVALID_VALUE;
  if (flags & ~(unsigned)CU_STREAM_NON_BLOCKING) return CUDA_ERROR_INVALID_VALUE;
  int dev = ctx_device(current_ctx());
  std::lock_guard<std::mutex> l(g_mu);
  StreamP s = make_stream(dev < 0 ? 0 : dev, false, flags, priority);
  g_handles.insert(s.get());
  *ph = reinterpret_cast<CUstream>(s.get());
  trace("  -> stream %p", (void*)*ph);
  return CUDA_SUCCESS;
}

VGPU_EXPORT CUresult cuStreamCreate(CUstream* ph, unsigned int flags) {
  trace("cuStreamCreate(flags %u)", flags);
  return create_stream(ph, flags, 0);
}

VGPU_EXPORT CUresult cuStreamCreateWithPriority(CUstream* ph, unsigned int flags, int priority) {
  trace("cuStreamCreateWithPriority(flags %u, priority %d)", flags, priority);
  if (priority > 0) priority = 0;  // documented: clamped to the valid range
  if (priority < -5) priority = -5;
  return create_stream(ph, flags, priority);
}

VGPU_EXPORT CUresult cuStreamDestroy(CUstream h) {
  trace("cuStreamDestroy_v2(%p)", (void*)h);
  if (!initialized()) return CUDA_ERROR_NOT_INITIALIZED;
  if (is_legacy_handle(h)) return CUDA_ERROR_INVALID_HANDLE;
  StreamP s;
  {
    std::lock_guard<std::mutex> l(g_mu);
    Stream* raw = reinterpret_cast<Stream*>(h);
    if (!g_handles.count(raw)) return CUDA_ERROR_INVALID_HANDLE;
    g_handles.erase(raw);
    s = raw->shared_from_this();
  }
  // Documented: work still pending on the stream completes; resources are released after.
  {
    std::lock_guard<std::mutex> sl(s->m);
    s->destroyed = true;
  }
  s->cv.notify_one();
  return CUDA_SUCCESS;
}

VGPU_EXPORT CUresult cuStreamSynchronize(CUstream h) {
  trace("cuStreamSynchronize(%p)", (void*)h);
  if (!initialized()) return CUDA_ERROR_NOT_INITIALIZED;
  if (is_legacy_handle(h)) RETURN_IF(require_ctx());
  return stream_sync(h);
}

VGPU_EXPORT CUresult cuStreamQuery(CUstream h) {
  trace("cuStreamQuery(%p)", (void*)h);
  if (!initialized()) return CUDA_ERROR_NOT_INITIALIZED;
  if (is_legacy_handle(h)) RETURN_IF(require_ctx());
  MarkerP tail;
  {
    std::lock_guard<std::mutex> l(g_mu);
    StreamP s = resolve_locked(h);
    if (!s) return CUDA_ERROR_INVALID_HANDLE;
    tail = s->tail;
  }
  RETURN_IF(sticky_error());
  return tail->is_done() ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY;
}

VGPU_EXPORT CUresult cuStreamGetFlags(CUstream h, unsigned int* flags) {
  if (!initialized()) return CUDA_ERROR_NOT_INITIALIZED;
  if (!flags) return CUDA_ERROR_INVALID_VALUE;
  std::lock_guard<std::mutex> l(g_mu);
  StreamP s = resolve_locked(h);
  if (!s) return CUDA_ERROR_INVALID_HANDLE;
  *flags = s->flags;
  return CUDA_SUCCESS;
}

VGPU_EXPORT CUresult cuStreamGetPriority(CUstream h, int* priority) {
  if (!initialized()) return CUDA_ERROR_NOT_INITIALIZED;
  if (!priority) return CUDA_ERROR_INVALID_VALUE;
  std::lock_guard<std::mutex> l(g_mu);
  StreamP s = resolve_locked(h);
  if (!s) return CUDA_ERROR_INVALID_HANDLE;
  *priority = s->priority;
  return CUDA_SUCCESS;
}

VGPU_EXPORT CUresult cuStreamIsCapturing(CUstream h, CUstreamCaptureStatus* status) {
  if (!initialized()) return CUDA_ERROR_NOT_INITIALIZED;
  if (!status) return CUDA_ERROR_INVALID_VALUE;
  if (!stream_valid(h)) return CUDA_ERROR_INVALID_HANDLE;
  *status = CU_STREAM_CAPTURE_STATUS_NONE;
  return CUDA_SUCCESS;
}

VGPU_EXPORT CUresult cuStreamWaitEvent(CUstream h, CUevent e, unsigned int flags) {
  trace("cuStreamWaitEvent(stream %p, event %p)", (void*)h, (void*)e);
  if (!initialized()) return CUDA_ERROR_NOT_INITIALIZED;
  if (flags != 0 && flags != CU_EVENT_WAIT_EXTERNAL) return CUDA_ERROR_INVALID_VALUE;
  if (!stream_valid(h)) return CUDA_ERROR_INVALID_HANDLE;
  if (is_legacy_handle(h)) RETURN_IF(require_ctx());
  MarkerP m;
  {
    std::lock_guard<std::mutex> l(g_ev_mu);
    Event* ev = event_locked(e);
    if (!ev) return CUDA_ERROR_INVALID_HANDLE;
    m = ev->done;  // the work captured by the most recent cuEventRecord
  }
  RETURN_IF(sticky_error());
  std::vector<MarkerP> deps;
  if (m) deps.push_back(m);  // never recorded: documented to be a no-op wait
  if (!push(h, nullptr, "cuStreamWaitEvent", std::move(deps))) return CUDA_ERROR_INVALID_HANDLE;
  return CUDA_SUCCESS;
}

VGPU_EXPORT CUresult cuLaunchHostFunc(CUstream h, CUhostFn fn, void* user) {
  trace("cuLaunchHostFunc(stream %p)", (void*)h);
  if (!initialized()) return CUDA_ERROR_NOT_INITIALIZED;
  if (!fn) return CUDA_ERROR_INVALID_VALUE;
  if (is_legacy_handle(h)) RETURN_IF(require_ctx());
  return enqueue(h, [fn, user] { fn(user); }, "cuLaunchHostFunc");
}

// ---- events ------------------------------------------------------------------------------------

VGPU_EXPORT CUresult cuEventCreate(CUevent* pe, unsigned int flags) {
  trace("cuEventCreate(flags %u)", flags);
  RETURN_IF(require_ctx());
  if (!pe) return CUDA_ERROR_INVALID_VALUE;
  const unsigned known = CU_EVENT_BLOCKING_SYNC | CU_EVENT_DISABLE_TIMING | CU_EVENT_INTERPROCESS;
  if (flags & ~known) return CUDA_ERROR_INVALID_VALUE;
  // Documented: INTERPROCESS requires DISABLE_TIMING.
  if ((flags & CU_EVENT_INTERPROCESS) && !(flags & CU_EVENT_DISABLE_TIMING))
    return CUDA_ERROR_INVALID_VALUE;
  Event* ev = new Event;
  ev->flags = flags;
  std::lock_guard<std::mutex> l(g_ev_mu);
  g_events.insert(ev);
  *pe = reinterpret_cast<CUevent>(ev);
  return CUDA_SUCCESS;
}

VGPU_EXPORT CUresult cuEventDestroy(CUevent e) {
  trace("cuEventDestroy_v2(%p)", (void*)e);
  if (!initialized()) return CUDA_ERROR_NOT_INITIALIZED;
  std::lock_guard<std::mutex> l(g_ev_mu);
  Event* ev = event_locked(e);
  if (!ev) return CUDA_ERROR_INVALID_HANDLE;
  g_events.erase(ev);
  delete ev;  // a pending record keeps its marker alive through the stream's queue
  return CUDA_SUCCESS;
}

VGPU_EXPORT CUresult cuEventRecord(CUevent e, CUstream h) {
  trace("cuEventRecord(event %p, stream %p)", (void*)e, (void*)h);
  if (!initialized()) return CUDA_ERROR_NOT_INITIALIZED;
  if (!stream_valid(h)) return CUDA_ERROR_INVALID_HANDLE;
  if (is_legacy_handle(h)) RETURN_IF(require_ctx());
  {
    std::lock_guard<std::mutex> l(g_ev_mu);
    if (!event_locked(e)) return CUDA_ERROR_INVALID_HANDLE;
  }
  RETURN_IF(sticky_error());
  MarkerP m = push(h, nullptr, "cuEventRecord", {});
  if (!m) return CUDA_ERROR_INVALID_HANDLE;
  std::lock_guard<std::mutex> l(g_ev_mu);
  Event* ev = event_locked(e);
  if (!ev) return CUDA_ERROR_INVALID_HANDLE;
  ev->done = m;
  return CUDA_SUCCESS;
}

VGPU_EXPORT CUresult cuEventQuery(CUevent e) {
  trace("cuEventQuery(%p)", (void*)e);
  if (!initialized()) return CUDA_ERROR_NOT_INITIALIZED;
  MarkerP m;
  {
    std::lock_guard<std::mutex> l(g_ev_mu);
    Event* ev = event_locked(e);
    if (!ev) return CUDA_ERROR_INVALID_HANDLE;
    m = ev->done;
  }
  RETURN_IF(sticky_error());
  if (!m) return CUDA_SUCCESS;  // documented: never recorded -> CUDA_SUCCESS
  return m->is_done() ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY;
}

VGPU_EXPORT CUresult cuEventSynchronize(CUevent e) {
  trace("cuEventSynchronize(%p)", (void*)e);
  if (!initialized()) return CUDA_ERROR_NOT_INITIALIZED;
  MarkerP m;
  {
    std::lock_guard<std::mutex> l(g_ev_mu);
    Event* ev = event_locked(e);
    if (!ev) return CUDA_ERROR_INVALID_HANDLE;
    m = ev->done;
  }
  if (m) m->wait();
  return sticky_error();
}

static CUresult elapsed(float* ms, CUevent a, CUevent b) {
  trace("cuEventElapsedTime(%p, %p)", (void*)a, (void*)b);
  if (!initialized()) return CUDA_ERROR_NOT_INITIALIZED;
  if (!ms) return CUDA_ERROR_INVALID_VALUE;
  MarkerP ma, mb;
  {
    std::lock_guard<std::mutex> l(g_ev_mu);
    Event* ea = event_locked(a);
    Event* eb = event_locked(b);
    if (!ea || !eb) return CUDA_ERROR_INVALID_HANDLE;
    if ((ea->flags | eb->flags) & CU_EVENT_DISABLE_TIMING) return CUDA_ERROR_INVALID_HANDLE;
    ma = ea->done;
    mb = eb->done;
  }
  RETURN_IF(sticky_error());
  if (!ma || !mb) return CUDA_ERROR_INVALID_HANDLE;  // not recorded
  if (!ma->is_done() || !mb->is_done()) return CUDA_ERROR_NOT_READY;
  *ms = std::chrono::duration<float, std::milli>(mb->when - ma->when).count();
  return CUDA_SUCCESS;
}

#undef cuEventElapsedTime
VGPU_EXPORT CUresult cuEventElapsedTime(float* ms, CUevent a, CUevent b) { return elapsed(ms, a, b); }
VGPU_EXPORT CUresult cuEventElapsedTime_v2(float* ms, CUevent a, CUevent b) {
  return elapsed(ms, a, b);
}
