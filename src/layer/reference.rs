//! An f64 dense reference for tests: it forms `C` and `W = U C V^T` explicitly and
//! differentiates through them. Slow on purpose (plain loops, no tricks), so that it is
//! obviously right; never used on a hot path.

use crate::layer::pattern::Omega;
use crate::layer::svd::Factors;

/// The adapted layer in f64.
#[derive(Debug, Clone)]
pub struct Reference {
    /// Output features.
    pub d_out: usize,
    /// Input features.
    pub d_in: usize,
    /// Rank.
    pub r: usize,
    u: Vec<f64>,
    s: Vec<f64>,
    v: Vec<f64>,
    rows: Vec<usize>,
    cols: Vec<usize>,
    /// Coefficients M, canonical order.
    pub m: Vec<f64>,
    /// Gate parameter.
    pub gamma: f64,
    /// Whether the gate is on.
    pub gate: bool,
    bias: Option<Vec<f64>>,
}

fn widen(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

impl Reference {
    /// The reference of a layer with these factors, pattern, coefficients, gate and bias.
    pub fn new(f: &Factors, omega: &Omega, m: &[f32], gamma: f32, gate: bool, bias: Option<&[f32]>) -> Self {
        Reference {
            d_out: f.d_out,
            d_in: f.d_in,
            r: f.r,
            u: widen(&f.u),
            s: widen(&f.s),
            v: widen(&f.v),
            rows: omega.rows.iter().map(|&i| i as usize).collect(),
            cols: omega.cols.iter().map(|&i| i as usize).collect(),
            m: widen(m),
            gamma: gamma as f64,
            gate,
            bias: bias.map(widen),
        }
    }

    /// The gate value g.
    pub fn g(&self) -> f64 {
        if self.gate {
            1.0 / (1.0 + (-self.gamma).exp())
        } else {
            1.0
        }
    }

    /// The dense core `C = diag(s) + g M`, `r x r` row-major; duplicates add up.
    pub fn core(&self) -> Vec<f64> {
        let r = self.r;
        let mut c = vec![0.0; r * r];
        for i in 0..r {
            c[i * r + i] = self.s[i];
        }
        let g = self.g();
        for k in 0..self.m.len() {
            c[self.rows[k] * r + self.cols[k]] += g * self.m[k];
        }
        c
    }

    /// The dense adapted weight `W = U C V^T`, `d_out x d_in` row-major.
    pub fn weight(&self) -> Vec<f64> {
        let (r, c) = (self.r, self.core());
        // UC = U C (d_out x r)
        let mut uc = vec![0.0; self.d_out * r];
        for p in 0..self.d_out {
            for i in 0..r {
                for j in 0..r {
                    uc[p * r + j] += self.u[p * r + i] * c[i * r + j];
                }
            }
        }
        let mut w = vec![0.0; self.d_out * self.d_in];
        for p in 0..self.d_out {
            for q in 0..self.d_in {
                w[p * self.d_in + q] = (0..r).map(|j| uc[p * r + j] * self.v[q * r + j]).sum();
            }
        }
        w
    }

    /// `Y = X W^T + bias`, `n x d_out`.
    pub fn forward(&self, x: &[f64], n: usize) -> Vec<f64> {
        let w = self.weight();
        let mut y = vec![0.0; n * self.d_out];
        for b in 0..n {
            for p in 0..self.d_out {
                let dot: f64 = (0..self.d_in).map(|q| x[b * self.d_in + q] * w[p * self.d_in + q]).sum();
                y[b * self.d_out + p] = dot + self.bias.as_ref().map_or(0.0, |bb| bb[p]);
            }
        }
        y
    }

    /// `(dX, dM, dgamma)` for upstream gradient `gy` (`n x d_out`) at input `x`.
    pub fn backward(&self, x: &[f64], gy: &[f64], n: usize) -> (Vec<f64>, Vec<f64>, f64) {
        let (d_out, d_in, r) = (self.d_out, self.d_in, self.r);
        let w = self.weight();
        let mut dx = vec![0.0; n * d_in];
        for b in 0..n {
            for q in 0..d_in {
                dx[b * d_in + q] = (0..d_out).map(|p| gy[b * d_out + p] * w[p * d_in + q]).sum();
            }
        }
        // dW = G^T X (d_out x d_in); dC = U^T dW V (r x r), sampled on Omega.
        let mut dw = vec![0.0; d_out * d_in];
        for p in 0..d_out {
            for q in 0..d_in {
                dw[p * d_in + q] = (0..n).map(|b| gy[b * d_out + p] * x[b * d_in + q]).sum();
            }
        }
        let mut dwv = vec![0.0; d_out * r];
        for p in 0..d_out {
            for j in 0..r {
                dwv[p * r + j] = (0..d_in).map(|q| dw[p * d_in + q] * self.v[q * r + j]).sum();
            }
        }
        let g = self.g();
        let dc: Vec<f64> = (0..self.m.len())
            .map(|k| (0..d_out).map(|p| self.u[p * r + self.rows[k]] * dwv[p * r + self.cols[k]]).sum())
            .collect();
        let dm = dc.iter().map(|d| g * d).collect();
        let dgamma =
            if self.gate { g * (1.0 - g) * dc.iter().zip(&self.m).map(|(d, m)| d * m).sum::<f64>() } else { 0.0 };
        (dx, dm, dgamma)
    }
}

/// Relative Frobenius error `||got - want|| / ||want||`; infinite if `got` holds a NaN or
/// infinity, so a poisoned output can never pass.
pub fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "rel_err: lengths differ");
    if got.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&a, &b) in got.iter().zip(want) {
        num += (a as f64 - b).powi(2);
        den += b * b;
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}
