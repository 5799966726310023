//! The `svft_*` functions. Each body runs under [`guard`]: status code out, no unwinding.

use std::ffi::{c_char, c_void, CStr};

use super::buffers::{
    c_str, check_disjoint, check_len, mul, opt_out_ptr, out_ptr, parse_dtype, preflight, read_as_f32, span,
};
use super::cuda;
pub use super::registry::SvftLayer;
use super::registry::{self, Backend, Layer};
use super::status::{fail, guard, set_last_error, FfiResult, SvftStatus};
use super::{SvftBackend, SvftDtype, SvftPlan, SVFT_ABI_VERSION};
use crate::cpu::CpuLayer;
use crate::error::check_finite;
use crate::layer::config::{Init, LayerConfig};
use crate::layer::pattern::Pattern;
use crate::layer::plan::{ExecPlan, Plan};
use crate::layer::svd::{thin_svd, Factors};

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

fn parse_plan(value: i32) -> FfiResult<Plan> {
    match value {
        0 => Ok(Plan::Auto),
        1 => Ok(Plan::Factored),
        2 => Ok(Plan::Merged),
        3 => Ok(Plan::SmallN),
        _ => fail(SvftStatus::InvalidArgument, format!("unknown plan value {value}")),
    }
}

/// The CPU backend takes host pointers and no stream.
fn cpu_stream(stream: *mut c_void) -> FfiResult {
    if !stream.is_null() {
        return fail(SvftStatus::InvalidArgument, "stream must be NULL on the CPU backend");
    }
    Ok(())
}

/// Activations and merged weights are f32 on the CPU backend.
fn cpu_dtype(value: i32) -> FfiResult {
    match parse_dtype(value)? {
        SvftDtype::F32 => Ok(()),
        other => fail(SvftStatus::UnsupportedDtype, format!("the CPU backend computes in f32, not {}", other.name())),
    }
}

fn parse_pattern(spec: *const c_char) -> FfiResult<Pattern> {
    // SAFETY: the caller passes NULL or a NUL-terminated string.
    let spec = unsafe { c_str("pattern", spec) }?;
    Ok(spec.parse::<Pattern>()?)
}

fn register_cpu(cpu: CpuLayer, svd_residual: f64, out: *mut *mut SvftLayer) -> FfiResult {
    register(Backend::Cpu(cpu), svd_residual, out)
}

fn register(backend: Backend, svd_residual: f64, out: *mut *mut SvftLayer) -> FfiResult {
    let handle = registry::insert(Layer { backend, svd_residual });
    // SAFETY: `out` was checked by out_ptr at the start of the call.
    unsafe { out.write(handle) };
    Ok(())
}

/// Checks `out` and clears `*out`, so that it is NULL on every failure after this point.
fn take_out(out: *mut *mut SvftLayer) -> FfiResult<*mut *mut SvftLayer> {
    let out = out_ptr("out", out)?;
    // SAFETY: checked non-null and aligned.
    unsafe { out.write(std::ptr::null_mut()) };
    Ok(out)
}

/// Reads an optional bias (`NULL` with `bias_len` 0 means none).
fn read_bias(bias: *const c_void, bias_len: usize, dt: SvftDtype, d_out: usize) -> FfiResult<Option<Vec<f32>>> {
    if bias.is_null() && bias_len == 0 {
        return Ok(None);
    }
    check_len("bias (d_out)", bias_len, d_out)?;
    // SAFETY: the caller provides bias_len elements of dt at bias.
    Ok(Some(unsafe { read_as_f32("bias", bias, dt, bias_len) }?))
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
        let backend = parse_backend(backend)?;
        let dt = parse_dtype(dtype)?;
        let config =
            LayerConfig { pattern: parse_pattern(pattern)?, init: parse_init(init)?, gate, plan: Plan::Auto, seed };
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
        if backend == SvftBackend::Cuda {
            if !(bias.is_null() && bias_len == 0) {
                check_len("bias (d_out)", bias_len, d_out)?;
                span("bias", bias, bias_len, dt.size())?;
            }
            // SAFETY: the caller vouches for the device buffers' lengths.
            let (layer, residual) =
                unsafe { cuda::from_weight(weight, dt, weight_len, d_out, d_in, r, &config, bias, bias_len) }?;
            return register(Backend::Cuda(Box::new(layer)), residual, out);
        }
        let bias = read_bias(bias, bias_len, dt, d_out)?;
        let dec = if dt == SvftDtype::F64 {
            // SAFETY: span() checked the pointer; the caller vouches for weight_len elements.
            let w = unsafe { std::slice::from_raw_parts(weight.cast::<f64>(), weight_len) };
            thin_svd(w, d_out, d_in, Some(r))?
        } else {
            // SAFETY: as above.
            let w = unsafe { read_as_f32("weight", weight, dt, weight_len) }?;
            thin_svd(&w, d_out, d_in, Some(r))?
        };
        let cpu = CpuLayer::new(dec.factors, &config, bias)?;
        register_cpu(cpu, dec.residual, out)
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
        let out = take_out(out)?;
        let backend = parse_backend(backend)?;
        let dt = parse_dtype(dtype)?;
        let config =
            LayerConfig { pattern: parse_pattern(pattern)?, init: parse_init(init)?, gate, plan: Plan::Auto, seed };
        if d_out == 0 || d_in == 0 || rank == 0 {
            return fail(SvftStatus::Shape, format!("empty shape: d_out {d_out}, d_in {d_in}, rank {rank}"));
        }
        if rank > d_out.min(d_in) {
            return fail(SvftStatus::InvalidArgument, format!("rank {rank} exceeds min(d_out, d_in)"));
        }
        check_len("U (d_out x rank)", u_len, mul("U", d_out, rank)?)?;
        check_len("s (rank)", s_len, rank)?;
        check_len("V (d_in x rank)", v_len, mul("V", d_in, rank)?)?;
        span("U", u, u_len, dt.size())?;
        span("s", s, s_len, dt.size())?;
        span("V", v, v_len, dt.size())?;
        preflight("the factors", (u_len + s_len + v_len).saturating_mul(8))?;
        if backend == SvftBackend::Cuda {
            if !(bias.is_null() && bias_len == 0) {
                check_len("bias (d_out)", bias_len, d_out)?;
                span("bias", bias, bias_len, dt.size())?;
            }
            // SAFETY: the caller vouches for the device buffers' lengths.
            let layer = unsafe {
                cuda::from_factors(dt, d_out, d_in, (u, u_len), (s, s_len), (v, v_len), &config, bias, bias_len)
            }?;
            return register(Backend::Cuda(Box::new(layer)), f64::NAN, out);
        }
        let bias = read_bias(bias, bias_len, dt, d_out)?;
        // SAFETY: spans checked; the caller vouches for the lengths.
        let (u, s, v) = unsafe {
            (read_as_f32("U", u, dt, u_len)?, read_as_f32("s", s, dt, s_len)?, read_as_f32("V", v, dt, v_len)?)
        };
        let factors = Factors::new(d_out, d_in, u, s, v)?;
        let cpu = CpuLayer::new(factors, &config, bias)?;
        register_cpu(cpu, f64::NAN, out)
    })
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

/// Writes the layer's shape: `d_out`, `d_in`, rank `r` and `|Omega|` (`nnz`, the number of
/// coefficients). Each output may be NULL when not wanted.
///
/// # Safety
/// Outputs must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn svft_layer_shape(
    layer: *const SvftLayer,
    d_out: *mut usize,
    d_in: *mut usize,
    rank: *mut usize,
    nnz: *mut usize,
) -> SvftStatus {
    guard("svft_layer_shape", || {
        let outs = [
            opt_out_ptr("d_out", d_out)?,
            opt_out_ptr("d_in", d_in)?,
            opt_out_ptr("rank", rank)?,
            opt_out_ptr("nnz", nnz)?,
        ];
        registry::with(layer, |l| {
            let d = l.dims();
            for (p, v) in outs.into_iter().zip([d.d_out, d.d_in, d.r, d.nnz]) {
                // SAFETY: checked non-null and aligned.
                p.into_iter().for_each(|p| unsafe { p.write(v) });
            }
            Ok(())
        })
    })
}

/// Writes the layer's backend (an `SvftBackend`), whether its gate is on, and its trainable
/// parameter count (`nnz`, +1 with the gate). Each output may be NULL.
///
/// # Safety
/// Outputs must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn svft_layer_info(
    layer: *const SvftLayer,
    backend: *mut i32,
    gate: *mut bool,
    trainable_params: *mut usize,
) -> SvftStatus {
    guard("svft_layer_info", || {
        let (b, g, t) = (
            opt_out_ptr("backend", backend)?,
            opt_out_ptr("gate", gate)?,
            opt_out_ptr("trainable_params", trainable_params)?,
        );
        registry::with(layer, |l| {
            // SAFETY (all three): checked non-null and aligned.
            b.into_iter().for_each(|p| unsafe { p.write(l.kind() as i32) });
            g.into_iter().for_each(|p| unsafe { p.write(l.gate()) });
            t.into_iter().for_each(|p| unsafe { p.write(l.trainable_params()) });
            Ok(())
        })
    })
}

/// Bytes the layer needs for `n` tokens: `workspace_bytes`, the scratch a forward plus backward
/// pass allocates inside the layer (the saved activations included); `saved_bytes`, what forward
/// keeps for backward (T = X V, `n x r`, on the factored plan; X, `n x d_in`, on the merged
/// one, and the merged W as well on CUDA); `persistent_bytes`, what lives between steps
/// (factors, coefficients, gate, bias). On CUDA these are device bytes of the layer's dtype
/// (f32 for the coefficients' buffers). Each output may be NULL.
///
/// # Safety
/// Outputs must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn svft_layer_memory(
    layer: *const SvftLayer,
    n: usize,
    workspace_bytes: *mut usize,
    saved_bytes: *mut usize,
    persistent_bytes: *mut usize,
) -> SvftStatus {
    guard("svft_layer_memory", || {
        let outs = [
            opt_out_ptr("workspace_bytes", workspace_bytes)?,
            opt_out_ptr("saved_bytes", saved_bytes)?,
            opt_out_ptr("persistent_bytes", persistent_bytes)?,
        ];
        if n == 0 {
            return fail(SvftStatus::Shape, "n (tokens) must be positive");
        }
        registry::with(layer, |l| {
            let (ws, saved, persistent) = match &l.backend {
                Backend::Cpu(layer) => {
                    let (ws, saved) = layer.workspace_model(n);
                    (ws, saved, layer.persistent_bytes())
                }
                Backend::Cuda(c) => {
                    let (ws, saved) = c.workspace_model(n);
                    (ws, saved, c.persistent_bytes())
                }
            };
            for (p, v) in outs.into_iter().zip([ws, saved, persistent]) {
                // SAFETY: checked non-null and aligned.
                p.into_iter().for_each(|p| unsafe { p.write(v) });
            }
            Ok(())
        })
    })
}

/// Writes `||U diag(s) V^T - W0||_F / ||W0||_F` of the SVD that built the layer (NaN for a
/// layer built from factors).
///
/// # Safety
/// `out` must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn svft_layer_svd_residual(layer: *const SvftLayer, out: *mut f64) -> SvftStatus {
    guard("svft_layer_svd_residual", || {
        let out = out_ptr("out", out)?;
        // SAFETY: checked non-null and aligned.
        registry::with(layer, |l| {
            unsafe { out.write(l.svd_residual) };
            Ok(())
        })
    })
}

/// Chooses the execution plan (an `SvftPlan`; default AUTO). Forgets the saved forward pass.
///
/// # Safety
/// Any pointer value is accepted for `layer`.
#[no_mangle]
pub unsafe extern "C" fn svft_layer_set_plan(layer: *mut SvftLayer, plan: i32) -> SvftStatus {
    guard("svft_layer_set_plan", || {
        let p = parse_plan(plan)?;
        registry::with(layer, |l| {
            l.set_plan(p);
            Ok(())
        })
    })
}

/// Measured plan choice: times every plan (forward + backward on random inputs; FACTORED and
/// MERGED, plus SMALL_N for n <= 64 on CUDA) at `count` token counts `tokens`, about
/// `seconds` each, and makes AUTO follow the measurements (a fixed plan set with
/// `svft_layer_set_plan` still wins). `tokens` may be NULL with `count` 0: 1, 4, 16, ..., 16384.
/// With `use_cache` nonzero the table is read from, or measured once and written to, the plan
/// cache (`SVFT_PLAN_CACHE`, default `~/.cache/svft/plans.json`) keyed by device, dtype, shape and
/// pattern. Blocks until done (CUDA: on the layer's own stream). Coefficients and gate are unchanged.
///
/// # Safety
/// `tokens` must be NULL (with `count` 0) or point to `count` readable `size_t`.
#[no_mangle]
pub unsafe extern "C" fn svft_layer_calibrate(
    layer: *mut SvftLayer,
    tokens: *const usize,
    count: usize,
    seconds: f64,
    use_cache: i32,
) -> SvftStatus {
    guard("svft_layer_calibrate", || {
        let tokens = if count == 0 && tokens.is_null() {
            crate::layer::calibrate::DEFAULT_TOKENS.to_vec()
        } else {
            if count == 0 {
                return fail(SvftStatus::InvalidArgument, "count is 0 but tokens is not NULL");
            }
            span("tokens", tokens.cast(), count, std::mem::size_of::<usize>())?;
            // SAFETY: checked non-null, aligned and sized.
            unsafe { std::slice::from_raw_parts(tokens, count) }.to_vec()
        };
        if tokens.contains(&0) {
            return fail(SvftStatus::Shape, "every token count must be positive");
        }
        if !(seconds.is_finite() && (0.0..=60.0).contains(&seconds)) {
            return fail(SvftStatus::InvalidArgument, format!("seconds = {seconds}: expected 0 to 60"));
        }
        let options = crate::layer::calibrate::CalibrationOptions {
            tokens,
            budget: std::time::Duration::from_secs_f64(seconds),
            cache: if use_cache != 0 { crate::layer::calibrate::cache_path() } else { None },
        };
        registry::with(layer, |l| match &mut l.backend {
            Backend::Cpu(layer) => layer.calibrate(&options).map(|_| ()).map_err(Into::into),
            Backend::Cuda(c) => c.calibrate(&options),
        })
    })
}

/// Writes the plan (an `SvftPlan`, never AUTO) that forward runs for `n` tokens.
///
/// # Safety
/// `plan` must be writable.
#[no_mangle]
pub unsafe extern "C" fn svft_layer_plan_for(layer: *const SvftLayer, n: usize, plan: *mut i32) -> SvftStatus {
    guard("svft_layer_plan_for", || {
        let out = out_ptr("plan", plan)?;
        if n == 0 {
            return fail(SvftStatus::Shape, "n (tokens) must be positive");
        }
        registry::with(layer, |l| {
            let p = match &l.backend {
                Backend::Cpu(layer) => layer.plan_for(n),
                Backend::Cuda(c) => c.plan_for(n),
            };
            let v = match p {
                ExecPlan::Factored => SvftPlan::Factored,
                ExecPlan::Merged => SvftPlan::Merged,
                ExecPlan::SmallN => SvftPlan::SmallN,
            };
            // SAFETY: checked non-null and aligned.
            unsafe { out.write(v as i32) };
            Ok(())
        })
    })
}

/// `Y = X W^T (+ bias)` for `n` tokens: `x` is `n x d_in` (`x_len` elements), `y` is
/// `n x d_out` (`y_len`), both row-major of `dtype` (F32 on the CPU backend; the layer's dtype on
/// CUDA) in the backend's memory space; `stream` is the CUstream on CUDA (NULL: the legacy
/// default stream) and must be NULL on the CPU. On CUDA the call only enqueues work: it runs on
/// the layer's stream after the work already on `stream`, and work enqueued on `stream` later
/// runs after it (no host synchronisation). Saves what the next `svft_layer_backward` with the
/// same `n` needs.
///
/// # Safety
/// Pointers must be NULL or valid for the sizes given.
#[no_mangle]
pub unsafe extern "C" fn svft_layer_forward(
    layer: *mut SvftLayer,
    dtype: i32,
    x: *const c_void,
    x_len: usize,
    n: usize,
    y: *mut c_void,
    y_len: usize,
    stream: *mut c_void,
) -> SvftStatus {
    guard("svft_layer_forward", || {
        registry::with(layer, |l| {
            let cpu = match &mut l.backend {
                Backend::Cpu(layer) => layer,
                // SAFETY: the caller vouches for the device buffers and the stream.
                Backend::Cuda(c) => return unsafe { c.forward(dtype, x, x_len, n, y, y_len, stream) },
            };
            cpu_stream(stream)?;
            cpu_dtype(dtype)?;
            let d = cpu.dims();
            if n == 0 {
                return fail(SvftStatus::Shape, "n (tokens) must be positive");
            }
            check_len("x (n x d_in)", x_len, mul("x", n, d.d_in)?)?;
            check_len("y (n x d_out)", y_len, mul("y", n, d.d_out)?)?;
            check_disjoint(&[span("x", x, x_len, 4)?, span("y", y, y_len, 4)?])?;
            preflight("the forward workspace", cpu.workspace_model(n).0)?;
            // SAFETY: checked non-null, aligned, sized and disjoint; the caller vouches for
            // the lengths.
            let (x, y) = unsafe {
                (
                    std::slice::from_raw_parts(x.cast::<f32>(), x_len),
                    std::slice::from_raw_parts_mut(y.cast::<f32>(), y_len),
                )
            };
            Ok(cpu.forward_into(x, n, y)?)
        })
    })
}

/// Backward for the preceding forward of the same `n`: `grad_y` is `dL/dY` (`n x d_out`),
/// `grad_x` receives `dL/dX` (`n x d_in`), both of `dtype`; `grad_m` receives `dL/dM`
/// (`grad_m_len` = nnz f32) and `grad_gamma`, when not NULL, `dL/dgamma` (one f32; 0 without
/// the gate). All in the backend's memory space; `stream` as in `svft_layer_forward`. Fails
/// with `SVFT_STATUS_NO_FORWARD` when no forward with this `n` preceded it since the layer's
/// coefficients, gamma or plan last changed.
///
/// # Safety
/// Pointers must be NULL or valid for the sizes given.
#[no_mangle]
pub unsafe extern "C" fn svft_layer_backward(
    layer: *mut SvftLayer,
    dtype: i32,
    grad_y: *const c_void,
    grad_y_len: usize,
    n: usize,
    grad_x: *mut c_void,
    grad_x_len: usize,
    grad_m: *mut f32,
    grad_m_len: usize,
    grad_gamma: *mut f32,
    stream: *mut c_void,
) -> SvftStatus {
    guard("svft_layer_backward", || {
        registry::with(layer, |l| {
            let cpu = match &mut l.backend {
                Backend::Cpu(layer) => layer,
                Backend::Cuda(c) => {
                    // SAFETY: the caller vouches for the device buffers and the stream.
                    return unsafe {
                        c.backward(
                            dtype, grad_y, grad_y_len, n, grad_x, grad_x_len, grad_m, grad_m_len, grad_gamma, stream,
                        )
                    };
                }
            };
            cpu_stream(stream)?;
            cpu_dtype(dtype)?;
            let d = cpu.dims();
            if n == 0 {
                return fail(SvftStatus::Shape, "n (tokens) must be positive");
            }
            check_len("grad_y (n x d_out)", grad_y_len, mul("grad_y", n, d.d_out)?)?;
            check_len("grad_x (n x d_in)", grad_x_len, mul("grad_x", n, d.d_in)?)?;
            check_len("grad_m (nnz)", grad_m_len, d.nnz)?;
            let mut spans = vec![
                span("grad_y", grad_y, grad_y_len, 4)?,
                span("grad_x", grad_x, grad_x_len, 4)?,
                span("grad_m", grad_m.cast(), grad_m_len, 4)?,
            ];
            if !grad_gamma.is_null() {
                spans.push(span("grad_gamma", grad_gamma.cast(), 1, 4)?);
            }
            check_disjoint(&spans)?;
            // SAFETY: checked non-null, aligned, sized and disjoint.
            let (gy, gx, gm) = unsafe {
                (
                    std::slice::from_raw_parts(grad_y.cast::<f32>(), grad_y_len),
                    std::slice::from_raw_parts_mut(grad_x.cast::<f32>(), grad_x_len),
                    std::slice::from_raw_parts_mut(grad_m, grad_m_len),
                )
            };
            let dgamma = cpu.backward_into(gy, n, gx, gm)?;
            if !grad_gamma.is_null() {
                // SAFETY: checked above.
                unsafe { grad_gamma.write(dgamma) };
            }
            Ok(())
        })
    })
}

/// Copies the coefficients M (`len` = nnz f32, host memory, canonical order: coefficient k
/// belongs to `(rows[k], cols[k])` of `svft_layer_indices`). On CUDA, M lives on the device:
/// this copies it through the host and waits for the layer's queued work (a host synchronisation;
/// call it between steps, not inside one).
///
/// # Safety
/// `m` must be NULL or valid for `len` floats.
#[no_mangle]
pub unsafe extern "C" fn svft_layer_get_coefficients(layer: *const SvftLayer, m: *mut f32, len: usize) -> SvftStatus {
    guard("svft_layer_get_coefficients", || {
        registry::with(layer, |l| {
            check_len("m (nnz)", len, l.dims().nnz)?;
            span("m", m.cast(), len, 4)?;
            let from_device;
            let src = match &l.backend {
                Backend::Cpu(layer) => layer.coefficients(),
                Backend::Cuda(c) => {
                    from_device = c.coefficients()?;
                    &from_device
                }
            };
            // SAFETY: checked non-null, aligned and sized; the layer's own buffer cannot overlap.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), m, len) };
            Ok(())
        })
    })
}

/// Replaces the coefficients M (`len` = nnz finite f32, host memory). Forgets the saved forward.
/// On CUDA the values are uploaded on the layer's stream, after its queued work (the host
/// buffer may be reused as soon as the call returns).
///
/// # Safety
/// `m` must be NULL or valid for `len` floats.
#[no_mangle]
pub unsafe extern "C" fn svft_layer_set_coefficients(layer: *mut SvftLayer, m: *const f32, len: usize) -> SvftStatus {
    guard("svft_layer_set_coefficients", || {
        registry::with(layer, |l| {
            check_len("m (nnz)", len, l.dims().nnz)?;
            span("m", m.cast(), len, 4)?;
            // SAFETY: checked non-null, aligned and sized.
            let m = unsafe { std::slice::from_raw_parts(m, len) };
            match &mut l.backend {
                Backend::Cpu(layer) => Ok(layer.set_coefficients(m)?),
                Backend::Cuda(c) => c.set_coefficients(m),
            }
        })
    })
}

/// Replaces M and, unless `gamma` is NULL, gamma, from memory of the layer's own kind: host
/// memory for a CPU layer (then `stream` must be NULL; values checked finite, as
/// `svft_layer_set_coefficients` / `svft_layer_set_gamma`), device memory of the layer's
/// device for a CUDA layer. On CUDA the copies (and the gate value's computation) run on the
/// layer's stream after the work already on `stream` (a CUstream of the layer's context, NULL
/// for the legacy default stream) and before the work queued there later, and the host never
/// waits: a training loop that keeps M and gamma on the device hands them over every step
/// without a synchronisation. Device values are not checked for finiteness (that would take a
/// host round trip): a NaN there reaches the outputs as in any device operation. Forgets the
/// saved forward.
///
/// # Safety
/// `m` must be NULL or valid for `m_len` floats, `gamma` NULL or valid for one, in the
/// layer's memory space.
#[no_mangle]
pub unsafe extern "C" fn svft_layer_load_parameters(
    layer: *mut SvftLayer,
    m: *const f32,
    m_len: usize,
    gamma: *const f32,
    stream: *mut c_void,
) -> SvftStatus {
    guard("svft_layer_load_parameters", || {
        registry::with(layer, |l| {
            check_len("m (nnz)", m_len, l.dims().nnz)?;
            match &mut l.backend {
                Backend::Cpu(layer) => {
                    cpu_stream(stream)?;
                    span("m", m.cast(), m_len, 4)?;
                    // SAFETY: checked non-null, aligned and sized.
                    let m = unsafe { std::slice::from_raw_parts(m, m_len) };
                    let gamma = if gamma.is_null() {
                        None
                    } else {
                        span("gamma", gamma.cast(), 1, 4)?;
                        // SAFETY: checked non-null and aligned.
                        Some(unsafe { gamma.read() })
                    };
                    // Both checked before either is written: a bad gamma loses nothing.
                    check_finite("gamma", gamma.as_slice())?;
                    layer.set_coefficients(m)?;
                    if let Some(g) = gamma {
                        layer.set_gamma(g)?;
                    }
                    Ok(())
                }
                // SAFETY: the caller's pointers and stream, checked by the backend.
                Backend::Cuda(c) => unsafe { c.load_parameters(m, m_len, gamma, stream) },
            }
        })
    })
}

/// Writes the gate parameter gamma (`g = sigmoid(gamma)` when the gate is on).
///
/// # Safety
/// `gamma` must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn svft_layer_get_gamma(layer: *const SvftLayer, gamma: *mut f32) -> SvftStatus {
    guard("svft_layer_get_gamma", || {
        let out = out_ptr("gamma", gamma)?;
        // SAFETY: checked non-null and aligned.
        registry::with(layer, |l| {
            let gamma = match &l.backend {
                Backend::Cpu(layer) => layer.gamma(),
                Backend::Cuda(c) => c.gamma()?,
            };
            unsafe { out.write(gamma) };
            Ok(())
        })
    })
}

/// Sets gamma (finite) from the host. Forgets the saved forward. On CUDA the gate value g is
/// written to the layer's device state on its stream (the kernels read g from device memory);
/// `svft_layer_load_parameters` sets gamma from device memory instead.
///
/// # Safety
/// Any pointer value is accepted for `layer`.
#[no_mangle]
pub unsafe extern "C" fn svft_layer_set_gamma(layer: *mut SvftLayer, gamma: f32) -> SvftStatus {
    guard("svft_layer_set_gamma", || {
        registry::with(layer, |l| match &mut l.backend {
            Backend::Cpu(layer) => Ok(layer.set_gamma(gamma)?),
            Backend::Cuda(c) => c.set_gamma(gamma),
        })
    })
}

/// Writes the dense adapted weight `U C V^T` (bias not included), row-major `d_out x d_in`
/// (`w_len` elements of `dtype`: F32 on the CPU backend; the layer's dtype or F32 on CUDA) in
/// the backend's memory space; `stream` as in `svft_layer_forward`. On CUDA, `U C` is formed on
/// the host from the device factors (this waits for the layer's queued work), the product by
/// cuBLAS, ordered on `stream` like a forward.
///
/// # Safety
/// `w` must be NULL or valid for `w_len` elements.
#[no_mangle]
pub unsafe extern "C" fn svft_layer_merge(
    layer: *mut SvftLayer,
    dtype: i32,
    w: *mut c_void,
    w_len: usize,
    stream: *mut c_void,
) -> SvftStatus {
    guard("svft_layer_merge", || {
        registry::with(layer, |l| {
            let cpu = match &mut l.backend {
                Backend::Cpu(layer) => layer,
                // SAFETY: the caller vouches for the device buffer and the stream.
                Backend::Cuda(c) => return unsafe { c.merge(dtype, w, w_len, stream) },
            };
            cpu_stream(stream)?;
            cpu_dtype(dtype)?;
            let d = cpu.dims();
            check_len("w (d_out x d_in)", w_len, mul("w", d.d_out, d.d_in)?)?;
            span("w", w, w_len, 4)?;
            preflight("the merged weight", mul("w", w_len, 8)?)?;
            let merged = cpu.merge();
            // SAFETY: checked non-null, aligned and sized; `merged` is ours.
            unsafe { std::ptr::copy_nonoverlapping(merged.as_ptr(), w.cast::<f32>(), w_len) };
            Ok(())
        })
    })
}

/// Copies the frozen factors to host f32 buffers: `u` (`d_out x r`), `s` (`r`), `v`
/// (`d_in x r`), row-major. Any of them may be NULL (its length is then ignored). On CUDA they
/// are read back from the device as the layer holds them (U and V rounded to its dtype, s in
/// f32), after the layer's queued work.
///
/// # Safety
/// Non-NULL pointers must be valid for their lengths.
#[no_mangle]
pub unsafe extern "C" fn svft_layer_factors(
    layer: *const SvftLayer,
    u: *mut f32,
    u_len: usize,
    s: *mut f32,
    s_len: usize,
    v: *mut f32,
    v_len: usize,
) -> SvftStatus {
    guard("svft_layer_factors", || {
        registry::with(layer, |l| {
            let from_device;
            let (fu, fs, fv) = match &l.backend {
                Backend::Cpu(layer) => {
                    let f = layer.factors();
                    (&f.u, &f.s, &f.v)
                }
                Backend::Cuda(c) => {
                    from_device = c.factors()?;
                    (&from_device.0, &from_device.1, &from_device.2)
                }
            };
            for (what, dst, len, src) in [("u", u, u_len, fu), ("s", s, s_len, fs), ("v", v, v_len, fv)] {
                if dst.is_null() {
                    continue;
                }
                check_len(what, len, src.len())?;
                span(what, dst.cast(), len, 4)?;
                // SAFETY: checked non-null, aligned and sized; the source is ours.
                unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, len) };
            }
            Ok(())
        })
    })
}

/// Copies the pattern's index set: coefficient k sits at `(rows[k], cols[k])` of the `r x r`
/// core (`len` = nnz; duplicates, possible for random patterns, add up). Either output may be
/// NULL.
///
/// # Safety
/// Non-NULL pointers must be valid for `len` elements.
#[no_mangle]
pub unsafe extern "C" fn svft_layer_indices(
    layer: *const SvftLayer,
    rows: *mut u32,
    cols: *mut u32,
    len: usize,
) -> SvftStatus {
    guard("svft_layer_indices", || {
        registry::with(layer, |l| {
            let omega = l.omega();
            check_len("rows/cols (nnz)", len, omega.len())?;
            for (what, dst, src) in [("rows", rows, &omega.rows), ("cols", cols, &omega.cols)] {
                if !dst.is_null() {
                    span(what, dst.cast(), len, 4)?;
                    // SAFETY: checked non-null, aligned and sized; the source is ours.
                    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, len) };
                }
            }
            Ok(())
        })
    })
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
