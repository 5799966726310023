// cuda_interpret.h: run the very same kernels/*.cu source on CPU threads ("interpret mode").
//
// Force-include this header (g++ -x c++ -include kernels/interpret/cuda_interpret.h) or include it
// before the .cu files. It makes CUDA C++ plain C++17:
//   - __global__/__device__/__host__/__forceinline__/__launch_bounds__ become ordinary C++;
//   - threadIdx, blockIdx, blockDim, gridDim are thread_local: set per CPU thread, or swapped
//     in and out with each fiber (below);
//   - a grid runs block by block (blocks one at a time, in x-fastest order); so `__shared__` is
//     simply `static` (one copy, shared by the threads of the block being run), and
//     SVFT_DYNAMIC_SMEM points at a buffer of exactly the launch's shared_mem_bytes (ASan sees
//     overruns), filled with NaN bytes before each block;
//   - each GPU thread of a block is either
//     * a CPU thread (pooled, reused across launches) and __syncthreads() a pthread barrier,
//       which ThreadSanitizer understands, so a missing barrier shows up as a data race: under
//       a sanitizer, off x86-64, or with SVFT_INTERP_THREADS defined; or
//     * a fiber on the launching thread (the default): the block's threads take turns, each
//       running until it reaches a barrier, so a barrier costs a few context switches instead
//       of waking hundreds of OS threads (on a 2-core machine that was most of the run time),
//       and a missing barrier reads data its neighbours have not written yet, deterministically;
//       a barrier not every thread reaches is reported and aborts instead of hanging;
//   - warp shuffles exchange through a per-warp slot array between two per-warp barriers: all
//     lanes of the warp must take part (the kernels only use full-mask shuffles of full warps);
//   - atomicAdd(float*) is a compare-and-swap loop on the bit pattern (GCC __atomic builtins).
// __nv_bfloat16 / __half and their conversions come from the CUDA toolkit's own cuda_bf16.h and
// cuda_fp16.h, which compile for the host with g++ (their host paths round to nearest even;
// tests/kernels checks that bit for bit). The CUDA build never sees this header.
//
// Launches are serialised by a process-wide mutex: `__shared__` statics are per kernel, not per
// launch, so two launches of one kernel must not overlap (Rust tests run in parallel threads).
#pragma once

#define SVFT_INTERPRET 1

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <pthread.h>
#include <math.h>  // the device math functions kernels call (expf), as nvcc provides them

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

// The toolkit headers define these as GCC attributes for host compilation; make them plain C++.
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __forceinline__ inline
#define __launch_bounds__(...)

#if !defined(SVFT_INTERP_THREADS)
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__) || !defined(__x86_64__)
#define SVFT_INTERP_THREADS 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer) || __has_feature(address_sanitizer)
#define SVFT_INTERP_THREADS 1
#endif
#endif
#endif

#if !defined(SVFT_INTERP_THREADS)
#include <sys/mman.h>
#include <unistd.h>

#include <cstdlib>

// svft_fiber_switch(save, to): saves the callee-saved registers on the current stack, stores the
// stack pointer in *save, loads `to` (a stack laid out by the same routine, or by Fibers::start
// below) and returns into it. The System V x86-64 ABI leaves the vector registers and flags
// caller-saved, so rbx, rbp and r12-r15 are all a switch between C++ functions has to keep.
// glibc's swapcontext would also do, but saves the signal mask with a system call per switch.
extern "C" void svft_fiber_switch(void** save, void* to);
__asm__(
    ".text\n"
    ".weak svft_fiber_switch\n"
    ".hidden svft_fiber_switch\n"
    ".type svft_fiber_switch,@function\n"
    "svft_fiber_switch:\n"
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n"
    "  ret\n"
    ".size svft_fiber_switch, .-svft_fiber_switch\n"
    // A new fiber's first return lands here with its Fiber* in rbx and its entry in r12.
    ".weak svft_fiber_trampoline\n"
    ".hidden svft_fiber_trampoline\n"
    ".type svft_fiber_trampoline,@function\n"
    "svft_fiber_trampoline:\n"
    "  movq %rbx, %rdi\n"
    "  callq *%r12\n"
    "  ud2\n"
    ".size svft_fiber_trampoline, .-svft_fiber_trampoline\n");
extern "C" void svft_fiber_trampoline();
#endif

namespace svft_interp {

struct Block;
struct Warp;

// Which GPU thread this is: its block, warp and lane.
struct ThreadState {
  Block* block = nullptr;
  Warp* warp = nullptr;
  unsigned lane = 0;
};

#if defined(SVFT_INTERP_THREADS)

class Barrier {
 public:
  explicit Barrier(unsigned count) { pthread_barrier_init(&b_, nullptr, count); }
  ~Barrier() { pthread_barrier_destroy(&b_); }
  Barrier(const Barrier&) = delete;
  Barrier& operator=(const Barrier&) = delete;
  void wait() { pthread_barrier_wait(&b_); }

 private:
  pthread_barrier_t b_;
};

#else

// The fibers of the block being run, all on the launching thread. Stacks (128 KiB, a guard page
// below each so an overflow faults instead of corrupting a neighbour) are kept for the thread's
// next launch and unmapped when the thread exits (a virtual GPU stream's worker, for one).
struct Fibers {
  static constexpr size_t kStack = 128 * 1024;
  Fibers() = default;
  Fibers(const Fibers&) = delete;
  Fibers& operator=(const Fibers&) = delete;
  ~Fibers() {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    for (Fiber& f : fibers)
      if (f.stack) munmap(f.stack - page, page + kStack);
  }
  struct Fiber {
    void* sp = nullptr;
    unsigned char* stack = nullptr;  // guard page + kStack
    bool done = true;
    unsigned index = 0;
    // This GPU thread's identity while another fiber runs (see run_block).
    ThreadState tl;
    uint3 thread_idx, block_idx;
    dim3 block_dim, grid_dim;
  };
  std::vector<Fiber> fibers;
  void* scheduler_sp = nullptr;
  Fiber* current = nullptr;
  const std::function<void(unsigned)>* job = nullptr;
  uint64_t progress = 0;  // barrier arrivals and finished fibers, to tell a deadlock

  static void entry(Fiber* f);

  void start(Fiber& f, unsigned index) {
    if (!f.stack) {
      const size_t page = (size_t)sysconf(_SC_PAGESIZE);
      void* p = mmap(nullptr, page + kStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED || mprotect(p, page, PROT_NONE) != 0) {
        fprintf(stderr, "svft interpret: cannot map a fiber stack\n");
        std::abort();
      }
      f.stack = static_cast<unsigned char*>(p) + page;
    }
    // Initial frame, as svft_fiber_switch pops it: r15 r14 r13 r12 rbx rbp, then the return
    // address; the trampoline then runs with a 16-byte aligned stack, as a call expects.
    uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack) + kStack) & ~uintptr_t(15);
    void** sp = reinterpret_cast<void**>(top - 56);
    sp[0] = sp[1] = sp[2] = nullptr;                      // r15 r14 r13
    sp[3] = reinterpret_cast<void*>(&Fibers::entry);      // r12: entry
    sp[4] = &f;                                           // rbx: its argument
    sp[5] = nullptr;                                      // rbp
    sp[6] = reinterpret_cast<void*>(&svft_fiber_trampoline);
    f.sp = sp;
    f.done = false;
    f.index = index;
  }

  void yield() { svft_fiber_switch(&current->sp, scheduler_sp); }
};

inline thread_local Fibers* t_fibers = nullptr;

// A cooperative barrier: the last thread to arrive releases the others and runs on; the others
// hand the CPU to their neighbours until it has.
class Barrier {
 public:
  explicit Barrier(unsigned count) : count_(count) {}
  Barrier(const Barrier&) = delete;
  Barrier& operator=(const Barrier&) = delete;
  void wait() {
    Fibers* fs = t_fibers;
    ++fs->progress;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      return;
    }
    const uint64_t g = generation_;
    while (generation_ == g) fs->yield();
  }

 private:
  unsigned count_, arrived_ = 0;
  uint64_t generation_ = 0;
};

#endif

// One warp: its lanes' exchange slots and a barrier over its lanes.
struct Warp {
  explicit Warp(unsigned lanes) : lanes(lanes), bar(lanes) {}
  unsigned lanes;
  Barrier bar;
  uint64_t slot[32];
};

// The block being run: its barrier, warps and dynamic shared memory.
struct Block {
  explicit Block(unsigned threads) : bar(threads) {}
  Barrier bar;
  std::vector<std::unique_ptr<Warp>> warps;
  std::unique_ptr<unsigned char[]> dyn_smem;  // exactly shared_mem_bytes (nullptr when 0)
  size_t dyn_smem_bytes = 0;
};

inline thread_local ThreadState tl;

inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

}  // namespace svft_interp

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

#define SVFT_DYNAMIC_SMEM(type, name) \
  type* name = reinterpret_cast<type*>(svft_interp::tl.block->dyn_smem.get())

inline void __syncthreads() { svft_interp::tl.block->bar.wait(); }

// Warp shuffles: every lane of the warp publishes its value, waits for the others, reads its
// source lane, and waits again so the slots can be reused by the next shuffle.
namespace svft_interp {
template <typename T>
inline T shuffle_from(T v, int src_lane, bool keep_own) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a type wider than 64 bits");
  Warp* w = tl.warp;
  std::memcpy(&w->slot[tl.lane], &v, sizeof(T));
  w->bar.wait();
  T out = v;
  if (!keep_own) std::memcpy(&out, &w->slot[src_lane], sizeof(T));
  w->bar.wait();
  return out;
}
}  // namespace svft_interp

template <typename T>
inline T __shfl_xor_sync(unsigned /*mask*/, T v, int lane_mask, int width = 32) {
  const int lane = (int)svft_interp::tl.lane;
  const int src = (lane & ~(width - 1)) | ((lane ^ lane_mask) & (width - 1));
  return svft_interp::shuffle_from(v, src, src >= (int)svft_interp::tl.warp->lanes);
}
template <typename T>
inline T __shfl_down_sync(unsigned /*mask*/, T v, unsigned delta, int width = 32) {
  const int lane = (int)svft_interp::tl.lane;
  const int src = lane + (int)delta;
  const bool own = (src & ~(width - 1)) != (lane & ~(width - 1)) ||
                   src >= (int)svft_interp::tl.warp->lanes;
  return svft_interp::shuffle_from(v, src, own);
}
template <typename T>
inline T __shfl_sync(unsigned /*mask*/, T v, int src_lane, int width = 32) {
  const int lane = (int)svft_interp::tl.lane;
  const int src = (lane & ~(width - 1)) + (src_lane & (width - 1));
  return svft_interp::shuffle_from(v, src, src >= (int)svft_interp::tl.warp->lanes);
}

inline float atomicAdd(float* address, float val) {
  uint32_t* bits = reinterpret_cast<uint32_t*>(address);
  uint32_t expected = __atomic_load_n(bits, __ATOMIC_RELAXED);
  for (;;) {
    float old;
    std::memcpy(&old, &expected, sizeof old);
    const float sum = old + val;
    uint32_t desired;
    std::memcpy(&desired, &sum, sizeof desired);
    if (__atomic_compare_exchange_n(bits, &expected, desired, /*weak=*/true, __ATOMIC_RELAXED,
                                    __ATOMIC_RELAXED))
      return old;
  }
}

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

namespace svft_interp {

#if defined(SVFT_INTERP_THREADS)
// A process-wide pool of worker threads, one per GPU thread of the largest block seen so far,
// reused across launches (creating hundreds of threads per launch dominates run time on small
// machines). run(n, f) calls f(0) .. f(n-1) on workers 0 .. n-1 and returns when all are done.
// Synchronisation is a mutex and condition variables, which sanitizers understand.
class Pool {
 public:
  void run(unsigned n, const std::function<void(unsigned)>& job) {
    std::unique_lock<std::mutex> lock(mu_);
    while (workers_ < n) {
      std::thread(&Pool::worker, this, workers_).detach();
      ++workers_;
    }
    job_ = &job;
    active_ = n;
    remaining_ = n;
    ++generation_;
    start_.notify_all();
    done_.wait(lock, [&] { return remaining_ == 0; });
    job_ = nullptr;
  }

 private:
  void worker(unsigned index) {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      start_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      if (index >= active_) continue;
      const std::function<void(unsigned)>* job = job_;
      lock.unlock();
      (*job)(index);
      lock.lock();
      if (--remaining_ == 0) done_.notify_one();
    }
  }

  std::mutex mu_;
  std::condition_variable start_, done_;
  const std::function<void(unsigned)>* job_ = nullptr;
  unsigned workers_ = 0, active_ = 0, remaining_ = 0;
  uint64_t generation_ = 0;
};

// Never destroyed: its detached workers wait on it until the process exits.
inline Pool& pool() {
  static Pool* p = new Pool;
  return *p;
}

// run_block(n, f): f(0) .. f(n-1), one per GPU thread, together.
inline void run_block(unsigned n, const std::function<void(unsigned)>& job) { pool().run(n, job); }

#else

inline void Fibers::entry(Fiber* f) {
  Fibers* fs = t_fibers;
  (*fs->job)(f->index);
  f->done = true;
  ++fs->progress;
  svft_fiber_switch(&f->sp, fs->scheduler_sp);
  std::abort();  // a finished fiber is never resumed
}

// run_block(n, f): f(0) .. f(n-1) as fibers on this thread, round robin until all return.
inline void run_block(unsigned n, const std::function<void(unsigned)>& job) {
  static thread_local Fibers owned;  // kept (with its stacks) for this thread's next launch
  Fibers* fs = &owned;
  if (fs->fibers.size() < n) fs->fibers.resize(n);
  fs->job = &job;
  for (unsigned t = 0; t < n; ++t) fs->start(fs->fibers[t], t);
  Fibers* outer = t_fibers;
  t_fibers = fs;
  for (unsigned live = n; live > 0;) {
    const uint64_t before = fs->progress;
    live = 0;
    for (unsigned t = 0; t < n; ++t) {
      Fibers::Fiber& f = fs->fibers[t];
      if (f.done) continue;
      // The GPU-thread identity lives in thread_locals of this one OS thread: swap it per fiber.
      tl = f.tl;
      threadIdx = f.thread_idx;
      blockIdx = f.block_idx;
      blockDim = f.block_dim;
      gridDim = f.grid_dim;
      fs->current = &f;
      svft_fiber_switch(&fs->scheduler_sp, f.sp);
      f.tl = tl;
      f.thread_idx = threadIdx;
      f.block_idx = blockIdx;
      f.block_dim = blockDim;
      f.grid_dim = gridDim;
      if (!f.done) ++live;
    }
    if (live > 0 && fs->progress == before) {
      fprintf(stderr,
              "svft interpret: deadlock: %u of %u threads wait at a barrier the others never reach "
              "(__syncthreads or a warp shuffle in divergent code)\n",
              live, n);
      std::abort();
    }
  }
  t_fibers = outer;
}

#endif

// Launch configuration, laid out like cudarc's LaunchConfig (grid, block, shared_mem_bytes).
struct LaunchCfg {
  uint32_t grid_x, grid_y, grid_z;
  uint32_t block_x, block_y, block_z;
  uint32_t shared_mem_bytes;
};

enum LaunchStatus : int {
  kOk = 0,
  kBadGrid = 1,     // a grid dimension is 0
  kBadBlock = 2,    // block has 0 or more than 1024 threads
};

// Run `kernel(args...)` over the grid: blocks one after another, each with one CPU thread (or
// fiber) per GPU thread. Returns a LaunchStatus (std::terminate if the OS refuses threads).
template <typename... Params, typename... Args>
int launch(const LaunchCfg& cfg, void (*kernel)(Params...), Args... args) {
  if (cfg.grid_x == 0 || cfg.grid_y == 0 || cfg.grid_z == 0) return kBadGrid;
  const uint64_t nthreads = (uint64_t)cfg.block_x * cfg.block_y * cfg.block_z;
  if (nthreads == 0 || nthreads > 1024) return kBadBlock;

  std::lock_guard<std::mutex> lock(launch_mutex());
  Block block((unsigned)nthreads);
  for (uint64_t t = 0; t < nthreads; t += 32)
    block.warps.emplace_back(new Warp((unsigned)(nthreads - t < 32 ? nthreads - t : 32)));
  block.dyn_smem_bytes = cfg.shared_mem_bytes;
  if (cfg.shared_mem_bytes) block.dyn_smem.reset(new unsigned char[cfg.shared_mem_bytes]);

  const dim3 grid(cfg.grid_x, cfg.grid_y, cfg.grid_z);
  const dim3 blk(cfg.block_x, cfg.block_y, cfg.block_z);
  const std::function<void(unsigned)> body = [&](unsigned t) {
    tl.block = &block;
    tl.warp = block.warps[t / 32].get();
    tl.lane = t % 32;
    threadIdx = make_uint3(t % blk.x, (t / blk.x) % blk.y, t / (blk.x * blk.y));
    blockDim = blk;
    gridDim = grid;
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          // Fresh block: shared memory content is undefined on a GPU; make it NaN here.
          if (t == 0 && block.dyn_smem) std::memset(block.dyn_smem.get(), 0xff, block.dyn_smem_bytes);
          block.bar.wait();
          blockIdx = make_uint3(x, y, z);
          kernel(args...);
          block.bar.wait();  // the whole block is done before the next one starts
        }
  };

  run_block((unsigned)nthreads, body);
  return kOk;
}

}  // namespace svft_interp
