//! SVFT layers inside [candle](https://github.com/huggingface/candle) (feature `candle`).
//!
//! [`SvftLinear`] is a `candle_nn::Module`: its forward and backward are one candle custom op
//! ([`op`]) that runs the crate's [`CpuLayer`](crate::cpu::CpuLayer) (`forward_saving` /
//! `backward_saved`), so candle's autograd and optimisers train it while the crate's kernels do
//! the work. The trainable state is two candle [`Var`](candle_core::Var)s: the |Omega|
//! coefficients M and, with the gate on, gamma (`g = sigmoid(gamma)`). The frozen factors U, s,
//! V and the bias live in the layer, not in any variable, so `candle_nn::AdamW` and a `VarMap`
//! see only what SVFT trains.
//!
//! ```no_run
//! # fn main() -> candle_core::Result<()> {
//! use candle_core::{Device, Tensor};
//! use candle_nn::{Module, Optimizer};
//! use svft::candle::{AdaptConfig, SvftModel};
//!
//! let config = AdaptConfig { pattern: "banded:2".into(), ..Default::default() };
//! let model = SvftModel::from_checkpoint("model.safetensors", &config)?;
//! let query = model.linear("encoder.layer.0.attention.self.query")?;
//! let mut opt = candle_nn::AdamW::new_lr(model.vars(), 5e-3)?;
//! let x = Tensor::randn(0f32, 1.0, (4, 7, 384), &Device::Cpu)?;
//! opt.backward_step(&query.forward(&x)?.sqr()?.mean_all()?)?;
//! model.save_adapter("adapter.safetensors")?;   // `svft merge` takes it
//! model.save_factors("factors.safetensors", "model.safetensors")?; // with these factors
//! # Ok(()) }
//! ```
//!
//! **Devices.** CPU tensors only. candle's CUDA backend cannot be built alongside this crate:
//! candle-core's `cuda` feature links cudarc at build time (`dynamic-linking`) while this crate
//! loads it at run time (`dynamic-loading`), and cudarc refuses both in one build. A CUDA tensor
//! therefore gets a clear error from [`SvftLinear`]'s forward.
//!
//! **Dtypes.** The layer computes in f32 (SVFT.md section 4: M, gamma and every accumulation in
//! f32). f32 inputs run as they are; f64, bf16 and f16 inputs are converted to f32 at the door
//! and the output back to the input's dtype (candle differentiates the conversions, so such
//! models train too, at f32 precision inside the layer); integer inputs are an error.
//!
//! Files: [`linear`] (the module), [`op`] (the custom op), [`adapt`] (model surgery from a
//! checkpoint or factor file, and the CLI's adapter and factor files).

pub mod adapt;
pub mod linear;
pub mod op;

pub use adapt::{AdaptConfig, SvftModel};
pub use linear::{svft_linear, SvftLinear};

/// A crate error as a candle error, with `what` for context.
pub(crate) fn err(what: &str, e: crate::Error) -> candle_core::Error {
    candle_core::Error::Msg(format!("{what}: {e}"))
}
