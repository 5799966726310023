//! `svft bench`: one shape, or every distinct adapted shape of a checkpoint.

use std::time::Duration;

use serde_json::{json, Value};

use svft::bench::{cpu_name, run_cpu, BenchCase, LORA_RANK};
use svft::checkpoint::{target_regex, Checkpoint};
use svft::{Error, Result};

use super::{progress_bar, resolve_backend, BenchArgs};

pub fn run(a: BenchArgs) -> Result<()> {
    resolve_backend(a.backend)?;
    if !(a.seconds.is_finite() && a.seconds > 0.0) {
        return Err(Error::InvalidArgument("--seconds must be positive".into()));
    }
    if a.d_out == 0 || a.d_in == 0 || a.tokens == 0 {
        return Err(Error::InvalidArgument("--d-out, --d-in and --tokens must be positive".into()));
    }
    let case = |d_out, d_in| BenchCase {
        d_out,
        d_in,
        tokens: a.tokens,
        pattern: a.pattern,
        plan: a.plan,
        budget: Duration::from_secs_f64(a.seconds),
    };
    let Some(model) = &a.model else {
        let report = run_cpu(&case(a.d_out, a.d_in))?;
        if a.json {
            println!("{}", report.to_json());
        } else {
            print!("{}", report.to_table());
        }
        return Ok(());
    };

    let ckpt = Checkpoint::open(model)?;
    let re = target_regex(a.targets.as_deref())?;
    // Distinct (d_out, d_in) in first-seen order, with how many modules have each.
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
    let mut reports = Vec::new();
    for ((d_out, d_in), names) in &shapes {
        pb.set_message(format!("{d_out}x{d_in}"));
        reports.push((run_cpu(&case(*d_out, *d_in))?, names.len()));
        pb.inc(1);
    }
    pb.finish_and_clear();
    let total =
        |f: &dyn Fn(&svft::bench::BenchReport) -> f64| -> f64 { reports.iter().map(|(r, k)| f(r) * *k as f64).sum() };
    let (svft_ms, lora_ms, official_ms) =
        (total(&|r| r.svft_fwd_bwd_ms), total(&|r| r.lora_fwd_bwd_ms), total(&|r| r.official_fwd_bwd_ms));
    let params: usize = reports.iter().map(|(r, k)| r.trainable_params * k).sum();
    let lora_params: usize = reports.iter().map(|(r, k)| r.lora_params * k).sum();
    if a.json {
        let cases: Vec<Value> = reports
            .iter()
            .zip(&shapes)
            .map(|((r, k), (_, names))| {
                let mut v = r.to_json();
                v["modules"] = json!(k);
                v["example"] = json!(names[0]);
                v
            })
            .collect();
        let v = json!({
            "backend": "cpu", "device": cpu_name(), "model": model.display().to_string(),
            "tokens": a.tokens, "pattern": a.pattern.to_string(), "modules": reports.iter().map(|r| r.1).sum::<usize>(),
            "cases": cases,
            "total": {
                "svft_fwd_bwd_ms": svft_ms, "lora_fwd_bwd_ms": lora_ms, "official_fwd_bwd_ms": official_ms,
                "trainable_params": params, "lora_params": lora_params,
            },
        });
        println!("{v}");
        return Ok(());
    }
    println!(
        "svft bench (cpu: {}), {}: {} adapted modules in {} shapes, {} tokens, {}, plan {}",
        cpu_name(),
        model.display(),
        reports.iter().map(|r| r.1).sum::<usize>(),
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
    for (r, k) in &reports {
        println!(
            "{:<12}{:>8}{:>10}{:>10}{:>11.3}{:>11.3}{:>12.3}{:>13.3}{:>11.2}{:>15.2}",
            format!("{}x{}", r.case.d_out, r.case.d_in),
            k,
            r.plan.to_string(),
            r.trainable_params,
            r.svft_fwd_bwd_ms,
            r.gemm_floor_ms,
            r.lora_fwd_bwd_ms,
            r.official_fwd_bwd_ms,
            r.svft_fwd_bwd_ms / r.lora_fwd_bwd_ms,
            r.official_fwd_bwd_ms / r.svft_fwd_bwd_ms
        );
    }
    println!(
        "all modules, fwd+bwd per step: SVFT {svft_ms:.2} ms ({params} params), LoRA r={LORA_RANK} {lora_ms:.2} ms \
         ({lora_params} params), official order {official_ms:.2} ms"
    );
    Ok(())
}
