//! The hot path allocates nothing after the first call with a given token count.
//! A counting global allocator sees every allocation in this test binary.
//!
//! faer's *multi-threaded* GEMM allocates its own packing buffers on every call (a handful of
//! small allocations inside the library, measured in docs/PERF.md); the layer cannot hand it a
//! workspace. So the step runs in a one-thread pool, where faer's GEMM runs sequentially
//! and allocates nothing: what is counted is the layer's own code, sparse passes included.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use common::*;
use svft::cpu::CpuLayer;
use svft::{LayerConfig, Plan};

struct Counting;
static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn forward_and_backward_do_not_allocate_after_the_first_call() {
    // Sizes large enough that the GEMMs and sparse passes run multi-threaded.
    let (d_out, d_in, r) = (300, 200, 200);
    for spec in ["banded:2", "random:4:seed=1"] {
        for plan in [Plan::Factored, Plan::Merged] {
            let config = LayerConfig { plan, ..LayerConfig::official(spec.parse().unwrap()) };
            let mut layer = CpuLayer::new(factors(d_out, d_in, r, 1), &config, None).unwrap();
            for n in [1usize, 257, 1000] {
                let x = randn(n * d_in, 2);
                let gy = randn(n * d_out, 3);
                let (mut y, mut dx, mut dm) =
                    (vec![0.0; n * d_out], vec![0.0; n * d_in], vec![0.0; layer.omega().len()]);
                let mut step = |layer: &mut CpuLayer| {
                    layer.forward_into(&x, n, &mut y).unwrap();
                    layer.backward_into(&gy, n, &mut dx, &mut dm).unwrap();
                };
                let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
                pool.install(|| {
                    step(&mut layer); // sizes the workspace
                    step(&mut layer);
                    ALLOCS.store(0, Ordering::SeqCst);
                    COUNTING.store(true, Ordering::SeqCst);
                    step(&mut layer);
                    COUNTING.store(false, Ordering::SeqCst);
                });
                let count = ALLOCS.load(Ordering::SeqCst);
                assert_eq!(count, 0, "{spec} {plan} n={n}: {count} allocations on the hot path");
            }
        }
    }
}
