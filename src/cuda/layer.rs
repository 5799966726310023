//! [`CudaLayer`]: the SVFT layer on a CUDA device, on buffers and a stream the caller owns.
//!
//! Same math, plans and checks as [`crate::cpu::CpuLayer`]. Forward and backward only enqueue
//! work on the stream (no host synchronisation) and allocate nothing after the first call with
//! a given token count: the workspace grows once and is reused. The factored plan keeps
//! `T = X V` whole and runs the rest in chunks of [`CudaLayer::token_chunk`] tokens, so its
//! scratch stops growing with `n` (see [`default_token_chunk`]). Shape, pattern, configuration,
//! plan choice and the forward bookkeeping are the [`LayerCore`] it embeds (and dereferences
//! to). This file holds the layer, its parameters and buffers; the step itself (forward,
//! backward, merge) is in `layer/step.rs`.

mod step;

use std::sync::Arc;

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaSlice, CudaStream, CudaView};

use super::kernels::{gate_from_gamma, CoreArgs, Dtype, SddmmPattern};
use super::{blas_err, driver_err, Gpu};
use crate::error::{check_len, Error, Result};
use crate::geometry::{band_fits, default_token_chunk};
use crate::layer::config::LayerConfig;
use crate::layer::core::LayerCore;
use crate::layer::pattern::Omega;
use crate::layer::plan::Dims;
use crate::layer::svd::Factors;

/// How the SDDMM reduces over the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SddmmMode {
    /// Float atomics across batch chunks: fastest, not bitwise reproducible.
    #[default]
    Fast,
    /// Per-chunk partials summed in a fixed order: bitwise reproducible run to run
    /// (workspace: one |Omega| row per batch chunk).
    Deterministic,
}

/// A CSR over the pattern on the device.
#[derive(Debug)]
struct DeviceCsr {
    ptr: CudaSlice<i32>,
    idx: CudaSlice<i32>,
    perm: CudaSlice<i32>,
}

/// Reusable device buffers, each grown once to the largest size asked of it.
#[derive(Debug, Default)]
struct Workspace<T: Dtype> {
    t: Option<CudaSlice<T>>,
    core_act: Option<CudaSlice<T>>,
    a: Option<CudaSlice<T>>,
    /// The core folded into a factor: `U C` (forward, merged forward) or `V C^T` (backward);
    /// never both live in one step, so they share one buffer.
    fold: Option<CudaSlice<T>>,
    w: Option<CudaSlice<T>>,
    x: Option<CudaSlice<T>>,
    p: Option<CudaSlice<T>>,
    q: Option<CudaSlice<T>>,
    ones: Option<CudaSlice<T>>,
    sddmm: Option<CudaSlice<f32>>,
    gate_partial: Option<CudaSlice<f32>>,
    /// Split-K partial sums of the small-n plan's `T = X V` and `A = G U`.
    skinny: Option<CudaSlice<f32>>,
}

/// Grows `slot` to at least `len` elements (allocating only then) and returns it.
fn grow<'a, T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    slot: &'a mut Option<CudaSlice<T>>,
    len: usize,
) -> Result<&'a mut CudaSlice<T>> {
    if slot.as_ref().is_none_or(|s| s.len() < len) {
        *slot = None; // free the old buffer before taking a larger one
        *slot = Some(stream.alloc_zeros::<T>(len.max(1)).map_err(|e| driver_err("allocating the workspace", e))?);
    }
    Ok(slot.as_mut().expect("just allocated"))
}

/// An SVFT layer on a CUDA device, activations and factors in `T` (f32, bf16 or f16).
#[derive(Debug)]
pub struct CudaLayer<T: Dtype> {
    gpu: Arc<Gpu>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    core: LayerCore,
    band: Option<usize>,
    u: CudaSlice<T>,
    v: CudaSlice<T>,
    s: CudaSlice<f32>,
    m: CudaSlice<f32>,
    /// gamma as last set from the host; `None` after [`CudaLayer::set_gamma_device`] (the
    /// device then holds the only copy, in `gate_state`).
    gamma: Option<f32>,
    /// `[g, gamma]` on the device: every kernel reads the gate value g from here, so a gamma
    /// trained on the device never makes a host round trip.
    gate_state: CudaSlice<f32>,
    bias: Option<CudaSlice<T>>,
    rows: CudaSlice<i32>,
    cols: CudaSlice<i32>,
    by_row: DeviceCsr,
    by_col: DeviceCsr,
    sddmm_mode: SddmmMode,
    /// Band SDDMM and `A C` in one pass in the factored backward (see [`CudaLayer::set_fused_backward`]).
    fused_backward: bool,
    /// Tokens per chunk of the factored plan's `n x r` scratch (`None`: [`default_token_chunk`]).
    token_chunk: Option<usize>,
    ws: Workspace<T>,
}

impl<T: Dtype> std::ops::Deref for CudaLayer<T> {
    type Target = LayerCore;
    fn deref(&self) -> &LayerCore {
        &self.core
    }
}

impl<T: Dtype> std::ops::DerefMut for CudaLayer<T> {
    fn deref_mut(&mut self) -> &mut LayerCore {
        &mut self.core
    }
}

/// Uploads one of the pattern's CSRs ([`Omega::csr_by_row`], [`Omega::csr_by_col`]).
fn upload_csr(stream: &Arc<CudaStream>, host: &crate::layer::pattern::Csr) -> Result<DeviceCsr> {
    let up = |v: &[u32]| {
        let v: Vec<i32> = v.iter().map(|&x| x as i32).collect();
        stream.clone_htod(&v).map_err(|e| driver_err("uploading the pattern", e))
    };
    Ok(DeviceCsr { ptr: up(&host.ptr)?, idx: up(&host.idx)?, perm: up(&host.perm)? })
}

/// The pattern's device structures viewed for one call, in the forms the kernels take.
struct PatternViews<'a> {
    band: Option<usize>,
    rows: CudaView<'a, i32>,
    cols: CudaView<'a, i32>,
    by_row: [CudaView<'a, i32>; 3],
    by_col: [CudaView<'a, i32>; 3],
}

impl<'a> PatternViews<'a> {
    fn new(
        band: Option<usize>,
        rows: &'a CudaSlice<i32>,
        cols: &'a CudaSlice<i32>,
        by_row: &'a DeviceCsr,
        by_col: &'a DeviceCsr,
    ) -> Self {
        let views = |c: &'a DeviceCsr| [c.ptr.slice(..), c.idx.slice(..), c.perm.slice(..)];
        PatternViews { band, rows: rows.slice(..), cols: cols.slice(..), by_row: views(by_row), by_col: views(by_col) }
    }

    /// The core for `in C^T` (forward, and the fold into V).
    fn fwd(&self) -> CoreArgs<'_> {
        match self.band {
            Some(d) => CoreArgs::Band { d: d as i32 },
            None => CoreArgs::Csr { ptr: &self.by_row[0], idx: &self.by_row[1], perm: &self.by_row[2] },
        }
    }

    /// The core for `in C` (backward, and the fold into U).
    fn bwd(&self) -> CoreArgs<'_> {
        match self.band {
            Some(d) => CoreArgs::Band { d: d as i32 },
            None => CoreArgs::Csr { ptr: &self.by_col[0], idx: &self.by_col[1], perm: &self.by_col[2] },
        }
    }

    /// The pattern for the SDDMM (COO entries visited in by-row order).
    fn sddmm(&self) -> SddmmPattern<'_> {
        match self.band {
            Some(d) => SddmmPattern::Band { d: d as i32 },
            None => SddmmPattern::Coo { rows: &self.rows, cols: &self.cols, order: &self.by_row[2] },
        }
    }
}

impl<T: Dtype> CudaLayer<T> {
    /// Builds the layer on `gpu`, enqueuing its uploads on `stream` (the stream every later call
    /// uses). The factors are rounded to `T`; s, M and gamma stay f32.
    pub fn new(
        gpu: Arc<Gpu>,
        stream: Arc<CudaStream>,
        factors: &Factors,
        config: &LayerConfig,
        bias: Option<&[f32]>,
    ) -> Result<Self> {
        let omega = config.pattern.omega(factors)?;
        Self::with_omega(gpu, stream, factors, omega, config, bias)
    }

    /// As [`CudaLayer::new`] with an explicit index set.
    pub fn with_omega(
        gpu: Arc<Gpu>,
        stream: Arc<CudaStream>,
        factors: &Factors,
        omega: Omega,
        config: &LayerConfig,
        bias: Option<&[f32]>,
    ) -> Result<Self> {
        let f = factors;
        LayerCore::check_rank(&omega, f.r)?;
        for (what, v) in [("d_out", f.d_out), ("d_in", f.d_in), ("|Omega|", omega.len())] {
            if v > i32::MAX as usize / 2 {
                return Err(Error::InvalidArgument(format!("{what} = {v} is too large for the kernels")));
            }
        }
        let core = LayerCore::new(f.d_out, f.d_in, omega, config, bias)?;
        let (omega, m) = (core.omega(), core.initial_coefficients());
        let narrow = |x: &[f32]| x.iter().map(|&v| T::from_f32(v)).collect::<Vec<T>>();
        let up_t = |x: &[T]| stream.clone_htod(x).map_err(|e| driver_err("uploading the factors", e));
        let up_f = |x: &[f32]| stream.clone_htod(x).map_err(|e| driver_err("uploading the factors", e));
        let up_i = |x: &[u32]| {
            let v: Vec<i32> = x.iter().map(|&i| i as i32).collect();
            stream.clone_htod(&v).map_err(|e| driver_err("uploading the pattern", e))
        };
        let in_band = omega.pattern.is_banded()
            && omega
                .rows
                .iter()
                .zip(&omega.cols)
                .all(|(&i, &j)| (i as i64 - j as i64).unsigned_abs() as usize <= omega.pattern.d());
        let band = (in_band && band_fits(omega.pattern.d())).then(|| omega.pattern.d());
        let blas = CudaBlas::new(stream.clone()).map_err(|e| blas_err("creating the cuBLAS handle", e))?;
        Ok(CudaLayer {
            u: up_t(&narrow(&f.u))?,
            v: up_t(&narrow(&f.v))?,
            s: up_f(&f.s)?,
            m: up_f(&m)?,
            bias: bias.map(|b| up_t(&narrow(b))).transpose()?,
            rows: up_i(&omega.rows)?,
            cols: up_i(&omega.cols)?,
            by_row: upload_csr(&stream, &omega.csr_by_row())?,
            by_col: upload_csr(&stream, &omega.csr_by_col())?,
            gamma: Some(0.0),
            gate_state: up_f(&[core.gate_for(0.0), 0.0])?,
            band,
            sddmm_mode: SddmmMode::Fast,
            fused_backward: true,
            token_chunk: None,
            ws: Workspace {
                t: None,
                core_act: None,
                a: None,
                fold: None,
                w: None,
                x: None,
                p: None,
                q: None,
                ones: None,
                sddmm: None,
                gate_partial: None,
                skinny: None,
            },
            core,
            blas,
            gpu,
            stream,
        })
    }

    /// The device this layer lives on.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }
    /// The stream all work is enqueued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    /// Chooses the SDDMM reduction (fast by default).
    pub fn set_sddmm_mode(&mut self, mode: SddmmMode) {
        self.sddmm_mode = mode;
    }
    /// Fuses the band SDDMM and the backward core apply `A C` into one kernel
    /// (`band_sddmm_apply_bwd_*`, on by default) where the factored backward forms `A C` on the
    /// activations (`n <= d_in`) and the fused kernel fits shared memory; off runs the two
    /// kernels separately (same results; the deterministic mode is bitwise the same).
    pub fn set_fused_backward(&mut self, on: bool) {
        self.fused_backward = on;
    }
    /// Whether the fused backward is enabled (see [`CudaLayer::set_fused_backward`]).
    pub fn fused_backward(&self) -> bool {
        self.fused_backward
    }
    /// Sets how many tokens the factored plan processes at a time after `T = X V`: its scratch
    /// (`S = T C^T`, `A = G U`, `A C`) then holds `tokens x r` elements instead of `n x r`, while
    /// T itself stays whole (backward needs all of it). `None` restores the default,
    /// [`default_token_chunk`]. Results do not depend on it beyond float summation order (dM
    /// is summed chunk by chunk); the deterministic mode stays reproducible for a given value.
    pub fn set_token_chunk(&mut self, tokens: Option<usize>) -> Result<()> {
        if tokens == Some(0) {
            return Err(Error::InvalidArgument("the token chunk must be at least 1 token".into()));
        }
        self.token_chunk = tokens;
        Ok(())
    }
    /// Tokens per chunk of the factored plan's scratch (see [`CudaLayer::set_token_chunk`]).
    pub fn token_chunk(&self) -> usize {
        self.token_chunk.unwrap_or_else(|| default_token_chunk(self.core.dims().r))
    }
    /// Whether the band stencil kernels are in use (else the CSR kernels).
    pub fn uses_band_kernels(&self) -> bool {
        self.band.is_some()
    }
    /// The frozen factors on the device: U (`d_out x r`, row-major, `T`), s (`r`, f32) and V
    /// (`d_in x r`, row-major, `T`).
    pub fn device_factors(&self) -> (&CudaSlice<T>, &CudaSlice<f32>, &CudaSlice<T>) {
        (&self.u, &self.s, &self.v)
    }
    /// The bias on the device (`d_out`, `T`), if the layer has one.
    pub fn device_bias(&self) -> Option<&CudaSlice<T>> {
        self.bias.as_ref()
    }
    /// The device buffer of the coefficients M (f32, canonical order): an optimizer may update
    /// it in place on the layer's stream.
    pub fn coefficients_mut(&mut self) -> &mut CudaSlice<f32> {
        self.core.forget_forward();
        &mut self.m
    }
    /// Copies the coefficients to the host (synchronises the stream).
    pub fn coefficients(&self) -> Result<Vec<f32>> {
        self.stream.clone_dtoh(&self.m).map_err(|e| driver_err("reading the coefficients", e))
    }
    /// Uploads new coefficients; they must be finite and |Omega| long.
    pub fn set_coefficients(&mut self, m: &[f32]) -> Result<()> {
        self.core.check_coefficients(m)?;
        self.stream.memcpy_htod(m, &mut self.m).map_err(|e| driver_err("writing the coefficients", e))?;
        self.core.forget_forward();
        Ok(())
    }
    /// Copies new coefficients from device memory (|Omega| f32) on the layer's stream, without
    /// synchronising the host. The caller orders `m`'s producer before this stream. Unlike
    /// [`CudaLayer::set_coefficients`] the values are not checked for finiteness (that would
    /// need a host round trip): a NaN propagates to the outputs as in any device operation.
    pub fn set_coefficients_device(&mut self, m: &CudaView<'_, f32>) -> Result<()> {
        check_len("coefficients", &vec![(); m.len()], self.core.dims().nnz)?;
        self.stream.memcpy_dtod(m, &mut self.m).map_err(|e| driver_err("copying the coefficients", e))?;
        self.core.forget_forward();
        Ok(())
    }
    /// The gate parameter gamma: the value last set from the host, or read back from the
    /// device (synchronising the stream) after [`CudaLayer::set_gamma_device`].
    pub fn gamma(&self) -> Result<f32> {
        match self.gamma {
            Some(gamma) => Ok(gamma),
            None => self.read_gate_state(1),
        }
    }
    /// Sets gamma from the host (finite); the gate value is computed here and copied to the
    /// device on the layer's stream.
    pub fn set_gamma(&mut self, gamma: f32) -> Result<()> {
        LayerCore::check_gamma(gamma)?;
        let state = [self.core.gate_for(gamma), gamma];
        self.stream.memcpy_htod(&state, &mut self.gate_state).map_err(|e| driver_err("writing gamma", e))?;
        self.gamma = Some(gamma);
        self.core.forget_forward();
        Ok(())
    }
    /// Sets gamma from one f32 in device memory: a one-thread kernel on the layer's stream
    /// computes the gate value there, so the host neither waits nor sees the value (the caller
    /// orders `gamma`'s producer before this stream; not checked for finiteness).
    pub fn set_gamma_device(&mut self, gamma: &CudaView<'_, f32>) -> Result<()> {
        check_len("gamma", &vec![(); gamma.len()], 1)?;
        gate_from_gamma(&self.gpu, &self.stream, gamma, self.core.config().gate, &mut self.gate_state.slice_mut(..))?;
        self.gamma = None;
        self.core.forget_forward();
        Ok(())
    }
    /// The gate value g in use (1 without the gate); read back from the device after
    /// [`CudaLayer::set_gamma_device`].
    pub fn gate_value(&self) -> Result<f32> {
        match self.gamma {
            Some(gamma) => Ok(self.core.gate_for(gamma)),
            None => self.read_gate_state(0),
        }
    }
    fn read_gate_state(&self, i: usize) -> Result<f32> {
        let state = self.stream.clone_dtoh(&self.gate_state).map_err(|e| driver_err("reading gamma", e))?;
        Ok(state[i])
    }

    /// Device bytes held between steps: factors, s, M, pattern structures, bias.
    pub fn persistent_bytes(&self) -> usize {
        let Dims { d_out: o, d_in: i, r, nnz: k } = self.core.dims();
        std::mem::size_of::<T>() * ((o + i) * r + self.bias.as_ref().map_or(0, |_| o))
            + 4 * (r + k)
            + 4 * (2 * k + 2 * (r + 1 + 2 * k))
    }

    /// Device bytes of the workspace currently held.
    pub fn workspace_bytes(&self) -> usize {
        let t = |s: &Option<CudaSlice<T>>| s.as_ref().map_or(0, |s| s.len() * std::mem::size_of::<T>());
        let f = |s: &Option<CudaSlice<f32>>| s.as_ref().map_or(0, |s| s.len() * 4);
        let w = &self.ws;
        t(&w.t)
            + t(&w.core_act)
            + t(&w.a)
            + t(&w.fold)
            + t(&w.w)
            + t(&w.x)
            + t(&w.p)
            + t(&w.q)
            + t(&w.ones)
            + f(&w.sddmm)
            + f(&w.gate_partial)
            + f(&w.skinny)
    }
}
