//! [`LayerCore`]: what an SVFT layer is, whatever its backend.
//!
//! A layer is a core `C = diag(s) + g M` between two frozen factors. Everything about it that
//! does not touch a buffer lives here, once: the shape, the pattern's index set, the
//! configuration, the measured plan table and the plan choice, the bookkeeping of the forward
//! pass that backward needs, the argument checks of its setters, M's initial values and the
//! trainable count. [`crate::cpu::CpuLayer`] and [`crate::cuda::CudaLayer`] embed one and
//! dereference to it, so `layer.dims()`, `layer.plan_for(n)` or `layer.set_plan(p)` are the same
//! code on either backend; they add only their buffers and the step.

use crate::error::{check_finite, check_len, check_positive, Error, ForwardMismatch, Result};
use crate::layer::calibrate::{self, CalibrationKey, PlanTable};
use crate::layer::config::{gate_value, Init, LayerConfig};
use crate::layer::pattern::Omega;
use crate::layer::plan::{Dims, ExecPlan, Plan};
use crate::rng::Rng;

/// What the last forward pass left for backward: its token count and plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Saved {
    n: usize,
    plan: ExecPlan,
}

/// The backend-independent state and rules of one SVFT layer (see the module doc).
#[derive(Debug, Clone)]
pub struct LayerCore {
    dims: Dims,
    omega: Omega,
    config: LayerConfig,
    /// Measured plan timings `Auto` consults (see [`crate::calibrate`]).
    plan_table: Option<PlanTable>,
    saved: Option<Saved>,
}

impl LayerCore {
    /// The core of a `d_out x d_in` layer of rank `omega.r` over `omega`; checks that the index
    /// set is non-empty and within the rank, and that a bias (if any) is `d_out` finite values.
    pub fn new(d_out: usize, d_in: usize, omega: Omega, config: &LayerConfig, bias: Option<&[f32]>) -> Result<Self> {
        let r = omega.r;
        if r == 0 || r > d_out.min(d_in) {
            return Err(Error::InvalidArgument(format!(
                "rank {r} out of range for a {d_out} x {d_in} layer: must be in 1..={}",
                d_out.min(d_in)
            )));
        }
        check_positive("|Omega|", omega.len())?;
        if let Some((k, _)) =
            omega.rows.iter().zip(&omega.cols).enumerate().find(|(_, (&i, &j))| i as usize >= r || j as usize >= r)
        {
            return Err(Error::InvalidArgument(format!(
                "pattern entry {k} at ({}, {}) lies outside the {r} x {r} core",
                omega.rows[k], omega.cols[k]
            )));
        }
        if let Some(b) = bias {
            check_len("bias", b, d_out)?;
            check_finite("bias", b)?;
        }
        let dims = Dims { d_out, d_in, r, nnz: omega.len() };
        Ok(LayerCore { dims, omega, config: *config, plan_table: None, saved: None })
    }

    /// Checks that the factors' rank is the one the pattern was built for.
    pub fn check_rank(omega: &Omega, factors_rank: usize) -> Result<()> {
        if omega.r != factors_rank {
            return Err(Error::InvalidArgument(format!(
                "pattern built for rank {} but the factors have rank {factors_rank}",
                omega.r
            )));
        }
        Ok(())
    }

    /// M's starting values as configured: zeros, or the official `N(0, 2/|Omega|)` draw.
    pub fn initial_coefficients(&self) -> Vec<f32> {
        let k = self.omega.len();
        match self.config.init {
            Init::Zero => vec![0.0; k],
            Init::Official => Rng::new(self.config.seed).normal_vec(k, (2.0 / k as f64).sqrt()),
        }
    }

    /// Dimensions for the cost model.
    pub fn dims(&self) -> Dims {
        self.dims
    }
    /// The index set of the trainable coefficients.
    pub fn omega(&self) -> &Omega {
        &self.omega
    }
    /// The configuration the layer was built with (its plan as last set).
    pub fn config(&self) -> &LayerConfig {
        &self.config
    }
    /// Trainable parameters: |Omega| (+1 with the gate).
    pub fn trainable_params(&self) -> usize {
        self.omega.len() + usize::from(self.config.gate)
    }
    /// The gate value g for a given gamma (1 without the gate).
    pub fn gate_for(&self, gamma: f32) -> f32 {
        gate_value(self.config.gate, gamma)
    }
    /// The plan `forward` runs for `n` tokens: a fixed plan as configured; `Auto` from the
    /// measured table when the layer holds one that covers `n`, else from the FLOP model.
    pub fn plan_for(&self, n: usize) -> ExecPlan {
        calibrate::resolve(self.config.plan, self.plan_table.as_ref(), &self.dims, n)
    }
    /// Overrides the plan choice (a fixed plan ignores any measured table). Forgets the saved
    /// forward.
    pub fn set_plan(&mut self, plan: Plan) {
        self.config.plan = plan;
        self.saved = None;
    }
    /// The measured plan table `Auto` consults, if any.
    pub fn plan_table(&self) -> Option<&PlanTable> {
        self.plan_table.as_ref()
    }
    /// Installs (or with `None` removes) a measured plan table, e.g. one loaded from a cache.
    /// Forgets the saved forward.
    pub fn set_plan_table(&mut self, table: Option<PlanTable>) {
        self.plan_table = table;
        self.saved = None;
    }
    /// The key a calibration of this layer is valid for on `backend`'s `device` in `dtype`.
    pub fn calibration_key(&self, backend: &str, device: String, dtype: &str) -> CalibrationKey {
        let d = self.dims;
        CalibrationKey {
            backend: backend.into(),
            device,
            dtype: dtype.into(),
            d_out: d.d_out,
            d_in: d.d_in,
            r: d.r,
            pattern: self.config.pattern.to_string(),
        }
    }

    /// Checks new coefficients (|Omega| finite values) before a backend writes them.
    pub fn check_coefficients(&self, m: &[f32]) -> Result<()> {
        check_len("coefficients", m, self.omega.len())?;
        check_finite("coefficients", m)
    }
    /// Checks a new gamma (finite) before a backend writes it.
    pub fn check_gamma(gamma: f32) -> Result<()> {
        if gamma.is_finite() {
            Ok(())
        } else {
            Err(Error::NonFinite { what: "gamma", index: 0 })
        }
    }

    /// Forgets the saved forward pass: the parameters or the plan changed, or a forward began.
    pub fn forget_forward(&mut self) {
        self.saved = None;
    }
    /// Records that a forward pass of `n` tokens on `plan` completed.
    pub fn record_forward(&mut self, n: usize, plan: ExecPlan) {
        self.saved = Some(Saved { n, plan });
    }
    /// The plan of the saved forward pass, if it was one of `n` tokens; else the mismatch.
    pub fn forward_plan(&self, n: usize) -> Result<ExecPlan> {
        let saved = self.saved.ok_or(Error::NoForward(ForwardMismatch::Missing))?;
        if saved.n != n {
            return Err(Error::NoForward(ForwardMismatch::Tokens { forward: saved.n, backward: n }));
        }
        Ok(saved.plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::pattern::Pattern;
    use crate::layer::svd::random_factors;

    fn core(pattern: &str, init: Init, gate: bool) -> LayerCore {
        let f = random_factors(9, 7, 5, 3).unwrap();
        let config = LayerConfig { pattern: pattern.parse::<Pattern>().unwrap(), init, gate, ..Default::default() };
        LayerCore::new(9, 7, config.pattern.omega(&f).unwrap(), &config, None).unwrap()
    }

    #[test]
    fn forward_bookkeeping() {
        let mut c = core("banded:1", Init::Zero, false);
        assert!(matches!(c.forward_plan(3), Err(Error::NoForward(ForwardMismatch::Missing))));
        c.record_forward(3, ExecPlan::Merged);
        assert_eq!(c.forward_plan(3).unwrap(), ExecPlan::Merged);
        assert!(matches!(
            c.forward_plan(4),
            Err(Error::NoForward(ForwardMismatch::Tokens { forward: 3, backward: 4 }))
        ));
        c.set_plan(Plan::Factored);
        assert!(c.forward_plan(3).is_err(), "a plan change forgets the forward");
        assert_eq!(c.plan_for(1000), ExecPlan::Factored);
    }

    #[test]
    fn init_and_counts() {
        let zero = core("plain", Init::Zero, false);
        assert_eq!((zero.trainable_params(), zero.initial_coefficients()), (5, vec![0.0; 5]));
        let official = core("banded:1", Init::Official, true);
        let m = official.initial_coefficients();
        assert_eq!((official.trainable_params(), m.len()), (14, 13));
        assert!(m.iter().all(|v| v.is_finite()) && m.iter().any(|&v| v != 0.0));
        assert_eq!(official.gate_for(0.0), 0.5);
        assert_eq!(zero.gate_for(3.0), 1.0);
    }

    #[test]
    fn rejects_bad_shapes() {
        let f = random_factors(9, 7, 5, 3).unwrap();
        let config = LayerConfig::default();
        let omega = config.pattern.omega(&f).unwrap();
        assert!(LayerCore::new(4, 7, omega.clone(), &config, None).is_err(), "rank 5 > min(4, 7)");
        assert!(LayerCore::new(9, 7, omega.clone(), &config, Some(&[0.0; 8])).is_err(), "bias of 8 for d_out 9");
        assert!(LayerCore::new(9, 7, omega.clone(), &config, Some(&[f32::NAN; 9])).is_err());
        assert!(LayerCore::check_rank(&omega, 4).is_err());
        assert!(LayerCore::check_gamma(f32::INFINITY).is_err());
        let c = LayerCore::new(9, 7, omega, &config, None).unwrap();
        assert!(c.check_coefficients(&[0.0; 4]).is_err());
        assert!(c.check_coefficients(&[0.0, 0.0, f32::NAN, 0.0, 0.0]).is_err());
    }
}
