//! The CPU backend: faer for the dense products, hand-written sparse passes, one layer type.

pub mod gemm;
pub mod layer;
pub mod sparse;

pub use layer::{CpuLayer, Grads};
