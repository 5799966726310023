//! The CPU backend: faer for the dense products, hand-written sparse passes, one layer type.

pub mod gemm;
pub mod layer;
pub mod sparse;

pub use layer::{CpuLayer, Grads};

/// The CPU backend's device: the CPU model and the thread count (reports, calibration keys).
pub fn device_name() -> String {
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
