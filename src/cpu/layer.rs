//! [`CpuLayer`]: an SVFT linear layer in f32 on row-major host buffers.
//!
//! `Y = X (U C V^T)^T + bias` with `C = diag(s) + g M`. The layer owns its frozen factors,
//! coefficients, gate and a workspace sized on the first call with a given token count, so the
//! hot path (`forward_into`, `backward_into`) allocates nothing after that call. Shape, pattern,
//! configuration, plan choice and the forward bookkeeping are the [`LayerCore`] it embeds (and
//! dereferences to).

use crate::cpu::gemm::{gemm, Operand as Op};
use crate::cpu::sparse::{coefficient_grads, sddmm, sddmm_chunks, CoreIndex};
use crate::error::{check_len, check_positive, Result};
use crate::layer::calibrate::{self, CalibrationKey, CalibrationOptions, PlanTable};
use crate::layer::config::LayerConfig;
use crate::layer::core::LayerCore;
use crate::layer::pattern::Omega;
use crate::layer::plan::ExecPlan;
use crate::layer::svd::{thin_svd, Factors};
use crate::rng::Rng;

/// Gradients of one backward pass.
#[derive(Debug, Clone, PartialEq)]
pub struct Grads {
    /// `dL/dX`, `n x d_in`.
    pub dx: Vec<f32>,
    /// `dL/dM`, one per coefficient, canonical order.
    pub dm: Vec<f32>,
    /// `dL/dgamma` (0 when the gate is off).
    pub dgamma: f32,
}

/// Reusable buffers; each grows once to the size a token count needs.
#[derive(Debug, Default)]
struct Workspace {
    /// Core values gathered in row-CSR and column-CSR order.
    vals_row: Vec<f32>,
    vals_col: Vec<f32>,
    /// Factored: T = X V (saved) and S = T C^T / A C.
    t: Vec<f32>,
    core_act: Vec<f32>,
    a: Vec<f32>,
    /// Folded factors U_C = U C (d_out x r) and V_C = V C^T (d_in x r).
    uc: Vec<f32>,
    vc: Vec<f32>,
    /// Merged: W (d_out x d_in), saved X, P = G^T X, Q = P V.
    w: Vec<f32>,
    x: Vec<f32>,
    p: Vec<f32>,
    q: Vec<f32>,
    /// dC and the SDDMM's per-chunk partial sums.
    dc: Vec<f32>,
    partial: Vec<f32>,
}

/// Sizes `v` to `len` elements; allocates only when `len` exceeds every earlier size.
fn sized(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() != len {
        v.resize(len, 0.0);
    }
    v
}

/// An SVFT layer on the CPU.
///
/// ```
/// use svft::{cpu::CpuLayer, LayerConfig, Pattern, svd::random_factors};
/// let factors = random_factors(6, 5, 5, 1).unwrap();
/// let config = LayerConfig { pattern: "banded:1".parse().unwrap(), ..Default::default() };
/// let mut layer = CpuLayer::new(factors, &config, None).unwrap();
/// let x = vec![0.5f32; 3 * 5];                       // 3 tokens, d_in = 5
/// let y = layer.forward(&x, 3).unwrap();             // 3 x 6
/// let grads = layer.backward(&vec![1.0; 3 * 6], 3).unwrap();
/// assert_eq!((y.len(), grads.dx.len(), grads.dm.len()), (18, 15, 13));
/// ```
#[derive(Debug)]
pub struct CpuLayer {
    core: LayerCore,
    factors: Factors,
    index: CoreIndex,
    m: Vec<f32>,
    gamma: f32,
    bias: Option<Vec<f32>>,
    svd_residual: Option<f64>,
    ws: Workspace,
}

impl std::ops::Deref for CpuLayer {
    type Target = LayerCore;
    fn deref(&self) -> &LayerCore {
        &self.core
    }
}

impl std::ops::DerefMut for CpuLayer {
    fn deref_mut(&mut self) -> &mut LayerCore {
        &mut self.core
    }
}

impl CpuLayer {
    /// A layer over given factors. The pattern is materialised here (TopK scores the factors).
    pub fn new(factors: Factors, config: &LayerConfig, bias: Option<Vec<f32>>) -> Result<Self> {
        let omega = config.pattern.omega(&factors)?;
        Self::with_omega(factors, omega, config, bias)
    }

    /// A layer over given factors and an explicit index set (e.g. from an adapter file).
    pub fn with_omega(factors: Factors, omega: Omega, config: &LayerConfig, bias: Option<Vec<f32>>) -> Result<Self> {
        LayerCore::check_rank(&omega, factors.r)?;
        let core = LayerCore::new(factors.d_out, factors.d_in, omega, config, bias.as_deref())?;
        let m = core.initial_coefficients();
        let index = CoreIndex::new(core.omega());
        Ok(CpuLayer { core, factors, index, m, gamma: 0.0, bias, svd_residual: None, ws: Workspace::default() })
    }

    /// Decomposes a row-major `d_out x d_in` weight (thin SVD, optionally truncated) and builds
    /// the layer over it. [`CpuLayer::svd_residual`] reports the decomposition's accuracy.
    pub fn from_weight(
        w: &[f32],
        d_out: usize,
        d_in: usize,
        rank: Option<usize>,
        config: &LayerConfig,
        bias: Option<Vec<f32>>,
    ) -> Result<Self> {
        let dec = thin_svd(w, d_out, d_in, rank)?;
        let mut layer = Self::new(dec.factors, config, bias)?;
        layer.svd_residual = Some(dec.residual);
        Ok(layer)
    }

    /// The frozen factors.
    pub fn factors(&self) -> &Factors {
        &self.factors
    }
    /// The frozen bias, if any.
    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }
    /// `||U diag(s) V^T - W0|| / ||W0||` when built by [`CpuLayer::from_weight`].
    pub fn svd_residual(&self) -> Option<f64> {
        self.svd_residual
    }
    /// What a calibration of this layer is valid for: this CPU, f32, this shape and pattern.
    pub fn calibration_key(&self) -> CalibrationKey {
        self.core.calibration_key("cpu", super::device_name(), "f32")
    }

    /// Measures the factored and merged plans (forward + backward on random inputs) at each of
    /// `options.tokens`, or loads the table from the plan cache, and makes `Auto` use it.
    /// Coefficients, gate and the configured plan are unchanged; the workspace grows to the
    /// largest token count measured. On the CPU the small-n plan runs the factored code, so it
    /// is not a separate candidate.
    pub fn calibrate(&mut self, options: &CalibrationOptions) -> Result<&PlanTable> {
        let key = self.calibration_key();
        let configured = self.config().plan;
        let (d_out, d_in) = (self.factors.d_out, self.factors.d_in);
        let mut rng = Rng::new(0xca11_b7a7e);
        let plans = [ExecPlan::Factored, ExecPlan::Merged];
        // Inputs and outputs for the token count being measured, made once per count.
        let mut bufs: Option<(usize, [Vec<f32>; 5])> = None;
        let nnz = self.m.len();
        let table = calibrate::calibrate(
            &key,
            &plans,
            options,
            |plan, n| {
                self.core.set_plan(plan.into());
                if bufs.as_ref().is_none_or(|b| b.0 != n) {
                    let (x, g) = (rng.normal_vec(n * d_in, 1.0), rng.normal_vec(n * d_out, 1.0));
                    bufs = Some((n, [x, g, vec![0.0; n * d_out], vec![0.0; n * d_in], vec![0.0; nnz]]));
                }
                let [x, g, y, dx, dm] = &mut bufs.as_mut().expect("made above").1;
                let t0 = std::time::Instant::now();
                self.forward_into(x, n, y)?;
                self.backward_into(g, n, dx, dm)?;
                Ok(t0.elapsed().as_secs_f64() * 1e3)
            },
            |_, _| true,
        );
        self.core.set_plan(configured);
        self.core.set_plan_table(Some(table?));
        Ok(self.core.plan_table().expect("set above"))
    }
    /// The coefficients M, canonical order.
    pub fn coefficients(&self) -> &[f32] {
        &self.m
    }
    /// Replaces the coefficients; they must be finite and |Omega| long. Forgets the saved forward.
    pub fn set_coefficients(&mut self, m: &[f32]) -> Result<()> {
        self.core.check_coefficients(m)?;
        self.m.copy_from_slice(m);
        self.core.forget_forward();
        Ok(())
    }
    /// The gate parameter gamma (`g = sigmoid(gamma)` when the gate is on).
    pub fn gamma(&self) -> f32 {
        self.gamma
    }
    /// Sets gamma; it must be finite. Forgets the saved forward.
    pub fn set_gamma(&mut self, gamma: f32) -> Result<()> {
        LayerCore::check_gamma(gamma)?;
        self.gamma = gamma;
        self.core.forget_forward();
        Ok(())
    }
    /// The gate value g in use.
    pub fn gate_value(&self) -> f32 {
        self.core.gate_for(self.gamma)
    }

    /// `Y = X W^T (+ bias)` for `n` tokens; allocates the result.
    pub fn forward(&mut self, x: &[f32], n: usize) -> Result<Vec<f32>> {
        let mut y = vec![0.0; n * self.factors.d_out];
        self.forward_into(x, n, &mut y)?;
        Ok(y)
    }

    /// `(dX, dM, dgamma)` for `G = dL/dY`; allocates the results.
    pub fn backward(&mut self, g: &[f32], n: usize) -> Result<Grads> {
        let mut dx = vec![0.0; n * self.factors.d_in];
        let mut dm = vec![0.0; self.m.len()];
        let dgamma = self.backward_into(g, n, &mut dx, &mut dm)?;
        Ok(Grads { dx, dm, dgamma })
    }

    /// Gathers `g M` into the pass layout(s).
    fn gather_core(&mut self) -> f32 {
        let g = self.gate_value();
        let len = self.index.table_len();
        let (fwd, bwd) = (sized(&mut self.ws.vals_row, len), sized(&mut self.ws.vals_col, len));
        self.index.gather(&self.m, g, fwd, bwd);
        g
    }

    /// `U_C = U C` into the workspace (the fold of the forward core into U).
    fn fold_u(&mut self) {
        let f = &self.factors;
        let uc = sized(&mut self.ws.uc, f.d_out * f.r);
        self.index.apply_bwd(&f.u, uc, &f.s, &self.ws.vals_row, &self.ws.vals_col);
    }

    /// Forward into a caller buffer `y` (`n x d_out`); `x` is `n x d_in`. Saves what the next
    /// [`CpuLayer::backward_into`] of the same `n` needs inside the layer.
    pub fn forward_into(&mut self, x: &[f32], n: usize, y: &mut [f32]) -> Result<()> {
        self.forward_step(x, n, y, None)
    }

    /// Forward that hands the saved activations to the caller instead of keeping them: writes
    /// `Y` into `y` and `T = X V` (`n x r`) into `t`, for [`CpuLayer::backward_saved`]. Runs
    /// the factored order whatever the plan (the merged plan would save X and W instead), and
    /// leaves no per-call state in the layer: any number of such forwards may be in flight,
    /// each backward taking its own `T` (autograd frameworks keep it for the layer).
    pub fn forward_saving(&mut self, x: &[f32], n: usize, y: &mut [f32], t: &mut [f32]) -> Result<()> {
        check_len("T (n x r)", t, n.saturating_mul(self.factors.r))?;
        self.forward_step(x, n, y, Some(t))
    }

    /// The plan a [`CpuLayer::forward_saving`] / [`CpuLayer::backward_saved`] pair runs for `n`
    /// tokens: `plan_for(n)`, with the merged plan replaced by the factored one.
    pub fn saving_plan_for(&self, n: usize) -> ExecPlan {
        match self.plan_for(n) {
            ExecPlan::Merged => ExecPlan::Factored,
            p => p,
        }
    }

    /// The forward pass; `saved`: the caller's `T` buffer (stateless), or `None` to save in the
    /// workspace and record the forward for backward.
    fn forward_step(&mut self, x: &[f32], n: usize, y: &mut [f32], saved: Option<&mut [f32]>) -> Result<()> {
        let (d_out, d_in, r) = (self.factors.d_out, self.factors.d_in, self.factors.r);
        check_positive("tokens", n)?;
        check_len("X (n x d_in)", x, n * d_in)?;
        check_len("Y (n x d_out)", y, n * d_out)?;
        self.core.forget_forward();
        self.gather_core();
        let stateless = saved.is_some();
        let plan = if stateless { self.saving_plan_for(n) } else { self.plan_for(n) };
        match plan {
            ExecPlan::Factored | ExecPlan::SmallN => {
                // T goes to the caller's buffer or the workspace's (taken out while in use).
                let mut own = std::mem::take(&mut self.ws.t);
                let t = match saved {
                    Some(t) => t,
                    None => sized(&mut own, n * r),
                };
                gemm(t, Op::n(x, n, d_in), Op::n(&self.factors.v, d_in, r), false);
                if n <= d_out {
                    // Apply C to the activations: S = T C^T, Y = S U^T.
                    let f = &self.factors;
                    let s_act = sized(&mut self.ws.core_act, n * r);
                    self.index.apply_fwd(t, s_act, &f.s, &self.ws.vals_row, &self.ws.vals_col);
                    gemm(y, Op::n(s_act, n, r), Op::t(&f.u, d_out, r), false);
                } else {
                    // Fold C into U: Y = T U_C^T.
                    self.fold_u();
                    gemm(y, Op::n(t, n, r), Op::t(&self.ws.uc, d_out, r), false);
                }
                self.ws.t = own;
            }
            ExecPlan::Merged => {
                self.fold_u();
                let w = sized(&mut self.ws.w, d_out * d_in);
                gemm(w, Op::n(&self.ws.uc, d_out, r), Op::t(&self.factors.v, d_in, r), false);
                gemm(y, Op::n(x, n, d_in), Op::t(w, d_out, d_in), false);
                sized(&mut self.ws.x, n * d_in).copy_from_slice(x);
            }
        }
        if let Some(b) = &self.bias {
            for row in y.chunks_exact_mut(d_out) {
                for (o, &bi) in row.iter_mut().zip(b) {
                    *o += bi;
                }
            }
        }
        if !stateless {
            self.core.record_forward(n, plan);
        }
        Ok(())
    }

    /// Backward into caller buffers: `dx` (`n x d_in`) and `dm` (|Omega|); returns dgamma.
    /// Needs the forward pass of the same `n` just before (its saved activations).
    pub fn backward_into(&mut self, g_out: &[f32], n: usize, dx: &mut [f32], dm: &mut [f32]) -> Result<f32> {
        let plan = self.core.forward_plan(n)?;
        self.check_grads(g_out, n, dx, dm)?;
        match plan {
            ExecPlan::Factored | ExecPlan::SmallN => {
                let t = std::mem::take(&mut self.ws.t);
                let out = self.backward_factored(&t, g_out, n, dx, dm);
                self.ws.t = t;
                out
            }
            ExecPlan::Merged => self.backward_merged(g_out, n, dx, dm),
        }
    }

    /// Backward from the caller's saved `T` (`n x r`, written by [`CpuLayer::forward_saving`]
    /// for the same `n`) with the layer's current M and gamma, which must be those of that
    /// forward. Returns dgamma; touches no saved state.
    pub fn backward_saved(
        &mut self,
        t: &[f32],
        g_out: &[f32],
        n: usize,
        dx: &mut [f32],
        dm: &mut [f32],
    ) -> Result<f32> {
        check_positive("tokens", n)?;
        check_len("T (n x r)", t, n.saturating_mul(self.factors.r))?;
        self.check_grads(g_out, n, dx, dm)?;
        self.core.forget_forward(); // the workspace's core tables are re-gathered below
        self.gather_core();
        self.backward_factored(t, g_out, n, dx, dm)
    }

    /// Checks backward's buffers: `G` (`n x d_out`), `dX` (`n x d_in`), `dM` (|Omega|).
    fn check_grads(&self, g_out: &[f32], n: usize, dx: &[f32], dm: &[f32]) -> Result<()> {
        check_len("G (n x d_out)", g_out, n.saturating_mul(self.factors.d_out))?;
        check_len("dX (n x d_in)", dx, n.saturating_mul(self.factors.d_in))?;
        check_len("dM (|Omega|)", dm, self.m.len())
    }

    /// The factored backward on `T` (core values already gathered; buffers checked).
    fn backward_factored(&mut self, t: &[f32], g_out: &[f32], n: usize, dx: &mut [f32], dm: &mut [f32]) -> Result<f32> {
        let (d_out, d_in, r) = (self.factors.d_out, self.factors.d_in, self.factors.r);
        let nnz = self.m.len();
        let g = self.gate_value();
        let f = &self.factors;
        let ws = &mut self.ws;
        let a = sized(&mut ws.a, n * r);
        gemm(a, Op::n(g_out, n, d_out), Op::n(&f.u, d_out, r), false);
        let partial = sized(&mut ws.partial, self.index.sddmm_partial_len(n));
        sddmm(a, t, &self.index, partial, sized(&mut ws.dc, nnz));
        if n <= d_in {
            // dX = (A C) V^T
            let ac = sized(&mut ws.core_act, n * r);
            self.index.apply_bwd(a, ac, &f.s, &ws.vals_row, &ws.vals_col);
            gemm(dx, Op::n(ac, n, r), Op::t(&f.v, d_in, r), false);
        } else {
            // dX = A V_C^T with V_C = V C^T
            let vc = sized(&mut ws.vc, d_in * r);
            self.index.apply_fwd(&f.v, vc, &f.s, &ws.vals_row, &ws.vals_col);
            gemm(dx, Op::n(a, n, r), Op::t(vc, d_in, r), false);
        }
        Ok(coefficient_grads(&ws.dc, &self.m, g, self.core.config().gate, dm))
    }

    /// The merged plan's backward from its saved X and W (buffers checked).
    fn backward_merged(&mut self, g_out: &[f32], n: usize, dx: &mut [f32], dm: &mut [f32]) -> Result<f32> {
        let (d_out, d_in, r) = (self.factors.d_out, self.factors.d_in, self.factors.r);
        let nnz = self.m.len();
        let g = self.gate_value(); // core values were gathered by forward
        let f = &self.factors;
        let ws = &mut self.ws;
        gemm(dx, Op::n(g_out, n, d_out), Op::n(&ws.w, d_out, d_in), false);
        let p = sized(&mut ws.p, d_out * d_in);
        gemm(p, Op::t(g_out, n, d_out), Op::n(&ws.x, n, d_in), false);
        let q = sized(&mut ws.q, d_out * r);
        gemm(q, Op::n(p, d_out, d_in), Op::n(&f.v, d_in, r), false);
        let partial = sized(&mut ws.partial, self.index.sddmm_partial_len(d_out));
        sddmm(&f.u, q, &self.index, partial, sized(&mut ws.dc, nnz));
        Ok(coefficient_grads(&ws.dc, &self.m, g, self.core.config().gate, dm))
    }

    /// The dense adapted weight `U C V^T`, row-major `d_out x d_in` (bias not included).
    pub fn merge(&mut self) -> Vec<f32> {
        let mut w = vec![0.0; self.factors.d_out * self.factors.d_in];
        self.merge_into(&mut w).expect("sized here");
        w
    }

    /// [`merge`](Self::merge) into the caller's `d_out x d_in` buffer (for a caller that
    /// allocates it fallibly, e.g. `svft merge` on sizes read from a file).
    pub fn merge_into(&mut self, w: &mut [f32]) -> Result<()> {
        let (d_out, d_in, r) = (self.factors.d_out, self.factors.d_in, self.factors.r);
        check_len("merged W (d_out x d_in)", w, d_out * d_in)?;
        self.gather_core();
        self.fold_u();
        gemm(w, Op::n(&self.ws.uc, d_out, r), Op::t(&self.factors.v, d_in, r), false);
        Ok(())
    }

    /// Bytes kept between steps: factors, coefficients, gate, bias (no optimizer state).
    pub fn persistent_bytes(&self) -> usize {
        self.factors.bytes() + 4 * (self.m.len() + 1 + self.bias.as_ref().map_or(0, Vec::len))
    }

    /// The CPU layer's buffers for `n` tokens, in bytes: (all of them, the saved activations).
    /// Mirrors its `Workspace`; saturates instead of overflowing.
    pub fn workspace_model(&self, n: usize) -> (usize, usize) {
        let d = self.dims();
        let (o, i, r, tl) = (d.d_out, d.d_in, d.r, self.index.table_len());
        let m = |a: usize, b: usize| a.saturating_mul(b);
        let core = m(2, tl).saturating_add(d.nnz); // gathered tables, dC
        let (floats, saved) = match self.plan_for(n) {
            ExecPlan::Factored | ExecPlan::SmallN => {
                // Saturating throughout: n may come from the C ABI, and a wrapped sum would
                // report a tiny workspace for an impossible one.
                let mut f = core.saturating_add(m(3, m(n, r))).saturating_add(m(sddmm_chunks(n).0, tl)); // T, S / AC, A, partials
                if n > o {
                    f = f.saturating_add(m(o, r)); // U_C
                }
                if n > i {
                    f = f.saturating_add(m(i, r)); // V_C
                }
                (f, m(n, r))
            }
            ExecPlan::Merged => {
                let f = [m(2, m(o, r)), m(2, m(o, i)), m(n, i), m(sddmm_chunks(o).0, tl)] // U_C, Q, W, P, X
                    .into_iter()
                    .fold(core, usize::saturating_add);
                (f, m(n, i))
            }
        };
        (m(4, floats), m(4, saved))
    }
}
