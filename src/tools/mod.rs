//! The tools around the layers: the same-run benchmark, its baselines (LoRA, the official
//! layer's order), the memory model behind the bench's byte counts, the training demo and its
//! plot. They use the layers; the layers never use them.

pub mod baseline;
pub mod bench;
pub mod demo;
pub mod memory;
pub mod plot;
