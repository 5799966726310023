//! The `svft` binary: `svft bench --json` prints one JSON object with every promised field, and
//! bad arguments are clear errors with a non-zero exit.

use std::process::Command;

fn svft(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_svft")).args(args).output().expect("run svft")
}

#[test]
fn bench_json_has_every_field_and_consistent_ratios() {
    for plan in ["factored", "merged", "auto"] {
        let out = svft(&[
            "bench",
            "--backend",
            "cpu",
            "--d-out",
            "96",
            "--d-in",
            "64",
            "--tokens",
            "40",
            "--pattern",
            "banded:2",
            "--plan",
            plan,
            "--seconds",
            "0.05",
            "--json",
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
        for key in ["backend", "device", "pattern", "plan"] {
            assert!(v[key].is_string(), "{key} missing");
        }
        for key in [
            "d_out",
            "d_in",
            "tokens",
            "trainable_params",
            "svft_fwd_bwd_ms",
            "gemm_floor_ms",
            "lora_fwd_bwd_ms",
            "official_fwd_bwd_ms",
            "dense_fwd_bwd_ms",
            "ratio_to_floor",
            "ratio_to_lora",
            "speedup_vs_official",
            "ratio_to_dense",
            "flop_ratio_to_dense",
        ] {
            let x = v[key].as_f64().unwrap_or_else(|| panic!("{key} missing"));
            assert!(x.is_finite() && x > 0.0, "{key} = {x}");
        }
        assert_eq!((v["d_out"].as_u64(), v["d_in"].as_u64(), v["tokens"].as_u64()), (Some(96), Some(64), Some(40)));
        assert_eq!(v["backend"], "cpu");
        // banded:2 at r = 64: 64 * 5 - 6 coefficients, plus the gate.
        assert_eq!(v["trainable_params"].as_u64(), Some(64 * 5 - 6 + 1));
        let ratio = v["svft_fwd_bwd_ms"].as_f64().unwrap() / v["gemm_floor_ms"].as_f64().unwrap();
        assert!((ratio - v["ratio_to_floor"].as_f64().unwrap()).abs() < 1e-9);
        // The dense step is 4 n d_out d_in FLOPs; the ratio column divides the plan's by it.
        let flops = v["plan_gemm_gflop"].as_f64().unwrap() * 1e9 / (4.0 * 40.0 * 96.0 * 64.0);
        assert!((flops - v["flop_ratio_to_dense"].as_f64().unwrap()).abs() < 1e-9 * flops, "{v}");
        if plan != "auto" {
            assert_eq!(v["plan"], plan);
        }
    }
}

#[test]
fn bad_arguments_fail_with_a_message() {
    for args in [
        &["bench", "--pattern", "banded:x"][..],
        &["bench", "--plan", "fastest"],
        &["bench", "--tokens", "0"],
        &["bench", "--d-out", "8", "--d-in", "8", "--pattern", "banded:8", "--seconds", "0.01"],
        &["bench", "--seconds", "-1"],
    ] {
        let out = svft(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("error"), "{args:?}: {err}");
    }
}
