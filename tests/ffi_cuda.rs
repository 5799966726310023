//! The C ABI's CUDA backend, called through the exported `svft_*` functions with device
//! buffers that this test allocates with cudarc (as a C or PyTorch caller would with
//! cudaMalloc), compared with the f64 reference.
//!
//! Everywhere: `svft_backend_available(CUDA)` reports the device probe with its reason, and
//! the checks that need no device (dtype, NULL, alignment, shapes, patterns) fail alike on
//! every machine. Without a device, creation is `CUDA_UNAVAILABLE` naming the probe's reason
//! and the GPU tests print "skipped: no CUDA device (...)" and pass (SVFT_REQUIRE_GPU=1 makes
//! a missing device fail instead, as in tests/gpu.rs).
//!
//! With a device: create/forward/backward/merge/factors/coefficients per dtype against the
//! reference, with the caller's stream kept busy so that a missing event join in either
//! direction shows as wrong numbers; host, pinned, managed and misaligned pointers; dtype
//! mismatches; caller memory intact after the layer is destroyed; the current context restored.

mod common;
use common::last_error;

use std::ffi::{c_void, CString};
use std::sync::Arc;

use common::{device_or_skip, dptr, randn, upload, wide};
use cudarc::driver::{sys, CudaContext, CudaSlice, CudaStream, DeviceRepr};
use svft::cuda::{device_count, Dtype};
use svft::ffi::*;
use svft::reference::{rel_err, Reference};
use svft::svd::thin_svd;
use svft::{Omega, Pattern};

const CUDA: i32 = SvftBackend::Cuda as i32;
const CPU: i32 = SvftBackend::Cpu as i32;

fn probe_reason() -> Option<String> {
    device_count().err().map(|e| match e {
        svft::Error::Cuda(m) => m,
        other => other.to_string(),
    })
}

fn cuda_available() -> bool {
    let mut flag = false;
    // SAFETY: a valid bool.
    assert_eq!(unsafe { svft_backend_available(CUDA, &mut flag) }, SvftStatus::Ok);
    flag
}

/// `svft_layer_from_weight` with the usual extras (gate on, seed 1).
#[allow(clippy::too_many_arguments)]
fn from_weight(
    backend: i32,
    w: *const c_void,
    dtype: i32,
    w_len: usize,
    d_out: usize,
    d_in: usize,
    pattern: &str,
    bias: *const c_void,
    bias_len: usize,
    out: &mut *mut SvftLayer,
) -> SvftStatus {
    let pattern = CString::new(pattern).unwrap();
    // SAFETY: the test passes pointers that are either valid or rejected before use.
    unsafe {
        svft_layer_from_weight(
            backend,
            w,
            dtype,
            w_len,
            d_out,
            d_in,
            0,
            pattern.as_ptr(),
            1,
            true,
            1,
            bias,
            bias_len,
            out,
        )
    }
}

#[test]
fn backend_available_reports_the_probe() {
    let flag = cuda_available();
    match probe_reason() {
        Some(reason) => {
            assert!(!flag, "no device, yet CUDA reported available");
            let msg = last_error();
            assert!(msg.contains(&reason), "last error {msg:?} does not name the probe's reason {reason:?}");
        }
        None => {
            assert!(flag, "a device is there, yet CUDA reported unavailable: {}", last_error());
            assert_eq!(last_error(), "");
        }
    }
    let mut flag = false;
    // SAFETY: a valid bool.
    assert_eq!(unsafe { svft_backend_available(CPU, &mut flag) }, SvftStatus::Ok);
    assert!(flag);
}

/// An empty folder for LD_LIBRARY_PATH: the loader then finds no CUDA library at all (unless
/// the machine has a real driver installed system-wide).
fn no_cuda_lib_dir() -> String {
    let dir = std::env::temp_dir().join(format!("svft-no-cuda-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.to_string_lossy().into_owned()
}

#[test]
fn creation_without_a_device_names_the_reason() {
    const TEST: &str = "creation_without_a_device_names_the_reason";
    let Some(reason) = probe_reason() else {
        // A device is here. The virtual GPU is found through LD_LIBRARY_PATH, so a child process
        // without it has no driver (a real driver installed system-wide cannot be hidden).
        match common::vgpu_lib_dir("lib") {
            Some(_) if !common::is_child(TEST) => {
                common::run_in_child(TEST, &[("LD_LIBRARY_PATH", no_cuda_lib_dir())]);
            }
            _ => println!("{TEST}: skipped: a system-wide CUDA driver is present and cannot be hidden"),
        }
        return;
    };
    let w = [0.5f32; 12];
    let mut out = 0x10 as *mut SvftLayer;
    let st = from_weight(CUDA, w.as_ptr().cast(), 0, 12, 4, 3, "plain", std::ptr::null(), 0, &mut out);
    assert_eq!(st, SvftStatus::CudaUnavailable);
    assert!(out.is_null(), "*out not cleared");
    let msg = last_error();
    assert!(msg.contains(&reason) && msg.contains("unavailable"), "{msg:?} vs {reason:?}");
    let (u, s, v) = ([0.1f32; 12], [1.0f32; 3], [0.1f32; 9]);
    let plain = CString::new("plain").unwrap();
    // SAFETY: valid host buffers; the call fails before reading them.
    let st = unsafe {
        svft_layer_from_factors(
            CUDA,
            0,
            4,
            3,
            3,
            u.as_ptr().cast(),
            12,
            s.as_ptr().cast(),
            3,
            v.as_ptr().cast(),
            9,
            plain.as_ptr(),
            0,
            false,
            0,
            std::ptr::null(),
            0,
            &mut out,
        )
    };
    assert_eq!(st, SvftStatus::CudaUnavailable);
    assert!(last_error().contains(&reason));
}

/// A driver without cuBLAS or without cuSOLVER is "CUDA unavailable" with the reason, never a
/// panic (cudarc would panic on the first call into a library it cannot load): each case runs
/// in a child process whose loader finds only the virtual GPU's driver (and cuBLAS).
#[test]
fn missing_cublas_or_cusolver_is_an_error_not_a_panic() {
    const TEST: &str = "missing_cublas_or_cusolver_is_an_error_not_a_panic";
    if !common::is_child(TEST) {
        let Some(_) = common::vgpu_lib_dir("lib") else {
            println!("{TEST}: skipped: needs the virtual GPU's library folders ($SVFT_VGPU_LIB)");
            return;
        };
        for (variant, missing) in [("driver-only", "cuBLAS"), ("no-cusolver", "cuSOLVER")] {
            let dir = common::vgpu_lib_dir(variant).unwrap();
            common::run_in_child(TEST, &[("LD_LIBRARY_PATH", dir), ("SVFT_TEST_MISSING", missing.into())]);
        }
        return;
    }
    let missing = std::env::var("SVFT_TEST_MISSING").unwrap();
    let reason = probe_reason().expect("the probe found a complete CUDA stack");
    assert!(reason.contains(missing.as_str()), "{reason:?} does not name {missing}");
    assert!(!cuda_available());
    assert!(svft::cuda::Gpu::new(0).is_err());
    let w = [0.5f32; 12];
    let mut out = std::ptr::null_mut();
    let st = from_weight(CUDA, w.as_ptr().cast(), 0, 12, 4, 3, "plain", std::ptr::null(), 0, &mut out);
    assert_eq!(st, SvftStatus::CudaUnavailable, "{}", last_error());
    assert!(last_error().contains(missing.as_str()), "{}", last_error());
}

/// Bad arguments on the CUDA backend give the same status with or without a device: every one
/// of these is caught before the device is looked at (fake addresses are never dereferenced).
#[test]
fn cuda_argument_errors_need_no_device() {
    let fake = 0x7f00_0000_1000usize as *const c_void;
    let odd = (fake as usize + 1) as *const c_void;
    let two = (fake as usize + 2) as *const c_void;
    let null = std::ptr::null::<c_void>();
    let mut out = std::ptr::null_mut();
    use SvftStatus::*;
    // (expected, backend, weight, dtype, weight_len, pattern, bias, bias_len) for a 4 x 3 weight.
    type Case<'a> = (SvftStatus, i32, *const c_void, i32, usize, &'a str, *const c_void, usize);
    let cases: [Case; 12] = [
        (InvalidArgument, 7, fake, 0, 12, "plain", null, 0),
        (UnsupportedDtype, CUDA, fake, 9, 12, "plain", null, 0),
        (UnsupportedDtype, CUDA, fake, -1, 12, "plain", null, 0),
        (NullPointer, CUDA, null, 0, 12, "plain", null, 0),
        (Misaligned, CUDA, two, 0, 12, "plain", null, 0),
        (Misaligned, CUDA, odd, 1, 12, "plain", null, 0),
        (Misaligned, CUDA, two, 3, 12, "plain", null, 0),
        (Shape, CUDA, fake, 0, 11, "plain", null, 0),
        (Pattern, CUDA, fake, 0, 12, "banded:x", null, 0),
        (Shape, CUDA, fake, 0, 12, "plain", fake, 3),
        (Misaligned, CUDA, fake, 2, 12, "plain", odd, 4),
        (NullPointer, CUDA, fake, 0, 12, "plain", null, 4),
    ];
    for (i, &(want, backend, w, dtype, len, pattern, bias, bias_len)) in cases.iter().enumerate() {
        let st = from_weight(backend, w, dtype, len, 4, 3, pattern, bias, bias_len, &mut out);
        assert_eq!(st, want, "case {i}: {}", last_error());
        assert!(!last_error().is_empty());
    }
    // A host pointer: refused as such with a device, CUDA_UNAVAILABLE without one.
    let w = [0.5f32; 12];
    let st = from_weight(CUDA, w.as_ptr().cast(), 0, 12, 4, 3, "plain", null, 0, &mut out);
    let why = last_error(); // read before svft_backend_available (a success) clears it
    if cuda_available() {
        assert_eq!(st, InvalidArgument, "{why}");
        assert!(why.contains("not CUDA memory"), "{why}");
    } else {
        assert_eq!(st, CudaUnavailable);
    }
    // From factors: lengths and alignment first.
    let plain = CString::new("plain").unwrap();
    // SAFETY: fake pointers, rejected before use.
    let st = unsafe {
        svft_layer_from_factors(
            CUDA,
            0,
            4,
            3,
            3,
            fake,
            12,
            fake,
            2,
            fake,
            9,
            plain.as_ptr(),
            0,
            false,
            0,
            null,
            0,
            &mut out,
        )
    };
    assert_eq!(st, Shape);
    // SAFETY: as above.
    let st = unsafe {
        svft_layer_from_factors(
            CUDA,
            1,
            4,
            3,
            3,
            fake,
            12,
            odd,
            3,
            fake,
            9,
            plain.as_ptr(),
            0,
            false,
            0,
            null,
            0,
            &mut out,
        )
    };
    assert_eq!(st, Misaligned);
    assert!(out.is_null());
}

// ---- with a device -------------------------------------------------------------------------

fn download<T: Dtype>(stream: &Arc<CudaStream>, dev: &CudaSlice<T>) -> Vec<f32> {
    stream.clone_dtoh(dev).unwrap().into_iter().map(T::to_f32).collect()
}

fn round<T: Dtype>(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| T::from_f32(v).to_f32()).collect()
}

/// Keeps `stream` busy for a while (large device-to-device copies), so that work the library
/// enqueues without waiting for it would overtake what follows on `stream`.
fn busy(stream: &Arc<CudaStream>, a: &mut CudaSlice<u8>, b: &CudaSlice<u8>) {
    for _ in 0..8 {
        stream.memcpy_dtod(b, a).unwrap();
    }
}

fn current_context() -> sys::CUcontext {
    let mut c = std::ptr::null_mut();
    // SAFETY: writes one CUcontext.
    unsafe { sys::cuCtxGetCurrent(&mut c) }.result().unwrap();
    c
}

struct Case {
    d_out: usize,
    d_in: usize,
    n: usize,
    pattern: &'static str,
    gate: bool,
    plan: i32,
    bias: bool,
}

const CASES: [Case; 3] = [
    Case { d_out: 37, d_in: 23, n: 9, pattern: "banded:2", gate: true, plan: 1, bias: true },
    Case { d_out: 19, d_in: 41, n: 50, pattern: "random:3:seed=5", gate: false, plan: 2, bias: false },
    Case { d_out: 29, d_in: 29, n: 4, pattern: "topk:2", gate: true, plan: 0, bias: true },
];

fn cycle<T: Dtype + DeviceRepr>(ctx: &Arc<CudaContext>, dtype: SvftDtype, tol: f64) {
    let dt = dtype as i32;
    let caller = ctx.new_stream().unwrap();
    let mut big_a = caller.alloc_zeros::<u8>(256 << 20).unwrap();
    let big_b = caller.alloc_zeros::<u8>(256 << 20).unwrap();
    for (ci, c) in CASES.iter().enumerate() {
        let what = format!("{dtype:?} case {ci} ({} {}x{} n={})", c.pattern, c.d_out, c.d_in, c.n);
        let (o, i, n) = (c.d_out, c.d_in, c.n);
        let w_host = round::<T>(&randn(o * i, 10 + ci as u64));
        let b_host = round::<T>(&randn(o, 20 + ci as u64));
        let w_dev = upload::<T>(&caller, &w_host);
        let b_dev = upload::<T>(&caller, &b_host);
        caller.synchronize().unwrap();
        let mut layer = std::ptr::null_mut();
        let (bp, bl) = if c.bias { (dptr(&b_dev, &caller).cast_const(), o) } else { (std::ptr::null(), 0) };
        let pattern = CString::new(c.pattern).unwrap();
        let before = current_context();
        // SAFETY (all calls below): device buffers of the stated lengths, host outputs sized.
        let st = unsafe {
            svft_layer_from_weight(
                CUDA,
                dptr(&w_dev, &caller),
                dt,
                o * i,
                o,
                i,
                0,
                pattern.as_ptr(),
                1,
                c.gate,
                3,
                bp,
                bl,
                &mut layer,
            )
        };
        assert_eq!(st, SvftStatus::Ok, "{what}: {}", last_error());
        assert_eq!(current_context(), before, "{what}: the current context changed");
        let (mut backend, mut nnz) = (0i32, 0usize);
        unsafe {
            assert_eq!(
                svft_layer_info(layer, &mut backend, std::ptr::null_mut(), std::ptr::null_mut()),
                SvftStatus::Ok
            );
            assert_eq!(backend, CUDA);
            assert_eq!(
                svft_layer_shape(layer, std::ptr::null_mut(), std::ptr::null_mut(), std::ptr::null_mut(), &mut nnz),
                SvftStatus::Ok
            );
            assert_eq!(svft_layer_set_plan(layer, c.plan), SvftStatus::Ok);
        }
        // The factors are the CPU SVD's of the same (rounded) weight, held in the layer's dtype;
        // the reference is built from what the library reports (factors and indices).
        let dec = thin_svd(&w_host, o, i, None).unwrap();
        let r = dec.factors.r;
        let (mut u, mut s, mut v) = (vec![0f32; o * r], vec![0f32; r], vec![0f32; i * r]);
        let (mut rows, mut cols) = (vec![0u32; nnz], vec![0u32; nnz]);
        unsafe {
            let st = svft_layer_factors(layer, u.as_mut_ptr(), u.len(), s.as_mut_ptr(), r, v.as_mut_ptr(), v.len());
            assert_eq!(st, SvftStatus::Ok, "{}", last_error());
            assert_eq!(svft_layer_indices(layer, rows.as_mut_ptr(), cols.as_mut_ptr(), nnz), SvftStatus::Ok);
        }
        // U and V are held in the layer's dtype, s in f32 (the kernels read it as f32).
        let held = |x: &[f32], in_dtype: bool| if in_dtype { wide(&round::<T>(x)) } else { wide(x) };
        for (name, got, want, in_dtype) in
            [("U", &u, &dec.factors.u, true), ("s", &s, &dec.factors.s, false), ("V", &v, &dec.factors.v, true)]
        {
            let e = rel_err(got, &held(want, in_dtype));
            assert!(e < 1e-5, "{what}: {name} differs from the CPU SVD's (relative error {e})");
        }
        let pattern_spec = c.pattern.parse::<Pattern>().unwrap();
        if !c.pattern.starts_with("topk") {
            let expected = pattern_spec.omega(&dec.factors).unwrap();
            assert_eq!((&rows, &cols), (&expected.rows, &expected.cols), "{what}: indices");
        }
        let omega = Omega::from_indices(pattern_spec, r, rows, cols).unwrap();
        // Parameters through the host.
        let m: Vec<f32> = randn(nnz, 30 + ci as u64).iter().map(|x| 0.1 * x).collect();
        let mut m_back = vec![0f32; nnz];
        let mut gamma = 0f32;
        unsafe {
            assert_eq!(svft_layer_set_coefficients(layer, m.as_ptr(), nnz), SvftStatus::Ok);
            assert_eq!(svft_layer_set_gamma(layer, 0.3), SvftStatus::Ok);
            assert_eq!(svft_layer_get_coefficients(layer, m_back.as_mut_ptr(), nnz), SvftStatus::Ok);
            assert_eq!(svft_layer_get_gamma(layer, &mut gamma), SvftStatus::Ok);
        }
        assert_eq!((&m_back, gamma), (&m, 0.3), "{what}: coefficients/gamma round trip");
        // The same parameters again from device memory, over other values set from the host, on
        // the caller's stream after busy work (the layer must wait for the copies): the step below
        // matches the reference only if the device values were taken.
        let m_stage = caller.clone_htod(&m).unwrap();
        let gamma_stage = caller.clone_htod(&[0.3f32]).unwrap();
        let mut m_dev = caller.alloc_zeros::<f32>(nnz).unwrap();
        let mut gamma_dev = caller.alloc_zeros::<f32>(1).unwrap();
        caller.synchronize().unwrap();
        unsafe {
            assert_eq!(svft_layer_set_coefficients(layer, vec![0f32; nnz].as_ptr(), nnz), SvftStatus::Ok);
            assert_eq!(svft_layer_set_gamma(layer, -1.0), SvftStatus::Ok);
        }
        busy(&caller, &mut big_a, &big_b);
        caller.memcpy_dtod(&m_stage, &mut m_dev).unwrap();
        caller.memcpy_dtod(&gamma_stage, &mut gamma_dev).unwrap();
        let cs_params = caller.cu_stream() as *mut c_void;
        unsafe {
            let (mp, gp) = (dptr(&m_dev, &caller).cast::<f32>(), dptr(&gamma_dev, &caller).cast::<f32>());
            let st = svft_layer_load_parameters(layer, mp, nnz, gp, cs_params);
            assert_eq!(st, SvftStatus::Ok, "{what}: load_parameters: {}", last_error());
            assert_eq!(svft_layer_load_parameters(layer, mp, nnz - 1, gp, cs_params), SvftStatus::Shape);
            let host_m = m.as_ptr();
            assert_eq!(svft_layer_load_parameters(layer, host_m, nnz, gp, cs_params), SvftStatus::InvalidArgument);
            assert_eq!(svft_layer_get_gamma(layer, &mut gamma), SvftStatus::Ok);
            assert_eq!(svft_layer_get_coefficients(layer, m_back.as_mut_ptr(), nnz), SvftStatus::Ok);
        }
        assert_eq!((&m_back, gamma), (&m, 0.3), "{what}: parameters from the device");
        let mut fr = dec.factors.clone();
        (fr.u, fr.s, fr.v) = (u, s, v);
        let bias_ref = c.bias.then_some(&b_host[..]);
        let reference = Reference::new(&fr, &omega, &m, 0.3, c.gate, bias_ref);

        // Forward on the caller's stream, which is busy first: x is only written (from a
        // staging buffer) after the busy work, and y is read back on the caller's stream.
        let x_host = round::<T>(&randn(n * i, 40 + ci as u64));
        let gy_host = round::<T>(&randn(n * o, 50 + ci as u64));
        let x_stage = upload::<T>(&caller, &x_host);
        let gy_stage = upload::<T>(&caller, &gy_host);
        let mut x_dev = caller.alloc_zeros::<T>(n * i).unwrap();
        let mut gy_dev = caller.alloc_zeros::<T>(n * o).unwrap();
        let y_dev = upload::<T>(&caller, &vec![f32::NAN; n * o]);
        let dx_dev = upload::<T>(&caller, &vec![f32::NAN; n * i]);
        let dm_dev = caller.clone_htod(&vec![f32::NAN; nnz]).unwrap();
        let dg_dev = caller.clone_htod(&[f32::NAN]).unwrap();
        let w_out = caller.clone_htod(&vec![f32::NAN; o * i]).unwrap();
        let w_own = upload::<T>(&caller, &vec![f32::NAN; o * i]);
        caller.synchronize().unwrap();
        let cs = caller.cu_stream() as *mut c_void;
        busy(&caller, &mut big_a, &big_b);
        caller.memcpy_dtod(&x_stage, &mut x_dev).unwrap();
        unsafe {
            let st = svft_layer_forward(layer, dt, dptr(&x_dev, &caller), n * i, n, dptr(&y_dev, &caller), n * o, cs);
            assert_eq!(st, SvftStatus::Ok, "{what}: forward: {}", last_error());
        }
        busy(&caller, &mut big_a, &big_b);
        caller.memcpy_dtod(&gy_stage, &mut gy_dev).unwrap();
        unsafe {
            let st = svft_layer_backward(
                layer,
                dt,
                dptr(&gy_dev, &caller),
                n * o,
                n,
                dptr(&dx_dev, &caller),
                n * i,
                dptr(&dm_dev, &caller).cast(),
                nnz,
                dptr(&dg_dev, &caller).cast(),
                cs,
            );
            assert_eq!(st, SvftStatus::Ok, "{what}: backward: {}", last_error());
            let st = svft_layer_merge(layer, SvftDtype::F32 as i32, dptr(&w_out, &caller), o * i, cs);
            assert_eq!(st, SvftStatus::Ok, "{what}: merge f32: {}", last_error());
            let st = svft_layer_merge(layer, dt, dptr(&w_own, &caller), o * i, cs);
            assert_eq!(st, SvftStatus::Ok, "{what}: merge {dtype:?}: {}", last_error());
        }
        assert_eq!(current_context(), before, "{what}: the current context changed");
        // Read back on the caller's stream only (clone_dtoh synchronises that stream alone).
        let y = download::<T>(&caller, &y_dev);
        let dx = download::<T>(&caller, &dx_dev);
        let dm = caller.clone_dtoh(&dm_dev).unwrap();
        let dgamma = caller.clone_dtoh(&dg_dev).unwrap()[0];
        let w_f32 = caller.clone_dtoh(&w_out).unwrap();
        let w_t = download::<T>(&caller, &w_own);
        let (xw, gw) = (wide(&x_host), wide(&gy_host));
        let (dx_ref, dm_ref, dgamma_ref) = reference.backward(&xw, &gw, n);
        let errs = [
            ("Y", rel_err(&y, &reference.forward(&xw, n))),
            ("dX", rel_err(&dx, &dx_ref)),
            ("dM", rel_err(&dm, &dm_ref)),
            ("W f32", rel_err(&w_f32, &reference.weight())),
            ("W own dtype", rel_err(&w_t, &reference.weight())),
        ];
        for (name, e) in errs {
            assert!(e < tol, "{what}: {name} relative error {e} (tol {tol})");
        }
        let g = reference.g();
        let scale: f64 = g * (1.0 - g) * dm_ref.iter().zip(&reference.m).map(|(d, m)| (d / g * m).abs()).sum::<f64>();
        if c.gate {
            assert!(
                (dgamma as f64 - dgamma_ref).abs() <= tol * scale.max(1e-30),
                "{what}: dgamma {dgamma} vs {dgamma_ref}"
            );
        } else {
            assert_eq!(dgamma, 0.0, "{what}: dgamma without the gate");
        }

        // The legacy default stream (NULL), and no grad_gamma buffer.
        let y2 = upload::<T>(&caller, &vec![f32::NAN; n * o]);
        caller.synchronize().unwrap();
        unsafe {
            let null = std::ptr::null_mut();
            let st = svft_layer_forward(layer, dt, dptr(&x_dev, &caller), n * i, n, dptr(&y2, &caller), n * o, null);
            assert_eq!(st, SvftStatus::Ok, "{what}: forward on NULL: {}", last_error());
            let st = svft_layer_backward(
                layer,
                dt,
                dptr(&gy_dev, &caller),
                n * o,
                n,
                dptr(&dx_dev, &caller),
                n * i,
                dptr(&dm_dev, &caller).cast(),
                nnz,
                std::ptr::null_mut(),
                null,
            );
            assert_eq!(st, SvftStatus::Ok, "{what}: backward without grad_gamma: {}", last_error());
        }
        ctx.synchronize().unwrap();
        assert!(rel_err(&download::<T>(&caller, &y2), &reference.forward(&xw, n)) < tol, "{what}: Y on NULL stream");

        // The stateless pair on the caller's stream: T in the caller's (poisoned) buffer, the
        // outputs poisoned again; a wrong T length is a shape error.
        let r = fr.r;
        let (y3, t_dev) = (upload::<T>(&caller, &vec![f32::NAN; n * o]), upload::<T>(&caller, &vec![f32::NAN; n * r]));
        let (dx3, dm3) =
            (upload::<T>(&caller, &vec![f32::NAN; n * i]), caller.clone_htod(&vec![f32::NAN; nnz]).unwrap());
        let dg3 = caller.clone_htod(&[f32::NAN]).unwrap();
        caller.synchronize().unwrap();
        busy(&caller, &mut big_a, &big_b);
        unsafe {
            let (xp, yp, tp) = (dptr(&x_dev, &caller), dptr(&y3, &caller), dptr(&t_dev, &caller));
            let st = svft_layer_forward_saving(layer, dt, xp, n * i, n, yp, n * o, tp, n * r, cs);
            assert_eq!(st, SvftStatus::Ok, "{what}: forward_saving: {}", last_error());
            let st = svft_layer_forward_saving(layer, dt, xp, n * i, n, yp, n * o, tp, n * r - 1, cs);
            assert_eq!(st, SvftStatus::Shape, "{what}: forward_saving with a short T");
            let st = svft_layer_backward_saved(
                layer,
                dt,
                tp,
                n * r,
                dptr(&gy_dev, &caller),
                n * o,
                n,
                dptr(&dx3, &caller),
                n * i,
                dptr(&dm3, &caller).cast(),
                nnz,
                dptr(&dg3, &caller).cast(),
                cs,
            );
            assert_eq!(st, SvftStatus::Ok, "{what}: backward_saved: {}", last_error());
        }
        let errs = [
            ("saving Y", rel_err(&download::<T>(&caller, &y3), &reference.forward(&xw, n))),
            ("saved dX", rel_err(&download::<T>(&caller, &dx3), &dx_ref)),
            ("saved dM", rel_err(&caller.clone_dtoh(&dm3).unwrap(), &dm_ref)),
        ];
        for (name, e) in errs {
            assert!(e < tol, "{what}: {name} relative error {e} (tol {tol})");
        }

        // Memory model and destruction: the caller's buffers stay valid and are freed by the
        // caller (cudarc, at the end of this iteration) exactly once.
        let (mut ws, mut saved, mut persistent) = (0usize, 0usize, 0usize);
        unsafe {
            assert_eq!(svft_layer_memory(layer, n, &mut ws, &mut saved, &mut persistent), SvftStatus::Ok);
            assert_eq!(svft_layer_destroy(layer), SvftStatus::Ok);
        }
        assert!(ws > 0 && saved > 0 && persistent > 0, "{what}: memory model {ws} {saved} {persistent}");
        assert_eq!(download::<T>(&caller, &x_dev), x_host, "{what}: x changed or freed");
        assert_eq!(download::<T>(&caller, &w_dev), w_host, "{what}: the weight changed or freed");
        ctx.check_err().unwrap();
    }
}

#[test]
fn cycle_f32() {
    if let Some(ctx) = device_or_skip("cycle_f32") {
        cycle::<f32>(&ctx, SvftDtype::F32, 1e-5);
    }
}

#[test]
fn cycle_bf16_f16() {
    if let Some(ctx) = device_or_skip("cycle_bf16_f16") {
        cycle::<half::bf16>(&ctx, SvftDtype::Bf16, 1e-2);
        cycle::<half::f16>(&ctx, SvftDtype::F16, 1e-2);
    }
}

#[test]
fn device_pointer_checks() {
    let Some(ctx) = device_or_skip("device_pointer_checks") else { return };
    let stream = ctx.new_stream().unwrap();
    let (o, i, n) = (8usize, 6usize, 4usize);
    let w = stream.clone_htod(&randn(o * i, 1)).unwrap();
    stream.synchronize().unwrap(); // the weight's upload is complete before creation reads it
    let mut layer = std::ptr::null_mut();
    let st = from_weight(CUDA, dptr(&w, &stream), 0, o * i, o, i, "banded:1", std::ptr::null(), 0, &mut layer);
    assert_eq!(st, SvftStatus::Ok, "{}", last_error());
    let x = stream.clone_htod(&randn(n * i, 2)).unwrap();
    let y = stream.alloc_zeros::<f32>(n * o + 1).unwrap();
    let (xp, yp) = (dptr(&x, &stream), dptr(&y, &stream));
    let cs = stream.cu_stream() as *mut c_void;
    let host = vec![0f32; n * o];
    let fwd =
        |dt: i32, x: *const c_void, y: *mut c_void| unsafe { svft_layer_forward(layer, dt, x, n * i, n, y, n * o, cs) };
    use SvftStatus::*;
    assert_eq!(fwd(0, xp, host.as_ptr().cast_mut().cast()), InvalidArgument);
    assert!(last_error().contains("not CUDA memory"), "{}", last_error());
    assert_eq!(fwd(1, xp, yp), UnsupportedDtype);
    assert_eq!(fwd(3, xp, yp), UnsupportedDtype);
    assert_eq!(fwd(9, xp, yp), UnsupportedDtype);
    assert_eq!(fwd(0, xp, (yp as usize + 2) as *mut c_void), Misaligned);
    assert_eq!(fwd(0, xp, (yp as usize + 4) as *mut c_void), Ok, "{}", last_error()); // y has one spare float
    assert_eq!(fwd(0, xp, xp), InvalidArgument, "overlap"); // x_len != y_len here, still overlapping
                                                            // SAFETY: page-locked host memory, freed when dropped.
    let pinned = unsafe { ctx.alloc_pinned::<f32>(n * o) }.unwrap();
    assert_eq!(fwd(0, xp, pinned.as_ptr().unwrap().cast_mut().cast()), InvalidArgument);
    assert!(last_error().contains("host"), "{}", last_error());
    let managed =
        unsafe { cudarc::driver::result::malloc_managed(4 * n * o, sys::CUmemAttach_flags::CU_MEM_ATTACH_GLOBAL) }
            .unwrap();
    assert_eq!(fwd(0, xp, managed as *mut c_void), InvalidArgument);
    assert!(last_error().contains("managed"), "{}", last_error());
    unsafe { cudarc::driver::result::free_sync(managed) }.unwrap();
    // Backward before a forward of the same n, and wrong dtypes for the gradients.
    let (dx, dm) = (stream.alloc_zeros::<f32>(n * i).unwrap(), stream.alloc_zeros::<f32>(64).unwrap());
    let mut nnz = 0usize;
    let null = std::ptr::null_mut();
    unsafe {
        assert_eq!(svft_layer_shape(layer, null, null, null, &mut nnz), Ok);
        assert_eq!(svft_layer_set_gamma(layer, 0.1), Ok); // forgets the forward
        let st = svft_layer_backward(
            layer,
            0,
            yp,
            n * o,
            n,
            dptr(&dx, &stream),
            n * i,
            dptr(&dm, &stream).cast(),
            nnz,
            null.cast(),
            cs,
        );
        assert_eq!(st, NoForward, "{}", last_error());
        let st = svft_layer_backward(
            layer,
            0,
            yp,
            n * o,
            n,
            dptr(&dx, &stream),
            n * i,
            host.as_ptr().cast_mut(),
            nnz,
            null.cast(),
            cs,
        );
        assert_eq!(st, InvalidArgument, "grad_m on the host: {}", last_error());
        assert_eq!(svft_layer_merge(layer, 2, yp, o * i, cs), UnsupportedDtype);
        assert_eq!(svft_layer_destroy(layer), Ok);
        assert_eq!(svft_layer_destroy(layer), InvalidHandle);
    }
    stream.synchronize().unwrap();
    ctx.check_err().unwrap();
}

/// Calibration binds the layer's context for its work and puts the caller's back (none here):
/// a caller thread without a current context has none afterwards.
#[test]
fn calibrate_restores_the_callers_context() {
    let Some(ctx) = device_or_skip("calibrate_restores_the_callers_context") else { return };
    std::thread::spawn(move || {
        let stream = ctx.new_stream().unwrap();
        let (o, i) = (9usize, 7usize);
        let w = stream.clone_htod(&randn(o * i, 3)).unwrap();
        stream.synchronize().unwrap(); // the weight's upload is complete before creation reads it
        let mut layer = std::ptr::null_mut();
        let st = from_weight(CUDA, dptr(&w, &stream), 0, o * i, o, i, "banded:1", std::ptr::null(), 0, &mut layer);
        assert_eq!(st, SvftStatus::Ok, "{}", last_error());
        // SAFETY: no context current from here on.
        unsafe { sys::cuCtxSetCurrent(std::ptr::null_mut()) }.result().unwrap();
        let tokens = [1usize, 5];
        // SAFETY: a live layer and two readable token counts.
        let st = unsafe { svft_layer_calibrate(layer, tokens.as_ptr(), 2, 0.0, 0) };
        assert_eq!(st, SvftStatus::Ok, "{}", last_error());
        assert!(current_context().is_null(), "svft_layer_calibrate left a context current");
        // SAFETY: destroyed once.
        assert_eq!(unsafe { svft_layer_destroy(layer) }, SvftStatus::Ok);
        assert!(current_context().is_null(), "svft_layer_destroy left a context current");
    })
    .join()
    .unwrap();
}

/// A layer made from a weight on device 1, by a thread with no current context, initialises
/// device 1 only: device 0's primary context is never made active. Runs in a child process with
/// two virtual devices, so no other test has touched device 0 there.
#[test]
fn creation_initialises_only_the_weights_device() {
    const TEST: &str = "creation_initialises_only_the_weights_device";
    if !common::is_child(TEST) {
        if common::gpu_or_skip(TEST).is_none() {
            return;
        }
        if common::vgpu_lib_dir("lib").is_none() && device_count().unwrap_or(0) < 2 {
            println!("{TEST}: skipped: needs two devices (the virtual GPU makes them)");
            return;
        }
        common::run_in_child(TEST, &[("SVFT_VGPU_DEVICES", "2".into())]);
        return;
    }
    let primary_active = |dev: i32| {
        let (mut flags, mut active) = (0u32, 0i32);
        // SAFETY: two writable ints.
        unsafe { sys::cuDevicePrimaryCtxGetState(dev, &mut flags, &mut active) }.result().unwrap();
        active != 0
    };
    assert!(device_count().unwrap() >= 2);
    assert!(!primary_active(0));
    let ctx1 = CudaContext::new(1).unwrap();
    let stream = ctx1.new_stream().unwrap();
    let (o, i) = (9usize, 7usize);
    let w = stream.clone_htod(&randn(o * i, 4)).unwrap();
    let wp = dptr(&w, &stream);
    stream.synchronize().unwrap();
    // SAFETY: no context current from here on.
    unsafe { sys::cuCtxSetCurrent(std::ptr::null_mut()) }.result().unwrap();
    let mut layer = std::ptr::null_mut();
    let st = from_weight(CUDA, wp, 0, o * i, o, i, "plain", std::ptr::null(), 0, &mut layer);
    assert_eq!(st, SvftStatus::Ok, "{}", last_error());
    assert!(current_context().is_null(), "creation left a context current");
    assert!(!primary_active(0), "creating a layer on device 1 initialised device 0");
    // SAFETY: destroyed once.
    assert_eq!(unsafe { svft_layer_destroy(layer) }, SvftStatus::Ok);
}
