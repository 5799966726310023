//! [`AbiBank`]: how the `svft_bank_*` calls drive a bank, whatever its backend; the CPU
//! implementation ([`CpuBank`] itself). The CUDA one is in `ffi/cuda/bank.rs`. The registry
//! holds a `Box<dyn AbiBank>`, so the backend is chosen once, when the bank is made (from a
//! layer: the layer's backend, device and dtype).

use std::ffi::c_void;

use super::super::buffers::{host_stream, span, Span};
use super::super::layer::{In, Out};
use super::super::status::FfiResult;
use super::super::{SvftBackend, SvftDtype};
use crate::bank::{Adapter, CpuBank, Segment};

/// A bank behind a C handle. Buffers reach [`AbiBank::forward`] checked: in this backend's
/// memory, of the bank's dtype and the batch's lengths, disjoint; the segment table is
/// validated by the bank itself before anything runs.
pub(crate) trait AbiBank: Send {
    /// The backend the bank lives on.
    fn backend(&self) -> SvftBackend;
    /// The activation dtype it computes in.
    fn dtype(&self) -> SvftDtype;
    /// The adapters and the base on the host (factors as the bank holds them, bias, ids).
    fn host(&self) -> &CpuBank;
    /// Adds adapter `id` (see [`CpuBank::add`]).
    fn add(&mut self, id: u32, adapter: Adapter) -> FfiResult;
    /// Replaces adapter `id` (see [`CpuBank::replace`]).
    fn replace(&mut self, id: u32, adapter: Adapter) -> FfiResult;
    /// Removes adapter `id` (see [`CpuBank::remove`]).
    fn remove(&mut self, id: u32) -> FfiResult;
    /// Checks that `stream` is one this backend takes (the CPU takes none).
    fn check_stream(&self, stream: *mut c_void) -> FfiResult;
    /// Checks a caller buffer of `len` elements of `elem` bytes: non-null, aligned, and in this
    /// backend's memory (host on the CPU; device memory of the bank's device on CUDA).
    fn check_buffer(&self, what: &'static str, p: *const c_void, len: usize, elem: usize) -> FfiResult<Span>;
    /// `Y` for the mixed batch `x` of `n` rows under `table`.
    ///
    /// # Safety
    /// `x` and `y` checked as the trait doc says and valid for their lengths; `stream` checked.
    unsafe fn forward(&mut self, x: In, n: usize, table: &[Segment], y: Out, stream: *mut c_void) -> FfiResult;
}

impl AbiBank for CpuBank {
    fn backend(&self) -> SvftBackend {
        SvftBackend::Cpu
    }
    fn dtype(&self) -> SvftDtype {
        SvftDtype::F32
    }
    fn host(&self) -> &CpuBank {
        self
    }
    fn add(&mut self, id: u32, adapter: Adapter) -> FfiResult {
        Ok(CpuBank::add(self, id, adapter)?)
    }
    fn replace(&mut self, id: u32, adapter: Adapter) -> FfiResult {
        Ok(CpuBank::replace(self, id, adapter).map(drop)?)
    }
    fn remove(&mut self, id: u32) -> FfiResult {
        Ok(CpuBank::remove(self, id).map(drop)?)
    }
    fn check_stream(&self, stream: *mut c_void) -> FfiResult {
        host_stream(stream)
    }
    fn check_buffer(&self, what: &'static str, p: *const c_void, len: usize, elem: usize) -> FfiResult<Span> {
        span(what, p, len, elem)
    }
    unsafe fn forward(
        &mut self,
        (x, x_len): In,
        n: usize,
        table: &[Segment],
        (y, y_len): Out,
        _: *mut c_void,
    ) -> FfiResult {
        // SAFETY: checked host buffers of f32, disjoint; the caller vouches for the lengths.
        let (x, y) = unsafe {
            (std::slice::from_raw_parts(x.cast::<f32>(), x_len), std::slice::from_raw_parts_mut(y.cast::<f32>(), y_len))
        };
        Ok(self.forward_into(x, n, table, y)?)
    }
}
