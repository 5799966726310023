//! The `svft_layer_*` calls on a live layer. Each checks its arguments once, against the
//! layer's core and through [`AbiLayer`]'s backend checks, then calls the layer; none of them
//! matches on the backend. Each body runs under [`guard`]: status code out, no unwinding.

use std::ffi::c_void;

use super::buffers::{check_disjoint, check_len, mul, opt_out_ptr, out_ptr, parse_dtype, span, try_collect};
use super::exports::{parse_plan, SvftLayer};
use super::layer::AbiLayer;
use super::registry;
use super::status::{fail, guard, FfiResult, SvftStatus};
use super::{SvftDtype, SvftPlan};
use crate::layer::plan::{Dims, ExecPlan};

/// The checks forward and backward share: the activation dtype and the stream this layer
/// takes, a positive token count. Returns the dtype and the layer's dimensions.
fn step_args(layer: &dyn AbiLayer, dtype: i32, stream: *mut c_void, n: usize) -> FfiResult<(SvftDtype, Dims)> {
    let dt = parse_dtype(dtype)?;
    layer.check_dtype(dt, false)?;
    layer.check_stream(stream)?;
    if n == 0 {
        return fail(SvftStatus::Shape, "n (tokens) must be positive");
    }
    Ok((dt, layer.core().dims()))
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
            let d = l.layer.core().dims();
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
            let core = l.layer.core();
            b.into_iter().for_each(|p| unsafe { p.write(l.layer.backend() as i32) });
            g.into_iter().for_each(|p| unsafe { p.write(core.config().gate) });
            t.into_iter().for_each(|p| unsafe { p.write(core.trainable_params()) });
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
            let [ws, saved, persistent] = l.layer.memory(n);
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
        registry::with_mut(
            layer,
            "svft_layer_set_plan",
            |_| Ok(()),
            |l, ()| {
                l.layer.core_mut().set_plan(p);
                Ok(())
            },
        )
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
            try_collect("tokens", count, unsafe { std::slice::from_raw_parts(tokens, count) }.iter().copied())?
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
        registry::with_mut(layer, "svft_layer_calibrate", |_| Ok(()), |l, ()| l.layer.calibrate(&options))
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
            let v = match l.layer.core().plan_for(n) {
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
    guard("svft_layer_forward", || forward_call(layer, dtype, (x, x_len), n, (y, y_len), None, stream))
}

/// `svft_layer_forward` that hands the saved activations to the caller instead of keeping them
/// in the layer: also writes `T = X V` (`n x r`, `t_len` elements of `dtype`, same memory space)
/// into `t`, which `svft_layer_backward_saved` takes back. The layer keeps no per-call state, so
/// any number of forwards may be in flight before their backwards, in any order (autograd
/// frameworks: a layer used twice in one graph, activation checkpointing, micro-batches). Always
/// runs the factored order: FACTORED, or SMALL_N where the plan choice picks it; a MERGED choice
/// runs FACTORED here (the merged order would save X and W). Forgets what a plain
/// `svft_layer_forward` saved.
///
/// # Safety
/// Pointers must be NULL or valid for the sizes given.
#[no_mangle]
pub unsafe extern "C" fn svft_layer_forward_saving(
    layer: *mut SvftLayer,
    dtype: i32,
    x: *const c_void,
    x_len: usize,
    n: usize,
    y: *mut c_void,
    y_len: usize,
    t: *mut c_void,
    t_len: usize,
    stream: *mut c_void,
) -> SvftStatus {
    guard("svft_layer_forward_saving", || {
        forward_call(layer, dtype, (x, x_len), n, (y, y_len), Some((t, t_len)), stream)
    })
}

/// Both forwards after the guard: checks once, then calls the layer.
fn forward_call(
    layer: *mut SvftLayer,
    dtype: i32,
    (x, x_len): (*const c_void, usize),
    n: usize,
    (y, y_len): (*mut c_void, usize),
    saved: Option<(*mut c_void, usize)>,
    stream: *mut c_void,
) -> FfiResult {
    let call = if saved.is_some() { "svft_layer_forward_saving" } else { "svft_layer_forward" };
    let check = |l: &registry::Layer| -> FfiResult {
        let layer = &*l.layer;
        let (dt, d) = step_args(layer, dtype, stream, n)?;
        check_len("x (n x d_in)", x_len, mul("x", n, d.d_in)?)?;
        check_len("y (n x d_out)", y_len, mul("y", n, d.d_out)?)?;
        let mut spans =
            vec![layer.check_buffer("x", x, x_len, dt.size())?, layer.check_buffer("y", y, y_len, dt.size())?];
        if let Some((t, t_len)) = saved {
            check_len("t (n x r)", t_len, mul("t", n, d.r)?)?;
            spans.push(layer.check_buffer("t", t, t_len, dt.size())?);
        }
        check_disjoint(&spans)
    };
    // SAFETY: checked buffers of the layer's memory, dtype and shape, disjoint.
    registry::with_mut(layer, call, check, |l, ()| unsafe { l.layer.forward((x, x_len), n, (y, y_len), saved, stream) })
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
        let grads = Grads { grad_y: (grad_y, grad_y_len), grad_x: (grad_x, grad_x_len), grad_m: (grad_m, grad_m_len) };
        backward_call(layer, dtype, None, n, grads, grad_gamma, stream)
    })
}

/// Backward of a `svft_layer_forward_saving`: `t` is the `T` that forward wrote (`t_len` =
/// `n x r` elements of `dtype`), the other arguments as in `svft_layer_backward`. Uses the
/// layer's current M and gamma, which must be the ones that forward used (hand them over again
/// with `svft_layer_load_parameters` if the layer ran with others since). Needs no preceding
/// call on the layer.
///
/// # Safety
/// Pointers must be NULL or valid for the sizes given.
#[no_mangle]
pub unsafe extern "C" fn svft_layer_backward_saved(
    layer: *mut SvftLayer,
    dtype: i32,
    t: *const c_void,
    t_len: usize,
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
    guard("svft_layer_backward_saved", || {
        let grads = Grads { grad_y: (grad_y, grad_y_len), grad_x: (grad_x, grad_x_len), grad_m: (grad_m, grad_m_len) };
        backward_call(layer, dtype, Some((t, t_len)), n, grads, grad_gamma, stream)
    })
}

/// Backward's gradient buffers as the caller passed them.
struct Grads {
    grad_y: (*const c_void, usize),
    grad_x: (*mut c_void, usize),
    grad_m: (*mut f32, usize),
}

/// Both backwards after the guard: checks once, then calls the layer.
fn backward_call(
    layer: *mut SvftLayer,
    dtype: i32,
    saved: Option<(*const c_void, usize)>,
    n: usize,
    Grads { grad_y, grad_x, grad_m }: Grads,
    grad_gamma: *mut f32,
    stream: *mut c_void,
) -> FfiResult {
    let call = if saved.is_some() { "svft_layer_backward_saved" } else { "svft_layer_backward" };
    let check = |l: &registry::Layer| -> FfiResult {
        let layer = &*l.layer;
        let (dt, d) = step_args(layer, dtype, stream, n)?;
        check_len("grad_y (n x d_out)", grad_y.1, mul("grad_y", n, d.d_out)?)?;
        check_len("grad_x (n x d_in)", grad_x.1, mul("grad_x", n, d.d_in)?)?;
        check_len("grad_m (nnz)", grad_m.1, d.nnz)?;
        let mut spans = vec![
            layer.check_buffer("grad_y", grad_y.0, grad_y.1, dt.size())?,
            layer.check_buffer("grad_x", grad_x.0, grad_x.1, dt.size())?,
            layer.check_buffer("grad_m", grad_m.0.cast(), grad_m.1, 4)?,
        ];
        if !grad_gamma.is_null() {
            spans.push(layer.check_buffer("grad_gamma", grad_gamma.cast(), 1, 4)?);
        }
        if let Some((t, t_len)) = saved {
            check_len("t (n x r)", t_len, mul("t", n, d.r)?)?;
            spans.push(layer.check_buffer("t", t, t_len, dt.size())?);
        }
        check_disjoint(&spans)
    };
    // SAFETY: checked buffers of the layer's memory, dtype and shape, disjoint.
    registry::with_mut(layer, call, check, |l, ()| unsafe {
        l.layer.backward(saved, grad_y, n, grad_x, grad_m, grad_gamma, stream)
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
            check_len("m (nnz)", len, l.layer.core().dims().nnz)?;
            span("m", m.cast(), len, 4)?;
            let src = l.layer.coefficients()?;
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
        registry::with_mut(
            layer,
            "svft_layer_set_coefficients",
            |l| {
                check_len("m (nnz)", len, l.layer.core().dims().nnz)?;
                span("m", m.cast(), len, 4)?;
                // SAFETY: checked non-null, aligned and sized.
                Ok(unsafe { std::slice::from_raw_parts(m, len) })
            },
            |l, m| l.layer.set_coefficients(m),
        )
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
        let check = |l: &registry::Layer| -> FfiResult {
            let layer = &*l.layer;
            check_len("m (nnz)", m_len, layer.core().dims().nnz)?;
            layer.check_stream(stream)?;
            layer.check_buffer("m", m.cast(), m_len, 4)?;
            if !gamma.is_null() {
                layer.check_buffer("gamma", gamma.cast(), 1, 4)?;
            }
            Ok(())
        };
        // SAFETY: checked buffers of the layer's memory.
        registry::with_mut(layer, "svft_layer_load_parameters", check, |l, ()| unsafe {
            l.layer.load_parameters((m, m_len), gamma, stream)
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
            let gamma = l.layer.gamma()?;
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
        registry::with_mut(layer, "svft_layer_set_gamma", |_| Ok(()), |l, ()| l.layer.set_gamma(gamma))
    })
}

/// Writes the dense adapted weight `U C V^T` (bias not included), row-major `d_out x d_in`
/// (`w_len` elements of `dtype`: F32 on the CPU backend; the layer's dtype or F32 on CUDA) in
/// the backend's memory space; `stream` as in `svft_layer_forward`. On CUDA in the layer's dtype,
/// W is formed on the device as the merged plan forms it, ordered on `stream` like a forward
/// (no host synchronisation); F32 from a 16-bit layer forms `U C` on the host in f32 (this waits
/// for the layer's queued work), then the product by an f32 cuBLAS GEMM ordered on `stream`.
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
        let check = |l: &registry::Layer| -> FfiResult<SvftDtype> {
            let layer = &*l.layer;
            let dt = parse_dtype(dtype)?;
            layer.check_dtype(dt, true)?;
            layer.check_stream(stream)?;
            let d = layer.core().dims();
            check_len("w (d_out x d_in)", w_len, mul("w", d.d_out, d.d_in)?)?;
            layer.check_buffer("w", w, w_len, dt.size())?;
            Ok(dt)
        };
        // SAFETY: a checked buffer of the layer's memory, of dtype dt and shape d_out x d_in.
        registry::with_mut(layer, "svft_layer_merge", check, |l, dt| unsafe { l.layer.merge(dt, (w, w_len), stream) })
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
            let [fu, fs, fv] = l.layer.factors()?;
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
            let omega = l.layer.core().omega();
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
