//! The CPU layer against the f64 dense reference, for every pattern x plan x gate x init on
//! odd shapes, with poisoned outputs, and token counts that take every branch of the plans.

mod common;

use common::*;
use svft::cpu::CpuLayer;
use svft::reference::{rel_err, Reference};
use svft::{Init, LayerConfig, Pattern, Plan};

/// Runs forward and backward on poisoned buffers and compares them with the reference.
fn check_against_reference(layer: &mut CpuLayer, n: usize, seed: u64, what: &str) {
    let f = layer.factors().clone();
    let x = randn(n * f.d_in, seed);
    let gy = randn(n * f.d_out, seed + 1);
    let mut y = poisoned(n * f.d_out);
    layer.forward_into(&x, n, &mut y).unwrap();
    let mut dx = poisoned(n * f.d_in);
    let mut dm = poisoned(layer.omega().len());
    let dgamma = layer.backward_into(&gy, n, &mut dx, &mut dm).unwrap();

    let refl =
        Reference::new(&f, layer.omega(), layer.coefficients(), layer.gamma(), layer.config().gate, layer.bias());
    let (xw, gw) = (wide(&x), wide(&gy));
    let y_ref = refl.forward(&xw, n);
    let (dx_ref, dm_ref, dgamma_ref) = refl.backward(&xw, &gw, n);
    let plan = layer.plan_for(n);
    assert!(rel_err(&y, &y_ref) < F32_TOL, "{what} n={n} {plan}: Y err {}", rel_err(&y, &y_ref));
    assert!(rel_err(&dx, &dx_ref) < F32_TOL, "{what} n={n} {plan}: dX err {}", rel_err(&dx, &dx_ref));
    assert!(rel_err(&dm, &dm_ref) < F32_TOL, "{what} n={n} {plan}: dM err {}", rel_err(&dm, &dm_ref));
    // dgamma is one sum of signed terms: measure its error against the size of those terms.
    let g = refl.g();
    let scale: f64 = g * (1.0 - g) * dm_ref.iter().zip(&refl.m).map(|(d, m)| (d / g * m).abs()).sum::<f64>();
    assert!(dgamma.is_finite(), "{what}: dgamma is not finite");
    assert!(
        (dgamma as f64 - dgamma_ref).abs() <= F32_TOL * scale.max(f64::MIN_POSITIVE),
        "{what} n={n} {plan}: dgamma {dgamma} vs {dgamma_ref} (scale {scale})"
    );
    if !layer.config().gate {
        assert_eq!(dgamma, 0.0);
    }
    let mut merged = layer.merge();
    assert!(rel_err(&merged, &refl.weight()) < F32_TOL, "{what}: merge err");
    merged.clear();

    // The stateless pair (the PyTorch path): the caller keeps T; another forward in between
    // (on other inputs) must not leak into this backward.
    let (mut ys, mut t) = (poisoned(n * f.d_out), poisoned(n * f.r));
    layer.forward_saving(&x, n, &mut ys, &mut t).unwrap();
    layer.forward_into(&randn(n * f.d_in, seed + 2), n, &mut poisoned(n * f.d_out)).unwrap();
    let (mut dxs, mut dms) = (poisoned(n * f.d_in), poisoned(layer.omega().len()));
    let dgs = layer.backward_saved(&t, &gy, n, &mut dxs, &mut dms).unwrap();
    let plan = layer.saving_plan_for(n);
    for (name, got, want) in [("Y", &ys, &y_ref), ("dX", &dxs, &dx_ref), ("dM", &dms, &dm_ref)] {
        assert!(rel_err(got, want) < F32_TOL, "{what} n={n} saving {plan}: {name} err {}", rel_err(got, want));
    }
    assert!((dgs as f64 - dgamma_ref).abs() <= F32_TOL * scale.max(f64::MIN_POSITIVE), "{what}: saving dgamma");
    assert!(matches!(layer.backward_saved(&t[1..], &gy, n, &mut dxs, &mut dms), Err(svft::Error::Shape { .. })));
}

#[test]
fn every_pattern_plan_gate_init_matches_the_f64_reference() {
    let mut cases = 0;
    for (si, &(d_out, d_in, r)) in SHAPES.iter().enumerate() {
        let f = factors(d_out, d_in, r, 10 + si as u64);
        for spec in PATTERNS {
            let pattern: Pattern = spec.parse().unwrap();
            if !pattern_possible(&pattern, d_out, d_in, r) {
                continue;
            }
            for plan in [Plan::Factored, Plan::Merged, Plan::Auto] {
                for gate in [false, true] {
                    for init in [Init::Zero, Init::Official] {
                        let config = LayerConfig { pattern, init, gate, plan, seed: 3 };
                        let bias = (gate && init == Init::Official).then(|| randn(d_out, 77));
                        let mut layer = CpuLayer::new(f.clone(), &config, bias).unwrap();
                        let what = format!("{d_out}x{d_in} r={r} {spec} {plan} gate={gate} {init}");
                        // n = 1, n between d_in and d_out, n above both: every fold/apply branch.
                        for n in [1, 30, 300] {
                            check_against_reference(&mut layer, n, 100 + n as u64, &what);
                            cases += 1;
                        }
                        // Trained state: nonzero M and gamma.
                        let k = layer.omega().len();
                        layer.set_coefficients(&randn(k, 5).iter().map(|v| v * 0.3).collect::<Vec<_>>()).unwrap();
                        layer.set_gamma(0.7).unwrap();
                        check_against_reference(&mut layer, 30, 200, &format!("{what} trained"));
                    }
                }
            }
        }
    }
    assert!(cases > 500, "only {cases} cases ran");
}

#[test]
fn zero_init_reproduces_the_frozen_weight() {
    for &(d_out, d_in, _) in &SHAPES[..3] {
        let w0 = randn(d_out * d_in, 9);
        for plan in [Plan::Factored, Plan::Merged] {
            for gate in [false, true] {
                let config = LayerConfig { pattern: "banded:2".parse().unwrap(), plan, gate, ..Default::default() };
                let mut layer = CpuLayer::from_weight(&w0, d_out, d_in, None, &config, None).unwrap();
                assert!(layer.svd_residual().unwrap() < 1e-5);
                for n in [1, 64] {
                    let x = randn(n * d_in, 4);
                    let mut y = poisoned(n * d_out);
                    layer.forward_into(&x, n, &mut y).unwrap();
                    let mut want = vec![0.0f64; n * d_out];
                    for b in 0..n {
                        for p in 0..d_out {
                            want[b * d_out + p] =
                                (0..d_in).map(|q| x[b * d_in + q] as f64 * w0[p * d_in + q] as f64).sum();
                        }
                    }
                    assert!(
                        rel_err(&y, &want) < F32_TOL,
                        "{d_out}x{d_in} {plan} gate={gate} n={n}: {}",
                        rel_err(&y, &want)
                    );
                }
                assert!(rel_err(&layer.merge(), &wide(&w0)) < F32_TOL);
            }
        }
    }
}

#[test]
fn official_init_is_kaiming_normal_with_half_gate() {
    let f = factors(64, 64, 64, 1);
    let config = LayerConfig::official("banded:8".parse().unwrap());
    let layer = CpuLayer::new(f.clone(), &config, None).unwrap();
    let m = layer.coefficients();
    let k = m.len() as f64;
    let var = m.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / k;
    assert!((var / (2.0 / k) - 1.0).abs() < 0.15, "variance {var} vs {}", 2.0 / k);
    assert_eq!(layer.gate_value(), 0.5);
    assert_eq!(layer.trainable_params(), m.len() + 1);
    // Same seed, same draw; another seed, another draw.
    let again = CpuLayer::new(f.clone(), &config, None).unwrap();
    assert_eq!(again.coefficients(), m);
    let other = CpuLayer::new(f, &LayerConfig { seed: 1, ..config }, None).unwrap();
    assert_ne!(other.coefficients(), m);
}

#[test]
fn switching_token_counts_keeps_results_right() {
    // The workspace shrinks and grows between calls; stale sizes must never leak into results.
    let f = factors(37, 23, 23, 2);
    let config =
        LayerConfig { init: Init::Official, gate: true, ..LayerConfig::official("random:2:seed=9".parse().unwrap()) };
    let mut layer = CpuLayer::new(f, &config, None).unwrap();
    for n in [300, 1, 30, 300, 2] {
        check_against_reference(&mut layer, n, n as u64, "switching n");
    }
}

#[test]
fn official_order_baseline_computes_the_same_layer() {
    // The bench's speedups are against this baseline: it must do the same work correctly.
    for &(d_out, d_in, r) in &SHAPES {
        let f = factors(d_out, d_in, r, 21);
        for spec in ["banded:2", "random:3:seed=5"] {
            let omega = spec.parse::<Pattern>().unwrap().omega(&f).unwrap();
            let m = randn(omega.len(), 4);
            let mut official = svft::baseline::OfficialLayer::new(&f, &omega, &m, 0.4);
            let n = 29;
            let (x, gy) = (randn(n * d_in, 5), randn(n * d_out, 6));
            let (mut y, mut dx, mut dm) = (poisoned(n * d_out), poisoned(n * d_in), poisoned(omega.len()));
            official.forward(&x, n, &mut y);
            let dgamma = official.backward(&gy, n, &mut dx, &mut dm);
            let refl = Reference::new(&f, &omega, &m, 0.4, true, None);
            let (dx_ref, dm_ref, dgamma_ref) = refl.backward(&wide(&x), &wide(&gy), n);
            assert!(rel_err(&y, &refl.forward(&wide(&x), n)) < F32_TOL, "{spec}: Y");
            assert!(rel_err(&dx, &dx_ref) < F32_TOL, "{spec}: dX");
            assert!(rel_err(&dm, &dm_ref) < F32_TOL, "{spec}: dM");
            assert!(rel_err(&[dgamma], &[dgamma_ref]) < 1e-4, "{spec}: dgamma {dgamma} vs {dgamma_ref}");
        }
    }
}
