//! Caller memory on the CUDA backend of the C ABI: what a device pointer is (asked of the
//! driver before it is used), caller buffers borrowed as cudarc slices for one call, copies of
//! device buffers to the host, and the guard that restores the calling thread's context.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::sys::{self, CUcontext, CUdeviceptr};
use cudarc::driver::{result, CudaSlice, CudaStream, CudaView, CudaViewMut, DeviceRepr};

use super::super::buffers::{read_as_f32, span, Span};
use super::super::status::{fail, FfiError, FfiResult, SvftStatus};
use super::super::SvftDtype;
use super::drv;
use crate::cuda::Gpu;

/// Restores the calling thread's current context on drop.
pub(super) struct ContextGuard {
    prev: CUcontext,
}

impl ContextGuard {
    /// Remembers the current context and makes `gpu`'s current; with `None`, binds nothing
    /// (pointer queries need no context: the device a buffer is on is found first, and only
    /// that device is initialised).
    pub(super) fn new(target: Option<&Gpu>) -> FfiResult<Self> {
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
pub(super) fn device_buffer(what: &'static str, p: *const c_void, len: usize, elem: usize) -> FfiResult<(Span, usize)> {
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
pub(super) fn device_buffer_on(
    what: &'static str,
    p: *const c_void,
    len: usize,
    elem: usize,
    ordinal: usize,
) -> FfiResult<Span> {
    let (sp, ord) = device_buffer(what, p, len, elem)?;
    if ord != ordinal {
        return fail(SvftStatus::InvalidArgument, format!("{what} is on device {ord}, the layer on device {ordinal}"));
    }
    Ok(sp)
}

/// A caller's device buffer seen as a cudarc slice for one call. Never frees the memory: the
/// slice is leaked (ownership handed back) on drop.
pub(super) struct Borrowed<T>(Option<CudaSlice<T>>);

impl<T> Borrowed<T> {
    /// # Safety
    /// `p` must be `len` elements of `T` of device memory in `stream`'s context, valid (and not
    /// used concurrently in conflicting ways) for the life of the value.
    pub(super) unsafe fn new(stream: &Arc<CudaStream>, p: *const c_void, len: usize) -> Self {
        // SAFETY: per the contract; with event tracking off no event is created.
        Borrowed(Some(unsafe { stream.upgrade_device_ptr::<T>(p as CUdeviceptr, len) }))
    }
    pub(super) fn view(&self) -> CudaView<'_, T> {
        self.0.as_ref().expect("borrowed until drop").as_view()
    }
    pub(super) fn view_mut(&mut self) -> CudaViewMut<'_, T> {
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
pub(super) unsafe fn dtoh<T: DeviceRepr>(
    stream: &Arc<CudaStream>,
    what: &str,
    p: *const c_void,
    len: usize,
) -> FfiResult<Vec<T>> {
    // SAFETY: per the contract.
    let b = unsafe { Borrowed::<T>::new(stream, p, len) };
    stream.clone_dtoh(&b.view()).map_err(|e| drv(&format!("copying {what} to the host"), e))
}

/// Reads `len` device elements of `dt` as f32 on the host (f64 rounds to nearest).
///
/// # Safety
/// As [`Borrowed::new`] for `len` elements of `dt`.
pub(super) unsafe fn device_as_f32(
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

/// A value that holds device memory, dropped with its GPU's context current (cudarc binds it
/// to free) and the calling thread's context restored afterwards.
pub(super) struct InContext<T> {
    gpu: Arc<Gpu>,
    value: std::mem::ManuallyDrop<T>,
}

impl<T> InContext<T> {
    pub(super) fn new(gpu: Arc<Gpu>, value: T) -> Self {
        InContext { gpu, value: std::mem::ManuallyDrop::new(value) }
    }
    /// The device the value lives on.
    pub(super) fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }
    /// Makes the value's context current until the guard drops (then the caller's again).
    pub(super) fn enter(&self) -> FfiResult<ContextGuard> {
        ContextGuard::new(Some(&self.gpu))
    }
}

impl<T> std::ops::Deref for InContext<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T> std::ops::DerefMut for InContext<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.value
    }
}

impl<T> Drop for InContext<T> {
    fn drop(&mut self) {
        let guard = ContextGuard::new(Some(&self.gpu));
        // SAFETY: dropped exactly once, here.
        unsafe { std::mem::ManuallyDrop::drop(&mut self.value) };
        drop(guard);
    }
}
