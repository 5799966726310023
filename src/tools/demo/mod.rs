//! The training demo behind a bare `svft`: SVFT (plain and banded) and LoRA learn the same
//! hidden update of a transformer-shaped stack of layers, and the run ends with what each cost.
//!
//! **The stack.** Modules (linear weights) are arranged on a residual stream of width `d`: a
//! `d x d` module is a residual branch `h <- h + a W h`, and a `d -> f` module followed by an
//! `f -> d` one is an MLP branch `h <- h + a W_down tanh(W_up h)`, with `a = 1/sqrt(branches)`.
//! The modules come from a real checkpoint (`--model`: its first targeted modules, decomposed)
//! or an embedded default shaped like a small transformer (2 blocks of q, k, v, o, up, down at
//! d = 256, f = 1024, random singular vectors with a decaying spectrum). Every module's spectrum
//! is normalised to `s_0 = 1` so the residual stream stays well scaled.
//!
//! **The task.** A teacher is the same stack with each weight replaced by
//! `W0 + U D V^T`, where the hidden `r x r` update `D` in the module's singular basis is a mix
//! of a diagonal part (rescaled singular values), a band of half-width 2 and a rank-2 part.
//! The students see only `(X, teacher(X))` pairs: Gaussian inputs, MSE loss.
//!
//! **The students.** SVFT with a plain and a banded pattern (Zero init, gate off, so step 0 is
//! W0 exactly), trained with Adam on M through [`crate::cpu::CpuLayer::backward_into`]; LoRA (A Gaussian,
//! B = 0) at the rank whose trainable parameter count is closest to banded SVFT's, trained with
//! Adam on A and B. Same data, steps, schedule (cosine decay) and stack for all.
//!
//! **The backend.** [`run_on`] trains the students on the CPU (`CpuLayer`, the faer LoRA of
//! [`crate::tools::baseline`]) or on a CUDA device (`CudaLayer<f32>`, LoRA through cuBLAS; see
//! src/tools/demo/cuda.rs). On CUDA the layers run on the device and the stack's glue (tanh, residual
//! adds, loss) and Adam stay on the host, each layer staging its input and output through host
//! memory once per call; device buffers are allocated on the first step and reused. The teacher, the data and the initial weights come from the same
//! seeded code on both backends, so a CPU and a CUDA run of one seed see the same batches and
//! start from the same weights, and their losses agree to f32 rounding.
//!
//! The decomposition favours SVFT by construction (the update lives in the singular basis, and
//! mostly near its diagonal): the demo shows the method working and what it costs, it is not
//! a benchmark of which method generalises better.

mod cuda;
mod stack;

use stack::{mse, Dense, LoraStudent, Net, StackLayer, SvftStudent};

use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value};

use crate::cpu::gemm::{gemm, Operand as Op};
use crate::cuda::Gpu;
use crate::error::{Error, Result};

use crate::layer::pattern::{band_size, Pattern};
use crate::layer::svd::{random_factors, Factors};
use crate::rng::Rng;

/// One module of the demo stack: its name and (normalised) frozen factors.
#[derive(Debug, Clone)]
pub struct DemoModule {
    /// Name (the checkpoint's weight name, or a default-model name).
    pub name: String,
    /// Factors with the spectrum scaled so that `s_0 = 1`.
    pub factors: Factors,
}

impl DemoModule {
    /// Wraps factors, scaling the spectrum to `s_0 = 1`.
    pub fn normalised(name: impl Into<String>, mut factors: Factors) -> Self {
        let s0 = factors.s.first().copied().unwrap_or(1.0);
        if s0 > 0.0 {
            factors.s.iter_mut().for_each(|s| *s /= s0);
        }
        DemoModule { name: name.into(), factors }
    }
}

/// The embedded default: 2 transformer blocks (q, k, v, o: 256 x 256; up: 1024 x 256;
/// down: 256 x 1024), random orthonormal singular vectors, a decaying spectrum.
pub fn default_modules() -> Result<Vec<DemoModule>> {
    let (d, f) = (256, 1024);
    let mut out = Vec::new();
    for block in 0..2 {
        for (i, (name, d_out, d_in)) in [
            ("attn.q_proj", d, d),
            ("attn.k_proj", d, d),
            ("attn.v_proj", d, d),
            ("attn.o_proj", d, d),
            ("mlp.up_proj", f, d),
            ("mlp.down_proj", d, f),
        ]
        .into_iter()
        .enumerate()
        {
            let factors = random_factors(d_out, d_in, d_out.min(d_in), 1000 + 10 * block as u64 + i as u64)?;
            out.push(DemoModule::normalised(format!("layers.{block}.{name}.weight"), factors));
        }
    }
    Ok(out)
}

/// One branch of the residual stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Branch {
    /// `h <- h + a W h` with a `d x d` module.
    Linear(usize),
    /// `h <- h + a W_down tanh(W_up h)`.
    Mlp {
        /// The `d -> f` module.
        up: usize,
        /// The `f -> d` module.
        down: usize,
    },
}

/// Arranges modules `(d_out, d_in)` into branches on a residual stream: its width `d` (the most
/// common input width) and the branches, in module order. Modules that fit no branch are left
/// out (e.g. grouped-query k/v projections narrower than the stream).
pub fn plan_stack(shapes: &[(usize, usize)]) -> (usize, Vec<Branch>) {
    let mut counts: Vec<(usize, usize)> = Vec::new();
    for &(_, d_in) in shapes {
        match counts.iter_mut().find(|c| c.0 == d_in) {
            Some(c) => c.1 += 1,
            None => counts.push((d_in, 1)),
        }
    }
    let d = counts.iter().max_by_key(|c| c.1).map_or(0, |c| c.0);
    let mut used = vec![false; shapes.len()];
    let mut branches = Vec::new();
    for i in 0..shapes.len() {
        let (d_out, d_in) = shapes[i];
        if used[i] || d_in != d {
            continue;
        }
        if d_out == d {
            used[i] = true;
            branches.push(Branch::Linear(i));
        } else if let Some(j) = (i + 1..shapes.len()).find(|&j| !used[j] && shapes[j] == (d, d_out)) {
            used[i] = true;
            used[j] = true;
            branches.push(Branch::Mlp { up: i, down: j });
        }
    }
    (d, branches)
}

/// Settings of a demo run.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Training steps per method.
    pub steps: usize,
    /// Tokens per step.
    pub tokens: usize,
    /// Distinct training batches, cycled; 0 draws a fresh batch for every step (the default, so
    /// that no method can overfit a small data set).
    pub batches: usize,
    /// Half-width of the banded SVFT pattern.
    pub banded: usize,
    /// LoRA rank; `None` matches banded SVFT's parameter count.
    pub lora_rank: Option<usize>,
    /// Adam learning rate for SVFT's M.
    pub svft_lr: f32,
    /// Adam learning rate for LoRA's A and B.
    pub lora_lr: f32,
    /// Seed of the data and the hidden update.
    pub seed: u64,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            steps: 300,
            tokens: 128,
            batches: 0,
            banded: 2,
            lora_rank: None,
            svft_lr: 2e-2,
            lora_lr: 1e-2,
            seed: 0,
        }
    }
}

/// What one method achieved and cost.
#[derive(Debug, Clone)]
pub struct MethodResult {
    /// Display name, e.g. `SVFT banded:2`.
    pub name: String,
    /// Trainable parameters over the stack.
    pub trainable_params: usize,
    /// Held-out MSE before training.
    pub initial_loss: f64,
    /// Held-out MSE after training.
    pub final_loss: f64,
    /// Training MSE per step.
    pub losses: Vec<f64>,
    /// Mean wall time of one step (forward, backward, update), milliseconds.
    pub ms_per_step: f64,
    /// Frozen weights (SVFT: U, s, V; LoRA: W0), f32 bytes; on CUDA the layers' persistent
    /// device bytes less the trainable parameters (so SVFT's pattern indices count too).
    pub frozen_bytes: usize,
    /// Trainable parameters, their gradients and Adam's two moments, bytes.
    pub train_state_bytes: usize,
    /// Activations the layers save for backward, bytes; on CUDA every other device buffer the
    /// layers hold (workspace with the saved activations, staging buffers, gradients).
    pub saved_activation_bytes: usize,
}

impl MethodResult {
    /// Frozen + training state + saved activations.
    pub fn memory_bytes(&self) -> usize {
        self.frozen_bytes + self.train_state_bytes + self.saved_activation_bytes
    }
}

/// The whole run.
#[derive(Debug, Clone)]
pub struct DemoReport {
    /// Backend the students ran on: `cpu` or `cuda`.
    pub backend: String,
    /// Where each part of a step runs, when not all on one backend (CUDA: the layers on the
    /// device, the stack's glue and Adam on the host).
    pub placement: Option<String>,
    /// Device description (the CPU model, or the GPU's name).
    pub device: String,
    /// Where the modules came from.
    pub source: String,
    /// Modules in the stack: name, d_out, d_in.
    pub modules: Vec<(String, usize, usize)>,
    /// Residual stream width.
    pub width: usize,
    /// Settings.
    pub options: DemoOptions,
    /// LoRA rank used.
    pub lora_rank: usize,
    /// Per method.
    pub results: Vec<MethodResult>,
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

impl DemoReport {
    /// The closing table.
    pub fn to_table(&self) -> String {
        let backend = match &self.placement {
            Some(p) => format!("{}, {p}", self.backend),
            None => self.backend.clone(),
        };
        let mut s = format!(
            "svft demo ({}: {}), {} modules from {}, residual width {}, {} tokens/step, {} steps\n\
             teacher: W0 + a hidden update in each module's singular basis (diagonal + band:2 + rank 2)\n\n",
            backend,
            self.device,
            self.modules.len(),
            self.source,
            self.width,
            self.options.tokens,
            self.options.steps
        );
        s += &format!(
            "{:<18}{:>12}{:>14}{:>14}{:>10}{:>12}{:>12}\n",
            "method", "trainable", "loss start", "loss final", "final/0", "ms/step", "memory MiB"
        );
        for r in &self.results {
            s += &format!(
                "{:<18}{:>12}{:>14.4e}{:>14.4e}{:>10.4}{:>12.2}{:>12.2}\n",
                r.name,
                r.trainable_params,
                r.initial_loss,
                r.final_loss,
                r.final_loss / r.initial_loss,
                r.ms_per_step,
                mib(r.memory_bytes())
            );
        }
        s += if self.backend == "cuda" {
            "memory = frozen device bytes (SVFT: U, s, V and the pattern's indices; LoRA: W0) + params, grads and \
             Adam state + device workspace and staging buffers, f32\n"
        } else {
            "memory = frozen weights (SVFT: U, s, V; LoRA: W0) + params, grads and Adam state + saved activations, f32\n"
        };
        if crate::cuda::is_virtual_name(&self.device) {
            s += "virtual device: timings meaningless (ms/step is CPU threads behind the CUDA API, never a speed)\n";
        }
        s
    }

    /// The report as one JSON object (loss curves included).
    pub fn to_json(&self) -> Value {
        json!({
            "backend": self.backend,
            "placement": self.placement,
            "device": self.device,
            "source": self.source,
            "width": self.width,
            "tokens": self.options.tokens,
            "steps": self.options.steps,
            "lora_rank": self.lora_rank,
            "modules": self.modules.iter().map(|(n, o, i)| json!({"name": n, "d_out": o, "d_in": i})).collect::<Vec<_>>(),
            "results": self.results.iter().map(|r| json!({
                "method": r.name,
                "trainable_params": r.trainable_params,
                "initial_loss": r.initial_loss,
                "final_loss": r.final_loss,
                "ms_per_step": r.ms_per_step,
                "frozen_bytes": r.frozen_bytes,
                "train_state_bytes": r.train_state_bytes,
                "saved_activation_bytes": r.saved_activation_bytes,
                "memory_bytes": r.memory_bytes(),
                "losses": r.losses,
            })).collect::<Vec<_>>(),
        })
    }
}

/// The dense `U (diag(s) + D) V^T`, row-major `d_out x d_in`, with `D` dense `r x r`.
fn dense_with_core(f: &Factors, delta: &[f32]) -> Vec<f32> {
    let r = f.r;
    let mut c = delta.to_vec();
    for i in 0..r {
        c[i * r + i] += f.s[i];
    }
    let mut uc = vec![0.0f32; f.d_out * r];
    gemm(&mut uc, Op::n(&f.u, f.d_out, r), Op::n(&c, r, r), false);
    let mut w = vec![0.0f32; f.d_out * f.d_in];
    gemm(&mut w, Op::n(&uc, f.d_out, r), Op::t(&f.v, f.d_in, r), false);
    w
}

/// The hidden update of one module in its singular basis: diagonal (each singular value
/// rescaled by up to about +-25%), a band of half-width 2, and a rank-2 part.
fn hidden_update(f: &Factors, rng: &mut Rng) -> Vec<f32> {
    let r = f.r;
    let mut dlt = vec![0.0f32; r * r];
    for i in 0..r {
        dlt[i * r + i] = 0.25 * f.s[i] * rng.normal() as f32;
        for j in i.saturating_sub(2)..(i + 3).min(r) {
            if j != i {
                dlt[i * r + j] = 0.08 * (f.s[i] * f.s[j]).sqrt() * rng.normal() as f32;
            }
        }
    }
    for _ in 0..2 {
        let a = rng.normal_vec(r, 1.0 / (r as f64).sqrt());
        let b = rng.normal_vec(r, 1.0 / (r as f64).sqrt());
        for i in 0..r {
            for j in 0..r {
                dlt[i * r + j] += 0.15 * a[i] * b[j];
            }
        }
    }
    dlt
}

/// Which student a run trains.
#[derive(Debug, Clone, Copy)]
enum Student {
    Svft(Pattern),
    Lora(usize),
}

/// Runs the demo on the CPU. `progress(method, step, loss)` is called after every step.
pub fn run(
    modules: &[DemoModule],
    source: &str,
    options: &DemoOptions,
    progress: &mut dyn FnMut(&str, usize, f64),
) -> Result<DemoReport> {
    run_on(None, modules, source, options, progress)
}

/// Builds one student layer for module `i`, on the CPU or on `device`'s GPU and stream.
fn student_layer(
    device: Option<&(Arc<Gpu>, Arc<cudarc::driver::CudaStream>)>,
    student: Student,
    i: usize,
    f: &Factors,
) -> Result<Box<dyn StackLayer>> {
    // The same seeds on both backends: LoRA's A from 77 + i, M from Init::Zero.
    let lora = |rl: usize| (dense_with_core(f, &vec![0.0; f.r * f.r]), rl.min(f.r), 77 + i as u64);
    Ok(match (device, student) {
        (None, Student::Svft(p)) => Box::new(SvftStudent::new(f.clone(), p)?),
        (None, Student::Lora(rl)) => {
            let (w0, rl, seed) = lora(rl);
            Box::new(LoraStudent::new(w0, f.d_out, f.d_in, rl, seed))
        }
        (Some((gpu, stream)), Student::Svft(p)) => Box::new(cuda::CudaSvftStudent::new(gpu, stream, f, p)?),
        (Some((_, stream)), Student::Lora(rl)) => {
            let (w0, rl, seed) = lora(rl);
            Box::new(cuda::CudaLoraStudent::new(stream, w0, f.d_out, f.d_in, rl, seed)?)
        }
    })
}

/// Runs the demo with the students on `gpu` (f32 layers on the device, the stack's glue and
/// Adam on the host), or on the CPU with `None`. Data, teacher and initial weights do not
/// depend on the backend. `progress(method, step, loss)` is called after every step.
pub fn run_on(
    gpu: Option<&Arc<Gpu>>,
    modules: &[DemoModule],
    source: &str,
    options: &DemoOptions,
    progress: &mut dyn FnMut(&str, usize, f64),
) -> Result<DemoReport> {
    if options.steps == 0 || options.tokens == 0 {
        return Err(Error::InvalidArgument("--steps and --tokens must be positive".into()));
    }
    let shapes: Vec<(usize, usize)> = modules.iter().map(|m| (m.factors.d_out, m.factors.d_in)).collect();
    let (d, branches) = plan_stack(&shapes);
    if branches.is_empty() {
        return Err(Error::InvalidArgument(
            "no module fits a residual stack (need d x d modules, or d -> f and f -> d pairs)".into(),
        ));
    }
    for (flag, lr) in [("--lr", options.svft_lr), ("--lora-lr", options.lora_lr)] {
        if !(lr.is_finite() && lr > 0.0) {
            return Err(Error::InvalidArgument(format!("{flag} must be a positive number, got {lr}")));
        }
    }
    // Sizes from the command line: the stored batches (x and y, d wide) and a step's
    // activations and gradients across the stack (about 8 buffers of n x widest per module),
    // counted in f64 so no size overflows, refused before anything is allocated.
    let widest = shapes.iter().map(|&(o, i)| o.max(i)).max().unwrap_or(d) as f64;
    let n_f = options.tokens as f64;
    let bytes =
        4.0 * ((options.batches as f64 + 2.0) * 2.0 * n_f * d as f64 + 8.0 * n_f * widest * shapes.len() as f64);
    let what = format!("the demo with {} tokens per step and {} stored batches", options.tokens, options.batches);
    crate::alloc::check_fits(&what, bytes as u128)?;
    let n = options.tokens;
    let mut rng = Rng::new(options.seed);

    // Teacher: W0 + U D V^T per module, as dense layers.
    let mut teacher_layers: Vec<Box<dyn StackLayer>> = Vec::new();
    for m in modules {
        let f = &m.factors;
        let w = dense_with_core(f, &hidden_update(f, &mut rng));
        teacher_layers.push(Box::new(Dense { w, d_out: f.d_out, d_in: f.d_in }));
    }
    let mut teacher = Net::new(teacher_layers, shapes.clone(), d, branches.clone());
    let used = teacher.used_layers();
    let batch = |rng: &mut Rng, teacher: &mut Net| -> Result<(Vec<f32>, Vec<f32>)> {
        let x = rng.normal_vec(n * d, 1.0);
        let y = teacher.forward(&x, n)?.to_vec();
        Ok((x, y))
    };
    let eval: Vec<(Vec<f32>, Vec<f32>)> = (0..2).map(|_| batch(&mut rng, &mut teacher)).collect::<Result<_>>()?;
    // Every student sees the same data: a fixed set of batches, or the same fresh stream.
    let data: Vec<(Vec<f32>, Vec<f32>)> =
        (0..options.batches).map(|_| batch(&mut rng, &mut teacher)).collect::<Result<_>>()?;
    let stream_seed = options.seed ^ 0x5eed_da7a;

    let banded = Pattern::Banded { d: options.banded };
    let banded_params: usize = used.iter().map(|&i| banded.size(modules[i].factors.r).unwrap_or(0)).sum();
    let lora_unit: usize = used.iter().map(|&i| shapes[i].0 + shapes[i].1).sum();
    let lora_rank =
        options.lora_rank.unwrap_or_else(|| ((banded_params as f64 / lora_unit as f64).round() as usize).max(1));
    for &i in &used {
        let r = modules[i].factors.r;
        if options.banded >= r {
            return Err(Error::InvalidArgument(format!(
                "--banded {} must be below every rank (module rank {r})",
                options.banded
            )));
        }
        debug_assert_eq!(band_size(r, options.banded), banded.size(r).unwrap_or(0));
    }

    // One stream for every device layer: the host-staged glue orders the calls anyway.
    let device = match gpu {
        Some(gpu) => Some((
            gpu.clone(),
            gpu.context().new_stream().map_err(|e| crate::cuda::driver_err("creating a stream", e))?,
        )),
        None => None,
    };
    let students = [
        ("SVFT plain".to_string(), Student::Svft(Pattern::Plain)),
        (format!("SVFT {banded}"), Student::Svft(banded)),
        (format!("LoRA r={lora_rank}"), Student::Lora(lora_rank)),
    ];
    let mut results = Vec::new();
    for (name, student) in students {
        let mut layers: Vec<Box<dyn StackLayer>> = Vec::new();
        for (i, m) in modules.iter().enumerate() {
            layers.push(student_layer(device.as_ref(), student, i, &m.factors)?);
        }
        let mut net = Net::new(layers, shapes.clone(), d, branches.clone());
        let eval_loss = |net: &mut Net| -> Result<f64> {
            let mut total = 0.0;
            for (x, y) in &eval {
                total += mse(net.forward(x, n)?, y);
            }
            Ok(total / eval.len() as f64)
        };
        let initial_loss = eval_loss(&mut net)?;
        let lr0 = match student {
            Student::Svft(_) => options.svft_lr,
            Student::Lora(_) => options.lora_lr,
        };
        let mut losses = Vec::with_capacity(options.steps);
        let mut g = vec![0.0f32; n * d];
        let mut elapsed = 0.0f64;
        let mut stream = Rng::new(stream_seed);
        let mut fresh: (Vec<f32>, Vec<f32>);
        for step in 0..options.steps {
            let (x, y) = if data.is_empty() {
                fresh = batch(&mut stream, &mut teacher)?;
                (&fresh.0, &fresh.1)
            } else {
                let b = &data[step % data.len()];
                (&b.0, &b.1)
            };
            let lr = lr0 * 0.5 * (1.0 + (std::f32::consts::PI * step as f32 / options.steps as f32).cos());
            let t0 = Instant::now();
            let out = net.forward(x, n)?;
            let loss = mse(out, y);
            let scale = 2.0 / out.len() as f32;
            g.iter_mut().zip(out.iter().zip(y)).for_each(|(g, (o, t))| *g = scale * (o - t));
            net.backward(&g, n)?;
            for &i in &used {
                net.layers[i].update(lr, step + 1)?;
            }
            elapsed += t0.elapsed().as_secs_f64();
            if !loss.is_finite() {
                return Err(Error::NonFinite { what: "demo loss", index: step });
            }
            losses.push(loss);
            progress(&name, step, loss);
        }
        let final_loss = eval_loss(&mut net)?;
        let trainable_params = used.iter().map(|&i| net.layers[i].trainable()).sum::<usize>();
        results.push(MethodResult {
            name,
            trainable_params,
            initial_loss,
            final_loss,
            losses,
            ms_per_step: 1e3 * elapsed / options.steps as f64,
            frozen_bytes: used.iter().map(|&i| net.layers[i].frozen_bytes()).sum(),
            train_state_bytes: 16 * trainable_params,
            saved_activation_bytes: used.iter().map(|&i| net.layers[i].saved_bytes(n)).sum(),
        });
    }
    let (backend, placement, device_name) = match gpu {
        Some(gpu) => ("cuda", Some("layers on device, stack glue on host".to_string()), gpu.name().to_string()),
        None => ("cpu", None, crate::cpu::device_name()),
    };
    Ok(DemoReport {
        backend: backend.into(),
        placement,
        device: device_name,
        source: source.to_string(),
        modules: used.iter().map(|&i| (modules[i].name.clone(), shapes[i].0, shapes[i].1)).collect(),
        width: d,
        options: options.clone(),
        lora_rank,
        results,
    })
}

/// Writes the loss curves of a report as a PNG (log y axis).
pub fn plot_losses(report: &DemoReport, path: &std::path::Path) -> Result<()> {
    const COLORS: [[u8; 3]; 4] = [[31, 119, 180], [214, 39, 40], [44, 160, 44], [148, 103, 189]];
    let series: Vec<crate::tools::plot::Series<'_>> = report
        .results
        .iter()
        .zip(COLORS.iter().cycle())
        .map(|(r, &color)| crate::tools::plot::Series { label: &r.name, color, values: &r.losses })
        .collect();
    crate::tools::plot::line_plot_png(path, "SVFT DEMO: TRAINING LOSS", "STEP", "MSE", &series, true)
}

#[cfg(test)]
mod tests;
