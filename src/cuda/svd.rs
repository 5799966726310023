//! The one-time thin SVD on the GPU: cuSOLVER's Jacobi SVD (`gesvdj`, f32), with the
//! reconstruction residual measured and returned like the CPU path's.
//!
//! Layout: our row-major `W` (`d_out x d_in`) is cuSOLVER's column-major `A = W^T`
//! (`d_in x d_out`). So `A = U_A S V_A^T` gives `V = U_A` and `U = V_A`; both come back
//! column-major and are transposed to our row-major factors on the host (O((d_out + d_in) r)).
//! Jacobi SVD was chosen over `Xgesvdp` for its accuracy on the small singular values, which
//! SVFT trains against; it is one call per weight, done once.

use std::sync::Arc;

use cudarc::cusolver::{sys, DnHandle};
use cudarc::driver::{CudaStream, DevicePtrMut};

use super::driver_err;
use crate::error::{check_len, check_positive, Error, Result};
use crate::layer::svd::{
    all_zeros, check_residual, truncation_residual, unit_scale, unscale_spectrum, Decomposition, Factors, WeightScalar,
};

fn solver_err(what: &str, status: sys::cusolverStatus_t) -> Result<()> {
    if status == sys::cusolverStatus_t::CUSOLVER_STATUS_SUCCESS {
        Ok(())
    } else if status == sys::cusolverStatus_t::CUSOLVER_STATUS_ALLOC_FAILED {
        Err(Error::OutOfMemory(format!("{what}: cuSOLVER could not allocate")))
    } else {
        Err(Error::Cuda(format!("{what}: cuSOLVER {status:?}")))
    }
}

/// Thin SVD of a row-major `d_out x d_in` f32 weight on the GPU, optionally truncated.
/// Same contract as [`crate::layer::svd::thin_svd`]: non-finite input, empty shapes and ranks outside
/// `1..=min(d_out, d_in)` are errors, and so is a weight of all zeros; the residual is measured
/// against the f32 input in f64 and checked against the one the full spectrum predicts
/// ([`crate::layer::svd::check_residual`]). As on the CPU, the weight is scaled by a power of
/// two to a largest entry in `[1, 2)` before the SVD and `s` scaled back after it (exact), so
/// tiny or huge weights decompose as well as weights of order 1.
pub fn thin_svd_cuda(
    stream: &Arc<CudaStream>,
    w: &[f32],
    d_out: usize,
    d_in: usize,
    rank: Option<usize>,
) -> Result<Decomposition> {
    check_positive("d_out", d_out)?;
    check_positive("d_in", d_in)?;
    check_len("W0 (d_out x d_in)", w, d_out * d_in)?;
    if let Some(index) = w.iter().position(|x| !x.is_finite()) {
        return Err(Error::NonFinite { what: "W0", index });
    }
    let p = d_out.min(d_in);
    let r = rank.unwrap_or(p);
    if r == 0 || r > p {
        return Err(Error::Rank { rank: r, max: p });
    }
    let max = w.iter().fold(0.0f64, |m, &x| m.max(x.abs() as f64));
    if max == 0.0 {
        return Err(all_zeros(d_out, d_in));
    }
    let k = unit_scale(max);
    let scaled: Vec<f32> = w.iter().map(|&x| x.scaled_pow2(k)).collect();
    let (m, n) = (d_in as i32, d_out as i32); // column-major A = W^T
    let up = |what: &str, len: usize| stream.alloc_zeros::<f32>(len.max(1)).map_err(|e| driver_err(what, e));
    let mut a = stream.clone_htod(&scaled).map_err(|e| driver_err("uploading W0", e))?;
    drop(scaled);
    let mut s = up("allocating S", p)?;
    let mut ua = up("allocating U", d_in * p)?;
    let mut va = up("allocating V", d_out * p)?;
    let mut info = stream.alloc_zeros::<i32>(1).map_err(|e| driver_err("allocating info", e))?;
    // cudarc's DnHandle::new (unlike CudaBlas::new) does not make the stream's context current,
    // and cusolverDnCreate works on whichever context the thread holds.
    stream.context().bind_to_thread().map_err(|e| driver_err("binding the CUDA context", e))?;
    let handle = DnHandle::new(stream.clone()).map_err(|e| Error::Cuda(format!("cuSOLVER handle: {e:?}")))?;
    let jobz = sys::cusolverEigMode_t::CUSOLVER_EIG_MODE_VECTOR;
    let mut params: sys::gesvdjInfo_t = std::ptr::null_mut();
    // SAFETY: plain cuSOLVER calls on buffers allocated above with the sizes cuSOLVER documents
    // (A: m x n, lda = m; S: min(m,n); U: m x min(m,n), ldu = m; V: n x min(m,n), ldv = n).
    unsafe {
        solver_err("gesvdj params", sys::cusolverDnCreateGesvdjInfo(&mut params))?;
        let result = (|| -> Result<()> {
            let (pa, _ga) = a.device_ptr_mut(stream);
            let (ps, _gs) = s.device_ptr_mut(stream);
            let (pu, _gu) = ua.device_ptr_mut(stream);
            let (pv, _gv) = va.device_ptr_mut(stream);
            let mut lwork = 0i32;
            solver_err(
                "gesvdj workspace query",
                sys::cusolverDnSgesvdj_bufferSize(
                    handle.cu(),
                    jobz,
                    1,
                    m,
                    n,
                    pa as *const f32,
                    m,
                    ps as *const f32,
                    pu as *const f32,
                    m,
                    pv as *const f32,
                    n,
                    &mut lwork,
                    params,
                ),
            )?;
            let mut work =
                stream.alloc_zeros::<f32>(lwork.max(1) as usize).map_err(|e| driver_err("gesvdj workspace", e))?;
            let (pw, _gw) = work.device_ptr_mut(stream);
            let (pi, _gi) = info.device_ptr_mut(stream);
            solver_err(
                "gesvdj",
                sys::cusolverDnSgesvdj(
                    handle.cu(),
                    jobz,
                    1,
                    m,
                    n,
                    pa as *mut f32,
                    m,
                    ps as *mut f32,
                    pu as *mut f32,
                    m,
                    pv as *mut f32,
                    n,
                    pw as *mut f32,
                    lwork,
                    pi as *mut i32,
                    params,
                ),
            )
        })();
        let destroyed = solver_err("gesvdj params", sys::cusolverDnDestroyGesvdjInfo(params));
        result?;
        destroyed?;
    }
    let info = stream.clone_dtoh(&info).map_err(|e| driver_err("reading info", e))?[0];
    if info != 0 {
        return Err(Error::Svd(format!("cuSOLVER gesvdj did not converge (info = {info})")));
    }
    // The full spectrum, of the scaled weight (order 1).
    let spectrum: Vec<f64> =
        stream.clone_dtoh(&s).map_err(|e| driver_err("reading S", e))?.iter().map(|&x| x as f64).collect();
    if spectrum.iter().any(|x| !x.is_finite()) {
        return Err(Error::Svd(format!("non-finite singular values of the {d_out} x {d_in} weight (cuSOLVER)")));
    }
    let ua = stream.clone_dtoh(&ua).map_err(|e| driver_err("reading U", e))?;
    let va = stream.clone_dtoh(&va).map_err(|e| driver_err("reading V", e))?;
    // U (d_out x r, row-major)[o, i] = V_A[o + i n]; V (d_in x r)[q, i] = U_A[q + i m].
    let mut u = vec![0.0f32; d_out * r];
    for o in 0..d_out {
        for i in 0..r {
            u[o * r + i] = va[o + i * d_out];
        }
    }
    let mut v = vec![0.0f32; d_in * r];
    for q in 0..d_in {
        for i in 0..r {
            v[q * r + i] = ua[q + i * d_in];
        }
    }
    if u.iter().chain(&v).any(|x| !x.is_finite()) {
        return Err(Error::Svd(format!("non-finite singular vectors of the {d_out} x {d_in} weight (cuSOLVER)")));
    }
    let s = unscale_spectrum(&spectrum[..r], k, d_out, d_in)?;
    let factors = Factors::new(d_out, d_in, u, s, v)?;
    // The residual needs U diag(s) V^T: a GEMM the host should not do for large weights.
    let residual = super::residual_on_device(stream, &factors, w)?;
    check_residual(residual, truncation_residual(&spectrum, r), d_out, d_in)?;
    Ok(Decomposition { factors, residual })
}
