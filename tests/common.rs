//! Helpers shared by the integration tests.
#![allow(dead_code)]

use svft::rng::Rng;
use svft::svd::{random_factors, Factors};

/// f32 tolerance of SVFT.md section 4 (relative Frobenius error against f64).
pub const F32_TOL: f64 = 1e-5;

/// Odd shapes: d_out > d_in, d_out < d_in, square, and a truncated rank; r never a multiple of 8.
pub const SHAPES: [(usize, usize, usize); 4] = [(37, 23, 23), (19, 41, 19), (29, 29, 29), (37, 23, 13)];

/// Random orthonormal factors of the given shape.
pub fn factors(d_out: usize, d_in: usize, r: usize, seed: u64) -> Factors {
    random_factors(d_out, d_in, r, seed).unwrap()
}

/// `len` standard normal f32 values.
pub fn randn(len: usize, seed: u64) -> Vec<f32> {
    Rng::new(seed).normal_vec(len, 1.0)
}

/// Widens to f64.
pub fn wide(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// A buffer full of NaN: an output that a pass forgets to write can never pass a comparison.
pub fn poisoned(len: usize) -> Vec<f32> {
    vec![f32::NAN; len]
}
