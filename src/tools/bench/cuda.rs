//! `svft bench --backend cuda`: the same figures as the CPU bench, timed on the device with
//! CUDA events (medians of batches after warm-up, random inputs, never zeros), all baselines
//! on the same device, library (cuBLAS) and dtype in the same process.
//!
//! [`CudaShape`] holds what one shape's rows share (inputs, LoRA's weights, the floor's
//! buffers), so the grid uploads them once per shape; [`CudaShape::row`] times one layer at
//! one token count and returns the row.

use std::sync::Arc;
use std::time::Duration;

use cudarc::cublas::CudaBlas;
use cudarc::driver::{sys::CUevent_flags, CudaSlice, CudaStream};

use crate::cuda::{blas_err, driver_err, CudaLayer, Gpu};
use crate::cuda::{gemm, Dtype, Mat};
use crate::error::{Error, Result};
use crate::layer::config::LayerConfig;
use crate::layer::plan::{ExecPlan, Plan};
use crate::layer::svd::random_factors;
use crate::tools::bench::{
    bench_factors, bench_values, fixed_plans, plans_to_time, BenchCase, Grid, Row, BENCH_FACTORS_NOTE, LORA_RANK,
};
use crate::tools::memory::{self, Shape};

/// Milliseconds of `iters` calls of `f` on `stream`, from CUDA events around them (after the
/// work already queued). For criterion's `iter_custom` and the copy-bandwidth probe.
pub fn events_ms(stream: &Arc<CudaStream>, iters: u64, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let ctx = stream.context();
    let ev = |what| ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(|e| driver_err(what, e));
    let (start, end) = (ev("creating an event")?, ev("creating an event")?);
    start.record(stream).map_err(|e| driver_err("recording", e))?;
    for _ in 0..iters {
        f()?;
    }
    end.record(stream).map_err(|e| driver_err("recording", e))?;
    end.synchronize().map_err(|e| driver_err("timing", e))?;
    Ok(start.elapsed_ms(&end).map_err(|e| driver_err("timing", e))? as f64)
}

/// Median milliseconds per call of `f`, from CUDA events around batches of calls.
pub(super) fn time_ms(stream: &Arc<CudaStream>, budget_ms: f64, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    stream.synchronize().map_err(|e| driver_err("warm-up", e))?;
    // Batch size: enough calls per sample to cover ~2 ms, so launch jitter averages out.
    let once = events_ms(stream, 1, &mut f)?;
    let batch = ((2.0 / once.max(1e-3)).ceil() as u64).clamp(1, 1000);
    let mut samples = Vec::new();
    let mut spent = 0.0;
    while samples.len() < 7 || (spent < budget_ms && samples.len() < 200) {
        let ms = events_ms(stream, batch, &mut f)?;
        spent += ms;
        samples.push(ms / batch as f64);
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples[samples.len() / 2])
}

/// The device's copy bandwidth in GB/s: a device-to-device memcpy of 1 GiB timed with CUDA
/// events (median of 5 after one warm-up), counting the bytes read and the bytes written, as
/// a kernel streaming U and V is measured against bytes it reads.
pub fn copy_bandwidth_gb_per_s(stream: &Arc<CudaStream>) -> Result<f64> {
    const BYTES: usize = 1 << 30;
    let src = stream.alloc_zeros::<u8>(BYTES).map_err(|e| driver_err("allocating the copy probe", e))?;
    let mut dst = stream.alloc_zeros::<u8>(BYTES).map_err(|e| driver_err("allocating the copy probe", e))?;
    let mut copy = || stream.memcpy_dtod(&src, &mut dst).map_err(|e| driver_err("copy probe", e));
    events_ms(stream, 1, &mut copy)?;
    let mut ms: Vec<f64> = (0..5).map(|_| events_ms(stream, 1, &mut copy)).collect::<Result<_>>()?;
    ms.sort_by(f64::total_cmp);
    Ok(2.0 * BYTES as f64 / (ms[2] * 1e-3) / 1e9)
}

/// A row-major operand (shorthand).
pub(super) fn m_<'a, 'b, T>(
    data: &'a cudarc::driver::CudaView<'b, T>,
    rows: usize,
    cols: usize,
    trans: bool,
) -> Mat<'a, 'b, T> {
    Mat { data, rows, cols, trans }
}

pub(super) fn upload<T: Dtype>(stream: &Arc<CudaStream>, seed: u64, len: usize, std: f64) -> Result<CudaSlice<T>> {
    let host: Vec<T> = bench_values(seed, len, std).into_iter().map(T::from_f32).collect();
    stream.clone_htod(&host).map_err(|e| driver_err("uploading bench inputs", e))
}

pub(super) fn zeros<T: Dtype>(stream: &Arc<CudaStream>, len: usize) -> Result<CudaSlice<T>> {
    stream.alloc_zeros::<T>(len.max(1)).map_err(|e| driver_err("allocating bench buffers", e))
}

/// The per-shape state of the CUDA bench: inputs, outputs and LoRA r=16 for up to `max_n`
/// tokens, and the floor's scratch, made once and reused for every pattern and token count.
pub struct CudaShape<T: Dtype> {
    gpu: Arc<Gpu>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    d_out: usize,
    d_in: usize,
    max_n: usize,
    x: CudaSlice<T>,
    gy: CudaSlice<T>,
    y: CudaSlice<T>,
    dx: CudaSlice<T>,
    w0: CudaSlice<T>,
    la: CudaSlice<T>,
    lb: CudaSlice<T>,
    h: CudaSlice<T>,
    gb: CudaSlice<T>,
    da: CudaSlice<T>,
    db: CudaSlice<T>,
    /// Floor scratch: T and A (factored), W, P and Q (merged, allocated on first use).
    t: CudaSlice<T>,
    a: CudaSlice<T>,
    merged: Option<(CudaSlice<T>, CudaSlice<T>, CudaSlice<T>)>,
    copy_gb_per_s: Option<f64>,
    factors_note: Option<&'static str>,
}

impl<T: Dtype> CudaShape<T> {
    /// Buffers for a `d_out x d_in` layer at up to `max_n` tokens on `stream`.
    /// `copy_gb_per_s` (from [`copy_bandwidth_gb_per_s`], measured once per process) goes into
    /// every row; `factors_note` says how the layers' factors were made when not by QR.
    pub fn new(
        gpu: &Arc<Gpu>,
        stream: Arc<CudaStream>,
        d_out: usize,
        d_in: usize,
        max_n: usize,
        copy_gb_per_s: Option<f64>,
        factors_note: Option<&'static str>,
    ) -> Result<Self> {
        let (r, rl, s) = (d_out.min(d_in), LORA_RANK, &stream);
        Ok(CudaShape {
            gpu: gpu.clone(),
            blas: CudaBlas::new(stream.clone()).map_err(|e| blas_err("cuBLAS handle", e))?,
            d_out,
            d_in,
            max_n,
            x: upload(s, 2, max_n * d_in, 1.0)?,
            gy: upload(s, 3, max_n * d_out, 1.0)?,
            y: zeros(s, max_n * d_out)?,
            dx: zeros(s, max_n * d_in)?,
            w0: upload(s, 4, d_out * d_in, 0.02)?,
            la: upload(s, 5, rl * d_in, 0.02)?,
            lb: upload(s, 6, d_out * rl, 0.02)?,
            h: zeros(s, max_n * rl)?,
            gb: zeros(s, max_n * rl)?,
            da: zeros(s, rl * d_in)?,
            db: zeros(s, d_out * rl)?,
            t: upload(s, 7, max_n * r, 1.0)?,
            a: zeros(s, max_n * r)?,
            merged: None,
            copy_gb_per_s,
            factors_note,
            stream,
        })
    }

    /// The stream every row's work goes to.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    fn check(&self, layer: &CudaLayer<T>, n: usize) -> Result<()> {
        let d = layer.dims();
        if (d.d_out, d.d_in) != (self.d_out, self.d_in) || n == 0 || n > self.max_n {
            return Err(Error::InvalidArgument(format!(
                "bench row: a {}x{} layer at {n} tokens on a {}x{} context of up to {} tokens",
                d.d_out, d.d_in, self.d_out, self.d_in, self.max_n
            )));
        }
        Ok(())
    }

    /// One SVFT forward + backward of `layer` at `n` tokens (enqueued, not synchronised);
    /// `dm` (|Omega|) and `dg` (1) take the coefficient gradients.
    pub fn svft_step(
        &mut self,
        layer: &mut CudaLayer<T>,
        n: usize,
        dm: &mut CudaSlice<f32>,
        dg: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.check(layer, n)?;
        let (d_out, d_in) = (self.d_out, self.d_in);
        layer.forward(&self.x.slice(..n * d_in), n, &mut self.y.slice_mut(..n * d_out))?;
        layer.backward(
            &self.gy.slice(..n * d_out),
            n,
            &mut self.dx.slice_mut(..n * d_in),
            &mut dm.slice_mut(..),
            &mut dg.slice_mut(..),
        )
    }

    /// One LoRA r=16 forward + backward at `n` tokens, with dX, dA and dB (enqueued).
    pub fn lora_step(&mut self, n: usize) -> Result<()> {
        let (d_out, d_in, rl, b) = (self.d_out, self.d_in, LORA_RANK, &self.blas);
        if n == 0 || n > self.max_n {
            return Err(Error::InvalidArgument(format!("LoRA step at {n} tokens, context of {}", self.max_n)));
        }
        let (x, gy) = (self.x.slice(..n * d_in), self.gy.slice(..n * d_out));
        let (w0, la, lb) = (self.w0.slice(..), self.la.slice(..), self.lb.slice(..));
        let (mut y, mut dx) = (self.y.slice_mut(..n * d_out), self.dx.slice_mut(..n * d_in));
        gemm(b, &mut y, m_(&x, n, d_in, false), m_(&w0, d_out, d_in, true), false)?;
        gemm(b, &mut self.h.slice_mut(..n * rl), m_(&x, n, d_in, false), m_(&la, rl, d_in, true), false)?;
        gemm(b, &mut y, m_(&self.h.slice(..n * rl), n, rl, false), m_(&lb, d_out, rl, true), true)?;
        gemm(b, &mut dx, m_(&gy, n, d_out, false), m_(&w0, d_out, d_in, false), false)?;
        gemm(b, &mut self.gb.slice_mut(..n * rl), m_(&gy, n, d_out, false), m_(&lb, d_out, rl, false), false)?;
        gemm(b, &mut dx, m_(&self.gb.slice(..n * rl), n, rl, false), m_(&la, rl, d_in, false), true)?;
        gemm(b, &mut self.db.slice_mut(..), m_(&gy, n, d_out, true), m_(&self.h.slice(..n * rl), n, rl, false), false)?;
        gemm(b, &mut self.da.slice_mut(..), m_(&self.gb.slice(..n * rl), n, rl, true), m_(&x, n, d_in, false), false)
    }

    /// The frozen dense layer alone at `n` tokens (enqueued): `Y = X W0^T`, `dX = G W0`.
    pub fn dense_step(&mut self, n: usize) -> Result<()> {
        let (d_out, d_in, b) = (self.d_out, self.d_in, &self.blas);
        if n == 0 || n > self.max_n {
            return Err(Error::InvalidArgument(format!("dense step at {n} tokens, context of {}", self.max_n)));
        }
        let (x, gy, w0) = (self.x.slice(..n * d_in), self.gy.slice(..n * d_out), self.w0.slice(..));
        let (mut y, mut dx) = (self.y.slice_mut(..n * d_out), self.dx.slice_mut(..n * d_in));
        gemm(b, &mut y, m_(&x, n, d_in, false), m_(&w0, d_out, d_in, true), false)?;
        gemm(b, &mut dx, m_(&gy, n, d_out, false), m_(&w0, d_out, d_in, false), false)
    }

    /// The dense products of `plan` alone at `n` tokens, on `layer`'s U and V (enqueued).
    fn floor_step(&mut self, layer: &CudaLayer<T>, plan: ExecPlan, n: usize) -> Result<()> {
        let (d_out, d_in, r, b) = (self.d_out, self.d_in, layer.dims().r, &self.blas);
        let (u, _, v) = layer.device_factors();
        let (u, v) = (u.slice(..), v.slice(..));
        let (x, gy) = (self.x.slice(..n * d_in), self.gy.slice(..n * d_out));
        let (mut y, mut dx) = (self.y.slice_mut(..n * d_out), self.dx.slice_mut(..n * d_in));
        if plan.is_factored() {
            gemm(b, &mut self.t.slice_mut(..n * r), m_(&x, n, d_in, false), m_(&v, d_in, r, false), false)?;
            gemm(b, &mut y, m_(&self.t.slice(..n * r), n, r, false), m_(&u, d_out, r, true), false)?;
            gemm(b, &mut self.a.slice_mut(..n * r), m_(&gy, n, d_out, false), m_(&u, d_out, r, false), false)?;
            return gemm(b, &mut dx, m_(&self.a.slice(..n * r), n, r, false), m_(&v, d_in, r, true), false);
        }
        if self.merged.is_none() {
            let s = &self.stream;
            self.merged = Some((zeros(s, d_out * d_in)?, zeros(s, d_out * d_in)?, zeros(s, d_out * r)?));
        }
        let (w, p, q) = self.merged.as_mut().expect("just allocated");
        gemm(b, &mut w.slice_mut(..), m_(&u, d_out, r, false), m_(&v, d_in, r, true), false)?;
        gemm(b, &mut y, m_(&x, n, d_in, false), m_(&w.slice(..), d_out, d_in, true), false)?;
        gemm(b, &mut dx, m_(&gy, n, d_out, false), m_(&w.slice(..), d_out, d_in, false), false)?;
        gemm(b, &mut p.slice_mut(..), m_(&gy, n, d_out, true), m_(&x, n, d_in, false), false)?;
        gemm(b, &mut q.slice_mut(..), m_(&p.slice(..), d_out, d_in, false), m_(&v, d_in, r, false), false)
    }

    /// One row: `layer` timed on every plan of `plans` and on the plan `requested` resolves to
    /// at `n` tokens (the headline), that plan's dense products alone, LoRA r=16, and the
    /// official order (the merged plan: its time in `plan_ms` when timed). At least `budget`
    /// per timed quantity. The layer is left on `requested`.
    pub fn row(
        &mut self,
        layer: &mut CudaLayer<T>,
        n: usize,
        requested: Plan,
        plans: &[ExecPlan],
        budget: Duration,
    ) -> Result<Row> {
        self.check(layer, n)?;
        let budget_ms = budget.as_secs_f64() * 1e3;
        let stream = self.stream.clone();
        let dims = layer.dims();
        layer.set_plan(requested);
        let headline = layer.plan_for(n);
        let timed = plans_to_time(plans, headline);
        let mut dm = zeros::<f32>(&stream, dims.nnz)?;
        let mut dg = zeros::<f32>(&stream, 1)?;
        let mut plan_ms = Vec::new();
        for &p in &timed {
            layer.set_plan(p.into());
            plan_ms.push((p, time_ms(&stream, budget_ms, || self.svft_step(layer, n, &mut dm, &mut dg))?));
        }
        let official = match plan_ms.iter().find(|p| p.0 == ExecPlan::Merged) {
            Some(&(_, ms)) => ms,
            None => {
                layer.set_plan(Plan::Merged);
                time_ms(&stream, budget_ms, || self.svft_step(layer, n, &mut dm, &mut dg))?
            }
        };
        layer.set_plan(requested);
        // The fused backward only runs for band patterns on the factored order at n <= d_in.
        let unfused = if layer.uses_band_kernels()
            && layer.fused_backward()
            && headline == ExecPlan::Factored
            && n <= dims.d_in
        {
            layer.set_fused_backward(false);
            let t = time_ms(&stream, budget_ms, || self.svft_step(layer, n, &mut dm, &mut dg));
            layer.set_fused_backward(true);
            Some(t?)
        } else {
            None
        };
        let floor = time_ms(&stream, budget_ms, || self.floor_step(layer, headline, n))?;
        let lora = time_ms(&stream, budget_ms, || self.lora_step(n))?;
        let dense = time_ms(&stream, budget_ms, || self.dense_step(n))?;
        let svft_ms = plan_ms.iter().find(|p| p.0 == headline).map_or(f64::NAN, |p| p.1);
        let shape = Shape { d_out: dims.d_out, d_in: dims.d_in, r: dims.r, nnz: dims.nnz, n, act: size_of::<T>() };
        Ok(Row {
            backend: "cuda",
            device: self.gpu.name().to_string(),
            dtype: T::SUFFIX,
            d_out: dims.d_out,
            d_in: dims.d_in,
            tokens: n,
            pattern: layer.omega().pattern,
            plan_requested: requested,
            plan: headline,
            trainable_params: layer.trainable_params(),
            lora_params: LORA_RANK * (dims.d_in + dims.d_out),
            svft_fwd_bwd_ms: svft_ms,
            gemm_floor_ms: floor,
            lora_fwd_bwd_ms: lora,
            official_fwd_bwd_ms: official,
            official_note: Some("merged plan on the device: the official order without per-call sparse construction"),
            dense_fwd_bwd_ms: dense,
            plan_ms,
            plan_ms_note: None,
            plan_gemm_flops: headline.gemm_flops(&dims, n),
            lora_flops: dims.lora_flops(n, LORA_RANK),
            dense_flops: super::dense_flops(dims.d_out, dims.d_in, n),
            memory: memory::Report::new(shape, headline, LORA_RANK),
            copy_gb_per_s: self.copy_gb_per_s,
            layer_bytes: Some((layer.persistent_bytes(), layer.workspace_bytes())),
            factors_note: self.factors_note,
            unfused_bwd_ms: unfused,
            auto_measured: crate::layer::calibrate::measured(requested, layer.plan_table(), &dims, n),
        })
    }
}

/// Runs one case on `gpu` in dtype `T` (orthonormal random factors; only the requested plan
/// and the official order are timed); returns the row.
pub fn run_cuda<T: Dtype>(gpu: &Arc<Gpu>, case: &BenchCase) -> Result<Row> {
    case.check_fits()?;
    let (d_out, d_in, n) = (case.d_out, case.d_in, case.tokens);
    let stream = gpu.context().new_stream().map_err(|e| driver_err("creating a stream", e))?;
    let factors = random_factors(d_out, d_in, d_out.min(d_in), 1)?;
    let config = LayerConfig { plan: case.plan, ..LayerConfig::official(case.pattern) };
    let mut layer = CudaLayer::<T>::new(gpu.clone(), stream.clone(), &factors, &config, None)?;
    let headline = layer.plan_for(n);
    let mut ctx = CudaShape::<T>::new(gpu, stream, d_out, d_in, n, None, None)?;
    ctx.row(&mut layer, n, case.plan, &[headline], case.budget)
}

/// Runs a grid on `gpu` in dtype `T`: the copy bandwidth once, then per shape the fast
/// factors and one [`CudaShape`], one layer per pattern (calibrated at the grid's token
/// counts, so `Auto` is the measured choice), a row per token count (every fixed
/// plan, small-n included where it applies), each handed to `on_row` as soon as measured.
pub fn run_cuda_grid<T: Dtype>(
    gpu: &Arc<Gpu>,
    grid: &Grid,
    budget: Duration,
    on_row: &mut dyn FnMut(Row) -> Result<()>,
) -> Result<()> {
    let stream = gpu.context().new_stream().map_err(|e| driver_err("creating a stream", e))?;
    let copy = copy_bandwidth_gb_per_s(&stream)?;
    for &(d_out, d_in) in &grid.shapes {
        let factors = bench_factors(d_out, d_in, d_out.min(d_in), 1)?;
        let mut ctx = CudaShape::<T>::new(
            gpu,
            stream.clone(),
            d_out,
            d_in,
            grid.max_tokens(),
            Some(copy),
            Some(BENCH_FACTORS_NOTE),
        )?;
        for &pattern in &grid.patterns {
            let config = LayerConfig::official(pattern);
            let mut layer = CudaLayer::<T>::new(gpu.clone(), stream.clone(), &factors, &config, None)?;
            layer.calibrate(&crate::tools::bench::grid_calibration(grid, budget))?;
            for &n in &grid.tokens {
                on_row(ctx.row(&mut layer, n, Plan::Auto, &fixed_plans(n, true), budget)?)?;
            }
        }
    }
    Ok(())
}
