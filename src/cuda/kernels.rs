//! Typed launches of the hand-written kernels (argument lists: docs/KERNELS.md).
//!
//! Launch shapes are chosen here once: 1-D blocks of [`BLOCK`] threads, grids covering the
//! work (every kernel is grid-strided, so a capped grid is still correct).

use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaStream, CudaView, CudaViewMut, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits};

use super::{blas_err, driver_err, Gpu};
use crate::error::{Error, Result};
use crate::geometry::{
    band_sddmm_chunk_rows, ceil_div, coo_sddmm_chunk_rows, coo_sddmm_chunks, epilogue_blocks, fused_bwd_fits,
    fused_bwd_smem, skinny_splits, skinny_stride, APPLY_ROWS, BLOCK, GRID_Y_MAX, SDDMM_OFFSETS, SKINNY_NN_KT,
    SKINNY_NT_KT, SKINNY_NT_ROWS, SKINNY_TOKENS,
};

/// Activation dtypes: f32, bf16, f16. s, M, gamma and all gradients of M stay f32.
pub trait Dtype:
    DeviceRepr + ValidAsZeroBits + Copy + Default + Send + Sync + Unpin + std::fmt::Debug + 'static
{
    /// The dtype's name and kernel-name suffix (`f32`, `bf16`, `f16`: kernels are `{base}_{suffix}`).
    const SUFFIX: &'static str;
    /// Rounds an f32 to this type (round to nearest even).
    fn from_f32(x: f32) -> Self;
    /// Widens to f32 (exact).
    fn to_f32(self) -> f32;
    /// `c = op(a) op(b)` through cuBLAS (f32 compute for the 16-bit types).
    ///
    /// # Safety
    /// The configuration must describe buffers of the sizes given.
    unsafe fn gemm(
        blas: &CudaBlas,
        cfg: GemmConfig<Self>,
        a: &CudaView<'_, Self>,
        b: &CudaView<'_, Self>,
        c: &mut CudaViewMut<'_, Self>,
    ) -> std::result::Result<(), cudarc::cublas::result::CublasError>;
}

macro_rules! dtype {
    ($t:ty, $suffix:literal, $from:expr, $to:expr) => {
        impl Dtype for $t {
            const SUFFIX: &'static str = $suffix;
            fn from_f32(x: f32) -> Self {
                $from(x)
            }
            fn to_f32(self) -> f32 {
                $to(self)
            }
            unsafe fn gemm(
                blas: &CudaBlas,
                cfg: GemmConfig<Self>,
                a: &CudaView<'_, Self>,
                b: &CudaView<'_, Self>,
                c: &mut CudaViewMut<'_, Self>,
            ) -> std::result::Result<(), cudarc::cublas::result::CublasError> {
                <CudaBlas as Gemm<$t>>::gemm(blas, cfg, a, b, c)
            }
        }
    };
}
dtype!(f32, "f32", |x| x, |x| x);
dtype!(half::bf16, "bf16", half::bf16::from_f32, half::bf16::to_f32);
dtype!(half::f16, "f16", half::f16::from_f32, half::f16::to_f32);

/// The SDDMM writes `chunks * nnz` partials (deterministic) or `nnz` sums: a shorter workspace
/// is a host bug, reported as an error before the kernel could write past it.
fn check_workspace(len: usize, deterministic: bool, chunks: usize, nnz: usize) -> Result<()> {
    let need = if deterministic { chunks * nnz } else { nnz };
    if len < need {
        return Err(Error::Cuda(format!("SDDMM workspace holds {len} floats, the launch writes {need}")));
    }
    Ok(())
}

fn grid(x: usize, y: usize) -> (u32, u32, u32) {
    (x.max(1) as u32, y.clamp(1, GRID_Y_MAX) as u32, 1)
}

/// The core C = diag(s) + g M in the layout a kernel needs.
pub(crate) enum CoreArgs<'a> {
    /// Band of half-width d (M in canonical row-major band order).
    Band { d: i32 },
    /// A CSR over the pattern: `ptr[r+1]`, `idx`, `perm` (canonical index).
    Csr { ptr: &'a CudaView<'a, i32>, idx: &'a CudaView<'a, i32>, perm: &'a CudaView<'a, i32> },
}

/// `Y = X C^T` (`forward`) or `Y = X C` for `n` rows of `r` columns. `g` points at the gate
/// value on the device (the layer's gate state, see [`gate_from_gamma`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn apply<T: Dtype>(
    gpu: &Gpu,
    stream: &CudaStream,
    forward: bool,
    core: CoreArgs<'_>,
    x: &CudaView<'_, T>,
    y: &mut CudaViewMut<'_, T>,
    s: &CudaView<'_, f32>,
    m: &CudaView<'_, f32>,
    g: &CudaView<'_, f32>,
    n: usize,
    r: usize,
) -> Result<()> {
    debug_assert!(x.len() >= n * r && y.len() >= n * r);
    let (n_i, r_i) = (n as i32, r as i32);
    let grid_dim = grid(ceil_div(r, BLOCK as usize), ceil_div(n, APPLY_ROWS));
    match core {
        CoreArgs::Band { d } => {
            let name = if forward { "band_apply_fwd" } else { "band_apply_bwd" };
            let f = gpu.kernel(name, T::SUFFIX)?;
            let cfg = LaunchConfig {
                grid_dim,
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: (4 * APPLY_ROWS * (BLOCK as usize + 2 * d as usize)) as u32,
            };
            let mut b = stream.launch_builder(f);
            b.arg(x).arg(y).arg(s).arg(m).arg(g).arg(&n_i).arg(&r_i).arg(&d);
            // SAFETY: argument list and buffer sizes as documented for band_apply_* .
            unsafe { b.launch(cfg) }.map_err(|e| driver_err(name, e))?;
        }
        CoreArgs::Csr { ptr, idx, perm } => {
            let name = "coo_apply";
            let f = gpu.kernel(name, T::SUFFIX)?;
            let cfg = LaunchConfig { grid_dim, block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
            let mut b = stream.launch_builder(f);
            b.arg(x).arg(y).arg(s).arg(m).arg(ptr).arg(idx).arg(perm).arg(g).arg(&n_i).arg(&r_i);
            // SAFETY: argument list and buffer sizes as documented for coo_apply_*.
            unsafe { b.launch(cfg) }.map_err(|e| driver_err(name, e))?;
        }
    }
    Ok(())
}

/// The adapter-dependent arguments of the bank kernels (kernels/bank.cu), on the device, as
/// [`crate::bank::layout::KernelLayout`] lays them out, and the batch's tiles.
pub(crate) struct BankArgs<'a> {
    pub m: &'a CudaView<'a, f32>,
    pub g: &'a CudaView<'a, f32>,
    pub info: &'a CudaView<'a, i32>,
    pub ptr: &'a CudaView<'a, i32>,
    pub idx: &'a CudaView<'a, i32>,
    pub perm: &'a CudaView<'a, i32>,
    pub tiles: &'a CudaView<'a, i32>,
    pub ntiles: usize,
}

/// `Y = X C_a^T` (`forward`) or `Y = X C_a` on every tile of rows, each through its own
/// adapter's core (`n x r` buffers; the tiles say which rows).
#[allow(clippy::too_many_arguments)]
pub(crate) fn bank_apply<T: Dtype>(
    gpu: &Gpu,
    stream: &CudaStream,
    forward: bool,
    x: &CudaView<'_, T>,
    y: &mut CudaViewMut<'_, T>,
    s: &CudaView<'_, f32>,
    a: &BankArgs<'_>,
    r: usize,
) -> Result<()> {
    if a.ntiles == 0 {
        return Ok(());
    }
    let name = if forward { "bank_apply_fwd" } else { "bank_apply_bwd" };
    let f = gpu.kernel(name, T::SUFFIX)?;
    let cfg = LaunchConfig {
        grid_dim: grid(ceil_div(r, BLOCK as usize), a.ntiles),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    let (ntiles, r_i) = (a.ntiles as i32, r as i32);
    let mut b = stream.launch_builder(f);
    b.arg(x).arg(y).arg(s).arg(a.m).arg(a.g).arg(a.info).arg(a.ptr).arg(a.idx).arg(a.perm).arg(a.tiles);
    b.arg(&ntiles).arg(&r_i);
    // SAFETY: argument list and buffer sizes as documented for bank_apply_* (the layout and
    // tiles come from KernelLayout over the same adapters; x and y hold the tiles' rows).
    unsafe { b.launch(cfg) }.map_err(|e| driver_err(name, e))?;
    Ok(())
}

/// The pattern for the SDDMM.
pub(crate) enum SddmmPattern<'a> {
    /// Band of half-width d.
    Band { d: i32 },
    /// Canonical rows and columns, and an optional visiting order (by-row CSR perm).
    Coo { rows: &'a CudaView<'a, i32>, cols: &'a CudaView<'a, i32>, order: &'a CudaView<'a, i32> },
}

/// `dC` over Omega from `a` and `t` (`n x r`), then the epilogue: `dm = g dC` and, with
/// `gate`, `dgamma = g (1-g) sum M dC` (`accumulate`: `dm +=`, `dgamma +=`, for a batch taken
/// in token chunks). `work` holds [`crate::geometry::sddmm_workspace_len`] floats, `gate_partial` one float per
/// epilogue block ([`epilogue_blocks`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn sddmm<T: Dtype>(
    gpu: &Gpu,
    stream: &std::sync::Arc<CudaStream>,
    pattern: SddmmPattern<'_>,
    deterministic: bool,
    a: &CudaView<'_, T>,
    t: &CudaView<'_, T>,
    n: usize,
    r: usize,
    nnz: usize,
    work: &mut CudaViewMut<'_, f32>,
    m: &CudaView<'_, f32>,
    g: &CudaView<'_, f32>,
    dm: &mut CudaViewMut<'_, f32>,
    gate: Option<(&mut CudaViewMut<'_, f32>, &mut CudaViewMut<'_, f32>)>,
    accumulate: bool,
) -> Result<()> {
    let (n_i, r_i, nnz_i) = (n as i32, r as i32, nnz as i32);
    let nchunks = match pattern {
        SddmmPattern::Band { d } => ceil_div(n, band_sddmm_chunk_rows(d as usize)),
        SddmmPattern::Coo { .. } => coo_sddmm_chunks(n),
    };
    check_workspace(work.len(), deterministic, nchunks, nnz)?;
    if !deterministic {
        stream.memset_zeros(work).map_err(|e| driver_err("zeroing dC", e))?;
    }
    match pattern {
        SddmmPattern::Band { d } => {
            let chunk = band_sddmm_chunk_rows(d as usize);
            let name = if deterministic { "band_sddmm_partial" } else { "band_sddmm_atomic" };
            let f = gpu.kernel(name, T::SUFFIX)?;
            let cfg = LaunchConfig {
                grid_dim: grid(ceil_div(r, BLOCK as usize), nchunks),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: (4 * chunk * (2 * BLOCK as usize + 2 * d as usize + SDDMM_OFFSETS - 1)) as u32,
            };
            let chunk_i = chunk as i32;
            let mut b = stream.launch_builder(f);
            b.arg(a).arg(t).arg(&mut *work).arg(&n_i).arg(&r_i).arg(&d).arg(&chunk_i);
            // SAFETY: argument list and sizes as documented for band_sddmm_*.
            unsafe { b.launch(cfg) }.map_err(|e| driver_err(name, e))?;
        }
        SddmmPattern::Coo { rows, cols, order } => {
            let chunk = coo_sddmm_chunk_rows(n);
            let name = if deterministic { "coo_sddmm_partial" } else { "coo_sddmm_atomic" };
            let f = gpu.kernel(name, T::SUFFIX)?;
            let cfg = LaunchConfig {
                grid_dim: grid(ceil_div(nnz, BLOCK as usize), nchunks),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            let chunk_i = chunk as i32;
            let mut b = stream.launch_builder(f);
            b.arg(a)
                .arg(t)
                .arg(rows)
                .arg(cols)
                .arg(order)
                .arg(&mut *work)
                .arg(&n_i)
                .arg(&r_i)
                .arg(&nnz_i)
                .arg(&chunk_i);
            // SAFETY: argument list and sizes as documented for coo_sddmm_*.
            unsafe { b.launch(cfg) }.map_err(|e| driver_err(name, e))?;
        }
    }
    epilogue(gpu, stream, deterministic, nchunks, nnz, work, m, g, dm, gate, accumulate)
}

/// `AC = A C` on the band (backward form of `band_apply_bwd`) and the band SDDMM of `a` and `t`
/// in one pass (`band_sddmm_apply_bwd_*`), then the epilogue as [`sddmm`]. Same arguments as
/// [`sddmm`] for a band pattern, plus `ac` (`n x r`) and `s`. Requires [`fused_bwd_fits`]`(d)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sddmm_apply_bwd<T: Dtype>(
    gpu: &Gpu,
    stream: &std::sync::Arc<CudaStream>,
    d: usize,
    deterministic: bool,
    a: &CudaView<'_, T>,
    t: &CudaView<'_, T>,
    ac: &mut CudaViewMut<'_, T>,
    s: &CudaView<'_, f32>,
    n: usize,
    r: usize,
    nnz: usize,
    work: &mut CudaViewMut<'_, f32>,
    m: &CudaView<'_, f32>,
    g: &CudaView<'_, f32>,
    dm: &mut CudaViewMut<'_, f32>,
    gate: Option<(&mut CudaViewMut<'_, f32>, &mut CudaViewMut<'_, f32>)>,
    accumulate: bool,
) -> Result<()> {
    debug_assert!(fused_bwd_fits(d) && a.len() >= n * r && t.len() >= n * r && ac.len() >= n * r);
    let chunk = band_sddmm_chunk_rows(d);
    let nchunks = ceil_div(n, chunk);
    check_workspace(work.len(), deterministic, nchunks, nnz)?;
    if !deterministic {
        stream.memset_zeros(work).map_err(|e| driver_err("zeroing dC", e))?;
    }
    let name = if deterministic { "band_sddmm_apply_bwd_partial" } else { "band_sddmm_apply_bwd_atomic" };
    let f = gpu.kernel(name, T::SUFFIX)?;
    let cfg = LaunchConfig {
        grid_dim: grid(ceil_div(r, BLOCK as usize), nchunks),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: fused_bwd_smem(d) as u32,
    };
    let (n_i, r_i, d_i, chunk_i) = (n as i32, r as i32, d as i32, chunk as i32);
    let mut b = stream.launch_builder(f);
    b.arg(a).arg(t).arg(&mut *work).arg(ac).arg(s).arg(m).arg(g).arg(&n_i).arg(&r_i).arg(&d_i).arg(&chunk_i);
    // SAFETY: argument list and sizes as documented for band_sddmm_apply_bwd_*.
    unsafe { b.launch(cfg) }.map_err(|e| driver_err(name, e))?;
    epilogue(gpu, stream, deterministic, nchunks, nnz, work, m, g, dm, gate, accumulate)
}

/// `sddmm_epilogue` over the SDDMM's output (`nchunks` partials, or the fast mode's dC) and,
/// with `gate`, `gate_grad_reduce`; both add to `dm` and `dgamma` with `accumulate`.
#[allow(clippy::too_many_arguments)]
fn epilogue(
    gpu: &Gpu,
    stream: &std::sync::Arc<CudaStream>,
    deterministic: bool,
    nchunks: usize,
    nnz: usize,
    work: &mut CudaViewMut<'_, f32>,
    m: &CudaView<'_, f32>,
    g: &CudaView<'_, f32>,
    dm: &mut CudaViewMut<'_, f32>,
    gate: Option<(&mut CudaViewMut<'_, f32>, &mut CudaViewMut<'_, f32>)>,
    accumulate: bool,
) -> Result<()> {
    let nnz_i = nnz as i32;
    let reduced_chunks = if deterministic { nchunks as i32 } else { 1 };
    let blocks = epilogue_blocks(nnz);
    let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let f = gpu.function("sddmm_epilogue")?;
    let accumulate = i32::from(accumulate);
    let null = 0u64;
    match gate {
        Some((gate_partial, dgamma)) => {
            if gate_partial.len() < blocks || dgamma.is_empty() {
                return Err(Error::Cuda(format!(
                    "gate partials hold {} floats and dgamma {}, the epilogue writes {blocks} and 1",
                    gate_partial.len(),
                    dgamma.len()
                )));
            }
            let mut b = stream.launch_builder(f);
            b.arg(&mut *work)
                .arg(&reduced_chunks)
                .arg(m)
                .arg(g)
                .arg(&mut *dm)
                .arg(&mut *gate_partial)
                .arg(&nnz_i)
                .arg(&accumulate);
            // SAFETY: documented arguments; gate_partial holds `blocks` floats.
            unsafe { b.launch(cfg) }.map_err(|e| driver_err("sddmm_epilogue", e))?;
            let f = gpu.function("gate_grad_reduce")?;
            let parts = blocks as i32;
            let mut b = stream.launch_builder(f);
            b.arg(&mut *gate_partial).arg(&parts).arg(g).arg(dgamma).arg(&accumulate);
            let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: documented arguments; exactly one block.
            unsafe { b.launch(cfg) }.map_err(|e| driver_err("gate_grad_reduce", e))?;
        }
        None => {
            let mut b = stream.launch_builder(f);
            b.arg(&mut *work)
                .arg(&reduced_chunks)
                .arg(&null)
                .arg(g)
                .arg(&mut *dm)
                .arg(&null)
                .arg(&nnz_i)
                .arg(&accumulate);
            // SAFETY: documented arguments; M and gate_partial may be NULL without the gate.
            unsafe { b.launch(cfg) }.map_err(|e| driver_err("sddmm_epilogue", e))?;
        }
    }
    Ok(())
}

/// `state = [g, gamma]` from the f32 `gamma` on the device (`gate_from_gamma`), `g = 1`
/// without the gate. One thread; `gamma` may be `state`'s second element.
pub(crate) fn gate_from_gamma(
    gpu: &Gpu,
    stream: &CudaStream,
    gamma: &CudaView<'_, f32>,
    gate: bool,
    state: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    debug_assert!(!gamma.is_empty() && state.len() >= 2);
    let f = gpu.function("gate_from_gamma")?;
    let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1, 1, 1), shared_mem_bytes: 0 };
    let gate = i32::from(gate);
    let mut b = stream.launch_builder(f);
    b.arg(gamma).arg(&gate).arg(state);
    // SAFETY: documented arguments: one float read, two written.
    unsafe { b.launch(cfg) }.map_err(|e| driver_err("gate_from_gamma", e))?;
    Ok(())
}

/// Checks that a skinny product's operands hold their sizes and that its index space fits i32.
fn skinny_check(what: &str, sizes: &[(&str, usize, usize)], dims: [usize; 3]) -> Result<()> {
    if dims.contains(&0) {
        return Err(Error::InvalidArgument(format!("{what}: empty product {dims:?}")));
    }
    let fits = |a: usize, b: usize| a.checked_mul(b).is_some_and(|p| p <= i32::MAX as usize);
    if !(fits(dims[0], dims[1]) && fits(dims[1], dims[2]) && fits(dims[0], dims[2])) {
        return Err(Error::InvalidArgument(format!("{what}: sizes {dims:?} are too large for the kernels")));
    }
    for &(name, have, need) in sizes {
        if have < need {
            return Err(Error::InvalidArgument(format!("{what}: {name} holds {have} elements, needs {need}")));
        }
    }
    Ok(())
}

/// `out[n x c] = x[n x k] b[k x c]` (row-major) with `skinny_nn` (split-K, f32 partials in
/// `work`, at least [`crate::geometry::skinny_workspace_len`] floats) and `skinny_reduce` (fixed-order sum, one
/// rounding to `T`): reads `b` once per 16 tokens, bitwise reproducible.
#[allow(clippy::too_many_arguments)]
pub(crate) fn skinny_nn<T: Dtype>(
    gpu: &Gpu,
    stream: &CudaStream,
    x: &CudaView<'_, T>,
    b: &CudaView<'_, T>,
    out: &mut CudaViewMut<'_, T>,
    work: &mut CudaViewMut<'_, f32>,
    n: usize,
    k: usize,
    c: usize,
) -> Result<()> {
    let splits = skinny_splits(n, k, c, std::mem::size_of::<T>());
    skinny_check(
        "skinny_nn",
        &[
            ("in", x.len(), n.saturating_mul(k)),
            ("B", b.len(), k.saturating_mul(c)),
            ("out", out.len(), n.saturating_mul(c)),
            ("workspace", work.len(), splits.saturating_mul(n).saturating_mul(c)),
        ],
        [n, k, c],
    )?;
    let (n_i, k_i, c_i, splits_i, count_i) = (n as i32, k as i32, c as i32, splits as i32, (n * c) as i32);
    let name = "skinny_nn";
    let f = gpu.kernel(name, T::SUFFIX)?;
    let cfg = LaunchConfig {
        grid_dim: (
            ceil_div(c, BLOCK as usize) as u32,
            splits as u32,
            ceil_div(n, SKINNY_TOKENS).min(GRID_Y_MAX) as u32,
        ),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: (4 * SKINNY_NN_KT * skinny_stride(n)) as u32,
    };
    let mut l = stream.launch_builder(f);
    l.arg(x).arg(b).arg(&mut *work).arg(&n_i).arg(&k_i).arg(&c_i).arg(&splits_i);
    // SAFETY: argument list and buffer sizes checked above, as documented for skinny_nn_*.
    unsafe { l.launch(cfg) }.map_err(|e| driver_err(name, e))?;

    let name = "skinny_reduce";
    let f = gpu.kernel(name, T::SUFFIX)?;
    let cfg = LaunchConfig {
        grid_dim: (ceil_div(n * c, BLOCK as usize).clamp(1, 4096) as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut l = stream.launch_builder(f);
    l.arg(&mut *work).arg(out).arg(&splits_i).arg(&count_i);
    // SAFETY: `work` holds splits * n * c floats, `out` n * c elements (checked above).
    unsafe { l.launch(cfg) }.map_err(|e| driver_err(name, e))?;
    Ok(())
}

/// `out[n x m] = x[n x k] b[m x k]^T` (row-major; contracts over b's contiguous dimension) with
/// `skinny_nt`: a warp per two rows of `b`, bitwise reproducible, no workspace.
#[allow(clippy::too_many_arguments)]
pub(crate) fn skinny_nt<T: Dtype>(
    gpu: &Gpu,
    stream: &CudaStream,
    x: &CudaView<'_, T>,
    b: &CudaView<'_, T>,
    out: &mut CudaViewMut<'_, T>,
    n: usize,
    k: usize,
    m: usize,
) -> Result<()> {
    let sizes = [
        ("in", x.len(), n.saturating_mul(k)),
        ("B", b.len(), m.saturating_mul(k)),
        ("out", out.len(), n.saturating_mul(m)),
    ];
    skinny_check("skinny_nt", &sizes, [n, k, m])?;
    let (n_i, k_i, m_i) = (n as i32, k as i32, m as i32);
    let name = "skinny_nt";
    let f = gpu.kernel(name, T::SUFFIX)?;
    let rows_per_block = SKINNY_NT_ROWS * (BLOCK as usize / 32);
    let cfg = LaunchConfig {
        grid_dim: grid(ceil_div(m, rows_per_block), ceil_div(n, SKINNY_TOKENS)),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: (4 * SKINNY_NT_KT * skinny_stride(n)) as u32,
    };
    let mut l = stream.launch_builder(f);
    l.arg(x).arg(b).arg(out).arg(&n_i).arg(&k_i).arg(&m_i);
    // SAFETY: argument list and buffer sizes checked above, as documented for skinny_nt_*.
    unsafe { l.launch(cfg) }.map_err(|e| driver_err(name, e))?;
    Ok(())
}

/// One operand of a row-major product: `rows x cols` over `data`, used transposed or not.
pub(crate) struct Mat<'a, 'b, T> {
    pub data: &'a CudaView<'b, T>,
    pub rows: usize,
    pub cols: usize,
    pub trans: bool,
}

/// `c = op(a) op(b)` (+ `c` with `accumulate`) on row-major buffers, `c` is `m x n`.
///
/// cuBLAS is column-major: a row-major `m x n` matrix is the column-major `n x m` transpose,
/// so `C = A B` is computed as `C^T = B^T A^T` with the operands swapped.
pub(crate) fn gemm<T: Dtype>(
    blas: &CudaBlas,
    c: &mut CudaViewMut<'_, T>,
    a: Mat<'_, '_, T>,
    b: Mat<'_, '_, T>,
    accumulate: bool,
) -> Result<()> {
    use cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
    let (m, k) = if a.trans { (a.cols, a.rows) } else { (a.rows, a.cols) };
    let n = if b.trans { b.rows } else { b.cols };
    gemm_dims_ok(c.len(), a.extent(), b.extent())?;
    let cfg = GemmConfig {
        transa: if b.trans { CUBLAS_OP_T } else { CUBLAS_OP_N },
        transb: if a.trans { CUBLAS_OP_T } else { CUBLAS_OP_N },
        m: n as i32,
        n: m as i32,
        k: k as i32,
        alpha: T::from_f32(1.0),
        lda: b.cols as i32,
        ldb: a.cols as i32,
        beta: T::from_f32(if accumulate { 1.0 } else { 0.0 }),
        ldc: n as i32,
    };
    // SAFETY: the sizes were checked above against the configuration.
    unsafe { T::gemm(blas, cfg, b.data, a.data, c) }.map_err(|e| blas_err("gemm", e))
}

/// An operand's extent as [`gemm`] checks it: buffer length, stored rows and columns, transposed.
#[derive(Clone, Copy)]
struct Extent {
    len: usize,
    rows: usize,
    cols: usize,
    trans: bool,
}

impl<T> Mat<'_, '_, T> {
    fn extent(&self) -> Extent {
        Extent { len: self.data.len(), rows: self.rows, cols: self.cols, trans: self.trans }
    }
}

/// The checks [`gemm`] makes before it hands buffers to cuBLAS: inner dimensions agree, every
/// buffer holds its matrix, every dimension fits cuBLAS's `int`. An error, never a panic: the
/// sizes can come from outside (the C ABI).
fn gemm_dims_ok(c_len: usize, a: Extent, b: Extent) -> Result<()> {
    let (m, k) = if a.trans { (a.cols, a.rows) } else { (a.rows, a.cols) };
    let (k2, n) = if b.trans { (b.cols, b.rows) } else { (b.rows, b.cols) };
    if k != k2 {
        return Err(Error::InvalidArgument(format!("gemm: inner dimensions differ ({k} vs {k2})")));
    }
    if [m, n, k].iter().any(|&x| x > i32::MAX as usize) {
        return Err(Error::InvalidArgument(format!("gemm: {m} x {n} x {k} exceeds cuBLAS's 32-bit sizes")));
    }
    let holds = |len: usize, rows: usize, cols: usize| rows.checked_mul(cols).is_some_and(|e| len >= e);
    for (what, len, rows, cols) in [("A", a.len, a.rows, a.cols), ("B", b.len, b.rows, b.cols), ("C", c_len, m, n)] {
        if !holds(len, rows, cols) {
            return Err(Error::InvalidArgument(format!("gemm: {what} holds {len} elements, needs {rows} x {cols}")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::{band_sddmm_chunk_rows, coo_sddmm_chunks, sddmm_workspace_len};

    /// The workspace is grown for the largest chunk and reused by every smaller one: it must
    /// hold the partials of any row count up to the one it was sized for.
    #[test]
    fn sddmm_workspace_covers_every_smaller_chunk() {
        let nnz = 7;
        let mut worst = 0;
        for n in 1..=20_000 {
            worst = worst.max(coo_sddmm_chunks(n));
            assert!(sddmm_workspace_len(None, true, n, nnz) >= worst * nnz, "n = {n}");
            for d in [0, 2, 16] {
                let band = ceil_div(n, band_sddmm_chunk_rows(d));
                assert!(sddmm_workspace_len(Some(d), true, n, nnz) >= band * nnz);
            }
        }
        // The case that overran: a chunk of 2049 tokens, then a last chunk of 2048.
        assert!(sddmm_workspace_len(None, true, 2049, nnz) >= 64 * nnz);
        assert!(check_workspace(63 * nnz, true, coo_sddmm_chunks(2048), nnz).is_err());
        assert!(check_workspace(64 * nnz, true, coo_sddmm_chunks(2048), nnz).is_ok());
    }

    #[test]
    fn gemm_size_errors_are_errors() {
        let e = |len, rows, cols, trans| Extent { len, rows, cols, trans };
        // C (3 x 5) = A (3 x 4) B (4 x 5), and with B stored transposed (5 x 4).
        assert!(gemm_dims_ok(15, e(12, 3, 4, false), e(20, 4, 5, false)).is_ok());
        assert!(gemm_dims_ok(15, e(12, 3, 4, false), e(20, 5, 4, true)).is_ok());
        let bad = [
            gemm_dims_ok(15, e(12, 3, 4, false), e(20, 5, 4, false)), // inner 4 vs 5
            gemm_dims_ok(14, e(12, 3, 4, false), e(20, 4, 5, false)), // C short
            gemm_dims_ok(15, e(11, 3, 4, false), e(20, 4, 5, false)), // A short
            gemm_dims_ok(15, e(12, 3, 4, false), e(19, 4, 5, false)), // B short
            gemm_dims_ok(usize::MAX, e(usize::MAX, 1, 1 << 31, false), e(usize::MAX, 1 << 31, 1, false)),
            gemm_dims_ok(usize::MAX, e(usize::MAX, usize::MAX, 2, false), e(4, 2, 2, false)), // overflow
        ];
        for r in bad {
            assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
        }
    }
}
