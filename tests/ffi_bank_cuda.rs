//! The adapter bank's CUDA backend through the C ABI (`svft_bank_*` on a CUDA layer's base),
//! with device buffers this test allocates with cudarc, as a C or PyTorch caller would. Runs
//! on the virtual GPU in CI (scripts/test-vgpu.sh); without a device the tests print
//! "skipped: no CUDA device (...)" (SVFT_REQUIRE_GPU=1 makes that a failure).
//!
//! - A mixed batch (adapters from CUDA layers and from raw parts, base-weight and empty
//!   segments, a segment longer than the kernel's tile) equals a `CpuBank` over the factors as
//!   the layers hold them, in f32 and bf16, before and after replace and remove. The caller's
//!   stream is kept busy and writes `x` just before the call, so a missing event join in either
//!   direction shows as wrong numbers (more so under SVFT_VGPU_ADVERSARIAL).
//! - Host pointers, a dtype other than the bank's, a layer over another base: the documented
//!   status with a message, and the bank still serves; the caller's context is restored.

mod common;

use std::ffi::{c_void, CString};
use std::ptr::null_mut;
use std::sync::Arc;

use common::{device_or_skip, dptr, factors, last_error, randn, upload, wide, F32_TOL};
use cudarc::driver::{sys, CudaContext, CudaSlice, CudaStream};
use half::bf16;
use svft::bank::{Adapter, CpuBank, Segment};
use svft::cuda::Dtype;
use svft::ffi::*;
use svft::reference::rel_err;
use svft::svd::Factors;
use svft::{Omega, Pattern};

const CUDA: i32 = SvftBackend::Cuda as i32;

fn ok(st: SvftStatus, what: &str) {
    assert_eq!(st, SvftStatus::Ok, "{what}: {}", last_error());
}

fn expect(st: SvftStatus, want: SvftStatus, what: &str) -> String {
    let msg = last_error();
    assert_eq!(st, want, "{what}: {msg}");
    assert!(!msg.is_empty(), "{what}: no message");
    msg
}

fn current_context() -> sys::CUcontext {
    let mut c = null_mut();
    // SAFETY: writes one CUcontext.
    unsafe { sys::cuCtxGetCurrent(&mut c) }.result().unwrap();
    c
}

/// A CUDA layer of `T` over `f` (uploaded in `T`) and `bias`, with random M and gamma set
/// through the host; returns the handle and its adapter as the bank should hold it.
fn cuda_layer<T: Dtype>(
    stream: &Arc<CudaStream>,
    f: &Factors,
    bias: &[f32],
    pattern: &str,
    gate: bool,
    seed: u64,
) -> (*mut SvftLayer, Adapter) {
    let (u, s, v, b) =
        (upload::<T>(stream, &f.u), upload::<T>(stream, &f.s), upload::<T>(stream, &f.v), upload::<T>(stream, bias));
    stream.synchronize().unwrap();
    let spec = CString::new(pattern).unwrap();
    let mut h = null_mut();
    let dt = dtype_of::<T>() as i32;
    // SAFETY (all): device buffers and host outputs of the stated lengths.
    unsafe {
        ok(
            svft_layer_from_factors(
                CUDA,
                dt,
                f.d_out,
                f.d_in,
                f.r,
                dptr(&u, stream),
                f.u.len(),
                dptr(&s, stream),
                f.s.len(),
                dptr(&v, stream),
                f.v.len(),
                spec.as_ptr(),
                1,
                gate,
                seed,
                dptr(&b, stream),
                bias.len(),
                &mut h,
            ),
            "svft_layer_from_factors (CUDA)",
        );
        let mut nnz = 0;
        ok(svft_layer_shape(h, null_mut(), null_mut(), null_mut(), &mut nnz), "shape");
        let m = randn(nnz, seed + 100);
        let gamma = 0.3 - 0.1 * seed as f32;
        ok(svft_layer_set_coefficients(h, m.as_ptr(), nnz), "set M");
        ok(svft_layer_set_gamma(h, gamma), "set gamma");
        let (mut rows, mut cols) = (vec![0u32; nnz], vec![0u32; nnz]);
        ok(svft_layer_indices(h, rows.as_mut_ptr(), cols.as_mut_ptr(), nnz), "indices");
        let omega = Omega::from_indices(pattern.parse::<Pattern>().unwrap(), f.r, rows, cols).unwrap();
        (h, Adapter::new(omega, m, gamma, gate).unwrap())
    }
}

fn dtype_of<T: Dtype>() -> SvftDtype {
    match T::SUFFIX {
        "bf16" => SvftDtype::Bf16,
        "f16" => SvftDtype::F16,
        _ => SvftDtype::F32,
    }
}

/// The factors and bias as a CUDA layer of `T` holds them (factors read back through the C
/// ABI; the bias was uploaded in `T`).
fn held<T: Dtype>(h: *mut SvftLayer, f: &Factors, bias: &[f32]) -> (Factors, Vec<f32>) {
    let (mut u, mut s, mut v) = (vec![0f32; f.u.len()], vec![0f32; f.r], vec![0f32; f.v.len()]);
    // SAFETY: host buffers of the stated lengths.
    ok(
        unsafe { svft_layer_factors(h, u.as_mut_ptr(), u.len(), s.as_mut_ptr(), s.len(), v.as_mut_ptr(), v.len()) },
        "factors",
    );
    (Factors::new(f.d_out, f.d_in, u, s, v).unwrap(), bias.iter().map(|&b| T::from_f32(b).to_f32()).collect())
}

/// `svft_bank_forward` on the caller's `stream`, which is kept busy and writes `x` (and NaN
/// into `y`) just before the call; returns the status and y read back on the same stream.
#[allow(clippy::too_many_arguments)]
fn forward<T: Dtype>(
    bank: *mut SvftBank,
    caller: &Arc<CudaStream>,
    busy: (&mut CudaSlice<u8>, &CudaSlice<u8>),
    x: &[f32],
    n: usize,
    d_out: usize,
    table: &[SvftSegment],
) -> (SvftStatus, Vec<f32>) {
    let mut xd = caller.alloc_zeros::<T>(x.len()).unwrap();
    let mut yd = caller.alloc_zeros::<T>(n * d_out).unwrap();
    for _ in 0..4 {
        caller.memcpy_dtod(busy.1, busy.0).unwrap();
    }
    caller.memcpy_htod(&x.iter().map(|&v| T::from_f32(v)).collect::<Vec<T>>(), &mut xd).unwrap();
    caller.memcpy_htod(&vec![T::from_f32(f32::NAN); n * d_out], &mut yd).unwrap();
    let stream = caller.cu_stream() as *mut c_void;
    // SAFETY: device buffers of the stated lengths on the bank's device; a host table.
    let st = unsafe {
        svft_bank_forward(
            bank,
            dtype_of::<T>() as i32,
            dptr(&xd, caller),
            x.len(),
            n,
            table.as_ptr(),
            table.len(),
            dptr(&yd, caller),
            n * d_out,
            stream,
        )
    };
    let y = caller.clone_dtoh(&yd).unwrap().into_iter().map(T::to_f32).collect();
    (st, y)
}

fn seg(start: usize, end: usize, adapter: i64) -> SvftSegment {
    SvftSegment { start, end, adapter }
}

fn table_of(t: &[SvftSegment]) -> Vec<Segment> {
    t.iter().map(|s| Segment { start: s.start, end: s.end, adapter: s.adapter }).collect()
}

const SPECS: [(&str, bool); 4] =
    [("banded:2", true), ("plain", false), ("random:3:seed=4", true), ("random:1:seed=9", false)];

fn mixed_batches<T: Dtype>(ctx: &Arc<CudaContext>, tol: f64) {
    let what = format!("{:?}", dtype_of::<T>());
    let caller = ctx.new_stream().unwrap();
    let mut big_a = caller.alloc_zeros::<u8>(64 << 20).unwrap();
    let big_b = caller.alloc_zeros::<u8>(64 << 20).unwrap();
    let (d_out, d_in, r) = (43, 31, 31);
    let f = factors(d_out, d_in, r, 8);
    let bias = randn(d_out, 9);
    let layers: Vec<_> = SPECS
        .iter()
        .enumerate()
        .map(|(k, (p, gate))| cuda_layer::<T>(&caller, &f, &bias, p, *gate, k as u64 + 1))
        .collect();
    let (hf, hbias) = held::<T>(layers[0].0, &f, &bias);
    let mut cpu = CpuBank::new(hf.clone(), Some(hbias)).unwrap();

    let before = current_context();
    let mut bank = null_mut();
    // SAFETY (all calls below): handles from this test, host outputs.
    unsafe {
        ok(svft_bank_from_layer(layers[0].0, &mut bank), "svft_bank_from_layer");
        assert_eq!(current_context(), before, "{what}: the current context changed");
        let (mut backend, mut dtype) = (-1, -1);
        ok(svft_bank_backend(bank, &mut backend, &mut dtype), "svft_bank_backend");
        assert_eq!((backend, dtype), (CUDA, dtype_of::<T>() as i32), "{what}");
        for (k, (h, a)) in layers.iter().enumerate() {
            ok(svft_bank_add_layer(bank, 10 + k as u32, *h), "add layer");
            cpu.add(10 + k as u32, a.clone()).unwrap();
        }
        // One adapter from raw parts: the first layer's pattern with other coefficients.
        let a0 = &layers[0].1;
        let m = randn(a0.m.len(), 77);
        let spec = CString::new("banded:2").unwrap();
        ok(
            svft_bank_add(
                bank,
                99,
                spec.as_ptr(),
                a0.omega.rows.as_ptr(),
                a0.omega.cols.as_ptr(),
                m.len(),
                m.as_ptr(),
                -0.4,
                true,
            ),
            "svft_bank_add",
        );
        cpu.add(99, Adapter::new(a0.omega.clone(), m, -0.4, true).unwrap()).unwrap();
        let mut adapters = 0;
        ok(svft_bank_info(bank, null_mut(), null_mut(), null_mut(), &mut adapters), "info");
        assert_eq!(adapters, 5);
    }

    let n = 67;
    let x: Vec<f32> = randn(n * d_in, 12).iter().map(|&v| T::from_f32(v).to_f32()).collect();
    let table = [
        seg(0, 2, 10),
        seg(2, 5, -1),
        seg(5, 5, 11),
        seg(5, 41, 12),
        seg(41, 42, 13),
        seg(42, 60, 99),
        seg(60, 67, 10),
    ];
    let check = |cpu: &mut CpuBank, bank, big_a: &mut CudaSlice<u8>, table: &[SvftSegment], step: &str| {
        let (st, got) = forward::<T>(bank, &caller, (big_a, &big_b), &x, n, d_out, table);
        ok(st, &format!("{what} {step}: forward"));
        assert_eq!(current_context(), before, "{what} {step}: the current context changed");
        let want = wide(&cpu.forward(&x, n, &table_of(table)).unwrap());
        let e = rel_err(&got, &want);
        assert!(e < tol, "{what} {step}: relative error {e:e} against the CPU bank");
    };
    check(&mut cpu, bank, &mut big_a, &table, "mixed");

    // Replace adapter 12 by layer 3's adapter, remove 13: the next forward sees both changes.
    unsafe {
        ok(svft_bank_replace_layer(bank, 12, layers[3].0), "replace");
        ok(svft_bank_remove(bank, 13), "remove");
    }
    cpu.replace(12, layers[3].1.clone()).unwrap();
    cpu.remove(13).unwrap();
    let table2 = [seg(0, 30, 12), seg(30, 31, 99), seg(31, 67, 11)];
    check(&mut cpu, bank, &mut big_a, &table2, "after replace and remove");
    let (st, _) = forward::<T>(bank, &caller, (&mut big_a, &big_b), &x, n, d_out, &table);
    expect(st, SvftStatus::InvalidArgument, "a removed adapter in the table");
    check(&mut cpu, bank, &mut big_a, &table2, "after a refused table");

    unsafe {
        ok(svft_bank_destroy(bank), "destroy");
        for (h, _) in layers {
            ok(svft_layer_destroy(h), "layer destroy");
        }
    }
}

#[test]
fn cuda_bank_mixed_batches_f32() {
    let Some(ctx) = device_or_skip("cuda_bank_mixed_batches_f32") else { return };
    mixed_batches::<f32>(&ctx, F32_TOL);
}

#[test]
fn cuda_bank_mixed_batches_bf16() {
    let Some(ctx) = device_or_skip("cuda_bank_mixed_batches_bf16") else { return };
    // The CPU bank runs in f32 on the same rounded factors and inputs; the device rounds T and
    // S to bf16 between the products.
    mixed_batches::<bf16>(&ctx, 1e-2);
}

#[test]
fn cuda_bank_bad_arguments() {
    let Some(ctx) = device_or_skip("cuda_bank_bad_arguments") else { return };
    let caller = ctx.new_stream().unwrap();
    let mut big_a = caller.alloc_zeros::<u8>(1 << 20).unwrap();
    let big_b = caller.alloc_zeros::<u8>(1 << 20).unwrap();
    let (d_out, d_in, r) = (21, 34, 21);
    let f = factors(d_out, d_in, r, 3);
    let bias = randn(d_out, 4);
    let (h32, a32) = cuda_layer::<f32>(&caller, &f, &bias, "banded:1", true, 1);
    let (h16, _) = cuda_layer::<bf16>(&caller, &f, &bias, "banded:1", true, 2);
    let before = current_context();
    let mut bank = null_mut();
    let n = 5;
    let x = randn(n * d_in, 6);
    let table = [seg(0, n, 1)];
    // SAFETY (all): handles from this test; buffers of the stated lengths or deliberately wrong.
    unsafe {
        ok(svft_bank_from_layer(h32, &mut bank), "from layer");
        ok(svft_bank_add_layer(bank, 1, h32), "add");
        // A bf16 layer over the same weights holds other (rounded) factors: another base.
        let msg = expect(svft_bank_add_layer(bank, 2, h16), SvftStatus::InvalidArgument, "a bf16 layer");
        assert!(msg.contains("not over this bank's base"), "{msg}");
        // Host memory where device buffers belong.
        let mut y = vec![0f32; n * d_out];
        let st = svft_bank_forward(
            bank,
            SvftDtype::F32 as i32,
            x.as_ptr().cast(),
            x.len(),
            n,
            table.as_ptr(),
            1,
            y.as_mut_ptr().cast(),
            y.len(),
            null_mut(),
        );
        let msg = expect(st, SvftStatus::InvalidArgument, "host x");
        assert!(msg.contains('x'), "{msg}");
        // Another dtype than the bank's.
        let xd = caller.alloc_zeros::<bf16>(x.len()).unwrap();
        let yd = caller.alloc_zeros::<bf16>(n * d_out).unwrap();
        let st = svft_bank_forward(
            bank,
            SvftDtype::Bf16 as i32,
            dptr(&xd, &caller),
            x.len(),
            n,
            table.as_ptr(),
            1,
            dptr(&yd, &caller),
            n * d_out,
            null_mut(),
        );
        let msg = expect(st, SvftStatus::UnsupportedDtype, "bf16 into an f32 bank");
        assert!(msg.contains("f32"), "{msg}");
        // x and y the same buffer.
        let xy = caller.alloc_zeros::<f32>(n * d_out.max(d_in)).unwrap();
        let p = dptr(&xy, &caller);
        let st =
            svft_bank_forward(bank, SvftDtype::F32 as i32, p, x.len(), n, table.as_ptr(), 1, p, n * d_out, null_mut());
        expect(st, SvftStatus::InvalidArgument, "y overlapping x");
        assert_eq!(current_context(), before, "the current context changed");
    }
    // The bank still serves, on the legacy default stream's ordering through `caller`.
    let mut cpu = CpuBank::new(held::<f32>(h32, &f, &bias).0, Some(bias.clone())).unwrap();
    cpu.add(1, a32).unwrap();
    let (st, got) = forward::<f32>(bank, &caller, (&mut big_a, &big_b), &x, n, d_out, &table);
    ok(st, "forward after the refusals");
    let e = rel_err(&got, &wide(&cpu.forward(&x, n, &table_of(&table)).unwrap()));
    assert!(e < F32_TOL, "relative error {e:e}");
    unsafe {
        ok(svft_bank_destroy(bank), "destroy");
        ok(svft_layer_destroy(h32), "destroy");
        ok(svft_layer_destroy(h16), "destroy");
    }
}
