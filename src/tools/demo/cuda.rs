//! The demo's students on a CUDA device: SVFT on [`CudaLayer<f32>`] and LoRA through cuBLAS.
//!
//! **Host-staged.** The residual glue of the stack (tanh, the residual adds, the loss) stays on
//! the host, shared with the CPU run, so both backends see the same batches through the same
//! code. Each device layer therefore uploads its input and downloads its output once per
//! forward and once per backward; the layer products themselves run on the device.
//!
//! **f32.** The activations and factors are f32 so the losses can be compared step by step
//! with a CPU run of the same seed (tests/gpu.rs does).
//!
//! **No allocation per step.** Every device buffer is allocated when first needed and reused:
//! the token count is fixed within a run, so only the first call allocates (the layer's own
//! workspace grows the same way).
//!
//! **Adam on the host.** The trainable parameters are small (|Omega| for SVFT, `rl (d_in +
//! d_out)` for LoRA): gradients are downloaded, the same [`Adam`] as the CPU students steps a
//! host copy, and the new parameters are uploaded. That keeps the update identical across
//! backends and needs no extra kernel.

use std::sync::Arc;

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaSlice, CudaStream};

use super::stack::{Adam, StackLayer};
use crate::cuda::{blas_err, driver_err, gemm, CudaLayer, Gpu, Mat};
use crate::error::{check_len, Error, ForwardMismatch, Result};
use crate::layer::config::{Init, LayerConfig};
use crate::layer::pattern::Pattern;
use crate::layer::svd::Factors;
use crate::tools::baseline::LoraLayer;

/// A device buffer allocated on first use and grown only when a longer one is asked for.
#[derive(Default)]
struct Buf(Option<CudaSlice<f32>>);

impl Buf {
    fn get(&mut self, stream: &Arc<CudaStream>, len: usize) -> Result<&mut CudaSlice<f32>> {
        if self.0.as_ref().is_none_or(|b| b.len() < len) {
            self.0 = None; // free the smaller buffer before taking the larger one
            self.0 =
                Some(stream.alloc_zeros::<f32>(len.max(1)).map_err(|e| driver_err("allocating a demo buffer", e))?);
        }
        Ok(self.0.as_mut().expect("just allocated"))
    }

    fn bytes(&self) -> usize {
        self.0.as_ref().map_or(0, |b| 4 * b.len())
    }
}

/// Host `src` into the first `src.len()` elements of `dst`.
fn upload(stream: &Arc<CudaStream>, src: &[f32], dst: &mut CudaSlice<f32>, what: &str) -> Result<()> {
    stream.memcpy_htod(src, &mut dst.slice_mut(..src.len())).map_err(|e| driver_err(what, e))
}

/// The first `dst.len()` elements of `src` into host `dst`, waiting for them to land.
fn download(stream: &Arc<CudaStream>, src: &CudaSlice<f32>, dst: &mut [f32], what: &str) -> Result<()> {
    stream.memcpy_dtoh(&src.slice(..dst.len()), dst).map_err(|e| driver_err(what, e))?;
    // A copy into pageable memory already returns when done; the explicit wait keeps that true
    // whatever memory the caller passes.
    stream.synchronize().map_err(|e| driver_err(what, e))
}

/// SVFT on [`CudaLayer<f32>`] (Zero init, gate off: step 0 is W0 exactly, as on the CPU).
pub(super) struct CudaSvftStudent {
    layer: CudaLayer<f32>,
    stream: Arc<CudaStream>,
    gate: bool,
    x: Buf,
    y: Buf,
    g: Buf,
    dx: Buf,
    dm_dev: CudaSlice<f32>,
    dgamma_dev: CudaSlice<f32>,
    /// dM on the host (for Adam), and the host copy of M that Adam steps.
    dm: Vec<f32>,
    m: Vec<f32>,
    dgamma: f32,
    adam: Adam,
    adam_gamma: Adam,
}

impl CudaSvftStudent {
    pub(super) fn new(gpu: &Arc<Gpu>, stream: &Arc<CudaStream>, factors: &Factors, pattern: Pattern) -> Result<Self> {
        let config = LayerConfig { pattern, init: Init::Zero, gate: false, ..Default::default() };
        let layer = CudaLayer::<f32>::new(gpu.clone(), stream.clone(), factors, &config, None)?;
        let k = layer.omega().len();
        // The host copy starts from what the device holds (zeros under Init::Zero).
        let m = layer.coefficients()?;
        let alloc = |len| stream.alloc_zeros::<f32>(len).map_err(|e| driver_err("allocating dM", e));
        Ok(CudaSvftStudent {
            dm_dev: alloc(k)?,
            dgamma_dev: alloc(1)?,
            layer,
            stream: stream.clone(),
            gate: config.gate,
            x: Buf::default(),
            y: Buf::default(),
            g: Buf::default(),
            dx: Buf::default(),
            dm: vec![0.0; k],
            m,
            dgamma: 0.0,
            adam: Adam::new(k),
            adam_gamma: Adam::new(1),
        })
    }
}

impl StackLayer for CudaSvftStudent {
    fn forward(&mut self, x: &[f32], n: usize, y: &mut [f32]) -> Result<()> {
        let dims = self.layer.dims();
        let (len_x, len_y) = (n * dims.d_in, n * dims.d_out);
        check_len("X (n x d_in)", x, len_x)?;
        check_len("Y (n x d_out)", y, len_y)?;
        let xd = self.x.get(&self.stream, len_x)?;
        let yd = self.y.get(&self.stream, len_y)?;
        upload(&self.stream, x, xd, "uploading a layer input")?;
        self.layer.forward(&xd.slice(..len_x), n, &mut yd.slice_mut(..len_y))?;
        download(&self.stream, yd, y, "downloading a layer output")
    }

    fn backward(&mut self, g: &[f32], n: usize, dx: &mut [f32]) -> Result<()> {
        let dims = self.layer.dims();
        let (len_x, len_y) = (n * dims.d_in, n * dims.d_out);
        check_len("G (n x d_out)", g, len_y)?;
        check_len("dX (n x d_in)", dx, len_x)?;
        let gd = self.g.get(&self.stream, len_y)?;
        let dxd = self.dx.get(&self.stream, len_x)?;
        upload(&self.stream, g, gd, "uploading a layer gradient")?;
        self.layer.backward(
            &gd.slice(..len_y),
            n,
            &mut dxd.slice_mut(..len_x),
            &mut self.dm_dev.slice_mut(..),
            &mut self.dgamma_dev.slice_mut(..),
        )?;
        download(&self.stream, dxd, dx, "downloading dX")?;
        download(&self.stream, &self.dm_dev, &mut self.dm, "downloading dM")?;
        if self.gate {
            let mut dgamma = [0.0f32];
            download(&self.stream, &self.dgamma_dev, &mut dgamma, "downloading dgamma")?;
            self.dgamma = dgamma[0];
        }
        Ok(())
    }

    fn update(&mut self, lr: f32, t: usize) -> Result<()> {
        self.adam.step(&mut self.m, &self.dm, lr, t);
        self.layer.set_coefficients(&self.m)?;
        if self.gate {
            let mut gamma = [self.layer.gamma()?];
            self.adam_gamma.step(&mut gamma, &[self.dgamma], lr, t);
            self.layer.set_gamma(gamma[0])?;
        }
        Ok(())
    }

    fn trainable(&self) -> usize {
        self.layer.trainable_params()
    }

    fn frozen_bytes(&self) -> usize {
        // The layer's persistent device bytes (U, s, V, the pattern's index structures) less M,
        // which the training-state column counts.
        self.layer.persistent_bytes() - 4 * self.layer.omega().len()
    }

    fn saved_bytes(&self, _n: usize) -> usize {
        // What the device holds beyond the persistent bytes: the layer's workspace (saved T or
        // X and scratch), the staging buffers and dM.
        self.layer.workspace_bytes()
            + [&self.x, &self.y, &self.g, &self.dx].iter().map(|b| b.bytes()).sum::<usize>()
            + 4 * (self.dm_dev.len() + self.dgamma_dev.len())
    }
}

/// LoRA `Y = X W0^T + (X A^T) B^T` through cuBLAS (scale 1, as [`LoraLayer`]), A from the same
/// seed as the CPU student and B = 0.
pub(super) struct CudaLoraStudent {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    d_out: usize,
    d_in: usize,
    rank: usize,
    w0: CudaSlice<f32>,
    a_dev: CudaSlice<f32>,
    b_dev: CudaSlice<f32>,
    da_dev: CudaSlice<f32>,
    db_dev: CudaSlice<f32>,
    /// Host copies of A and B that Adam steps, and the downloaded gradients.
    a: Vec<f32>,
    b: Vec<f32>,
    ga: Vec<f32>,
    gb: Vec<f32>,
    adam_a: Adam,
    adam_b: Adam,
    /// The forward's input (saved for dA) and `H = X A^T`.
    x: Buf,
    h: Buf,
    y: Buf,
    g: Buf,
    /// `G B`, the gradient reaching `H`.
    gh: Buf,
    dx: Buf,
    saved: Option<usize>,
}

impl CudaLoraStudent {
    pub(super) fn new(
        stream: &Arc<CudaStream>,
        w0: Vec<f32>,
        d_out: usize,
        d_in: usize,
        rank: usize,
        seed: u64,
    ) -> Result<Self> {
        check_len("W0 (d_out x d_in)", &w0, d_out * d_in)?;
        let up = |v: &[f32]| stream.clone_htod(v).map_err(|e| driver_err("uploading LoRA weights", e));
        let w0_dev = up(&w0)?;
        // A exactly as the CPU student draws it (LoraLayer::new with the same seed).
        let a = LoraLayer::new(w0, d_out, d_in, rank, seed).params_mut().0.to_vec();
        let b = vec![0.0f32; d_out * rank]; // B = 0: the adapted layer starts at W0.
        let blas = CudaBlas::new(stream.clone()).map_err(|e| blas_err("creating the cuBLAS handle", e))?;
        Ok(CudaLoraStudent {
            blas,
            d_out,
            d_in,
            rank,
            w0: w0_dev,
            a_dev: up(&a)?,
            b_dev: up(&b)?,
            da_dev: up(&vec![0.0; rank * d_in])?,
            db_dev: up(&vec![0.0; d_out * rank])?,
            ga: vec![0.0; rank * d_in],
            gb: vec![0.0; d_out * rank],
            adam_a: Adam::new(rank * d_in),
            adam_b: Adam::new(d_out * rank),
            a,
            b,
            x: Buf::default(),
            h: Buf::default(),
            y: Buf::default(),
            g: Buf::default(),
            gh: Buf::default(),
            dx: Buf::default(),
            saved: None,
            stream: stream.clone(),
        })
    }
}

impl StackLayer for CudaLoraStudent {
    fn forward(&mut self, x: &[f32], n: usize, y: &mut [f32]) -> Result<()> {
        let (d_out, d_in, rl) = (self.d_out, self.d_in, self.rank);
        check_len("X (n x d_in)", x, n * d_in)?;
        check_len("Y (n x d_out)", y, n * d_out)?;
        self.saved = None;
        let stream = &self.stream;
        let xd = self.x.get(stream, n * d_in)?;
        let hd = self.h.get(stream, n * rl)?;
        let yd = self.y.get(stream, n * d_out)?;
        upload(stream, x, xd, "uploading a layer input")?;
        let xv = xd.slice(..n * d_in);
        let mut yv = yd.slice_mut(..n * d_out);
        let (w0, a, b) = (self.w0.slice(..), self.a_dev.slice(..), self.b_dev.slice(..));
        // Y = X W0^T, H = X A^T, Y += H B^T.
        gemm(
            &self.blas,
            &mut yv,
            Mat { data: &xv, rows: n, cols: d_in, trans: false },
            Mat { data: &w0, rows: d_out, cols: d_in, trans: true },
            false,
        )?;
        gemm(
            &self.blas,
            &mut hd.slice_mut(..n * rl),
            Mat { data: &xv, rows: n, cols: d_in, trans: false },
            Mat { data: &a, rows: rl, cols: d_in, trans: true },
            false,
        )?;
        gemm(
            &self.blas,
            &mut yv,
            Mat { data: &hd.slice(..n * rl), rows: n, cols: rl, trans: false },
            Mat { data: &b, rows: d_out, cols: rl, trans: true },
            true,
        )?;
        download(stream, yd, y, "downloading a layer output")?;
        self.saved = Some(n);
        Ok(())
    }

    fn backward(&mut self, g: &[f32], n: usize, dx: &mut [f32]) -> Result<()> {
        let (d_out, d_in, rl) = (self.d_out, self.d_in, self.rank);
        match self.saved {
            None => return Err(Error::NoForward(ForwardMismatch::Missing)),
            Some(f) if f != n => return Err(Error::NoForward(ForwardMismatch::Tokens { forward: f, backward: n })),
            Some(_) => {}
        }
        check_len("G (n x d_out)", g, n * d_out)?;
        check_len("dX (n x d_in)", dx, n * d_in)?;
        let stream = &self.stream;
        let gd = self.g.get(stream, n * d_out)?;
        let ghd = self.gh.get(stream, n * rl)?;
        let dxd = self.dx.get(stream, n * d_in)?;
        upload(stream, g, gd, "uploading a layer gradient")?;
        let gv = gd.slice(..n * d_out);
        let xv = self.x.0.as_ref().expect("forward saved X").slice(..n * d_in);
        let hv = self.h.0.as_ref().expect("forward saved H").slice(..n * rl);
        let (w0, a, b) = (self.w0.slice(..), self.a_dev.slice(..), self.b_dev.slice(..));
        let mut dxv = dxd.slice_mut(..n * d_in);
        // dX = G W0 + (G B) A, dB = G^T H, dA = (G B)^T X.
        gemm(
            &self.blas,
            &mut dxv,
            Mat { data: &gv, rows: n, cols: d_out, trans: false },
            Mat { data: &w0, rows: d_out, cols: d_in, trans: false },
            false,
        )?;
        gemm(
            &self.blas,
            &mut ghd.slice_mut(..n * rl),
            Mat { data: &gv, rows: n, cols: d_out, trans: false },
            Mat { data: &b, rows: d_out, cols: rl, trans: false },
            false,
        )?;
        let ghv = ghd.slice(..n * rl);
        gemm(
            &self.blas,
            &mut dxv,
            Mat { data: &ghv, rows: n, cols: rl, trans: false },
            Mat { data: &a, rows: rl, cols: d_in, trans: false },
            true,
        )?;
        gemm(
            &self.blas,
            &mut self.db_dev.slice_mut(..),
            Mat { data: &gv, rows: n, cols: d_out, trans: true },
            Mat { data: &hv, rows: n, cols: rl, trans: false },
            false,
        )?;
        gemm(
            &self.blas,
            &mut self.da_dev.slice_mut(..),
            Mat { data: &ghv, rows: n, cols: rl, trans: true },
            Mat { data: &xv, rows: n, cols: d_in, trans: false },
            false,
        )?;
        download(stream, dxd, dx, "downloading dX")?;
        download(stream, &self.da_dev, &mut self.ga, "downloading dA")?;
        download(stream, &self.db_dev, &mut self.gb, "downloading dB")
    }

    fn update(&mut self, lr: f32, t: usize) -> Result<()> {
        self.adam_a.step(&mut self.a, &self.ga, lr, t);
        self.adam_b.step(&mut self.b, &self.gb, lr, t);
        upload(&self.stream, &self.a, &mut self.a_dev, "uploading A")?;
        upload(&self.stream, &self.b, &mut self.b_dev, "uploading B")?;
        // The saved H was computed with the old A.
        self.saved = None;
        Ok(())
    }

    fn trainable(&self) -> usize {
        self.rank * (self.d_in + self.d_out)
    }

    fn frozen_bytes(&self) -> usize {
        4 * self.w0.len()
    }

    fn saved_bytes(&self, _n: usize) -> usize {
        // Device bytes beyond W0, A and B: saved X and H, staging buffers, dA and dB.
        [&self.x, &self.h, &self.y, &self.g, &self.gh, &self.dx].iter().map(|b| b.bytes()).sum::<usize>()
            + 4 * (self.da_dev.len() + self.db_dev.len())
    }
}
