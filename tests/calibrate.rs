//! Measured plan choice on the CPU layer: calibration measures every plan at every requested
//! token count, `Auto` then follows the measurements, fixed plans still override, the cache
//! gives the same table back without measuring, and nothing about the layer's maths changes.

mod common;

use std::time::Duration;

use common::*;
use svft::calibrate::{load, CalibrationOptions};
use svft::cpu::CpuLayer;
use svft::svd::random_factors;
use svft::{ExecPlan, LayerConfig, Plan};

fn layer() -> CpuLayer {
    let config = LayerConfig::official("banded:2".parse().unwrap());
    CpuLayer::new(random_factors(97, 61, 61, 5).unwrap(), &config, None).unwrap()
}

fn cache_file(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("svft-calibrate-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir.join("plans.json")
}

#[test]
fn auto_follows_the_measurements_and_fixed_plans_override() {
    let path = cache_file("follow");
    let tokens = vec![1, 7, 300];
    let options = CalibrationOptions { tokens: tokens.clone(), budget: Duration::from_millis(5), cache: Some(path) };
    let mut l = layer();
    let table = l.calibrate(&options).unwrap().clone();
    assert_eq!(table.points().iter().map(|p| p.n).collect::<Vec<_>>(), tokens);
    for p in table.points() {
        let plans: Vec<ExecPlan> = p.ms.iter().map(|m| m.0).collect();
        assert_eq!(plans, [ExecPlan::Factored, ExecPlan::Merged], "both CPU plans measured at n = {}", p.n);
        assert!(p.ms.iter().all(|m| m.1.is_finite() && m.1 > 0.0));
        assert_eq!(Some(l.plan_for(p.n)), p.best(), "auto picks the measured winner at n = {}", p.n);
    }
    // Outside the calibrated range the FLOP model decides.
    assert_eq!(l.plan_for(100_000), l.dims().cheaper(100_000));
    // A fixed plan overrides the table both ways.
    for fixed in [Plan::Factored, Plan::Merged] {
        l.set_plan(fixed);
        assert!(tokens.iter().all(|&n| l.plan_for(n) == fixed.resolve(&l.dims(), n)));
    }
    l.set_plan(Plan::Auto);
    l.set_plan_table(None);
    assert_eq!(l.plan_for(300), l.dims().cheaper(300));
}

#[test]
fn calibration_changes_no_result() {
    let mut calibrated = layer();
    let options = CalibrationOptions { tokens: vec![3, 40], budget: Duration::ZERO, cache: None };
    calibrated.calibrate(&options).unwrap();
    assert_eq!(calibrated.config().plan, Plan::Auto, "the configured plan is restored");
    let n = 40;
    let mut fresh = layer();
    fresh.set_plan(calibrated.plan_for(n).into());
    let x = randn(n * 61, 1);
    let g = randn(n * 97, 2);
    let (y1, y2) = (calibrated.forward(&x, n).unwrap(), fresh.forward(&x, n).unwrap());
    assert_eq!(y1, y2, "same plan, same coefficients: bitwise the same output");
    let (g1, g2) = (calibrated.backward(&g, n).unwrap(), fresh.backward(&g, n).unwrap());
    assert_eq!(g1, g2);
    assert_eq!(calibrated.coefficients(), fresh.coefficients());
}

#[test]
fn the_cache_returns_the_table_without_measuring() {
    let path = cache_file("cache");
    let options =
        CalibrationOptions { tokens: vec![2, 50], budget: Duration::from_millis(2), cache: Some(path.clone()) };
    let first = layer().calibrate(&options).unwrap().clone();
    // Measured timings never repeat to the last bit: equality means the table was loaded.
    let second = layer().calibrate(&options).unwrap().clone();
    assert_eq!(first, second);
    assert_eq!(load(&path, &layer().calibration_key()).unwrap(), Some(first.clone()));
    // Another shape is another entry: measured, and the first one is kept.
    let other_cfg = LayerConfig::official("plain".parse().unwrap());
    let mut other = CpuLayer::new(random_factors(40, 33, 33, 6).unwrap(), &other_cfg, None).unwrap();
    let t = other.calibrate(&options).unwrap().clone();
    assert_ne!(t, first);
    assert_eq!(load(&path, &layer().calibration_key()).unwrap(), Some(first));
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}
