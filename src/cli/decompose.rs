//! `svft decompose`: thin SVD of every targeted weight of a checkpoint into a factor file.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::json;

use svft::adapter::{save_factors, DecomposedModule};
use svft::checkpoint::{dtype_name, round_through, target_regex, Checkpoint, Dtype};
use svft::svd::thin_svd;
use svft::{Error, Result};

use super::{progress_bar, resolve_backend, DecomposeArgs, Device, FactorDtype};

/// `<dir>/<name>.svft-factors.safetensors` for a model path.
pub fn default_output(model: &Path) -> PathBuf {
    let name = model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    let stem = name.strip_suffix(".index.json").unwrap_or(&name);
    let stem = stem.strip_suffix(".safetensors").unwrap_or(stem);
    let dir = if model.is_dir() { model } else { model.parent().unwrap_or_else(|| Path::new(".")) };
    let stem = if model.is_dir() { "model" } else { stem };
    dir.join(format!("{stem}.svft-factors.safetensors"))
}

/// The largest finite value of a factor storage dtype.
fn dtype_max(dtype: Dtype) -> f64 {
    match dtype {
        Dtype::F16 => half::f16::MAX.to_f64(),
        Dtype::BF16 => half::bf16::MAX.to_f64(),
        _ => f32::MAX as f64,
    }
}

pub fn run(a: DecomposeArgs) -> Result<()> {
    // `residual > NaN` is false: a NaN (or negative, or infinite) bound would switch the check
    // off, or fail every module, silently.
    if !a.max_residual.is_finite() || a.max_residual < 0.0 {
        return Err(Error::InvalidArgument(format!(
            "--max-residual must be a finite number >= 0, got {}",
            a.max_residual
        )));
    }
    let device = resolve_backend(a.backend)?;
    let backend = device.name();
    let stream = match &device {
        Device::Cpu => None,
        Device::Cuda(gpu) => {
            Some(gpu.context().new_stream().map_err(|e| Error::Cuda(format!("creating a stream: {e:?}")))?)
        }
    };
    let ckpt = Checkpoint::open(&a.model)?;
    let re = target_regex(a.targets.as_deref())?;
    let targets = ckpt.targets(&re);
    if targets.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "no 2-D f32/bf16/f16 weight of {} matches --targets `{}`",
            a.model.display(),
            re.as_str()
        )));
    }
    let storage = match a.dtype {
        FactorDtype::F32 => Dtype::F32,
        FactorDtype::Model => targets[0].dtype,
    };
    if targets.iter().any(|e| a.dtype == FactorDtype::Model && e.dtype != storage) {
        return Err(Error::InvalidArgument("--dtype model needs every targeted weight in one dtype".into()));
    }
    let output = a.output.clone().unwrap_or_else(|| default_output(&a.model));
    let inputs: Vec<_> = ckpt.files().into_iter().map(|f| ("model", f)).collect();
    svft::checkpoint::check_not_an_input(&output, &inputs)?;
    let pb = progress_bar(targets.len() as u64, "decompose");
    let mut modules = Vec::with_capacity(targets.len());
    let mut rows = Vec::with_capacity(targets.len());
    let t_all = Instant::now();
    for e in &targets {
        pb.set_message(e.name.clone());
        let (d_out, d_in) = e.dims2().expect("targets are 2-D");
        let w = ckpt.read_f32(&e.name)?;
        let t0 = Instant::now();
        let dec = match &stream {
            None => thin_svd(&w, d_out, d_in, a.rank),
            Some(stream) => svft::cuda::thin_svd_cuda(stream, &w, d_out, d_in, a.rank),
        }
        .map_err(|err| Error::InvalidArgument(format!("{}: {err}", e.name)))?;
        // thin_svd has checked the factors against their spectrum (finite, and the residual the
        // truncation predicts); --max-residual is the user's own, usually stricter, bound on
        // the full-rank SVD's residual (in f32, before any rounding to the storage dtype).
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        if a.rank.is_none() && (dec.residual.is_nan() || dec.residual > a.max_residual) {
            pb.finish_and_clear();
            return Err(Error::Svd(format!(
                "{}: relative reconstruction residual {:.3e} exceeds --max-residual {:.1e}",
                e.name, dec.residual, a.max_residual
            )));
        }
        let mut factors = dec.factors;
        let residual = if storage == Dtype::F32 {
            dec.residual
        } else {
            let largest = factors.s[0];
            round_through(storage, &mut factors.u);
            round_through(storage, &mut factors.s);
            round_through(storage, &mut factors.v);
            // Singular values beyond the dtype's range round to inf: never store those.
            if factors.u.iter().chain(&factors.s).chain(&factors.v).any(|x| !x.is_finite()) {
                pb.finish_and_clear();
                return Err(Error::InvalidArgument(format!(
                    "{}: the factors do not fit {}: the largest singular value {largest:.4e} exceeds its maximum \
                     {:.4e} (use --dtype f32)",
                    e.name,
                    dtype_name(storage),
                    dtype_max(storage)
                )));
            }
            let rounded = factors.residual(&w)?;
            if !rounded.is_finite() {
                pb.finish_and_clear();
                return Err(Error::Svd(format!(
                    "{}: non-finite reconstruction residual ({rounded}) of the factors rounded to {} (use --dtype f32)",
                    e.name,
                    dtype_name(storage)
                )));
            }
            rounded
        };
        rows.push(json!({
            "name": e.name, "d_out": d_out, "d_in": d_in, "rank": factors.r, "dtype": dtype_name(e.dtype),
            "ms": ms, "residual": residual,
        }));
        modules.push(DecomposedModule { weight: e.name.clone(), dtype: e.dtype, factors, residual });
        pb.inc(1);
    }
    pb.finish_and_clear();
    save_factors(&output, &a.model.display().to_string(), storage, &modules)?;
    let total_s = t_all.elapsed().as_secs_f64();
    let max_residual = modules.iter().map(|m| m.residual).fold(0.0f64, f64::max);
    if a.json {
        let v = json!({
            "backend": backend, "model": a.model.display().to_string(), "output": output.display().to_string(),
            "storage_dtype": dtype_name(storage), "seconds": total_s, "max_residual": max_residual, "modules": rows,
        });
        println!("{v}");
        return Ok(());
    }
    println!(
        "svft decompose ({backend}): {} modules of {} ({} shard{})",
        rows.len(),
        a.model.display(),
        ckpt.shard_count(),
        if ckpt.shard_count() == 1 { "" } else { "s" }
    );
    let width = rows.iter().map(|r| r["name"].as_str().unwrap_or("").len()).max().unwrap_or(6).max(6);
    println!("{:<width$}  {:>12}  {:>6}  {:>5}  {:>9}  {:>10}", "module", "shape", "rank", "dtype", "ms", "residual");
    for r in &rows {
        println!(
            "{:<width$}  {:>12}  {:>6}  {:>5}  {:>9.1}  {:>10.2e}",
            r["name"].as_str().unwrap_or(""),
            format!("{}x{}", r["d_out"], r["d_in"]),
            r["rank"],
            r["dtype"].as_str().unwrap_or(""),
            r["ms"].as_f64().unwrap_or(0.0),
            r["residual"].as_f64().unwrap_or(0.0),
        );
    }
    println!(
        "wrote {} ({} factors), {total_s:.1} s in all, largest residual {max_residual:.2e}",
        output.display(),
        dtype_name(storage)
    );
    Ok(())
}
