//! The one-time thin SVD on the CPU (faer), and the frozen factors it produces.
//!
//! `W0 = U diag(s) V^T` with `U: d_out x r`, `s: r` (descending), `V: d_in x r`, all stored
//! row-major in f32 (the layer's precision). The decomposition itself runs in the weight's own
//! precision (f32 or f64) and the reconstruction residual is measured in f64.

use faer::{Mat, MatRef};

use crate::error::{check_finite, check_len, check_positive, Error, Result};

/// The frozen factors of one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct Factors {
    /// Output features (rows of W0).
    pub d_out: usize,
    /// Input features (columns of W0).
    pub d_in: usize,
    /// Rank kept: at most `min(d_out, d_in)`.
    pub r: usize,
    /// Left singular vectors, `d_out x r` row-major.
    pub u: Vec<f32>,
    /// Singular values, length r, descending.
    pub s: Vec<f32>,
    /// Right singular vectors, `d_in x r` row-major.
    pub v: Vec<f32>,
}

impl Factors {
    /// Wraps factors computed elsewhere (e.g. loaded from a file), checking shapes and values.
    pub fn new(d_out: usize, d_in: usize, u: Vec<f32>, s: Vec<f32>, v: Vec<f32>) -> Result<Self> {
        check_positive("d_out", d_out)?;
        check_positive("d_in", d_in)?;
        let r = s.len();
        if r == 0 || r > d_out.min(d_in) {
            return Err(Error::Rank { rank: r, max: d_out.min(d_in) });
        }
        check_len("U (d_out x r)", &u, d_out * r)?;
        check_len("V (d_in x r)", &v, d_in * r)?;
        check_finite("U", &u)?;
        check_finite("s", &s)?;
        check_finite("V", &v)?;
        Ok(Factors { d_out, d_in, r, u, s, v })
    }

    /// The dense `U diag(s) V^T` in f64, row-major `d_out x d_in`.
    pub fn reconstruct_f64(&self) -> Vec<f64> {
        let r = self.r;
        let mut w = vec![0.0f64; self.d_out * self.d_in];
        for p in 0..self.d_out {
            let us: Vec<f64> = (0..r).map(|i| self.u[p * r + i] as f64 * self.s[i] as f64).collect();
            for q in 0..self.d_in {
                let vq = &self.v[q * r..(q + 1) * r];
                w[p * self.d_in + q] = us.iter().zip(vq).map(|(a, &b)| a * b as f64).sum();
            }
        }
        w
    }

    /// `||U diag(s) V^T - W0||_F / ||W0||_F`, in f64.
    pub fn residual<T: Copy + Into<f64>>(&self, w0: &[T]) -> Result<f64> {
        check_len("W0 (d_out x d_in)", w0, self.d_out * self.d_in)?;
        let rec = self.reconstruct_f64();
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for (&a, &b) in rec.iter().zip(w0) {
            let b: f64 = b.into();
            num += (a - b) * (a - b);
            den += b * b;
        }
        Ok(if den == 0.0 { num.sqrt() } else { (num / den).sqrt() })
    }

    /// Persistent bytes of the frozen factors in f32.
    pub fn bytes(&self) -> usize {
        4 * (self.u.len() + self.s.len() + self.v.len())
    }
}

/// The result of [`thin_svd`]: factors and how well they reproduce the weight.
#[derive(Debug, Clone)]
pub struct Decomposition {
    /// The frozen factors.
    pub factors: Factors,
    /// `||U diag(s) V^T - W0||_F / ||W0||_F` (measured after truncation).
    pub residual: f64,
}

/// Floating-point weights the SVD accepts.
pub trait WeightScalar: Copy + Into<f64> + faer::traits::RealField + 'static {
    /// Whether the value is finite.
    fn finite(self) -> bool;
    /// Narrows to the layer's f32.
    fn to_f32(self) -> f32;
}

impl WeightScalar for f32 {
    fn finite(self) -> bool {
        self.is_finite()
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl WeightScalar for f64 {
    fn finite(self) -> bool {
        self.is_finite()
    }
    fn to_f32(self) -> f32 {
        self as f32
    }
}

/// Thin SVD of a row-major `d_out x d_in` weight, optionally truncated to the first `rank`
/// triplets. Non-finite values, empty shapes and ranks outside `1..=min(d_out, d_in)` are errors.
///
/// ```
/// let w: Vec<f32> = (0..12).map(|i| (i as f32).sin()).collect();
/// let dec = svft::svd::thin_svd(&w, 3, 4, None).unwrap();
/// assert_eq!(dec.factors.r, 3);
/// assert!(dec.residual < 1e-5);
/// ```
pub fn thin_svd<T: WeightScalar>(w: &[T], d_out: usize, d_in: usize, rank: Option<usize>) -> Result<Decomposition> {
    check_positive("d_out", d_out)?;
    check_positive("d_in", d_in)?;
    check_len("W0 (d_out x d_in)", w, d_out * d_in)?;
    if let Some(index) = w.iter().position(|x| !x.finite()) {
        return Err(Error::NonFinite { what: "W0", index });
    }
    let full = d_out.min(d_in);
    let r = rank.unwrap_or(full);
    if r == 0 || r > full {
        return Err(Error::Rank { rank: r, max: full });
    }
    let a = MatRef::from_row_major_slice(w, d_out, d_in);
    let svd = a.thin_svd().map_err(|e| Error::Svd(format!("{e:?}")))?;
    let (u, s, v) = (svd.U(), svd.S().column_vector(), svd.V());
    let mut uo = vec![0.0f32; d_out * r];
    let mut vo = vec![0.0f32; d_in * r];
    for p in 0..d_out {
        for i in 0..r {
            uo[p * r + i] = u[(p, i)].to_f32();
        }
    }
    for q in 0..d_in {
        for i in 0..r {
            vo[q * r + i] = v[(q, i)].to_f32();
        }
    }
    let so: Vec<f32> = (0..r).map(|i| s[i].to_f32()).collect();
    let factors = Factors::new(d_out, d_in, uo, so, vo)?;
    let residual = factors.residual(w)?;
    Ok(Decomposition { factors, residual })
}

/// Random orthonormal-column factors with a given spectrum, for tests and benches: a weight
/// whose SVD is known without running one. `U` and `V` come from QR of Gaussian matrices.
pub fn random_factors(d_out: usize, d_in: usize, r: usize, seed: u64) -> Result<Factors> {
    check_positive("d_out", d_out)?;
    check_positive("d_in", d_in)?;
    if r == 0 || r > d_out.min(d_in) {
        return Err(Error::Rank { rank: r, max: d_out.min(d_in) });
    }
    let mut rng = crate::rng::Rng::new(seed);
    let mut ortho = |rows: usize| -> Vec<f32> {
        let g = Mat::<f64>::from_fn(rows, r, |_, _| rng.normal());
        let q = g.qr().compute_thin_Q();
        let mut out = vec![0.0f32; rows * r];
        for p in 0..rows {
            for i in 0..r {
                out[p * r + i] = q[(p, i)] as f32;
            }
        }
        out
    };
    let u = ortho(d_out);
    let v = ortho(d_in);
    // A decaying spectrum like a trained weight's, descending.
    let s = (0..r).map(|i| (1.0 / (1.0 + i as f64 / 8.0)) as f32).collect();
    Factors::new(d_out, d_in, u, s, v)
}
