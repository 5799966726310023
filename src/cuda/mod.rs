//! The CUDA backend: the hand-written kernels of `kernels/` (embedded as one fatbin by
//! build.rs), cuBLAS for the dense products, and [`CudaLayer`], the same layer as
//! [`crate::cpu::CpuLayer`] on device buffers and a stream the caller owns.
//!
//! The CUDA libraries are loaded at run time (cudarc's dynamic loading), so this module builds
//! everywhere; on a machine without a driver or device, [`device_count`] says why, once, and
//! every entry point returns [`crate::Error::Cuda`] instead of panicking.

mod bench;
mod device;
mod kernels;
mod layer;

pub use bench::run_cuda;
pub use device::{device_count, kernels_embedded, Gpu};
pub use kernels::Dtype;
pub use layer::{CudaLayer, SddmmMode};

use crate::error::Error;

/// Maps a driver error to the crate's error, naming what was being done.
pub(crate) fn driver_err(what: &str, e: cudarc::driver::DriverError) -> Error {
    use cudarc::driver::sys::CUresult;
    if e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        Error::OutOfMemory(format!("{what}: CUDA device out of memory"))
    } else {
        Error::Cuda(format!("{what}: {e:?}"))
    }
}

/// Maps a cuBLAS error to the crate's error.
pub(crate) fn blas_err(what: &str, e: cudarc::cublas::result::CublasError) -> Error {
    Error::Cuda(format!("{what}: cuBLAS {e:?}"))
}
