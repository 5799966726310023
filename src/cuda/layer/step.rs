//! The training step of [`CudaLayer`]: forward and backward on the device, in the plan
//! `plan_for(n)` picks. Each only enqueues work on the layer's stream. Factored: `T = X V` whole
//! (saved), then chunks of [`CudaLayer::token_chunk`] tokens; the core goes on the activations
//! when the batch has fewer elements than the factor (n <= d_out forward, n <= d_in backward),
//! else it is folded into U or V once. Small-n: the same order through the skinny kernels.
//! Merged: `W = U C V^T` formed, saved with X.

use cudarc::driver::{CudaView, CudaViewMut};

use super::{grow, CudaLayer, PatternViews, SddmmMode};
use crate::cuda::driver_err;
use crate::cuda::kernels::{apply, gemm, sddmm, sddmm_apply_bwd, skinny_nn, skinny_nt, Dtype, Mat};
use crate::error::{check_len, check_positive, Error, Result};
use crate::geometry::{epilogue_blocks, fused_bwd_fits, sddmm_workspace_len, smalln_workspace_len};
use crate::layer::plan::{Dims, ExecPlan};

impl<T: Dtype> CudaLayer<T> {
    /// `Y = X W^T (+ bias)`: `x` is `n x d_in`, `y` is `n x d_out`, both on this layer's device.
    /// Saves what the next [`CudaLayer::backward`] of the same `n` needs inside the layer.
    pub fn forward(&mut self, x: &CudaView<'_, T>, n: usize, y: &mut CudaViewMut<'_, T>) -> Result<()> {
        self.forward_step(x, n, y, None)
    }

    /// Forward that hands the saved activations to the caller instead of keeping them: writes
    /// `Y` into `y` and `T = X V` (`n x r`) into `t`, for [`CudaLayer::backward_saved`]. Runs
    /// the factored family whatever the plan ([`CudaLayer::saving_plan_for`]) and leaves no
    /// per-call state in the layer, so any number of such forwards may be in flight.
    pub fn forward_saving(
        &mut self,
        x: &CudaView<'_, T>,
        n: usize,
        y: &mut CudaViewMut<'_, T>,
        t: &mut CudaViewMut<'_, T>,
    ) -> Result<()> {
        check_len("T (n x r)", &vec![(); t.len()], n.saturating_mul(self.core.dims().r))?;
        self.forward_step(x, n, y, Some(t))
    }

    /// The plan a [`CudaLayer::forward_saving`] / [`CudaLayer::backward_saved`] pair runs for
    /// `n` tokens: `plan_for(n)`, with the merged plan (which saves X and W) replaced by the
    /// factored one.
    pub fn saving_plan_for(&self, n: usize) -> ExecPlan {
        match self.plan_for(n) {
            ExecPlan::Merged => ExecPlan::Factored,
            p => p,
        }
    }

    /// The forward pass; `saved`: the caller's `T` (stateless), or `None` to save inside the
    /// layer and record the forward for backward.
    fn forward_step(
        &mut self,
        x: &CudaView<'_, T>,
        n: usize,
        y: &mut CudaViewMut<'_, T>,
        saved: Option<&mut CudaViewMut<'_, T>>,
    ) -> Result<()> {
        let Dims { d_out, d_in, r, .. } = self.core.dims();
        check_positive("tokens", n)?;
        check_len("X (n x d_in)", &vec![(); x.len()], n * d_in)?;
        check_len("Y (n x d_out)", &vec![(); y.len()], n * d_out)?;
        if n > i32::MAX as usize / d_out.max(d_in).max(r) {
            return Err(Error::InvalidArgument(format!("{n} tokens are too many for one call")));
        }
        self.core.forget_forward();
        let g = self.gate_state.slice(..1);
        let g = &g;
        let stateless = saved.is_some();
        let plan = if stateless { self.saving_plan_for(n) } else { self.plan_for(n) };
        let token_chunk = self.token_chunk();
        let stream = self.stream.clone();
        let u = self.u.slice(..);
        let v = self.v.slice(..);
        let s = self.s.slice(..);
        let m = self.m.slice(..);
        let pv = PatternViews::new(self.band, &self.rows, &self.cols, &self.by_row, &self.by_col);
        let ws = &mut self.ws;
        let gpu = &self.gpu;
        let blas = &self.blas;
        match plan {
            ExecPlan::Factored | ExecPlan::SmallN => {
                // SmallN: the same order with the dense products in the skinny kernels (they
                // stream U and V once per 16 tokens), and C always on the activations.
                let small = plan == ExecPlan::SmallN;
                // T goes to the caller's buffer, or to the workspace's for backward.
                let mut t_buf = match saved {
                    Some(t) => t.slice_mut(..n * r),
                    None => grow(&stream, &mut ws.t, n * r)?.slice_mut(..n * r),
                };
                if small {
                    let elem = std::mem::size_of::<T>();
                    let work = grow(&stream, &mut ws.skinny, smalln_workspace_len(d_out, d_in, r, n, elem))?;
                    skinny_nn(gpu, &stream, x, &v, &mut t_buf, &mut work.slice_mut(..), n, d_in, r)?;
                } else {
                    gemm(
                        blas,
                        &mut t_buf,
                        Mat { data: x, rows: n, cols: d_in, trans: false },
                        Mat { data: &v, rows: d_in, cols: r, trans: false },
                        false,
                    )?;
                }
                let t = t_buf.as_view();
                let chunk = if small { n } else { token_chunk.min(n) };
                if small || n <= d_out {
                    // C on the activations (fewer elements than U when n <= d_out), `chunk`
                    // tokens at a time: S_c = T_c C^T, Y_c = S_c U^T.
                    let s_act = grow(&stream, &mut ws.core_act, chunk * r)?;
                    for t0 in (0..n).step_by(chunk) {
                        let c = chunk.min(n - t0);
                        let t_c = t.slice(t0 * r..(t0 + c) * r);
                        apply(gpu, &stream, true, pv.fwd(), &t_c, &mut s_act.slice_mut(..c * r), &s, &m, g, c, r)?;
                        let s_c = s_act.slice(..c * r);
                        let mut y_c = y.slice_mut(t0 * d_out..(t0 + c) * d_out);
                        if small {
                            skinny_nt(gpu, &stream, &s_c, &u, &mut y_c, c, r, d_out)?;
                        } else {
                            gemm(
                                blas,
                                &mut y_c,
                                Mat { data: &s_c, rows: c, cols: r, trans: false },
                                Mat { data: &u, rows: d_out, cols: r, trans: true },
                                false,
                            )?;
                        }
                    }
                } else {
                    // n > d_out: fold C into U once, Y = T (U C)^T, no n x r scratch at all.
                    let uc = grow(&stream, &mut ws.fold, d_out * r)?;
                    apply(gpu, &stream, false, pv.bwd(), &u, &mut uc.slice_mut(..d_out * r), &s, &m, g, d_out, r)?;
                    gemm(
                        blas,
                        y,
                        Mat { data: &t, rows: n, cols: r, trans: false },
                        Mat { data: &uc.slice(..d_out * r), rows: d_out, cols: r, trans: true },
                        false,
                    )?;
                }
            }
            ExecPlan::Merged => {
                let w = grow(&stream, &mut ws.w, d_out * d_in)?;
                let core = Core { u: &u, s: &s, m: &m, g, v: &v, pv: &pv };
                merged_weight(
                    self.core.dims(),
                    gpu,
                    blas,
                    &stream,
                    &core,
                    &mut ws.fold,
                    &mut w.slice_mut(..d_out * d_in),
                )?;
                gemm(
                    blas,
                    y,
                    Mat { data: x, rows: n, cols: d_in, trans: false },
                    Mat { data: &w.slice(..d_out * d_in), rows: d_out, cols: d_in, trans: true },
                    false,
                )?;
                let xs = grow(&stream, &mut ws.x, n * d_in)?;
                stream.memcpy_dtod(x, &mut xs.slice_mut(..n * d_in)).map_err(|e| driver_err("saving X", e))?;
            }
        }
        if let Some(bias) = &self.bias {
            // Y += ones(n x 1) bias(1 x d_out): a rank-1 product, no extra kernel.
            let fresh = ws.ones.as_ref().is_none_or(|o| o.len() < n);
            let ones = grow(&stream, &mut ws.ones, n)?;
            if fresh {
                let host = vec![T::from_f32(1.0); ones.len()];
                stream.memcpy_htod(&host, ones).map_err(|e| driver_err("filling ones", e))?;
            }
            gemm(
                blas,
                y,
                Mat { data: &ones.slice(..n), rows: n, cols: 1, trans: false },
                Mat { data: &bias.slice(..), rows: 1, cols: d_out, trans: false },
                true,
            )?;
        }
        if !stateless {
            self.core.record_forward(n, plan);
        }
        Ok(())
    }

    /// Backward for `G = dL/dY` (`n x d_out`): writes `dx` (`n x d_in`), `dm` (|Omega|, f32) and
    /// `dgamma` (1 float, 0 without the gate). Needs the forward of the same `n` just before.
    pub fn backward(
        &mut self,
        g_out: &CudaView<'_, T>,
        n: usize,
        dx: &mut CudaViewMut<'_, T>,
        dm: &mut CudaViewMut<'_, f32>,
        dgamma: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let plan = self.core.forward_plan(n)?;
        self.backward_step(None, plan, g_out, n, dx, dm, dgamma)
    }

    /// Backward from the caller's saved `t` (`n x r`, written by [`CudaLayer::forward_saving`]
    /// for the same `n`), with the layer's current M and gamma, which must be that forward's.
    /// Writes as [`CudaLayer::backward`] does; touches no state a forward saved in the layer.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_saved(
        &mut self,
        t: &CudaView<'_, T>,
        g_out: &CudaView<'_, T>,
        n: usize,
        dx: &mut CudaViewMut<'_, T>,
        dm: &mut CudaViewMut<'_, f32>,
        dgamma: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        check_positive("tokens", n)?;
        check_len("T (n x r)", &vec![(); t.len()], n.saturating_mul(self.core.dims().r))?;
        let plan = self.saving_plan_for(n);
        self.backward_step(Some(t), plan, g_out, n, dx, dm, dgamma)
    }

    /// The backward pass of `plan`; `saved`: the caller's `T`, or `None` for the layer's own.
    #[allow(clippy::too_many_arguments)]
    fn backward_step(
        &mut self,
        saved: Option<&CudaView<'_, T>>,
        plan: ExecPlan,
        g_out: &CudaView<'_, T>,
        n: usize,
        dx: &mut CudaViewMut<'_, T>,
        dm: &mut CudaViewMut<'_, f32>,
        dgamma: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let Dims { d_out, d_in, r, nnz } = self.core.dims();
        check_len("G (n x d_out)", &vec![(); g_out.len()], n * d_out)?;
        check_len("dX (n x d_in)", &vec![(); dx.len()], n * d_in)?;
        check_len("dM (|Omega|)", &vec![(); dm.len()], nnz)?;
        check_len("dgamma", &vec![(); dgamma.len()], 1)?;
        let g = self.gate_state.slice(..1);
        let g = &g;
        let token_chunk = self.token_chunk();
        let stream = self.stream.clone();
        let deterministic = self.sddmm_mode == SddmmMode::Deterministic;
        let u = self.u.slice(..);
        let v = self.v.slice(..);
        let s = self.s.slice(..);
        let m = self.m.slice(..);
        let pv = PatternViews::new(self.band, &self.rows, &self.cols, &self.by_row, &self.by_col);
        let ws = &mut self.ws;
        let gpu = &self.gpu;
        let blas = &self.blas;
        let gate = self.core.config().gate;
        // Tokens per pass (the small-n path takes the batch whole), and where the backward core
        // goes: on the activations (`A C`) when the batch has fewer elements than V (n <= d_in),
        // else folded into V once; always on the activations on the small-n path (its kernels
        // take V as is). The choice follows n, not the chunk, so chunking moves no extra bytes.
        let chunk = if plan == ExecPlan::SmallN { n } else { token_chunk.min(n) };
        let core_on_acts = plan == ExecPlan::SmallN || n <= d_in;
        // The fused pass needs the band kernels and `A C` on the activations.
        let fused_band = self.band.filter(|&d| self.fused_backward && core_on_acts && fused_bwd_fits(d));
        let sddmm_rows = match plan {
            ExecPlan::Factored | ExecPlan::SmallN => chunk,
            ExecPlan::Merged => d_out,
        };
        let work = grow(&stream, &mut ws.sddmm, sddmm_workspace_len(self.band, deterministic, sddmm_rows, nnz))?;
        let gate_partial = grow(&stream, &mut ws.gate_partial, epilogue_blocks(nnz))?;
        if !gate {
            stream.memset_zeros(dgamma).map_err(|e| driver_err("zeroing dgamma", e))?;
        }
        match plan {
            ExecPlan::Factored | ExecPlan::SmallN => {
                let small = plan == ExecPlan::SmallN;
                let t = match saved {
                    Some(t) => t.slice(..n * r),
                    None => ws.t.as_ref().expect("forward saved T").slice(..n * r),
                };
                let a = grow(&stream, &mut ws.a, chunk * r)?;
                let vc = if core_on_acts {
                    None
                } else {
                    // n > d_in: fold C^T into V once, dX_c = A_c (V C^T)^T.
                    let vc = grow(&stream, &mut ws.fold, d_in * r)?;
                    apply(gpu, &stream, true, pv.fwd(), &v, &mut vc.slice_mut(..d_in * r), &s, &m, g, d_in, r)?;
                    Some(vc.slice(..d_in * r))
                };
                let mut ac = if core_on_acts { Some(grow(&stream, &mut ws.core_act, chunk * r)?) } else { None };
                // One pass per chunk of tokens: A_c = G_c U, dM (+)= SDDMM(A_c, T_c), dX_c from
                // A_c C. The first chunk writes dM and dgamma, the others add to them.
                for (i, t0) in (0..n).step_by(chunk).enumerate() {
                    let c = chunk.min(n - t0);
                    let accumulate = i > 0;
                    let g_c = g_out.slice(t0 * d_out..(t0 + c) * d_out);
                    let t_c = t.slice(t0 * r..(t0 + c) * r);
                    let mut dx_c = dx.slice_mut(t0 * d_in..(t0 + c) * d_in);
                    if small {
                        let elem = std::mem::size_of::<T>();
                        let skw = grow(&stream, &mut ws.skinny, smalln_workspace_len(d_out, d_in, r, n, elem))?;
                        skinny_nn(
                            gpu,
                            &stream,
                            &g_c,
                            &u,
                            &mut a.slice_mut(..c * r),
                            &mut skw.slice_mut(..),
                            c,
                            d_out,
                            r,
                        )?;
                    } else {
                        gemm(
                            blas,
                            &mut a.slice_mut(..c * r),
                            Mat { data: &g_c, rows: c, cols: d_out, trans: false },
                            Mat { data: &u, rows: d_out, cols: r, trans: false },
                            false,
                        )?;
                    }
                    let mut gp = gate_partial.slice_mut(..);
                    let gate_bufs = gate.then_some((&mut gp, &mut *dgamma));
                    let a_c = a.slice(..c * r);
                    let mut wv = work.slice_mut(..);
                    match (fused_band, ac.as_mut()) {
                        (Some(d), Some(ac)) => sddmm_apply_bwd(
                            gpu,
                            &stream,
                            d,
                            deterministic,
                            &a_c,
                            &t_c,
                            &mut ac.slice_mut(..c * r),
                            &s,
                            c,
                            r,
                            nnz,
                            &mut wv,
                            &m,
                            g,
                            dm,
                            gate_bufs,
                            accumulate,
                        )?,
                        _ => sddmm(
                            gpu,
                            &stream,
                            pv.sddmm(),
                            deterministic,
                            &a_c,
                            &t_c,
                            c,
                            r,
                            nnz,
                            &mut wv,
                            &m,
                            g,
                            dm,
                            gate_bufs,
                            accumulate,
                        )?,
                    }
                    match (ac.as_mut(), &vc) {
                        (Some(ac), _) => {
                            if fused_band.is_none() {
                                apply(
                                    gpu,
                                    &stream,
                                    false,
                                    pv.bwd(),
                                    &a_c,
                                    &mut ac.slice_mut(..c * r),
                                    &s,
                                    &m,
                                    g,
                                    c,
                                    r,
                                )?;
                            }
                            let ac_c = ac.slice(..c * r);
                            if small {
                                skinny_nt(gpu, &stream, &ac_c, &v, &mut dx_c, c, r, d_in)?;
                            } else {
                                gemm(
                                    blas,
                                    &mut dx_c,
                                    Mat { data: &ac_c, rows: c, cols: r, trans: false },
                                    Mat { data: &v, rows: d_in, cols: r, trans: true },
                                    false,
                                )?;
                            }
                        }
                        (None, Some(vc)) => gemm(
                            blas,
                            &mut dx_c,
                            Mat { data: &a_c, rows: c, cols: r, trans: false },
                            Mat { data: vc, rows: d_in, cols: r, trans: true },
                            false,
                        )?,
                        (None, None) => unreachable!("the core goes on the activations or into V"),
                    }
                }
            }
            ExecPlan::Merged => {
                let w = ws.w.as_ref().expect("forward saved W").slice(..d_out * d_in);
                let xs = ws.x.as_ref().expect("forward saved X").slice(..n * d_in);
                gemm(
                    blas,
                    dx,
                    Mat { data: g_out, rows: n, cols: d_out, trans: false },
                    Mat { data: &w, rows: d_out, cols: d_in, trans: false },
                    false,
                )?;
                let p = grow(&stream, &mut ws.p, d_out * d_in)?;
                gemm(
                    blas,
                    &mut p.slice_mut(..d_out * d_in),
                    Mat { data: g_out, rows: n, cols: d_out, trans: true },
                    Mat { data: &xs, rows: n, cols: d_in, trans: false },
                    false,
                )?;
                let q = grow(&stream, &mut ws.q, d_out * r)?;
                gemm(
                    blas,
                    &mut q.slice_mut(..d_out * r),
                    Mat { data: &p.slice(..d_out * d_in), rows: d_out, cols: d_in, trans: false },
                    Mat { data: &v, rows: d_in, cols: r, trans: false },
                    false,
                )?;
                let mut gp = gate_partial.slice_mut(..);
                let gate_bufs = gate.then_some((&mut gp, &mut *dgamma));
                sddmm(
                    gpu,
                    &stream,
                    pv.sddmm(),
                    deterministic,
                    &u,
                    &q.slice(..d_out * r),
                    d_out,
                    r,
                    nnz,
                    &mut work.slice_mut(..),
                    &m,
                    g,
                    dm,
                    gate_bufs,
                    false,
                )?;
            }
        }
        Ok(())
    }
}

impl<T: Dtype> CudaLayer<T> {
    /// `W = U C V^T` (`d_out x d_in`, row-major, in the layer's dtype) into `w` on the layer's
    /// stream: the merged plan's own product (C folded into U by the core kernel, then one
    /// GEMM), so a merged weight is what `forward` computes with; the device twin of
    /// [`crate::cpu::CpuLayer::merge`]. Only enqueues work.
    pub fn merge_into(&mut self, w: &mut CudaViewMut<'_, T>) -> Result<()> {
        let Dims { d_out, d_in, .. } = self.core.dims();
        check_len("W (d_out x d_in)", &vec![(); w.len()], d_out * d_in)?;
        let (u, s, m, v) = (self.u.slice(..), self.s.slice(..), self.m.slice(..), self.v.slice(..));
        let g = self.gate_state.slice(..1);
        let pv = PatternViews::new(self.band, &self.rows, &self.cols, &self.by_row, &self.by_col);
        let core = Core { u: &u, s: &s, m: &m, g: &g, v: &v, pv: &pv };
        merged_weight(self.core.dims(), &self.gpu, &self.blas, &self.stream, &core, &mut self.ws.fold, w)
    }
}

impl<T: Dtype> CudaLayer<T> {
    /// `W = U C V^T` in f32 (`d_out x d_in`, row-major) from a layer of any dtype, with neither
    /// W nor the fold `U C` rounded to the layer's dtype (there is no mixed-dtype fold kernel):
    /// `U C` is formed on the host in f32 from the device factors and coefficients, which
    /// synchronises the layer's stream, then `W = U_C V^T` by an f32 cuBLAS GEMM enqueued on
    /// it. For a merged weight in the layer's own dtype, [`CudaLayer::merge_into`] stays on the
    /// device.
    pub fn merge_into_f32(&mut self, w: &mut CudaViewMut<'_, f32>) -> Result<()> {
        let Dims { d_out: o, d_in: i, r, .. } = self.core.dims();
        check_len("W (d_out x d_in)", &vec![(); w.len()], o * i)?;
        let st = self.stream.clone();
        let u = st.clone_dtoh(&self.u).map_err(|e| driver_err("reading U", e))?;
        let s = st.clone_dtoh(&self.s).map_err(|e| driver_err("reading s", e))?;
        let v: Vec<f32> =
            st.clone_dtoh(&self.v).map_err(|e| driver_err("reading V", e))?.iter().map(|x| x.to_f32()).collect();
        let (m, g) = (self.coefficients()?, self.gate_value()?);
        let omega = self.core.omega();
        // U_C[row, j] = s_j U[row, j] + g sum over (i, j) in Omega of M_ij U[row, i].
        let mut uc = vec![0.0f32; o * r];
        for (ur, ucr) in u.chunks_exact(r).zip(uc.chunks_exact_mut(r)) {
            for ((c, &uv), &sv) in ucr.iter_mut().zip(ur).zip(&s) {
                *c = sv * uv.to_f32();
            }
            for ((&ri, &cj), &mk) in omega.rows.iter().zip(&omega.cols).zip(&m) {
                ucr[cj as usize] += g * mk * ur[ri as usize].to_f32();
            }
        }
        let uc = st.clone_htod(&uc).map_err(|e| driver_err("uploading U C", e))?;
        let v = st.clone_htod(&v).map_err(|e| driver_err("uploading V", e))?;
        gemm(
            &self.blas,
            w,
            Mat { data: &uc.slice(..), rows: o, cols: r, trans: false },
            Mat { data: &v.slice(..), rows: i, cols: r, trans: true },
            false,
        )
    }
}

/// The frozen factors and the core's device values, as one forward or merge reads them.
struct Core<'a, T: Dtype> {
    u: &'a CudaView<'a, T>,
    s: &'a CudaView<'a, f32>,
    m: &'a CudaView<'a, f32>,
    g: &'a CudaView<'a, f32>,
    v: &'a CudaView<'a, T>,
    pv: &'a PatternViews<'a>,
}

/// `w = (U C) V^T`: C folded into U (`fold`, grown to `d_out x r`) by the core kernel, then one
/// GEMM. The merged plan's forward and [`CudaLayer::merge_into`] both form W here.
fn merged_weight<T: Dtype>(
    dims: Dims,
    gpu: &crate::cuda::Gpu,
    blas: &cudarc::cublas::CudaBlas,
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    core: &Core<'_, T>,
    fold: &mut Option<cudarc::driver::CudaSlice<T>>,
    w: &mut CudaViewMut<'_, T>,
) -> Result<()> {
    let Dims { d_out, d_in, r, .. } = dims;
    let uc = grow(stream, fold, d_out * r)?;
    let mut uc = uc.slice_mut(..d_out * r);
    apply(gpu, stream, false, core.pv.bwd(), core.u, &mut uc, core.s, core.m, core.g, d_out, r)?;
    gemm(
        blas,
        w,
        Mat { data: &uc.as_view(), rows: d_out, cols: r, trans: false },
        Mat { data: core.v, rows: d_in, cols: r, trans: true },
        false,
    )
}
