//! The C ABI: `include/svft.h` is generated from this module by cbindgen (see `tests/header.rs`).
//!
//! Conventions, for every `svft_*` export:
//! - It returns an [`SvftStatus`] (`SVFT_STATUS_OK` = 0 on success) and never unwinds into the
//!   caller: each body runs under `catch_unwind`, and a panic becomes `SVFT_STATUS_PANIC`.
//! - On failure, a message for the calling thread explains it: [`svft_last_error`] copies it.
//!   Every call clears the message on entry, so after a success it is empty.
//! - Layers are opaque `SvftLayer *` handles. A handle is a registry key, never dereferenced:
//!   a destroyed, never-created or forged handle is `SVFT_STATUS_INVALID_HANDLE`, not UB.
//!   One handle may be used from several threads; calls on it are serialised.
//! - Every buffer comes with its element count, checked against the layer's shape; pointers
//!   must be non-null and aligned for their element type, and output buffers must not overlap
//!   inputs. Enumerations are passed as `int32_t` so that an unknown value is an error.
//! - Memory spaces: on `SVFT_BACKEND_CPU` every pointer is host memory and `stream` must be
//!   NULL. On `SVFT_BACKEND_CUDA` weights, activations, gradients and merged weights are device
//!   pointers and `stream` is a `CUstream` (NULL = the legacy default stream); coefficients, gamma,
//!   factors read back and indices are host memory on every backend. This build has no CUDA
//!   backend: asking for one returns `SVFT_STATUS_CUDA_UNAVAILABLE`.

mod buffers;
mod exports;
mod registry;
mod status;

pub use exports::*;
pub use status::{svft_last_error, svft_status_name, SvftStatus};

/// Bumped whenever a signature or an enumeration value of this header changes incompatibly.
pub const SVFT_ABI_VERSION: u32 = 1;

/// Where a layer lives and runs.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SvftBackend {
    /// Host memory, faer GEMMs and hand-written sparse passes.
    Cpu = 0,
    /// Device memory and CUDA streams (not in this build yet).
    Cuda = 1,
}

/// Element types of weight and activation buffers.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SvftDtype {
    /// IEEE binary32.
    F32 = 0,
    /// bfloat16 (the top half of a binary32).
    Bf16 = 1,
    /// IEEE binary16.
    F16 = 2,
    /// IEEE binary64 (weights only; the SVD then runs in f64).
    F64 = 3,
}

/// How the trainable coefficients M start.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SvftInit {
    /// M = 0: the layer equals W0 at step 0 (the paper's formulation).
    Zero = 0,
    /// M ~ N(0, 2/|Omega|), gamma = 0 (the official code; seeded by `seed`).
    Official = 1,
}

/// Which execution plan forward/backward run (SVFT.md section 3).
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SvftPlan {
    /// The cheaper plan by FLOP count, per token count.
    Auto = 0,
    /// T = X V, Y = S U^T; saves T (n x r).
    Factored = 1,
    /// The official order: W = U C V^T each step; saves X (n x d_in).
    Merged = 2,
}
