//! Criterion benches of the headline CUDA cases (issue 4): bf16 4096x4096, banded:2, SVFT
//! forward+backward (the plan the FLOP model picks) against LoRA r=16 at n = 2048 and n = 16,
//! timed with CUDA events around criterion's iterations (`iter_custom`), so launch overhead is
//! counted but host synchronisation per iteration is not. Without a CUDA device (or without
//! the kernels in this build) it prints why and benches nothing. `svft bench --grid` reports
//! the same cases with the floor, the official order and the ratios.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use half::bf16;

use svft::bench::bench_factors;
use svft::bench::{events_ms, CudaShape};
use svft::cuda::{device_count, CudaLayer, Gpu};
use svft::{LayerConfig, Pattern};

fn cases(c: &mut Criterion) {
    let gpu = match device_count().and_then(|_| Gpu::new(0)) {
        Ok(gpu) => gpu,
        Err(e) => {
            println!("benches/cuda.rs: skipped: no usable CUDA device ({e})");
            return;
        }
    };
    let d = 4096;
    let stream = gpu.context().new_stream().expect("a stream");
    let factors = bench_factors(d, d, d, 1).expect("factors");
    let config = LayerConfig::official(Pattern::Banded { d: 2 });
    let mut layer = CudaLayer::<bf16>::new(gpu.clone(), stream.clone(), &factors, &config, None).expect("layer");
    let mut ctx = CudaShape::<bf16>::new(&gpu, stream.clone(), d, d, 2048, None, None).expect("bench buffers");
    let mut dm = stream.alloc_zeros::<f32>(layer.omega().len()).expect("dM");
    let mut dg = stream.alloc_zeros::<f32>(1).expect("dgamma");

    let mut group = c.benchmark_group(format!("cuda_bf16_{d}x{d}_banded2_fwd_bwd"));
    group.sample_size(20).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    for n in [16usize, 2048] {
        group.bench_function(BenchmarkId::new("svft", n), |b| {
            b.iter_custom(|iters| {
                let ms =
                    events_ms(&stream, iters, || ctx.svft_step(&mut layer, n, &mut dm, &mut dg)).expect("svft step");
                Duration::from_secs_f64(ms * 1e-3)
            })
        });
        group.bench_function(BenchmarkId::new("lora_r16", n), |b| {
            b.iter_custom(|iters| {
                let ms = events_ms(&stream, iters, || ctx.lora_step(n)).expect("LoRA step");
                Duration::from_secs_f64(ms * 1e-3)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, cases);
criterion_main!(benches);
