//! One training step (forward + backward + AdamW) in candle, same process, same inputs:
//! SvftLinear (this crate's op), candle_nn::Linear trained densely, and LoRA r = 16 written with
//! candle ops over a frozen weight. 1024 x 1024 by default, n = 64, 512, 2048 tokens.
//!
//! ```sh
//! cargo run --release --features candle --example candle_bench [-- --d 1024 --tokens 64,512,2048 --pattern banded:2]
//! ```
//!
//! Prints the median step time of each method (after warm-up steps) and the CPU's model name.

use std::time::Instant;

use candle_core::{DType, Device, Module, Result, Tensor, Var};
use candle_nn::{AdamW, Linear, Optimizer};
use svft::candle::SvftLinear;
use svft::LayerConfig;

/// A LoRA adapter over a frozen weight: `y = x W^T + b + (alpha / r) (x A^T) B^T`.
struct Lora {
    w: Tensor,
    b: Tensor,
    a: Var,
    bb: Var,
    scale: f64,
}

impl Module for Lora {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let base = x.matmul(&self.w.t()?)?.broadcast_add(&self.b)?;
        let low = x.matmul(&self.a.as_tensor().t()?)?.matmul(&self.bb.as_tensor().t()?)?;
        base + (low * self.scale)?
    }
}

/// Median seconds of `steps` training steps of `model` on (x, r), after `warm` unmeasured ones.
fn time_steps(model: &dyn Module, vars: Vec<Var>, x: &Tensor, r: &Tensor, warm: usize, steps: usize) -> Result<f64> {
    let mut opt = AdamW::new_lr(vars, 1e-3)?;
    let mut times = Vec::with_capacity(steps);
    for i in 0..warm + steps {
        let t0 = Instant::now();
        // L = sum(Y * R) / n: a fixed random direction, so every step does the same work.
        let loss = (model.forward(x)? * r)?.sum_all()?;
        opt.backward_step(&loss)?;
        if i >= warm {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let d: usize =
        arg("--d").map_or(Ok(1024), |s| s.parse()).map_err(|e| candle_core::Error::Msg(format!("--d: {e}")))?;
    let tokens: Vec<usize> = arg("--tokens")
        .unwrap_or_else(|| "64,512,2048".into())
        .split(',')
        .map(|s| s.trim().parse().map_err(|e| candle_core::Error::Msg(format!("--tokens: {e}"))))
        .collect::<Result<_>>()?;
    let spec = arg("--pattern").unwrap_or_else(|| "banded:2".into());
    let dev = Device::Cpu;

    let w = Tensor::randn(0f32, (1.0 / d as f64).sqrt() as f32, (d, d), &dev)?;
    let b = Tensor::randn(0f32, 0.1, d, &dev)?;
    let config = LayerConfig::official(spec.parse().map_err(|e| candle_core::Error::Msg(format!("--pattern: {e}")))?);
    let svft = SvftLinear::from_weight(&w, Some(&b), &config, None)?;
    let (dense_w, dense_b) = (Var::from_tensor(&w)?, Var::from_tensor(&b)?);
    let dense = Linear::new(dense_w.as_tensor().clone(), Some(dense_b.as_tensor().clone()));
    let rank = 16;
    let lora = Lora {
        w: w.clone(),
        b: b.clone(),
        a: Var::from_tensor(&Tensor::randn(0f32, (1.0 / d as f64).sqrt() as f32, (rank, d), &dev)?)?,
        bb: Var::zeros((d, rank), DType::F32, &dev)?,
        scale: 2.0,
    };

    println!("candle training step (forward + backward + AdamW), {d} x {d}, f32, {}", cpu_model());
    println!(
        "trainable: SVFT {spec} {} | dense {} | LoRA r={rank} {}",
        svft.trainable_params(),
        d * d + d,
        2 * rank * d
    );
    // A leaf input (the first layer of a model: no dX needed, and candle skips LoRA's frozen
    // product in backward, while this crate's op computes dX regardless) and an input that
    // needs its gradient (a layer inside a stack: every method computes dX).
    for input_grad in [false, true] {
        println!(
            "\ninput {}",
            if input_grad { "needs its gradient (a layer inside a stack)" } else { "is a leaf (no dX needed)" }
        );
        println!(
            "{:>6}  {:>10}  {:>10}  {:>10}  {:>10}  {:>10}",
            "n", "SVFT ms", "dense ms", "LoRA ms", "SVFT/dense", "SVFT/LoRA"
        );
        for &n in &tokens {
            let x = Tensor::randn(0f32, 1.0, (n, d), &dev)?;
            let x = if input_grad { Var::from_tensor(&x)?.as_tensor().clone() } else { x };
            let r = (Tensor::randn(0f32, 1.0, (n, d), &dev)? / n as f64)?;
            let steps = if n >= 2048 { 7 } else { 21 };
            let t_svft = time_steps(&svft, svft.vars(), &x, &r, 3, steps)?;
            let t_dense = time_steps(&dense, vec![dense_w.clone(), dense_b.clone()], &x, &r, 3, steps)?;
            let t_lora = time_steps(&lora, vec![lora.a.clone(), lora.bb.clone()], &x, &r, 3, steps)?;
            println!(
                "{n:>6}  {:>10.2}  {:>10.2}  {:>10.2}  {:>10.2}  {:>10.2}",
                t_svft * 1e3,
                t_dense * 1e3,
                t_lora * 1e3,
                t_svft / t_dense,
                t_svft / t_lora
            );
        }
    }
    Ok(())
}
