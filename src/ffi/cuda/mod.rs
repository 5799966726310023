//! The CUDA backend of the C ABI: a [`crate::cuda::CudaLayer`] of each dtype behind a handle
//! ([`CudaRecord`], an [`AbiLayer`]), on device pointers and a `CUstream` that belong to the
//! caller. The twin of `ffi/cpu.rs`; what a device pointer is and how it is borrowed is in
//! `memory.rs`.
//!
//! - Caller buffers are borrowed for one call: the raw `CUdeviceptr` is wrapped as a cudarc
//!   slice ([`Borrowed`]) that is `leak`ed, never freed, when the call ends (on every path,
//!   unwinding included).
//! - Every layer runs on a stream of its own. Around each call that touches device memory
//!   the caller's stream and the layer's are joined both ways with events: the layer waits for
//!   the caller's earlier work, the caller's later work waits for the layer. Nothing here
//!   synchronises the host in forward, backward or merge's GEMM; coefficient reads and writes,
//!   factor reads and creation do (they copy through host memory).
//! - Before a device pointer is used, the driver is asked what it is (`cuPointerGetAttributes`
//!   on its first and last byte): device memory of the layer's device, not host (pageable or
//!   pinned) and not managed. A host pointer is an `INVALID_ARGUMENT`, never a fault.
//! - The calling thread's current CUDA context is restored when a call returns.

mod bank;
mod join;
mod memory;

use std::borrow::Cow;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{result, CudaSlice};
use half::{bf16, f16};

use super::bank::AbiBank;
use super::buffers::{check_len, mul, preflight, Span};
use super::layer::{AbiLayer, In, Out};
use super::status::{fail, FfiError, FfiResult, SvftStatus};
use super::{SvftBackend, SvftDtype};
use crate::cuda::{device_count, driver_err, CudaLayer, Dtype, Gpu};
use crate::error::Error;
use crate::layer::calibrate::CalibrationOptions;
use crate::layer::config::LayerConfig;
use crate::layer::core::LayerCore;
use crate::layer::pattern::Omega;
use crate::layer::svd::{thin_svd, Factors};
use join::StreamJoin;
use memory::{device_as_f32, device_buffer, device_buffer_on, dtoh, Borrowed, ContextGuard, InContext};

/// The number of CUDA devices, or `CUDA_UNAVAILABLE` with the device probe's reason.
pub(crate) fn available() -> FfiResult<usize> {
    device_count().map_err(|e| {
        let why = match e {
            Error::Cuda(msg) => msg,
            other => other.to_string(),
        };
        FfiError::new(SvftStatus::CudaUnavailable, format!("the CUDA backend is unavailable: {why}"))
    })
}

fn drv(what: &str, e: result::DriverError) -> FfiError {
    driver_err(what, e).into()
}

/// One [`Gpu`] per device for the whole process (loading the kernels is not cheap).
fn gpu(ordinal: usize) -> FfiResult<Arc<Gpu>> {
    static GPUS: OnceLock<Mutex<HashMap<usize, Arc<Gpu>>>> = OnceLock::new();
    let mut map = GPUS.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    if let Some(g) = map.get(&ordinal) {
        return Ok(g.clone());
    }
    // Gpu::new turns cudarc's per-buffer event tracking off (the caller's buffers are ordered
    // with explicit events, see the module doc).
    let g = Gpu::new(ordinal)?;
    map.insert(ordinal, g.clone());
    Ok(g)
}

/// The `SvftDtype` of a layer computing in `T`.
fn dtype_of<T: Dtype>() -> SvftDtype {
    match T::SUFFIX {
        "bf16" => SvftDtype::Bf16,
        "f16" => SvftDtype::F16,
        _ => SvftDtype::F32,
    }
}

struct Inner<T: Dtype> {
    layer: CudaLayer<T>,
    ordinal: usize,
    has_bias: bool,
    /// Orders the layer's stream with the caller's on every call (shared so that a call can
    /// hold it while `f` borrows the rest).
    join: Arc<StreamJoin>,
    /// dL/dgamma when the caller passes no buffer for it.
    dgamma: CudaSlice<f32>,
}

/// A CUDA layer computing in `T`, with its stream, events and device, as a handle holds it.
pub(crate) struct CudaRecord<T: Dtype> {
    inner: InContext<Inner<T>>,
}

/// The activation dtype a layer computes in: that of its weight or factors, f64 giving f32.
fn compute_dtype(dt: SvftDtype) -> SvftDtype {
    if dt == SvftDtype::F64 {
        SvftDtype::F32
    } else {
        dt
    }
}

/// Builds the layer on `ordinal` in the dtype `dt` computes in: the only place the CUDA side
/// of the C ABI matches on a dtype.
fn build(
    ordinal: usize,
    dt: SvftDtype,
    factors: &Factors,
    config: &LayerConfig,
    omega: Option<Omega>,
    bias: Option<Vec<f32>>,
) -> FfiResult<Box<dyn AbiLayer>> {
    let omega = match omega {
        Some(o) => o,
        None => config.pattern.omega(factors)?,
    };
    Ok(match compute_dtype(dt) {
        SvftDtype::Bf16 => Box::new(record::<bf16>(ordinal, factors, omega, config, bias)?),
        SvftDtype::F16 => Box::new(record::<f16>(ordinal, factors, omega, config, bias)?),
        _ => Box::new(record::<f32>(ordinal, factors, omega, config, bias)?),
    })
}

/// The layer on `ordinal`: uploads the factors on a new stream of its own.
fn record<T: Dtype>(
    ordinal: usize,
    factors: &Factors,
    omega: Omega,
    config: &LayerConfig,
    bias: Option<Vec<f32>>,
) -> FfiResult<CudaRecord<T>> {
    let gpu = gpu(ordinal)?;
    let _ctx = ContextGuard::new(Some(&gpu))?;
    let stream = gpu.context().new_stream().map_err(|e| drv("creating the layer's stream", e))?;
    let layer = CudaLayer::<T>::with_omega(gpu.clone(), stream.clone(), factors, omega, config, bias.as_deref())?;
    let inner = Inner {
        join: Arc::new(StreamJoin::new(&gpu)?),
        dgamma: stream.alloc_zeros::<f32>(1).map_err(|e| drv("allocating dgamma", e))?,
        layer,
        ordinal,
        has_bias: bias.is_some(),
    };
    Ok(CudaRecord { inner: InContext::new(gpu, inner) })
}

/// What both CUDA creation paths stage before they build: the device the inputs are on (that
/// of the first, every other on it too), a stream of the library's own there for the host
/// copies, and the bias read to the host. The calling thread's context is restored on drop.
struct Staging {
    ordinal: usize,
    stream: Arc<cudarc::driver::CudaStream>,
    bias: Option<Vec<f32>>,
    _ctx: ContextGuard,
}

/// Checks that CUDA runs and that `inputs` (and the bias, unless NULL with length 0) are device
/// buffers of `dt` on one device, then stages them (see [`Staging`]).
///
/// # Safety
/// The buffers must be valid for their lengths in `dt`.
unsafe fn stage(
    dt: SvftDtype,
    inputs: &[(&'static str, In)],
    (bias, bias_len): In,
    d_out: usize,
) -> FfiResult<Staging> {
    available()?;
    let ctx = ContextGuard::new(None)?;
    let (first, (p, len)) = inputs[0];
    let (_, ordinal) = device_buffer(first, p, len, dt.size())?;
    for &(what, (p, len)) in &inputs[1..] {
        device_buffer_on(what, p, len, dt.size(), ordinal)?;
    }
    let has_bias = !(bias.is_null() && bias_len == 0);
    if has_bias {
        check_len("bias (d_out)", bias_len, d_out)?;
        device_buffer_on("bias", bias, bias_len, dt.size(), ordinal)?;
    }
    let gpu = gpu(ordinal)?;
    gpu.context().bind_to_thread().map_err(|e| drv("binding the CUDA context", e))?;
    let stream = gpu.context().new_stream().map_err(|e| drv("creating a stream", e))?;
    // SAFETY: a checked device buffer of this length; the caller vouches for it.
    let bias = if has_bias { Some(unsafe { device_as_f32(&stream, "bias", bias, dt, bias_len) }?) } else { None };
    Ok(Staging { ordinal, stream, bias, _ctx: ctx })
}

/// `svft_layer_from_weight` on CUDA, after the host-side checks: `weight` and `bias` are device
/// pointers. The weight is copied to the host and decomposed there by the CPU SVD (the same
/// factors as the CPU backend for the same weight), then the factors are uploaded.
///
/// # Safety
/// `weight` (and `bias` when not NULL) must be valid for their lengths in `dt`.
pub(crate) unsafe fn from_weight(
    (weight, weight_len): In,
    dt: SvftDtype,
    d_out: usize,
    d_in: usize,
    rank: usize,
    config: &LayerConfig,
    bias: In,
) -> FfiResult<(Box<dyn AbiLayer>, f64)> {
    // SAFETY (all): per the contract; stage() checked the buffers.
    let st = unsafe { stage(dt, &[("weight", (weight, weight_len))], bias, d_out) }?;
    let dec = if dt == SvftDtype::F64 {
        let w = unsafe { dtoh::<f64>(&st.stream, "weight", weight, weight_len) }?;
        thin_svd(&w, d_out, d_in, Some(rank))?
    } else {
        let w = unsafe { device_as_f32(&st.stream, "weight", weight, dt, weight_len) }?;
        thin_svd(&w, d_out, d_in, Some(rank))?
    };
    Ok((build(st.ordinal, dt, &dec.factors, config, None, st.bias)?, dec.residual))
}

/// `svft_layer_from_factors` on CUDA: `u`, `s`, `v` (and `bias`) are device pointers of `dt`.
///
/// # Safety
/// Pointers must be valid for their lengths in `dt`.
pub(crate) unsafe fn from_factors(
    dt: SvftDtype,
    (d_out, d_in): (usize, usize),
    [u, s, v]: [In; 3],
    config: &LayerConfig,
    omega: Option<Omega>,
    bias: In,
) -> FfiResult<Box<dyn AbiLayer>> {
    // SAFETY (all): per the contract; stage() checked the buffers.
    let st = unsafe { stage(dt, &[("U", u), ("s", s), ("V", v)], bias, d_out) }?;
    let read = |what, (p, len): In| unsafe { device_as_f32(&st.stream, what, p, dt, len) };
    let factors = Factors::new(d_out, d_in, read("U", u)?, read("s", s)?, read("V", v)?)?;
    build(st.ordinal, dt, &factors, config, omega, st.bias)
}

/// Writes `U C V^T` into the caller's device buffer `w` (`out` is the layer's dtype or f32), on
/// the layer's stream: [`CudaLayer::merge_into`] in the layer's dtype (the merged plan's own fold
/// and GEMM), [`CudaLayer::merge_into_f32`] for f32 from a 16-bit layer.
fn merge_typed<T: Dtype>(l: &mut CudaLayer<T>, out: SvftDtype, w: *mut c_void, w_len: usize) -> FfiResult {
    let stream = l.stream().clone();
    if out == dtype_of::<T>() {
        // SAFETY: a checked device buffer of w_len = d_out x d_in elements of T.
        let mut wb = unsafe { Borrowed::<T>::new(&stream, w, w_len) };
        return Ok(l.merge_into(&mut wb.view_mut())?);
    }
    // SAFETY: a checked device buffer of w_len = d_out x d_in f32.
    let mut wb = unsafe { Borrowed::<f32>::new(&stream, w, w_len) };
    Ok(l.merge_into_f32(&mut wb.view_mut())?)
}

impl<T: Dtype> CudaRecord<T> {
    /// Runs `f` on the layer's stream, joined with the caller's `stream` both ways, with the
    /// layer's context current. The join back happens even when `f` fails.
    fn on_stream<R>(&mut self, stream: *mut c_void, f: impl FnOnce(&mut Inner<T>) -> FfiResult<R>) -> FfiResult<R> {
        let _ctx = self.inner.enter()?;
        let (own, join) = (self.inner.layer.stream().clone(), self.inner.join.clone());
        join.run(&own, stream, || f(&mut self.inner))
    }

    /// Runs `f` on the layer with its context current (for calls that synchronise the host).
    fn bound<R>(&self, f: impl FnOnce(&CudaLayer<T>) -> crate::Result<R>) -> FfiResult<R> {
        let _ctx = self.inner.enter()?;
        Ok(f(&self.inner.layer)?)
    }

    /// As [`CudaRecord::bound`], mutably.
    fn bound_mut<R>(&mut self, f: impl FnOnce(&mut CudaLayer<T>) -> crate::Result<R>) -> FfiResult<R> {
        let _ctx = self.inner.enter()?;
        Ok(f(&mut self.inner.layer)?)
    }
}

impl<T: Dtype> AbiLayer for CudaRecord<T> {
    fn backend(&self) -> SvftBackend {
        SvftBackend::Cuda
    }
    fn core(&self) -> &LayerCore {
        &self.inner.layer
    }
    fn core_mut(&mut self) -> &mut LayerCore {
        &mut self.inner.layer
    }

    fn check_dtype(&self, dt: SvftDtype, merged: bool) -> FfiResult {
        let own = dtype_of::<T>();
        if dt == own || (merged && dt == SvftDtype::F32) {
            return Ok(());
        }
        let also = if merged { " (or f32)" } else { "" };
        fail(
            SvftStatus::UnsupportedDtype,
            format!(
                "this CUDA layer computes in {}{also}, not {} (its dtype is the weight's, f64 giving f32)",
                own.name(),
                dt.name()
            ),
        )
    }
    fn check_stream(&self, _stream: *mut c_void) -> FfiResult {
        Ok(()) // any CUstream of the layer's context, NULL included; the driver checks it in use
    }
    fn check_buffer(&self, what: &'static str, p: *const c_void, len: usize, elem: usize) -> FfiResult<Span> {
        let _ctx = self.inner.enter()?;
        device_buffer_on(what, p, len, elem, self.inner.ordinal)
    }

    /// Device bytes: the workspace from [`crate::memory::svft_chunked`] (fast SDDMM) plus the
    /// bias's column of ones, the saved activations, and what the layer holds between steps
    /// (with the record's dgamma); saturates instead of overflowing.
    fn memory(&self, n: usize) -> [usize; 3] {
        let l = &self.inner.layer;
        let d = l.dims();
        let act = std::mem::size_of::<T>();
        let shape = crate::memory::Shape { d_out: d.d_out, d_in: d.d_in, r: d.r, nnz: d.nnz, n, act };
        let b = crate::memory::svft_chunked(&shape, l.plan_for(n), l.token_chunk());
        let ones = if self.inner.has_bias { n.saturating_mul(act) } else { 0 };
        [b.workspace.saturating_add(b.saved).saturating_add(ones), b.saved, l.persistent_bytes() + 4]
    }
    fn calibrate(&mut self, options: &CalibrationOptions) -> FfiResult {
        self.bound_mut(|l| l.calibrate(options).map(|_| ()))
    }

    unsafe fn forward(
        &mut self,
        (x, x_len): In,
        n: usize,
        (y, y_len): Out,
        saved: Option<Out>,
        stream: *mut c_void,
    ) -> FfiResult {
        self.on_stream(stream, |inner| {
            let l = &mut inner.layer;
            let st = l.stream().clone();
            // SAFETY: checked device buffers of the layer's device and dtype, disjoint.
            let (xb, mut yb) = unsafe { (Borrowed::<T>::new(&st, x, x_len), Borrowed::<T>::new(&st, y, y_len)) };
            match saved {
                Some((t, t_len)) => {
                    // SAFETY: as above.
                    let mut tb = unsafe { Borrowed::<T>::new(&st, t, t_len) };
                    Ok(l.forward_saving(&xb.view(), n, &mut yb.view_mut(), &mut tb.view_mut())?)
                }
                None => Ok(l.forward(&xb.view(), n, &mut yb.view_mut())?),
            }
        })
    }

    unsafe fn backward(
        &mut self,
        saved: Option<In>,
        (gy, gy_len): In,
        n: usize,
        (gx, gx_len): Out,
        (gm, gm_len): (*mut f32, usize),
        grad_gamma: *mut f32,
        stream: *mut c_void,
    ) -> FfiResult {
        self.on_stream(stream, |inner| {
            let l = &mut inner.layer;
            let st = l.stream().clone();
            // SAFETY: checked device buffers of the layer's device and dtype, disjoint.
            let (gyb, mut gxb, mut gmb) = unsafe {
                (
                    Borrowed::<T>::new(&st, gy, gy_len),
                    Borrowed::<T>::new(&st, gx, gx_len),
                    Borrowed::<f32>::new(&st, gm.cast(), gm_len),
                )
            };
            // SAFETY: as above (the saved T read-only, n x r of the layer's dtype).
            let tb = saved.map(|(t, t_len)| unsafe { Borrowed::<T>::new(&st, t, t_len) });
            // SAFETY: as above (one f32).
            let mut ggb = (!grad_gamma.is_null()).then(|| unsafe { Borrowed::<f32>::new(&st, grad_gamma.cast(), 1) });
            let mut dgamma = match ggb.as_mut() {
                Some(b) => b.view_mut(),
                None => inner.dgamma.as_view_mut(),
            };
            let (gy, mut gx, mut gm) = (gyb.view(), gxb.view_mut(), gmb.view_mut());
            match &tb {
                Some(t) => l.backward_saved(&t.view(), &gy, n, &mut gx, &mut gm, &mut dgamma)?,
                None => l.backward(&gy, n, &mut gx, &mut gm, &mut dgamma)?,
            }
            Ok(())
        })
    }

    unsafe fn merge(&mut self, dt: SvftDtype, (w, w_len): Out, stream: *mut c_void) -> FfiResult {
        if dt != dtype_of::<T>() {
            let d = self.inner.layer.dims();
            preflight("the merge's host copy of U and V", mul("U", d.d_out + d.d_in, d.r)?.saturating_mul(12))?;
        }
        self.on_stream(stream, |inner| merge_typed(&mut inner.layer, dt, w, w_len))
    }

    /// M (`m_len` = nnz f32) and, unless NULL, gamma (one f32) copied from device memory on the
    /// layer's stream after the caller's earlier work (and before its later work); the gate
    /// value is computed on the device. The host never waits.
    unsafe fn load_parameters(
        &mut self,
        (m, m_len): (*const f32, usize),
        gamma: *const f32,
        stream: *mut c_void,
    ) -> FfiResult {
        self.on_stream(stream, |inner| {
            let st = inner.layer.stream().clone();
            // SAFETY: checked device buffers of the layer's device; read-only here.
            let mb = unsafe { Borrowed::<f32>::new(&st, m.cast(), m_len) };
            inner.layer.set_coefficients_device(&mb.view())?;
            if !gamma.is_null() {
                // SAFETY: as above (one f32).
                let gb = unsafe { Borrowed::<f32>::new(&st, gamma.cast(), 1) };
                inner.layer.set_gamma_device(&gb.view())?;
            }
            Ok(())
        })
    }

    fn coefficients(&self) -> FfiResult<Cow<'_, [f32]>> {
        self.bound(|l| l.coefficients()).map(Cow::Owned)
    }
    fn set_coefficients(&mut self, m: &[f32]) -> FfiResult {
        self.bound_mut(|l| l.set_coefficients(m))
    }
    fn gamma(&self) -> FfiResult<f32> {
        self.bound(|l| l.gamma())
    }
    fn set_gamma(&mut self, gamma: f32) -> FfiResult {
        self.bound_mut(|l| l.set_gamma(gamma))
    }
    /// As the layer holds them: U and V rounded to its dtype, s in f32 (synchronises).
    fn factors(&self) -> FfiResult<[Cow<'_, [f32]>; 3]> {
        let _ctx = self.inner.enter()?;
        let l = &self.inner.layer;
        let (u, s, v) = l.device_factors();
        let st = l.stream();
        let wide = |x: Vec<T>| Cow::Owned(x.into_iter().map(|v| v.to_f32()).collect());
        Ok([
            wide(st.clone_dtoh(u).map_err(|e| drv("reading U", e))?),
            Cow::Owned(st.clone_dtoh(s).map_err(|e| drv("reading s", e))?),
            wide(st.clone_dtoh(v).map_err(|e| drv("reading V", e))?),
        ])
    }
    fn bias(&self) -> FfiResult<Option<Cow<'_, [f32]>>> {
        let _ctx = self.inner.enter()?;
        let l = &self.inner.layer;
        let Some(b) = l.device_bias() else { return Ok(None) };
        let b = l.stream().clone_dtoh(b).map_err(|e| drv("reading the bias", e))?;
        Ok(Some(Cow::Owned(b.into_iter().map(|v| v.to_f32()).collect())))
    }
    fn new_bank(&self) -> FfiResult<Box<dyn AbiBank>> {
        Ok(Box::new(bank::CudaBankRecord::<T>::over(self)?))
    }
}
