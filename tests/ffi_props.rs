//! Property tests (proptest) over the C ABI's arguments, calling the `extern "C"` functions
//! directly: random dimensions (0, 1, odd, huge), ranks, pattern specs, dtypes, enumeration
//! values, NULL and misaligned pointers, wrong buffer lengths. Every call must either succeed with
//! the right result (checked against the f64 reference) or return a non-OK status with a
//! non-empty message, and never `SVFT_STATUS_PANIC` (a caught panic is a bug). After any failed
//! call on a live handle the handle must still work: a forward afterwards matches the forward
//! before, bit for bit.
//!
//! Sizes that need more memory than a machine has run in a child process (this binary re-run
//! with `SVFT_PROPS_CHILD=huge`) under `ulimit -v` (tests/cli_support's limit, 6 GiB): each must
//! be a clean error (OUT_OF_MEMORY, SHAPE, ...), never an abort or a capacity-overflow panic.
//! The child logs each case before running it, so a crash names its case. The buffers passed
//! with a huge claimed length are small: every such size needs far more than the limit inside
//! the library (workspace, copies), so a correct library fails before reading them.

mod cli_support;
mod common;

use std::ffi::{c_void, CString};
use std::io::Write;
use std::ptr::{null, null_mut};

use common::last_error;
use proptest::prelude::*;
use svft::ffi::*;
use svft::reference::{rel_err, Reference};
use svft::{Omega, Pattern};

/// Checks the ABI's contract on one status: never PANIC, a message on every failure.
fn check(call: &str, st: SvftStatus) -> Result<bool, TestCaseError> {
    let msg = last_error();
    prop_assert_ne!(st, SvftStatus::Panic, "{}: caught panic: {}", call, msg);
    if st != SvftStatus::Ok {
        prop_assert!(!msg.is_empty(), "{}: {:?} without a message", call, st);
    }
    Ok(st == SvftStatus::Ok)
}

/// A pointer argument: valid, NULL, or misaligned (one byte into a valid buffer that has a
/// spare element, so that even a wrong read stays in bounds).
#[derive(Debug, Clone, Copy)]
enum Ptr {
    Valid,
    Null,
    Misaligned,
}

fn ptr_kind() -> impl Strategy<Value = Ptr> {
    prop_oneof![8 => Just(Ptr::Valid), 1 => Just(Ptr::Null), 1 => Just(Ptr::Misaligned)]
}

fn place(kind: Ptr, buf: &[u64]) -> *const c_void {
    match kind {
        Ptr::Valid => buf.as_ptr().cast(),
        Ptr::Null => null(),
        Ptr::Misaligned => buf.as_ptr().cast::<u8>().wrapping_add(1).cast(),
    }
}

/// A declared length: usually the right one, else off by one, zero, or absurd.
fn declared(right: usize, how: u8) -> usize {
    match how {
        0..=6 => right,
        7 => right + 1,
        8 => right.saturating_sub(1),
        9 => 0,
        _ => usize::MAX / 2,
    }
}

const SPECS: [&str; 14] = [
    "plain",
    "banded:0",
    "banded:1",
    "banded:3",
    "banded:100000000",
    "random:2:seed=4",
    "random:100000",
    "topk:1",
    "topk:2:official",
    "topk:1000000",
    "topk:0",
    "",
    "banded:-1",
    "nonsense",
];

/// Host buffer of `len` elements of `size` bytes (plus one spare element), 8-byte aligned,
/// filled with small finite values of the dtype.
fn buffer(len: usize, dtype: i32, seed: u64) -> Vec<u64> {
    let size = match dtype {
        1 | 2 => 2,
        3 => 8,
        _ => 4,
    };
    let bytes = (len + 1) * size;
    let mut buf = vec![0u64; bytes.div_ceil(8)];
    let vals = svft::rng::Rng::new(seed).normal_vec(len + 1, 0.5);
    // SAFETY: buf holds `bytes` bytes.
    let raw = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<u8>(), bytes) };
    for (i, v) in vals.iter().enumerate() {
        let b: Vec<u8> = match dtype {
            1 => half::bf16::from_f32(*v).to_bits().to_le_bytes().to_vec(),
            2 => half::f16::from_f32(*v).to_bits().to_le_bytes().to_vec(),
            3 => (*v as f64).to_le_bytes().to_vec(),
            _ => v.to_le_bytes().to_vec(),
        };
        raw[i * size..(i + 1) * size].copy_from_slice(&b);
    }
    buf
}

/// What a live layer reports: shape, factors, indices, coefficients, gamma, gate.
struct Snapshot {
    d_out: usize,
    d_in: usize,
    r: usize,
    nnz: usize,
    u: Vec<f32>,
    s: Vec<f32>,
    v: Vec<f32>,
    rows: Vec<u32>,
    cols: Vec<u32>,
    m: Vec<f32>,
    gamma: f32,
    gate: bool,
}

fn snapshot(h: *mut SvftLayer) -> Result<Snapshot, TestCaseError> {
    let (mut d_out, mut d_in, mut r, mut nnz) = (0, 0, 0, 0);
    let mut gate = false;
    let mut gamma = 0f32;
    // SAFETY (all): outputs valid for the lengths given.
    unsafe {
        prop_assert!(check("shape", svft_layer_shape(h, &mut d_out, &mut d_in, &mut r, &mut nnz))?);
        prop_assert!(check("info", svft_layer_info(h, null_mut(), &mut gate, null_mut()))?);
        prop_assert!(check("get_gamma", svft_layer_get_gamma(h, &mut gamma))?);
    }
    let (mut u, mut s, mut v) = (vec![0f32; d_out * r], vec![0f32; r], vec![0f32; d_in * r]);
    let (mut rows, mut cols, mut m) = (vec![0u32; nnz], vec![0u32; nnz], vec![0f32; nnz]);
    unsafe {
        let st = svft_layer_factors(h, u.as_mut_ptr(), u.len(), s.as_mut_ptr(), s.len(), v.as_mut_ptr(), v.len());
        prop_assert!(check("factors", st)?);
        prop_assert!(check("indices", svft_layer_indices(h, rows.as_mut_ptr(), cols.as_mut_ptr(), nnz))?);
        prop_assert!(check("get_coefficients", svft_layer_get_coefficients(h, m.as_mut_ptr(), nnz))?);
    }
    Ok(Snapshot { d_out, d_in, r, nnz, u, s, v, rows, cols, m, gamma, gate })
}

/// A forward of `n` tokens of `x` (f32).
fn forward(h: *mut SvftLayer, x: &[f32], n: usize, d_out: usize) -> Result<Vec<f32>, TestCaseError> {
    let mut y = vec![f32::NAN; n * d_out];
    // SAFETY: buffers valid for their lengths.
    let st =
        unsafe { svft_layer_forward(h, 0, x.as_ptr().cast(), x.len(), n, y.as_mut_ptr().cast(), y.len(), null_mut()) };
    prop_assert!(check("forward", st)?, "forward failed: {}", last_error());
    Ok(y)
}

/// The layer's forward against the f64 reference built from what it reports.
fn check_against_reference(h: *mut SvftLayer, bias: Option<&[f32]>) -> Result<(), TestCaseError> {
    let snap = snapshot(h)?;
    let factors = svft::svd::Factors::new(snap.d_out, snap.d_in, snap.u.clone(), snap.s.clone(), snap.v.clone())
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let omega = Omega { pattern: Pattern::Plain, r: snap.r, rows: snap.rows.clone(), cols: snap.cols.clone() };
    let reference = Reference::new(&factors, &omega, &snap.m, snap.gamma, snap.gate, bias);
    let n = 3;
    let x = svft::rng::Rng::new(9).normal_vec(n * snap.d_in, 1.0);
    let y = forward(h, &x, n, snap.d_out)?;
    let err = rel_err(&y, &reference.forward(&x.iter().map(|&v| v as f64).collect::<Vec<_>>(), n));
    prop_assert!(err < 1e-4, "forward relative error {} (nnz {})", err, snap.nnz);
    Ok(())
}

#[derive(Debug, Clone)]
struct Create {
    d_out: usize,
    d_in: usize,
    rank: usize,
    spec: &'static str,
    dtype: i32,
    init: i32,
    gate: bool,
    backend: i32,
    len_how: u8,
    weight: Ptr,
    bias: Option<Ptr>,
    out_null: bool,
}

fn create_args() -> impl Strategy<Value = Create> {
    (
        (prop_oneof![Just(0usize), Just(1), 2usize..14], prop_oneof![Just(0usize), Just(1), 2usize..14]),
        prop_oneof![Just(0usize), Just(1), 2usize..16],
        proptest::sample::select(&SPECS[..]),
        prop_oneof![8 => 0i32..4, 1 => Just(-1), 1 => Just(7)],
        (-1i32..3, any::<bool>(), prop_oneof![9 => Just(0i32), 1 => Just(5)]),
        0u8..11,
        ptr_kind(),
        proptest::option::of(ptr_kind()),
        proptest::bool::weighted(0.03),
    )
        .prop_map(|((d_out, d_in), rank, spec, dtype, (init, gate, backend), len_how, weight, bias, out_null)| {
            Create { d_out, d_in, rank, spec, dtype, init, gate, backend, len_how, weight, bias, out_null }
        })
}

/// The layer's dimensions (d_out, d_in, rank) as reported.
fn shape_of(h: *mut SvftLayer) -> (usize, usize, usize) {
    let (mut a, mut b, mut c) = (0, 0, 0);
    // SAFETY: outputs valid.
    unsafe { svft_layer_shape(h, &mut a, &mut b, &mut c, null_mut()) };
    (a, b, c)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, .. ProptestConfig::default() })]

    /// svft_layer_from_weight and svft_layer_from_factors with random arguments.
    #[test]
    fn create_with_any_arguments(c in create_args(), factors in any::<bool>()) {
        let spec = CString::new(c.spec).unwrap();
        let (len, seed) = (c.d_out * c.d_in, c.d_out as u64 * 31 + c.d_in as u64);
        let w = buffer(len, c.dtype, seed);
        let b = buffer(c.d_out, c.dtype, seed + 1);
        let (bias, bias_len) = match c.bias {
            None => (null(), 0),
            Some(k) => (place(k, &b), declared(c.d_out, c.len_how / 2)),
        };
        let mut out: *mut SvftLayer = 0x10 as *mut SvftLayer;
        let out_p = if c.out_null { null_mut() } else { &mut out as *mut _ };
        let st = if !factors {
            // SAFETY: buffers valid for the lengths a correct library may read.
            unsafe {
                svft_layer_from_weight(c.backend, place(c.weight, &w), c.dtype, declared(len, c.len_how), c.d_out, c.d_in,
                    c.rank, spec.as_ptr(), c.init, c.gate, 5, bias, bias_len, out_p)
            }
        } else {
            let r = c.rank;
            let (u, s, v) = (buffer(c.d_out * r, c.dtype, 1), buffer(r, c.dtype, 2), buffer(c.d_in * r, c.dtype, 3));
            unsafe {
                svft_layer_from_factors(c.backend, c.dtype, c.d_out, c.d_in, r, place(c.weight, &u),
                    declared(c.d_out * r, c.len_how), s.as_ptr().cast(), r, v.as_ptr().cast(), c.d_in * r,
                    spec.as_ptr(), c.init, c.gate, 5, bias, bias_len, out_p)
            }
        };
        let ok = check(if factors { "from_factors" } else { "from_weight" }, st)?;
        if !ok {
            if !c.out_null {
                prop_assert!(out.is_null(), "*out not NULL after a failure");
            }
            return Ok(());
        }
        prop_assert!(!c.out_null && !out.is_null());
        let (d_out, d_in, r) = shape_of(out);
        let want_r = if c.rank == 0 { c.d_out.min(c.d_in) } else { c.rank };
        prop_assert_eq!((d_out, d_in, r), (c.d_out, c.d_in, want_r));
        // The bias as f32, to give the reference.
        let bias_f32: Option<Vec<f32>> = c.bias.map(|_| {
            let mut one = vec![0f32; c.d_out];
            let p = b.as_ptr().cast::<u8>();
            for (i, o) in one.iter_mut().enumerate() {
                // SAFETY: within b.
                *o = unsafe { match c.dtype {
                    1 => half::bf16::from_bits(p.add(2 * i).cast::<u16>().read_unaligned()).to_f32(),
                    2 => half::f16::from_bits(p.add(2 * i).cast::<u16>().read_unaligned()).to_f32(),
                    3 => p.add(8 * i).cast::<f64>().read_unaligned() as f32,
                    _ => p.add(4 * i).cast::<f32>().read_unaligned(),
                } };
            }
            one
        });
        let result = check_against_reference(out, bias_f32.as_deref());
        // SAFETY: a live handle.
        prop_assert_eq!(unsafe { svft_layer_destroy(out) }, SvftStatus::Ok);
        result?;
    }
}

/// One call on a live layer with random (mostly bad) arguments.
#[derive(Debug, Clone)]
enum Call {
    Forward { n: usize, dtype: i32, x: Ptr, y: Ptr, x_how: u8, y_how: u8, overlap: bool, stream: bool },
    Backward { n: usize, dtype: i32, how: u8, saved: bool, gy: Ptr },
    SetCoefficients { how: u8, value: f32, p: Ptr },
    LoadParameters { how: u8, value: f32, gamma: Option<f32> },
    SetGamma(f32),
    SetPlan(i32),
    PlanFor(usize),
    Memory(usize),
    Merge { dtype: i32, how: u8, p: Ptr },
    Factors { how: u8, p: Ptr },
    Indices { how: u8 },
    Calibrate { tokens: Vec<usize>, count_how: u8, seconds: f64 },
    Shape { null_all: bool },
    Forged(usize),
}

fn weird_f32() -> impl Strategy<Value = f32> {
    prop_oneof![
        4 => -2.0f32..2.0,
        1 => Just(f32::NAN),
        1 => Just(f32::INFINITY),
        1 => Just(f32::MAX),
        1 => Just(-1e30f32),
        1 => Just(1e-45f32),
    ]
}

fn tokens() -> impl Strategy<Value = usize> {
    prop_oneof![4 => 1usize..9, 1 => Just(0usize), 1 => Just(usize::MAX / 3), 1 => Just(1usize << 40), 1 => Just(usize::MAX)]
}

fn call() -> impl Strategy<Value = Call> {
    let dtype = prop_oneof![6 => Just(0i32), 1 => -1i32..5];
    prop_oneof![
        (
            tokens(),
            dtype.clone(),
            ptr_kind(),
            ptr_kind(),
            0u8..11,
            0u8..11,
            proptest::bool::weighted(0.1),
            proptest::bool::weighted(0.1)
        )
            .prop_map(|(n, dtype, x, y, x_how, y_how, overlap, stream)| Call::Forward {
                n,
                dtype,
                x,
                y,
                x_how,
                y_how,
                overlap,
                stream
            }),
        (tokens(), dtype.clone(), 0u8..11, any::<bool>(), ptr_kind())
            .prop_map(|(n, dtype, how, saved, gy)| Call::Backward { n, dtype, how, saved, gy }),
        (0u8..11, weird_f32(), ptr_kind()).prop_map(|(how, value, p)| Call::SetCoefficients { how, value, p }),
        (0u8..11, weird_f32(), proptest::option::of(weird_f32()))
            .prop_map(|(how, value, gamma)| Call::LoadParameters { how, value, gamma }),
        weird_f32().prop_map(Call::SetGamma),
        (-2i32..6).prop_map(Call::SetPlan),
        tokens().prop_map(Call::PlanFor),
        tokens().prop_map(Call::Memory),
        (dtype, 0u8..11, ptr_kind()).prop_map(|(dtype, how, p)| Call::Merge { dtype, how, p }),
        (0u8..11, ptr_kind()).prop_map(|(how, p)| Call::Factors { how, p }),
        (0u8..11).prop_map(|how| Call::Indices { how }),
        (
            proptest::collection::vec(prop_oneof![Just(0usize), Just(1), Just(usize::MAX)], 0..3),
            0u8..11,
            prop_oneof![Just(f64::NAN), Just(-1.0), Just(1e9), Just(f64::INFINITY)]
        )
            .prop_map(|(tokens, count_how, seconds)| Call::Calibrate { tokens, count_how, seconds }),
        any::<bool>().prop_map(|null_all| Call::Shape { null_all }),
        prop_oneof![Just(0usize), Just(8), Just(1usize << 40), Just(usize::MAX & !15)].prop_map(Call::Forged),
    ]
}

/// A live layer, its baseline forward, and what resets it.
struct Live {
    h: *mut SvftLayer,
    d_out: usize,
    d_in: usize,
    r: usize,
    nnz: usize,
    x: Vec<f32>,
    y0: Vec<f32>,
    m0: Vec<f32>,
    gamma0: f32,
}

const LIVE_N: usize = 4;

fn live() -> Live {
    let (d_out, d_in) = (12usize, 9usize);
    let w = svft::rng::Rng::new(3).normal_vec(d_out * d_in, 0.5);
    let spec = CString::new("banded:1").unwrap();
    let mut h = null_mut();
    // SAFETY: valid buffers.
    let st = unsafe {
        svft_layer_from_weight(
            0,
            w.as_ptr().cast(),
            0,
            w.len(),
            d_out,
            d_in,
            0,
            spec.as_ptr(),
            1,
            true,
            7,
            null(),
            0,
            &mut h,
        )
    };
    assert_eq!(st, SvftStatus::Ok, "{}", last_error());
    let (_, _, r) = shape_of(h);
    let mut nnz = 0;
    unsafe { svft_layer_shape(h, null_mut(), null_mut(), null_mut(), &mut nnz) };
    let mut m0 = vec![0f32; nnz];
    unsafe { svft_layer_get_coefficients(h, m0.as_mut_ptr(), nnz) };
    // A trained-looking gate, so that gamma matters.
    unsafe { svft_layer_set_gamma(h, 0.3) };
    let x = svft::rng::Rng::new(4).normal_vec(LIVE_N * d_in, 1.0);
    let mut y0 = vec![0f32; LIVE_N * d_out];
    let st = unsafe {
        svft_layer_forward(h, 0, x.as_ptr().cast(), x.len(), LIVE_N, y0.as_mut_ptr().cast(), y0.len(), null_mut())
    };
    assert_eq!(st, SvftStatus::Ok);
    Live { h, d_out, d_in, r, nnz, x, y0, m0, gamma0: 0.3 }
}

/// Runs one call; returns (status, whether it may have changed the layer's state on success).
fn run_call(l: &Live, c: &Call) -> Result<(SvftStatus, bool), TestCaseError> {
    let h = l.h;
    let f32buf = |len: usize| vec![0u64; (len + 1).div_ceil(2)];
    // SAFETY (every call): buffers valid for the lengths a correct library may use; sizes that
    // do not match are refused before any access.
    Ok(unsafe {
        match c {
            Call::Forward { n, dtype, x, y, x_how, y_how, overlap, stream } => {
                let small = *n <= 8;
                let (xl, yl) =
                    if small { (n * l.d_in, n * l.d_out) } else { (n.wrapping_mul(l.d_in), n.wrapping_mul(l.d_out)) };
                let (xb, mut yb) = (f32buf(if small { xl } else { 8 }), f32buf(if small { yl } else { 8 }));
                let yp = if *overlap { xb.as_ptr() as *mut c_void } else { place(*y, &yb) as *mut c_void };
                let _ = &mut yb;
                let st = svft_layer_forward(
                    h,
                    *dtype,
                    place(*x, &xb),
                    declared(xl, *x_how),
                    *n,
                    yp,
                    declared(yl, *y_how),
                    if *stream { 8 as *mut c_void } else { null_mut() },
                );
                if !small {
                    prop_assert_ne!(st, SvftStatus::Ok, "a forward of {} tokens on small buffers succeeded", n);
                }
                (st, false)
            }
            Call::Backward { n, dtype, how, saved, gy } => {
                let n = (*n).min(8);
                let (gyb, mut gx, mut gm, tb) =
                    (f32buf(n * l.d_out), f32buf(n * l.d_in), f32buf(l.nnz), f32buf(n * l.r));
                let st = if *saved {
                    svft_layer_backward_saved(
                        h,
                        *dtype,
                        tb.as_ptr().cast(),
                        declared(n * l.r, *how),
                        place(*gy, &gyb),
                        n * l.d_out,
                        n,
                        gx.as_mut_ptr().cast(),
                        n * l.d_in,
                        gm.as_mut_ptr().cast(),
                        l.nnz,
                        null_mut(),
                        null_mut(),
                    )
                } else {
                    svft_layer_backward(
                        h,
                        *dtype,
                        place(*gy, &gyb),
                        declared(n * l.d_out, *how),
                        n,
                        gx.as_mut_ptr().cast(),
                        n * l.d_in,
                        gm.as_mut_ptr().cast(),
                        l.nnz,
                        null_mut(),
                        null_mut(),
                    )
                };
                (st, false)
            }
            Call::SetCoefficients { how, value, p } => {
                let m: Vec<f32> = vec![*value; l.nnz + 1];
                let buf: Vec<u64> = m
                    .chunks(2)
                    .map(|c| (c[0].to_bits() as u64) | ((*c.get(1).unwrap_or(&0.0)).to_bits() as u64) << 32)
                    .collect();
                let st = svft_layer_set_coefficients(h, place(*p, &buf).cast(), declared(l.nnz, *how));
                (st, true)
            }
            Call::LoadParameters { how, value, gamma } => {
                let m = vec![*value; l.nnz];
                let g = gamma.unwrap_or(0.0);
                let st = svft_layer_load_parameters(
                    h,
                    m.as_ptr(),
                    declared(l.nnz, *how),
                    if gamma.is_some() { &g } else { null() },
                    null_mut(),
                );
                (st, true)
            }
            Call::SetGamma(g) => (svft_layer_set_gamma(h, *g), true),
            Call::SetPlan(p) => (svft_layer_set_plan(h, *p), true),
            Call::PlanFor(n) => {
                let mut p = -1;
                let st = svft_layer_plan_for(h, *n, &mut p);
                if st == SvftStatus::Ok {
                    prop_assert!((1..=3).contains(&p), "plan {}", p);
                }
                (st, false)
            }
            Call::Memory(n) => {
                let (mut a, mut b, mut c) = (0, 0, 0);
                (svft_layer_memory(h, *n, &mut a, &mut b, &mut c), false)
            }
            Call::Merge { dtype, how, p } => {
                let mut w = f32buf(l.d_out * l.d_in);
                let _ = &mut w;
                (
                    svft_layer_merge(
                        h,
                        *dtype,
                        place(*p, &w) as *mut c_void,
                        declared(l.d_out * l.d_in, *how),
                        null_mut(),
                    ),
                    false,
                )
            }
            Call::Factors { how, p } => {
                let mut u = f32buf(l.d_out * l.r);
                let _ = &mut u;
                (
                    svft_layer_factors(
                        h,
                        place(*p, &u) as *mut f32,
                        declared(l.d_out * l.r, *how),
                        null_mut(),
                        0,
                        null_mut(),
                        0,
                    ),
                    false,
                )
            }
            Call::Indices { how } => {
                let (mut r, mut c) = (vec![0u32; l.nnz + 1], vec![0u32; l.nnz + 1]);
                (svft_layer_indices(h, r.as_mut_ptr(), c.as_mut_ptr(), declared(l.nnz, *how)), false)
            }
            Call::Calibrate { tokens, count_how, seconds } => {
                let count = declared(tokens.len(), *count_how).min(tokens.len());
                let p = if tokens.is_empty() { null() } else { tokens.as_ptr() };
                (svft_layer_calibrate(h, p, count, *seconds, 0), true)
            }
            Call::Shape { null_all } => {
                let (mut a, mut b) = (0, 0);
                let st = if *null_all {
                    svft_layer_shape(h, null_mut(), null_mut(), null_mut(), null_mut())
                } else {
                    svft_layer_shape(h, &mut a, &mut b, null_mut(), null_mut())
                };
                (st, false)
            }
            Call::Forged(v) => {
                let mut g = 0f32;
                (svft_layer_get_gamma(*v as *mut SvftLayer, &mut g), false)
            }
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, .. ProptestConfig::default() })]

    /// Random calls on a live handle: none panics, every failure explains itself, and a failed
    /// call leaves the layer exactly as it was (its forward is bit-identical afterwards).
    #[test]
    fn live_handle_survives_any_call(calls in proptest::collection::vec(call(), 1..12)) {
        let l = live();
        let result = (|| -> Result<(), TestCaseError> {
            for c in &calls {
                let (st, mutating) = run_call(&l, c)?;
                let ok = check(&format!("{c:?}"), st)?;
                if ok && mutating {
                    // A successful change: put the parameters and the plan back.
                    unsafe {
                        prop_assert_eq!(svft_layer_set_coefficients(l.h, l.m0.as_ptr(), l.nnz), SvftStatus::Ok);
                        prop_assert_eq!(svft_layer_set_gamma(l.h, l.gamma0), SvftStatus::Ok);
                        prop_assert_eq!(svft_layer_set_plan(l.h, 0), SvftStatus::Ok);
                    }
                }
                let y = forward(l.h, &l.x, LIVE_N, l.d_out)?;
                let same = y.iter().zip(&l.y0).all(|(a, b)| a.to_bits() == b.to_bits());
                prop_assert!(same, "after {:?} ({:?}) the forward changed", c, st);
            }
            Ok(())
        })();
        unsafe { svft_layer_destroy(l.h) };
        result?;
    }
}

// ---- huge sizes, in a child process under the memory limit -----------------------------------

const HUGE: [usize; 6] = [1 << 34, 1 << 40, usize::MAX / 3, usize::MAX / 2 + 1, usize::MAX, (1 << 31) + 1];

/// One huge-size case, by number: which call, with what sizes. Returns its description and the
/// status; every case must fail cleanly.
fn huge_case(i: usize) -> (String, SvftStatus) {
    let big = HUGE[i % HUGE.len()];
    let small = vec![0u64; 1 << 12];
    let mut other = vec![0u64; 1 << 12];
    let p = small.as_ptr().cast::<c_void>();
    let spec = CString::new(["plain", "banded:2", "random:4:seed=1", "topk:3"][(i / HUGE.len()) % 4]).unwrap();
    let mut out = null_mut();
    let kind = (i / (4 * HUGE.len())) % 7;
    // SAFETY: claimed lengths exceed the buffers, but every such size needs more memory than
    // the limit inside the library, which must refuse it before reading (see the module doc).
    let (desc, st) = unsafe {
        match kind {
            0 => (
                format!("from_weight {big} x 2 = len {}", big.wrapping_mul(2)),
                svft_layer_from_weight(
                    0,
                    p,
                    0,
                    big.wrapping_mul(2),
                    big,
                    2,
                    0,
                    spec.as_ptr(),
                    0,
                    false,
                    0,
                    null(),
                    0,
                    &mut out,
                ),
            ),
            1 => (
                format!("from_weight 2 x {big}, rank 2"),
                svft_layer_from_weight(
                    0,
                    p,
                    0,
                    big.wrapping_mul(2),
                    2,
                    big,
                    2,
                    spec.as_ptr(),
                    0,
                    false,
                    0,
                    null(),
                    0,
                    &mut out,
                ),
            ),
            2 => (
                format!("from_weight {big} x {big}"),
                svft_layer_from_weight(
                    0,
                    p,
                    0,
                    big.wrapping_mul(big),
                    big,
                    big,
                    0,
                    spec.as_ptr(),
                    0,
                    false,
                    0,
                    null(),
                    0,
                    &mut out,
                ),
            ),
            3 => (
                format!("from_factors {big} x 3 rank 3"),
                svft_layer_from_factors(
                    0,
                    0,
                    big,
                    3,
                    3,
                    p,
                    big.wrapping_mul(3),
                    p,
                    3,
                    p,
                    9,
                    spec.as_ptr(),
                    0,
                    false,
                    0,
                    null(),
                    0,
                    &mut out,
                ),
            ),
            4 => (
                format!("from_factors 3 x 3 rank {big}"),
                svft_layer_from_factors(
                    0,
                    0,
                    3,
                    3,
                    big,
                    p,
                    big.wrapping_mul(3),
                    p,
                    big,
                    p,
                    big.wrapping_mul(3),
                    spec.as_ptr(),
                    0,
                    false,
                    0,
                    null(),
                    0,
                    &mut out,
                ),
            ),
            5 => {
                let (rows, cols) = (small.as_ptr().cast::<u32>(), small.as_ptr().cast::<u32>());
                let f = [1f32; 9];
                (
                    format!("from_factors_indexed nnz {big}"),
                    svft_layer_from_factors_indexed(
                        0,
                        0,
                        3,
                        3,
                        3,
                        f.as_ptr().cast(),
                        9,
                        f.as_ptr().cast(),
                        3,
                        f.as_ptr().cast(),
                        9,
                        spec.as_ptr(),
                        rows,
                        cols,
                        big,
                        0,
                        false,
                        0,
                        null(),
                        0,
                        &mut out,
                    ),
                )
            }
            _ => {
                // A forward of `big` tokens on a small live layer.
                let w = svft::rng::Rng::new(1).normal_vec(6 * 5, 1.0);
                let mut h = null_mut();
                let st = svft_layer_from_weight(
                    0,
                    w.as_ptr().cast(),
                    0,
                    30,
                    6,
                    5,
                    0,
                    c"banded:1".as_ptr(),
                    0,
                    false,
                    0,
                    null(),
                    0,
                    &mut h,
                );
                assert_eq!(st, SvftStatus::Ok, "{}", last_error());
                let mut ws = 0;
                let mst = svft_layer_memory(h, big, &mut ws, null_mut(), null_mut());
                assert_ne!(mst, SvftStatus::Panic, "memory({big}): {}", last_error());
                if mst == SvftStatus::Ok && ws < big {
                    svft_layer_destroy(h);
                    // Not a clean error: a silently wrong size (reported as a failure).
                    return (format!("svft_layer_memory({big} tokens) reports {ws} workspace bytes"), SvftStatus::Ok);
                }
                let st = svft_layer_forward(
                    h,
                    0,
                    p,
                    big.wrapping_mul(5),
                    big,
                    other.as_mut_ptr().cast(),
                    big.wrapping_mul(6),
                    null_mut(),
                );
                let msg = last_error();
                // The handle still works.
                let x = [0.5f32; 5];
                let mut y = vec![0f32; 6];
                assert_eq!(
                    svft_layer_forward(h, 0, x.as_ptr().cast(), 5, 1, y.as_mut_ptr().cast(), 6, null_mut()),
                    SvftStatus::Ok
                );
                svft_layer_destroy(h);
                return (format!("forward of {big} tokens (workspace {ws} bytes): {msg}"), st);
            }
        }
    };
    if !out.is_null() {
        unsafe { svft_layer_destroy(out) };
    }
    (format!("{desc}: {}", last_error()), st)
}

const HUGE_CASES: usize = 7 * 4 * HUGE.len();

/// The child: runs every huge case, logging each before it runs.
#[test]
fn huge_sizes_child() {
    let Ok(log) = std::env::var("SVFT_PROPS_CHILD_LOG") else {
        return;
    };
    let mut log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    for i in 0..HUGE_CASES {
        log.write_all(format!("B\t{i}\n").as_bytes()).unwrap();
        let (desc, st) = huge_case(i);
        log.write_all(format!("E\t{i}\t{st:?}\t{}\n", desc.replace(['\n', '\t'], " ")).as_bytes()).unwrap();
    }
}

/// Sizes that need more memory than the machine has: clean errors, in a child under `ulimit -v`.
#[test]
fn huge_sizes_are_clean_errors() {
    if std::env::var_os("SVFT_PROPS_CHILD_LOG").is_some() {
        return;
    }
    let log = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("ffi_props_huge.tsv");
    let mut failures = Vec::new();
    let mut start_from = 0;
    let mut rounds = 0;
    while start_from < HUGE_CASES && rounds < 10 {
        rounds += 1;
        let _ = std::fs::remove_file(&log);
        let out = cli_support::limited(std::env::current_exe().unwrap())
            .args(["huge_sizes_child", "--exact", "--nocapture", "--test-threads", "1"])
            .env("SVFT_PROPS_CHILD_LOG", &log)
            .output()
            .expect("run the child");
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let mut open = None;
        let mut last = 0;
        for line in text.lines() {
            let f: Vec<&str> = line.split('\t').collect();
            match f[..] {
                ["B", i] => open = i.parse::<usize>().ok(),
                ["E", i, st, desc] => {
                    open = None;
                    last = i.parse::<usize>().unwrap() + 1;
                    if st == "Ok" || st == "Panic" {
                        failures.push(format!("case {i}: {st}: {desc}"));
                    }
                }
                _ => {}
            }
        }
        match open {
            Some(i) => {
                failures.push(format!(
                    "case {i} killed the process ({:?}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).lines().rev().take(3).collect::<Vec<_>>().join(" | ")
                ));
                // The child always starts at case 0: record the crash and stop.
                break;
            }
            None => {
                assert!(out.status.success(), "child failed: {}", String::from_utf8_lossy(&out.stderr));
                start_from = last;
            }
        }
    }
    assert!(failures.is_empty(), "{} huge-size cases failed:\n{}", failures.len(), failures.join("\n"));
}
