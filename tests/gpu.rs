//! The CUDA layer against the f64 reference: every pattern x plan x dtype x gate on odd shapes,
//! n = 1 and n large, outputs poisoned first (NaN fails); the demo's CUDA training against its
//! CPU training of the same seed. Without a CUDA device (or without compiled kernels) each test
//! prints why it skipped and passes; with SVFT_REQUIRE_GPU=1 a missing device fails instead
//! (scripts/gpu-run.sh sets it on the GPU machine).

mod common;

use std::sync::Arc;

use common::*;
use cudarc::driver::CudaSlice;
use svft::cuda::{device_count, CudaLayer, Dtype, Gpu, SddmmMode};
use svft::demo::{run_on, DemoModule, DemoOptions};
use svft::reference::{rel_err, Reference};
use svft::{Init, LayerConfig, Pattern, Plan};

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
    check_step(layer, f, bias, n, tol, what, false)
}

/// As [`check`]; with `saving`, through `forward_saving` / `backward_saved` with the caller's
/// poisoned `T`, and another saving forward on other inputs in between (nothing may leak).
fn check_step<T: Dtype>(
    layer: &mut CudaLayer<T>,
    f: &svft::svd::Factors,
    bias: Option<&[f32]>,
    n: usize,
    tol: f64,
    what: &str,
    saving: bool,
) -> Vec<f32> {
    let rnd = |x: Vec<f32>| -> Vec<f32> { x.into_iter().map(|v| T::from_f32(v).to_f32()).collect() };
    let x = rnd(randn(n * f.d_in, n as u64));
    let gy = rnd(randn(n * f.d_out, n as u64 + 1));
    let (xd, gd) = (upload(layer, &x), upload(layer, &gy));
    let mut yd = poisoned_dev(layer, n * f.d_out);
    let mut dxd = poisoned_dev(layer, n * f.d_in);
    let mut dmd: CudaSlice<f32> = layer.stream().clone_htod(&vec![f32::NAN; layer.omega().len()]).unwrap();
    let mut dgd: CudaSlice<f32> = layer.stream().clone_htod(&[f32::NAN]).unwrap();
    if saving {
        let r = layer.dims().r;
        let mut td = poisoned_dev(layer, n * r);
        layer.forward_saving(&xd.slice(..), n, &mut yd.slice_mut(..), &mut td.slice_mut(..)).unwrap();
        let (x2, mut y2, mut t2) =
            (upload(layer, &randn(n * f.d_in, 99)), poisoned_dev(layer, n * f.d_out), poisoned_dev(layer, n * r));
        layer.forward_saving(&x2.slice(..), n, &mut y2.slice_mut(..), &mut t2.slice_mut(..)).unwrap();
        let (mut dx, mut dm, mut dg) = (dxd.slice_mut(..), dmd.slice_mut(..), dgd.slice_mut(..));
        layer.backward_saved(&td.slice(..), &gd.slice(..), n, &mut dx, &mut dm, &mut dg).unwrap();
    } else {
        layer.forward(&xd.slice(..), n, &mut yd.slice_mut(..)).unwrap();
        let (mut dx, mut dm, mut dg) = (dxd.slice_mut(..), dmd.slice_mut(..), dgd.slice_mut(..));
        layer.backward(&gd.slice(..), n, &mut dx, &mut dm, &mut dg).unwrap();
    }
    let (y, dx) = (download(layer, &yd), download(layer, &dxd));
    let dm = layer.stream().clone_dtoh(&dmd).unwrap();
    let dgamma = layer.stream().clone_dtoh(&dgd).unwrap()[0];
    // The reference sees the factors as the device holds them (rounded to T).
    let mut fr = f.clone();
    fr.u = rnd(fr.u);
    fr.v = rnd(fr.v);
    let m = layer.coefficients().unwrap();
    let gate = layer.trainable_params() > layer.omega().len(); // the gate is a parameter
    let refl =
        Reference::new(&fr, layer.omega(), &m, layer.gamma().unwrap(), gate, bias.map(|b| rnd(b.to_vec())).as_deref());
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

/// The stateless pair (`forward_saving` / `backward_saved`, the PyTorch path) on every plan
/// choice (merged runs factored), both gates, a few patterns and token counts around the chunks,
/// each dtype, against the reference.
#[test]
fn saving_pair_matches_the_reference() {
    let Some(gpu) = gpu_or_skip("saving_pair_matches_the_reference") else { return };
    let stream = gpu.context().new_stream().unwrap();
    let (d_out, d_in, r) = SHAPES[0];
    let f = factors(d_out, d_in, r, 7);
    for spec in ["plain", "banded:2", "random:3:seed=5"] {
        for plan in [Plan::Factored, Plan::Merged, Plan::SmallN] {
            for gate in [false, true] {
                let config = LayerConfig { pattern: spec.parse().unwrap(), init: Init::Official, gate, plan, seed: 2 };
                let bias = gate.then(|| randn(d_out, 3));
                let what = format!("saving {d_out}x{d_in} r={r} {spec} {plan} gate={gate}");
                let mut l32 = CudaLayer::<f32>::new(gpu.clone(), stream.clone(), &f, &config, bias.as_deref()).unwrap();
                let mut l16 =
                    CudaLayer::<half::bf16>::new(gpu.clone(), stream.clone(), &f, &config, bias.as_deref()).unwrap();
                for n in [1, 17, 300] {
                    check_step(&mut l32, &f, bias.as_deref(), n, F32_TOL, &what, true);
                    check_step(&mut l16, &f, bias.as_deref(), n, 1e-2, &what, true);
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

/// The deterministic COO SDDMM's partials are sized once for the full token chunk and reused by
/// the last, shorter chunk, whose chunk count can be larger (2049 tokens make 63 chunks of 33
/// rows, 2048 make 64 of 32): n = 2049 + 2048 with chunks of 2049 writes 64 rows of partials.
/// On the virtual GPU a workspace one row short is a red-zone write (CUDA_ERROR_ILLEGAL_ADDRESS).
#[test]
fn deterministic_coo_partials_fit_every_chunk() {
    let Some(gpu) = gpu_or_skip("deterministic_coo_partials_fit_every_chunk") else { return };
    let stream = gpu.context().new_stream().unwrap();
    for (spec, f) in [("random:3:seed=5", factors(23, 19, 17, 3)), ("topk:2", factors(21, 21, 21, 3))] {
        let config = LayerConfig { plan: Plan::Factored, ..LayerConfig::official(spec.parse().unwrap()) };
        let mut layer = CudaLayer::<f32>::new(gpu.clone(), stream.clone(), &f, &config, None).unwrap();
        layer.set_sddmm_mode(SddmmMode::Deterministic);
        layer.set_token_chunk(Some(2049)).unwrap();
        check(&mut layer, &f, None, 2049 + 2048, F32_TOL, spec);
    }
    gpu.context().check_err().unwrap();
}

/// cudarc's per-buffer event tracking (a dozen-plus driver calls per launch) is off on every
/// path that opens a device through `Gpu::new`, Rust and C ABI alike.
#[test]
fn event_tracking_is_off() {
    let Some(gpu) = gpu_or_skip("event_tracking_is_off") else { return };
    assert!(!gpu.context().is_event_tracking());
}

/// One forward + backward on fixed inputs: (dX, dM, dgamma) on the host.
fn step<T: Dtype>(layer: &mut CudaLayer<T>, f: &svft::svd::Factors, n: usize) -> (Vec<f32>, Vec<f32>, f32) {
    let xd = upload(layer, &randn(n * f.d_in, 11));
    let gd = upload(layer, &randn(n * f.d_out, 12));
    let mut yd = poisoned_dev(layer, n * f.d_out);
    let mut dxd = poisoned_dev(layer, n * f.d_in);
    let mut dmd: CudaSlice<f32> = layer.stream().clone_htod(&vec![f32::NAN; layer.omega().len()]).unwrap();
    let mut dgd: CudaSlice<f32> = layer.stream().clone_htod(&[f32::NAN]).unwrap();
    layer.forward(&xd.slice(..), n, &mut yd.slice_mut(..)).unwrap();
    layer.backward(&gd.slice(..), n, &mut dxd.slice_mut(..), &mut dmd.slice_mut(..), &mut dgd.slice_mut(..)).unwrap();
    let dm = layer.stream().clone_dtoh(&dmd).unwrap();
    (download(layer, &dxd), dm, layer.stream().clone_dtoh(&dgd).unwrap()[0])
}

/// The fused band backward (`band_sddmm_apply_bwd_*`, default on) against the unfused pair on
/// the device: both match the reference, agree with each other, and in the deterministic mode
/// give the same dM bit for bit (same chunks, same per-entry sums). Shapes with n <= d_in (where
/// the fused pass runs) and one with n > d_in (where it must not change anything).
#[test]
fn fused_backward_matches_unfused() {
    let Some(gpu) = gpu_or_skip("fused_backward_matches_unfused") else { return };
    let stream = gpu.context().new_stream().unwrap();
    let f = factors(300, 200, 200, 4);
    for spec in ["plain", "banded:2", "banded:16"] {
        for mode in [SddmmMode::Fast, SddmmMode::Deterministic] {
            for n in [1, 77, 200, 301] {
                let config =
                    LayerConfig { plan: Plan::Factored, gate: true, ..LayerConfig::official(spec.parse().unwrap()) };
                let what = format!("{spec} {mode:?} n={n}");
                let mut layer = CudaLayer::<f32>::new(gpu.clone(), stream.clone(), &f, &config, None).unwrap();
                layer.set_gamma(0.4).unwrap();
                layer.set_sddmm_mode(mode);
                assert!(layer.fused_backward() && layer.uses_band_kernels(), "{what}: fused is the default");
                check(&mut layer, &f, None, n, F32_TOL, &format!("fused {what}"));
                let fused = step(&mut layer, &f, n);
                layer.set_fused_backward(false);
                check(&mut layer, &f, None, n, F32_TOL, &format!("unfused {what}"));
                let unfused = step(&mut layer, &f, n);
                let e_dx = rel_err(&fused.0, &wide(&unfused.0));
                let e_dm = rel_err(&fused.1, &wide(&unfused.1));
                assert!(e_dx < 1e-6 && e_dm < 1e-6, "{what}: fused vs unfused dX {e_dx:e}, dM {e_dm:e}");
                assert!((fused.2 - unfused.2).abs() <= 1e-5 * unfused.2.abs().max(1e-6), "{what}: dgamma");
                if mode == SddmmMode::Deterministic {
                    assert!(
                        fused.1.iter().zip(&unfused.1).all(|(a, b)| a.to_bits() == b.to_bits())
                            && fused.2.to_bits() == unfused.2.to_bits(),
                        "{what}: deterministic dM/dgamma differ between fused and unfused"
                    );
                }
                let same_dx = fused.0.iter().zip(&unfused.0).all(|(a, b)| a.to_bits() == b.to_bits());
                println!("{what}: dX bitwise equal fused/unfused: {same_dx}");
            }
        }
    }
    // bf16: the fused AC is rounded once, as the unfused one.
    let config = LayerConfig { plan: Plan::Factored, ..LayerConfig::official("banded:16".parse().unwrap()) };
    let mut layer = CudaLayer::<half::bf16>::new(gpu.clone(), stream.clone(), &f, &config, None).unwrap();
    let fused = step(&mut layer, &f, 150);
    layer.set_fused_backward(false);
    let unfused = step(&mut layer, &f, 150);
    let e = rel_err(&fused.0, &wide(&unfused.0));
    assert!(e < 1e-2, "bf16 banded:16 n=150: fused vs unfused dX {e:e}");
}

/// The factored plan in token chunks (`set_token_chunk`) against the reference and against
/// the whole batch in one pass, on a 300 x 200 layer: n <= d_in (the core on the activations
/// both ways: fused band, unfused band, CSR), d_in < n <= d_out (forward on the activations,
/// backward folded into V), n > d_out (both folded, only A chunked), a last chunk of one
/// token; the deterministic mode bitwise reproducible per chunk size; the scratch shrinks.
#[test]
fn token_chunks_match_one_pass() {
    let Some(gpu) = gpu_or_skip("token_chunks_match_one_pass") else { return };
    let stream = gpu.context().new_stream().unwrap();
    let f = factors(300, 200, 200, 4);
    for spec in ["plain", "banded:2", "banded:40", "random:8:seed=1"] {
        for mode in [SddmmMode::Fast, SddmmMode::Deterministic] {
            for (chunk, n) in [(37, 100), (64, 200), (37, 250), (50, 201), (100, 301)] {
                let config =
                    LayerConfig { plan: Plan::Factored, gate: true, ..LayerConfig::official(spec.parse().unwrap()) };
                let what = format!("{spec} {mode:?} chunk={chunk} n={n}");
                let mut layer = CudaLayer::<f32>::new(gpu.clone(), stream.clone(), &f, &config, None).unwrap();
                layer.set_gamma(0.4).unwrap();
                layer.set_sddmm_mode(mode);
                let whole = step(&mut layer, &f, n);
                let whole_bytes = layer.workspace_bytes();
                let mut layer = CudaLayer::<f32>::new(gpu.clone(), stream.clone(), &f, &config, None).unwrap();
                layer.set_gamma(0.4).unwrap();
                layer.set_sddmm_mode(mode);
                layer.set_token_chunk(Some(chunk)).unwrap();
                assert_eq!(layer.token_chunk(), chunk);
                let a = check(&mut layer, &f, None, n, F32_TOL, &what);
                assert!(layer.workspace_bytes() < whole_bytes, "{what}: chunks did not shrink the scratch");
                let b = check(&mut layer, &f, None, n, F32_TOL, &what);
                if mode == SddmmMode::Deterministic {
                    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "{what}: dM not reproducible");
                }
                let chunked = step(&mut layer, &f, n);
                let e_dx = rel_err(&chunked.0, &wide(&whole.0));
                let e_dm = rel_err(&chunked.1, &wide(&whole.1));
                assert!(e_dx < 1e-6 && e_dm < 1e-5, "{what}: chunked vs whole dX {e_dx:e}, dM {e_dm:e}");
                assert!((chunked.2 - whole.2).abs() <= 1e-4 * whole.2.abs().max(1e-6), "{what}: dgamma");
            }
        }
    }
    // bf16, and the chunk size checked at the door.
    let config = LayerConfig { plan: Plan::Factored, ..LayerConfig::official("banded:16".parse().unwrap()) };
    let mut layer = CudaLayer::<half::bf16>::new(gpu.clone(), stream.clone(), &f, &config, None).unwrap();
    assert!(layer.set_token_chunk(Some(0)).is_err());
    assert_eq!(layer.token_chunk(), svft::cuda::default_token_chunk(200));
    layer.set_token_chunk(Some(64)).unwrap();
    check(&mut layer, &f, None, 257, 1e-2, "bf16 banded:16 chunk=64");
    layer.set_token_chunk(None).unwrap();
    check(&mut layer, &f, None, 257, 1e-2, "bf16 banded:16 default chunk");
}

/// Parameters handed over in device memory (`set_coefficients_device`, `set_gamma_device`: no
/// host round trip) give the step the host setters give: the same M bit for bit, g within an
/// ulp (device expf), gamma read back exactly; both forget the saved forward; wrong lengths
/// are errors.
#[test]
fn device_parameters_match_host_parameters() {
    let Some(gpu) = gpu_or_skip("device_parameters_match_host_parameters") else { return };
    let stream = gpu.context().new_stream().unwrap();
    let f = factors(150, 100, 100, 6);
    for spec in ["banded:2", "random:5:seed=2"] {
        let config = LayerConfig { plan: Plan::Factored, gate: true, ..LayerConfig::official(spec.parse().unwrap()) };
        let mut host = CudaLayer::<f32>::new(gpu.clone(), stream.clone(), &f, &config, None).unwrap();
        let mut dev = CudaLayer::<f32>::new(gpu.clone(), stream.clone(), &f, &config, None).unwrap();
        let k = host.omega().len();
        let m: Vec<f32> = randn(k, 8).iter().map(|x| 0.2 * x).collect();
        host.set_coefficients(&m).unwrap();
        host.set_gamma(-0.6).unwrap();
        let m_dev = stream.clone_htod(&m).unwrap();
        let gamma_dev = stream.clone_htod(&[-0.6f32]).unwrap();
        dev.set_coefficients(&vec![0.0; k]).unwrap(); // overwritten below
        let a = step(&mut host, &f, 90);
        let _ = step(&mut dev, &f, 90);
        dev.set_coefficients_device(&m_dev.slice(..)).unwrap();
        dev.set_gamma_device(&gamma_dev.slice(..)).unwrap();
        let mut dm = stream.alloc_zeros::<f32>(k).unwrap();
        let mut dg = stream.alloc_zeros::<f32>(1).unwrap();
        let gy = upload(&dev, &randn(90 * 150, 1));
        let mut dx = poisoned_dev(&dev, 90 * 100);
        let no_forward =
            dev.backward(&gy.slice(..), 90, &mut dx.slice_mut(..), &mut dm.slice_mut(..), &mut dg.slice_mut(..));
        assert!(no_forward.is_err(), "{spec}: new parameters must forget the saved forward");
        let b = step(&mut dev, &f, 90);
        assert_eq!(dev.coefficients().unwrap(), m, "{spec}: M from the device");
        assert_eq!(dev.gamma().unwrap(), -0.6, "{spec}: gamma read back from the device");
        let (gh, gd) = (host.gate_value().unwrap(), dev.gate_value().unwrap());
        assert!((gh - gd).abs() <= 2.0 * f32::EPSILON * gh, "{spec}: g {gd} vs {gh}");
        assert!(rel_err(&b.0, &wide(&a.0)) < 1e-6 && rel_err(&b.1, &wide(&a.1)) < 1e-6, "{spec}: dX / dM");
        assert!((b.2 - a.2).abs() <= 1e-5 * a.2.abs().max(1e-6), "{spec}: dgamma {} vs {}", b.2, a.2);
        // Host gamma again: the device copy follows.
        dev.set_gamma(0.25).unwrap();
        assert_eq!((dev.gamma().unwrap(), dev.gate_value().unwrap()), (0.25, svft::config::gate_value(true, 0.25)));
        assert!(dev.set_coefficients_device(&m_dev.slice(..k - 1)).is_err());
        assert!(dev.set_gamma_device(&gamma_dev.slice(..0)).is_err());
    }
}

/// `merge_into` writes `U C V^T` (band and CSR patterns, gate on, every dtype) as the f64
/// reference forms it from the factors the device holds; a short buffer is an error.
fn merge_matches<T: Dtype>(gpu: &Arc<Gpu>, tol: f64, dtype: &str) {
    let stream = gpu.context().new_stream().unwrap();
    let f = factors(37, 23, 19, 4);
    for spec in ["banded:2", "random:3:seed=5"] {
        let config = LayerConfig { gate: true, ..LayerConfig::official(spec.parse().unwrap()) };
        let mut layer = CudaLayer::<T>::new(gpu.clone(), stream.clone(), &f, &config, None).unwrap();
        let m: Vec<f32> = randn(layer.omega().len(), 9).iter().map(|x| 0.3 * x).collect();
        layer.set_coefficients(&m).unwrap();
        layer.set_gamma(0.7).unwrap();
        let mut w = poisoned_dev(&layer, f.d_out * f.d_in);
        layer.merge_into(&mut w.slice_mut(..)).unwrap();
        let mut fr = f.clone();
        let rnd = |x: Vec<f32>| -> Vec<f32> { x.into_iter().map(|v| T::from_f32(v).to_f32()).collect() };
        fr.u = rnd(fr.u);
        fr.v = rnd(fr.v);
        let want = Reference::new(&fr, layer.omega(), &m, 0.7, true, None).weight();
        let e = rel_err(&download(&layer, &w), &want);
        assert!(e < tol, "{dtype} {spec}: merged W relative error {e} (tol {tol})");
        assert!(layer.merge_into(&mut w.slice_mut(..f.d_out * f.d_in - 1)).is_err(), "{dtype} {spec}: short W");
    }
}

#[test]
fn merge_into_matches_the_reference() {
    let Some(gpu) = gpu_or_skip("merge_into_matches_the_reference") else { return };
    merge_matches::<f32>(&gpu, F32_TOL, "f32");
    merge_matches::<half::bf16>(&gpu, 1e-2, "bf16");
    merge_matches::<half::f16>(&gpu, 1e-2, "f16");
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

/// Relative difference of two losses.
fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / a.abs().max(b.abs()).max(1e-30)
}

#[test]
fn cuda_demo_tracks_the_cpu_demo() {
    // A tiny stack: one square branch and one MLP branch, odd widths, ranks not multiples of 8.
    let modules: Vec<DemoModule> = [(23, 23), (57, 23), (23, 57)]
        .iter()
        .enumerate()
        .map(|(i, &(o, n))| DemoModule::normalised(format!("m{i}"), factors(o, n, o.min(n), 10 + i as u64)))
        .collect();
    let options = DemoOptions { steps: 40, tokens: 33, banded: 2, seed: 3, ..Default::default() };
    // The CPU half runs everywhere, so the settings are known to train before any GPU compares.
    let cpu = run_on(None, &modules, "test", &options, &mut |_, _, _| {}).unwrap();
    for c in &cpu.results {
        assert!(c.final_loss < c.initial_loss, "cpu {}: {} -> {}", c.name, c.initial_loss, c.final_loss);
    }
    let Some(gpu) = gpu_or_skip("cuda_demo_tracks_the_cpu_demo") else { return };
    let dev = run_on(Some(&gpu), &modules, "test", &options, &mut |_, _, _| {}).unwrap();
    assert_eq!((cpu.backend.as_str(), dev.backend.as_str()), ("cpu", "cuda"));
    assert_eq!(dev.device, gpu.name());
    assert!(dev.to_table().contains("layers on device, stack glue on host"), "{}", dev.to_table());
    assert_eq!(cpu.results.len(), 3);
    assert_eq!(dev.results.len(), 3);
    // f32 on both backends, summation orders differ (faer vs cuBLAS): step 0 sees the same
    // weights and data, and Adam's first step is lr * sign(g), so the curves agree to 1e-3
    // early; later steps may drift a little, so 1e-2 there and on the held-out losses.
    const EARLY_TOL: f64 = 1e-3;
    const LATE_TOL: f64 = 1e-2;
    for (c, g) in cpu.results.iter().zip(&dev.results) {
        assert_eq!(c.name, g.name);
        assert_eq!(c.trainable_params, g.trainable_params, "{}", g.name);
        assert_eq!(g.losses.len(), options.steps, "{}", g.name);
        assert!(g.losses.iter().chain([&g.initial_loss, &g.final_loss]).all(|l| l.is_finite()), "{}", g.name);
        for (step, (&lc, &lg)) in c.losses.iter().zip(&g.losses).enumerate() {
            let tol = if step < 10 { EARLY_TOL } else { LATE_TOL };
            assert!(rel(lc, lg) <= tol, "{} step {step}: cpu {lc} cuda {lg} (tol {tol})", g.name);
        }
        let (i0, i1) = (c.initial_loss, g.initial_loss);
        assert!(rel(i0, i1) <= EARLY_TOL, "{}: initial {i0} vs {i1}", g.name);
        assert!(rel(c.final_loss, g.final_loss) <= LATE_TOL, "{}: final {} vs {}", g.name, c.final_loss, g.final_loss);
        assert!(g.final_loss < g.initial_loss, "{}: {} -> {}", g.name, g.initial_loss, g.final_loss);
        assert!(g.frozen_bytes > 0 && g.saved_activation_bytes > 0 && g.ms_per_step > 0.0, "{}", g.name);
    }
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

#[test]
fn calibration_measures_every_plan_and_auto_follows_it() {
    let Some(gpu) = gpu_or_skip("calibration_measures_every_plan_and_auto_follows_it") else { return };
    let stream = gpu.context().new_stream().unwrap();
    let f = factors(300, 200, 200, 3);
    let config = LayerConfig::official("banded:2".parse().unwrap());
    let mut layer = CudaLayer::<half::bf16>::new(gpu, stream, &f, &config, None).unwrap();
    let options = svft::calibrate::CalibrationOptions {
        tokens: vec![1, 16, 300],
        budget: std::time::Duration::from_millis(5),
        cache: None,
    };
    let table = layer.calibrate(&options).unwrap().clone();
    for p in table.points() {
        let plans: Vec<svft::ExecPlan> = p.ms.iter().map(|m| m.0).collect();
        let small = p.n <= svft::plan::SMALL_N_MAX;
        assert_eq!(plans.contains(&svft::ExecPlan::SmallN), small, "n = {}: {plans:?}", p.n);
        assert_eq!(plans.len(), 2 + usize::from(small));
        assert!(p.ms.iter().all(|m| m.1.is_finite() && m.1 > 0.0));
        assert_eq!(Some(layer.plan_for(p.n)), p.best(), "auto picks the measured winner at n = {}", p.n);
    }
    assert_eq!(layer.config().plan, Plan::Auto, "the configured plan is restored");
    // Whatever auto picks now still computes the layer.
    for n in [1, 16, 300] {
        check(&mut layer, &f, None, n, 1e-2, "calibrated bf16");
    }
}
