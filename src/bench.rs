//! The same-run benchmark behind `svft bench`: SVFT forward+backward against its own plan's
//! dense products alone (the floor), LoRA r=16 with dX, and the official layer's order, all on
//! the same library in the same process, medians of repeated runs after warm-up.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::baseline::{LoraLayer, OfficialLayer};
use crate::config::LayerConfig;
use crate::cpu::gemm::{gemm, Operand as Op};
use crate::cpu::CpuLayer;
use crate::error::Result;
use crate::pattern::Pattern;
use crate::plan::{ExecPlan, Plan};
use crate::rng::Rng;
use crate::svd::random_factors;

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

/// The measured figures of one case (times in milliseconds, medians).
#[derive(Debug, Clone)]
pub struct BenchReport {
    /// The case.
    pub case: BenchCase,
    /// The plan that ran.
    pub plan: ExecPlan,
    /// Where it ran.
    pub device: String,
    /// |Omega| + gate.
    pub trainable_params: usize,
    /// LoRA r=16's trainable parameters.
    pub lora_params: usize,
    /// SVFT forward + backward.
    pub svft_fwd_bwd_ms: f64,
    /// The same plan's dense products alone.
    pub gemm_floor_ms: f64,
    /// LoRA r=16 forward + backward with dX.
    pub lora_fwd_bwd_ms: f64,
    /// The official layer's order, forward + backward.
    pub official_fwd_bwd_ms: f64,
    /// FLOPs of the plan's dense products.
    pub plan_gemm_flops: f64,
    /// FLOPs of LoRA's dense products.
    pub lora_flops: f64,
}

impl BenchReport {
    /// The report as one JSON object.
    pub fn to_json(&self) -> Value {
        let c = &self.case;
        json!({
            "backend": "cpu",
            "device": self.device,
            "d_out": c.d_out,
            "d_in": c.d_in,
            "tokens": c.tokens,
            "pattern": c.pattern.to_string(),
            "plan_requested": c.plan.to_string(),
            "plan": self.plan.to_string(),
            "dtype": "f32",
            "trainable_params": self.trainable_params,
            "lora_rank": LORA_RANK,
            "lora_params": self.lora_params,
            "svft_fwd_bwd_ms": self.svft_fwd_bwd_ms,
            "gemm_floor_ms": self.gemm_floor_ms,
            "lora_fwd_bwd_ms": self.lora_fwd_bwd_ms,
            "official_fwd_bwd_ms": self.official_fwd_bwd_ms,
            "ratio_to_floor": self.svft_fwd_bwd_ms / self.gemm_floor_ms,
            "ratio_to_lora": self.svft_fwd_bwd_ms / self.lora_fwd_bwd_ms,
            "speedup_vs_official": self.official_fwd_bwd_ms / self.svft_fwd_bwd_ms,
            "plan_gemm_gflop": self.plan_gemm_flops / 1e9,
            "lora_gflop": self.lora_flops / 1e9,
            "flop_ratio_to_lora": self.plan_gemm_flops / self.lora_flops,
            "svft_gflops_per_s": self.plan_gemm_flops / self.svft_fwd_bwd_ms / 1e6,
        })
    }

    /// A short human-readable table.
    pub fn to_table(&self) -> String {
        let c = &self.case;
        format!(
            "svft bench (cpu: {}), {}x{} weight, {} tokens, {}, plan {}\n\
             {:<28}{:>12}{:>14}\n\
             {:<28}{:>12.3}{:>14}\n\
             {:<28}{:>12.3}{:>14.3}\n\
             {:<28}{:>12.3}{:>14.3}\n\
             {:<28}{:>12.3}{:>14.3}\n\
             trainable params: SVFT {}, LoRA r={} {}\n",
            self.device,
            c.d_out,
            c.d_in,
            c.tokens,
            c.pattern,
            self.plan,
            "fwd+bwd",
            "ms (median)",
            "SVFT / this",
            "SVFT",
            self.svft_fwd_bwd_ms,
            "1.000",
            "dense products alone",
            self.gemm_floor_ms,
            self.svft_fwd_bwd_ms / self.gemm_floor_ms,
            "LoRA r=16",
            self.lora_fwd_bwd_ms,
            self.svft_fwd_bwd_ms / self.lora_fwd_bwd_ms,
            "official layer order",
            self.official_fwd_bwd_ms,
            self.svft_fwd_bwd_ms / self.official_fwd_bwd_ms,
            self.trainable_params,
            LORA_RANK,
            self.lora_params,
        )
    }
}

/// The CPU model and thread count, for reports.
pub fn cpu_name() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    format!("{model}, {} threads", rayon::current_num_threads())
}

/// Medians of several timed closures, in milliseconds, measured in interleaved rounds
/// (each round runs every closure once), so that a change in machine load hits all of them
/// alike and their ratios stay meaningful. Two warm-up rounds, then at least 5 rounds and at
/// least `budget` per closure on average.
pub fn interleaved_medians_ms(budget: Duration, fs: &mut [&mut dyn FnMut()]) -> Vec<f64> {
    for _ in 0..2 {
        fs.iter_mut().for_each(|f| f());
    }
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); fs.len()];
    let start = Instant::now();
    let total = budget * fs.len() as u32;
    while times[0].len() < 5 || (start.elapsed() < total && times[0].len() < 1000) {
        for (f, t) in fs.iter_mut().zip(&mut times) {
            let t0 = Instant::now();
            f();
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

fn random_vec(rng: &mut Rng, len: usize) -> Vec<f32> {
    rng.normal_vec(len, 1.0)
}

/// Runs one case on the CPU.
pub fn run_cpu(case: &BenchCase) -> Result<BenchReport> {
    let (d_out, d_in, n) = (case.d_out, case.d_in, case.tokens);
    let r = d_out.min(d_in);
    let factors = random_factors(d_out, d_in, r, 1)?;
    let config = LayerConfig { plan: case.plan, ..LayerConfig::official(case.pattern) };
    let mut layer = CpuLayer::new(factors.clone(), &config, None)?;
    let plan = layer.plan_for(n);
    let dims = layer.dims();
    let mut rng = Rng::new(2);
    let x = random_vec(&mut rng, n * d_in);
    let gy = random_vec(&mut rng, n * d_out);
    let buffers = || (vec![0.0f32; n * d_out], vec![0.0f32; n * d_in]);

    let nnz = layer.omega().len();
    let trainable_params = layer.trainable_params();
    let mut official = OfficialLayer::new(&factors, layer.omega(), layer.coefficients(), 0.0);
    let (mut y1, mut dx1) = buffers();
    let mut dm1 = vec![0.0; nnz];
    let mut svft = || {
        layer.forward_into(&x, n, &mut y1).expect("bench forward");
        layer.backward_into(&gy, n, &mut dx1, &mut dm1).expect("bench backward");
    };

    // The same plan's dense products alone, on buffers of the same shapes.
    let (u, v) = (&factors.u, &factors.v);
    let (mut y2, mut dx2) = buffers();
    let (mut t, mut a, mut s) = (vec![0.0; n * r], vec![0.0; n * r], vec![0.5; n * r]);
    let (mut w, mut p, mut q) = match plan {
        ExecPlan::Merged => (vec![0.0; d_out * d_in], vec![0.0; d_out * d_in], vec![0.0; d_out * r]),
        ExecPlan::Factored | ExecPlan::SmallN => (Vec::new(), Vec::new(), Vec::new()),
    };
    let mut floor = || match plan {
        ExecPlan::Factored | ExecPlan::SmallN => {
            gemm(&mut t, Op::n(&x, n, d_in), Op::n(v, d_in, r), false);
            gemm(&mut y2, Op::n(&s, n, r), Op::t(u, d_out, r), false);
            gemm(&mut a, Op::n(&gy, n, d_out), Op::n(u, d_out, r), false);
            gemm(&mut dx2, Op::n(&a, n, r), Op::t(v, d_in, r), false);
            s[0] = t[0]; // keep every product live
        }
        ExecPlan::Merged => {
            gemm(&mut w, Op::n(u, d_out, r), Op::t(v, d_in, r), false);
            gemm(&mut y2, Op::n(&x, n, d_in), Op::t(&w, d_out, d_in), false);
            gemm(&mut dx2, Op::n(&gy, n, d_out), Op::n(&w, d_out, d_in), false);
            gemm(&mut p, Op::t(&gy, n, d_out), Op::n(&x, n, d_in), false);
            gemm(&mut q, Op::n(&p, d_out, d_in), Op::n(v, d_in, r), false);
        }
    };

    let mut lora = LoraLayer::new(random_vec(&mut rng, d_out * d_in), d_out, d_in, LORA_RANK, 3);
    let lora_params = lora.trainable_params();
    let (mut y3, mut dx3) = buffers();
    let mut lora_step = || {
        lora.forward(&x, n, &mut y3);
        lora.backward(&gy, n, &mut dx3);
    };

    let (mut y4, mut dx4) = buffers();
    let mut dm4 = vec![0.0; nnz];
    let mut official_step = || {
        official.forward(&x, n, &mut y4);
        official.backward(&gy, n, &mut dx4, &mut dm4);
    };

    let ms = interleaved_medians_ms(case.budget, &mut [&mut svft, &mut floor, &mut lora_step, &mut official_step]);
    let (svft, floor, lora_ms, official_ms) = (ms[0], ms[1], ms[2], ms[3]);

    let plan_gemm_flops = match plan {
        ExecPlan::Factored | ExecPlan::SmallN => dims.factored_gemm_flops(n),
        ExecPlan::Merged => dims.merged_gemm_flops(n),
    };
    Ok(BenchReport {
        case: case.clone(),
        plan,
        device: cpu_name(),
        trainable_params,
        lora_params,
        svft_fwd_bwd_ms: svft,
        gemm_floor_ms: floor,
        lora_fwd_bwd_ms: lora_ms,
        official_fwd_bwd_ms: official_ms,
        plan_gemm_flops,
        lora_flops: dims.lora_flops(n, LORA_RANK),
    })
}
