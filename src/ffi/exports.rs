//! The library-level `svft_*` functions (version, backends, status names) and the ones that
//! make and destroy layers; the calls on a live layer are in `layer_calls.rs`. Each body runs under
//! [`guard`]: status code out, no unwinding. Making a layer is the one place that matches on
//! the backend.

use std::ffi::{c_char, c_void, CStr};

use super::buffers::{c_str, check_len, mul, out_ptr, parse_dtype, preflight, span, try_collect};
use super::layer::{AbiLayer, In};
pub use super::registry::SvftLayer;
use super::registry::{self, Layer};
use super::status::{fail, guard, set_last_error, FfiResult, SvftStatus};
use super::{cpu, cuda};
use super::{SvftBackend, SvftDtype, SVFT_ABI_VERSION};
use crate::layer::config::{Init, LayerConfig};
use crate::layer::pattern::{Omega, Pattern};
use crate::layer::plan::Plan;

/// Parses an `int32_t` backend value. Whether CUDA can run is checked later, after the
/// checks that need no device, so that bad arguments are reported alike on every machine.
fn parse_backend(value: i32) -> FfiResult<SvftBackend> {
    match value {
        0 => Ok(SvftBackend::Cpu),
        1 => Ok(SvftBackend::Cuda),
        _ => fail(SvftStatus::InvalidArgument, format!("unknown backend value {value}")),
    }
}

fn parse_init(value: i32) -> FfiResult<Init> {
    match value {
        0 => Ok(Init::Zero),
        1 => Ok(Init::Official),
        _ => fail(SvftStatus::InvalidArgument, format!("unknown init value {value}")),
    }
}

pub(super) fn parse_plan(value: i32) -> FfiResult<Plan> {
    match value {
        0 => Ok(Plan::Auto),
        1 => Ok(Plan::Factored),
        2 => Ok(Plan::Merged),
        3 => Ok(Plan::SmallN),
        _ => fail(SvftStatus::InvalidArgument, format!("unknown plan value {value}")),
    }
}

fn parse_pattern(spec: *const c_char) -> FfiResult<Pattern> {
    // SAFETY: the caller passes NULL or a NUL-terminated string.
    let spec = unsafe { c_str("pattern", spec) }?;
    Ok(spec.parse::<Pattern>()?)
}

fn register(layer: Box<dyn AbiLayer>, svd_residual: f64, out: *mut *mut SvftLayer) -> FfiResult {
    let handle = registry::insert(Layer { layer, svd_residual });
    // SAFETY: `out` was checked by out_ptr at the start of the call.
    unsafe { out.write(handle) };
    Ok(())
}

/// A new layer's configuration from the creation arguments (plan AUTO).
fn config(pattern: *const c_char, init: i32, gate: bool, seed: u64) -> FfiResult<LayerConfig> {
    Ok(LayerConfig { pattern: parse_pattern(pattern)?, init: parse_init(init)?, gate, plan: Plan::Auto, seed })
}

/// Checks `out` and clears `*out`, so that it is NULL on every failure after this point.
fn take_out(out: *mut *mut SvftLayer) -> FfiResult<*mut *mut SvftLayer> {
    let out = out_ptr("out", out)?;
    // SAFETY: checked non-null and aligned.
    unsafe { out.write(std::ptr::null_mut()) };
    Ok(out)
}

/// Checks an optional bias (`NULL` with `bias_len` 0 means none): `d_out` elements of `dt`.
fn check_bias(bias: *const c_void, bias_len: usize, dt: SvftDtype, d_out: usize) -> FfiResult<In> {
    if !(bias.is_null() && bias_len == 0) {
        check_len("bias (d_out)", bias_len, d_out)?;
        span("bias", bias, bias_len, dt.size())?;
    }
    Ok((bias, bias_len))
}

/// Writes the library version ("MAJOR.MINOR.PATCH", static, NUL-terminated) to `*out`.
///
/// # Safety
/// `out` must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn svft_version(out: *mut *const c_char) -> SvftStatus {
    guard("svft_version", || {
        const VERSION: &CStr = match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
            Ok(v) => v,
            Err(_) => panic!("version string with a NUL"),
        };
        let out = out_ptr("out", out)?;
        // SAFETY: checked non-null and aligned.
        unsafe { out.write(VERSION.as_ptr()) };
        Ok(())
    })
}

/// Writes the ABI version of the loaded library to `*out`; compare with `SVFT_ABI_VERSION`.
///
/// # Safety
/// `out` must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn svft_abi_version(out: *mut u32) -> SvftStatus {
    guard("svft_abi_version", || {
        // SAFETY: checked non-null and aligned.
        unsafe { out_ptr("out", out)?.write(SVFT_ABI_VERSION) };
        Ok(())
    })
}

/// Writes to `*out` whether `backend` (an `SvftBackend`) can run in this process. For CUDA
/// this is the device probe (kernels in this build, driver library, at least one device; run
/// once per process): when it is false, `svft_last_error` says why, although the call succeeds.
///
/// # Safety
/// `out` must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn svft_backend_available(backend: i32, out: *mut bool) -> SvftStatus {
    guard("svft_backend_available", || {
        let out = out_ptr("out", out)?;
        let available = match parse_backend(backend)? {
            SvftBackend::Cpu => true,
            SvftBackend::Cuda => match cuda::available() {
                Ok(_) => true,
                Err(e) => {
                    // The one success that leaves a message: why CUDA cannot run here.
                    set_last_error(e.msg);
                    false
                }
            },
        };
        // SAFETY: checked non-null and aligned.
        unsafe { out.write(available) };
        Ok(())
    })
}

/// Creates a layer by decomposing a row-major `d_out x d_in` weight (`weight_len` elements of
/// `dtype`, any `SvftDtype`) with a thin SVD truncated to `rank` triplets (0: full rank,
/// `min(d_out, d_in)`). `pattern` is a spec string ("plain", "banded:2", "random:16:seed=42",
/// "topk:8", "topk:8:official"); `init` an `SvftInit`; `gate` turns on `g = sigmoid(gamma)`;
/// `seed` seeds the official init. `bias` is NULL (with `bias_len` 0) or `d_out` elements of
/// `dtype`. Weight and bias are in the backend's memory space: host pointers on the CPU,
/// device pointers on CUDA (the layer goes to the weight's device). On CUDA the weight is
/// copied to the host and decomposed by the same CPU SVD as on the CPU backend (so both
/// backends get the same factors), and the layer computes in `dtype` (F64 gives F32); the copy
/// runs on a stream of the library's own, so the caller's writes to weight and bias must be
/// complete (e.g. synchronise the stream that wrote them). On success `*out` is a new handle
/// (free it with `svft_layer_destroy`); on failure it is NULL.
///
/// # Safety
/// Pointers must be NULL or valid for the sizes given.
#[no_mangle]
pub unsafe extern "C" fn svft_layer_from_weight(
    backend: i32,
    weight: *const c_void,
    dtype: i32,
    weight_len: usize,
    d_out: usize,
    d_in: usize,
    rank: usize,
    pattern: *const c_char,
    init: i32,
    gate: bool,
    seed: u64,
    bias: *const c_void,
    bias_len: usize,
    out: *mut *mut SvftLayer,
) -> SvftStatus {
    guard("svft_layer_from_weight", || {
        let out = take_out(out)?;
        let (backend, dt, config) = (parse_backend(backend)?, parse_dtype(dtype)?, config(pattern, init, gate, seed)?);
        if d_out == 0 || d_in == 0 {
            return fail(SvftStatus::Shape, format!("empty weight shape {d_out} x {d_in}"));
        }
        check_len("weight (d_out x d_in)", weight_len, mul("weight", d_out, d_in)?)?;
        span("weight", weight, weight_len, dt.size())?;
        let full = d_out.min(d_in);
        let r = if rank == 0 { full } else { rank };
        if r > full {
            return fail(SvftStatus::InvalidArgument, format!("rank {rank} out of range: must be in 0..={full}"));
        }
        // The weight in f32/f64, the SVD's copies and workspace, the factors.
        let est = weight_len.saturating_mul(24).saturating_add((d_out + d_in).saturating_mul(r).saturating_mul(12));
        preflight("the SVD", est)?;
        let bias = check_bias(bias, bias_len, dt, d_out)?;
        let weight = (weight, weight_len);
        // SAFETY (both): checked spans; the caller vouches for the buffers' lengths.
        let (layer, residual): (Box<dyn AbiLayer>, f64) = match backend {
            SvftBackend::Cpu => {
                let (layer, residual) = unsafe { cpu::from_weight(weight, dt, d_out, d_in, r, &config, bias) }?;
                (Box::new(layer), residual)
            }
            SvftBackend::Cuda => unsafe { cuda::from_weight(weight, dt, d_out, d_in, r, &config, bias) }?,
        };
        register(layer, residual, out)
    })
}

/// Creates a layer from saved factors: `u` (`d_out x rank`, row-major), `s` (`rank`,
/// descending), `v` (`d_in x rank`), all of `dtype` in the backend's memory space (device
/// pointers on CUDA, read like the weight of `svft_layer_from_weight`); the other
/// arguments as in `svft_layer_from_weight` (the pattern is rebuilt from its spec, so random
/// and top-k patterns come out identical for identical factors). Restore trained values with
/// `svft_layer_set_coefficients` / `svft_layer_set_gamma`.
///
/// # Safety
/// Pointers must be NULL or valid for the sizes given.
#[no_mangle]
pub unsafe extern "C" fn svft_layer_from_factors(
    backend: i32,
    dtype: i32,
    d_out: usize,
    d_in: usize,
    rank: usize,
    u: *const c_void,
    u_len: usize,
    s: *const c_void,
    s_len: usize,
    v: *const c_void,
    v_len: usize,
    pattern: *const c_char,
    init: i32,
    gate: bool,
    seed: u64,
    bias: *const c_void,
    bias_len: usize,
    out: *mut *mut SvftLayer,
) -> SvftStatus {
    guard("svft_layer_from_factors", || {
        let args = FactorArgs { backend, dtype, d_out, d_in, rank, u: (u, u_len), s: (s, s_len), v: (v, v_len) };
        from_factors_call(args, pattern, None, (init, gate, seed), (bias, bias_len), out)
    })
}

/// `svft_layer_from_factors` with an explicit index set: coefficient k sits at `(rows[k],
/// cols[k])` of the `rank x rank` core, `nnz` pairs (host memory on every backend; duplicates
/// are separate coefficients whose values add up). `pattern` names the set: for "plain" and
/// "banded:D" the indices must be that band's own, complete and in row-major order (as
/// `svft_layer_indices` reports them); "random:D" or "topk:D" name any other set, e.g. one
/// imported from the official implementation (its `s_row` / `s_col`), which draws its random
/// patterns from the framework's generator. Rows and cols must be below `rank`.
///
/// # Safety
/// Pointers must be NULL or valid for the sizes given.
#[no_mangle]
pub unsafe extern "C" fn svft_layer_from_factors_indexed(
    backend: i32,
    dtype: i32,
    d_out: usize,
    d_in: usize,
    rank: usize,
    u: *const c_void,
    u_len: usize,
    s: *const c_void,
    s_len: usize,
    v: *const c_void,
    v_len: usize,
    pattern: *const c_char,
    rows: *const u32,
    cols: *const u32,
    nnz: usize,
    init: i32,
    gate: bool,
    seed: u64,
    bias: *const c_void,
    bias_len: usize,
    out: *mut *mut SvftLayer,
) -> SvftStatus {
    guard("svft_layer_from_factors_indexed", || {
        let args = FactorArgs { backend, dtype, d_out, d_in, rank, u: (u, u_len), s: (s, s_len), v: (v, v_len) };
        if nnz == 0 {
            return fail(SvftStatus::Shape, "nnz (the number of index pairs) must be positive");
        }
        span("rows", rows.cast(), nnz, 4)?;
        span("cols", cols.cast(), nnz, 4)?;
        preflight("the index set", nnz.saturating_mul(8))?;
        // SAFETY: checked non-null, aligned and sized; the caller vouches for nnz elements.
        let indices = unsafe {
            (
                try_collect("rows", nnz, std::slice::from_raw_parts(rows, nnz).iter().copied())?,
                try_collect("cols", nnz, std::slice::from_raw_parts(cols, nnz).iter().copied())?,
            )
        };
        from_factors_call(args, pattern, Some(indices), (init, gate, seed), (bias, bias_len), out)
    })
}

/// The factor arguments both factor constructors take.
struct FactorArgs {
    backend: i32,
    dtype: i32,
    d_out: usize,
    d_in: usize,
    rank: usize,
    u: In,
    s: In,
    v: In,
}

/// Both factor constructors after the guard: checks once, then builds on the backend.
fn from_factors_call(
    a: FactorArgs,
    pattern: *const c_char,
    indices: Option<(Vec<u32>, Vec<u32>)>,
    (init, gate, seed): (i32, bool, u64),
    (bias, bias_len): In,
    out: *mut *mut SvftLayer,
) -> FfiResult {
    let FactorArgs { backend, dtype, d_out, d_in, rank, u, s, v } = a;
    let out = take_out(out)?;
    let (backend, dt, config) = (parse_backend(backend)?, parse_dtype(dtype)?, config(pattern, init, gate, seed)?);
    if d_out == 0 || d_in == 0 || rank == 0 {
        return fail(SvftStatus::Shape, format!("empty shape: d_out {d_out}, d_in {d_in}, rank {rank}"));
    }
    if rank > d_out.min(d_in) {
        return fail(SvftStatus::InvalidArgument, format!("rank {rank} exceeds min(d_out, d_in)"));
    }
    check_len("U (d_out x rank)", u.1, mul("U", d_out, rank)?)?;
    check_len("s (rank)", s.1, rank)?;
    check_len("V (d_in x rank)", v.1, mul("V", d_in, rank)?)?;
    span("U", u.0, u.1, dt.size())?;
    span("s", s.0, s.1, dt.size())?;
    span("V", v.0, v.1, dt.size())?;
    preflight("the factors", (u.1 + s.1 + v.1).saturating_mul(8))?;
    let bias = check_bias(bias, bias_len, dt, d_out)?;
    // The explicit index set, checked against the pattern and the rank before any upload.
    let omega = indices.map(|(rows, cols)| Omega::from_indices(config.pattern, rank, rows, cols)).transpose()?;
    // SAFETY (both): checked spans; the caller vouches for the buffers' lengths.
    let layer: Box<dyn AbiLayer> = match backend {
        SvftBackend::Cpu => Box::new(unsafe { cpu::from_factors(dt, (d_out, d_in), [u, s, v], &config, omega, bias) }?),
        SvftBackend::Cuda => unsafe { cuda::from_factors(dt, (d_out, d_in), [u, s, v], &config, omega, bias) }?,
    };
    register(layer, f64::NAN, out)
}

/// Destroys a layer. Later calls with the handle (including a second destroy) return
/// `SVFT_STATUS_INVALID_HANDLE`.
///
/// # Safety
/// Any pointer value is accepted.
#[no_mangle]
pub unsafe extern "C" fn svft_layer_destroy(layer: *mut SvftLayer) -> SvftStatus {
    guard("svft_layer_destroy", || registry::remove(layer))
}

/// For tests of the ABI itself: panics inside the guard, so it returns `SVFT_STATUS_PANIC`
/// with a message, proving that no panic crosses the C boundary.
#[no_mangle]
pub extern "C" fn svft_selftest_panic() -> SvftStatus {
    guard("svft_selftest_panic", || panic!("deliberate panic from svft_selftest_panic"))
}

/// Writes to `*out` a static NUL-terminated name for `status` (e.g. "SVFT_STATUS_SHAPE").
/// An unknown value is `SVFT_STATUS_INVALID_ARGUMENT`.
///
/// # Safety
/// `out` must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn svft_status_name(status: i32, out: *mut *const c_char) -> SvftStatus {
    guard("svft_status_name", || {
        let out = out_ptr("out", out)?;
        let Some(s) = SvftStatus::ALL.iter().find(|s| **s as i32 == status) else {
            return fail(SvftStatus::InvalidArgument, format!("unknown status code {status}"));
        };
        // SAFETY: out_ptr checked null and alignment.
        unsafe { out.write(s.name().as_ptr()) };
        Ok(())
    })
}
