//! Live layers and banks by handle. A handle is `id * 16 + tag` cast to a pointer and never
//! dereferenced (layers tag 0, banks 8), so a destroyed, never-created or forged handle is found
//! missing here instead of being UB. Ids are never reused within a process.
//!
//! **After a panic** (caught by the export's guard, `SVFT_STATUS_PANIC`), a handle stays usable
//! unless the panic may have left the layer half-modified. The rule: a call reaches the layer
//! through [`with`] (read-only: `&Layer`, so a panic cannot have modified it) or [`with_mut`],
//! whose argument checks also run on `&Layer` and whose one mutating step runs with the entry
//! marked `broken` until it returns. A panic in that step leaves the mark, and every later
//! call but destroy is `SVFT_STATUS_INVALID_HANDLE` ("unusable after an internal panic");
//! a panic anywhere else leaves the handle as it was. The mutex's own poisoning is ignored for
//! that reason: the mark, not the poison flag, says whether the state can be trusted.

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

/// A registered object and whether a panic may have left it half-modified (the call's name).
struct Entry<T> {
    value: T,
    broken: Option<&'static str>,
}

type Slot<T> = Arc<Mutex<Entry<T>>>;

/// Locks an entry, ignoring the mutex's poison flag (see the module doc: `broken` decides).
fn lock<T>(slot: &Slot<T>) -> MutexGuard<'_, Entry<T>> {
    slot.lock().unwrap_or_else(|e| e.into_inner())
}

/// Handles are `id * STRIDE + tag`: each registry has its own tag, so a handle of one kind is
/// never found in another's (a layer passed as a bank is `SVFT_STATUS_INVALID_HANDLE`).
const STRIDE: usize = 16;

/// Live objects of one kind (layers, banks) by handle; see the module doc.
pub(crate) struct Registry<T> {
    table: OnceLock<Mutex<HashMap<usize, Slot<T>>>>,
    next: AtomicUsize,
    tag: usize,
    /// What the handles are, for messages ("layer", "bank").
    what: &'static str,
}

impl<T> Registry<T> {
    /// An empty registry whose handles are `id * 16 + tag` (`tag < 16`).
    pub(crate) const fn new(tag: usize, what: &'static str) -> Self {
        Registry { table: OnceLock::new(), next: AtomicUsize::new(1), tag, what }
    }

    fn table(&self) -> MutexGuard<'_, HashMap<usize, Slot<T>>> {
        // Nothing panics while holding this lock, but never let a poisoned map wedge the library.
        self.table.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers `value` and returns its handle.
    pub(crate) fn insert(&self, value: T) -> usize {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.table().insert(id, Arc::new(Mutex::new(Entry { value, broken: None })));
        id * STRIDE + self.tag
    }

    /// The table key of a non-null handle of this kind, or why there is none.
    fn key(&self, h: usize) -> FfiResult<usize> {
        if h == 0 {
            return fail(SvftStatus::NullPointer, format!("{} handle is NULL", self.what));
        }
        Ok(if h % STRIDE == self.tag { h / STRIDE } else { 0 })
    }

    fn missing<R>(&self, h: usize) -> FfiResult<R> {
        fail(SvftStatus::InvalidHandle, format!("{h:#x} is not a live {} (destroyed, or never created)", self.what))
    }

    fn lookup(&self, h: usize) -> FfiResult<Slot<T>> {
        let key = self.key(h)?;
        let slot = self.table().get(&key).cloned();
        slot.map_or_else(|| self.missing(h), Ok)
    }

    /// Fails when a panic in a mutating step may have left the object half-modified.
    fn usable(&self, e: &Entry<T>) -> FfiResult {
        match e.broken {
            None => Ok(()),
            Some(call) => fail(
                SvftStatus::InvalidHandle,
                format!(
                    "the {} is unusable after an internal panic in an earlier {call}, which may have left it \
                     half-modified; destroy it",
                    self.what
                ),
            ),
        }
    }

    /// Runs a read-only `f` on the object behind `h`, holding its lock. A panic in `f` leaves
    /// the handle usable.
    pub(crate) fn with<R>(&self, h: usize, f: impl FnOnce(&T) -> FfiResult<R>) -> FfiResult<R> {
        let slot = self.lookup(h)?;
        let entry = lock(&slot);
        self.usable(&entry)?;
        f(&entry.value)
    }

    /// Runs a call that changes the object, holding its lock: `check` (read-only: the
    /// arguments against the object) then `act`, the one step that may modify it. A panic in
    /// `check` leaves the handle usable; a panic in `act` marks it unusable (see the module
    /// doc). `call` names the export for that message.
    pub(crate) fn with_mut<A, R>(
        &self,
        h: usize,
        call: &'static str,
        check: impl FnOnce(&T) -> FfiResult<A>,
        act: impl FnOnce(&mut T, A) -> FfiResult<R>,
    ) -> FfiResult<R> {
        let slot = self.lookup(h)?;
        let mut entry = lock(&slot);
        self.usable(&entry)?;
        let args = check(&entry.value)?;
        // Set across `act` and cleared after it: an unwind out of `act` skips the clearing.
        entry.broken = Some(call);
        let result = act(&mut entry.value, args);
        entry.broken = None;
        result
    }

    /// Unregisters a handle; the object is freed once no other thread is using it.
    pub(crate) fn remove(&self, h: usize) -> FfiResult {
        let key = self.key(h)?;
        let removed = self.table().remove(&key);
        match removed {
            Some(slot) => {
                drop(slot);
                Ok(())
            }
            None => self.missing(h),
        }
    }
}

/// The live layers (handles `id * 16`).
static LAYERS: Registry<Layer> = Registry::new(0, "layer");

/// Registers a layer and returns its handle.
pub(crate) fn insert(layer: Layer) -> *mut SvftLayer {
    LAYERS.insert(layer) as *mut SvftLayer
}

/// [`Registry::with`] on the layer behind `handle`.
pub(crate) fn with<R>(handle: *const SvftLayer, f: impl FnOnce(&Layer) -> FfiResult<R>) -> FfiResult<R> {
    LAYERS.with(handle as usize, f)
}

/// [`Registry::with_mut`] on the layer behind `handle`.
pub(crate) fn with_mut<A, R>(
    handle: *const SvftLayer,
    call: &'static str,
    check: impl FnOnce(&Layer) -> FfiResult<A>,
    act: impl FnOnce(&mut Layer, A) -> FfiResult<R>,
) -> FfiResult<R> {
    LAYERS.with_mut(handle as usize, call, check, act)
}

/// Unregisters a layer handle; the layer is freed once no other thread is using it.
pub(crate) fn remove(handle: *mut SvftLayer) -> FfiResult {
    LAYERS.remove(handle as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::CpuLayer;
    use std::panic::{catch_unwind, AssertUnwindSafe};

    fn handle() -> *mut SvftLayer {
        let w: Vec<f32> = (0..35).map(|i| ((i * 7 % 11) as f32 - 5.0) / 5.0).collect();
        let layer = CpuLayer::from_weight(&w, 7, 5, None, &Default::default(), None).unwrap();
        insert(Layer { layer: Box::new(layer), svd_residual: 0.0 })
    }

    fn status<R>(r: FfiResult<R>) -> Option<SvftStatus> {
        r.err().map(|e| e.status)
    }

    #[test]
    fn a_panic_leaves_the_handle_usable_unless_it_struck_the_mutating_step() {
        let h = handle();
        // In a read-only call, and in a mutating call's argument check: still usable.
        assert!(catch_unwind(AssertUnwindSafe(|| with(h, |_| -> FfiResult { panic!("read") }))).is_err());
        assert_eq!(status(with(h, |_| Ok(()))), None);
        let check_panics = || with_mut(h, "t", |_| -> FfiResult { panic!("check") }, |_, ()| Ok(()));
        assert!(catch_unwind(AssertUnwindSafe(check_panics)).is_err());
        assert_eq!(status(with_mut(h, "t", |_| Ok(()), |_, ()| Ok(()))), None);
        // In the mutating step itself: the handle refuses every call but destroy.
        let act_panics = || with_mut(h, "svft_test_act", |_| Ok(()), |_, ()| -> FfiResult { panic!("act") });
        assert!(catch_unwind(AssertUnwindSafe(act_panics)).is_err());
        let err = with(h, |_| Ok(())).unwrap_err();
        assert_eq!(err.status, SvftStatus::InvalidHandle);
        assert!(err.msg.contains("svft_test_act"), "{}", err.msg);
        assert_eq!(status(remove(h)), None);
    }
}
