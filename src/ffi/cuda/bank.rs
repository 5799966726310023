//! The CUDA backend of the `svft_bank_*` calls: a [`CudaBank`] of the layer's dtype on the
//! layer's device, made from a CUDA layer ([`CudaRecord`]), on device pointers and the caller's
//! `CUstream`, with the same stream join as layers (`join.rs`): forward only enqueues work.

use std::ffi::c_void;

use super::super::bank::AbiBank;
use super::super::buffers::{preflight, Span};
use super::super::layer::{AbiLayer, In, Out};
use super::super::status::FfiResult;
use super::super::{SvftBackend, SvftDtype};
use super::join::StreamJoin;
use super::memory::{device_buffer_on, Borrowed, ContextGuard, InContext};
use super::{drv, dtype_of, CudaRecord};
use crate::bank::{Adapter, CpuBank, CudaBank, Segment};
use crate::cuda::Dtype;
use crate::layer::svd::Factors;

struct Inner<T: Dtype> {
    bank: CudaBank<T>,
    ordinal: usize,
    join: StreamJoin,
}

/// A CUDA bank computing in `T`, with its stream's join and device, as a handle holds it.
pub(crate) struct CudaBankRecord<T: Dtype> {
    inner: InContext<Inner<T>>,
}

impl<T: Dtype> CudaBankRecord<T> {
    /// An empty bank over `layer`'s base: its factors as the layer holds them (U and V in `T`)
    /// and its bias, on its device, with a stream of its own.
    pub(super) fn over(layer: &CudaRecord<T>) -> FfiResult<Self> {
        let d = layer.inner.layer.dims();
        // The host copy of the factors (the bank's own CpuBank) and its device copy.
        preflight("the bank's base", (d.d_out + d.d_in + 1).saturating_mul(d.r).saturating_mul(8))?;
        let [u, s, v] = layer.factors()?;
        let bias = layer.bias()?.map(|b| b.into_owned());
        let factors = Factors::new(d.d_out, d.d_in, u.into_owned(), s.into_owned(), v.into_owned())?;
        let gpu = layer.inner.gpu().clone();
        let _ctx = ContextGuard::new(Some(&gpu))?;
        let stream = gpu.context().new_stream().map_err(|e| drv("creating the bank's stream", e))?;
        let bank = CudaBank::<T>::new(gpu.clone(), stream, &factors, bias.as_deref())?;
        let inner = Inner { bank, join: StreamJoin::new(&gpu)?, ordinal: layer.inner.ordinal };
        Ok(CudaBankRecord { inner: InContext::new(gpu, inner) })
    }
}

impl<T: Dtype> AbiBank for CudaBankRecord<T> {
    fn backend(&self) -> SvftBackend {
        SvftBackend::Cuda
    }
    fn dtype(&self) -> SvftDtype {
        dtype_of::<T>()
    }
    fn host(&self) -> &CpuBank {
        self.inner.bank.adapters()
    }
    // A change drops the device layout (freed with the bank's context current); the next
    // forward uploads it again.
    fn add(&mut self, id: u32, adapter: Adapter) -> FfiResult {
        let _ctx = self.inner.enter()?;
        Ok(self.inner.bank.add(id, adapter)?)
    }
    fn replace(&mut self, id: u32, adapter: Adapter) -> FfiResult {
        let _ctx = self.inner.enter()?;
        Ok(self.inner.bank.replace(id, adapter).map(drop)?)
    }
    fn remove(&mut self, id: u32) -> FfiResult {
        let _ctx = self.inner.enter()?;
        Ok(self.inner.bank.remove(id).map(drop)?)
    }
    fn check_stream(&self, _stream: *mut c_void) -> FfiResult {
        Ok(()) // any CUstream of the bank's context, NULL included; the driver checks it in use
    }
    fn check_buffer(&self, what: &'static str, p: *const c_void, len: usize, elem: usize) -> FfiResult<Span> {
        let _ctx = self.inner.enter()?;
        device_buffer_on(what, p, len, elem, self.inner.ordinal)
    }
    unsafe fn forward(
        &mut self,
        (x, x_len): In,
        n: usize,
        table: &[Segment],
        (y, y_len): Out,
        stream: *mut c_void,
    ) -> FfiResult {
        let _ctx = self.inner.enter()?;
        let Inner { bank, join, .. } = &mut *self.inner;
        let own = bank.stream().clone();
        join.run(&own, stream, || {
            // SAFETY: checked device buffers of the bank's device and dtype, disjoint.
            let (xb, mut yb) = unsafe { (Borrowed::<T>::new(&own, x, x_len), Borrowed::<T>::new(&own, y, y_len)) };
            Ok(bank.forward(&xb.view(), n, table, &mut yb.view_mut())?)
        })
    }
}
