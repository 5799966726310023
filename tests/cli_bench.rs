//! `svft bench --model`: every distinct adapted shape of a checkpoint, as a table or JSON;
//! `svft bench --grid`: a whole grid in one process, its rows, memory table and plot.
//! (The single-shape `svft bench` and its flags are covered by tests/cli.rs.)

mod cli_support;

use cli_support::*;

#[test]
fn bench_every_adapted_shape_of_a_model() {
    let dir = temp_dir("bench-model");
    let tensors = bert_tensors(2, 16, Dt::BF16);
    let model = dir.join("model.safetensors");
    write_checkpoint(&model, &tensors, None);
    let v = svft_json(&["bench", "--model", s(&model), "--tokens", "24", "--seconds", "0.02", "--json"]);
    assert_eq!(v["backend"], "cpu");
    assert_eq!(v["modules"], 12);
    let cases = v["cases"].as_array().unwrap();
    let shapes: Vec<(u64, u64, u64)> = cases
        .iter()
        .map(|c| (c["d_out"].as_u64().unwrap(), c["d_in"].as_u64().unwrap(), c["modules"].as_u64().unwrap()))
        .collect();
    assert_eq!(shapes, vec![(16, 16, 8), (64, 16, 2), (16, 64, 2)]);
    for c in cases {
        for key in ["svft_fwd_bwd_ms", "gemm_floor_ms", "lora_fwd_bwd_ms", "official_fwd_bwd_ms", "dense_fwd_bwd_ms"] {
            assert!(c[key].as_f64().unwrap() > 0.0, "{key}: {c}");
        }
        assert_eq!(c["tokens"], 24);
    }
    let total = &v["total"];
    let sum: f64 = cases.iter().map(|c| c["svft_fwd_bwd_ms"].as_f64().unwrap() * c["modules"].as_f64().unwrap()).sum();
    assert!((total["svft_fwd_bwd_ms"].as_f64().unwrap() - sum).abs() < 1e-9 * sum.max(1.0));
    // banded:2 at r = 16: 16 * 5 - 6 coefficients + gate, for each of the 12 modules.
    assert_eq!(total["trainable_params"].as_u64(), Some(12 * (16 * 5 - 6 + 1)));

    let table =
        svft_ok(&["bench", "--model", s(&model), "--tokens", "24", "--seconds", "0.02", "--targets", "query|key"]);
    assert!(table.contains("4 adapted modules in 1 shapes") && table.contains("16x16"), "{table}");
    assert!(table.contains("SVFT/LoRA") && table.contains("all modules"), "{table}");

    let err = svft_err(&["bench", "--model", s(&model), "--targets", "nope", "--seconds", "0.02"]);
    assert!(err.contains("matches --targets"), "{err}");
    if svft::cuda::device_count().is_err() {
        let err = svft_err(&["bench", "--backend", "cuda", "--seconds", "0.02"]);
        assert!(err.contains("CUDA"), "{err}");
    }
    let err = svft_err(&["bench", "--backend", "cpu", "--dtype", "bf16", "--seconds", "0.02"]);
    assert!(err.contains("f32 only"), "{err}");
}

/// `svft bench --grid tiny` on the CPU: one JSON line per row, every field finite and
/// consistent with the others, the memory model in every row, and `--plot` writes the PNGs.
#[test]
fn bench_grid_tiny_rows_are_complete_and_consistent() {
    let dir = temp_dir("bench-grid");
    let plot = dir.join("grid.png");
    let out =
        svft_ok(&["bench", "--backend", "cpu", "--grid", "tiny", "--seconds", "0.01", "--json", "--plot", s(&plot)]);
    let rows: Vec<serde_json::Value> =
        out.lines().map(|l| serde_json::from_str(l).expect("one JSON row a line")).collect();
    assert_eq!(rows.len(), 2 * 3 * 2, "2 shapes x 3 n x 2 patterns");
    let num = |r: &serde_json::Value, key: &str| -> f64 {
        let x = r[key].as_f64().unwrap_or_else(|| panic!("{key} missing: {r}"));
        assert!(x.is_finite() && x > 0.0, "{key} = {x}: {r}");
        x
    };
    let mut seen = Vec::new();
    for r in &rows {
        assert_eq!(
            (r["grid"].as_str(), r["backend"].as_str(), r["plan_requested"].as_str()),
            (Some("tiny"), Some("cpu"), Some("auto"))
        );
        let (o, i, n) = (r["d_out"].as_u64().unwrap(), r["d_in"].as_u64().unwrap(), r["tokens"].as_u64().unwrap());
        seen.push((o, i, n, r["pattern"].as_str().unwrap().to_string()));
        let svft = num(r, "svft_fwd_bwd_ms");
        let (floor, lora, official) =
            (num(r, "gemm_floor_ms"), num(r, "lora_fwd_bwd_ms"), num(r, "official_fwd_bwd_ms"));
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * a.abs().max(b.abs());
        assert!(close(num(r, "ratio_to_floor"), svft / floor), "{r}");
        assert!(close(num(r, "ratio_to_lora"), svft / lora), "{r}");
        assert!(close(num(r, "speedup_vs_official"), official / svft), "{r}");
        assert!(close(num(r, "ratio_to_dense"), svft / num(r, "dense_fwd_bwd_ms")), "{r}");
        // Every fixed plan that applies on the CPU is timed (small-n runs the factored code
        // there and is reported as not timed), the headline plan is one of them, and the best
        // fixed plan is the fastest.
        let plan_ms = r["plan_ms"].as_object().unwrap();
        let names: Vec<&str> = plan_ms.keys().map(String::as_str).collect();
        assert_eq!(names, ["factored", "merged"], "{r}");
        assert_eq!(r["plan_ms_note"].as_str().is_some_and(|s| s.contains("small-n")), n <= 64, "{r}");
        let times: Vec<f64> = plan_ms.values().map(|v| v.as_f64().unwrap()).collect();
        assert!(times.iter().all(|t| t.is_finite() && *t > 0.0), "{r}");
        let best = times.iter().copied().fold(f64::INFINITY, f64::min);
        assert_eq!(num(r, "best_fixed_plan_ms"), best, "{r}");
        assert_eq!(plan_ms[r["best_fixed_plan"].as_str().unwrap()].as_f64(), Some(best), "{r}");
        assert_eq!(plan_ms[r["plan"].as_str().unwrap()].as_f64(), Some(svft), "{r}");
        // Auto comes from the calibration the grid runs per layer, at these very token counts.
        assert_eq!(r["auto_from"].as_str(), Some("calibration"), "{r}");
        assert!(close(num(r, "auto_to_best_fixed"), svft / best) && svft >= best, "{r}");
        // Bytes: the memory model's totals add up, SVFT beats the official layer, the small-n
        // floor is U and V read twice in f32.
        let m = &r["memory"];
        for method in ["svft", "official", "lora"] {
            let b = &m[method];
            let parts: u64 = ["persistent_bytes", "workspace_bytes", "saved_bytes", "grad_bytes"]
                .iter()
                .map(|k| b[*k].as_u64().unwrap_or_else(|| panic!("{method}.{k}: {r}")))
                .sum();
            assert_eq!(b["total_bytes"].as_u64(), Some(parts), "{method}: {r}");
        }
        let ratio = m["svft"]["total_bytes"].as_f64().unwrap() / m["official"]["total_bytes"].as_f64().unwrap();
        assert!(close(m["svft_to_official"].as_f64().unwrap(), ratio), "{r}");
        // The factored plan never forms W: it needs less than the official layer. (The merged
        // plan, which calibration may pick on a busy machine, holds W like the official one.)
        assert_eq!(m["svft_plan"].as_str(), r["plan"].as_str(), "{r}");
        if r["plan"].as_str() == Some("factored") {
            assert!(ratio < 1.0, "{r}");
        }
        let rank = o.min(i);
        // U, V f32; s, M, gamma f32; rows, cols and two CSRs in i32 (k = |Omega| = params - gate).
        let k = r["trainable_params"].as_u64().unwrap() - 1;
        let persistent = 4 * (o + i) * rank + 4 * (rank + k + 1) + 4 * (2 * k + 2 * (rank + 1 + 2 * k));
        assert_eq!(m["svft"]["persistent_bytes"].as_u64(), Some(persistent), "{r}");
        if n <= 64 {
            assert_eq!(r["bytes_floor"].as_u64(), Some(2 * (o + i) * rank * 4), "{r}");
        } else {
            assert!(r.get("bytes_floor").is_none(), "{r}");
        }
        assert!(r.get("bandwidth_fraction").is_none() && r.get("copy_gb_per_s").is_none(), "CPU rows: {r}");
        assert!(r["factors"].as_str().unwrap().contains("not orthonormal"), "{r}");
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), rows.len(), "every case once");
    for shape in ["384x384", "1536x384"] {
        let png = std::fs::read(dir.join(format!("grid-{shape}.png"))).expect("a PNG per shape");
        assert_eq!(&png[1..4], b"PNG");
    }

    // The table: one line per row plus headers; the memory table needs no device.
    let table = svft_ok(&["bench", "--backend", "cpu", "--grid", "tiny", "--seconds", "0.01"]);
    assert!(table.contains("best plan") && table.contains("1536x384"), "{table}");
    assert_eq!(table.lines().filter(|l| l.starts_with("384x384") || l.starts_with("1536x384")).count(), 12, "{table}");
    let mem = svft_ok(&["bench", "--grid", "llama3-8b", "--memory", "--dtype", "bf16", "--backend", "cuda"]);
    assert_eq!(mem.lines().filter(|l| l.starts_with("| 4096x4096 |")).count(), 20, "{mem}");
    let err = svft_err(&["bench", "--grid", "nope", "--seconds", "0.01"]);
    assert!(err.contains("unknown grid"), "{err}");
    let err = svft_err(&["bench", "--plot", "x.png", "--seconds", "0.01"]);
    assert!(err.contains("--grid"), "{err}");
}
