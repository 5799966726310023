//! `svft bench`: one shape, every distinct adapted shape of a checkpoint, or a named grid
//! (`--grid`), on the CPU or a CUDA device.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use svft::bench::{run_cpu, run_cpu_grid, BenchCase, Grid, Row, LORA_RANK};
use svft::checkpoint::{target_regex, Checkpoint};
use svft::memory::mib;
use svft::plot::{log_log_plot_png, XySeries};
use svft::{Error, Result};

use super::{progress_bar, resolve_backend, BenchArgs, Device};

/// One case on the resolved device, as its row.
fn bench_one(device: &Device, case: &BenchCase, dtype: &str) -> Result<Row> {
    match device {
        Device::Cpu => run_cpu(case),
        Device::Cuda(gpu) => match dtype {
            "f32" => svft::bench::run_cuda::<f32>(gpu, case),
            "bf16" => svft::bench::run_cuda::<half::bf16>(gpu, case),
            "f16" => svft::bench::run_cuda::<half::f16>(gpu, case),
            _ => unreachable!("checked in run"),
        },
    }
}

fn f(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or(f64::NAN)
}

/// Bytes per activation element of a checked `--dtype`.
fn act_bytes(dtype: &str) -> usize {
    if dtype == "f32" {
        4
    } else {
        2
    }
}

/// `svft bench --grid NAME`: every row of the grid in this process, JSON lines as they come
/// or a table at the end, and the plot.
fn run_grid(a: &BenchArgs, device: &Device, name: &str) -> Result<()> {
    let grid = Grid::named(name)?;
    let budget = Duration::from_secs_f64(a.seconds);
    let pb = progress_bar(grid.len() as u64, &format!("grid {}", grid.name));
    let mut rows: Vec<Row> = Vec::new();
    let mut on_row = |row: Row| -> Result<()> {
        pb.set_message(format!("{}x{} n={} {}", row.d_out, row.d_in, row.tokens, row.pattern));
        pb.inc(1);
        if a.json {
            let mut v = row.to_json();
            v["grid"] = json!(grid.name);
            pb.suspend(|| println!("{v}"));
        }
        rows.push(row);
        Ok(())
    };
    match device {
        Device::Cpu => run_cpu_grid(&grid, budget, &mut on_row)?,
        Device::Cuda(gpu) => match a.dtype.as_str() {
            "f32" => svft::bench::run_cuda_grid::<f32>(gpu, &grid, budget, &mut on_row)?,
            "bf16" => svft::bench::run_cuda_grid::<half::bf16>(gpu, &grid, budget, &mut on_row)?,
            "f16" => svft::bench::run_cuda_grid::<half::f16>(gpu, &grid, budget, &mut on_row)?,
            _ => unreachable!("checked in run"),
        },
    }
    pb.finish_and_clear();
    if !a.json {
        print!("{}", grid_table(&grid, &rows));
    }
    if let Some(path) = &a.plot {
        for written in plot_grid(&grid, &rows, path)? {
            eprintln!("wrote {}", written.display());
        }
    }
    Ok(())
}

/// The grid's rows as a text table.
fn grid_table(grid: &Grid, rows: &[Row]) -> String {
    let Some(first) = rows.first() else { return String::new() };
    let mut out = format!(
        "svft bench --grid {} ({}: {}, {}): fwd+bwd ms (medians); SVFT on auto's plan (calibrated per layer)\n",
        grid.name, first.backend, first.device, first.dtype
    );
    out += &format!(
        "{:<12}{:>6} {:<18}{:<10}{:>10}{:>10}{:>10}{:>10}{:>10}{:>8}{:>8}{:>9}{:>8}{:>8}  {:<10}{:>10}{:>10}{:>10}\n",
        "shape",
        "n",
        "pattern",
        "plan",
        "SVFT",
        "floor",
        format!("LoRA{LORA_RANK}"),
        "official",
        "dense",
        "/floor",
        "/LoRA",
        "off/SVFT",
        "/dense",
        "flops",
        "best plan",
        "best",
        "SVFT MiB",
        "off MiB"
    );
    for r in rows {
        let (best, best_ms) = r.best_fixed_plan().map_or((String::new(), f64::NAN), |(p, ms)| (p.to_string(), ms));
        out += &format!(
            "{:<12}{:>6} {:<18}{:<10}{:>10.4}{:>10.4}{:>10.4}{:>10.4}{:>10.4}{:>8.2}{:>8.2}{:>9.2}{:>8.2}{:>8.2}  {:<10}{:>10.4}{:>10.1}{:>10.1}\n",
            format!("{}x{}", r.d_out, r.d_in),
            r.tokens,
            r.pattern.to_string(),
            r.plan.to_string(),
            r.svft_fwd_bwd_ms,
            r.gemm_floor_ms,
            r.lora_fwd_bwd_ms,
            r.official_fwd_bwd_ms,
            r.dense_fwd_bwd_ms,
            r.svft_fwd_bwd_ms / r.gemm_floor_ms,
            r.svft_fwd_bwd_ms / r.lora_fwd_bwd_ms,
            r.official_fwd_bwd_ms / r.svft_fwd_bwd_ms,
            r.svft_fwd_bwd_ms / r.dense_fwd_bwd_ms,
            r.plan_gemm_flops / r.dense_flops,
            best,
            best_ms,
            mib(r.memory.svft.total()),
            mib(r.memory.official.total()),
        );
    }
    out += "dense: the frozen dense layer (Y = X W^T, dX = G W); /dense: SVFT / dense time; \
            flops: SVFT's plan FLOPs / dense FLOPs, the /dense of equal speed\n";
    if let Some(note) = first.factors_note {
        out += &format!("factors: {note}\n");
    }
    out
}

/// The grid's memory table in markdown: MiB per layer and training step.
fn memory_table(grid: &Grid, dtype: &str) -> Result<String> {
    let mut out = format!(
        "| d_out x d_in | n | pattern | SVFT plan | SVFT persistent | SVFT workspace | SVFT saved | SVFT total | \
         official total | LoRA r={LORA_RANK} total | SVFT / official | SVFT / LoRA |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n"
    );
    for (pattern, m) in grid.memory_reports(act_bytes(dtype))? {
        let s = m.shape;
        out += &format!(
            "| {}x{} | {} | {pattern} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.3} | {:.2} |\n",
            s.d_out,
            s.d_in,
            s.n,
            m.plan,
            mib(m.svft.persistent),
            mib(m.svft.workspace),
            mib(m.svft.saved),
            mib(m.svft.total()),
            mib(m.official.total()),
            mib(m.lora.total()),
            m.svft_to_official(),
            m.svft_to_lora(),
        );
    }
    out += &format!("(MiB per layer and step, {dtype} activations; {})\n", svft::memory::COUNTS);
    Ok(out)
}

/// Where the plot of one shape goes: `path` itself for a one-shape grid, else
/// `<stem>-<d_out>x<d_in>.png` next to it.
fn plot_path(path: &Path, shapes: usize, (d_out, d_in): (usize, usize)) -> PathBuf {
    if shapes == 1 {
        return path.to_path_buf();
    }
    let stem = path.file_stem().map_or("svft-grid".into(), |s| s.to_string_lossy().into_owned());
    path.with_file_name(format!("{stem}-{d_out}x{d_in}.png"))
}

/// Time against n on log-log axes, one PNG per shape: SVFT's best fixed plan for each pattern,
/// LoRA r=16 and the official order (both from the first pattern's rows; LoRA does not depend
/// on the pattern, the official order hardly: it rebuilds a dense W either way).
fn plot_grid(grid: &Grid, rows: &[Row], path: &Path) -> Result<Vec<PathBuf>> {
    const COLORS: [[u8; 3]; 7] =
        [[200, 40, 40], [230, 130, 20], [150, 60, 170], [30, 150, 150], [40, 90, 210], [60, 60, 60], [140, 140, 140]];
    let mut written = Vec::new();
    for &shape in &grid.shapes {
        let of_shape: Vec<&Row> = rows.iter().filter(|r| (r.d_out, r.d_in) == shape).collect();
        let Some(first) = of_shape.first() else { continue };
        let mut curves: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
        for p in &grid.patterns {
            let pts = of_shape
                .iter()
                .filter(|r| r.pattern == *p)
                .filter_map(|r| r.best_fixed_plan().map(|b| (r.tokens as f64, b.1)))
                .collect();
            curves.push((format!("SVFT {p}"), pts));
        }
        let base: Vec<&&Row> = of_shape.iter().filter(|r| r.pattern == first.pattern).collect();
        curves
            .push((format!("LoRA r={LORA_RANK}"), base.iter().map(|r| (r.tokens as f64, r.lora_fwd_bwd_ms)).collect()));
        curves.push(("official order".into(), base.iter().map(|r| (r.tokens as f64, r.official_fwd_bwd_ms)).collect()));
        curves.push(("frozen dense".into(), base.iter().map(|r| (r.tokens as f64, r.dense_fwd_bwd_ms)).collect()));
        let series: Vec<XySeries<'_>> = curves
            .iter()
            .zip(COLORS.iter().cycle())
            .map(|((label, pts), &color)| XySeries { label, color, points: pts })
            .collect();
        let out = plot_path(path, grid.shapes.len(), shape);
        let title = format!("{}x{} {} {}: fwd+bwd ms vs tokens", shape.0, shape.1, first.dtype, first.backend);
        log_log_plot_png(&out, &title, "tokens per step (n)", "ms", &series)?;
        written.push(out);
    }
    Ok(written)
}

/// `svft bench --adapters N,...`: the adapter bank against one adapter, merged dense weights
/// and LoRA (see `svft::bench::adapters`), on the CPU in f32 or on CUDA in any dtype.
fn run_adapters(a: &BenchArgs, counts: &[usize]) -> Result<()> {
    let device = resolve_backend(a.backend)?;
    if matches!(device, Device::Cpu) && a.dtype != "f32" {
        return Err(Error::InvalidArgument(format!("--dtype {}: the CPU adapter bank runs in f32 only", a.dtype)));
    }
    let shapes = a
        .adapter_shapes
        .iter()
        .map(|s| {
            let dims = s.split_once('x').and_then(|(o, i)| Some((o.trim().parse().ok()?, i.trim().parse().ok()?)));
            dims.ok_or_else(|| Error::InvalidArgument(format!("--adapter-shapes `{s}`: expected D_OUTxD_IN")))
        })
        .collect::<Result<Vec<(usize, usize)>>>()?;
    let cfg = svft::bench::adapters::AdaptersConfig {
        shapes,
        tokens: a.adapter_tokens.clone(),
        counts: counts.to_vec(),
        pattern: a.pattern,
        budget: Duration::from_secs_f64(a.seconds),
        grouping: true,
    };
    let mut on_row = |row: &svft::bench::adapters::AdaptersRow| {
        eprintln!("{}x{} n={} N={}: bank {:.3} ms", row.d_out, row.d_in, row.n, row.adapters, row.bank_ms)
    };
    let report = match &device {
        Device::Cpu => svft::bench::adapters::run(&cfg, &mut on_row)?,
        Device::Cuda(gpu) => {
            if gpu.is_virtual() {
                eprintln!("svft bench on {}: virtual device: timings meaningless (never a speed)", gpu.name());
            }
            match a.dtype.as_str() {
                "f32" => svft::bench::run_adapters_cuda::<f32>(gpu, &cfg, &mut on_row)?,
                "bf16" => svft::bench::run_adapters_cuda::<half::bf16>(gpu, &cfg, &mut on_row)?,
                "f16" => svft::bench::run_adapters_cuda::<half::f16>(gpu, &cfg, &mut on_row)?,
                _ => unreachable!("checked in run"),
            }
        }
    };
    if a.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_table());
    }
    Ok(())
}

pub fn run(a: BenchArgs) -> Result<()> {
    if !(a.seconds.is_finite() && a.seconds > 0.0 && a.seconds <= 86_400.0) {
        return Err(Error::InvalidArgument(format!("--seconds {}: must be positive and at most a day", a.seconds)));
    }
    if a.d_out == 0 || a.d_in == 0 || a.tokens == 0 {
        return Err(Error::InvalidArgument("--d-out, --d-in and --tokens must be positive".into()));
    }
    if !["f32", "bf16", "f16"].contains(&a.dtype.as_str()) {
        return Err(Error::InvalidArgument(format!("--dtype `{}`: expected f32, bf16 or f16", a.dtype)));
    }
    if let (Some(name), true) = (&a.grid, a.memory) {
        // Arithmetic only: no device needed, any dtype.
        print!("{}", memory_table(&Grid::named(name)?, &a.dtype)?);
        return Ok(());
    }
    if let Some(counts) = &a.adapters {
        return run_adapters(&a, counts);
    }
    let device = resolve_backend(a.backend)?;
    if let Device::Cuda(gpu) = &device {
        if gpu.is_virtual() {
            eprintln!("svft bench on {}: virtual device: timings meaningless (never a speed)", gpu.name());
        }
    }
    if matches!(device, Device::Cpu) && a.dtype != "f32" {
        return Err(Error::InvalidArgument(format!("--dtype {}: the CPU bench runs in f32 only", a.dtype)));
    }
    if let Some(name) = &a.grid {
        return run_grid(&a, &device, name);
    }
    let device_name = match &device {
        Device::Cpu => svft::cpu::device_name(),
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
        let row = bench_one(&device, &case(a.d_out, a.d_in), &a.dtype)?;
        let v = row.to_json();
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
                ("frozen dense layer", "dense_fwd_bwd_ms"),
            ] {
                println!("{label:<28}{:>12.4} ms", f(&v, key));
            }
            let m = &row.memory;
            println!(
                "memory per step (MiB): SVFT {:.2}, official layer {:.2}, LoRA r={LORA_RANK} {:.2}; SVFT / official {:.3}",
                mib(m.svft.total()),
                mib(m.official.total()),
                mib(m.lora.total()),
                m.svft_to_official()
            );
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
        let mut v = bench_one(&device, &case(*d_out, *d_in), &a.dtype)?.to_json();
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
