//! [`StreamJoin`]: how a call on a library stream behaves as if it ran on the caller's stream.
//! Shared by CUDA layers and CUDA banks.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::sys::{self, CUstream};
use cudarc::driver::{result, CudaEvent, CudaStream};

use super::super::status::FfiResult;
use super::drv;
use crate::cuda::Gpu;

/// Two events that order a library stream after the caller's earlier work and the caller's
/// later work after the library stream's, without blocking the host.
pub(super) struct StreamJoin {
    /// Recorded on the caller's stream on entry; the library's stream waits on it.
    entered: CudaEvent,
    /// Recorded on the library's stream on exit; the caller's stream waits on it.
    done: CudaEvent,
}

impl StreamJoin {
    pub(super) fn new(gpu: &Gpu) -> FfiResult<Self> {
        let event = || gpu.context().new_event(None).map_err(|e| drv("creating an event", e));
        Ok(StreamJoin { entered: event()?, done: event()? })
    }

    /// Runs `f` (which enqueues on `own`) after the work already on `caller`, and orders
    /// `caller` after it. The join back happens even when `f` fails. `caller` is a `CUstream`
    /// of `own`'s context (NULL: the legacy default stream), whose context must be current.
    pub(super) fn run<R>(
        &self,
        own: &Arc<CudaStream>,
        caller: *mut c_void,
        f: impl FnOnce() -> FfiResult<R>,
    ) -> FfiResult<R> {
        let caller = caller as CUstream;
        // SAFETY: `caller` is the caller's CUstream of this context (or NULL).
        unsafe { result::event::record(self.entered.cu_event(), caller) }
            .map_err(|e| drv("recording an event on the caller's stream", e))?;
        own.wait(&self.entered).map_err(|e| drv("ordering the library's stream after the caller's", e))?;
        let out = f();
        let joined =
            self.done.record(own).map_err(|e| drv("recording an event on the library's stream", e)).and_then(|()| {
                // SAFETY: as above; the event belongs to this context.
                unsafe {
                    result::stream::wait_event(
                        caller,
                        self.done.cu_event(),
                        sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                    )
                }
                .map_err(|e| drv("ordering the caller's stream after the library's", e))
            });
        let out = out?;
        joined?;
        Ok(out)
    }
}
