//! Live layers by handle. A handle is `id * 16` cast to a pointer and never dereferenced, so a
//! destroyed, never-created or forged handle is found missing here instead of being UB. Ids
//! are never reused within a process.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use super::cuda::CudaRecord;
use super::status::{fail, FfiResult, SvftStatus};
use super::SvftBackend;
use crate::cpu::CpuLayer;
use crate::layer::pattern::Omega;
use crate::layer::plan::{Dims, Plan};

/// The C handle type: opaque, only ever seen through a pointer.
pub struct SvftLayer {
    _private: [u8; 0],
}

/// The layer itself, on its backend.
#[allow(clippy::large_enum_variant)] // one per handle, behind an Arc<Mutex>: size is irrelevant
pub(crate) enum Backend {
    Cpu(CpuLayer),
    Cuda(Box<CudaRecord>),
}

/// What a handle refers to.
pub(crate) struct Layer {
    pub backend: Backend,
    /// `||U diag(s) V^T - W0|| / ||W0||` when built from a weight, else NaN.
    pub svd_residual: f64,
}

impl Layer {
    pub fn kind(&self) -> SvftBackend {
        match self.backend {
            Backend::Cpu(_) => SvftBackend::Cpu,
            Backend::Cuda(_) => SvftBackend::Cuda,
        }
    }
    pub fn dims(&self) -> Dims {
        match &self.backend {
            Backend::Cpu(layer) => layer.dims(),
            Backend::Cuda(c) => c.dims(),
        }
    }
    pub fn omega(&self) -> &Omega {
        match &self.backend {
            Backend::Cpu(layer) => layer.omega(),
            Backend::Cuda(c) => c.omega(),
        }
    }
    pub fn gate(&self) -> bool {
        match &self.backend {
            Backend::Cpu(layer) => layer.config().gate,
            Backend::Cuda(c) => c.gate(),
        }
    }
    pub fn trainable_params(&self) -> usize {
        self.dims().nnz + usize::from(self.gate())
    }
    pub fn set_plan(&mut self, plan: Plan) {
        match &mut self.backend {
            Backend::Cpu(layer) => layer.set_plan(plan),
            Backend::Cuda(c) => c.set_plan(plan),
        }
    }
}

type Slot = Arc<Mutex<Layer>>;

fn table() -> MutexGuard<'static, HashMap<usize, Slot>> {
    static TABLE: OnceLock<Mutex<HashMap<usize, Slot>>> = OnceLock::new();
    // Nothing panics while holding this lock, but never let a poisoned map wedge the library.
    TABLE.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner())
}

const STRIDE: usize = 16;

/// Registers a layer and returns its handle.
pub(crate) fn insert(layer: Layer) -> *mut SvftLayer {
    static NEXT: AtomicUsize = AtomicUsize::new(1);
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    table().insert(id, Arc::new(Mutex::new(layer)));
    (id * STRIDE) as *mut SvftLayer
}

fn lookup(handle: *const SvftLayer) -> FfiResult<Slot> {
    let h = handle as usize;
    if h == 0 {
        return fail(SvftStatus::NullPointer, "layer handle is NULL");
    }
    match table().get(&(h / STRIDE)) {
        Some(slot) if h % STRIDE == 0 => Ok(slot.clone()),
        _ => fail(SvftStatus::InvalidHandle, format!("{h:#x} is not a live layer (destroyed, or never created)")),
    }
}

/// Runs `f` on the layer behind `handle`, holding its lock.
pub(crate) fn with<R>(handle: *const SvftLayer, f: impl FnOnce(&mut Layer) -> FfiResult<R>) -> FfiResult<R> {
    let slot = lookup(handle)?;
    let mut layer = match slot.lock() {
        Ok(l) => l,
        Err(_) => {
            return fail(
                SvftStatus::InvalidHandle,
                "the layer is unusable after an internal panic in an earlier call; destroy it",
            )
        }
    };
    f(&mut layer)
}

/// Unregisters a handle; the layer is freed once no other thread is using it.
pub(crate) fn remove(handle: *mut SvftLayer) -> FfiResult {
    let h = handle as usize;
    if h == 0 {
        return fail(SvftStatus::NullPointer, "layer handle is NULL");
    }
    let removed = if h % STRIDE == 0 { table().remove(&(h / STRIDE)) } else { None };
    match removed {
        Some(slot) => {
            drop(slot);
            Ok(())
        }
        None => fail(SvftStatus::InvalidHandle, format!("{h:#x} is not a live layer (destroyed, or never created)")),
    }
}
