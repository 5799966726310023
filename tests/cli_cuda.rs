//! The CLI's `--backend cuda` on a device (a real GPU, or the virtual one in CI): `decompose`
//! through cuSOLVER gives the CPU's factors, `bench` fills every row and says when its device is
//! virtual, `demo` trains. Without a device each command must fail saying why, and the test says
//! it skipped (SVFT_REQUIRE_GPU=1 makes that a failure).

mod cli_support;
mod common;

use cli_support::*;
use svft::adapter::FactorFile;

/// The device's name, or `None` after checking that `args` fails naming CUDA (the error text
/// also goes to `check`, for what a command adds).
fn device_or_check_error(test: &str, args: &[&str], check: impl FnOnce(&str)) -> Option<String> {
    match common::gpu_or_skip(test) {
        Some(gpu) => Some(gpu.name().to_string()),
        None => {
            let err = svft_err(args);
            assert!(err.contains("CUDA"), "{test}: {err}");
            check(&err);
            None
        }
    }
}

#[test]
fn decompose_on_cuda_matches_the_cpu() {
    let dir = temp_dir("cli-cuda-decompose");
    let tensors = bert_tensors(1, 16, Dt::F32);
    let model = dir.join("model.safetensors");
    write_checkpoint(&model, &tensors, None);
    let (gpu_out, cpu_out) = (dir.join("gpu.safetensors"), dir.join("cpu.safetensors"));
    let args = ["decompose", s(&model), "--backend", "cuda", "-o", s(&gpu_out), "--json"];
    if device_or_check_error("decompose_on_cuda_matches_the_cpu", &args, |_| ()).is_none() {
        return;
    }
    let v = svft_json(&args);
    assert_eq!(v["backend"], "cuda", "{v}");
    assert!(v["max_residual"].as_f64().unwrap() < 1e-5, "{v}");
    svft_json(&["decompose", s(&model), "--backend", "cpu", "-o", s(&cpu_out), "--json"]);
    let (gpu, cpu) = (FactorFile::open(&gpu_out).unwrap(), FactorFile::open(&cpu_out).unwrap());
    assert_eq!(gpu.modules().len(), cpu.modules().len());
    for info in cpu.modules() {
        let (g, c) = (gpu.load(&info.module).unwrap(), cpu.load(&info.module).unwrap());
        let w = &tensors.iter().find(|t| t.name == info.weight).unwrap().values;
        assert!(g.residual(w).unwrap() < 1e-5, "{}", info.module);
        // Singular values are unique up to f32 rounding; the vectors only up to sign.
        let e = svft::reference::rel_err(&g.s, &common::wide(&c.s));
        assert!(e < 1e-5, "{}: s differs from the CPU's by {e}", info.module);
    }
}

#[test]
fn bench_on_cuda_fills_every_row() {
    let args = ["bench", "--backend", "cuda", "--grid", "tiny", "--dtype", "bf16", "--seconds", "0.005", "--json"];
    let Some(device) = device_or_check_error("bench_on_cuda_fills_every_row", &args, |_| ()) else { return };
    let out = svft_in(None, &args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let virtual_device = svft::cuda::is_virtual_name(&device);
    assert_eq!(stderr.contains("virtual device: timings meaningless"), virtual_device, "{stderr}");
    let rows: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("a JSON row")).collect();
    assert!(!rows.is_empty());
    for v in &rows {
        assert_eq!((v["backend"].as_str(), v["dtype"].as_str()), (Some("cuda"), Some("bf16")), "{v}");
        assert_eq!(v["device"].as_str(), Some(device.as_str()), "{v}");
        for key in ["svft_fwd_bwd_ms", "gemm_floor_ms", "lora_fwd_bwd_ms", "ratio_to_floor"] {
            assert!(v[key].as_f64().is_some_and(|x| x.is_finite() && x > 0.0), "{key}: {v}");
        }
    }
}

#[test]
fn demo_on_cuda_trains() {
    let args = ["demo", "--backend", "cuda", "--steps", "3", "--tokens", "8", "--json", "--no-plot"];
    let why = |err: &str| assert!(err.contains("--backend cuda") && err.contains("no usable CUDA device"), "{err}");
    let Some(device) = device_or_check_error("demo_on_cuda_trains", &args, why) else { return };
    let v = svft_json(&args);
    assert_eq!((v["backend"].as_str(), v["device"].as_str()), (Some("cuda"), Some(device.as_str())), "{v}");
    assert_eq!(v["placement"], "layers on device, stack glue on host");
    for r in v["results"].as_array().unwrap() {
        assert!(r["losses"].as_array().unwrap().iter().all(|l| l.as_f64().is_some_and(f64::is_finite)), "{r}");
    }
    let table: Vec<&str> = args.iter().copied().filter(|&a| a != "--json").collect();
    let table = svft_ok(&table);
    assert_eq!(table.contains("virtual device: timings meaningless"), svft::cuda::is_virtual_name(&device), "{table}");
}

#[test]
fn bench_adapters_on_cuda_fills_every_row() {
    let args = [
        "bench",
        "--backend",
        "cuda",
        "--adapters",
        "1,3",
        "--adapter-shapes",
        "24x16,16x40",
        "--adapter-tokens",
        "9",
        "--dtype",
        "bf16",
        "--pattern",
        "random:2",
        "--seconds",
        "0.002",
        "--json",
    ];
    let Some(device) = device_or_check_error("bench_adapters_on_cuda_fills_every_row", &args, |_| ()) else { return };
    let out = svft_in(None, &args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    if svft::cuda::is_virtual_name(&device) {
        assert!(stderr.contains("never a speed"), "{stderr}");
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!((v["backend"].as_str(), v["dtype"].as_str()), (Some("cuda"), Some("bf16")), "{v}");
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 4, "2 shapes x 1 n x 2 counts: {v}");
    for r in rows {
        for key in ["bank_ms", "one_adapter_ms", "lora_ms", "dense_merged_ms"] {
            assert!(r[key].as_f64().is_some_and(|t| t > 0.0), "{key}: {r}");
        }
    }
    assert_eq!(rows[1]["adapters"], 3);
    // The device layout: plain M of r floats, a gate and a 4-int slot record per adapter; bf16
    // LoRA r=16 at 2 bytes per element.
    let b = &v["bytes_per_adapter"][0];
    assert_eq!(b["svft_plain"], 4 * (16 + 1 + 4), "{b}");
    assert_eq!(b["lora16"], 2 * 16 * (24 + 16), "{b}");
}
