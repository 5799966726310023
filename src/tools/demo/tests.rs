//! Unit tests of the demo module.
use super::*;

#[test]
fn stack_plans() {
    // BERT-like block: q, k, v, o, up, down.
    let bert = [(4, 4), (4, 4), (4, 4), (4, 4), (16, 4), (4, 16)];
    let (d, b) = plan_stack(&bert);
    assert_eq!(d, 4);
    assert_eq!(b.len(), 5);
    assert_eq!(b[4], Branch::Mlp { up: 4, down: 5 });
    // Llama-like with GQA: k, v narrower; gate and up both d -> f, one down.
    let llama = [(8, 8), (2, 8), (2, 8), (8, 8), (32, 8), (32, 8), (8, 32)];
    let (d, b) = plan_stack(&llama);
    assert_eq!(d, 8);
    assert_eq!(b, vec![Branch::Linear(0), Branch::Linear(3), Branch::Mlp { up: 4, down: 6 }]);
}

#[test]
fn tiny_demo_learns() {
    let modules: Vec<DemoModule> = [(6, 6), (12, 6), (6, 12)]
        .iter()
        .enumerate()
        .map(|(i, &(o, n))| DemoModule::normalised(format!("m{i}"), random_factors(o, n, o.min(n), i as u64).unwrap()))
        .collect();
    let options = DemoOptions { steps: 150, tokens: 16, banded: 1, ..Default::default() };
    let report = run(&modules, "test", &options, &mut |_, _, _| {}).unwrap();
    assert_eq!(report.results.len(), 3);
    for r in &report.results {
        assert!(r.final_loss < 0.5 * r.initial_loss, "{}: {} -> {}", r.name, r.initial_loss, r.final_loss);
    }
    assert_eq!((report.backend.as_str(), report.placement.as_deref()), ("cpu", None));
    assert!(report.to_table().starts_with("svft demo (cpu: "), "{}", report.to_table());
    assert!(report.to_json()["placement"].is_null());
}

/// A CUDA report names where each part ran and what its memory column counts.
#[test]
fn cuda_report_names_its_placement() {
    let modules = vec![DemoModule::normalised("m", random_factors(6, 6, 6, 1).unwrap())];
    let options = DemoOptions { steps: 2, tokens: 4, banded: 1, ..Default::default() };
    let mut report = run(&modules, "test", &options, &mut |_, _, _| {}).unwrap();
    report.backend = "cuda".into();
    report.placement = Some("layers on device, stack glue on host".into());
    report.device = "Some GPU".into();
    let table = report.to_table();
    assert!(table.starts_with("svft demo (cuda, layers on device, stack glue on host: Some GPU)"), "{table}");
    assert!(table.contains("frozen device bytes"), "{table}");
    assert_eq!(report.to_json()["placement"], "layers on device, stack glue on host");
}
