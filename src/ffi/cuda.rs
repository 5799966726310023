//! The CUDA backend of the C ABI: [`crate::cuda::CudaLayer`] behind a handle, on device
//! pointers and a `CUstream` that belong to the caller.
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

use std::collections::HashMap;
use std::ffi::c_void;
use std::mem::ManuallyDrop;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::{CudaBlas, GemmConfig};
use cudarc::driver::sys::{self, CUcontext, CUdeviceptr, CUstream};
use cudarc::driver::{result, CudaEvent, CudaSlice, CudaStream, CudaView, CudaViewMut, DeviceRepr};
use half::{bf16, f16};

use super::buffers::{check_disjoint, check_len, mul, preflight, read_as_f32, span, Span};
use super::status::{fail, FfiError, FfiResult, SvftStatus};
use super::SvftDtype;
use crate::cuda::{blas_err, device_count, driver_err, CudaLayer, Dtype, Gpu};
use crate::error::Error;
use crate::layer::config::LayerConfig;
use crate::layer::pattern::Omega;
use crate::layer::plan::{Dims, Plan};
use crate::layer::svd::{thin_svd, Factors};

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

/// Restores the calling thread's current context on drop.
struct ContextGuard {
    prev: CUcontext,
}

impl ContextGuard {
    /// Remembers the current context and makes `gpu`'s current; with `None`, binds nothing
    /// (pointer queries need no context: the device a buffer is on is found first, and only
    /// that device is initialised).
    fn new(target: Option<&Gpu>) -> FfiResult<Self> {
        let mut prev: CUcontext = std::ptr::null_mut();
        // SAFETY: writes one CUcontext.
        unsafe { sys::cuCtxGetCurrent(&mut prev) }.result().map_err(|e| drv("reading the current context", e))?;
        let guard = ContextGuard { prev };
        if let Some(g) = target {
            g.context().bind_to_thread().map_err(|e| drv("binding the CUDA context", e))?;
        }
        Ok(guard)
    }
}

impl Drop for ContextGuard {
    fn drop(&mut self) {
        // SAFETY: restores the context that was current on entry (the caller keeps it alive),
        // or none.
        let _ = unsafe { sys::cuCtxSetCurrent(self.prev) };
    }
}

/// Runs `f` with device `ordinal`'s primary context current (retained for the call only), then
/// restores the thread's context.
fn with_primary_context(
    ordinal: i32,
    f: impl FnOnce() -> Result<(), result::DriverError>,
) -> Result<(), result::DriverError> {
    let mut prev: CUcontext = std::ptr::null_mut();
    let mut ctx: CUcontext = std::ptr::null_mut();
    // SAFETY: each call writes one handle; the retained context is released below.
    unsafe {
        sys::cuCtxGetCurrent(&mut prev).result()?;
        sys::cuDevicePrimaryCtxRetain(&mut ctx, ordinal).result()?;
        let out = sys::cuCtxSetCurrent(ctx).result().and_then(|()| f());
        let _ = sys::cuCtxSetCurrent(prev);
        let _ = sys::cuDevicePrimaryCtxRelease_v2(ordinal);
        out
    }
}

/// Asks the driver about the byte at `addr`: (memory type, managed, device ordinal).
fn pointer_attributes(addr: usize) -> FfiResult<(u64, bool, i32)> {
    use sys::CUpointer_attribute::{
        CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, CU_POINTER_ATTRIBUTE_IS_MANAGED, CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
    };
    let mut attrs =
        [CU_POINTER_ATTRIBUTE_MEMORY_TYPE, CU_POINTER_ATTRIBUTE_IS_MANAGED, CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL];
    // Zeroed 8-byte slots fit every attribute's type (unsigned int, bool, int); unknown pointers
    // leave them zero (cuPointerGetAttributes does not fail on those).
    let mut vals = [0u64; 3];
    let base = vals.as_mut_ptr();
    // SAFETY: three slots for three attributes.
    let mut data: [*mut c_void; 3] = std::array::from_fn(|i| unsafe { base.add(i) }.cast());
    // SAFETY: arrays of the declared length; the driver only writes into the slots.
    let query = |attrs: &mut [_; 3], data: &mut [*mut c_void; 3]| unsafe {
        sys::cuPointerGetAttributes(3, attrs.as_mut_ptr(), data.as_mut_ptr(), addr as CUdeviceptr).result()
    };
    let mut answer = query(&mut attrs, &mut data);
    if answer == Err(result::DriverError(sys::CUresult::CUDA_ERROR_INVALID_CONTEXT)) {
        // The attributes asked for need no context (only DEVICE_POINTER-style ones do), but a
        // driver that wants one anyway gets device 0's primary context for this query alone.
        answer = with_primary_context(0, || query(&mut attrs, &mut data));
    }
    match answer {
        Ok(()) => {}
        // Documented not to happen for unknown pointers, but if a driver does: not CUDA memory.
        Err(result::DriverError(sys::CUresult::CUDA_ERROR_INVALID_VALUE)) => return Ok((0, false, -1)),
        Err(e) => return Err(drv("querying a pointer", e)),
    }
    Ok((vals[0] & 0xffff_ffff, vals[1] & 0xff != 0, (vals[2] & 0xffff_ffff) as u32 as i32))
}

/// A checked device buffer: non-null, aligned, `len` elements of `elem` bytes whose first and
/// last bytes are device memory (not host, not managed) on one device. Returns its span (for the
/// overlap check) and the device ordinal.
fn device_buffer(what: &'static str, p: *const c_void, len: usize, elem: usize) -> FfiResult<(Span, usize)> {
    let sp = span(what, p, len, elem)?;
    if len == 0 {
        return fail(SvftStatus::Shape, format!("{what} is empty"));
    }
    let first = p as usize;
    let last = first + len * elem - 1; // span() checked that this does not overflow
    let mut ordinal = None;
    for (which, addr) in [("start", first), ("end", last)] {
        let (kind, managed, ord) = pointer_attributes(addr)?;
        let at =
            if which == "start" { format!("{what} ({addr:#x})") } else { format!("the end of {what} ({addr:#x})") };
        if managed {
            return fail(
                SvftStatus::InvalidArgument,
                format!("{at} is managed (unified) memory; the CUDA backend takes device memory (cuMemAlloc)"),
            );
        }
        match kind {
            k if k == sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as u64 => {}
            0 => {
                return fail(
                    SvftStatus::InvalidArgument,
                    format!("{at} is not CUDA memory (a host pointer?); the CUDA backend takes device pointers"),
                )
            }
            k if k == sys::CUmemorytype::CU_MEMORYTYPE_HOST as u64 => {
                return fail(
                    SvftStatus::InvalidArgument,
                    format!("{at} is page-locked host memory; the CUDA backend takes device pointers"),
                )
            }
            k => return fail(SvftStatus::InvalidArgument, format!("{at} has CUDA memory type {k}, not device memory")),
        }
        match ordinal {
            None => ordinal = Some(ord),
            Some(o) if o == ord => {}
            Some(o) => {
                return fail(
                    SvftStatus::InvalidArgument,
                    format!("{what} starts on device {o} and ends on device {ord}"),
                )
            }
        }
    }
    let ordinal = ordinal.filter(|&o| o >= 0).ok_or_else(|| {
        FfiError::new(SvftStatus::InvalidArgument, format!("{what}: the driver reports no device for it"))
    })?;
    Ok((sp, ordinal as usize))
}

/// As [`device_buffer`], and on device `ordinal`.
fn device_buffer_on(what: &'static str, p: *const c_void, len: usize, elem: usize, ordinal: usize) -> FfiResult<Span> {
    let (sp, ord) = device_buffer(what, p, len, elem)?;
    if ord != ordinal {
        return fail(SvftStatus::InvalidArgument, format!("{what} is on device {ord}, the layer on device {ordinal}"));
    }
    Ok(sp)
}

/// A caller's device buffer seen as a cudarc slice for one call. Never frees the memory: the
/// slice is leaked (ownership handed back) on drop.
struct Borrowed<T>(Option<CudaSlice<T>>);

impl<T> Borrowed<T> {
    /// # Safety
    /// `p` must be `len` elements of `T` of device memory in `stream`'s context, valid (and not
    /// used concurrently in conflicting ways) for the life of the value.
    unsafe fn new(stream: &Arc<CudaStream>, p: *const c_void, len: usize) -> Self {
        // SAFETY: per the contract; with event tracking off no event is created.
        Borrowed(Some(unsafe { stream.upgrade_device_ptr::<T>(p as CUdeviceptr, len) }))
    }
    fn view(&self) -> CudaView<'_, T> {
        self.0.as_ref().expect("borrowed until drop").as_view()
    }
    fn view_mut(&mut self) -> CudaViewMut<'_, T> {
        self.0.as_mut().expect("borrowed until drop").as_view_mut()
    }
}

impl<T> Drop for Borrowed<T> {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            let _caller_owns_it = s.leak();
        }
    }
}

/// Copies `len` elements at a device pointer to a host Vec (synchronises `stream`).
///
/// # Safety
/// As [`Borrowed::new`].
unsafe fn dtoh<T: DeviceRepr>(stream: &Arc<CudaStream>, what: &str, p: *const c_void, len: usize) -> FfiResult<Vec<T>> {
    // SAFETY: per the contract.
    let b = unsafe { Borrowed::<T>::new(stream, p, len) };
    stream.clone_dtoh(&b.view()).map_err(|e| drv(&format!("copying {what} to the host"), e))
}

/// Reads `len` device elements of `dt` as f32 on the host (f64 rounds to nearest).
///
/// # Safety
/// As [`Borrowed::new`] for `len` elements of `dt`.
unsafe fn device_as_f32(
    stream: &Arc<CudaStream>,
    what: &'static str,
    p: *const c_void,
    dt: SvftDtype,
    len: usize,
) -> FfiResult<Vec<f32>> {
    // SAFETY (all arms): per the contract; the host copies are aligned Vecs of `len` elements.
    unsafe {
        match dt {
            SvftDtype::F32 => dtoh::<f32>(stream, what, p, len),
            SvftDtype::Bf16 | SvftDtype::F16 => {
                let h = dtoh::<u16>(stream, what, p, len)?;
                read_as_f32(what, h.as_ptr().cast(), dt, len)
            }
            SvftDtype::F64 => {
                let h = dtoh::<f64>(stream, what, p, len)?;
                read_as_f32(what, h.as_ptr().cast(), dt, len)
            }
        }
    }
}

/// A CUDA layer of one of the activation dtypes.
pub(crate) enum AnyLayer {
    F32(CudaLayer<f32>),
    Bf16(CudaLayer<bf16>),
    F16(CudaLayer<f16>),
}

/// Runs `$body` with `$l` bound to the typed layer, whatever its dtype.
macro_rules! each {
    ($any:expr, $l:ident => $body:expr) => {
        match $any {
            AnyLayer::F32($l) => $body,
            AnyLayer::Bf16($l) => $body,
            AnyLayer::F16($l) => $body,
        }
    };
}

impl AnyLayer {
    fn dtype(&self) -> SvftDtype {
        match self {
            AnyLayer::F32(_) => SvftDtype::F32,
            AnyLayer::Bf16(_) => SvftDtype::Bf16,
            AnyLayer::F16(_) => SvftDtype::F16,
        }
    }
}

struct Inner {
    layer: AnyLayer,
    gpu: Arc<Gpu>,
    stream: Arc<CudaStream>,
    ordinal: usize,
    gate: bool,
    has_bias: bool,
    /// Recorded on the caller's stream on entry; the layer's stream waits on it.
    entered: CudaEvent,
    /// Recorded on the layer's stream on exit; the caller's stream waits on it.
    done: CudaEvent,
    /// dL/dgamma when the caller passes no buffer for it.
    dgamma: CudaSlice<f32>,
}

/// A CUDA layer with its stream, events and device, as a handle holds it.
pub(crate) struct CudaRecord {
    inner: ManuallyDrop<Inner>,
}

impl Drop for CudaRecord {
    fn drop(&mut self) {
        // Freeing binds the layer's context (cudarc does); put the caller's back afterwards.
        let guard = ContextGuard::new(Some(&self.inner.gpu));
        // SAFETY: dropped exactly once, here.
        unsafe { ManuallyDrop::drop(&mut self.inner) };
        drop(guard);
    }
}

/// The activation dtype a layer computes in: that of its weight or factors, f64 giving f32.
fn compute_dtype(dt: SvftDtype) -> SvftDtype {
    if dt == SvftDtype::F64 {
        SvftDtype::F32
    } else {
        dt
    }
}

/// Builds the layer on `ordinal`: uploads the factors on a new stream of its own.
fn build(
    ordinal: usize,
    dt: SvftDtype,
    factors: &Factors,
    config: &LayerConfig,
    bias: Option<Vec<f32>>,
) -> FfiResult<CudaRecord> {
    let gpu = gpu(ordinal)?;
    let _ctx = ContextGuard::new(Some(&gpu))?;
    let stream = gpu.context().new_stream().map_err(|e| drv("creating the layer's stream", e))?;
    let (g, s, b) = (gpu.clone(), stream.clone(), bias.as_deref());
    let layer = match compute_dtype(dt) {
        SvftDtype::Bf16 => AnyLayer::Bf16(CudaLayer::new(g, s, factors, config, b)?),
        SvftDtype::F16 => AnyLayer::F16(CudaLayer::new(g, s, factors, config, b)?),
        _ => AnyLayer::F32(CudaLayer::new(g, s, factors, config, b)?),
    };
    let event = || gpu.context().new_event(None).map_err(|e| drv("creating an event", e));
    let inner = Inner {
        entered: event()?,
        done: event()?,
        dgamma: stream.alloc_zeros::<f32>(1).map_err(|e| drv("allocating dgamma", e))?,
        layer,
        ordinal,
        gate: config.gate,
        has_bias: bias.is_some(),
        gpu,
        stream,
    };
    Ok(CudaRecord { inner: ManuallyDrop::new(inner) })
}

/// `svft_layer_from_weight` on CUDA, after the host-side checks: `weight` and `bias` are device
/// pointers. The weight is copied to the host and decomposed there by the CPU SVD (the same
/// factors as the CPU backend for the same weight), then the factors are uploaded.
///
/// # Safety
/// `weight` (and `bias` when not NULL) must be valid for their lengths in `dt`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn from_weight(
    weight: *const c_void,
    dt: SvftDtype,
    weight_len: usize,
    d_out: usize,
    d_in: usize,
    rank: usize,
    config: &LayerConfig,
    bias: *const c_void,
    bias_len: usize,
) -> FfiResult<(CudaRecord, f64)> {
    available()?;
    let _ctx = ContextGuard::new(None)?;
    let (_, ordinal) = device_buffer("weight", weight, weight_len, dt.size())?;
    let has_bias = !(bias.is_null() && bias_len == 0);
    if has_bias {
        check_len("bias (d_out)", bias_len, d_out)?;
        device_buffer_on("bias", bias, bias_len, dt.size(), ordinal)?;
    }
    let gpu = gpu(ordinal)?;
    let _bound = ContextGuard::new(Some(&gpu))?;
    let stream = gpu.context().new_stream().map_err(|e| drv("creating a stream", e))?;
    // SAFETY (both): checked device buffers of these lengths; the caller vouches for them.
    let bias = if has_bias { Some(unsafe { device_as_f32(&stream, "bias", bias, dt, bias_len) }?) } else { None };
    let dec = if dt == SvftDtype::F64 {
        let w = unsafe { dtoh::<f64>(&stream, "weight", weight, weight_len) }?;
        thin_svd(&w, d_out, d_in, Some(rank))?
    } else {
        let w = unsafe { device_as_f32(&stream, "weight", weight, dt, weight_len) }?;
        thin_svd(&w, d_out, d_in, Some(rank))?
    };
    drop(stream);
    Ok((build(ordinal, dt, &dec.factors, config, bias)?, dec.residual))
}

/// `svft_layer_from_factors` on CUDA: `u`, `s`, `v` (and `bias`) are device pointers of `dt`.
///
/// # Safety
/// Pointers must be valid for their lengths in `dt`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn from_factors(
    dt: SvftDtype,
    d_out: usize,
    d_in: usize,
    (u, u_len): (*const c_void, usize),
    (s, s_len): (*const c_void, usize),
    (v, v_len): (*const c_void, usize),
    config: &LayerConfig,
    bias: *const c_void,
    bias_len: usize,
) -> FfiResult<CudaRecord> {
    available()?;
    let _ctx = ContextGuard::new(None)?;
    let (_, ordinal) = device_buffer("U", u, u_len, dt.size())?;
    device_buffer_on("s", s, s_len, dt.size(), ordinal)?;
    device_buffer_on("V", v, v_len, dt.size(), ordinal)?;
    let has_bias = !(bias.is_null() && bias_len == 0);
    if has_bias {
        check_len("bias (d_out)", bias_len, d_out)?;
        device_buffer_on("bias", bias, bias_len, dt.size(), ordinal)?;
    }
    let gpu = gpu(ordinal)?;
    let _bound = ContextGuard::new(Some(&gpu))?;
    let stream = gpu.context().new_stream().map_err(|e| drv("creating a stream", e))?;
    // SAFETY (all): checked device buffers of these lengths; the caller vouches for them.
    let (uh, sh, vh) = unsafe {
        (
            device_as_f32(&stream, "U", u, dt, u_len)?,
            device_as_f32(&stream, "s", s, dt, s_len)?,
            device_as_f32(&stream, "V", v, dt, v_len)?,
        )
    };
    let bias = if has_bias { Some(unsafe { device_as_f32(&stream, "bias", bias, dt, bias_len) }?) } else { None };
    drop(stream);
    let factors = Factors::new(d_out, d_in, uh, sh, vh)?;
    build(ordinal, dt, &factors, config, bias)
}

fn forward_typed<T: Dtype>(
    l: &mut CudaLayer<T>,
    (x, x_len): (*const c_void, usize),
    n: usize,
    (y, y_len): (*mut c_void, usize),
) -> FfiResult {
    let stream = l.stream().clone();
    // SAFETY: checked device buffers of the layer's device and dtype, disjoint.
    let (xb, mut yb) = unsafe { (Borrowed::<T>::new(&stream, x, x_len), Borrowed::<T>::new(&stream, y, y_len)) };
    Ok(l.forward(&xb.view(), n, &mut yb.view_mut())?)
}

#[allow(clippy::too_many_arguments)]
fn backward_typed<T: Dtype>(
    l: &mut CudaLayer<T>,
    (gy, gy_len): (*const c_void, usize),
    n: usize,
    (gx, gx_len): (*mut c_void, usize),
    (gm, gm_len): (*mut f32, usize),
    grad_gamma: *mut f32,
    scratch: &mut CudaSlice<f32>,
) -> FfiResult {
    let stream = l.stream().clone();
    // SAFETY: checked device buffers of the layer's device and dtype, disjoint.
    let (gyb, mut gxb, mut gmb) = unsafe {
        (
            Borrowed::<T>::new(&stream, gy, gy_len),
            Borrowed::<T>::new(&stream, gx, gx_len),
            Borrowed::<f32>::new(&stream, gm.cast(), gm_len),
        )
    };
    if grad_gamma.is_null() {
        l.backward(&gyb.view(), n, &mut gxb.view_mut(), &mut gmb.view_mut(), &mut scratch.as_view_mut())?;
    } else {
        // SAFETY: as above (one f32).
        let mut ggb = unsafe { Borrowed::<f32>::new(&stream, grad_gamma.cast(), 1) };
        l.backward(&gyb.view(), n, &mut gxb.view_mut(), &mut gmb.view_mut(), &mut ggb.view_mut())?;
    }
    Ok(())
}

/// `W = V U_C^T` in cuBLAS's column-major terms, i.e. the row-major `d_out x d_in`
/// `W = U_C V^T` from row-major `U_C` (`d_out x r`) and `V` (`d_in x r`).
fn merge_gemm<E: Dtype>(
    blas: &CudaBlas,
    v: &CudaView<'_, E>,
    uc: &CudaView<'_, E>,
    w: &mut CudaViewMut<'_, E>,
    d: Dims,
) -> FfiResult {
    use cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
    let cfg = GemmConfig {
        transa: CUBLAS_OP_T,
        transb: CUBLAS_OP_N,
        m: d.d_in as i32,
        n: d.d_out as i32,
        k: d.r as i32,
        alpha: E::from_f32(1.0),
        lda: d.r as i32,
        ldb: d.r as i32,
        beta: E::from_f32(0.0),
        ldc: d.d_in as i32,
    };
    // SAFETY: V holds d_in x r, U_C d_out x r and W d_out x d_in elements (checked by callers).
    unsafe { E::gemm(blas, cfg, v, uc, w) }.map_err(|e| blas_err("merging W = U_C V^T", e).into())
}

/// Writes `U C V^T` into the caller's device buffer `w` (`out` is the layer's dtype or f32), on
/// the layer's stream. In the layer's dtype: [`CudaLayer::merge_into`] (the merged plan's own
/// fold and GEMM). In f32 from a 16-bit layer, so that W is not rounded to 16 bits: `U C` is
/// formed on the host in f32 from the device factors and coefficients (synchronises the
/// layer's stream), then `W = U_C V^T` by an f32 cuBLAS GEMM.
fn merge_typed<T: Dtype>(
    l: &mut CudaLayer<T>,
    own: SvftDtype,
    out: SvftDtype,
    w: *mut c_void,
    w_len: usize,
) -> FfiResult {
    let stream = l.stream().clone();
    if out == own {
        // SAFETY: a checked device buffer of w_len = d_out x d_in elements of T.
        let mut wb = unsafe { Borrowed::<T>::new(&stream, w, w_len) };
        return Ok(l.merge_into(&mut wb.view_mut())?);
    }
    debug_assert_eq!(out, SvftDtype::F32);
    let d = l.dims();
    let (o, r) = (d.d_out, d.r);
    let (u_dev, s_dev, v_dev) = l.device_factors();
    let u = stream.clone_dtoh(u_dev).map_err(|e| drv("reading U", e))?;
    let s = stream.clone_dtoh(s_dev).map_err(|e| drv("reading s", e))?;
    let m = l.coefficients()?;
    let g = l.gate_value()?;
    let omega = l.omega();
    let mut uc = vec![0.0f32; o * r];
    for row in 0..o {
        let (ur, ucr) = (&u[row * r..(row + 1) * r], &mut uc[row * r..(row + 1) * r]);
        for j in 0..r {
            ucr[j] = s[j] * ur[j].to_f32();
        }
        for ((&i, &j), &mk) in omega.rows.iter().zip(&omega.cols).zip(&m) {
            ucr[j as usize] += g * mk * ur[i as usize].to_f32();
        }
    }
    let blas = CudaBlas::new(stream.clone()).map_err(|e| FfiError::from(blas_err("creating a cuBLAS handle", e)))?;
    let v: Vec<f32> = stream.clone_dtoh(v_dev).map_err(|e| drv("reading V", e))?.iter().map(|x| x.to_f32()).collect();
    let v = stream.clone_htod(&v).map_err(|e| drv("uploading V", e))?;
    let uc = stream.clone_htod(&uc).map_err(|e| drv("uploading U C", e))?;
    // SAFETY: a checked device buffer of w_len = d_out x d_in f32.
    let mut wb = unsafe { Borrowed::<f32>::new(&stream, w, w_len) };
    merge_gemm(&blas, &v.as_view(), &uc.as_view(), &mut wb.view_mut(), d)
}

impl CudaRecord {
    pub fn dims(&self) -> Dims {
        each!(&self.inner.layer, l => l.dims())
    }
    pub fn omega(&self) -> &Omega {
        each!(&self.inner.layer, l => l.omega())
    }
    pub fn gate(&self) -> bool {
        self.inner.gate
    }
    pub fn set_plan(&mut self, plan: Plan) {
        each!(&mut self.inner.layer, l => l.set_plan(plan))
    }
    pub fn plan_for(&self, n: usize) -> crate::layer::plan::ExecPlan {
        each!(&self.inner.layer, l => l.plan_for(n))
    }
    pub fn calibrate(&mut self, options: &crate::layer::calibrate::CalibrationOptions) -> FfiResult {
        let _ctx = ContextGuard::new(Some(&self.inner.gpu))?;
        each!(&mut self.inner.layer, l => l.calibrate(options).map(|_| ()))?;
        Ok(())
    }
    pub fn gamma(&self) -> FfiResult<f32> {
        let _ctx = ContextGuard::new(Some(&self.inner.gpu))?;
        Ok(each!(&self.inner.layer, l => l.gamma())?)
    }
    pub fn set_gamma(&mut self, gamma: f32) -> FfiResult {
        let _ctx = ContextGuard::new(Some(&self.inner.gpu))?;
        Ok(each!(&mut self.inner.layer, l => l.set_gamma(gamma))?)
    }

    /// `svft_layer_load_parameters` on CUDA: M (`m_len` = nnz f32) and, unless NULL, gamma
    /// (one f32) copied from device memory on the layer's stream after the caller's earlier
    /// work (and before its later work); the gate value is computed on the device. The host
    /// never waits.
    ///
    /// # Safety
    /// Device pointers valid for their lengths; `stream` a CUstream of the layer's context or NULL.
    pub unsafe fn load_parameters(
        &mut self,
        m: *const f32,
        m_len: usize,
        gamma: *const f32,
        stream: *mut c_void,
    ) -> FfiResult {
        check_len("m (nnz)", m_len, self.dims().nnz)?;
        let _ctx = ContextGuard::new(Some(&self.inner.gpu))?;
        let ord = self.inner.ordinal;
        device_buffer_on("m", m.cast(), m_len, 4, ord)?;
        if !gamma.is_null() {
            device_buffer_on("gamma", gamma.cast(), 1, 4, ord)?;
        }
        self.on_stream(stream, |inner| {
            let st = inner.stream.clone();
            // SAFETY: checked device buffers of the layer's device; read-only here.
            let mb = unsafe { Borrowed::<f32>::new(&st, m.cast(), m_len) };
            each!(&mut inner.layer, l => l.set_coefficients_device(&mb.view()))?;
            if !gamma.is_null() {
                // SAFETY: as above (one f32).
                let gb = unsafe { Borrowed::<f32>::new(&st, gamma.cast(), 1) };
                each!(&mut inner.layer, l => l.set_gamma_device(&gb.view()))?;
            }
            Ok(())
        })
    }

    /// The dtype that activations, gradients of X and Y and merged weights must have.
    fn check_dtype(&self, value: i32, merged: bool) -> FfiResult<SvftDtype> {
        let dt = super::buffers::parse_dtype(value)?;
        let own = self.inner.layer.dtype();
        if dt == own || (merged && dt == SvftDtype::F32) {
            return Ok(dt);
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

    /// Runs `f` on the layer's stream, joined with the caller's `stream` both ways, with the
    /// layer's context current. The join back happens even when `f` fails.
    fn on_stream<R>(&mut self, stream: *mut c_void, f: impl FnOnce(&mut Inner) -> FfiResult<R>) -> FfiResult<R> {
        let _ctx = ContextGuard::new(Some(&self.inner.gpu))?;
        let caller = stream as CUstream;
        let inner = &mut *self.inner;
        // SAFETY: `caller` is the caller's CUstream (NULL: the legacy default stream) of this context.
        unsafe { result::event::record(inner.entered.cu_event(), caller) }
            .map_err(|e| drv("recording an event on the caller's stream", e))?;
        inner.stream.wait(&inner.entered).map_err(|e| drv("ordering the layer's stream after the caller's", e))?;
        let out = f(&mut *inner);
        let joined =
            inner.done.record(&inner.stream).map_err(|e| drv("recording an event on the layer's stream", e)).and_then(
                |()| {
                    // SAFETY: as above; the event belongs to this context.
                    unsafe {
                        result::stream::wait_event(
                            caller,
                            inner.done.cu_event(),
                            sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                        )
                    }
                    .map_err(|e| drv("ordering the caller's stream after the layer's", e))
                },
            );
        let out = out?;
        joined?;
        Ok(out)
    }

    /// `svft_layer_forward` on CUDA.
    ///
    /// # Safety
    /// Device pointers valid for their lengths; `stream` a CUstream of the layer's context or NULL.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn forward(
        &mut self,
        dtype: i32,
        x: *const c_void,
        x_len: usize,
        n: usize,
        y: *mut c_void,
        y_len: usize,
        stream: *mut c_void,
    ) -> FfiResult {
        let dt = self.check_dtype(dtype, false)?;
        let d = self.dims();
        if n == 0 {
            return fail(SvftStatus::Shape, "n (tokens) must be positive");
        }
        check_len("x (n x d_in)", x_len, mul("x", n, d.d_in)?)?;
        check_len("y (n x d_out)", y_len, mul("y", n, d.d_out)?)?;
        let _ctx = ContextGuard::new(Some(&self.inner.gpu))?;
        let ord = self.inner.ordinal;
        check_disjoint(&[
            device_buffer_on("x", x, x_len, dt.size(), ord)?,
            device_buffer_on("y", y, y_len, dt.size(), ord)?,
        ])?;
        self.on_stream(stream, |inner| each!(&mut inner.layer, l => forward_typed(l, (x, x_len), n, (y, y_len))))
    }

    /// `svft_layer_backward` on CUDA.
    ///
    /// # Safety
    /// As [`CudaRecord::forward`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn backward(
        &mut self,
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
    ) -> FfiResult {
        let dt = self.check_dtype(dtype, false)?;
        let d = self.dims();
        if n == 0 {
            return fail(SvftStatus::Shape, "n (tokens) must be positive");
        }
        check_len("grad_y (n x d_out)", grad_y_len, mul("grad_y", n, d.d_out)?)?;
        check_len("grad_x (n x d_in)", grad_x_len, mul("grad_x", n, d.d_in)?)?;
        check_len("grad_m (nnz)", grad_m_len, d.nnz)?;
        let _ctx = ContextGuard::new(Some(&self.inner.gpu))?;
        let ord = self.inner.ordinal;
        let mut spans = vec![
            device_buffer_on("grad_y", grad_y, grad_y_len, dt.size(), ord)?,
            device_buffer_on("grad_x", grad_x, grad_x_len, dt.size(), ord)?,
            device_buffer_on("grad_m", grad_m.cast(), grad_m_len, 4, ord)?,
        ];
        if !grad_gamma.is_null() {
            spans.push(device_buffer_on("grad_gamma", grad_gamma.cast(), 1, 4, ord)?);
        }
        check_disjoint(&spans)?;
        self.on_stream(stream, |inner| {
            let scratch = &mut inner.dgamma;
            each!(&mut inner.layer, l => backward_typed(
                l, (grad_y, grad_y_len), n, (grad_x, grad_x_len), (grad_m, grad_m_len), grad_gamma, scratch,
            ))
        })
    }

    /// `svft_layer_merge` on CUDA: `w` is a device buffer of the layer's dtype or f32.
    ///
    /// # Safety
    /// As [`CudaRecord::forward`].
    pub unsafe fn merge(&mut self, dtype: i32, w: *mut c_void, w_len: usize, stream: *mut c_void) -> FfiResult {
        let dt = self.check_dtype(dtype, true)?;
        let d = self.dims();
        check_len("w (d_out x d_in)", w_len, mul("w", d.d_out, d.d_in)?)?;
        preflight("the merge's host copy of U", mul("U", d.d_out, d.r)?.saturating_mul(12))?;
        let _ctx = ContextGuard::new(Some(&self.inner.gpu))?;
        device_buffer_on("w", w, w_len, dt.size(), self.inner.ordinal)?;
        self.on_stream(stream, |inner| {
            let own = inner.layer.dtype();
            each!(&mut inner.layer, l => merge_typed(l, own, dt, w, w_len))
        })
    }

    /// Copies M to the host (synchronises the layer's stream).
    pub fn coefficients(&self) -> FfiResult<Vec<f32>> {
        let _ctx = ContextGuard::new(Some(&self.inner.gpu))?;
        Ok(each!(&self.inner.layer, l => l.coefficients())?)
    }

    /// Uploads M from the host.
    pub fn set_coefficients(&mut self, m: &[f32]) -> FfiResult {
        let _ctx = ContextGuard::new(Some(&self.inner.gpu))?;
        Ok(each!(&mut self.inner.layer, l => l.set_coefficients(m))?)
    }

    /// The factors as host f32 (as the layer holds them: rounded to its dtype).
    pub fn factors(&self) -> FfiResult<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let _ctx = ContextGuard::new(Some(&self.inner.gpu))?;
        fn read<T: Dtype>(l: &CudaLayer<T>) -> FfiResult<(Vec<f32>, Vec<f32>, Vec<f32>)> {
            let (u, s, v) = l.device_factors();
            let st = l.stream();
            let wide = |x: Vec<T>| x.into_iter().map(|v| v.to_f32()).collect::<Vec<f32>>();
            Ok((
                wide(st.clone_dtoh(u).map_err(|e| drv("reading U", e))?),
                st.clone_dtoh(s).map_err(|e| drv("reading s", e))?,
                wide(st.clone_dtoh(v).map_err(|e| drv("reading V", e))?),
            ))
        }
        each!(&self.inner.layer, l => read(l))
    }

    /// Device bytes for `n` tokens: (every workspace buffer, the saved activations among them),
    /// from [`crate::tools::memory::svft_chunked`] (fast SDDMM) plus the bias's column of ones;
    /// saturates instead of overflowing.
    pub fn workspace_model(&self, n: usize) -> (usize, usize) {
        let d = self.dims();
        let act = self.inner.layer.dtype().size();
        let shape = crate::tools::memory::Shape { d_out: d.d_out, d_in: d.d_in, r: d.r, nnz: d.nnz, n, act };
        let (plan, chunk) = each!(&self.inner.layer, l => (l.plan_for(n), l.token_chunk()));
        let b = crate::tools::memory::svft_chunked(&shape, plan, chunk);
        let ones = if self.inner.has_bias { n.saturating_mul(act) } else { 0 };
        (b.workspace.saturating_add(b.saved).saturating_add(ones), b.saved)
    }

    /// Device bytes held between steps.
    pub fn persistent_bytes(&self) -> usize {
        each!(&self.inner.layer, l => l.persistent_bytes()) + 4
    }
}
