//! Issue 15, "silently wrong numbers": every path that builds SVD factors checks them, so none
//! succeeds with wrong numbers.
//!
//! - `thin_svd` is scale-invariant: weights of entries ~1e-30 or ~1e30 (whose squares under- or
//!   overflow f32) decompose like weights of order 1, truncated or not.
//! - The in-decomposition check (`check_residual`: measured residual against the one the full
//!   spectrum predicts; NaN never passes) fires on a constructed mismatch, and weights the f32
//!   factors cannot hold (all zeros, a spectrum outside f32's range) are `Error::Svd`.
//! - The C ABI's `svft_layer_from_weight` of a 1e-30 weight gives a layer whose residual is small
//!   and whose forward pass matches the f64 reference; a weight f32 cannot hold is SVD_FAILED
//!   with the figure in the message.
//! - The CLI: `--max-residual` NaN, negative or infinite is an error naming the flag; factors
//!   that overflow the storage dtype (`--dtype model` on an f16 model with large weights) and a
//!   weight of all zeros fail naming the module.

mod cli_support;
mod common;
use common::last_error;

use std::ffi::{c_void, CString};

use cli_support::*;
use common::randn;
use svft::ffi::*;
use svft::svd::{check_residual, residual_tolerance, thin_svd, truncation_residual};
use svft::Error;

const D_OUT: usize = 37;
const D_IN: usize = 23;

/// The full spectrum of `w` in f64 (from the SVD of the f64 weight, so the reference).
fn spectrum_f64(w: &[f32], d_out: usize, d_in: usize) -> Vec<f64> {
    let w64: Vec<f64> = w.iter().map(|&x| x as f64).collect();
    let dec = thin_svd(&w64, d_out, d_in, None).unwrap();
    dec.factors.s.iter().map(|&x| x as f64).collect()
}

#[test]
fn thin_svd_is_scale_invariant() {
    let w = randn(D_OUT * D_IN, 15);
    let base = thin_svd(&w, D_OUT, D_IN, None).unwrap();
    assert!(base.residual < 1e-5, "{}", base.residual);
    let spectrum = spectrum_f64(&w, D_OUT, D_IN);
    for scale in [1e-30f32, 1e30, 1e-35, 1e35, 2f32.powi(-120), 2f32.powi(100)] {
        let ws: Vec<f32> = w.iter().map(|x| x * scale).collect();
        let dec = thin_svd(&ws, D_OUT, D_IN, None).unwrap_or_else(|e| panic!("scale {scale:e}: {e}"));
        assert!(dec.residual < 1e-5, "scale {scale:e}: residual {:e}", dec.residual);
        assert_eq!(dec.factors.r, D_OUT.min(D_IN));
        for (i, (&got, &want)) in dec.factors.s.iter().zip(&base.factors.s).enumerate() {
            let want = want as f64 * scale as f64;
            let rel = (got as f64 - want).abs() / (base.factors.s[0] as f64 * scale as f64);
            assert!(rel < 1e-5, "scale {scale:e}: s[{i}] = {got:e}, want {want:e}");
        }
        // Truncated: the residual is the one the spectrum predicts (Eckart-Young).
        for r in [1, 10, 22] {
            let dec = thin_svd(&ws, D_OUT, D_IN, Some(r)).unwrap_or_else(|e| panic!("scale {scale:e}, r {r}: {e}"));
            let want = truncation_residual(&spectrum, r);
            assert!(
                (dec.residual - want).abs() < 1e-5,
                "scale {scale:e}, rank {r}: residual {:e}, predicted {want:e}",
                dec.residual
            );
        }
    }
    // f64 weights far outside f32's exponent range for their entries' squares: still exact.
    let w64: Vec<f64> = w.iter().map(|&x| x as f64 * 1e-140).collect();
    let dec = thin_svd(&w64, D_OUT, D_IN, None);
    // s ~ 1e-139 does not fit the layer's f32: an error, not zeros (see the next test); but a
    // scale that f32 holds decomposes exactly.
    assert!(matches!(dec, Err(Error::Svd(_))), "{dec:?}");
    let w64: Vec<f64> = w.iter().map(|&x| x as f64 * 1e-33).collect();
    let dec = thin_svd(&w64, D_OUT, D_IN, Some(10)).unwrap();
    assert!((dec.residual - truncation_residual(&spectrum, 10)).abs() < 1e-6, "{}", dec.residual);
}

#[test]
fn residual_check_fires_with_both_figures() {
    assert!((truncation_residual(&[3.0, 4.0], 1) - 0.8).abs() < 1e-15);
    assert_eq!(truncation_residual(&[3.0, 4.0], 2), 0.0);
    // Agreement within the tolerance passes, in both directions.
    check_residual(3e-7, 0.0, D_OUT, D_IN).unwrap();
    check_residual(0.25 + 1e-4, 0.25, D_OUT, D_IN).unwrap();
    check_residual(0.25 - 1e-4, 0.25, D_OUT, D_IN).unwrap();
    let tol = residual_tolerance(0.0, D_OUT, D_IN);
    assert!(tol > 1e-6 && tol < 1e-4, "{tol}");
    assert!(residual_tolerance(0.0, 4096, 4096) > residual_tolerance(0.0, 64, 64));
    // Underflowed products: residual ~1 where the spectrum says ~0.
    match check_residual(0.9999, 1e-8, D_OUT, D_IN) {
        Err(Error::Svd(m)) => assert!(m.contains("9.999e-1") && m.contains("1.000e-8") && m.contains("37 x 23"), "{m}"),
        other => panic!("{other:?}"),
    }
    // Below what the truncation can reach is as wrong as above it.
    assert!(matches!(check_residual(0.1, 0.25, D_OUT, D_IN), Err(Error::Svd(_))));
    for (measured, predicted) in [(f64::NAN, 0.0), (0.0, f64::NAN), (f64::INFINITY, 0.0), (0.0, f64::INFINITY)] {
        match check_residual(measured, predicted, D_OUT, D_IN) {
            Err(Error::Svd(m)) => assert!(m.contains("non-finite"), "{m}"),
            other => panic!("({measured}, {predicted}): {other:?}"),
        }
    }
}

#[test]
fn weights_f32_factors_cannot_hold_are_svd_errors() {
    let w = randn(D_OUT * D_IN, 16);
    let svd_err = |r: svft::Result<svft::svd::Decomposition>| match r {
        Err(Error::Svd(m)) => m,
        Err(other) => panic!("not an SVD error: {other}"),
        Ok(d) => panic!("succeeded: residual {:e}, s[0] {:e}", d.residual, d.factors.s[0]),
    };
    // All zeros: no SVD basis (never s = 0 with made-up singular vectors).
    let m = svd_err(thin_svd(&vec![0.0f32; D_OUT * D_IN], D_OUT, D_IN, None));
    assert!(m.contains("all zeros"), "{m}");
    let m = svd_err(thin_svd(&vec![0.0f64; D_OUT * D_IN], D_OUT, D_IN, Some(3)));
    assert!(m.contains("all zeros"), "{m}");
    // Singular values beyond f32's range, both ways: the figure is in the message.
    let signs: Vec<f32> = w.iter().map(|x| x.signum()).collect();
    let sign_s0 = spectrum_f64(&signs, D_OUT, D_IN)[0];
    let s0 = spectrum_f64(&w, D_OUT, D_IN)[0];
    let exponent = |x: f64| format!("e{}", x.log10().floor());
    let huge: Vec<f32> = signs.iter().map(|x| x * 3e38).collect();
    let m = svd_err(thin_svd(&huge, D_OUT, D_IN, None));
    assert!(m.contains("largest singular value") && m.contains(&exponent(sign_s0 * 3e38)), "{m}");
    let huge64: Vec<f64> = w.iter().map(|&x| x as f64 * 1e200).collect();
    let m = svd_err(thin_svd(&huge64, D_OUT, D_IN, None));
    assert!(m.contains("largest singular value") && m.contains(&exponent(s0 * 1e200)), "{m}");
    let tiny64: Vec<f64> = w.iter().map(|&x| x as f64 * 1e-200).collect();
    let m = svd_err(thin_svd(&tiny64, D_OUT, D_IN, Some(5)));
    assert!(m.contains("largest singular value") && m.contains(&exponent(s0 * 1e-200)), "{m}");
    let subnormal: Vec<f32> = w.iter().map(|x| x * 1e-42).collect();
    let m = svd_err(thin_svd(&subnormal, D_OUT, D_IN, None));
    assert!(m.contains("outside f32's normal range"), "{m}");
}

// ---- the C ABI ---------------------------------------------------------------------------------

const CPU: i32 = SvftBackend::Cpu as i32;

/// `svft_layer_from_weight` on the CPU: plain pattern, M = 0, no gate, no bias.
fn from_weight(
    w: *const c_void,
    dtype: SvftDtype,
    d_out: usize,
    d_in: usize,
    rank: usize,
) -> (SvftStatus, *mut SvftLayer) {
    let pattern = CString::new("plain").unwrap();
    let mut out: *mut SvftLayer = std::ptr::null_mut();
    // SAFETY: `w` holds d_out * d_in elements of `dtype`; the rest are valid or NULL with 0.
    let status = unsafe {
        svft_layer_from_weight(
            CPU,
            w,
            dtype as i32,
            d_out * d_in,
            d_out,
            d_in,
            rank,
            pattern.as_ptr(),
            SvftInit::Zero as i32,
            false,
            0,
            std::ptr::null(),
            0,
            &mut out,
        )
    };
    (status, out)
}

#[test]
fn c_abi_tiny_weight_gives_the_right_layer() {
    let n = 5;
    let x = randn(n * D_IN, 18);
    for scale in [1e-30f32, 1e30] {
        let w: Vec<f32> = randn(D_OUT * D_IN, 17).iter().map(|v| v * scale).collect();
        let (status, layer) = from_weight(w.as_ptr().cast(), SvftDtype::F32, D_OUT, D_IN, 0);
        assert_eq!(status, SvftStatus::Ok, "scale {scale:e}: {}", last_error());
        assert!(!layer.is_null());
        let mut residual = f64::NAN;
        // SAFETY: a live handle and a valid f64.
        assert_eq!(unsafe { svft_layer_svd_residual(layer, &mut residual) }, SvftStatus::Ok);
        assert!(residual < 1e-5, "scale {scale:e}: residual {residual:e}");
        // M = 0, no gate: the layer is W0, so y = x W0^T against the f64 product.
        let mut y = vec![f32::NAN; n * D_OUT];
        // SAFETY: live handle, host buffers of the lengths given, NULL stream on the CPU.
        let st = unsafe {
            svft_layer_forward(
                layer,
                SvftDtype::F32 as i32,
                x.as_ptr().cast(),
                x.len(),
                n,
                y.as_mut_ptr().cast(),
                y.len(),
                std::ptr::null_mut(),
            )
        };
        assert_eq!(st, SvftStatus::Ok, "{}", last_error());
        let want: Vec<f64> = (0..n)
            .flat_map(|t| {
                let (x, w) = (&x, &w);
                (0..D_OUT).map(move |o| (0..D_IN).map(|i| x[t * D_IN + i] as f64 * w[o * D_IN + i] as f64).sum())
            })
            .collect();
        let err = svft::reference::rel_err(&y, &want);
        assert!(err < common::F32_TOL, "scale {scale:e}: forward relative error {err:e}");
        // SAFETY: a live handle, destroyed once.
        assert_eq!(unsafe { svft_layer_destroy(layer) }, SvftStatus::Ok);
    }
}

#[test]
fn c_abi_weights_f32_cannot_hold_fail_with_the_figure() {
    let w: Vec<f64> = randn(D_OUT * D_IN, 19).iter().map(|&v| v as f64 * 1e-200).collect();
    let (status, layer) = from_weight(w.as_ptr().cast(), SvftDtype::F64, D_OUT, D_IN, 4);
    assert_eq!(status, SvftStatus::SvdFailed);
    assert!(layer.is_null());
    let msg = last_error();
    let s0 = spectrum_f64(&randn(D_OUT * D_IN, 19), D_OUT, D_IN)[0] * 1e-200;
    assert!(msg.contains("largest singular value") && msg.contains(&format!("e{}", s0.log10().floor())), "{msg}");
    let zeros = vec![0.0f32; D_OUT * D_IN];
    let (status, layer) = from_weight(zeros.as_ptr().cast(), SvftDtype::F32, D_OUT, D_IN, 0);
    assert_eq!(status, SvftStatus::SvdFailed);
    assert!(layer.is_null());
    assert!(last_error().contains("all zeros"), "{}", last_error());
}

// ---- the CLI -----------------------------------------------------------------------------------

fn one_weight_model(dir: &std::path::Path, name: &str, dt: Dt, values: Vec<f32>, n: usize) -> std::path::PathBuf {
    let model = dir.join("model.safetensors");
    let t = T { name: name.into(), dt, shape: vec![n, n], values };
    write_checkpoint(&model, &[t], None);
    model
}

/// Runs `svft` expecting exit code 1; returns stderr.
fn fails_with_1(args: &[&str]) -> String {
    let out = svft_in(None, args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "svft {args:?}: stdout {}\nstderr {err}",
        String::from_utf8_lossy(&out.stdout)
    );
    err
}

#[test]
fn cli_max_residual_must_be_finite_and_non_negative() {
    let dir = temp_dir("bad-numbers-max-residual");
    let model = one_weight_model(&dir, "layer.0.q_proj.weight", Dt::F32, values(16 * 16, 3), 16);
    let out = dir.join("f.safetensors");
    for bad in ["NaN", "nan", "inf", "-inf", "-1", "-0.5"] {
        let flag = format!("--max-residual={bad}");
        let err = fails_with_1(&["decompose", s(&model), "-o", s(&out), &flag]);
        assert!(err.contains("--max-residual") && err.contains("finite number >= 0"), "{bad}: {err}");
        assert!(!out.exists(), "{bad}: wrote {}", out.display());
    }
    // Zero and a plain bound are fine.
    svft_ok(&["decompose", s(&model), "-o", s(&out), "--max-residual", "1e-4"]);
    let tight = fails_with_1(&["decompose", s(&model), "-o", s(&out), "--max-residual", "0"]);
    assert!(tight.contains("exceeds --max-residual") && tight.contains("layer.0.q_proj.weight"), "{tight}");
}

#[test]
fn cli_factors_overflowing_the_storage_dtype_fail_naming_the_module() {
    let dir = temp_dir("bad-numbers-f16-overflow");
    let n = 64;
    let name = "layer.0.q_proj.weight";
    let w: Vec<f32> = values(n * n, 7).iter().map(|v| v * 1e4).collect();
    let model = one_weight_model(&dir, name, Dt::F16, w, n);
    let out = dir.join("f16.safetensors");
    let err = fails_with_1(&["decompose", s(&model), "-o", s(&out), "--dtype", "model"]);
    assert!(err.contains(name) && err.contains("f16") && err.contains("--dtype f32"), "{err}");
    assert!(err.contains("6.5504e4"), "names f16's maximum: {err}");
    assert!(!out.exists(), "wrote {}", out.display());
    // In f32 the same model is fine.
    let v = svft_json(&["decompose", s(&model), "-o", s(&out), "--json"]);
    assert!(v["max_residual"].as_f64().unwrap() < 1e-5, "{v}");
}

#[test]
fn cli_zero_and_tiny_weights() {
    let dir = temp_dir("bad-numbers-cli-weights");
    let n = 16;
    let name = "layer.0.q_proj.weight";
    let model = one_weight_model(&dir, name, Dt::F32, vec![0.0; n * n], n);
    let out = dir.join("f.safetensors");
    let err = fails_with_1(&["decompose", s(&model), "-o", s(&out)]);
    assert!(err.contains(name) && err.contains("all zeros"), "{err}");
    // A weight of entries ~1e-30: decomposed exactly, also truncated.
    let model = one_weight_model(&dir, name, Dt::F32, values(n * n, 9).iter().map(|v| v * 1e-30).collect(), n);
    let v = svft_json(&["decompose", s(&model), "-o", s(&out), "--json"]);
    assert!(v["max_residual"].as_f64().unwrap() < 1e-5, "{v}");
    let v = svft_json(&["decompose", s(&model), "-o", s(&out), "--rank", "4", "--json"]);
    let r = v["max_residual"].as_f64().unwrap();
    assert!(r > 0.1 && r < 1.0, "{v}");
}

// ---- the CUDA SVD (cuSOLVER; skipped without a device, the virtual GPU counts) ----------------

#[test]
fn cusolver_svd_is_scale_invariant_and_checked() {
    let Some(gpu) = common::gpu_or_skip("cusolver_svd_is_scale_invariant_and_checked") else { return };
    let stream = gpu.context().new_stream().unwrap();
    let w = randn(D_OUT * D_IN, 20);
    let spectrum = spectrum_f64(&w, D_OUT, D_IN);
    for scale in [1e-30f32, 1e30] {
        let ws: Vec<f32> = w.iter().map(|x| x * scale).collect();
        let dec = svft::cuda::thin_svd_cuda(&stream, &ws, D_OUT, D_IN, None).unwrap();
        assert!(dec.residual < 1e-5, "scale {scale:e}: residual {:e}", dec.residual);
        let s0 = spectrum[0] * scale as f64;
        assert!((dec.factors.s[0] as f64 - s0).abs() < 1e-5 * s0, "scale {scale:e}: s[0] {:e}", dec.factors.s[0]);
        let cut = svft::cuda::thin_svd_cuda(&stream, &ws, D_OUT, D_IN, Some(10)).unwrap();
        let want = truncation_residual(&spectrum, 10);
        assert!((cut.residual - want).abs() < 1e-5, "scale {scale:e}: residual {:e}, predicted {want:e}", cut.residual);
    }
    let zeros = vec![0.0f32; D_OUT * D_IN];
    assert!(
        matches!(svft::cuda::thin_svd_cuda(&stream, &zeros, D_OUT, D_IN, None), Err(Error::Svd(m)) if m.contains("all zeros"))
    );
    let subnormal: Vec<f32> = w.iter().map(|x| x * 1e-42).collect();
    assert!(matches!(
        svft::cuda::thin_svd_cuda(&stream, &subnormal, D_OUT, D_IN, None),
        Err(Error::Svd(m)) if m.contains("outside f32's normal range")
    ));
}
