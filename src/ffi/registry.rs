//! Live layers by handle. A handle is `id * 16` cast to a pointer and never dereferenced, so a
//! destroyed, never-created or forged handle is found missing here instead of being UB. Ids
//! are never reused within a process.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use super::layer::AbiLayer;
use super::status::{fail, FfiResult, SvftStatus};

/// The C handle type: opaque, only ever seen through a pointer.
pub struct SvftLayer {
    _private: [u8; 0],
}

/// What a handle refers to.
pub(crate) struct Layer {
    /// The layer on its backend (chosen once, when the handle was made).
    pub layer: Box<dyn AbiLayer>,
    /// `||U diag(s) V^T - W0|| / ||W0||` when built from a weight, else NaN.
    pub svd_residual: f64,
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
