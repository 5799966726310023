//! # svft
//!
//! SVFT (Singular Vectors guided Fine-Tuning) layers: a frozen weight is decomposed once,
//! `W0 = U diag(s) V^T`, and training learns only a sparse `r x r` matrix `M` on a fixed
//! pattern, `W = U (diag(s) + g M) V^T`. See `SVFT.md` (shared with the project) for the math.
//!
//! - [`pattern`]: the sparsity patterns (plain, banded, random, top-k) and their index sets.
//! - [`svd`]: the one-time thin SVD on the CPU and the frozen [`svd::Factors`].
//! - [`cpu`]: the CPU layer (faer GEMMs plus hand-written sparse passes).
//! - [`cuda`]: the CUDA layer (hand-written kernels, cuBLAS), on the caller's buffers and stream.
//! - [`plan`]: the factored and merged execution plans and their cost model.
//! - [`reference`]: an f64 dense reference, for tests.
//! - [`checkpoint`]: safetensors checkpoints (single or sharded; f32, bf16, f16), read lazily.
//! - [`adapter`]: the factor and adapter file formats, their checksums and checks.
//! - [`demo`]: the training demo behind a bare `svft`: SVFT (plain, banded) and LoRA against a
//!   teacher on a transformer-shaped stack.
//! - [`plot`]: a small PNG line plot (the demo's loss curves).
//!
//! ```
//! use svft::{cpu::CpuLayer, LayerConfig};
//! // A 8x6 weight, adapted with a band of half-width 1 around the diagonal.
//! let w: Vec<f32> = (0..48).map(|i| ((i * 7 % 13) as f32 - 6.0) / 6.0).collect();
//! let config = LayerConfig { pattern: "banded:1".parse().unwrap(), ..Default::default() };
//! let mut layer = CpuLayer::from_weight(&w, 8, 6, None, &config, None).unwrap();
//! assert!(layer.svd_residual().unwrap() < 1e-5);
//! // Zero init: the layer reproduces W0 until M is trained.
//! let merged = layer.merge();
//! assert!(merged.iter().zip(&w).all(|(a, b)| (a - b).abs() < 1e-4));
//! ```

pub mod adapter;
pub mod baseline;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod cpu;
pub mod cuda;
pub mod demo;
pub mod error;
pub mod pattern;
pub mod plan;
pub mod plot;
pub mod reference;
pub mod rng;
pub mod svd;

pub use config::{Init, LayerConfig};
pub use error::{Error, Result};
pub use pattern::{Omega, Pattern, TopKCriterion};
pub use plan::{ExecPlan, Plan};

/// README's examples are compiled and run as doctests, so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
