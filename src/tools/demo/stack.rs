//! The demo's residual stack: the students it trains (SVFT on [`CpuLayer`], LoRA), the dense
//! teacher, the stack itself and Adam. The CUDA students (`cuda.rs`) plug into the same
//! [`StackLayer`] trait, so a run picks its backend once, per student.

use crate::cpu::gemm::{gemm, Operand as Op};
use crate::cpu::CpuLayer;
use crate::error::{Error, Result};
use crate::layer::config::{Init, LayerConfig};
use crate::layer::pattern::Pattern;
use crate::layer::svd::Factors;
use crate::tools::baseline::LoraLayer;
use crate::tools::memory::{self, Shape};

use super::Branch;

/// Adam over one parameter vector.
#[derive(Debug, Clone)]
pub(super) struct Adam {
    m: Vec<f32>,
    v: Vec<f32>,
}

impl Adam {
    pub(super) fn new(len: usize) -> Self {
        Adam { m: vec![0.0; len], v: vec![0.0; len] }
    }
    pub(super) fn step(&mut self, p: &mut [f32], g: &[f32], lr: f32, t: usize) {
        let (b1, b2, eps) = (0.9f32, 0.999f32, 1e-8f32);
        let (c1, c2) = (1.0 - b1.powi(t as i32), 1.0 - b2.powi(t as i32));
        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(&mut self.m).zip(&mut self.v) {
            *m = b1 * *m + (1.0 - b1) * g;
            *v = b2 * *v + (1.0 - b2) * g * g;
            *p -= lr * (*m / c1) / ((*v / c2).sqrt() + eps);
        }
    }
}

/// A layer of a stack: forward, backward into dX, an optimizer step, and its costs.
pub(super) trait StackLayer {
    fn forward(&mut self, x: &[f32], n: usize, y: &mut [f32]) -> Result<()>;
    fn backward(&mut self, g: &[f32], n: usize, dx: &mut [f32]) -> Result<()>;
    fn update(&mut self, lr: f32, t: usize) -> Result<()>;
    fn trainable(&self) -> usize;
    fn frozen_bytes(&self) -> usize;
    fn saved_bytes(&self, n: usize) -> usize;
}

pub(super) struct SvftStudent {
    layer: CpuLayer,
    dm: Vec<f32>,
    dgamma: f32,
    m: Vec<f32>,
    adam: Adam,
    adam_gamma: Adam,
}

impl SvftStudent {
    pub(super) fn new(factors: Factors, pattern: Pattern) -> Result<Self> {
        let config = LayerConfig { pattern, init: Init::Zero, gate: false, ..Default::default() };
        let layer = CpuLayer::new(factors, &config, None)?;
        let k = layer.omega().len();
        Ok(SvftStudent {
            layer,
            dm: vec![0.0; k],
            dgamma: 0.0,
            m: vec![0.0; k],
            adam: Adam::new(k),
            adam_gamma: Adam::new(1),
        })
    }
}

impl StackLayer for SvftStudent {
    fn forward(&mut self, x: &[f32], n: usize, y: &mut [f32]) -> Result<()> {
        self.layer.forward_into(x, n, y)
    }
    fn backward(&mut self, g: &[f32], n: usize, dx: &mut [f32]) -> Result<()> {
        self.dgamma = self.layer.backward_into(g, n, dx, &mut self.dm)?;
        Ok(())
    }
    fn update(&mut self, lr: f32, t: usize) -> Result<()> {
        self.m.copy_from_slice(self.layer.coefficients());
        self.adam.step(&mut self.m, &self.dm, lr, t);
        self.layer.set_coefficients(&self.m)?;
        if self.layer.config().gate {
            let mut gamma = [self.layer.gamma()];
            self.adam_gamma.step(&mut gamma, &[self.dgamma], lr, t);
            self.layer.set_gamma(gamma[0])?;
        }
        Ok(())
    }
    fn trainable(&self) -> usize {
        self.layer.trainable_params()
    }
    fn frozen_bytes(&self) -> usize {
        self.layer.factors().bytes()
    }
    fn saved_bytes(&self, n: usize) -> usize {
        // The layer's own model: T = X V (n x r) on the factored plan, X (n x d_in) on the merged.
        self.layer.workspace_model(n).1
    }
}

pub(super) struct LoraStudent {
    layer: LoraLayer,
    d_out: usize,
    d_in: usize,
    rank: usize,
    ga: Vec<f32>,
    gb: Vec<f32>,
    adam_a: Adam,
    adam_b: Adam,
}

impl LoraStudent {
    pub(super) fn new(w0: Vec<f32>, d_out: usize, d_in: usize, rank: usize, seed: u64) -> Self {
        let mut layer = LoraLayer::new(w0, d_out, d_in, rank, seed);
        layer.params_mut().1.fill(0.0); // B = 0: the adapted layer starts at W0.
        LoraStudent {
            layer,
            d_out,
            d_in,
            rank,
            ga: vec![0.0; rank * d_in],
            gb: vec![0.0; d_out * rank],
            adam_a: Adam::new(rank * d_in),
            adam_b: Adam::new(d_out * rank),
        }
    }
}

impl StackLayer for LoraStudent {
    fn forward(&mut self, x: &[f32], n: usize, y: &mut [f32]) -> Result<()> {
        self.layer.forward(x, n, y);
        Ok(())
    }
    fn backward(&mut self, g: &[f32], n: usize, dx: &mut [f32]) -> Result<()> {
        self.layer.backward(g, n, dx);
        Ok(())
    }
    fn update(&mut self, lr: f32, t: usize) -> Result<()> {
        self.ga.copy_from_slice(&self.layer.da);
        self.gb.copy_from_slice(&self.layer.db);
        let (a, b) = self.layer.params_mut();
        self.adam_a.step(a, &self.ga, lr, t);
        self.adam_b.step(b, &self.gb, lr, t);
        Ok(())
    }
    fn trainable(&self) -> usize {
        self.layer.trainable_params()
    }
    fn frozen_bytes(&self) -> usize {
        4 * self.d_out * self.d_in
    }
    fn saved_bytes(&self, n: usize) -> usize {
        // X and H = X A^T, as the bench's memory model counts LoRA.
        let shape = Shape { d_out: self.d_out, d_in: self.d_in, r: self.rank, nnz: 0, n, act: 4 };
        memory::lora(&shape, self.rank).saved
    }
}

/// A dense frozen layer (the teacher): forward only.
pub(super) struct Dense {
    pub(super) w: Vec<f32>,
    pub(super) d_out: usize,
    pub(super) d_in: usize,
}

impl StackLayer for Dense {
    fn forward(&mut self, x: &[f32], n: usize, y: &mut [f32]) -> Result<()> {
        gemm(y, Op::n(x, n, self.d_in), Op::t(&self.w, self.d_out, self.d_in), false);
        Ok(())
    }
    fn backward(&mut self, _: &[f32], _: usize, _: &mut [f32]) -> Result<()> {
        Err(Error::InvalidArgument("the teacher is not trained".into()))
    }
    fn update(&mut self, _: f32, _: usize) -> Result<()> {
        Ok(())
    }
    fn trainable(&self) -> usize {
        0
    }
    fn frozen_bytes(&self) -> usize {
        4 * self.w.len()
    }
    fn saved_bytes(&self, _: usize) -> usize {
        0
    }
}

/// The residual stack over boxed layers, with its activation buffers.
pub(super) struct Net {
    pub(super) layers: Vec<Box<dyn StackLayer>>,
    shapes: Vec<(usize, usize)>,
    branches: Vec<Branch>,
    d: usize,
    alpha: f32,
    /// Input of each branch, and the output after the last.
    hs: Vec<Vec<f32>>,
    /// tanh outputs of MLP branches.
    mids: Vec<Vec<f32>>,
    a: Vec<f32>,
    z: Vec<f32>,
    gh: Vec<f32>,
    ga: Vec<f32>,
    gt: Vec<f32>,
    dx: Vec<f32>,
}

impl Net {
    pub(super) fn new(
        layers: Vec<Box<dyn StackLayer>>,
        shapes: Vec<(usize, usize)>,
        d: usize,
        branches: Vec<Branch>,
    ) -> Self {
        let nb = branches.len();
        Net {
            layers,
            shapes,
            alpha: 1.0 / (nb.max(1) as f32).sqrt(),
            branches,
            d,
            hs: vec![Vec::new(); nb + 1],
            mids: vec![Vec::new(); nb],
            a: Vec::new(),
            z: Vec::new(),
            gh: Vec::new(),
            ga: Vec::new(),
            gt: Vec::new(),
            dx: Vec::new(),
        }
    }

    pub(super) fn forward(&mut self, x: &[f32], n: usize) -> Result<&[f32]> {
        let d = self.d;
        self.hs[0].clear();
        self.hs[0].extend_from_slice(x);
        self.a.resize(n * d, 0.0);
        for (b, &branch) in self.branches.iter().enumerate() {
            match branch {
                Branch::Linear(i) => self.layers[i].forward(&self.hs[b], n, &mut self.a)?,
                Branch::Mlp { up, down } => {
                    let f = self.shapes[up].0;
                    self.z.resize(n * f, 0.0);
                    self.layers[up].forward(&self.hs[b], n, &mut self.z)?;
                    let t = &mut self.mids[b];
                    t.clear();
                    t.extend(self.z.iter().map(|v| v.tanh()));
                    self.layers[down].forward(t, n, &mut self.a)?;
                }
            }
            let (before, after) = self.hs.split_at_mut(b + 1);
            let (h, out) = (&before[b], &mut after[0]);
            out.clear();
            out.extend(h.iter().zip(&self.a).map(|(h, a)| h + self.alpha * a));
        }
        Ok(&self.hs[self.branches.len()])
    }

    pub(super) fn backward(&mut self, g: &[f32], n: usize) -> Result<()> {
        let d = self.d;
        self.gh.clear();
        self.gh.extend_from_slice(g);
        self.dx.resize(n * d, 0.0);
        for (b, &branch) in self.branches.iter().enumerate().rev() {
            self.ga.clear();
            self.ga.extend(self.gh.iter().map(|g| self.alpha * g));
            match branch {
                Branch::Linear(i) => self.layers[i].backward(&self.ga, n, &mut self.dx)?,
                Branch::Mlp { up, down } => {
                    let f = self.shapes[up].0;
                    self.gt.resize(n * f, 0.0);
                    self.layers[down].backward(&self.ga, n, &mut self.gt)?;
                    for (g, t) in self.gt.iter_mut().zip(&self.mids[b]) {
                        *g *= 1.0 - t * t;
                    }
                    self.layers[up].backward(&self.gt, n, &mut self.dx)?;
                }
            }
            self.gh.iter_mut().zip(&self.dx).for_each(|(g, dx)| *g += dx);
        }
        Ok(())
    }

    pub(super) fn used_layers(&self) -> Vec<usize> {
        self.branches
            .iter()
            .flat_map(|b| match *b {
                Branch::Linear(i) => vec![i],
                Branch::Mlp { up, down } => vec![up, down],
            })
            .collect()
    }
}

pub(super) fn mse(y: &[f32], target: &[f32]) -> f64 {
    y.iter().zip(target).map(|(&a, &b)| ((a - b) as f64).powi(2)).sum::<f64>() / y.len() as f64
}
