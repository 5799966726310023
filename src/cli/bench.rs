//! `svft bench`: one shape, or every distinct adapted shape of a checkpoint, on the CPU or a
//! CUDA device.

use std::time::Duration;

use serde_json::{json, Value};

use svft::bench::{cpu_name, run_cpu, BenchCase, LORA_RANK};
use svft::checkpoint::{target_regex, Checkpoint};
use svft::{Error, Result};

use super::{progress_bar, resolve_backend, BenchArgs, Device};

/// One case on the resolved device, as the JSON report.
fn bench_one(device: &Device, case: &BenchCase, dtype: &str) -> Result<Value> {
    match device {
        Device::Cpu => Ok(run_cpu(case)?.to_json()),
        Device::Cuda(gpu) => match dtype {
            "f32" => svft::cuda::run_cuda::<f32>(gpu, case, dtype),
            "bf16" => svft::cuda::run_cuda::<half::bf16>(gpu, case, dtype),
            "f16" => svft::cuda::run_cuda::<half::f16>(gpu, case, dtype),
            _ => unreachable!("checked in run"),
        },
    }
}

fn f(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or(f64::NAN)
}

pub fn run(a: BenchArgs) -> Result<()> {
    if !(a.seconds.is_finite() && a.seconds > 0.0) {
        return Err(Error::InvalidArgument("--seconds must be positive".into()));
    }
    if a.d_out == 0 || a.d_in == 0 || a.tokens == 0 {
        return Err(Error::InvalidArgument("--d-out, --d-in and --tokens must be positive".into()));
    }
    if !["f32", "bf16", "f16"].contains(&a.dtype.as_str()) {
        return Err(Error::InvalidArgument(format!("--dtype `{}`: expected f32, bf16 or f16", a.dtype)));
    }
    let device = resolve_backend(a.backend)?;
    if matches!(device, Device::Cpu) && a.dtype != "f32" {
        return Err(Error::InvalidArgument(format!("--dtype {}: the CPU bench runs in f32 only", a.dtype)));
    }
    let device_name = match &device {
        Device::Cpu => cpu_name(),
        Device::Cuda(gpu) => gpu.name().to_string(),
    };
    let case = |d_out, d_in| BenchCase {
        d_out,
        d_in,
        tokens: a.tokens,
        pattern: a.pattern,
        plan: a.plan,
        budget: Duration::from_secs_f64(a.seconds),
    };
    let Some(model) = &a.model else {
        if let (Device::Cpu, false) = (&device, a.json) {
            print!("{}", run_cpu(&case(a.d_out, a.d_in))?.to_table());
            return Ok(());
        }
        let v = bench_one(&device, &case(a.d_out, a.d_in), &a.dtype)?;
        if a.json {
            println!("{v}");
        } else {
            println!(
                "svft bench ({}: {device_name}), {}x{} weight, {} tokens, {}, {}, plan {}",
                device.name(),
                a.d_out,
                a.d_in,
                a.tokens,
                a.pattern,
                a.dtype,
                v["plan"].as_str().unwrap_or("")
            );
            for (label, key) in [
                ("SVFT", "svft_fwd_bwd_ms"),
                ("dense products alone", "gemm_floor_ms"),
                ("LoRA r=16", "lora_fwd_bwd_ms"),
                ("official layer order", "official_fwd_bwd_ms"),
            ] {
                println!("{label:<28}{:>12.4} ms", f(&v, key));
            }
        }
        return Ok(());
    };

    let ckpt = Checkpoint::open(model)?;
    let re = target_regex(a.targets.as_deref())?;
    // Distinct (d_out, d_in) in first-seen order, with the modules of each.
    let mut shapes: Vec<((usize, usize), Vec<String>)> = Vec::new();
    for e in ckpt.targets(&re) {
        let dims = e.dims2().expect("2-D");
        match shapes.iter_mut().find(|s| s.0 == dims) {
            Some(s) => s.1.push(e.name.clone()),
            None => shapes.push((dims, vec![e.name.clone()])),
        }
    }
    if shapes.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "no 2-D weight of {} matches --targets `{}`",
            model.display(),
            re.as_str()
        )));
    }
    let pb = progress_bar(shapes.len() as u64, "bench");
    let mut cases = Vec::new();
    for ((d_out, d_in), names) in &shapes {
        pb.set_message(format!("{d_out}x{d_in}"));
        let mut v = bench_one(&device, &case(*d_out, *d_in), &a.dtype)?;
        v["modules"] = json!(names.len());
        v["example"] = json!(names[0]);
        cases.push(v);
        pb.inc(1);
    }
    pb.finish_and_clear();
    let total = |key: &str| -> f64 { cases.iter().map(|c| f(c, key) * f(c, "modules")).sum() };
    let (svft_ms, lora_ms, official_ms) =
        (total("svft_fwd_bwd_ms"), total("lora_fwd_bwd_ms"), total("official_fwd_bwd_ms"));
    let count = |key: &str| -> u64 {
        cases.iter().map(|c| c[key].as_u64().unwrap_or(0) * c["modules"].as_u64().unwrap_or(0)).sum()
    };
    let (params, lora_params) = (count("trainable_params"), count("lora_params"));
    let modules: usize = shapes.iter().map(|s| s.1.len()).sum();
    if a.json {
        let v = json!({
            "backend": device.name(), "device": device_name, "model": model.display().to_string(),
            "tokens": a.tokens, "pattern": a.pattern.to_string(), "modules": modules, "cases": cases,
            "total": {
                "svft_fwd_bwd_ms": svft_ms, "lora_fwd_bwd_ms": lora_ms, "official_fwd_bwd_ms": official_ms,
                "trainable_params": params, "lora_params": lora_params,
            },
        });
        println!("{v}");
        return Ok(());
    }
    println!(
        "svft bench ({}: {device_name}), {}: {modules} adapted modules in {} shapes, {} tokens, {}, plan {}",
        device.name(),
        model.display(),
        shapes.len(),
        a.tokens,
        a.pattern,
        a.plan
    );
    println!(
        "{:<12}{:>8}{:>10}{:>10}{:>11}{:>11}{:>12}{:>13}{:>11}{:>15}",
        "shape",
        "modules",
        "plan",
        "params",
        "SVFT ms",
        "floor ms",
        format!("LoRA{LORA_RANK} ms"),
        "official ms",
        "SVFT/LoRA",
        "official/SVFT"
    );
    for c in &cases {
        println!(
            "{:<12}{:>8}{:>10}{:>10}{:>11.3}{:>11.3}{:>12.3}{:>13.3}{:>11.2}{:>15.2}",
            format!("{}x{}", c["d_out"], c["d_in"]),
            c["modules"],
            c["plan"].as_str().unwrap_or(""),
            c["trainable_params"],
            f(c, "svft_fwd_bwd_ms"),
            f(c, "gemm_floor_ms"),
            f(c, "lora_fwd_bwd_ms"),
            f(c, "official_fwd_bwd_ms"),
            f(c, "svft_fwd_bwd_ms") / f(c, "lora_fwd_bwd_ms"),
            f(c, "official_fwd_bwd_ms") / f(c, "svft_fwd_bwd_ms")
        );
    }
    println!(
        "all modules, fwd+bwd per step: SVFT {svft_ms:.2} ms ({params} params), LoRA r={LORA_RANK} {lora_ms:.2} ms \
         ({lora_params} params), official order {official_ms:.2} ms"
    );
    Ok(())
}
