//! The same-run benchmark behind `svft bench`: SVFT forward+backward against its own plan's
//! dense products alone (the floor), LoRA r=16 with dX, the official layer's order and the
//! frozen dense layer (`Y = X W0^T`, `dX = G W0`: what the adapted model costs without any
//! adapter), all on
//! the same library in the same process, medians of repeated runs after warm-up.
//!
//! One case is one [`Row`]. A row comes from a per-shape context ([`CpuShape`] here,
//! [`CudaShape`] on a GPU, in `bench/cuda.rs`) and a layer: the context holds what does not depend on the
//! pattern or the token count (inputs, LoRA's weights), so the bench grid ([`Grid`]) builds it
//! once per shape, one layer per pattern, and asks for a row per token count.

pub mod adapters;
mod adapters_cuda;
mod cuda;

pub use adapters_cuda::run_adapters_cuda;
pub use cuda::{copy_bandwidth_gb_per_s, events_ms, run_cuda, run_cuda_grid, CudaShape};

use std::time::{Duration, Instant};

use rayon::prelude::*;
use serde_json::{json, Map, Value};

use crate::cpu::gemm::{gemm, Operand as Op};
use crate::cpu::CpuLayer;
use crate::error::{Error, Result};
use crate::layer::calibrate::CalibrationOptions;
use crate::layer::config::LayerConfig;
use crate::layer::pattern::Pattern;
use crate::layer::plan::{ExecPlan, Plan, SMALL_N_MAX};
use crate::layer::svd::{random_factors, Factors};
use crate::rng::Rng;
use crate::tools::baseline::{LoraLayer, OfficialLayer};
use crate::tools::memory::{self, Shape};

/// LoRA rank of the baseline.
pub const LORA_RANK: usize = 16;

/// One benchmark case.
#[derive(Debug, Clone)]
pub struct BenchCase {
    /// Output features.
    pub d_out: usize,
    /// Input features.
    pub d_in: usize,
    /// Tokens per step.
    pub tokens: usize,
    /// Sparsity pattern.
    pub pattern: Pattern,
    /// Plan to run (auto resolves per the cost model).
    pub plan: Plan,
    /// Minimum measuring time per timed quantity.
    pub budget: Duration,
}

impl BenchCase {
    /// Refuses a case whose buffers cannot fit in host memory, before allocating any: the
    /// weight and the baselines' dense copies (`3 d_out d_in`), the factors (`2 (d_out + d_in) r`)
    /// and the activations and their gradients (`6 n (d_out + d_in)`), in f32.
    pub fn check_fits(&self) -> Result<()> {
        // In f64: any size from a command line, no overflow (the cast saturates).
        let (o, i, n) = (self.d_out as f64, self.d_in as f64, self.tokens as f64);
        let elements = 3.0 * o * i + 2.0 * (o + i) * o.min(i) + 6.0 * n * (o + i);
        let what = format!("a {}x{} bench with {} tokens", self.d_out, self.d_in, self.tokens);
        crate::alloc::check_fits(&what, (4.0 * elements) as u128)
    }
}

impl Default for BenchCase {
    fn default() -> Self {
        BenchCase {
            d_out: 1024,
            d_in: 1024,
            tokens: 512,
            pattern: Pattern::Banded { d: 2 },
            plan: Plan::Auto,
            budget: Duration::from_millis(1500),
        }
    }
}

/// The fixed plans a grid row times at `n` tokens: factored and merged always, small-n at
/// `n <= SMALL_N_MAX` where the backend has its own small-n code (CUDA; the CPU backend runs
/// small-n as its factored code, so timing it again would only repeat the factored figure).
pub fn fixed_plans(n: usize, has_small_n: bool) -> Vec<ExecPlan> {
    let mut plans = vec![ExecPlan::Factored, ExecPlan::Merged];
    if has_small_n && n <= SMALL_N_MAX {
        plans.push(ExecPlan::SmallN);
    }
    plans
}

/// `plans` with `headline` added when missing, in order, without repeats.
pub fn plans_to_time(plans: &[ExecPlan], headline: ExecPlan) -> Vec<ExecPlan> {
    let mut out: Vec<ExecPlan> = Vec::new();
    for &p in plans.iter().chain([headline].iter()) {
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// FLOPs of the frozen dense layer's step at `n` tokens: `Y = X W^T` and `dX = G W`.
pub fn dense_flops(d_out: usize, d_in: usize, n: usize) -> f64 {
    4.0 * n as f64 * d_out as f64 * d_in as f64
}

/// The measured figures of one case (times in milliseconds, medians).
#[derive(Debug, Clone)]
pub struct Row {
    /// `cpu` or `cuda`.
    pub backend: &'static str,
    /// The CPU model or GPU name.
    pub device: String,
    /// Element type of the activations and frozen factors.
    pub dtype: &'static str,
    /// Output features.
    pub d_out: usize,
    /// Input features.
    pub d_in: usize,
    /// Tokens per step.
    pub tokens: usize,
    /// Sparsity pattern.
    pub pattern: Pattern,
    /// The plan asked for (auto in the grid).
    pub plan_requested: Plan,
    /// The plan it resolved to: the one behind `svft_fwd_bwd_ms` and `gemm_floor_ms`.
    pub plan: ExecPlan,
    /// |Omega| + gate.
    pub trainable_params: usize,
    /// LoRA r=16's trainable parameters.
    pub lora_params: usize,
    /// SVFT forward + backward on `plan`.
    pub svft_fwd_bwd_ms: f64,
    /// The same plan's dense products alone.
    pub gemm_floor_ms: f64,
    /// LoRA r=16 forward + backward with dX.
    pub lora_fwd_bwd_ms: f64,
    /// The official layer's order, forward + backward.
    pub official_fwd_bwd_ms: f64,
    /// How the official order was run, where it is not the official code's own order.
    pub official_note: Option<&'static str>,
    /// The frozen dense layer, forward + backward with dX (no weight gradient).
    pub dense_fwd_bwd_ms: f64,
    /// Every fixed plan timed, forward + backward.
    pub plan_ms: Vec<(ExecPlan, f64)>,
    /// Why a plan is missing from `plan_ms`, if one is.
    pub plan_ms_note: Option<&'static str>,
    /// FLOPs of `plan`'s dense products.
    pub plan_gemm_flops: f64,
    /// FLOPs of LoRA's dense products.
    pub lora_flops: f64,
    /// FLOPs of the frozen dense layer's step, `4 n d_out d_in`.
    pub dense_flops: f64,
    /// Bytes of SVFT (on `plan`), the official layer and LoRA ([`memory`]).
    pub memory: memory::Report,
    /// Device-to-device copy bandwidth measured in this process (CUDA), GB/s.
    pub copy_gb_per_s: Option<f64>,
    /// The layer's own persistent and workspace bytes after the row (CUDA).
    pub layer_bytes: Option<(usize, usize)>,
    /// How the frozen factors were made, when not by an SVD or QR (the grid's fast generator).
    pub factors_note: Option<&'static str>,
    /// CUDA, band patterns, factored headline with n <= d_in: the same step with the fused
    /// backward (SDDMM + core apply in one pass) turned off, to keep the faster one default.
    pub unfused_bwd_ms: Option<f64>,
    /// Whether `Auto` resolved from a measured plan table ([`crate::layer::calibrate`]) rather than
    /// the FLOP model alone.
    pub auto_measured: bool,
}

impl Row {
    /// The fastest fixed plan timed and its time.
    pub fn best_fixed_plan(&self) -> Option<(ExecPlan, f64)> {
        self.plan_ms.iter().copied().min_by(|a, b| a.1.total_cmp(&b.1))
    }

    /// Bytes a step must read at least at small n: U and V once in forward and once in
    /// backward, `2 (d_in + d_out) r` elements. `None` above [`SMALL_N_MAX`] tokens, where the
    /// step is compute-bound and this floor says nothing.
    pub fn bytes_floor(&self) -> Option<usize> {
        let s = &self.memory.shape;
        (self.tokens <= SMALL_N_MAX).then(|| 2 * (s.d_in + s.d_out) * s.r * s.act)
    }

    /// `bytes_floor / small-n time / copy bandwidth`: how close the small-n path comes to
    /// streaming U and V at the card's copy speed (CUDA rows with small-n timed).
    pub fn bandwidth_fraction(&self) -> Option<f64> {
        let (floor, bw) = (self.bytes_floor()?, self.copy_gb_per_s?);
        let ms = self.plan_ms.iter().find(|p| p.0 == ExecPlan::SmallN)?.1;
        Some(floor as f64 / (ms * 1e-3) / (bw * 1e9))
    }

    /// The row as one JSON object.
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "backend": self.backend,
            "device": self.device,
            "dtype": self.dtype,
            "d_out": self.d_out,
            "d_in": self.d_in,
            "tokens": self.tokens,
            "pattern": self.pattern.to_string(),
            "plan_requested": self.plan_requested.to_string(),
            "plan": self.plan.to_string(),
            "trainable_params": self.trainable_params,
            "lora_rank": LORA_RANK,
            "lora_params": self.lora_params,
            "svft_fwd_bwd_ms": self.svft_fwd_bwd_ms,
            "gemm_floor_ms": self.gemm_floor_ms,
            "lora_fwd_bwd_ms": self.lora_fwd_bwd_ms,
            "official_fwd_bwd_ms": self.official_fwd_bwd_ms,
            "dense_fwd_bwd_ms": self.dense_fwd_bwd_ms,
            "ratio_to_floor": self.svft_fwd_bwd_ms / self.gemm_floor_ms,
            "ratio_to_lora": self.svft_fwd_bwd_ms / self.lora_fwd_bwd_ms,
            "speedup_vs_official": self.official_fwd_bwd_ms / self.svft_fwd_bwd_ms,
            "ratio_to_dense": self.svft_fwd_bwd_ms / self.dense_fwd_bwd_ms,
            "flop_ratio_to_dense": self.plan_gemm_flops / self.dense_flops,
            // Issue 16's measure: 1 when SVFT costs the dense layer exactly its FLOP ratio.
            "dense_ratio_to_flop_ratio": (self.svft_fwd_bwd_ms / self.dense_fwd_bwd_ms)
                / (self.plan_gemm_flops / self.dense_flops),
            "plan_gemm_gflop": self.plan_gemm_flops / 1e9,
            "lora_gflop": self.lora_flops / 1e9,
            "flop_ratio_to_lora": self.plan_gemm_flops / self.lora_flops,
            "plan_ms": self.plan_ms.iter().map(|(p, ms)| (p.to_string(), json!(ms))).collect::<Map<_, _>>(),
            "memory": self.memory.to_json(),
        });
        let o = v.as_object_mut().expect("an object");
        let rate = self.plan_gemm_flops / self.svft_fwd_bwd_ms;
        if self.backend == "cuda" {
            o.insert("svft_tflops_per_s".into(), json!(rate / 1e9));
        } else {
            o.insert("svft_gflops_per_s".into(), json!(rate / 1e6));
        }
        if let Some((p, ms)) = self.best_fixed_plan() {
            o.insert("best_fixed_plan".into(), json!(p.to_string()));
            o.insert("best_fixed_plan_ms".into(), json!(ms));
            if self.plan_requested == Plan::Auto {
                // Issue 4's target: auto within 5% of the best fixed plan on the grid.
                o.insert("auto_to_best_fixed".into(), json!(self.svft_fwd_bwd_ms / ms));
            }
        }
        if self.plan_requested == Plan::Auto {
            o.insert("auto_from".into(), json!(if self.auto_measured { "calibration" } else { "flop model" }));
        }
        let optional = [
            ("plan_ms_note", self.plan_ms_note.map(|s| json!(s))),
            ("official_note", self.official_note.map(|s| json!(s))),
            ("bytes_floor", self.bytes_floor().map(|b| json!(b))),
            ("copy_gb_per_s", self.copy_gb_per_s.map(|b| json!(b))),
            ("bandwidth_fraction", self.bandwidth_fraction().map(|b| json!(b))),
            ("persistent_bytes", self.layer_bytes.map(|b| json!(b.0))),
            ("workspace_bytes", self.layer_bytes.map(|b| json!(b.1))),
            ("factors", self.factors_note.map(|s| json!(s))),
            ("svft_unfused_bwd_ms", self.unfused_bwd_ms.map(|t| json!(t))),
            ("fused_speedup", self.unfused_bwd_ms.map(|t| json!(t / self.svft_fwd_bwd_ms))),
        ];
        for (key, value) in optional {
            if let Some(value) = value {
                o.insert(key.into(), value);
            }
        }
        v
    }

    /// A short human-readable table of one case.
    pub fn to_table(&self) -> String {
        let m = &self.memory;
        let line = |label: &str, ms: f64| format!("{label:<28}{ms:>12.3}{:>14.3}\n", self.svft_fwd_bwd_ms / ms);
        format!(
            "svft bench ({}: {}), {}x{} weight, {} tokens, {}, plan {}\n{:<28}{:>12}{:>14}\n{}{}{}{}{}\
             trainable params: SVFT {}, LoRA r={} {}\n\
             memory per step (MiB; {} activations): SVFT {:.2} (persistent {:.2}, workspace {:.2}, saved {:.2}), \
             official layer {:.2}, LoRA r={} {:.2}; SVFT / official {:.3}\n",
            self.backend,
            self.device,
            self.d_out,
            self.d_in,
            self.tokens,
            self.pattern,
            self.plan,
            "fwd+bwd",
            "ms (median)",
            "SVFT / this",
            line("SVFT", self.svft_fwd_bwd_ms),
            line("dense products alone", self.gemm_floor_ms),
            line("LoRA r=16", self.lora_fwd_bwd_ms),
            line("official layer order", self.official_fwd_bwd_ms),
            line("frozen dense layer", self.dense_fwd_bwd_ms),
            self.trainable_params,
            LORA_RANK,
            self.lora_params,
            self.dtype,
            memory::mib(m.svft.total()),
            memory::mib(m.svft.persistent),
            memory::mib(m.svft.workspace),
            memory::mib(m.svft.saved),
            memory::mib(m.official.total()),
            LORA_RANK,
            memory::mib(m.lora.total()),
            m.svft_to_official(),
        )
    }
}

/// Medians of several timed closures, in milliseconds, measured in interleaved rounds
/// (each round runs every closure once), so that a change in machine load hits all of them
/// alike and their ratios stay meaningful. Two warm-up rounds, then at least 5 rounds and at
/// least `budget` per closure on average.
pub fn interleaved_medians_ms(budget: Duration, fs: &mut [&mut dyn FnMut()]) -> Vec<f64> {
    interleaved_medians_indexed_ms(budget, fs.len(), |i| fs[i]())
}

/// [`interleaved_medians_ms`] over `count` quantities given as one closure of the index, for
/// quantities that share mutable state (one layer timed on several plans).
pub fn interleaved_medians_indexed_ms(budget: Duration, count: usize, mut f: impl FnMut(usize)) -> Vec<f64> {
    for _ in 0..2 {
        (0..count).for_each(&mut f);
    }
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); count];
    let start = Instant::now();
    let total = budget * count as u32;
    while times.first().is_some_and(|t| t.len() < 5 || (start.elapsed() < total && t.len() < 1000)) {
        for (i, t) in times.iter_mut().enumerate() {
            let t0 = Instant::now();
            f(i);
            t.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    times
        .into_iter()
        .map(|mut t| {
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        })
        .collect()
}

/// `len` bench values with standard deviation `std`: uniform on `[-sqrt(3) std, sqrt(3) std]`,
/// never all zero, from `seed`. Filled in parallel chunks (each its own stream), because the
/// grid's Llama-sized inputs are hundreds of millions of values and timing does not care
/// about their distribution, only that they are finite and not zero.
pub fn bench_values(seed: u64, len: usize, std: f64) -> Vec<f32> {
    const CHUNK: usize = 1 << 16;
    let scale = (std * 3f64.sqrt() * 2.0) as f32;
    let mut out = vec![0.0f32; len];
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, chunk)| {
        let mut rng = Rng::new(seed ^ (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        for v in chunk {
            *v = ((rng.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32) - 0.5) * scale;
        }
    });
    out
}

/// What the grid's factors are, for the JSON rows.
pub const BENCH_FACTORS_NOTE: &str = "fast random factors for timing: U, V uniform with columns of unit norm in \
     expectation, not orthonormal (timing does not depend on it; QR of a 14336 x 4096 Gaussian costs seconds)";

/// Frozen factors for timing: U and V with i.i.d. entries of variance `1/rows` (columns of unit
/// norm in expectation, not orthonormal) and the decaying spectrum of
/// [`crate::layer::svd::random_factors`]. Milliseconds where QR of Llama-sized Gaussians takes seconds.
pub fn bench_factors(d_out: usize, d_in: usize, r: usize, seed: u64) -> Result<Factors> {
    if r == 0 || r > d_out.min(d_in) {
        return Err(Error::Rank { rank: r, max: d_out.min(d_in) });
    }
    let u = bench_values(seed, d_out * r, 1.0 / (d_out as f64).sqrt());
    let v = bench_values(seed.wrapping_add(1), d_in * r, 1.0 / (d_in as f64).sqrt());
    let s = (0..r).map(|i| (1.0 / (1.0 + i as f64 / 8.0)) as f32).collect();
    Factors::new(d_out, d_in, u, s, v)
}

/// A named bench grid: shapes x token counts x patterns.
#[derive(Debug, Clone)]
pub struct Grid {
    /// Its name (`svft bench --grid NAME`).
    pub name: &'static str,
    /// `(d_out, d_in)` of each shape.
    pub shapes: Vec<(usize, usize)>,
    /// Tokens per step.
    pub tokens: Vec<usize>,
    /// Sparsity patterns.
    pub patterns: Vec<Pattern>,
}

/// The grids `svft bench --grid` knows.
pub const GRID_NAMES: [&str; 3] = ["llama3-8b", "llama3-8b-subset", "tiny"];

impl Grid {
    /// `llama3-8b`: the Llama-3-8B projection shapes (4096x4096, 14336x4096, 4096x14336) x
    /// n in {1, 16, 512, 2048, 8192} x {plain, banded:2, banded:16, random:16} (issue 4).
    /// `llama3-8b-subset`: 4096x4096 x n in {1, 16, 2048} x banded:2 (the f32 subset).
    /// `tiny`: 384x384 and 1536x384 x n in {1, 16, 256} x {plain, banded:2}, CPU-sized.
    pub fn named(name: &str) -> Result<Grid> {
        let p = |s: &str| s.parse::<Pattern>();
        let (name, shapes, tokens, patterns) = match name {
            "llama3-8b" => (
                "llama3-8b",
                vec![(4096, 4096), (14336, 4096), (4096, 14336)],
                vec![1, 16, 512, 2048, 8192],
                vec![p("plain")?, p("banded:2")?, p("banded:16")?, p("random:16")?],
            ),
            "llama3-8b-subset" => ("llama3-8b-subset", vec![(4096, 4096)], vec![1, 16, 2048], vec![p("banded:2")?]),
            "tiny" => ("tiny", vec![(384, 384), (1536, 384)], vec![1, 16, 256], vec![p("plain")?, p("banded:2")?]),
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "unknown grid `{name}`: expected one of {}",
                    GRID_NAMES.join(", ")
                )))
            }
        };
        Ok(Grid { name, shapes, tokens, patterns })
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.shapes.len() * self.tokens.len() * self.patterns.len()
    }

    /// Whether the grid has no rows (never, for a named grid).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The largest token count.
    pub fn max_tokens(&self) -> usize {
        self.tokens.iter().copied().max().unwrap_or(1)
    }

    /// The memory report of every case, without timing anything: SVFT on the plan the FLOP
    /// model picks, `act` bytes per activation element. Rows in grid order (shape, pattern, n).
    pub fn memory_reports(&self, act: usize) -> Result<Vec<(Pattern, memory::Report)>> {
        let mut out = Vec::new();
        for &(d_out, d_in) in &self.shapes {
            let r = d_out.min(d_in);
            for &pattern in &self.patterns {
                let nnz = pattern.size(r)?;
                let dims = crate::layer::plan::Dims { d_out, d_in, r, nnz };
                for &n in &self.tokens {
                    let shape = Shape { d_out, d_in, r, nnz, n, act };
                    out.push((pattern, memory::Report::new(shape, Plan::Auto.resolve(&dims, n), LORA_RANK)));
                }
            }
        }
        Ok(out)
    }
}

/// The per-shape state of the CPU bench: inputs and LoRA's dense weight, made once and reused
/// for every pattern and token count of the shape.
#[derive(Debug)]
pub struct CpuShape {
    d_out: usize,
    d_in: usize,
    max_n: usize,
    x: Vec<f32>,
    gy: Vec<f32>,
    lora: LoraLayer,
    factors_note: Option<&'static str>,
}

impl CpuShape {
    /// Inputs for up to `max_n` tokens of a `d_out x d_in` layer (LoRA's `W0` is also the
    /// frozen dense layer's weight). `factors_note` says how the
    /// layers' factors were made when it is not an SVD or QR (see [`bench_factors`]).
    pub fn new(d_out: usize, d_in: usize, max_n: usize, factors_note: Option<&'static str>) -> Self {
        let x = bench_values(2, max_n * d_in, 1.0);
        let gy = bench_values(3, max_n * d_out, 1.0);
        let lora = LoraLayer::new(bench_values(4, d_out * d_in, 1.0), d_out, d_in, LORA_RANK, 3);
        CpuShape { d_out, d_in, max_n, x, gy, lora, factors_note }
    }

    /// One row: `layer` timed on every plan of `plans` and on the plan `requested` resolves to
    /// at `n` tokens (the headline), against that plan's dense products, LoRA, the official
    /// order and the frozen dense layer, in interleaved rounds of at least `budget` each. The layer is left on `requested`.
    pub fn row(
        &mut self,
        layer: &mut CpuLayer,
        n: usize,
        requested: Plan,
        plans: &[ExecPlan],
        budget: Duration,
    ) -> Result<Row> {
        let dims = layer.dims();
        let (d_out, d_in, r) = (dims.d_out, dims.d_in, dims.r);
        if (d_out, d_in) != (self.d_out, self.d_in) || n == 0 || n > self.max_n {
            return Err(Error::InvalidArgument(format!(
                "bench row: a {d_out}x{d_in} layer at {n} tokens on a {}x{} context of up to {} tokens",
                self.d_out, self.d_in, self.max_n
            )));
        }
        layer.set_plan(requested);
        let headline = layer.plan_for(n);
        let timed = plans_to_time(plans, headline);
        let (x, gy) = (&self.x[..n * d_in], &self.gy[..n * d_out]);
        let nnz = layer.omega().len();
        let mut official = OfficialLayer::new(layer.factors(), layer.omega(), layer.coefficients(), 0.0);
        let (mut y, mut dx, mut dm) = (vec![0.0f32; n * d_out], vec![0.0f32; n * d_in], vec![0.0f32; nnz]);
        // The headline plan's dense products alone, on buffers of the same shapes.
        let (mut t, mut a, mut s) = (vec![0.0; n * r], vec![0.0; n * r], vec![0.5; n * r]);
        let (mut w, mut p, mut q) = match headline {
            ExecPlan::Merged => (vec![0.0; d_out * d_in], vec![0.0; d_out * d_in], vec![0.0; d_out * r]),
            ExecPlan::Factored | ExecPlan::SmallN => (Vec::new(), Vec::new(), Vec::new()),
        };
        let lora = &mut self.lora;
        let k = timed.len();
        let mut failure = None;
        let ms = interleaved_medians_indexed_ms(budget, k + 4, |i| {
            if i < k {
                layer.set_plan(timed[i].into());
                let step = layer.forward_into(x, n, &mut y).and_then(|_| layer.backward_into(gy, n, &mut dx, &mut dm));
                if let Err(e) = step {
                    failure.get_or_insert(e);
                }
            } else if i == k {
                let (u, v) = (&layer.factors().u, &layer.factors().v);
                if headline.is_factored() {
                    gemm(&mut t, Op::n(x, n, d_in), Op::n(v, d_in, r), false);
                    gemm(&mut y, Op::n(&s, n, r), Op::t(u, d_out, r), false);
                    gemm(&mut a, Op::n(gy, n, d_out), Op::n(u, d_out, r), false);
                    gemm(&mut dx, Op::n(&a, n, r), Op::t(v, d_in, r), false);
                    s[0] = t[0]; // keep every product live
                } else {
                    gemm(&mut w, Op::n(u, d_out, r), Op::t(v, d_in, r), false);
                    gemm(&mut y, Op::n(x, n, d_in), Op::t(&w, d_out, d_in), false);
                    gemm(&mut dx, Op::n(gy, n, d_out), Op::n(&w, d_out, d_in), false);
                    gemm(&mut p, Op::t(gy, n, d_out), Op::n(x, n, d_in), false);
                    gemm(&mut q, Op::n(&p, d_out, d_in), Op::n(v, d_in, r), false);
                }
            } else if i == k + 1 {
                lora.forward(x, n, &mut y);
                lora.backward(gy, n, &mut dx);
            } else if i == k + 2 {
                official.forward(x, n, &mut y);
                official.backward(gy, n, &mut dx, &mut dm);
            } else {
                lora.frozen_step(x, gy, n, &mut y, &mut dx);
            }
        });
        layer.set_plan(requested);
        if let Some(e) = failure {
            return Err(e);
        }
        let plan_ms: Vec<(ExecPlan, f64)> = timed.iter().copied().zip(ms.iter().copied()).collect();
        let svft_ms = plan_ms.iter().find(|p| p.0 == headline).map_or(f64::NAN, |p| p.1);
        let shape = Shape { d_out, d_in, r, nnz, n, act: 4 };
        Ok(Row {
            backend: "cpu",
            device: crate::cpu::device_name(),
            dtype: "f32",
            d_out,
            d_in,
            tokens: n,
            pattern: layer.omega().pattern,
            plan_requested: requested,
            plan: headline,
            trainable_params: layer.trainable_params(),
            lora_params: self.lora.trainable_params(),
            svft_fwd_bwd_ms: svft_ms,
            gemm_floor_ms: ms[k],
            lora_fwd_bwd_ms: ms[k + 1],
            official_fwd_bwd_ms: ms[k + 2],
            official_note: None,
            dense_fwd_bwd_ms: ms[k + 3],
            plan_ms,
            plan_ms_note: (n <= SMALL_N_MAX && !timed.contains(&ExecPlan::SmallN))
                .then_some("small-n not timed: the CPU backend runs it as its factored code (see factored)"),
            plan_gemm_flops: headline.gemm_flops(&dims, n),
            lora_flops: dims.lora_flops(n, LORA_RANK),
            dense_flops: dense_flops(d_out, d_in, n),
            memory: memory::Report::new(shape, headline, LORA_RANK),
            copy_gb_per_s: None,
            layer_bytes: None,
            factors_note: self.factors_note,
            unfused_bwd_ms: None,
            auto_measured: crate::layer::calibrate::measured(requested, layer.plan_table(), &dims, n),
        })
    }
}

/// Runs one case on the CPU (orthonormal random factors; only the requested plan is timed).
pub fn run_cpu(case: &BenchCase) -> Result<Row> {
    case.check_fits()?;
    let (d_out, d_in, n) = (case.d_out, case.d_in, case.tokens);
    let factors = random_factors(d_out, d_in, d_out.min(d_in), 1)?;
    let config = LayerConfig { plan: case.plan, ..LayerConfig::official(case.pattern) };
    let mut layer = CpuLayer::new(factors, &config, None)?;
    let headline = layer.plan_for(n);
    CpuShape::new(d_out, d_in, n, None).row(&mut layer, n, case.plan, &[headline], case.budget)
}

/// The calibration a grid runs per layer before its rows: the grid's own token counts, no
/// cache (a bench measures afresh), a short budget per plan and token count.
pub fn grid_calibration(grid: &Grid, budget: Duration) -> CalibrationOptions {
    CalibrationOptions { tokens: grid.tokens.clone(), budget: budget.min(Duration::from_millis(50)), cache: None }
}

/// Runs a grid on the CPU: factors once per shape (the fast generator), one layer per pattern
/// (calibrated at the grid's token counts, so `Auto` is the measured choice), a row per token
/// count, each handed to `on_row` as soon as it is measured.
pub fn run_cpu_grid(grid: &Grid, budget: Duration, on_row: &mut dyn FnMut(Row) -> Result<()>) -> Result<()> {
    for &(d_out, d_in) in &grid.shapes {
        let factors = bench_factors(d_out, d_in, d_out.min(d_in), 1)?;
        let mut ctx = CpuShape::new(d_out, d_in, grid.max_tokens(), Some(BENCH_FACTORS_NOTE));
        for &pattern in &grid.patterns {
            let config = LayerConfig::official(pattern);
            let mut layer = CpuLayer::new(factors.clone(), &config, None)?;
            layer.calibrate(&grid_calibration(grid, budget))?;
            for &n in &grid.tokens {
                on_row(ctx.row(&mut layer, n, Plan::Auto, &fixed_plans(n, false), budget)?)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
