//! The CUDA backend: the hand-written kernels of `kernels/` (embedded as one fatbin by
//! build.rs), cuBLAS for the dense products, and [`CudaLayer`], the same layer as
//! [`crate::cpu::CpuLayer`] on device buffers and a stream the caller owns.
//!
//! The CUDA libraries are loaded at run time (cudarc's dynamic loading), so this module builds
//! everywhere; on a machine without a driver or device, [`device_count`] says why, once, and
//! every entry point returns [`crate::Error::Cuda`] instead of panicking.

mod calibrate;
mod device;
mod kernels;
mod layer;
mod svd;

pub use crate::geometry::default_token_chunk;
pub use device::{device_count, is_virtual_name, kernel_names, kernels_embedded, Gpu};
pub use kernels::Dtype;
// The row-major cuBLAS product, for the demo's device LoRA student and the bench.
pub(crate) use kernels::{gemm, Mat};
// The bank's per-tile core (kernels/bank.cu), for svft::bank::cuda.
pub(crate) use kernels::{bank_apply, BankArgs};
pub use layer::{CudaLayer, SddmmMode};
pub use svd::thin_svd_cuda;

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

/// `||U diag(s) V^T - W0||_F / ||W0||_F` with the product formed by cuBLAS in f32 and the norms
/// summed on the host in f64.
pub(crate) fn residual_on_device(
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    f: &crate::layer::svd::Factors,
    w0: &[f32],
) -> crate::Result<f64> {
    let r = f.r;
    let us: Vec<f32> = (0..f.d_out * r).map(|k| f.u[k] * f.s[k % r]).collect();
    let us = stream.clone_htod(&us).map_err(|e| driver_err("uploading U diag(s)", e))?;
    let v = stream.clone_htod(&f.v).map_err(|e| driver_err("uploading V", e))?;
    let mut rec = stream.alloc_zeros::<f32>(f.d_out * f.d_in).map_err(|e| driver_err("allocating W", e))?;
    let blas = cudarc::cublas::CudaBlas::new(stream.clone()).map_err(|e| blas_err("cuBLAS handle", e))?;
    kernels::gemm(
        &blas,
        &mut rec.slice_mut(..),
        kernels::Mat { data: &us.slice(..), rows: f.d_out, cols: r, trans: false },
        kernels::Mat { data: &v.slice(..), rows: f.d_in, cols: r, trans: true },
        false,
    )?;
    let rec = stream.clone_dtoh(&rec).map_err(|e| driver_err("reading W", e))?;
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&a, &b) in rec.iter().zip(w0) {
        num += (a as f64 - b as f64).powi(2);
        den += (b as f64).powi(2);
    }
    Ok(if den == 0.0 { num.sqrt() } else { (num / den).sqrt() })
}
