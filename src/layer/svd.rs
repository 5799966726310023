//! The one-time thin SVD on the CPU (faer), and the frozen factors it produces.
//!
//! `W0 = U diag(s) V^T` with `U: d_out x r`, `s: r` (descending), `V: d_in x r`, all stored
//! row-major in f32 (the layer's precision). The decomposition itself runs in the weight's own
//! precision (f32 or f64) and the reconstruction residual is measured in f64.

use faer::Mat;

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

    /// `||U diag(s) V^T - W0||_F / ||W0||_F`, in f64 (`||U diag(s) V^T||_F` when `W0` is all
    /// zeros). Both are scaled by the power of two that brings `max |W0|` to about 1 before
    /// squaring, so the figure holds for weights of any magnitude (no square under- or
    /// overflows).
    pub fn residual<T: Copy + Into<f64>>(&self, w0: &[T]) -> Result<f64> {
        check_len("W0 (d_out x d_in)", w0, self.d_out * self.d_in)?;
        let rec = self.reconstruct_f64();
        let max = w0.iter().fold(0.0f64, |m, &b| m.max(Into::<f64>::into(b).abs()));
        let k = if max > 0.0 && max.is_finite() { unit_scale(max) } else { 0 };
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for (&a, &b) in rec.iter().zip(w0) {
            let (a, b) = (scale_pow2(a, k), scale_pow2(b.into(), k));
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
    /// `self * 2^k`, exact unless the result leaves the type's normal range.
    fn scaled_pow2(self, k: i32) -> Self;
}

impl WeightScalar for f32 {
    fn finite(self) -> bool {
        self.is_finite()
    }
    fn to_f32(self) -> f32 {
        self
    }
    fn scaled_pow2(self, k: i32) -> Self {
        scale_pow2(self as f64, k) as f32
    }
}

impl WeightScalar for f64 {
    fn finite(self) -> bool {
        self.is_finite()
    }
    fn to_f32(self) -> f32 {
        self as f32
    }
    fn scaled_pow2(self, k: i32) -> Self {
        scale_pow2(self, k)
    }
}

/// `2^e` for `e` in f64's normal exponent range (`-1022..=1023`), built from its bits: exact.
fn pow2(e: i32) -> f64 {
    debug_assert!((-1022..=1023).contains(&e));
    f64::from_bits(((e + 1023) as u64) << 52)
}

/// `x * 2^k` in two exact steps (each factor stays a normal f64 for any `|k| <= 2044`, which
/// covers every power of two that brings a finite non-zero f64 to about 1).
fn scale_pow2(x: f64, k: i32) -> f64 {
    let half = k / 2;
    x * pow2(half) * pow2(k - half)
}

/// The power of two `k` that brings `max` (finite, positive) into `[1, 2)`: `max * 2^k`.
/// Multiplying a matrix by `2^k` is exact (barring entries far below `max` that fall out of
/// the normal range, which weigh nothing in a relative Frobenius norm), so decomposing the
/// scaled weight and scaling `s` back by `2^-k` gives the SVD of the weight itself, whatever
/// its magnitude: no square of an entry underflows (weights ~1e-30 in f32) or overflows
/// (~1e30) inside the solver.
pub(crate) fn unit_scale(max: f64) -> i32 {
    debug_assert!(max.is_finite() && max > 0.0);
    -(max.log2().floor() as i32)
}

/// Relative part of the residual tolerance of [`check_residual`].
pub const RESIDUAL_REL_TOL: f64 = 1e-3;

/// The allowed gap between the measured residual of the (truncated) factors and the one their
/// spectrum predicts: `1e-3 * predicted + 16 * eps_f32 * sqrt(min(d_out, d_in))`.
///
/// Why: by Eckart-Young the best rank-r approximation misses `W` by exactly
/// `sqrt(sum_{i>r} s_i^2) / ||s||` (`||W||_F = ||s||`); factors held in f32 add an error `e`
/// of their own (the SVD's backward error and the rounding of `U`, `s`, `V` to f32), which is
/// about orthogonal to the truncation error, so the measured residual is
/// `sqrt(predicted^2 + e^2) <= predicted + e`. For a backward-stable SVD rounded to f32, `e`
/// grows like `eps_f32 * sqrt(p)` (p = min(d_out, d_in), the length of the sums in
/// `U diag(s) V^T`): 16 eps sqrt(p) allows `e` from 1.9e-6 (p = 1) through 1.5e-5 (p = 64) to
/// 1.2e-4 (p = 4096), well above the 1e-7..1e-5 such an SVD gives, and far below the residuals
/// of broken factors (~1 when the products underflow, NaN when they overflow). The relative
/// 1e-3 covers the f32 rounding of the predicted tail itself when the truncation residual is
/// large. This is a sanity bound, not the accuracy target: the project's tolerance for f32
/// outputs against f64 (1e-5 relative, SVFT.md section 4) is checked by `svft decompose
/// --max-residual` (default 1e-4) and the tests.
pub fn residual_tolerance(predicted: f64, d_out: usize, d_in: usize) -> f64 {
    RESIDUAL_REL_TOL * predicted + 16.0 * f32::EPSILON as f64 * (d_out.min(d_in) as f64).sqrt()
}

/// The relative residual that keeping the first `r` of the singular values `s` (the full
/// spectrum, descending) leaves: `sqrt(sum_{i>=r} s_i^2) / ||s||` (0 when `r >= s.len()`).
/// `s` should be of order 1 (as [`thin_svd`] has it, before scaling back) so that no square
/// under- or overflows.
pub fn truncation_residual(s: &[f64], r: usize) -> f64 {
    // Summed from the smallest up, each sum in its own order of magnitude.
    let tail: f64 = s.iter().skip(r).rev().map(|x| x * x).sum();
    let all: f64 = tail + s.iter().take(r).rev().map(|x| x * x).sum::<f64>();
    (tail / all).sqrt()
}

/// Checks a decomposition's measured residual against the one its full spectrum predicts
/// ([`truncation_residual`]), within [`residual_tolerance`]: an [`Error::Svd`] giving both
/// figures when they disagree or either is not finite (NaN never passes).
pub fn check_residual(measured: f64, predicted: f64, d_out: usize, d_in: usize) -> Result<()> {
    if !measured.is_finite() || !predicted.is_finite() {
        return Err(Error::Svd(format!(
            "non-finite reconstruction residual of the {d_out} x {d_in} weight: measured {measured:e}, \
             predicted by the spectrum {predicted:e}"
        )));
    }
    let tol = residual_tolerance(predicted, d_out, d_in);
    if (measured - predicted).abs() > tol {
        return Err(Error::Svd(format!(
            "wrong factors for the {d_out} x {d_in} weight: relative reconstruction residual {measured:.3e}, \
             but the singular values predict {predicted:.3e} (tolerance {tol:.1e})"
        )));
    }
    Ok(())
}

/// Scales the singular values of a decomposition of `W * 2^k` back to `W`'s, in f32 as the
/// layer holds them. The largest must land in f32's normal range: outside it, the f32 factors
/// cannot represent the weight (inf, or every singular value flushed toward zero).
pub(crate) fn unscale_spectrum(s: &[f64], k: i32, d_out: usize, d_in: usize) -> Result<Vec<f32>> {
    let out: Vec<f32> = s.iter().map(|&x| scale_pow2(x, -k) as f32).collect();
    let largest = s.first().map_or(0.0, |&x| scale_pow2(x, -k));
    if !(f32::MIN_POSITIVE as f64..=f32::MAX as f64).contains(&largest) || !out[0].is_finite() {
        return Err(Error::Svd(format!(
            "the largest singular value of the {d_out} x {d_in} weight, {largest:.3e}, is outside f32's normal \
             range [{:.3e}, {:.3e}]: the layer's f32 factors cannot hold it (rescale the weight)",
            f32::MIN_POSITIVE,
            f32::MAX
        )));
    }
    Ok(out)
}

/// The error for a weight of all zeros. Its SVD is undefined: every pair of orthonormal
/// bases is one (s = 0), so there is no principal basis for SVFT to adapt, and the relative
/// residual is 0 / 0.
pub(crate) fn all_zeros(d_out: usize, d_in: usize) -> Error {
    Error::Svd(format!(
        "the {d_out} x {d_in} weight is all zeros: its singular vectors are undefined, so it has no SVD \
         basis to fine-tune"
    ))
}

/// Thin SVD of a row-major `d_out x d_in` weight, optionally truncated to the first `rank`
/// triplets. Non-finite values, empty shapes and ranks outside `1..=min(d_out, d_in)` are errors.
///
/// The result is checked before it is returned, so no caller gets wrong numbers:
/// - the weight is scaled by a power of two to a largest entry in `[1, 2)` before the
///   decomposition and `s` scaled back after it (exact), so the magnitude of the weight does
///   not matter as long as its largest singular value fits f32 ([`Error::Svd`] otherwise);
/// - a weight of all zeros is an [`Error::Svd`] (its singular vectors are undefined);
/// - the residual of the returned (f32, truncated) factors must match the one the full
///   spectrum predicts, within [`residual_tolerance`] ([`check_residual`]); NaN never passes.
///
/// ```
/// let w: Vec<f32> = (0..12).map(|i| (i as f32).sin()).collect();
/// let dec = svft::svd::thin_svd(&w, 3, 4, None).unwrap();
/// assert_eq!(dec.factors.r, 3);
/// assert!(dec.residual < 1e-5);
/// // Scale-invariant: the same factors for the weight times 1e-30, s scaled by 1e-30.
/// let tiny: Vec<f32> = w.iter().map(|x| x * 1e-30).collect();
/// let dec2 = svft::svd::thin_svd(&tiny, 3, 4, None).unwrap();
/// assert!(dec2.residual < 1e-5);
/// assert!((dec2.factors.s[0] / dec.factors.s[0] / 1e-30 - 1.0).abs() < 1e-5);
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
    let max = w.iter().fold(0.0f64, |m, &x| m.max(Into::<f64>::into(x).abs()));
    if max == 0.0 {
        return Err(all_zeros(d_out, d_in));
    }
    let k = unit_scale(max);
    let a = Mat::<T>::from_fn(d_out, d_in, |p, q| w[p * d_in + q].scaled_pow2(k));
    let svd = a.thin_svd().map_err(|e| Error::Svd(format!("{e:?}")))?;
    let (u, s, v) = (svd.U(), svd.S().column_vector(), svd.V());
    // The full spectrum, of the scaled weight (order 1).
    let spectrum: Vec<f64> = (0..full).map(|i| s[i].into()).collect();
    if spectrum.iter().any(|x| !x.is_finite()) {
        return Err(Error::Svd(format!("non-finite singular values of the {d_out} x {d_in} weight")));
    }
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
    if uo.iter().chain(&vo).any(|x| !x.is_finite()) {
        return Err(Error::Svd(format!("non-finite singular vectors of the {d_out} x {d_in} weight")));
    }
    let so = unscale_spectrum(&spectrum[..r], k, d_out, d_in)?;
    let factors = Factors::new(d_out, d_in, uo, so, vo)?;
    let residual = factors.residual(w)?;
    check_residual(residual, truncation_residual(&spectrum, r), d_out, d_in)?;
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
