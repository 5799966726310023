//! `svft bench --adapters --backend cuda`: the rows of `adapters.rs` on a CUDA device, in the
//! chosen dtype, every method on the same stream and cuBLAS handle, timed with CUDA events
//! (medians of batches after warm-up, [`time_ms`]):
//! - `bank`: [`CudaBank`] with `N` distinct adapters (cuBLAS `X V` and `S U^T`, the
//!   `bank_apply_fwd` kernel between them);
//! - `one`: the same batch through one adapter;
//! - `dense`: `N` merged weights resident, one cuBLAS GEMM per segment (plus the bias once);
//! - `lora`: `Y = X W0^T` once, then per segment `Y_seg += (X_seg A_a^T) B_a^T`: two small
//!   GEMMs per segment, the usual way without a fused multi-adapter kernel (punica's SGMV
//!   would fuse them).
//!
//! Bytes per adapter are the device layout's (M in f32, the gate and a slot record; CSRs
//! shared per pattern), LoRA's and dense's in the activation dtype. The pattern-organisation
//! measurement is the CPU's only (on the device, adapters of one non-band pattern share one CSR
//! by construction). On the virtual GPU these timings are meaningless: it checks that the
//! bench runs, never a speed.

use std::sync::Arc;

use cudarc::cublas::CudaBlas;
use cudarc::driver::{result, CudaSlice, CudaStream};

use super::adapters::{bank_of, bench_adapters, AdapterBytes, AdaptersConfig, AdaptersReport, AdaptersRow};
use super::cuda::{m_, time_ms, upload, zeros};
use super::{bench_factors, LORA_RANK};
use crate::bank::layout::KernelLayout;
use crate::bank::segments::equal_segments;
use crate::bank::{CudaBank, Segment};
use crate::cuda::{blas_err, driver_err, gemm, Dtype, Gpu};
use crate::error::Result;
use crate::layer::pattern::Pattern;
use crate::layer::svd::Factors;

/// Runs the adapters bench on `gpu` in `T`; `on_row` sees each row as it is measured.
pub fn run_adapters_cuda<T: Dtype>(
    gpu: &Arc<Gpu>,
    cfg: &AdaptersConfig,
    on_row: &mut dyn FnMut(&AdaptersRow),
) -> Result<AdaptersReport> {
    cfg.check()?;
    gpu.context().bind_to_thread().map_err(|e| driver_err("binding the CUDA context", e))?;
    let stream = gpu.context().new_stream().map_err(|e| driver_err("creating a stream", e))?;
    let blas = CudaBlas::new(stream.clone()).map_err(|e| blas_err("creating the cuBLAS handle", e))?;
    let max_n = *cfg.tokens.iter().max().expect("checked");
    let max_count = *cfg.counts.iter().max().expect("checked");
    let budget_ms = cfg.budget.as_secs_f64() * 1e3;
    let mut report = AdaptersReport {
        backend: "cuda",
        dtype: T::SUFFIX,
        device: gpu.name().to_string(),
        pattern: cfg.pattern.to_string(),
        ..Default::default()
    };
    let act = std::mem::size_of::<T>();
    for &(d_out, d_in) in &cfg.shapes {
        let r = d_out.min(d_in);
        let f = bench_factors(d_out, d_in, r, 1)?;
        let bias = super::bench_values(9, d_out, 0.1);
        let mut bank = CudaBank::<T>::new(gpu.clone(), stream.clone(), &f, Some(&bias))?;
        for (id, a) in bench_adapters(&f, max_count, |_| cfg.pattern)?.into_iter().enumerate() {
            bank.add(id as u32, a)?;
        }
        report.bytes.push(device_bytes_per_adapter(&f, act)?);
        let rl = LORA_RANK;
        let x = upload::<T>(&stream, 2, max_n * d_in, 1.0)?;
        let mut y = zeros::<T>(&stream, max_n * d_out)?;
        let mut lora = Lora {
            w0: upload::<T>(&stream, 4, d_out * d_in, 1.0 / (d_in as f64).sqrt())?,
            a: upload::<T>(&stream, 6, max_count * rl * d_in, 1.0 / (d_in as f64).sqrt())?,
            b: upload::<T>(&stream, 7, max_count * d_out * rl, 1e-3)?,
            h: zeros::<T>(&stream, max_n * rl)?,
            bias: upload::<T>(&stream, 9, d_out, 0.1)?,
            ones: stream
                .clone_htod(&vec![T::from_f32(1.0); max_n])
                .map_err(|e| driver_err("uploading bench inputs", e))?,
        };
        // N merged weights, allocated once per shape for the largest count whose weights fit
        // twice in the free device memory.
        let per = d_out * d_in;
        let (free, _) = result::mem_get_info().map_err(|e| driver_err("reading the free device memory", e))?;
        let fit = cfg.counts.iter().copied().filter(|&c| c.saturating_mul(per * act).saturating_mul(2) <= free).max();
        let merged = fit.map(|c| merged_weights::<T>(&stream, c, per, d_in)).transpose()?;
        for &n in &cfg.tokens {
            for &count in &cfg.counts {
                let seg = n.div_ceil(count);
                let ids: Vec<i64> = (0..count as i64).collect();
                let table = equal_segments(n, seg, &ids);
                let one = [Segment::new(0, n, 0)];
                let (xv, mut yv) = (x.slice(..n * d_in), y.slice_mut(..n * d_out));
                let bank_ms = time_ms(&stream, budget_ms, || bank.forward(&xv, n, &table, &mut yv))?;
                let one_ms = time_ms(&stream, budget_ms, || bank.forward(&xv, n, &one, &mut yv))?;
                let lora_ms = time_ms(&stream, budget_ms, || lora.forward(&blas, &mut y, &x, n, &table, d_out, d_in))?;
                let (dense_ms, dense_note) = match &merged {
                    Some(w) if table.len() <= fit.unwrap_or(0) => {
                        let ms = time_ms(&stream, budget_ms, || {
                            dense_forward(&blas, w, &lora, &mut y, &x, n, &table, d_out, d_in)
                        })?;
                        (Some(ms), None)
                    }
                    _ => {
                        let note = format!(
                            "not timed: {} merged weights need {} MiB, the device had {} MiB free",
                            table.len(),
                            (table.len() * per * act) >> 20,
                            free >> 20
                        );
                        (None, Some(note))
                    }
                };
                let row = AdaptersRow {
                    d_out,
                    d_in,
                    n,
                    adapters: table.len(),
                    segment_rows: seg,
                    bank_ms,
                    one_ms,
                    dense_ms,
                    dense_note,
                    lora_ms,
                };
                on_row(&row);
                report.rows.push(row);
            }
        }
    }
    Ok(report)
}

/// LoRA r=16 adapters over a shared dense base, on the device.
struct Lora<T> {
    w0: CudaSlice<T>,
    /// `A_a`: `r_l x d_in` each, back to back.
    a: CudaSlice<T>,
    /// `B_a`: `d_out x r_l` each.
    b: CudaSlice<T>,
    h: CudaSlice<T>,
    bias: CudaSlice<T>,
    ones: CudaSlice<T>,
}

impl<T: Dtype> Lora<T> {
    /// `Y += ones bias^T` (a rank-1 product, as the bank adds its bias).
    fn add_bias(&self, blas: &CudaBlas, y: &mut CudaSlice<T>, n: usize, d_out: usize) -> Result<()> {
        let (ones, bias) = (self.ones.slice(..n), self.bias.slice(..));
        gemm(blas, &mut y.slice_mut(..n * d_out), m_(&ones, n, 1, false), m_(&bias, 1, d_out, false), true)
    }

    #[allow(clippy::too_many_arguments)]
    fn forward(
        &mut self,
        blas: &CudaBlas,
        y: &mut CudaSlice<T>,
        x: &CudaSlice<T>,
        n: usize,
        table: &[Segment],
        d_out: usize,
        d_in: usize,
    ) -> Result<()> {
        let rl = LORA_RANK;
        let (xv, w0) = (x.slice(..n * d_in), self.w0.slice(..));
        gemm(blas, &mut y.slice_mut(..n * d_out), m_(&xv, n, d_in, false), m_(&w0, d_out, d_in, true), false)?;
        self.add_bias(blas, y, n, d_out)?;
        for (k, s) in table.iter().enumerate().filter(|(_, s)| s.end > s.start) {
            let rows = s.end - s.start;
            let xs = x.slice(s.start * d_in..s.end * d_in);
            let a = self.a.slice(k * rl * d_in..(k + 1) * rl * d_in);
            let b = self.b.slice(k * d_out * rl..(k + 1) * d_out * rl);
            let mut hs = self.h.slice_mut(..rows * rl);
            gemm(blas, &mut hs, m_(&xs, rows, d_in, false), m_(&a, rl, d_in, true), false)?;
            let mut ys = y.slice_mut(s.start * d_out..s.end * d_out);
            gemm(blas, &mut ys, m_(&self.h.slice(..rows * rl), rows, rl, false), m_(&b, d_out, rl, true), true)?;
        }
        Ok(())
    }
}

/// `count` merged `d_out x d_in` weights back to back: one bench weight copied into every
/// slot on the device. Values do not change a GEMM's work, but all-zero operands draw less
/// power on a GPU (and may clock higher), so the weights are not left zeroed.
fn merged_weights<T: Dtype>(stream: &Arc<CudaStream>, count: usize, per: usize, d_in: usize) -> Result<CudaSlice<T>> {
    let one = upload::<T>(stream, 1000, per, 1.0 / (d_in as f64).sqrt())?;
    let mut w = zeros::<T>(stream, count * per)?;
    for k in 0..count {
        stream
            .memcpy_dtod(&one, &mut w.slice_mut(k * per..(k + 1) * per))
            .map_err(|e| driver_err("filling the merged weights", e))?;
    }
    Ok(w)
}

/// `Y_seg = X_seg W_a^T` for segment `a`, then the bias once.
#[allow(clippy::too_many_arguments)]
fn dense_forward<T: Dtype>(
    blas: &CudaBlas,
    w: &CudaSlice<T>,
    lora: &Lora<T>,
    y: &mut CudaSlice<T>,
    x: &CudaSlice<T>,
    n: usize,
    table: &[Segment],
    d_out: usize,
    d_in: usize,
) -> Result<()> {
    let per = d_out * d_in;
    for (k, s) in table.iter().enumerate().filter(|(_, s)| s.end > s.start) {
        let rows = s.end - s.start;
        let (xs, wk) = (x.slice(s.start * d_in..s.end * d_in), w.slice(k * per..(k + 1) * per));
        let mut ys = y.slice_mut(s.start * d_out..s.end * d_out);
        gemm(blas, &mut ys, m_(&xs, rows, d_in, false), m_(&wk, d_out, d_in, true), false)?;
    }
    lora.add_bias(blas, y, n, d_out)
}

/// Bytes per resident adapter in the device layout ([`KernelLayout`] of banks of 8 adapters):
/// M (f32), the gate value and the slot record per adapter, and the CSRs (shared per pattern,
/// none for bands); LoRA r=16 and a merged weight in `act`-byte elements.
fn device_bytes_per_adapter(f: &Factors, act: usize) -> Result<AdapterBytes> {
    let per = |p: Pattern| -> Result<(usize, usize)> {
        let layout = KernelLayout::new(&bank_of(f, 8, |_| p, true)?, true)?;
        let own = 4 * (layout.m.len() + layout.g.len() + layout.info.len());
        let csr = layout.info.chunks(4).any(|i| i[0] == -1);
        let shared = if csr { 4 * (layout.ptr.len() + layout.idx.len() + layout.perm.len()) } else { 0 };
        Ok((own / 8, shared))
    };
    Ok(AdapterBytes {
        d_out: f.d_out,
        d_in: f.d_in,
        plain: per(Pattern::Plain)?,
        banded2: per(Pattern::Banded { d: 2 })?,
        lora: act * LORA_RANK * (f.d_in + f.d_out),
        dense: act * f.d_out * f.d_in,
    })
}
