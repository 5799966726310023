//! Finite-difference checks in f64 of the reference's analytic gradients (dM, dgamma, dX),
//! which the f32 layer is in turn checked against (tests/layer.rs).

mod common;

use common::*;
use svft::reference::Reference;
use svft::Pattern;

/// L = sum(Y * R) for a fixed random R, so dL/dY = R.
fn loss(refl: &Reference, x: &[f64], rr: &[f64], n: usize) -> f64 {
    refl.forward(x, n).iter().zip(rr).map(|(a, b)| a * b).sum()
}

fn assert_close(analytic: f64, numeric: f64, what: &str) {
    let tol = 1e-6 * (1.0 + analytic.abs().max(numeric.abs()));
    assert!((analytic - numeric).abs() <= tol, "{what}: analytic {analytic} vs numeric {numeric}");
}

#[test]
#[allow(clippy::needless_range_loop)] // k indexes both the perturbed M and dM
fn reference_gradients_match_finite_differences() {
    let h = 1e-6;
    for (pi, spec) in ["banded:2", "random:4:seed=3", "topk:1:official"].iter().enumerate() {
        let (d_out, d_in, r, n) = (13, 9, 9, 5);
        let f = factors(d_out, d_in, r, 40 + pi as u64);
        let pattern: Pattern = spec.parse().unwrap();
        let omega = pattern.omega(&f).unwrap();
        let m = randn(omega.len(), 6);
        let bias = randn(d_out, 8);
        let mut refl = Reference::new(&f, &omega, &m, 0.3, true, Some(&bias));
        let x = wide(&randn(n * d_in, 11));
        let rr = wide(&randn(n * d_out, 12));
        let (dx, dm, dgamma) = refl.backward(&x, &rr, n);

        for k in 0..omega.len() {
            let m0 = refl.m[k];
            refl.m[k] = m0 + h;
            let up = loss(&refl, &x, &rr, n);
            refl.m[k] = m0 - h;
            let down = loss(&refl, &x, &rr, n);
            refl.m[k] = m0;
            assert_close(dm[k], (up - down) / (2.0 * h), &format!("{spec} dM[{k}]"));
        }
        let g0 = refl.gamma;
        refl.gamma = g0 + h;
        let up = loss(&refl, &x, &rr, n);
        refl.gamma = g0 - h;
        let down = loss(&refl, &x, &rr, n);
        refl.gamma = g0;
        assert_close(dgamma, (up - down) / (2.0 * h), &format!("{spec} dgamma"));

        let mut xp = x.clone();
        for i in 0..x.len() {
            xp[i] = x[i] + h;
            let up = loss(&refl, &xp, &rr, n);
            xp[i] = x[i] - h;
            let down = loss(&refl, &xp, &rr, n);
            xp[i] = x[i];
            assert_close(dx[i], (up - down) / (2.0 * h), &format!("{spec} dX[{i}]"));
        }
    }
}

#[test]
fn gate_off_has_no_gamma_gradient_and_unit_gate() {
    let f = factors(7, 5, 5, 1);
    let omega = Pattern::Plain.omega(&f).unwrap();
    let refl = Reference::new(&f, &omega, &randn(5, 2), 3.0, false, None);
    assert_eq!(refl.g(), 1.0);
    let (_, _, dgamma) = refl.backward(&wide(&randn(10, 3)), &wide(&randn(14, 4)), 2);
    assert_eq!(dgamma, 0.0);
}
