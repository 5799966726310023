//! Pattern semantics: sizes, reproducibility, the top-k criteria, and the SVD.

mod common;

use common::*;
use svft::pattern::band_size;
use svft::svd::thin_svd;
use svft::{Pattern, TopKCriterion};

#[test]
fn every_pattern_has_the_band_size() {
    let f = factors(29, 29, 29, 3);
    for spec in ["plain", "banded:3", "random:3:seed=1", "topk:3", "topk:3:official"] {
        let p: Pattern = spec.parse().unwrap();
        assert_eq!(p.omega(&f).unwrap().len(), band_size(29, p.d()), "{spec}");
    }
    assert_eq!(band_size(29, 0), 29);
    assert_eq!(band_size(29, 28), 29 * 29);
}

#[test]
fn random_is_reproducible_and_allows_duplicates() {
    let p: Pattern = "random:2:seed=42".parse().unwrap();
    let a = p.omega_for_rank(6).unwrap();
    let b = p.omega_for_rank(6).unwrap();
    assert_eq!(a, b);
    let c = "random:2:seed=43".parse::<Pattern>().unwrap().omega_for_rank(6).unwrap();
    assert_ne!(a.rows, c.rows);
    // 24 draws from 36 cells: duplicates are practically certain over many seeds, and kept.
    let dup = (0..20u64).any(|seed| {
        let o = Pattern::Random { d: 2, seed }.omega_for_rank(6).unwrap();
        let mut keys: Vec<_> = o.rows.iter().zip(&o.cols).collect();
        keys.sort();
        keys.windows(2).any(|w| w[0] == w[1])
    });
    assert!(dup, "no duplicate pair in 20 seeds: sampling is not with replacement");
    // Uniform over rows and columns: every index is hit in a large draw.
    let big = Pattern::Random { d: 20, seed: 7 }.omega_for_rank(50).unwrap();
    for i in 0..50u32 {
        assert!(big.rows.contains(&i) && big.cols.contains(&i));
    }
}

/// Checks that the chosen pairs hold the k largest scores, in descending order.
fn assert_topk(scores: &dyn Fn(usize, usize) -> f64, o: &svft::Omega) {
    let r = o.r;
    let chosen: Vec<f64> = o.rows.iter().zip(&o.cols).map(|(&i, &j)| scores(i as usize, j as usize)).collect();
    assert!(chosen.windows(2).all(|w| w[0] >= w[1]), "not in descending score order");
    let min_chosen = chosen.iter().copied().fold(f64::INFINITY, f64::min);
    let set: std::collections::HashSet<(u32, u32)> = o.rows.iter().copied().zip(o.cols.iter().copied()).collect();
    assert_eq!(set.len(), o.len(), "top-k pairs are unique");
    for i in 0..r {
        for j in 0..r {
            if !set.contains(&(i as u32, j as u32)) {
                assert!(scores(i, j) <= min_chosen, "({i},{j}) scores above a chosen pair");
            }
        }
    }
}

#[test]
fn topk_picks_the_largest_scores_by_each_criterion() {
    let f = factors(17, 17, 17, 5);
    let r = 17;
    let paper = Pattern::TopK { d: 2, criterion: TopKCriterion::Paper }.omega(&f).unwrap();
    let paper_score = |i: usize, j: usize| (0..17).map(|p| f.u[p * r + i] as f64 * f.v[p * r + j] as f64).sum::<f64>();
    assert_topk(&paper_score, &paper);
    let official = Pattern::TopK { d: 2, criterion: TopKCriterion::Official }.omega(&f).unwrap();
    let official_score =
        |i: usize, j: usize| (0..17).map(|p| f.u[i * r + p] as f64 * f.v[p * r + j] as f64).sum::<f64>();
    assert_topk(&official_score, &official);
    assert_ne!(paper, official);
    // Reproducible.
    assert_eq!(paper, Pattern::TopK { d: 2, criterion: TopKCriterion::Paper }.omega(&f).unwrap());

    // Non-square, official: the square factor's raw entries (V^T when d_in = r).
    let tall = factors(23, 11, 11, 6);
    let o = Pattern::TopK { d: 1, criterion: TopKCriterion::Official }.omega(&tall).unwrap();
    assert_topk(&|i, j| tall.v[j * 11 + i] as f64, &o);
    let wide_f = factors(11, 23, 11, 6);
    let o = Pattern::TopK { d: 1, criterion: TopKCriterion::Official }.omega(&wide_f).unwrap();
    assert_topk(&|i, j| wide_f.u[i * 11 + j] as f64, &o);
}

#[test]
fn svd_reconstructs_and_truncates() {
    for &(d_out, d_in) in &[(37usize, 23usize), (19, 41), (29, 29)] {
        let w = randn(d_out * d_in, 1);
        let dec = thin_svd(&w, d_out, d_in, None).unwrap();
        let f = &dec.factors;
        assert_eq!((f.r, f.u.len(), f.v.len()), (d_out.min(d_in), d_out * f.r, d_in * f.r));
        assert!(dec.residual < 1e-5, "{}", dec.residual);
        assert!(f.s.windows(2).all(|s| s[0] >= s[1]) && f.s.iter().all(|&s| s >= 0.0));
        // Orthonormal columns.
        for i in 0..f.r {
            for j in 0..f.r {
                let uu: f64 = (0..d_out).map(|p| f.u[p * f.r + i] as f64 * f.u[p * f.r + j] as f64).sum();
                assert!((uu - (i == j) as u8 as f64).abs() < 1e-4);
            }
        }
        // f64 input gives the same spectrum.
        let w64: Vec<f64> = w.iter().map(|&x| x as f64).collect();
        let d64 = thin_svd(&w64, d_out, d_in, None).unwrap();
        assert!(d64.residual < 1e-6);
        assert!(f.s.iter().zip(&d64.factors.s).all(|(a, b)| (a - b).abs() < 1e-4));
        // Truncation: the residual is the tail of the spectrum.
        let t = thin_svd(&w, d_out, d_in, Some(5)).unwrap();
        let tail: f64 = d64.factors.s[5..].iter().map(|&s| (s as f64).powi(2)).sum::<f64>();
        let all: f64 = d64.factors.s.iter().map(|&s| (s as f64).powi(2)).sum::<f64>();
        assert!((t.residual - (tail / all).sqrt()).abs() < 1e-4, "{} vs {}", t.residual, (tail / all).sqrt());
    }
}
