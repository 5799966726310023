//! f32 GEMM throughput of the CPU layer's backends on this machine: faer and the system BLAS
//! (see `svft::cpu::blas`), on the products an SVFT / LoRA / dense training step makes, in one
//! process, interleaved rounds, median GFLOP/s. `benches/torch_peers.py --gemm` times torch's on
//! the same shapes. docs/PERF.md records both against the machine's f32 peak.
//!
//!     cargo run --release --example gemm_backends            # every shape
//!     cargo run --release --example gemm_backends -- 1024 1024 512
use std::time::{Duration, Instant};

use svft::cpu::blas::{requested_system, Backend};
use svft::cpu::gemm::{gemm_on, Operand};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median seconds of `c = a b` (m x k times k x n) on `backend`, rounds of at least 50 ms.
fn time(backend: &Backend, m: usize, k: usize, n: usize, rounds: usize) -> f64 {
    let a: Vec<f32> = (0..m * k).map(|i| (i % 17) as f32 * 0.01).collect();
    let b: Vec<f32> = (0..k * n).map(|i| (i % 13) as f32 * 0.01).collect();
    let mut c = vec![0.0f32; m * n];
    gemm_on(backend, &mut c, Operand::n(&a, m, k), Operand::n(&b, k, n), false); // warm
    let mut per = Vec::new();
    for _ in 0..rounds {
        let (t0, mut reps) = (Instant::now(), 0u32);
        while t0.elapsed() < Duration::from_millis(50) {
            gemm_on(backend, &mut c, Operand::n(&a, m, k), Operand::n(&b, k, n), false);
            reps += 1;
        }
        per.push(t0.elapsed().as_secs_f64() / reps as f64);
    }
    median(per)
}

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let shapes: Vec<(usize, usize, usize)> = if args.len() == 3 {
        vec![(args[0], args[1], args[2])]
    } else {
        // (m, k, n): tokens x d_in x d_out (a dense layer's forward), its transposes' shapes,
        // and the factored products at r = min(d_out, d_in).
        let mut v = Vec::new();
        for n in [64, 512, 2048] {
            for (d_out, d_in) in [(1024, 1024), (2048, 1024), (1024, 2048)] {
                v.push((n, d_in, d_out));
            }
        }
        v
    };
    let mut backends = vec![Backend::Faer];
    match requested_system() {
        Ok(b) => backends.push(b),
        Err(why) => eprintln!("system BLAS: {why}; faer only"),
    }
    println!("{}", svft::cpu::device_name());
    for b in &backends {
        if let Backend::System(blas) = b {
            println!("blas: {} ({})", blas.library, svft::cpu::blas::config(blas).unwrap_or_default());
        }
    }
    println!(
        "{:>6} {:>6} {:>6}  {}",
        "m",
        "k",
        "n",
        backends.iter().map(|b| format!("{:>22}", b.name() + " GF/s")).collect::<String>()
    );
    for (m, k, n) in shapes {
        let flops = 2.0 * (m * k * n) as f64;
        // Interleave the backends: 5 rounds each, alternating, so drift hits both.
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); backends.len()];
        for _ in 0..5 {
            for (i, b) in backends.iter().enumerate() {
                times[i].push(time(b, m, k, n, 1));
            }
        }
        let cols: String = times.into_iter().map(|t| format!("{:>22.1}", flops / median(t) / 1e9)).collect();
        println!("{m:>6} {k:>6} {n:>6}  {cols}");
    }
}
