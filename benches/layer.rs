//! Criterion benches of the headline CPU cases: SVFT forward+backward (each plan) against
//! LoRA r=16 and the official layer's order on the same shapes, same library, same process.
//! `svft bench --json` reports the same cases with the GEMM floor and the ratios.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use std::time::Duration;

use svft::baseline::{LoraLayer, OfficialLayer};
use svft::cpu::CpuLayer;
use svft::rng::Rng;
use svft::svd::random_factors;
use svft::{LayerConfig, Pattern, Plan};

fn cases(c: &mut Criterion) {
    let d = 1024;
    let mut group = c.benchmark_group("fwd_bwd_1024x1024_banded2");
    group.sample_size(10).measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    let factors = random_factors(d, d, d, 1).unwrap();
    for n in [512usize, 2048] {
        let mut rng = Rng::new(2);
        let x = rng.normal_vec(n * d, 1.0);
        let gy = rng.normal_vec(n * d, 1.0);
        let (mut y, mut dx) = (vec![0.0; n * d], vec![0.0; n * d]);
        for plan in [Plan::Factored, Plan::Merged] {
            let config = LayerConfig { plan, ..LayerConfig::official(Pattern::Banded { d: 2 }) };
            let mut layer = CpuLayer::new(factors.clone(), &config, None).unwrap();
            let mut dm = vec![0.0; layer.omega().len()];
            group.bench_function(BenchmarkId::new(format!("svft_{plan}"), n), |b| {
                b.iter(|| {
                    layer.forward_into(&x, n, &mut y).unwrap();
                    layer.backward_into(&gy, n, &mut dx, &mut dm).unwrap();
                })
            });
        }
        let layer = CpuLayer::new(factors.clone(), &LayerConfig::official(Pattern::Banded { d: 2 }), None).unwrap();
        let mut official = OfficialLayer::new(&factors, layer.omega(), layer.coefficients(), 0.0);
        let mut dm = vec![0.0; layer.omega().len()];
        group.bench_function(BenchmarkId::new("official_order", n), |b| {
            b.iter(|| {
                official.forward(&x, n, &mut y);
                official.backward(&gy, n, &mut dx, &mut dm);
            })
        });
        let mut lora = LoraLayer::new(rng.normal_vec(d * d, 0.03), d, d, 16, 3);
        group.bench_function(BenchmarkId::new("lora_r16", n), |b| {
            b.iter(|| {
                lora.forward(&x, n, &mut y);
                lora.backward(&gy, n, &mut dx);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, cases);
criterion_main!(benches);
