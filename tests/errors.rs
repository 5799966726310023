//! Every bad input of the public API is a typed error, never a panic.

mod common;

use common::*;
use svft::cpu::CpuLayer;
use svft::error::ForwardMismatch;
use svft::svd::{thin_svd, Factors};
use svft::{Error, Init, LayerConfig, Omega, Pattern, Plan};

fn layer() -> CpuLayer {
    CpuLayer::new(factors(7, 5, 5, 1), &LayerConfig::official(Pattern::Banded { d: 1 }), None).unwrap()
}

#[test]
fn svd_rejects_bad_weights() {
    let w = randn(35, 1);
    assert!(matches!(thin_svd(&w, 7, 4, None), Err(Error::Shape { .. })));
    assert!(matches!(thin_svd::<f32>(&[], 0, 5, None), Err(Error::Empty { .. })));
    assert!(matches!(thin_svd(&w, 7, 5, Some(0)), Err(Error::Rank { rank: 0, max: 5 })));
    assert!(matches!(thin_svd(&w, 7, 5, Some(6)), Err(Error::Rank { rank: 6, max: 5 })));
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut w2 = w.clone();
        w2[17] = bad;
        assert!(matches!(thin_svd(&w2, 7, 5, None), Err(Error::NonFinite { index: 17, .. })));
    }
}

#[test]
fn factors_are_checked_at_the_door() {
    let f = factors(7, 5, 5, 1);
    assert!(matches!(Factors::new(7, 5, f.u.clone(), f.s.clone(), f.v[1..].to_vec()), Err(Error::Shape { .. })));
    assert!(matches!(Factors::new(7, 5, f.u.clone(), vec![1.0; 6], f.v.clone()), Err(Error::Rank { .. })));
    assert!(matches!(Factors::new(7, 5, f.u.clone(), vec![], f.v.clone()), Err(Error::Rank { .. })));
    let mut s = f.s.clone();
    s[2] = f32::NAN;
    assert!(matches!(Factors::new(7, 5, f.u.clone(), s, f.v.clone()), Err(Error::NonFinite { .. })));
    assert!(matches!(Factors::new(0, 5, vec![], f.s.clone(), f.v.clone()), Err(Error::Empty { .. })));
}

#[test]
fn impossible_patterns_are_errors() {
    let f = factors(7, 5, 5, 1);
    assert!(matches!(Pattern::Banded { d: 5 }.omega(&f), Err(Error::PatternSize { .. })));
    assert!(matches!("topk:1".parse::<Pattern>().unwrap().omega(&f), Err(Error::PatternSize { .. })));
    let truncated = factors(7, 5, 3, 1);
    assert!(matches!("topk:1:official".parse::<Pattern>().unwrap().omega(&truncated), Err(Error::PatternSize { .. })));
    assert!(matches!("topk:1".parse::<Pattern>().unwrap().omega_for_rank(5), Err(Error::PatternSize { .. })));
    assert!(matches!(Omega::from_indices(Pattern::Plain, 3, vec![0, 1], vec![0]), Err(Error::Shape { .. })));
    assert!(matches!(Omega::from_indices(Pattern::Plain, 3, vec![0, 3], vec![0, 1]), Err(Error::InvalidArgument(_))));
    assert!(matches!(Omega::from_indices(Pattern::Plain, 1, vec![0, 0], vec![0, 0]), Err(Error::PatternSize { .. })));
    // A band spec names only its own band, complete and in row-major order (a stencil).
    assert!(Omega::from_indices(Pattern::Plain, 3, vec![0, 1, 2], vec![0, 1, 2]).is_ok());
    assert!(matches!(
        Omega::from_indices(Pattern::Plain, 3, vec![1, 0, 2], vec![1, 0, 2]),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        Omega::from_indices(Pattern::Banded { d: 1 }, 3, vec![0, 1], vec![0, 1]),
        Err(Error::InvalidArgument(_))
    ));
    let rand = Pattern::Random { d: 1, seed: 0 };
    assert!(Omega::from_indices(rand, 3, vec![2, 2, 0], vec![1, 1, 0]).is_ok(), "any set under a random label");
    let cfg = LayerConfig { pattern: Pattern::Banded { d: 9 }, ..Default::default() };
    assert!(matches!(CpuLayer::new(f.clone(), &cfg, None), Err(Error::PatternSize { .. })));
    let omega = Pattern::Plain.omega_for_rank(4).unwrap();
    assert!(matches!(CpuLayer::with_omega(f, omega, &cfg, None), Err(Error::InvalidArgument(_))));
}

#[test]
fn bad_specs_plans_and_inits_are_errors() {
    assert!(matches!("banded:x".parse::<Pattern>(), Err(Error::PatternSpec { .. })));
    assert!(matches!("fast".parse::<Plan>(), Err(Error::InvalidArgument(_))));
    assert!(matches!("ones".parse::<Init>(), Err(Error::InvalidArgument(_))));
}

#[test]
fn layer_calls_check_shapes_and_values() {
    let mut l = layer();
    let x = randn(3 * 5, 1);
    let mut y = vec![0.0; 3 * 7];
    assert!(matches!(l.forward_into(&x, 3, &mut y[1..]), Err(Error::Shape { .. })));
    assert!(matches!(l.forward_into(&x[1..], 3, &mut y), Err(Error::Shape { .. })));
    assert!(matches!(l.forward_into(&[], 0, &mut []), Err(Error::Empty { .. })));
    let (mut dx, mut dm) = (vec![0.0; 15], vec![0.0; 13]);
    let gy = randn(21, 2);
    assert!(matches!(l.backward_into(&gy, 3, &mut dx, &mut dm), Err(Error::NoForward(ForwardMismatch::Missing))));
    l.forward_into(&x, 3, &mut y).unwrap();
    assert!(matches!(
        l.backward_into(&gy[..14], 2, &mut dx[..10], &mut dm),
        Err(Error::NoForward(ForwardMismatch::Tokens { forward: 3, backward: 2 }))
    ));
    assert!(matches!(l.backward_into(&gy, 3, &mut dx, &mut dm[1..]), Err(Error::Shape { .. })));
    assert!(matches!(l.backward_into(&gy, 3, &mut dx[1..], &mut dm), Err(Error::Shape { .. })));
    assert!(l.backward_into(&gy, 3, &mut dx, &mut dm).is_ok());
    // Coefficients and gate.
    let before = l.coefficients().to_vec();
    assert!(matches!(l.set_coefficients(&[1.0; 12]), Err(Error::Shape { .. })));
    let mut bad = before.clone();
    bad[4] = f32::NAN;
    assert!(matches!(l.set_coefficients(&bad), Err(Error::NonFinite { index: 4, .. })));
    assert_eq!(l.coefficients(), &before[..], "a rejected update loses nothing");
    assert!(matches!(l.set_gamma(f32::INFINITY), Err(Error::NonFinite { .. })));
    assert_eq!(l.gamma(), 0.0);
    // Changing coefficients forgets the saved forward: backward would otherwise mix states.
    l.forward_into(&x, 3, &mut y).unwrap();
    l.set_gamma(0.1).unwrap();
    assert!(matches!(l.backward_into(&gy, 3, &mut dx, &mut dm), Err(Error::NoForward(_))));
    // Bias.
    let cfg = LayerConfig::default();
    assert!(matches!(CpuLayer::new(factors(7, 5, 5, 1), &cfg, Some(vec![0.0; 6])), Err(Error::Shape { .. })));
    assert!(matches!(CpuLayer::new(factors(7, 5, 5, 1), &cfg, Some(vec![f32::NAN; 7])), Err(Error::NonFinite { .. })));
    assert!(matches!(CpuLayer::from_weight(&[f32::NAN; 35], 7, 5, None, &cfg, None), Err(Error::NonFinite { .. })));
}

#[test]
fn errors_explain_themselves() {
    let msg = "banded:x".parse::<Pattern>().unwrap_err().to_string();
    assert!(msg.contains("banded:x") && msg.contains("half-width"), "{msg}");
    let msg = Pattern::Banded { d: 5 }.size(5).unwrap_err().to_string();
    assert!(msg.contains("d = 5") && msg.contains("r = 5"), "{msg}");
}
