//! The CPU backend of the C ABI: [`CpuLayer`] behind a handle, on host pointers, no stream.
//! The twin of `ffi/cuda/`: what remains per backend after the exports' shared checks.

use std::borrow::Cow;
use std::ffi::c_void;

use super::bank::AbiBank;
use super::buffers::{host_stream, mul, preflight, read_as_f32, span, Span};
use super::layer::{AbiLayer, In, Out};
use super::status::{fail, FfiResult, SvftStatus};
use super::{SvftBackend, SvftDtype};
use crate::bank::CpuBank;
use crate::cpu::CpuLayer;
use crate::error::check_finite;
use crate::layer::calibrate::CalibrationOptions;
use crate::layer::config::LayerConfig;
use crate::layer::core::LayerCore;
use crate::layer::pattern::Omega;
use crate::layer::svd::{thin_svd, Factors};

/// `svft_layer_from_weight` on the CPU, after the shared checks: the SVD of the host weight
/// (in f64 for an f64 weight); returns the layer and the SVD's residual.
///
/// # Safety
/// `weight` valid for `weight_len` elements of `dt`, `bias` NULL (with `bias_len` 0) or valid
/// for `bias_len`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn from_weight(
    (weight, weight_len): In,
    dt: SvftDtype,
    d_out: usize,
    d_in: usize,
    rank: usize,
    config: &LayerConfig,
    bias: In,
) -> FfiResult<(CpuLayer, f64)> {
    // SAFETY: per the contract.
    let bias = unsafe { read_bias(bias, dt) }?;
    let dec = if dt == SvftDtype::F64 {
        // SAFETY: span() checked the pointer; the caller vouches for weight_len elements.
        let w = unsafe { std::slice::from_raw_parts(weight.cast::<f64>(), weight_len) };
        thin_svd(w, d_out, d_in, Some(rank))?
    } else {
        // SAFETY: as above.
        let w = unsafe { read_as_f32("weight", weight, dt, weight_len) }?;
        thin_svd(&w, d_out, d_in, Some(rank))?
    };
    Ok((CpuLayer::new(dec.factors, config, bias)?, dec.residual))
}

/// `svft_layer_from_factors` on the CPU, after the shared checks.
///
/// # Safety
/// `u`, `s`, `v` (and `bias`, unless NULL with length 0) valid for their lengths of `dt`.
pub(crate) unsafe fn from_factors(
    dt: SvftDtype,
    (d_out, d_in): (usize, usize),
    [u, s, v]: [In; 3],
    config: &LayerConfig,
    omega: Option<Omega>,
    bias: In,
) -> FfiResult<CpuLayer> {
    // SAFETY: per the contract.
    let (bias, u, s, v) = unsafe {
        (
            read_bias(bias, dt)?,
            read_as_f32("U", u.0, dt, u.1)?,
            read_as_f32("s", s.0, dt, s.1)?,
            read_as_f32("V", v.0, dt, v.1)?,
        )
    };
    let factors = Factors::new(d_out, d_in, u, s, v)?;
    Ok(match omega {
        Some(omega) => CpuLayer::with_omega(factors, omega, config, bias)?,
        None => CpuLayer::new(factors, config, bias)?,
    })
}

/// An optional host bias (`NULL` with length 0: none) as f32.
///
/// # Safety
/// As [`from_factors`].
unsafe fn read_bias((bias, len): In, dt: SvftDtype) -> FfiResult<Option<Vec<f32>>> {
    if bias.is_null() && len == 0 {
        return Ok(None);
    }
    // SAFETY: per the contract (the shared checks spanned it).
    Ok(Some(unsafe { read_as_f32("bias", bias, dt, len) }?))
}

impl AbiLayer for CpuLayer {
    fn backend(&self) -> SvftBackend {
        SvftBackend::Cpu
    }
    fn core(&self) -> &LayerCore {
        self
    }
    fn core_mut(&mut self) -> &mut LayerCore {
        self
    }

    fn check_dtype(&self, dt: SvftDtype, _merged: bool) -> FfiResult {
        match dt {
            SvftDtype::F32 => Ok(()),
            other => {
                fail(SvftStatus::UnsupportedDtype, format!("the CPU backend computes in f32, not {}", other.name()))
            }
        }
    }
    fn check_stream(&self, stream: *mut c_void) -> FfiResult {
        host_stream(stream)
    }
    fn check_buffer(&self, what: &'static str, p: *const c_void, len: usize, elem: usize) -> FfiResult<Span> {
        span(what, p, len, elem)
    }

    fn memory(&self, n: usize) -> [usize; 3] {
        let (ws, saved) = self.workspace_model(n);
        [ws, saved, self.persistent_bytes()]
    }
    fn calibrate(&mut self, options: &CalibrationOptions) -> FfiResult {
        CpuLayer::calibrate(self, options)?;
        Ok(())
    }

    unsafe fn forward(
        &mut self,
        (x, x_len): In,
        n: usize,
        (y, y_len): Out,
        saved: Option<Out>,
        _stream: *mut c_void,
    ) -> FfiResult {
        preflight("the forward workspace", self.workspace_model(n).0)?;
        // SAFETY: checked host buffers, disjoint; the caller vouches for the lengths.
        let (x, y) = unsafe {
            (std::slice::from_raw_parts(x.cast::<f32>(), x_len), std::slice::from_raw_parts_mut(y.cast::<f32>(), y_len))
        };
        match saved {
            // SAFETY: as above.
            Some((t, t_len)) => {
                Ok(self.forward_saving(x, n, y, unsafe { std::slice::from_raw_parts_mut(t.cast::<f32>(), t_len) })?)
            }
            None => Ok(self.forward_into(x, n, y)?),
        }
    }

    unsafe fn backward(
        &mut self,
        saved: Option<In>,
        (gy, gy_len): In,
        n: usize,
        (gx, gx_len): Out,
        (gm, gm_len): (*mut f32, usize),
        grad_gamma: *mut f32,
        _stream: *mut c_void,
    ) -> FfiResult {
        // SAFETY: checked host buffers, disjoint.
        let (gy, gx, gm) = unsafe {
            (
                std::slice::from_raw_parts(gy.cast::<f32>(), gy_len),
                std::slice::from_raw_parts_mut(gx.cast::<f32>(), gx_len),
                std::slice::from_raw_parts_mut(gm, gm_len),
            )
        };
        let dgamma = match saved {
            // SAFETY: a checked host buffer, disjoint from the outputs.
            Some((t, t_len)) => {
                self.backward_saved(unsafe { std::slice::from_raw_parts(t.cast::<f32>(), t_len) }, gy, n, gx, gm)?
            }
            None => self.backward_into(gy, n, gx, gm)?,
        };
        if !grad_gamma.is_null() {
            // SAFETY: checked by the caller of this method.
            unsafe { grad_gamma.write(dgamma) };
        }
        Ok(())
    }

    unsafe fn merge(&mut self, _dt: SvftDtype, (w, w_len): Out, _stream: *mut c_void) -> FfiResult {
        preflight("the merged weight", mul("w", w_len, 8)?)?;
        let merged = CpuLayer::merge(self);
        // SAFETY: a checked host buffer of w_len f32; `merged` is ours.
        unsafe { std::ptr::copy_nonoverlapping(merged.as_ptr(), w.cast::<f32>(), w_len) };
        Ok(())
    }

    unsafe fn load_parameters(
        &mut self,
        (m, m_len): (*const f32, usize),
        gamma: *const f32,
        _: *mut c_void,
    ) -> FfiResult {
        // SAFETY: checked host buffers.
        let (m, gamma) = unsafe { (std::slice::from_raw_parts(m, m_len), (!gamma.is_null()).then(|| gamma.read())) };
        // Both checked before either is written: a bad gamma loses nothing.
        check_finite("gamma", gamma.as_slice())?;
        self.set_coefficients(m)?;
        if let Some(g) = gamma {
            CpuLayer::set_gamma(self, g)?;
        }
        Ok(())
    }

    fn coefficients(&self) -> FfiResult<Cow<'_, [f32]>> {
        Ok(Cow::Borrowed(CpuLayer::coefficients(self)))
    }
    fn set_coefficients(&mut self, m: &[f32]) -> FfiResult {
        Ok(CpuLayer::set_coefficients(self, m)?)
    }
    fn gamma(&self) -> FfiResult<f32> {
        Ok(CpuLayer::gamma(self))
    }
    fn set_gamma(&mut self, gamma: f32) -> FfiResult {
        Ok(CpuLayer::set_gamma(self, gamma)?)
    }
    fn factors(&self) -> FfiResult<[Cow<'_, [f32]>; 3]> {
        let f = CpuLayer::factors(self);
        Ok([Cow::Borrowed(&f.u), Cow::Borrowed(&f.s), Cow::Borrowed(&f.v)])
    }
    fn bias(&self) -> FfiResult<Option<Cow<'_, [f32]>>> {
        Ok(CpuLayer::bias(self).map(Cow::Borrowed))
    }
    fn new_bank(&self) -> FfiResult<Box<dyn AbiBank>> {
        preflight("the bank's base", CpuLayer::factors(self).bytes().saturating_mul(2))?;
        let bias = CpuLayer::bias(self).map(<[f32]>::to_vec);
        Ok(Box::new(CpuBank::new(CpuLayer::factors(self).clone(), bias)?))
    }
}
