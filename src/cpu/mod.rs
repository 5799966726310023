//! The CPU backend: faer (or a system BLAS, `SVFT_GEMM`) for the dense products, hand-written
//! sparse passes, one layer type.

pub mod blas;
pub mod gemm;
pub mod layer;
pub mod sparse;

pub use layer::{CpuLayer, Grads};

/// The CPU backend's device: the CPU model, the thread count and the GEMM backend (reports,
/// calibration keys: a plan measured on one GEMM is not reused on another).
pub fn device_name() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    format!("{model}, {} threads, gemm {}", rayon::current_num_threads(), blas::backend().name())
}
