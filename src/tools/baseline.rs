//! The two baselines every SVFT number is compared with, on the same CPU library (faer):
//!
//! - [`OfficialLayer`]: the official PyTorch layer's order of operations. Every forward builds
//!   the sparse core afresh (`SparseTensor(row, col, value)` + `s_pre`: coalesce, i.e. sort and
//!   sum duplicates), forms `W^T = (C V^T)^T U^T` densely, then `Y = X W^T`; backward goes
//!   through the dense weight as autograd does (`dW^T = X^T G`, `dX = G W`,
//!   `dZ = U^T dW`, `dC_k = dZ[row_k] . V^T[col_k]`). U and `V^T` are stored as the official
//!   code stores them (`u`: d_out x r, `v`: r x d_in).
//! - [`LoraLayer`]: `Y = X W0^T + scale (X A^T) B^T` with gradients for A, B and X; its
//!   [`LoraLayer::frozen_step`] is the frozen dense layer alone, the third comparison.

use crate::cpu::gemm::{gemm, Operand as Op};
use crate::layer::config::gate_value;
use crate::layer::pattern::Omega;
use crate::layer::svd::Factors;
use crate::rng::Rng;

/// The official layer's forward/backward order, in f32 on the CPU.
#[derive(Debug)]
pub struct OfficialLayer {
    d_out: usize,
    d_in: usize,
    r: usize,
    u: Vec<f32>,
    s: Vec<f32>,
    vt: Vec<f32>,
    rows: Vec<i64>,
    cols: Vec<i64>,
    /// Coefficients, canonical order.
    pub m: Vec<f32>,
    /// Gate parameter (the gate is always on in the official layer).
    pub gamma: f32,
    wt: Vec<f32>,
    z: Vec<f32>,
    x: Vec<f32>,
    dwt: Vec<f32>,
    dz: Vec<f32>,
}

impl OfficialLayer {
    /// The official layer over these factors and pattern, coefficients `m`.
    pub fn new(f: &Factors, omega: &Omega, m: &[f32], gamma: f32) -> Self {
        let r = f.r;
        let mut vt = vec![0.0; r * f.d_in];
        for q in 0..f.d_in {
            for i in 0..r {
                vt[i * f.d_in + q] = f.v[q * r + i];
            }
        }
        OfficialLayer {
            d_out: f.d_out,
            d_in: f.d_in,
            r,
            u: f.u.clone(),
            s: f.s.clone(),
            vt,
            rows: omega.rows.iter().map(|&x| x as i64).collect(),
            cols: omega.cols.iter().map(|&x| x as i64).collect(),
            m: m.to_vec(),
            gamma,
            wt: vec![0.0; f.d_in * f.d_out],
            z: vec![0.0; r * f.d_in],
            x: Vec::new(),
            dwt: vec![0.0; f.d_in * f.d_out],
            dz: vec![0.0; r * f.d_in],
        }
    }

    fn g(&self) -> f32 {
        gate_value(true, self.gamma)
    }

    /// `Y = X W^T`, rebuilding W as the official code does on every call.
    pub fn forward(&mut self, x: &[f32], n: usize, y: &mut [f32]) {
        let (r, d_in, d_out) = (self.r, self.d_in, self.d_out);
        let g = self.g();
        // SparseTensor(row, col, value = M g) + s_pre, coalesced: sort by (row, col), sum dups.
        let mut entries: Vec<(i64, i64, f32)> = (0..r as i64).map(|i| (i, i, self.s[i as usize])).collect();
        entries.extend(self.rows.iter().zip(&self.cols).zip(&self.m).map(|((&i, &j), &v)| (i, j, v * g)));
        entries.sort_by_key(|&(i, j, _)| (i, j));
        let mut coalesced: Vec<(i64, i64, f32)> = Vec::with_capacity(entries.len());
        for (i, j, v) in entries {
            match coalesced.last_mut() {
                Some(last) if last.0 == i && last.1 == j => last.2 += v,
                _ => coalesced.push((i, j, v)),
            }
        }
        // Z = C V^T (sparse x dense, r x d_in)
        self.z.fill(0.0);
        for &(i, j, v) in &coalesced {
            let (zi, vj) = (i as usize * d_in, j as usize * d_in);
            for q in 0..d_in {
                self.z[zi + q] += v * self.vt[vj + q];
            }
        }
        // W^T = Z^T U^T (d_in x d_out), then Y = X W^T.
        gemm(&mut self.wt, Op::t(&self.z, r, d_in), Op::t(&self.u, d_out, r), false);
        gemm(y, Op::n(x, n, d_in), Op::n(&self.wt, d_in, d_out), false);
        self.x.clear();
        self.x.extend_from_slice(x);
    }

    /// Backward through the dense weight: returns dgamma, fills `dx` and `dm`.
    pub fn backward(&mut self, gy: &[f32], n: usize, dx: &mut [f32], dm: &mut [f32]) -> f32 {
        let (r, d_in, d_out) = (self.r, self.d_in, self.d_out);
        gemm(&mut self.dwt, Op::t(&self.x, n, d_in), Op::n(gy, n, d_out), false);
        gemm(dx, Op::n(gy, n, d_out), Op::t(&self.wt, d_in, d_out), false);
        // dZ = (dW^T U)^T = U^T dW (r x d_in)
        gemm(&mut self.dz, Op::t(&self.u, d_out, r), Op::t(&self.dwt, d_in, d_out), false);
        let g = self.g();
        let mut dot = 0.0f64;
        for (k, out) in dm.iter_mut().enumerate().take(self.m.len()) {
            let (zi, vj) = (self.rows[k] as usize * d_in, self.cols[k] as usize * d_in);
            let dc: f32 = self.dz[zi..zi + d_in].iter().zip(&self.vt[vj..vj + d_in]).map(|(a, b)| a * b).sum();
            *out = g * dc;
            dot += (dc * self.m[k]) as f64;
        }
        (g as f64 * (1.0 - g as f64) * dot) as f32
    }
}

/// LoRA of rank `rl` on a dense frozen weight, with gradients for A, B and X.
#[derive(Debug)]
pub struct LoraLayer {
    d_out: usize,
    d_in: usize,
    rl: usize,
    w0: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
    scale: f32,
    x: Vec<f32>,
    h: Vec<f32>,
    gb: Vec<f32>,
    /// Gradient of A (`rl x d_in`), filled by backward.
    pub da: Vec<f32>,
    /// Gradient of B (`d_out x rl`), filled by backward.
    pub db: Vec<f32>,
}

impl LoraLayer {
    /// LoRA over `w0` (`d_out x d_in`), A Gaussian and B small random (not zero, so that every
    /// product does real work), `scale = alpha / rl` with alpha = rl.
    pub fn new(w0: Vec<f32>, d_out: usize, d_in: usize, rl: usize, seed: u64) -> Self {
        assert_eq!(w0.len(), d_out * d_in);
        let mut rng = Rng::new(seed);
        LoraLayer {
            d_out,
            d_in,
            rl,
            w0,
            a: rng.normal_vec(rl * d_in, 1.0 / (d_in as f64).sqrt()),
            b: rng.normal_vec(d_out * rl, 1e-3),
            scale: 1.0,
            x: Vec::new(),
            h: Vec::new(),
            gb: Vec::new(),
            da: vec![0.0; rl * d_in],
            db: vec![0.0; d_out * rl],
        }
    }

    /// The trainable matrices `(A, B)`, row-major: A is `rl x d_in`, B is `d_out x rl`
    /// (for optimizers, and to start B at zero as LoRA training does).
    pub fn params_mut(&mut self) -> (&mut [f32], &mut [f32]) {
        (&mut self.a, &mut self.b)
    }

    /// Trainable parameters `rl (d_in + d_out)`.
    pub fn trainable_params(&self) -> usize {
        self.rl * (self.d_in + self.d_out)
    }

    /// `Y = X W0^T + scale (X A^T) B^T`.
    pub fn forward(&mut self, x: &[f32], n: usize, y: &mut [f32]) {
        let (d_out, d_in, rl) = (self.d_out, self.d_in, self.rl);
        gemm(y, Op::n(x, n, d_in), Op::t(&self.w0, d_out, d_in), false);
        self.h.resize(n * rl, 0.0);
        gemm(&mut self.h, Op::n(x, n, d_in), Op::t(&self.a, rl, d_in), false);
        let hs: &mut [f32] = &mut self.h;
        hs.iter_mut().for_each(|v| *v *= self.scale);
        gemm(y, Op::n(&self.h, n, rl), Op::t(&self.b, d_out, rl), true);
        self.x.clear();
        self.x.extend_from_slice(x);
    }

    /// The frozen dense layer alone on the same `W0`, forward and backward with dX (no weight
    /// gradient, as for a frozen `nn.Linear`): `Y = X W0^T`, `dX = G W0`. The floor every
    /// adapter adds to; `4 n d_out d_in` FLOPs.
    pub fn frozen_step(&self, x: &[f32], gy: &[f32], n: usize, y: &mut [f32], dx: &mut [f32]) {
        let (d_out, d_in) = (self.d_out, self.d_in);
        gemm(y, Op::n(x, n, d_in), Op::t(&self.w0, d_out, d_in), false);
        gemm(dx, Op::n(gy, n, d_out), Op::n(&self.w0, d_out, d_in), false);
    }

    /// Gradients for X (into `dx`), A and B.
    pub fn backward(&mut self, gy: &[f32], n: usize, dx: &mut [f32]) {
        let (d_out, d_in, rl) = (self.d_out, self.d_in, self.rl);
        gemm(dx, Op::n(gy, n, d_out), Op::n(&self.w0, d_out, d_in), false);
        self.gb.resize(n * rl, 0.0);
        gemm(&mut self.gb, Op::n(gy, n, d_out), Op::n(&self.b, d_out, rl), false);
        let gbs: &mut [f32] = &mut self.gb;
        gbs.iter_mut().for_each(|v| *v *= self.scale);
        gemm(dx, Op::n(&self.gb, n, rl), Op::n(&self.a, rl, d_in), true);
        gemm(&mut self.db, Op::t(gy, n, d_out), Op::n(&self.h, n, rl), false);
        gemm(&mut self.da, Op::t(&self.gb, n, rl), Op::n(&self.x, n, d_in), false);
    }
}
