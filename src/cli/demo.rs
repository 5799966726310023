//! `svft demo` (and a bare `svft`): SVFT and LoRA learn a hidden update; costs compared.
//! Trains on a CUDA device when one is usable (`--backend auto`), else on the CPU.

use std::sync::Arc;
use std::time::Instant;

use svft::checkpoint::{target_regex, Checkpoint};
use svft::cuda::{device_count, kernels_embedded, Gpu};
use svft::demo::{default_modules, plot_losses, run_on, DemoModule, DemoOptions};
use svft::svd::thin_svd;
use svft::{Error, Result};

use super::{progress_bar, Backend, DemoArgs};

fn model_modules(a: &DemoArgs) -> Result<(Vec<DemoModule>, String)> {
    let Some(path) = &a.model else {
        return Ok((default_modules()?, "the embedded default (2 blocks, d = 256, f = 1024)".into()));
    };
    let ckpt = Checkpoint::open(path)?;
    let re = target_regex(a.targets.as_deref())?;
    let targets = ckpt.targets(&re);
    if targets.is_empty() {
        return Err(Error::InvalidArgument(format!("no 2-D weight of {} matches --targets", path.display())));
    }
    let take: Vec<_> = targets.into_iter().take(a.layers.max(1)).collect();
    let pb = progress_bar(take.len() as u64, "decompose");
    let mut modules = Vec::new();
    for e in take {
        pb.set_message(e.name.clone());
        let (d_out, d_in) = e.dims2().expect("2-D");
        let w = ckpt.read_f32(&e.name)?;
        let dec = thin_svd(&w, d_out, d_in, None)?;
        modules.push(DemoModule::normalised(e.name.clone(), dec.factors));
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok((modules, path.display().to_string()))
}

/// Device 0 with the kernels loaded, or why not (no kernels in this build, no driver, no
/// device, or the device failed to open).
fn open_gpu() -> Result<Arc<Gpu>> {
    if !kernels_embedded() {
        return Err(Error::Cuda("this build has no CUDA kernels (nvcc was not found when it was built)".into()));
    }
    device_count()?;
    Gpu::new(0)
}

/// The reason in an error of [`open_gpu`], without the `CUDA: ` of its display.
fn reason(e: Error) -> String {
    match e {
        Error::Cuda(msg) => msg,
        other => other.to_string(),
    }
}

/// The GPU the demo trains on (`None`: the CPU), and for `auto` on the CPU the reason no GPU
/// was taken.
fn pick_device(backend: Backend) -> Result<(Option<Arc<Gpu>>, Option<String>)> {
    match backend {
        Backend::Cpu => Ok((None, None)),
        Backend::Cuda => match open_gpu() {
            Ok(gpu) => Ok((Some(gpu), None)),
            Err(e) => Err(Error::Cuda(format!(
                "svft demo --backend cuda found no usable CUDA device: {}; use --backend cpu or auto",
                reason(e)
            ))),
        },
        Backend::Auto => Ok(match open_gpu() {
            Ok(gpu) => (Some(gpu), None),
            Err(e) => (None, Some(reason(e))),
        }),
    }
}

pub fn run(a: DemoArgs) -> Result<()> {
    let (gpu, why_cpu) = pick_device(a.backend)?;
    let backend = match &gpu {
        Some(gpu) => format!("cuda ({}; layers on device, stack glue on host)", gpu.name()),
        None => match why_cpu {
            Some(why) => format!("cpu (no GPU taken: {why})"),
            None => "cpu".to_string(),
        },
    };
    let t0 = Instant::now();
    let (modules, source) = model_modules(&a)?;
    let options = DemoOptions {
        steps: a.steps,
        tokens: a.tokens,
        batches: a.batches,
        banded: a.banded,
        lora_rank: a.lora_rank,
        svft_lr: a.lr,
        lora_lr: a.lora_lr,
        seed: a.seed,
    };
    if !a.json {
        eprintln!(
            "svft demo on {backend}: training SVFT plain, SVFT banded:{} and LoRA for {} steps each ...",
            a.banded, a.steps
        );
    }
    let mut bar: Option<(String, indicatif::ProgressBar)> = None;
    let mut progress = |method: &str, step: usize, loss: f64| {
        if bar.as_ref().is_none_or(|(m, _)| m != method) {
            if let Some((_, pb)) = bar.take() {
                pb.finish();
            }
            bar = Some((method.to_string(), progress_bar(a.steps as u64, &format!("{method:<15}"))));
        }
        let pb = &bar.as_ref().expect("set above").1;
        pb.set_position(step as u64 + 1);
        if step % 10 == 0 {
            pb.set_message(format!("loss {loss:.3e}"));
        }
    };
    let report = run_on(gpu.as_ref(), &modules, &source, &options, &mut progress)?;
    if let Some((_, pb)) = bar.take() {
        pb.finish();
    }
    if a.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_table());
    }
    if !a.no_plot {
        plot_losses(&report, &a.plot)?;
        if !a.json {
            println!("loss plot: {}", a.plot.display());
        }
    }
    if !a.json {
        println!("total {:.1} s", t0.elapsed().as_secs_f64());
    }
    Ok(())
}
