//! Helpers shared by the integration tests.
#![allow(dead_code)]

use svft::rng::Rng;
use svft::svd::{random_factors, Factors};

/// f32 tolerance of SVFT.md section 4 (relative Frobenius error against f64).
pub const F32_TOL: f64 = 1e-5;

/// Odd shapes: d_out > d_in, d_out < d_in, square, and a truncated rank; r never a multiple of 8.
pub const SHAPES: [(usize, usize, usize); 4] = [(37, 23, 23), (19, 41, 19), (29, 29, 29), (37, 23, 13)];

/// Random orthonormal factors of the given shape.
pub fn factors(d_out: usize, d_in: usize, r: usize, seed: u64) -> Factors {
    random_factors(d_out, d_in, r, seed).unwrap()
}

/// `len` standard normal f32 values.
pub fn randn(len: usize, seed: u64) -> Vec<f32> {
    Rng::new(seed).normal_vec(len, 1.0)
}

/// Widens to f64.
pub fn wide(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// A buffer full of NaN: an output that a pass forgets to write can never pass a comparison.
pub fn poisoned(len: usize) -> Vec<f32> {
    vec![f32::NAN; len]
}

// ---- GPU tests: the device, the log of what ran, child processes ---------------------------

/// Appends `line` to `$SVFT_GPU_TEST_LOG` (when set): scripts/test.sh counts the GPU tests that
/// ran and those that skipped from it, since cargo hides a passing test's output.
pub fn gpu_log(line: &str) {
    use std::io::Write;
    if let Ok(path) = std::env::var("SVFT_GPU_TEST_LOG") {
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            // One write per line: tests log in parallel, and `writeln!` may split the text and
            // its newline into two writes, which then interleave (two lines ran together and
            // the count lost one).
            let _ = f.write_all(format!("{line}\n").as_bytes());
        }
    }
}

/// Whether a GPU test must fail rather than skip without a device (scripts/test.sh with the
/// virtual GPU, gpu-run.sh on real hardware).
pub fn gpu_required() -> bool {
    std::env::var("SVFT_REQUIRE_GPU").as_deref() == Ok("1")
}

/// Opens device 0 for GPU test `test`, or says in one line why it cannot (and fails instead
/// with SVFT_REQUIRE_GPU=1). Logs "ran" or "skipped" (see [`gpu_log`]).
pub fn gpu_or_skip(test: &str) -> Option<std::sync::Arc<svft::cuda::Gpu>> {
    match svft::cuda::device_count().and_then(|_| svft::cuda::Gpu::new(0)) {
        Ok(gpu) => {
            gpu_log(&format!("ran: {test} on {}", gpu.name()));
            Some(gpu)
        }
        Err(e) if gpu_required() => panic!("{test}: no GPU: {e}"),
        Err(e) => {
            gpu_log(&format!("skipped: {test}: no CUDA device ({e})"));
            println!("{test}: skipped: no CUDA device ({e})");
            None
        }
    }
}

/// The name of the variable that marks a test's re-run in a child process.
const CHILD: &str = "SVFT_TEST_CHILD";

/// Whether this process is the child that [`run_in_child`] started for `test`.
pub fn is_child(test: &str) -> bool {
    std::env::var(CHILD).as_deref() == Ok(test)
}

/// Runs test `test` of this test binary again in a child process with `env` set (a process-wide
/// state, such as which CUDA libraries the loader finds or how many devices there are, can only
/// be chosen before a process starts). The test's body runs in the child ([`is_child`]); the
/// parent asserts that the child passed and returns its output.
pub fn run_in_child(test: &str, env: &[(&str, String)]) -> String {
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut cmd = std::process::Command::new(exe);
    cmd.args([test, "--exact", "--nocapture", "--test-threads=1"]).env(CHILD, test);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("starting the test binary again");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{test} failed in its child process:\n{text}");
    assert!(text.contains("1 passed"), "{test}: the child ran no test:\n{text}");
    text
}

/// The virtual GPU's library folders (vgpu/build.sh): `lib` (driver, cuBLAS, cuSOLVER),
/// `driver-only`, `no-cusolver`. `None` when the tests do not run on the virtual GPU
/// (`$SVFT_VGPU_LIB` unset).
pub fn vgpu_lib_dir(variant: &str) -> Option<String> {
    let lib = std::path::PathBuf::from(std::env::var("SVFT_VGPU_LIB").ok()?);
    let dir = if variant == "lib" { lib } else { lib.parent()?.join(variant) };
    Some(dir.to_string_lossy().into_owned())
}

/// The C ABI's last error message on this thread (`svft_last_error`: a length query, then a
/// buffer of that size).
pub fn last_error() -> String {
    use std::ffi::c_char;
    use svft::ffi::{svft_last_error, SvftStatus};
    let mut len = 0usize;
    // SAFETY: a length query, then a buffer of that size.
    unsafe {
        assert_eq!(svft_last_error(std::ptr::null_mut(), 0, &mut len), SvftStatus::Ok);
        let mut buf = vec![0u8; len + 1];
        assert_eq!(svft_last_error(buf.as_mut_ptr().cast::<c_char>(), buf.len(), std::ptr::null_mut()), SvftStatus::Ok);
        String::from_utf8_lossy(&buf[..len]).into_owned()
    }
}

/// One pattern spec of every kind, for tests that sweep them.
pub const PATTERNS: [&str; 5] = ["plain", "banded:2", "random:3:seed=5", "topk:2", "topk:2:official"];

/// Whether a top-k pattern exists for this shape (tested as an error elsewhere).
pub fn pattern_possible(p: &svft::Pattern, d_out: usize, d_in: usize, r: usize) -> bool {
    match p {
        svft::Pattern::TopK { criterion: svft::TopKCriterion::Paper, .. } => d_out == d_in,
        svft::Pattern::TopK { .. } => r == d_out || r == d_in,
        _ => true,
    }
}

/// The CUDA context of device 0 for a test that drives the C ABI with its own device buffers,
/// or `None` after [`gpu_or_skip`] said why there is none.
pub fn device_or_skip(test: &str) -> Option<std::sync::Arc<cudarc::driver::CudaContext>> {
    gpu_or_skip(test)?;
    Some(cudarc::driver::CudaContext::new(0).unwrap())
}

/// The raw device address of `s`, as a C caller passes it.
pub fn dptr<T>(
    s: &cudarc::driver::CudaSlice<T>,
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
) -> *mut std::ffi::c_void {
    use cudarc::driver::DevicePtr;
    let (p, _sync) = s.device_ptr(stream);
    p as *mut std::ffi::c_void
}

/// `host` rounded to `T` and copied to the device on `stream`.
pub fn upload<T: svft::cuda::Dtype>(
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    host: &[f32],
) -> cudarc::driver::CudaSlice<T> {
    stream.clone_htod(&host.iter().map(|&x| T::from_f32(x)).collect::<Vec<T>>()).unwrap()
}
