//! The CUDA bench on a GPU: a grid row has every field, consistent, and the memory model
//! (`svft::memory`) counts exactly the buffers the CUDA layer allocates. Without a usable
//! device each test prints why it skipped and passes; with SVFT_REQUIRE_GPU=1 a missing GPU
//! fails instead.

mod common;

use std::time::Duration;

use common::gpu_or_skip;
use svft::bench::{bench_factors, fixed_plans};
use svft::bench::{copy_bandwidth_gb_per_s, CudaShape};
use svft::cuda::CudaLayer;
use svft::memory::{self, Shape};
use svft::{ExecPlan, LayerConfig, Pattern, Plan};

#[test]
fn grid_row_fields_on_the_device() {
    let Some(gpu) = gpu_or_skip("grid_row_fields_on_the_device") else { return };
    let stream = gpu.context().new_stream().unwrap();
    let copy = copy_bandwidth_gb_per_s(&stream).unwrap();
    if gpu.is_virtual() {
        // Host memcpy behind the CUDA API: a figure, not a speed; only its sanity is checked.
        println!("virtual device: timings meaningless (copy {copy:.1} GB/s)");
        assert!(copy > 0.0 && copy.is_finite(), "copy bandwidth {copy} GB/s");
    } else {
        assert!(copy > 10.0 && copy < 1e5, "copy bandwidth {copy} GB/s");
    }
    let (d_out, d_in) = (192, 128);
    let factors = bench_factors(d_out, d_in, d_in, 1).unwrap();
    let mut ctx = CudaShape::<half::bf16>::new(&gpu, stream.clone(), d_out, d_in, 300, Some(copy), None).unwrap();
    let config = LayerConfig::official(Pattern::Banded { d: 2 });
    let mut layer = CudaLayer::<half::bf16>::new(gpu.clone(), stream.clone(), &factors, &config, None).unwrap();
    for n in [16, 300] {
        let row = ctx.row(&mut layer, n, Plan::Auto, &fixed_plans(n, true), Duration::from_millis(5)).unwrap();
        let v = row.to_json();
        let timed: Vec<&str> = v["plan_ms"].as_object().unwrap().keys().map(String::as_str).collect();
        if n <= 64 {
            assert_eq!(timed, ["factored", "merged", "small-n"], "{v}");
            let frac = v["bandwidth_fraction"].as_f64().unwrap();
            assert!(frac > 0.0 && frac.is_finite(), "{v}");
            assert_eq!(v["bytes_floor"].as_u64(), Some(2 * (192 + 128) * 128 * 2));
        } else {
            assert_eq!(timed, ["factored", "merged"], "{v}");
            assert!(v.get("bandwidth_fraction").is_none() && v.get("bytes_floor").is_none(), "{v}");
        }
        let best = row.best_fixed_plan().unwrap().1;
        assert!(row.plan_ms.iter().all(|p| p.1 >= best && p.1.is_finite() && p.1 > 0.0), "{v}");
        assert_eq!(row.official_fwd_bwd_ms, row.plan_ms.iter().find(|p| p.0 == ExecPlan::Merged).unwrap().1);
        for key in [
            "svft_fwd_bwd_ms",
            "gemm_floor_ms",
            "lora_fwd_bwd_ms",
            "dense_fwd_bwd_ms",
            "ratio_to_dense",
            "copy_gb_per_s",
        ] {
            assert!(v[key].as_f64().is_some_and(|x| x.is_finite() && x > 0.0), "{key}: {v}");
        }
        assert_eq!(v["dtype"], "bf16");
    }
}

/// A fresh layer run once on one plan holds exactly the model's workspace + saved bytes, and
/// its persistent bytes are the model's less the gate (gamma lives on the host).
#[test]
fn memory_model_matches_the_cuda_layer() {
    let Some(gpu) = gpu_or_skip("memory_model_matches_the_cuda_layer") else { return };
    let stream = gpu.context().new_stream().unwrap();
    for (d_out, d_in, pattern) in [(96, 64, "banded:2"), (64, 96, "random:3"), (80, 80, "plain")] {
        let factors = bench_factors(d_out, d_in, d_out.min(d_in), 1).unwrap();
        let mut ctx = CudaShape::<f32>::new(&gpu, stream.clone(), d_out, d_in, 200, None, None).unwrap();
        for plan in [Plan::Factored, Plan::Merged, Plan::SmallN] {
            // Token chunks of 50 (below every d), 90 (above some), and the default (above n).
            for (n, chunk) in [(7, None), (200, None), (200, Some(50)), (200, Some(90))] {
                let config = LayerConfig { plan, ..LayerConfig::official(pattern.parse().unwrap()) };
                let mut layer = CudaLayer::<f32>::new(gpu.clone(), stream.clone(), &factors, &config, None).unwrap();
                layer.set_token_chunk(chunk).unwrap();
                let k = layer.omega().len();
                let mut dm = stream.alloc_zeros::<f32>(k).unwrap();
                let mut dg = stream.alloc_zeros::<f32>(1).unwrap();
                ctx.svft_step(&mut layer, n, &mut dm, &mut dg).unwrap();
                let shape = Shape { d_out, d_in, r: d_out.min(d_in), nnz: k, n, act: 4 };
                let model = memory::svft_chunked(&shape, layer.plan_for(n), layer.token_chunk());
                if chunk.is_none() {
                    assert_eq!(model, memory::svft(&shape, layer.plan_for(n)));
                }
                let what = format!("{d_out}x{d_in} {pattern} {plan} n={n} chunk={chunk:?}");
                assert_eq!(layer.workspace_bytes(), model.workspace + model.saved, "{what}");
                assert_eq!(layer.persistent_bytes() + 4, model.persistent, "{what}");
            }
        }
    }
}
