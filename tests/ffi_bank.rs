//! The adapter bank through the C ABI (`svft_bank_*`), calling the exports directly and from C
//! (tests/c/bank.c): a mixed batch equals `CpuBank`'s result bit for bit and every segment
//! through its own single-adapter layer handle; bad handles, tables, ids, adapters and
//! pointers give the documented status with a message, and leave the bank working.

mod cli_support;
mod common;

use std::ffi::{c_void, CString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::ptr::{null, null_mut};

use common::{factors, last_error, randn};
use svft::bank::{Adapter, CpuBank, Segment};
use svft::cpu::CpuLayer;
use svft::ffi::*;
use svft::reference::rel_err;
use svft::svd::Factors;
use svft::LayerConfig;

const F32: i32 = SvftDtype::F32 as i32;

/// Asserts a status; on a failure also that a message names the call.
fn expect(st: SvftStatus, want: SvftStatus, what: &str) -> String {
    let msg = last_error();
    assert_eq!(st, want, "{what}: {msg}");
    if want != SvftStatus::Ok {
        assert!(!msg.is_empty(), "{what}: no message");
    }
    msg
}

fn ok(st: SvftStatus, what: &str) {
    expect(st, SvftStatus::Ok, what);
}

/// A CPU layer handle over `f` (plus bias) with `pattern`, random M and gamma.
fn layer(f: &Factors, bias: Option<&[f32]>, pattern: &str, gate: bool, seed: u64) -> *mut SvftLayer {
    let spec = CString::new(pattern).unwrap();
    let mut out = null_mut();
    let (b, b_len) = bias.map_or((null(), 0), |b| (b.as_ptr().cast::<c_void>(), b.len()));
    // SAFETY: valid host buffers of the declared lengths.
    unsafe {
        ok(
            svft_layer_from_factors(
                SvftBackend::Cpu as i32,
                F32,
                f.d_out,
                f.d_in,
                f.r,
                f.u.as_ptr().cast(),
                f.u.len(),
                f.s.as_ptr().cast(),
                f.s.len(),
                f.v.as_ptr().cast(),
                f.v.len(),
                spec.as_ptr(),
                1,
                gate,
                seed,
                b,
                b_len,
                &mut out,
            ),
            "svft_layer_from_factors",
        );
        let mut nnz = 0;
        ok(svft_layer_shape(out, null_mut(), null_mut(), null_mut(), &mut nnz), "shape");
        let m = randn(nnz, seed + 1000);
        ok(svft_layer_set_coefficients(out, m.as_ptr(), m.len()), "set M");
        ok(svft_layer_set_gamma(out, randn(1, seed + 2000)[0]), "set gamma");
    }
    out
}

/// The same layer in Rust (for `CpuBank`): factors, bias, M, gamma read back from the handle.
fn rust_layer(f: &Factors, bias: Option<&[f32]>, h: *mut SvftLayer, pattern: &str, gate: bool) -> CpuLayer {
    let config = LayerConfig { pattern: pattern.parse().unwrap(), gate, ..Default::default() };
    let mut l = CpuLayer::new(f.clone(), &config, bias.map(<[f32]>::to_vec)).unwrap();
    let mut m = vec![0.0; l.coefficients().len()];
    let mut gamma = 0.0;
    // SAFETY: buffers of the declared lengths.
    unsafe {
        ok(svft_layer_get_coefficients(h, m.as_mut_ptr(), m.len()), "get M");
        ok(svft_layer_get_gamma(h, &mut gamma), "get gamma");
    }
    l.set_coefficients(&m).unwrap();
    l.set_gamma(gamma).unwrap();
    l
}

fn seg(start: usize, end: usize, adapter: i64) -> SvftSegment {
    SvftSegment { start, end, adapter }
}

/// `svft_bank_forward` on host buffers; returns the status and y.
fn bank_forward(
    bank: *mut SvftBank,
    x: &[f32],
    n: usize,
    table: &[SvftSegment],
    d_out: usize,
) -> (SvftStatus, Vec<f32>) {
    let mut y = vec![f32::NAN; n * d_out];
    // SAFETY: valid host buffers of the declared lengths.
    let st = unsafe {
        svft_bank_forward(
            bank,
            F32,
            x.as_ptr().cast(),
            x.len(),
            n,
            table.as_ptr(),
            table.len(),
            y.as_mut_ptr().cast(),
            y.len(),
            null_mut(),
        )
    };
    (st, y)
}

fn layer_forward(h: *mut SvftLayer, x: &[f32], n: usize, d_out: usize) -> Vec<f32> {
    let mut y = vec![f32::NAN; n * d_out];
    // SAFETY: valid host buffers.
    unsafe {
        ok(
            svft_layer_forward(h, F32, x.as_ptr().cast(), x.len(), n, y.as_mut_ptr().cast(), y.len(), null_mut()),
            "layer forward",
        )
    };
    y
}

fn indices(h: *mut SvftLayer) -> (Vec<u32>, Vec<u32>, Vec<f32>, f32) {
    let mut nnz = 0;
    let mut gamma = 0.0;
    // SAFETY: buffers of the declared lengths.
    unsafe {
        ok(svft_layer_shape(h, null_mut(), null_mut(), null_mut(), &mut nnz), "shape");
        let (mut r, mut c, mut m) = (vec![0u32; nnz], vec![0u32; nnz], vec![0f32; nnz]);
        ok(svft_layer_indices(h, r.as_mut_ptr(), c.as_mut_ptr(), nnz), "indices");
        ok(svft_layer_get_coefficients(h, m.as_mut_ptr(), nnz), "get M");
        ok(svft_layer_get_gamma(h, &mut gamma), "get gamma");
        (r, c, m, gamma)
    }
}

const SPECS: [(&str, bool); 5] =
    [("plain", true), ("banded:2", false), ("random:3:seed=4", true), ("random:2:seed=9", false), ("topk:1", true)];

#[test]
fn mixed_batches_through_the_c_abi_equal_the_bank_and_each_layer() {
    for (case, &(d_out, d_in, r, with_bias)) in
        [(13, 11, 11, true), (9, 17, 6, false), (16, 16, 16, true)].iter().enumerate()
    {
        let f = factors(d_out, d_in, r, 40 + case as u64);
        let bias = with_bias.then(|| randn(d_out, 77));
        // The paper's top-k score needs a square weight: another random set elsewhere.
        let specs: Vec<(&str, bool)> = SPECS
            .iter()
            .map(|&(p, g)| if p.starts_with("topk") && d_out != d_in { ("random:1:seed=2", g) } else { (p, g) })
            .collect();
        let handles: Vec<*mut SvftLayer> =
            specs.iter().enumerate().map(|(k, (p, g))| layer(&f, bias.as_deref(), p, *g, 10 * k as u64 + 1)).collect();
        let mut bank = null_mut();
        // SAFETY (all calls): valid handles and buffers.
        unsafe { ok(svft_bank_from_layer(handles[0], &mut bank), "bank from layer") };
        let mut rust = CpuBank::new(f.clone(), bias.clone()).unwrap();
        let ids: Vec<u32> = (0..SPECS.len() as u32).map(|k| 5 * k + 2).collect();
        for (k, (&h, &id)) in handles.iter().zip(&ids).enumerate() {
            if k % 2 == 0 {
                unsafe { ok(svft_bank_add_layer(bank, id, h), "add layer") };
            } else {
                // From the raw parts: indices, coefficients, gamma, gate.
                let (rows, cols, m, gamma) = indices(h);
                let spec = CString::new(specs[k].0).unwrap();
                unsafe {
                    ok(
                        svft_bank_add(
                            bank,
                            id,
                            spec.as_ptr(),
                            rows.as_ptr(),
                            cols.as_ptr(),
                            rows.len(),
                            m.as_ptr(),
                            gamma,
                            specs[k].1,
                        ),
                        "add raw",
                    )
                };
            }
            rust.add(id, Adapter::from_layer(&rust_layer(&f, bias.as_deref(), h, specs[k].0, specs[k].1))).unwrap();
        }
        let (mut got_d_out, mut got_d_in, mut got_r, mut count) = (0, 0, 0, 0);
        unsafe { ok(svft_bank_info(bank, &mut got_d_out, &mut got_d_in, &mut got_r, &mut count), "info") };
        assert_eq!((got_d_out, got_d_in, got_r, count), (d_out, d_in, r, SPECS.len()));
        let mut yes = false;
        unsafe { ok(svft_bank_contains(bank, ids[3], &mut yes), "contains") };
        assert!(yes);
        unsafe { ok(svft_bank_contains(bank, 1, &mut yes), "contains") };
        assert!(!yes);

        let tables: Vec<(usize, Vec<SvftSegment>)> = vec![
            (1, vec![seg(0, 1, i64::from(ids[2]))]),
            (
                7,
                vec![
                    seg(0, 2, i64::from(ids[0])),
                    seg(2, 2, SVFT_BANK_BASE),
                    seg(2, 3, SVFT_BANK_BASE),
                    seg(3, 7, i64::from(ids[4])),
                ],
            ),
            (
                40,
                (0..10)
                    .map(|k| seg(4 * k, 4 * k + 4, if k == 7 { SVFT_BANK_BASE } else { i64::from(ids[k % ids.len()]) }))
                    .collect(),
            ),
            (100, vec![seg(0, 33, i64::from(ids[1])), seg(33, 34, i64::from(ids[3])), seg(34, 100, i64::from(ids[0]))]),
        ];
        for (n, table) in &tables {
            let n = *n;
            let x = randn(n * d_in, n as u64 + case as u64);
            let (st, y) = bank_forward(bank, &x, n, table, d_out);
            ok(st, "bank forward");
            let segs: Vec<Segment> =
                table.iter().map(|s| Segment { start: s.start, end: s.end, adapter: s.adapter }).collect();
            assert_eq!(y, rust.forward(&x, n, &segs).unwrap(), "n={n}: the C ABI differs from CpuBank");
            for s in table.iter().filter(|s| s.start < s.end) {
                let xs = &x[s.start * d_in..s.end * d_in];
                let ys = &y[s.start * d_out..s.end * d_out];
                let want = if s.adapter == SVFT_BANK_BASE {
                    // The base weight: U diag(s) V^T x + bias.
                    let omega = svft::Pattern::Plain.omega_for_rank(r).unwrap();
                    let base = CpuLayer::with_omega(f.clone(), omega, &LayerConfig::default(), bias.clone()).unwrap();
                    let mut base = base;
                    base.forward(xs, s.end - s.start).unwrap()
                } else {
                    let k = ids.iter().position(|&id| i64::from(id) == s.adapter).unwrap();
                    layer_forward(handles[k], xs, s.end - s.start, d_out)
                };
                let e = rel_err(ys, &common::wide(&want));
                assert!(e < common::F32_TOL, "n={n} segment {s:?}: {e:e}");
            }
        }

        // Replace (from a layer, then from raw parts) and remove: the others' rows stay.
        let n = 40;
        let x = randn(n * d_in, 3);
        let table = &tables[2].1;
        let (_, before) = bank_forward(bank, &x, n, table, d_out);
        let fresh = layer(&f, bias.as_deref(), "random:1:seed=123", true, 999);
        unsafe { ok(svft_bank_replace_layer(bank, ids[1], fresh), "replace layer") };
        let (_, after) = bank_forward(bank, &x, n, table, d_out);
        for s in table {
            let (a, b) = (&before[s.start * d_out..s.end * d_out], &after[s.start * d_out..s.end * d_out]);
            if s.adapter == i64::from(ids[1]) {
                assert_ne!(a, b);
                assert!(
                    rel_err(
                        b,
                        &common::wide(&layer_forward(fresh, &x[s.start * d_in..s.end * d_in], s.end - s.start, d_out))
                    ) < common::F32_TOL
                );
            } else {
                assert_eq!(a, b, "replace changed another adapter's rows");
            }
        }
        let (rows, cols, m, gamma) = indices(handles[1]);
        let spec = CString::new(specs[1].0).unwrap();
        unsafe {
            ok(
                svft_bank_replace(
                    bank,
                    ids[1],
                    spec.as_ptr(),
                    rows.as_ptr(),
                    cols.as_ptr(),
                    rows.len(),
                    m.as_ptr(),
                    gamma,
                    specs[1].1,
                ),
                "replace raw",
            )
        };
        assert_eq!(bank_forward(bank, &x, n, table, d_out).1, before, "replace back");
        unsafe { ok(svft_bank_remove(bank, ids[1]), "remove") };
        let (st, _) = bank_forward(bank, &x, n, table, d_out);
        let msg = expect(st, SvftStatus::InvalidArgument, "removed id");
        assert!(msg.contains(&format!("adapter id {} is not in the bank", ids[1])), "{msg}");

        unsafe {
            ok(svft_bank_destroy(bank), "destroy");
            for h in handles.into_iter().chain([fresh]) {
                ok(svft_layer_destroy(h), "layer destroy");
            }
        }
    }
}

#[test]
fn bad_arguments_give_their_status_and_leave_the_bank_working() {
    let (d_out, d_in, r) = (10, 8, 8);
    let f = factors(d_out, d_in, r, 5);
    let h = layer(&f, None, "banded:1", true, 1);
    let mut bank = null_mut();
    // SAFETY (all calls below): every pointer is valid for its declared length, NULL, a
    // misaligned pointer into a valid buffer, or a handle value (never dereferenced).
    unsafe {
        ok(svft_bank_from_layer(h, &mut bank), "from layer");
        ok(svft_bank_add_layer(bank, 3, h), "add");
    }
    let n = 6;
    let x = randn(n * d_in, 1);
    let good = [seg(0, 2, 3), seg(2, 6, SVFT_BANK_BASE)];
    let (st, want) = bank_forward(bank, &x, n, &good, d_out);
    ok(st, "good forward");
    let still_ok = |what: &str| {
        let (st, y) = bank_forward(bank, &x, n, &good, d_out);
        ok(st, what);
        assert_eq!(y, want, "{what}: the forward changed");
    };

    // Handles.
    let (st, _) = bank_forward(null_mut(), &x, n, &good, d_out);
    expect(st, SvftStatus::NullPointer, "NULL bank");
    let (st, _) = bank_forward(h.cast(), &x, n, &good, d_out);
    expect(st, SvftStatus::InvalidHandle, "a layer handle as a bank");
    unsafe {
        expect(
            svft_layer_forward(bank.cast(), F32, x.as_ptr().cast(), x.len(), n, null_mut(), 0, null_mut()),
            SvftStatus::InvalidHandle,
            "a bank as a layer",
        );
        expect(svft_bank_add_layer(bank, 4, bank.cast()), SvftStatus::InvalidHandle, "a bank as the layer");
        let mut out = std::ptr::NonNull::<SvftBank>::dangling().as_ptr();
        expect(svft_bank_from_layer(null(), &mut out), SvftStatus::NullPointer, "from NULL layer");
        assert!(out.is_null(), "*out not cleared");
        expect(svft_bank_from_layer(h, null_mut()), SvftStatus::NullPointer, "NULL out");
    }

    // Segment tables.
    let bad_tables: Vec<(Vec<SvftSegment>, SvftStatus, &str)> = vec![
        (vec![seg(1, 6, 3)], SvftStatus::InvalidArgument, "must start at row 0"),
        (vec![seg(0, 2, 3), seg(3, 6, 3)], SvftStatus::InvalidArgument, "uncovered"),
        (vec![seg(0, 3, 3), seg(2, 6, 3)], SvftStatus::InvalidArgument, "inside the previous"),
        (vec![seg(0, 4, 3), seg(4, 2, 3)], SvftStatus::InvalidArgument, "before it starts"),
        (vec![seg(0, 7, 3)], SvftStatus::InvalidArgument, "run past"),
        (vec![seg(0, 5, 3)], SvftStatus::InvalidArgument, "covers rows 0..5"),
        (vec![seg(0, 6, 4)], SvftStatus::InvalidArgument, "adapter id 4 is not in the bank"),
        (vec![seg(0, 6, -2)], SvftStatus::InvalidArgument, "invalid"),
        (vec![seg(0, 6, 1 << 40)], SvftStatus::InvalidArgument, "invalid"),
        (vec![], SvftStatus::InvalidArgument, "empty"),
    ];
    for (table, status, want) in &bad_tables {
        let (st, y) = bank_forward(bank, &x, n, table, d_out);
        let msg = expect(st, *status, want);
        assert!(msg.contains(want) && msg.starts_with("svft_bank_forward"), "{table:?}: {msg}");
        assert!(y.iter().all(|v| v.is_nan()), "{table:?}: y written on a bad table");
    }
    still_ok("after bad tables");

    // Pointers, lengths, dtype, stream.
    let mut y = vec![0f32; n * d_out + 1];
    let xp = x.as_ptr().cast::<c_void>();
    let yp = y.as_mut_ptr().cast::<c_void>();
    let mis = |p: *const c_void| p.cast::<u8>().wrapping_add(1).cast::<c_void>();
    let segs_mis = mis(good.as_ptr().cast()).cast::<SvftSegment>();
    let ny = n * d_out;
    type Case<'a> = (
        i32,
        *const c_void,
        usize,
        usize,
        *const SvftSegment,
        usize,
        *mut c_void,
        usize,
        *mut c_void,
        SvftStatus,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (F32, null(), x.len(), n, good.as_ptr(), 2, yp, ny, null_mut(), SvftStatus::NullPointer, "x is NULL"),
        (F32, mis(xp), x.len(), n, good.as_ptr(), 2, yp, ny, null_mut(), SvftStatus::Misaligned, "x"),
        (F32, xp, x.len() - 1, n, good.as_ptr(), 2, yp, ny, null_mut(), SvftStatus::Shape, "x (n x d_in)"),
        (F32, xp, x.len(), n, good.as_ptr(), 2, yp, ny - 1, null_mut(), SvftStatus::Shape, "y (n x d_out)"),
        (F32, xp, x.len(), n, good.as_ptr(), 2, null_mut(), ny, null_mut(), SvftStatus::NullPointer, "y is NULL"),
        (F32, xp, x.len(), n, null(), 2, yp, ny, null_mut(), SvftStatus::NullPointer, "segments is NULL"),
        (F32, xp, x.len(), n, segs_mis, 2, yp, ny, null_mut(), SvftStatus::Misaligned, "segments"),
        (F32, xp, x.len(), 0, good.as_ptr(), 2, yp, 0, null_mut(), SvftStatus::Shape, "n (tokens)"),
        (
            SvftDtype::Bf16 as i32,
            xp,
            x.len(),
            n,
            good.as_ptr(),
            2,
            yp,
            ny,
            null_mut(),
            SvftStatus::UnsupportedDtype,
            "f32",
        ),
        (99, xp, x.len(), n, good.as_ptr(), 2, yp, ny, null_mut(), SvftStatus::UnsupportedDtype, "dtype"),
        (F32, xp, x.len(), n, good.as_ptr(), 2, yp, ny, 8 as *mut c_void, SvftStatus::InvalidArgument, "stream"),
        (F32, xp, x.len(), n, good.as_ptr(), 2, xp.cast_mut(), ny, null_mut(), SvftStatus::InvalidArgument, "overlap"),
    ];
    for (dt, xp, xl, n, sp, sl, yp, yl, stream, status, want) in cases {
        let st = unsafe { svft_bank_forward(bank, dt, xp, xl, n, sp, sl, yp, yl, stream) };
        let msg = expect(st, status, want);
        assert!(msg.contains(want), "{want}: {msg}");
    }
    still_ok("after bad pointers");

    // Adapters: duplicate, missing, other base, bad raw parts.
    let other = layer(&factors(d_out, d_in, r, 6), None, "plain", false, 2);
    let spec = CString::new("random:2").unwrap();
    let (rows, cols, m) = (vec![0u32, 1, 7], vec![1u32, 0, 7], vec![0.5f32, -0.25, 1.0]);
    let nan = [0.5f32, f32::NAN, 1.0];
    let bad_rows = [0u32, 1, 8];
    unsafe {
        let msg = expect(svft_bank_add_layer(bank, 3, h), SvftStatus::InvalidArgument, "duplicate");
        assert!(msg.contains("already in the bank"), "{msg}");
        let msg = expect(svft_bank_replace_layer(bank, 9, h), SvftStatus::InvalidArgument, "replace missing");
        assert!(msg.contains("not in the bank"), "{msg}");
        let msg = expect(svft_bank_remove(bank, 9), SvftStatus::InvalidArgument, "remove missing");
        assert!(msg.contains("not in the bank"), "{msg}");
        let msg = expect(svft_bank_add_layer(bank, 4, other), SvftStatus::InvalidArgument, "other base");
        assert!(msg.contains("not over this bank's base"), "{msg}");
        let add = |p: *const std::ffi::c_char, r: *const u32, c: *const u32, nnz: usize, m: *const f32, gamma: f32| {
            svft_bank_add(bank, 4, p, r, c, nnz, m, gamma, true)
        };
        expect(add(null(), rows.as_ptr(), cols.as_ptr(), 3, m.as_ptr(), 0.0), SvftStatus::NullPointer, "NULL pattern");
        let junk = CString::new("zigzag").unwrap();
        expect(add(junk.as_ptr(), rows.as_ptr(), cols.as_ptr(), 3, m.as_ptr(), 0.0), SvftStatus::Pattern, "bad spec");
        expect(add(spec.as_ptr(), null(), cols.as_ptr(), 3, m.as_ptr(), 0.0), SvftStatus::NullPointer, "NULL rows");
        expect(add(spec.as_ptr(), rows.as_ptr(), cols.as_ptr(), 3, null(), 0.0), SvftStatus::NullPointer, "NULL m");
        let mis_m = mis(m.as_ptr().cast()).cast::<f32>();
        expect(add(spec.as_ptr(), rows.as_ptr(), cols.as_ptr(), 2, mis_m, 0.0), SvftStatus::Misaligned, "misaligned m");
        expect(add(spec.as_ptr(), rows.as_ptr(), cols.as_ptr(), 0, m.as_ptr(), 0.0), SvftStatus::Shape, "nnz 0");
        expect(
            add(spec.as_ptr(), bad_rows.as_ptr(), cols.as_ptr(), 3, m.as_ptr(), 0.0),
            SvftStatus::InvalidArgument,
            "row >= rank",
        );
        expect(add(spec.as_ptr(), rows.as_ptr(), cols.as_ptr(), 3, nan.as_ptr(), 0.0), SvftStatus::NonFinite, "NaN m");
        expect(
            add(spec.as_ptr(), rows.as_ptr(), cols.as_ptr(), 3, m.as_ptr(), f32::INFINITY),
            SvftStatus::NonFinite,
            "inf gamma",
        );
        let band = CString::new("banded:1").unwrap();
        expect(
            add(band.as_ptr(), rows.as_ptr(), cols.as_ptr(), 3, m.as_ptr(), 0.0),
            SvftStatus::InvalidArgument,
            "not the band",
        );
        let mut count = 0;
        ok(svft_bank_info(bank, null_mut(), null_mut(), null_mut(), &mut count), "info");
        assert_eq!(count, 1, "a failed add changed the bank");
        ok(add(spec.as_ptr(), rows.as_ptr(), cols.as_ptr(), 3, m.as_ptr(), 0.5), "good raw add");
        ok(svft_bank_remove(bank, 4), "remove it");
    }
    still_ok("after bad adapters");

    // A CUDA layer is refused (where CUDA is missing, creating one already fails).
    // Destroy: twice is INVALID_HANDLE; NULL is NULL_POINTER; a destroyed bank is invalid.
    unsafe {
        ok(svft_bank_destroy(bank), "destroy");
        expect(svft_bank_destroy(bank), SvftStatus::InvalidHandle, "destroy twice");
        expect(svft_bank_destroy(null_mut()), SvftStatus::NullPointer, "destroy NULL");
        expect(svft_bank_destroy(h.cast()), SvftStatus::InvalidHandle, "destroy a layer handle as a bank");
        let mut yes = false;
        expect(svft_bank_contains(bank, 3, &mut yes), SvftStatus::InvalidHandle, "destroyed");
        ok(svft_layer_destroy(h), "the layer survives the bank");
        ok(svft_layer_destroy(other), "other");
    }
}

#[test]
fn bank_from_factors_equals_bank_from_layer() {
    let (d_out, d_in, r) = (7, 12, 5);
    let f = factors(d_out, d_in, r, 8);
    let bias = randn(d_out, 9);
    let h = layer(&f, Some(&bias), "random:2:seed=1", true, 4);
    let (mut a, mut b) = (null_mut(), null_mut());
    // SAFETY: valid handles and buffers.
    unsafe {
        ok(svft_bank_from_layer(h, &mut a), "from layer");
        ok(
            svft_bank_from_factors(
                d_out,
                d_in,
                r,
                f.u.as_ptr(),
                f.u.len(),
                f.s.as_ptr(),
                f.s.len(),
                f.v.as_ptr(),
                f.v.len(),
                bias.as_ptr(),
                bias.len(),
                &mut b,
            ),
            "from factors",
        );
        ok(svft_bank_add_layer(a, 0, h), "add a");
        ok(svft_bank_add_layer(b, 0, h), "add b: the layer is over these factors too");
        let mut bad = null_mut();
        expect(
            svft_bank_from_factors(
                d_out,
                d_in,
                r,
                f.u.as_ptr(),
                f.u.len() - 1,
                f.s.as_ptr(),
                f.s.len(),
                f.v.as_ptr(),
                f.v.len(),
                null(),
                0,
                &mut bad,
            ),
            SvftStatus::Shape,
            "short U",
        );
        expect(
            svft_bank_from_factors(
                d_out,
                d_in,
                r,
                f.u.as_ptr(),
                f.u.len(),
                f.s.as_ptr(),
                f.s.len(),
                f.v.as_ptr(),
                f.v.len(),
                bias.as_ptr(),
                3,
                &mut bad,
            ),
            SvftStatus::Shape,
            "short bias",
        );
        assert!(bad.is_null());
    }
    let n = 9;
    let x = randn(n * d_in, 10);
    let table = [seg(0, 4, 0), seg(4, 9, SVFT_BANK_BASE)];
    let (ya, yb) = (bank_forward(a, &x, n, &table, d_out), bank_forward(b, &x, n, &table, d_out));
    ok(ya.0, "forward a");
    ok(yb.0, "forward b");
    assert_eq!(ya.1, yb.1);
    unsafe {
        ok(svft_bank_destroy(a), "destroy a");
        ok(svft_bank_destroy(b), "destroy b");
        ok(svft_layer_destroy(h), "destroy layer");
    }
}

/// target/<profile>/, where libsvft.so is (the test binary lives in its deps/).
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(Path::parent).expect("test binary under target/<profile>/deps").to_path_buf()
}

#[test]
fn c_program_serves_a_mixed_batch() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = lib_dir();
    assert!(lib.join("libsvft.so").exists(), "libsvft.so missing in {}", lib.display());
    let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ffi_bank_c");
    std::fs::create_dir_all(exe.parent().unwrap()).unwrap();
    let output = Command::new("cc")
        .args(["-std=c11", "-O1", "-g", "-Wall", "-Wextra", "-pedantic", "-Werror"])
        .arg("-I")
        .arg(root.join("include"))
        .arg(root.join("tests/c/bank.c"))
        .arg("-o")
        .arg(&exe)
        .arg("-L")
        .arg(&lib)
        .arg("-lsvft")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-lm")
        .output()
        .expect("run cc");
    assert!(output.status.success(), "cc failed:\n{}", String::from_utf8_lossy(&output.stderr));
    let run = cli_support::limited(&exe).output().expect("run bank.c");
    let out = String::from_utf8_lossy(&run.stdout).into_owned() + &String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "bank.c failed ({:?}):\n{out}", run.status);
    assert!(out.contains("bank ok"), "{out}");
}
