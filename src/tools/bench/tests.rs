//! Unit tests of the bench module.
use super::*;

#[test]
fn bench_values_are_nonzero_with_the_asked_spread() {
    let v = bench_values(7, 200_000, 0.5);
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
    let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
    assert!(mean.abs() < 0.01 && (var.sqrt() - 0.5).abs() < 0.01, "mean {mean}, std {}", var.sqrt());
    assert_eq!(v, bench_values(7, 200_000, 0.5), "fixed by the seed");
    assert_ne!(v[..100], bench_values(8, 100, 0.5)[..]);
}

#[test]
fn grids_and_plans() {
    let g = Grid::named("llama3-8b").unwrap();
    assert_eq!(g.len(), 60);
    assert_eq!(Grid::named("tiny").unwrap().len(), 12);
    assert!(Grid::named("nope").is_err());
    assert_eq!(fixed_plans(16, true), [ExecPlan::Factored, ExecPlan::Merged, ExecPlan::SmallN]);
    assert_eq!(fixed_plans(16, false), [ExecPlan::Factored, ExecPlan::Merged]);
    assert_eq!(fixed_plans(65, true), [ExecPlan::Factored, ExecPlan::Merged]);
    assert_eq!(plans_to_time(&[ExecPlan::Factored], ExecPlan::Merged), [ExecPlan::Factored, ExecPlan::Merged]);
    assert_eq!(plans_to_time(&[ExecPlan::Merged], ExecPlan::Merged), [ExecPlan::Merged]);
    let f = bench_factors(12, 8, 8, 1).unwrap();
    assert_eq!((f.u.len(), f.v.len(), f.s.len()), (96, 64, 8));
    assert!(bench_factors(12, 8, 9, 1).is_err());
}
