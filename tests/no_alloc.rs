//! The hot paths (a layer's step, an adapter bank's forward) allocate nothing after the first
//! call with a given size. A counting global allocator sees every allocation in this test
//! binary; the tests take turns, so one test's setup is never counted in another.
//!
//! faer's *multi-threaded* GEMM allocates its own packing buffers on every call (a handful of
//! small allocations inside the library, measured in docs/PERF.md); the layer cannot hand it a
//! workspace. So the step runs in a one-thread pool, where faer's GEMM runs sequentially
//! and allocates nothing: what is counted is the layer's own code, sparse passes included.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use common::*;
use std::sync::{Mutex, MutexGuard};
use svft::bank::segments::equal_segments;
use svft::bank::{Adapter, CpuBank, BASE};
use svft::cpu::CpuLayer;
use svft::{LayerConfig, Pattern, Plan};

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

/// Held for a whole test: the counter is global, so another test's allocations (its setup
/// included) must never run while one test counts.
fn one_test_at_a_time() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock().unwrap_or_else(|e| e.into_inner())
}

/// Allocations made by one call of `step` after `warmups` uncounted ones (which size the
/// workspaces), in a one-thread pool.
fn counted(warmups: usize, mut step: impl FnMut() + Send) -> usize {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    pool.install(|| {
        (0..warmups).for_each(|_| step());
        ALLOCS.store(0, Ordering::SeqCst);
        COUNTING.store(true, Ordering::SeqCst);
        step();
        COUNTING.store(false, Ordering::SeqCst);
    });
    ALLOCS.load(Ordering::SeqCst)
}

#[test]
fn forward_and_backward_do_not_allocate_after_the_first_call() {
    let _turn = one_test_at_a_time();
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
                let count = counted(2, || {
                    layer.forward_into(&x, n, &mut y).unwrap();
                    layer.backward_into(&gy, n, &mut dx, &mut dm).unwrap();
                });
                assert_eq!(count, 0, "{spec} {plan} n={n}: {count} allocations on the hot path");
            }
        }
    }
}

/// The bank's forward: as above, the step runs in a one-thread pool, so what is counted is the
/// bank's code: the table's validation, the per-piece scratch tables, the core.
#[test]
fn bank_forward_does_not_allocate_after_the_first_call() {
    let _turn = one_test_at_a_time();
    let (d_out, d_in, r) = (150, 120, 120);
    let f = factors(d_out, d_in, r, 1);
    let mut bank = CpuBank::new(f.clone(), Some(randn(d_out, 2))).unwrap();
    let specs = ["plain", "banded:2", "random:4:seed=1", "random:2:seed=3"];
    for (id, spec) in specs.iter().enumerate() {
        let omega = spec.parse::<Pattern>().unwrap().omega(&f).unwrap();
        let m = randn(omega.len(), id as u64);
        // Gates on and off: the gate-off adapters use their stored values directly.
        bank.add(id as u32, Adapter::new(omega, m, 0.2, id % 2 == 0).unwrap()).unwrap();
    }
    for n in [1usize, 77, 400] {
        let x = randn(n * d_in, 3);
        let mut y = vec![0.0; n * d_out];
        let tables =
            [equal_segments(n, 1, &[0, 1, 2, 3, BASE]), equal_segments(n, 13, &[2, 0]), equal_segments(n, n, &[3])];
        let count = counted(1, || {
            for t in &tables {
                bank.forward_into(&x, n, t, &mut y).unwrap();
            }
        });
        assert_eq!(count, 0, "n={n}: {count} allocations on the bank's hot path");
        assert!(y.iter().all(|v| v.is_finite()));
    }
}
