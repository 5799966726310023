//! The CUDA layer against the f64 reference: every pattern x plan x dtype x gate on odd shapes,
//! n = 1 and n large, outputs poisoned first (NaN fails). Without a CUDA device (or without
//! compiled kernels) each test prints why it skipped and passes; with SVFT_REQUIRE_GPU=1 a
//! missing device fails instead (scripts/gpu-run.sh sets it on the GPU machine).

mod common;

use std::sync::Arc;

use common::*;
use cudarc::driver::CudaSlice;
use svft::cuda::{device_count, CudaLayer, Dtype, Gpu, SddmmMode};
use svft::reference::{rel_err, Reference};
use svft::{Init, LayerConfig, Pattern, Plan};

fn gpu_or_skip(test: &str) -> Option<Arc<Gpu>> {
    match device_count().and_then(|_| Gpu::new(0)) {
        Ok(gpu) => Some(gpu),
        Err(e) if std::env::var("SVFT_REQUIRE_GPU").as_deref() == Ok("1") => panic!("{test}: no GPU: {e}"),
        Err(e) => {
            println!("{test}: skipped: no CUDA device ({e})");
            None
        }
    }
}

fn upload<T: Dtype>(layer: &CudaLayer<T>, host: &[f32]) -> CudaSlice<T> {
    let v: Vec<T> = host.iter().map(|&x| T::from_f32(x)).collect();
    layer.stream().clone_htod(&v).unwrap()
}

fn poisoned_dev<T: Dtype>(layer: &CudaLayer<T>, len: usize) -> CudaSlice<T> {
    upload(layer, &vec![f32::NAN; len])
}

fn download<T: Dtype>(layer: &CudaLayer<T>, dev: &CudaSlice<T>) -> Vec<f32> {
    layer.stream().clone_dtoh(dev).unwrap().into_iter().map(T::to_f32).collect()
}

/// Runs forward + backward on the device and compares with the reference; returns dM.
fn check<T: Dtype>(
    layer: &mut CudaLayer<T>,
    f: &svft::svd::Factors,
    bias: Option<&[f32]>,
    n: usize,
    tol: f64,
    what: &str,
) -> Vec<f32> {
    let rnd = |x: Vec<f32>| -> Vec<f32> { x.into_iter().map(|v| T::from_f32(v).to_f32()).collect() };
    let x = rnd(randn(n * f.d_in, n as u64));
    let gy = rnd(randn(n * f.d_out, n as u64 + 1));
    let (xd, gd) = (upload(layer, &x), upload(layer, &gy));
    let mut yd = poisoned_dev(layer, n * f.d_out);
    let mut dxd = poisoned_dev(layer, n * f.d_in);
    let mut dmd: CudaSlice<f32> = layer.stream().clone_htod(&vec![f32::NAN; layer.omega().len()]).unwrap();
    let mut dgd: CudaSlice<f32> = layer.stream().clone_htod(&[f32::NAN]).unwrap();
    layer.forward(&xd.slice(..), n, &mut yd.slice_mut(..)).unwrap();
    layer.backward(&gd.slice(..), n, &mut dxd.slice_mut(..), &mut dmd.slice_mut(..), &mut dgd.slice_mut(..)).unwrap();
    let (y, dx) = (download(layer, &yd), download(layer, &dxd));
    let dm = layer.stream().clone_dtoh(&dmd).unwrap();
    let dgamma = layer.stream().clone_dtoh(&dgd).unwrap()[0];
    // The reference sees the factors as the device holds them (rounded to T).
    let mut fr = f.clone();
    fr.u = rnd(fr.u);
    fr.v = rnd(fr.v);
    let m = layer.coefficients().unwrap();
    let gate = layer.trainable_params() > layer.omega().len(); // the gate is a parameter
    let refl = Reference::new(&fr, layer.omega(), &m, layer.gamma(), gate, bias.map(|b| rnd(b.to_vec())).as_deref());
    let (xw, gw) = (wide(&x), wide(&gy));
    let (dx_ref, dm_ref, dgamma_ref) = refl.backward(&xw, &gw, n);
    let plan = layer.plan_for(n);
    let e = [rel_err(&y, &refl.forward(&xw, n)), rel_err(&dx, &dx_ref), rel_err(&dm, &dm_ref)];
    assert!(e.iter().all(|&e| e < tol), "{what} n={n} {plan}: errors Y/dX/dM {e:?} (tol {tol})");
    let scale: f64 =
        refl.g() * (1.0 - refl.g()) * dm_ref.iter().zip(&refl.m).map(|(d, m)| (d / refl.g() * m).abs()).sum::<f64>();
    assert!(
        dgamma.is_finite()
            && (dgamma as f64 - dgamma_ref).abs() <= tol * scale.max(1e-30) + if gate { 0.0 } else { 1e-30 },
        "{what}: dgamma {dgamma} vs {dgamma_ref}"
    );
    dm
}

fn every_case<T: Dtype>(gpu: &Arc<Gpu>, tol: f64, dtype: &str) {
    let stream = gpu.context().new_stream().unwrap();
    for &(d_out, d_in, r) in &SHAPES {
        let f = factors(d_out, d_in, r, 7);
        for spec in ["plain", "banded:2", "random:3:seed=5", "topk:2:official"] {
            let pattern: Pattern = spec.parse().unwrap();
            if pattern.omega(&f).is_err() {
                continue;
            }
            for plan in [Plan::Factored, Plan::Merged, Plan::SmallN] {
                // SmallN: token counts around its 16-token chunks, and beyond its intended range.
                let ns: &[usize] = if plan == Plan::SmallN { &[1, 5, 16, 17, 40, 300] } else { &[1, 30, 300, 2049] };
                for gate in [false, true] {
                    let config = LayerConfig { pattern, init: Init::Official, gate, plan, seed: 2 };
                    let bias = gate.then(|| randn(d_out, 3));
                    let mut layer =
                        CudaLayer::<T>::new(gpu.clone(), stream.clone(), &f, &config, bias.as_deref()).unwrap();
                    let what = format!("{dtype} {d_out}x{d_in} r={r} {spec} {plan} gate={gate}");
                    for &n in ns {
                        check(&mut layer, &f, bias.as_deref(), n, tol, &what);
                    }
                }
            }
        }
    }
}

#[test]
fn f32_layer_matches_the_reference() {
    if let Some(gpu) = gpu_or_skip("f32_layer_matches_the_reference") {
        every_case::<f32>(&gpu, F32_TOL, "f32");
    }
}

#[test]
fn bf16_and_f16_layers_match_the_reference() {
    if let Some(gpu) = gpu_or_skip("bf16_and_f16_layers_match_the_reference") {
        every_case::<half::bf16>(&gpu, 1e-2, "bf16");
        every_case::<half::f16>(&gpu, 1e-2, "f16");
    }
}

#[test]
fn deterministic_sddmm_is_bitwise_reproducible() {
    let Some(gpu) = gpu_or_skip("deterministic_sddmm_is_bitwise_reproducible") else { return };
    let stream = gpu.context().new_stream().unwrap();
    let f = factors(300, 200, 200, 1);
    for spec in ["banded:16", "random:8:seed=1"] {
        let config = LayerConfig { plan: Plan::Factored, ..LayerConfig::official(spec.parse().unwrap()) };
        let mut layer = CudaLayer::<f32>::new(gpu.clone(), stream.clone(), &f, &config, None).unwrap();
        layer.set_sddmm_mode(SddmmMode::Deterministic);
        let a = check(&mut layer, &f, None, 4097, F32_TOL, spec);
        let b = check(&mut layer, &f, None, 4097, F32_TOL, spec);
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{spec}: deterministic dM differs run to run"
        );
    }
}

#[test]
fn small_n_is_bitwise_reproducible_and_allocates_once() {
    let Some(gpu) = gpu_or_skip("small_n_is_bitwise_reproducible_and_allocates_once") else { return };
    let stream = gpu.context().new_stream().unwrap();
    // Shapes large enough for several splits and staging tiles of the skinny kernels.
    let f = factors(700, 500, 300, 3);
    for spec in ["banded:16", "random:8:seed=1"] {
        let config = LayerConfig { plan: Plan::SmallN, ..LayerConfig::official(spec.parse().unwrap()) };
        let mut layer = CudaLayer::<half::bf16>::new(gpu.clone(), stream.clone(), &f, &config, None).unwrap();
        layer.set_sddmm_mode(SddmmMode::Deterministic);
        for n in [1, 16, 40] {
            let a = check(&mut layer, &f, None, n, 1e-2, spec);
            let held = layer.workspace_bytes();
            let b = check(&mut layer, &f, None, n, 1e-2, spec);
            assert_eq!(layer.workspace_bytes(), held, "{spec} n={n}: the second step grew the workspace");
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{spec} n={n}: small-n dM differs run to run"
            );
        }
    }
}

#[test]
fn bad_device_inputs_are_errors() {
    let Some(gpu) = gpu_or_skip("bad_device_inputs_are_errors") else { return };
    let stream = gpu.context().new_stream().unwrap();
    let f = factors(37, 23, 23, 1);
    let mut layer = CudaLayer::<f32>::new(gpu, stream, &f, &LayerConfig::default(), None).unwrap();
    let x = upload(&layer, &randn(3 * 23, 1));
    let mut y = poisoned_dev(&layer, 3 * 37);
    assert!(matches!(layer.forward(&x.slice(..), 4, &mut y.slice_mut(..)), Err(svft::Error::Shape { .. })));
    let (mut dx, mut dm, mut dg) =
        (poisoned_dev(&layer, 69), poisoned_dev::<f32>(&layer, 23), poisoned_dev::<f32>(&layer, 1));
    assert!(matches!(
        layer.backward(&y.slice(..), 3, &mut dx.slice_mut(..), &mut dm.slice_mut(..), &mut dg.slice_mut(..)),
        Err(svft::Error::NoForward(_))
    ));
    assert!(layer.set_coefficients(&[f32::NAN; 23]).is_err());
}

#[test]
fn probe_explains_a_missing_device() {
    // Runs everywhere: either a device is found, or the reason names what is missing.
    match device_count() {
        Ok(n) => assert!(n > 0),
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("nvcc") || msg.contains("driver") || msg.contains("device"), "{msg}");
            println!("probe_explains_a_missing_device: no GPU here: {msg}");
        }
    }
}

#[test]
fn cusolver_svd_matches_the_cpu_svd() {
    let Some(gpu) = gpu_or_skip("cusolver_svd_matches_the_cpu_svd") else { return };
    let stream = gpu.context().new_stream().unwrap();
    for &(d_out, d_in) in &[(37usize, 23usize), (19, 41), (300, 300)] {
        let w = randn(d_out * d_in, 5);
        let dev = svft::cuda::thin_svd_cuda(&stream, &w, d_out, d_in, None).unwrap();
        assert!(dev.residual < 1e-5, "{d_out}x{d_in}: residual {}", dev.residual);
        let host = svft::svd::thin_svd(&w, d_out, d_in, None).unwrap();
        let err = rel_err(&dev.factors.s, &wide(&host.factors.s));
        assert!(err < 1e-5, "{d_out}x{d_in}: singular values differ by {err}");
        let cut = svft::cuda::thin_svd_cuda(&stream, &w, d_out, d_in, Some(5)).unwrap();
        assert_eq!(cut.factors.r, 5);
        assert!(svft::cuda::thin_svd_cuda(&stream, &w, d_out, d_in, Some(0)).is_err());
    }
}
