//! The bank's forward allocates nothing after its workspace has met the batch's size (its own
//! binary: a counting global allocator sees every allocation). As in tests/no_alloc.rs, the
//! step runs in a one-thread pool, where faer's GEMM allocates nothing of its own, so what is
//! counted is the bank's code: the table's validation, the per-piece scratch tables, the core.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use common::{factors, randn};
use svft::bank::segments::equal_segments;
use svft::bank::{Adapter, CpuBank, BASE};
use svft::Pattern;

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
fn bank_forward_does_not_allocate_after_the_first_call() {
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
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        pool.install(|| {
            for t in &tables {
                bank.forward_into(&x, n, t, &mut y).unwrap(); // sizes the workspace
            }
            ALLOCS.store(0, Ordering::SeqCst);
            COUNTING.store(true, Ordering::SeqCst);
            for t in &tables {
                bank.forward_into(&x, n, t, &mut y).unwrap();
            }
            COUNTING.store(false, Ordering::SeqCst);
        });
        let count = ALLOCS.load(Ordering::SeqCst);
        assert_eq!(count, 0, "n={n}: {count} allocations on the bank's hot path");
        assert!(y.iter().all(|v| v.is_finite()));
    }
}
