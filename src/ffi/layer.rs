//! [`AbiLayer`]: how the C ABI drives a layer, whatever its backend.
//!
//! Each export parses and checks its arguments once against the layer's [`LayerCore`] (shape,
//! lengths, null and alignment, overlap), asking the layer only what differs by backend: the
//! dtype it computes in, the memory a buffer must be in, the stream it takes. Then it calls one
//! method here. `ffi/cpu.rs` implements it for [`crate::cpu::CpuLayer`], `ffi/cuda/` for a CUDA
//! layer of each dtype; the registry holds a `Box<dyn AbiLayer>`, so the backend is chosen
//! once, when the handle is made.

use std::borrow::Cow;
use std::ffi::c_void;

use super::bank::AbiBank;
use super::buffers::Span;
use super::status::FfiResult;
use super::{SvftBackend, SvftDtype};
use crate::layer::calibrate::CalibrationOptions;
use crate::layer::core::LayerCore;

/// A caller's input buffer: pointer and element count (already checked by [`AbiLayer::check_buffer`]).
pub(crate) type In = (*const c_void, usize);
/// A caller's output buffer.
pub(crate) type Out = (*mut c_void, usize);

/// A layer behind a C handle (see the module doc). Methods with raw buffers take them checked:
/// in this backend's memory, of the right length and dtype, disjoint.
pub(crate) trait AbiLayer: Send {
    /// The backend the layer lives on.
    fn backend(&self) -> SvftBackend;
    /// Shape, pattern, configuration and plan choice.
    fn core(&self) -> &LayerCore;
    /// As [`AbiLayer::core`], to change the plan.
    fn core_mut(&mut self) -> &mut LayerCore;

    /// Checks that activations (`merged`: a merged weight) of `dt` are what this layer takes.
    fn check_dtype(&self, dt: SvftDtype, merged: bool) -> FfiResult;
    /// Checks that `stream` is one this backend takes (the CPU takes none).
    fn check_stream(&self, stream: *mut c_void) -> FfiResult;
    /// Checks a caller buffer of `len` elements of `elem` bytes: non-null, aligned, and in this
    /// backend's memory (host on the CPU; device memory of the layer's device on CUDA).
    fn check_buffer(&self, what: &'static str, p: *const c_void, len: usize, elem: usize) -> FfiResult<Span>;

    /// Bytes for `n` tokens: (workspace with the saved activations, saved activations,
    /// persistent), as `svft_layer_memory` reports them.
    fn memory(&self, n: usize) -> [usize; 3];
    /// Measured plan choice (see `svft_layer_calibrate`).
    fn calibrate(&mut self, options: &CalibrationOptions) -> FfiResult;

    /// `Y = X W^T (+ bias)`; with `saved`, `T = X V` (`n x r`) goes there instead of into the
    /// layer (the stateless pair, `svft_layer_forward_saving`).
    ///
    /// # Safety
    /// Buffers checked as the trait doc says and valid for their lengths; `stream` checked.
    unsafe fn forward(&mut self, x: In, n: usize, y: Out, saved: Option<Out>, stream: *mut c_void) -> FfiResult;
    /// dX, dM and (unless NULL) dgamma for the preceding forward of `n` tokens, or with `saved`
    /// for the forward whose `T` it is.
    ///
    /// # Safety
    /// As [`AbiLayer::forward`]; `grad_gamma` NULL or one checked f32.
    #[allow(clippy::too_many_arguments)]
    unsafe fn backward(
        &mut self,
        saved: Option<In>,
        grad_y: In,
        n: usize,
        grad_x: Out,
        grad_m: (*mut f32, usize),
        grad_gamma: *mut f32,
        stream: *mut c_void,
    ) -> FfiResult;
    /// The dense `U C V^T` into `w`, of `dt` (checked by `check_dtype(dt, true)`).
    ///
    /// # Safety
    /// As [`AbiLayer::forward`].
    unsafe fn merge(&mut self, dt: SvftDtype, w: Out, stream: *mut c_void) -> FfiResult;
    /// M (and gamma unless NULL) from buffers in this backend's memory.
    ///
    /// # Safety
    /// As [`AbiLayer::forward`]; `gamma` NULL or one checked f32.
    unsafe fn load_parameters(&mut self, m: (*const f32, usize), gamma: *const f32, stream: *mut c_void) -> FfiResult;

    /// The coefficients M, on the host.
    fn coefficients(&self) -> FfiResult<Cow<'_, [f32]>>;
    /// Replaces M from the host.
    fn set_coefficients(&mut self, m: &[f32]) -> FfiResult;
    /// The gate parameter gamma.
    fn gamma(&self) -> FfiResult<f32>;
    /// Sets gamma from the host.
    fn set_gamma(&mut self, gamma: f32) -> FfiResult;
    /// U, s, V as host f32, as the layer holds them.
    fn factors(&self) -> FfiResult<[Cow<'_, [f32]>; 3]>;
    /// The bias as host f32, as the layer holds it (`None` without one).
    fn bias(&self) -> FfiResult<Option<Cow<'_, [f32]>>>;
    /// An empty adapter bank over this layer's base (its factors and bias, copied), on its
    /// backend, device and dtype.
    fn new_bank(&self) -> FfiResult<Box<dyn AbiBank>>;
}
