//! Finding a CUDA device and loading the embedded kernels onto it.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::Ptx;

use super::driver_err;
use crate::error::{Error, Result};

/// The fatbin build.rs compiled from kernels/*.cu (sm_80, sm_90a SASS and compute_80 PTX).
#[cfg(svft_kernels)]
const FATBIN: Option<&[u8]> = Some(include_bytes!(env!("SVFT_FATBIN")));
#[cfg(not(svft_kernels))]
const FATBIN: Option<&[u8]> = None;

/// Every kernel the fatbin must provide (per-dtype kernels without their suffix).
const KERNELS_PER_DTYPE: [&str; 14] = [
    "bank_apply_fwd",
    "bank_apply_bwd",
    "band_apply_fwd",
    "band_apply_bwd",
    "coo_apply",
    "band_sddmm_atomic",
    "band_sddmm_partial",
    "coo_sddmm_atomic",
    "coo_sddmm_partial",
    "band_sddmm_apply_bwd_atomic",
    "band_sddmm_apply_bwd_partial",
    "skinny_nn",
    "skinny_reduce",
    "skinny_nt",
];
/// Kernels that exist once (f32 only).
const KERNELS_F32: [&str; 3] = ["sddmm_epilogue", "gate_grad_reduce", "gate_from_gamma"];

/// The dtype suffixes of the per-dtype kernels, in the order [`Gpu`] stores them.
const DTYPE_SUFFIXES: [&str; 3] = ["f32", "bf16", "f16"];

/// Every kernel [`Gpu::new`] loads from the fatbin, so every name `Gpu::kernel` and
/// `Gpu::function` can find.
/// tests/ptxas.rs checks it against the kernels nvcc compiled: a kernel left out here would
/// otherwise only fail at its first launch on a GPU.
pub fn kernel_names() -> Vec<String> {
    KERNELS_PER_DTYPE
        .iter()
        .flat_map(|k| DTYPE_SUFFIXES.map(|s| format!("{k}_{s}")))
        .chain(KERNELS_F32.iter().map(|k| k.to_string()))
        .collect()
}

/// Whether this build carries the compiled kernels (nvcc was found at build time).
pub fn kernels_embedded() -> bool {
    FATBIN.is_some()
}

/// The number of usable CUDA devices, or why there are none: no kernels in this build, no
/// driver library, no device. Probed once per process and cached; never panics.
pub fn device_count() -> Result<usize> {
    static PROBE: OnceLock<std::result::Result<usize, String>> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            if FATBIN.is_none() {
                return Err("this build has no CUDA kernels: nvcc was not found when it was built \
                            (run scripts/install-cuda-toolchain.sh, then rebuild)"
                    .into());
            }
            // SAFETY: only tries to open the driver library; no CUDA call is made.
            if !unsafe { cudarc::driver::sys::is_culib_present() } {
                return Err("no CUDA driver library (libcuda.so) on this machine".into());
            }
            // cudarc loads cuBLAS and cuSOLVER on first use and panics if they are absent: check
            // them here so a driver without them is an error, never a panic (or
            // SVFT_STATUS_PANIC through the C ABI).
            // SAFETY: as above, only opens the libraries.
            if !unsafe { cudarc::cublas::sys::is_culib_present() } {
                return Err("the CUDA driver is present but cuBLAS (libcublas.so) is not".into());
            }
            // SAFETY: as above.
            if !unsafe { cudarc::cusolver::sys::is_culib_present() } {
                return Err("the CUDA driver is present but cuSOLVER (libcusolver.so) is not".into());
            }
            match std::panic::catch_unwind(CudaContext::device_count) {
                Ok(Ok(n)) if n > 0 => Ok(n as usize),
                Ok(Ok(_)) => Err("the CUDA driver reports no device".into()),
                Ok(Err(e)) => Err(format!("the CUDA driver failed to initialise: {e:?}")),
                Err(_) => Err("loading the CUDA driver failed".into()),
            }
        })
        .clone()
        .map_err(Error::Cuda)
}

/// Whether a device name is the virtual GPU's ("svft virtual GPU (H100 limits)").
pub fn is_virtual_name(name: &str) -> bool {
    name.starts_with("svft virtual GPU")
}

/// One device with the kernels loaded: its context, module and every kernel function.
#[derive(Debug)]
pub struct Gpu {
    ctx: Arc<CudaContext>,
    _module: Arc<CudaModule>,
    /// Per-dtype kernels by base name, in [`DTYPE_SUFFIXES`] order: found without building a
    /// name string, so a launch allocates nothing.
    per_dtype: HashMap<&'static str, [CudaFunction; 3]>,
    /// The f32-only kernels by name.
    single: HashMap<&'static str, CudaFunction>,
    name: String,
}

impl Gpu {
    /// Opens device `ordinal` and loads the embedded kernels (once per call: keep the Arc).
    pub fn new(ordinal: usize) -> Result<Arc<Gpu>> {
        let count = device_count()?;
        if ordinal >= count {
            return Err(Error::Cuda(format!("device {ordinal} requested, but only {count} present")));
        }
        let fatbin = FATBIN.expect("device_count() checked the kernels are embedded");
        let ctx = CudaContext::new(ordinal).map_err(|e| driver_err("creating the CUDA context", e))?;
        let module =
            ctx.load_module(Ptx::from_binary(fatbin.to_vec())).map_err(|e| driver_err("loading the kernels", e))?;
        let load =
            |name: &str| module.load_function(name).map_err(|e| driver_err(&format!("finding kernel {name}"), e));
        let mut per_dtype = HashMap::new();
        for base in KERNELS_PER_DTYPE {
            let [f32, bf16, f16] = DTYPE_SUFFIXES.map(|s| load(&format!("{base}_{s}")));
            per_dtype.insert(base, [f32?, bf16?, f16?]);
        }
        let mut single = HashMap::new();
        for name in KERNELS_F32 {
            single.insert(name, load(name)?);
        }
        let name = ctx.name().map_err(|e| driver_err("reading the device name", e))?;
        // cudarc records an event per buffer per launch and joins on it from other streams
        // (a dozen-plus driver calls per launch). svft orders its work itself: a layer runs on
        // one stream, callers order their buffers onto it (CudaLayer's contract, the C ABI's
        // explicit events), so the tracking is off for every path, Rust and C alike.
        // SAFETY: before any buffer svft allocates on this context; `ctx` is the primary
        // context, and a caller that made buffers on it earlier keeps ordering them itself.
        unsafe { ctx.disable_event_tracking() };
        Ok(Arc::new(Gpu { ctx, _module: module, per_dtype, single, name }))
    }

    /// The CUDA context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The device's name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this device is the virtual GPU (`vgpu/`: host memory and CPU threads behind
    /// the CUDA API), whose timings say nothing about speed.
    pub fn is_virtual(&self) -> bool {
        is_virtual_name(&self.name)
    }

    /// A loaded per-dtype kernel: `base` (e.g. `band_apply_fwd`) for the dtype `suffix`
    /// (`Dtype::SUFFIX`), i.e. the `extern "C"` kernel `{base}_{suffix}`.
    pub(crate) fn kernel(&self, base: &str, suffix: &str) -> Result<&CudaFunction> {
        let i = DTYPE_SUFFIXES.iter().position(|&d| d == suffix);
        self.per_dtype.get(base).zip(i).map(|(fs, i)| &fs[i]).ok_or_else(|| {
            Error::Cuda(format!("kernel {base}_{suffix} was not loaded (missing from KERNELS_PER_DTYPE)"))
        })
    }

    /// A loaded f32-only kernel by its `extern "C"` name.
    pub(crate) fn function(&self, name: &str) -> Result<&CudaFunction> {
        self.single
            .get(name)
            .ok_or_else(|| Error::Cuda(format!("kernel {name} was not loaded (missing from KERNELS_F32)")))
    }
}
