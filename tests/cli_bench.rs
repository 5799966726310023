//! `svft bench --model`: every distinct adapted shape of a checkpoint, as a table or JSON.
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
        for key in ["svft_fwd_bwd_ms", "gemm_floor_ms", "lora_fwd_bwd_ms", "official_fwd_bwd_ms"] {
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
