//! `svft demo` and a bare `svft`: SVFT and LoRA train, the table has every column, the JSON
//! every number, and the loss plot is a PNG.

mod cli_support;

use cli_support::*;

fn check_png(path: &std::path::Path) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
    assert!(bytes.len() > 2000);
}

#[test]
fn demo_json_small() {
    let dir = temp_dir("demo-small");
    let plot = dir.join("loss.png");
    let v = svft_json(&[
        "demo",
        "--steps",
        "60",
        "--tokens",
        "32",
        "--batches",
        "4",
        "--json",
        "--plot",
        s(&plot),
        "--backend",
        "cpu",
    ]);
    assert_eq!(v["backend"], "cpu");
    assert_eq!(v["modules"].as_array().unwrap().len(), 12);
    assert_eq!(v["width"], 256);
    let results = v["results"].as_array().unwrap();
    let names: Vec<&str> = results.iter().map(|r| r["method"].as_str().unwrap()).collect();
    assert_eq!(names[..2], ["SVFT plain", "SVFT banded:2"]);
    assert!(names[2].starts_with("LoRA r="));
    for r in results {
        assert_eq!(r["losses"].as_array().unwrap().len(), 60);
        let (l0, l1) = (r["initial_loss"].as_f64().unwrap(), r["final_loss"].as_f64().unwrap());
        assert!(l1 < l0, "{}: {l0} -> {l1}", r["method"]);
        for key in ["ms_per_step", "memory_bytes", "trainable_params", "frozen_bytes"] {
            assert!(r[key].as_f64().unwrap() > 0.0, "{key}");
        }
    }
    // SVFT keeps U and V: more frozen memory than LoRA's W0 (the paper's stated limitation).
    assert!(results[0]["frozen_bytes"].as_u64() > results[2]["frozen_bytes"].as_u64());
    // Plain: one coefficient per singular value (r = 256 for all 12 modules).
    assert_eq!(results[0]["trainable_params"], 12 * 256);
    check_png(&plot);
}

#[test]
fn demo_from_a_model() {
    let dir = temp_dir("demo-model");
    let model = dir.join("model.safetensors");
    write_checkpoint(&model, &bert_tensors(2, 16, Dt::F16), None);
    let out = svft_ok(&["demo", "--model", s(&model), "--steps", "40", "--tokens", "16", "--no-plot", "--banded", "1"]);
    for needle in ["SVFT plain", "SVFT banded:1", "LoRA r=", "trainable", "loss final", "ms/step", "memory MiB"] {
        assert!(out.contains(needle), "{needle}: {out}");
    }
    assert!(out.contains("6 modules from"), "{out}");
    assert!(!dir.join("svft-demo-loss.png").exists());
    let err = svft_err(&["demo", "--model", s(&model), "--steps", "0"]);
    assert!(err.contains("--steps"), "{err}");
    let err = svft_err(&["demo", "--model", s(&model), "--banded", "16", "--steps", "2"]);
    assert!(err.contains("--banded"), "{err}");
}

/// Whether this machine has a CUDA device the demo can train on (what `--backend auto` checks).
fn gpu_present() -> Result<(), String> {
    svft::cuda::device_count().and_then(|_| svft::cuda::Gpu::new(0)).map(|_| ()).map_err(|e| e.to_string())
}

/// The synthetic demo (`cargo run --release`): a bare `svft` trains and prints the table, and
/// leaves the plot in the working directory.
#[test]
fn bare_svft_runs_the_demo() {
    let dir = temp_dir("demo-bare");
    let out = svft_in(Some(&dir), &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // `auto`: the GPU when one is usable, else the CPU with the reason on stderr.
    let backend = match gpu_present() {
        Ok(()) => "svft demo (cuda, layers on device, stack glue on host",
        Err(_) => {
            assert!(stderr.contains("svft demo on cpu (no GPU taken: "), "{stderr}");
            "svft demo (cpu:"
        }
    };
    for needle in [backend, "SVFT plain", "SVFT banded:2", "LoRA r=2", "300 steps", "loss plot"] {
        assert!(stdout.contains(needle), "{needle}: {stdout}");
    }
    check_png(&dir.join("svft-demo-loss.png"));
    let help = String::from_utf8(svft_in(None, &["--help"]).stdout).unwrap();
    for sub in ["demo", "decompose", "init-adapter", "merge", "inspect", "bench"] {
        assert!(help.contains(sub), "{sub}: {help}");
    }
}
