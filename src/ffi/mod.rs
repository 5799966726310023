//! The C ABI: `include/svft.h` is generated from this module by cbindgen (see `tests/header.rs`).
//!
//! Conventions, for every `svft_*` export:
//! - It returns an [`SvftStatus`] (`SVFT_STATUS_OK` = 0 on success) and never unwinds into the
//!   caller: each body runs under `catch_unwind`, and a panic becomes `SVFT_STATUS_PANIC`.
//! - On failure, a message for the calling thread explains it: [`svft_last_error`] copies it.
//!   Every call clears the message on entry, so after a success it is empty (one exception:
//!   `svft_backend_available` leaves the reason when a backend is not available).
//! - Layers are opaque `SvftLayer *` handles. A handle is a registry key, never dereferenced:
//!   a destroyed, never-created or forged handle is `SVFT_STATUS_INVALID_HANDLE`, not UB.
//!   One handle may be used from several threads; calls on it are serialised.
//! - Every buffer comes with its element count, checked against the layer's shape; pointers
//!   must be non-null and aligned for their element type, and output buffers must not overlap
//!   inputs. Enumerations are passed as `int32_t` so that an unknown value is an error.
//! - Memory spaces: on `SVFT_BACKEND_CPU` every pointer is host memory and `stream` must be
//!   NULL. On `SVFT_BACKEND_CUDA` weights, factors passed in, biases, activations, gradients
//!   (grad_m and grad_gamma included) and merged weights are device pointers (`CUdeviceptr`
//!   from cuMemAlloc/cudaMalloc or a pool; not host, pinned host or managed memory, which are
//!   `SVFT_STATUS_INVALID_ARGUMENT`) on the layer's device, and `stream` is a `CUstream` of that
//!   device's primary context (NULL = the legacy default stream). Coefficients, gamma, factors
//!   read back and indices are host memory on every backend.
//! - CUDA streams: each CUDA layer runs on a stream of its own, joined with the caller's
//!   `stream` by events in both directions on every forward, backward and merge, so the call
//!   behaves as if it ran on `stream` and never blocks the host. The library never frees or
//!   keeps caller memory after a call returns. The calling thread's current CUDA context is
//!   restored on return. Without a usable device (or in a build without the kernels), CUDA
//!   calls return `SVFT_STATUS_CUDA_UNAVAILABLE`, with the probe's reason in the message.

mod bank;
mod buffers;

mod cpu;
mod cuda;
mod exports;
mod layer;
mod layer_calls;
mod registry;
mod status;

pub use bank::*;
pub use exports::*;
pub use layer_calls::*;
pub use status::{svft_last_error, SvftStatus};

/// Bumped whenever a signature or an enumeration value of this header changes incompatibly.
pub const SVFT_ABI_VERSION: u32 = 1;

/// Where a layer lives and runs.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SvftBackend {
    /// Host memory, faer GEMMs and hand-written sparse passes.
    Cpu = 0,
    /// Device memory and CUDA streams (activations in f32, bf16 or f16).
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
    /// The factored order through the skinny small-n kernels (CUDA; the CPU runs FACTORED).
    SmallN = 3,
}
