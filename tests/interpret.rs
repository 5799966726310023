//! The CUDA kernels (kernels/*.cu) run in interpret mode (kernels/interpret: the same source compiled
//! as C++ and run on CPU threads) through their `svft_interp_*` C wrappers, called with exactly
//! the argument lists of the CUDA launches (docs/KERNELS.md), and checked against an f64
//! reference computed here from the definitions of SVFT.md section 2.
//!
//! Covered: `band_apply_{fwd,bwd}`, `coo_apply` (CSR by row for the forward form, by column for
//! the backward form, built here from `Omega` with a stable counting sort), `{band,coo}_sddmm`
//! in the fast (atomic) and deterministic (partial) modes, `sddmm_epilogue` and
//! `gate_grad_reduce`, the fused `band_sddmm_apply_bwd_{atomic,partial}` (against f64 and bit for
//! bit against the unfused `band_sddmm_partial` and `band_apply_bwd`, d = 0, 1, 2, 16 at r = 37,
//! 13, 1, chunk_rows 3, 5, 16, 64), for every activation dtype (f32, bf16, f16), on odd shapes (r = 37,
//! n = 53 tokens; the folds `U_C = U C` with n = d_out = 61 and `V_C = V C^T` with n = d_in = 37),
//! patterns plain, banded:2, random:3 (with duplicates, checked) and topk:3 (official score),
//! blocks of 32, 64, 128 and 256 threads, full grids (partial last blocks: 37 and 53 are not
//! multiples of any block or row group) and smaller grids (grid-stride loops). Every output is
//! poisoned with NaN before each launch, so an unwritten element can never pass.
//!
//! Tolerances (relative Frobenius error against f64): the reference is computed from the inputs
//! *as the kernel sees them* (bf16/f16 activations rounded to their dtype, f32 `s`, `M`, `g`),
//! so the error measures the kernel alone: < 1e-5 for every f32 output (f32 apply outputs and
//! every SDDMM / epilogue output, whatever the activation dtype) and < 1e-2 for bf16/f16 apply
//! outputs (one rounding on store). The gate gradient is compared with
//! `g (1-g) sum_k M_k dC_k` to 1e-5 of `g (1-g) sum_k |M_k dC_k|` (the sum cancels).
//! The deterministic SDDMM is checked bitwise identical on rerun and across SDDMM block and grid
//! sizes (and, for COO, with and without the visiting order) for a fixed `chunk_rows`.
//!
//! Compiled only with `--features interpret` (needs the CUDA headers: run
//! scripts/install-cuda-toolchain.sh). Launches are serialised process-wide by the interpreter.
#![cfg(feature = "interpret")]

use half::{bf16, f16};
use svft::geometry;
use svft::pattern::{Omega, Pattern};
use svft::reference::{rel_err, Reference};
use svft::rng::Rng;
use svft::svd::{random_factors, Factors};

// ---------------------------------------------------------------------------------------------
// The C ABI of kernels/interpret/svft_interp.h.

/// `svft_launch_cfg`: grid (x, y, z), block (x, y, z), dynamic shared memory bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct Cfg {
    grid: [u32; 3],
    block: [u32; 3],
    shared_mem_bytes: u32,
}

fn cfg(grid: (u32, u32), block: u32, shared_mem_bytes: u32) -> Cfg {
    Cfg { grid: [grid.0, grid.1, 1], block: [block, 1, 1], shared_mem_bytes }
}

macro_rules! declare_dtype {
    ($t:ty, $band_fwd:ident, $band_bwd:ident, $coo_apply:ident, $band_atomic:ident,
     $band_partial:ident, $coo_atomic:ident, $coo_partial:ident) => {
        extern "C" {
            fn $band_fwd(
                c: Cfg,
                x: *const $t,
                y: *mut $t,
                s: *const f32,
                m: *const f32,
                g: f32,
                n: i32,
                r: i32,
                d: i32,
            ) -> i32;
            fn $band_bwd(
                c: Cfg,
                x: *const $t,
                y: *mut $t,
                s: *const f32,
                m: *const f32,
                g: f32,
                n: i32,
                r: i32,
                d: i32,
            ) -> i32;
            fn $coo_apply(
                c: Cfg,
                x: *const $t,
                y: *mut $t,
                s: *const f32,
                m: *const f32,
                ptr: *const i32,
                idx: *const i32,
                perm: *const i32,
                g: f32,
                n: i32,
                r: i32,
            ) -> i32;
            fn $band_atomic(
                c: Cfg,
                a: *const $t,
                x: *const $t,
                dc: *mut f32,
                n: i32,
                r: i32,
                d: i32,
                chunk_rows: i32,
            ) -> i32;
            fn $band_partial(
                c: Cfg,
                a: *const $t,
                x: *const $t,
                ws: *mut f32,
                n: i32,
                r: i32,
                d: i32,
                chunk_rows: i32,
            ) -> i32;
            fn $coo_atomic(
                c: Cfg,
                a: *const $t,
                x: *const $t,
                rows: *const i32,
                cols: *const i32,
                order: *const i32,
                dc: *mut f32,
                n: i32,
                r: i32,
                nnz: i32,
                chunk_rows: i32,
            ) -> i32;
            fn $coo_partial(
                c: Cfg,
                a: *const $t,
                x: *const $t,
                rows: *const i32,
                cols: *const i32,
                order: *const i32,
                ws: *mut f32,
                n: i32,
                r: i32,
                nnz: i32,
                chunk_rows: i32,
            ) -> i32;
        }
    };
}

declare_dtype!(
    f32,
    svft_interp_band_apply_fwd_f32,
    svft_interp_band_apply_bwd_f32,
    svft_interp_coo_apply_f32,
    svft_interp_band_sddmm_atomic_f32,
    svft_interp_band_sddmm_partial_f32,
    svft_interp_coo_sddmm_atomic_f32,
    svft_interp_coo_sddmm_partial_f32
);
declare_dtype!(
    u16,
    svft_interp_band_apply_fwd_bf16,
    svft_interp_band_apply_bwd_bf16,
    svft_interp_coo_apply_bf16,
    svft_interp_band_sddmm_atomic_bf16,
    svft_interp_band_sddmm_partial_bf16,
    svft_interp_coo_sddmm_atomic_bf16,
    svft_interp_coo_sddmm_partial_bf16
);
declare_dtype!(
    u16,
    svft_interp_band_apply_fwd_f16,
    svft_interp_band_apply_bwd_f16,
    svft_interp_coo_apply_f16,
    svft_interp_band_sddmm_atomic_f16,
    svft_interp_band_sddmm_partial_f16,
    svft_interp_coo_sddmm_atomic_f16,
    svft_interp_coo_sddmm_partial_f16
);

macro_rules! declare_skinny {
    ($t:ty, $nn:ident, $reduce:ident, $nt:ident) => {
        extern "C" {
            fn $nn(c: Cfg, x: *const $t, b: *const $t, partial: *mut f32, n: i32, k: i32, cc: i32, splits: i32) -> i32;
            fn $reduce(c: Cfg, partial: *const f32, y: *mut $t, splits: i32, count: i32) -> i32;
            fn $nt(c: Cfg, x: *const $t, b: *const $t, y: *mut $t, n: i32, k: i32, m: i32) -> i32;
        }
    };
}
declare_skinny!(f32, svft_interp_skinny_nn_f32, svft_interp_skinny_reduce_f32, svft_interp_skinny_nt_f32);
declare_skinny!(u16, svft_interp_skinny_nn_bf16, svft_interp_skinny_reduce_bf16, svft_interp_skinny_nt_bf16);
declare_skinny!(u16, svft_interp_skinny_nn_f16, svft_interp_skinny_reduce_f16, svft_interp_skinny_nt_f16);

extern "C" {
    fn svft_interp_sddmm_epilogue(
        c: Cfg,
        partial: *const f32,
        nchunks: i32,
        m: *const f32,
        g: f32,
        dm: *mut f32,
        gate_partial: *mut f32,
        nnz: i32,
        accumulate: i32,
    ) -> i32;
    fn svft_interp_gate_grad_reduce(
        c: Cfg,
        gate_partial: *const f32,
        nparts: i32,
        g: f32,
        dgamma: *mut f32,
        accumulate: i32,
    ) -> i32;
    fn svft_interp_gate_from_gamma(c: Cfg, gamma: *const f32, gate: i32, state: *mut f32) -> i32;
}

// ---------------------------------------------------------------------------------------------
// Activation dtypes.

/// An activation dtype: its conversions and its kernels. The element type of the C ABI is the
/// dtype itself for f32 and its 16-bit pattern (`u16`, `half`'s `to_bits` layout: `bf16` and
/// `f16` are `repr(transparent)` over `u16`) for bf16 and f16.
trait Act: Copy + Send + Sync + 'static {
    type Abi;
    const NAME: &'static str;
    /// Tolerance for outputs stored in this dtype.
    const TOL: f64;
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
    fn nan() -> Self;
    fn kernels() -> Kernels<Self::Abi>;
}

#[allow(clippy::type_complexity)]
struct Kernels<A> {
    band_fwd: unsafe extern "C" fn(Cfg, *const A, *mut A, *const f32, *const f32, f32, i32, i32, i32) -> i32,
    band_bwd: unsafe extern "C" fn(Cfg, *const A, *mut A, *const f32, *const f32, f32, i32, i32, i32) -> i32,
    coo_apply: unsafe extern "C" fn(
        Cfg,
        *const A,
        *mut A,
        *const f32,
        *const f32,
        *const i32,
        *const i32,
        *const i32,
        f32,
        i32,
        i32,
    ) -> i32,
    band_atomic: unsafe extern "C" fn(Cfg, *const A, *const A, *mut f32, i32, i32, i32, i32) -> i32,
    band_partial: unsafe extern "C" fn(Cfg, *const A, *const A, *mut f32, i32, i32, i32, i32) -> i32,
    coo_atomic: unsafe extern "C" fn(
        Cfg,
        *const A,
        *const A,
        *const i32,
        *const i32,
        *const i32,
        *mut f32,
        i32,
        i32,
        i32,
        i32,
    ) -> i32,
    coo_partial: unsafe extern "C" fn(
        Cfg,
        *const A,
        *const A,
        *const i32,
        *const i32,
        *const i32,
        *mut f32,
        i32,
        i32,
        i32,
        i32,
    ) -> i32,
    skinny_nn: unsafe extern "C" fn(Cfg, *const A, *const A, *mut f32, i32, i32, i32, i32) -> i32,
    skinny_reduce: unsafe extern "C" fn(Cfg, *const f32, *mut A, i32, i32) -> i32,
    skinny_nt: unsafe extern "C" fn(Cfg, *const A, *const A, *mut A, i32, i32, i32) -> i32,
}

impl Act for f32 {
    type Abi = f32;
    const NAME: &'static str = "f32";
    const TOL: f64 = 1e-5;
    fn from_f32(x: f32) -> Self {
        x
    }
    fn to_f32(self) -> f32 {
        self
    }
    fn nan() -> Self {
        f32::NAN
    }
    fn kernels() -> Kernels<f32> {
        Kernels {
            band_fwd: svft_interp_band_apply_fwd_f32,
            band_bwd: svft_interp_band_apply_bwd_f32,
            coo_apply: svft_interp_coo_apply_f32,
            band_atomic: svft_interp_band_sddmm_atomic_f32,
            band_partial: svft_interp_band_sddmm_partial_f32,
            coo_atomic: svft_interp_coo_sddmm_atomic_f32,
            coo_partial: svft_interp_coo_sddmm_partial_f32,
            skinny_nn: svft_interp_skinny_nn_f32,
            skinny_reduce: svft_interp_skinny_reduce_f32,
            skinny_nt: svft_interp_skinny_nt_f32,
        }
    }
}

macro_rules! half_act {
    ($t:ty, $name:literal, $band_fwd:ident, $band_bwd:ident, $coo_apply:ident, $band_atomic:ident,
     $band_partial:ident, $coo_atomic:ident, $coo_partial:ident, $skinny_nn:ident, $skinny_reduce:ident,
     $skinny_nt:ident) => {
        impl Act for $t {
            type Abi = u16;
            const NAME: &'static str = $name;
            const TOL: f64 = 1e-2;
            fn from_f32(x: f32) -> Self {
                <$t>::from_f32(x) // round to nearest even, as __float2*_rn
            }
            fn to_f32(self) -> f32 {
                <$t>::to_f32(self)
            }
            fn nan() -> Self {
                <$t>::NAN
            }
            fn kernels() -> Kernels<u16> {
                Kernels {
                    band_fwd: $band_fwd,
                    band_bwd: $band_bwd,
                    coo_apply: $coo_apply,
                    band_atomic: $band_atomic,
                    band_partial: $band_partial,
                    coo_atomic: $coo_atomic,
                    coo_partial: $coo_partial,
                    skinny_nn: $skinny_nn,
                    skinny_reduce: $skinny_reduce,
                    skinny_nt: $skinny_nt,
                }
            }
        }
    };
}

half_act!(
    bf16,
    "bf16",
    svft_interp_band_apply_fwd_bf16,
    svft_interp_band_apply_bwd_bf16,
    svft_interp_coo_apply_bf16,
    svft_interp_band_sddmm_atomic_bf16,
    svft_interp_band_sddmm_partial_bf16,
    svft_interp_coo_sddmm_atomic_bf16,
    svft_interp_coo_sddmm_partial_bf16,
    svft_interp_skinny_nn_bf16,
    svft_interp_skinny_reduce_bf16,
    svft_interp_skinny_nt_bf16
);
half_act!(
    f16,
    "f16",
    svft_interp_band_apply_fwd_f16,
    svft_interp_band_apply_bwd_f16,
    svft_interp_coo_apply_f16,
    svft_interp_band_sddmm_atomic_f16,
    svft_interp_band_sddmm_partial_f16,
    svft_interp_coo_sddmm_atomic_f16,
    svft_interp_coo_sddmm_partial_f16,
    svft_interp_skinny_nn_f16,
    svft_interp_skinny_reduce_f16,
    svft_interp_skinny_nt_f16
);

/// Pointer to the ABI element type (identity for f32, the u16 bit pattern for bf16/f16).
fn abi<T: Act>(x: &[T]) -> *const T::Abi {
    assert_eq!(std::mem::size_of::<T>(), std::mem::size_of::<T::Abi>());
    x.as_ptr().cast()
}
fn abi_mut<T: Act>(x: &mut [T]) -> *mut T::Abi {
    assert_eq!(std::mem::size_of::<T>(), std::mem::size_of::<T::Abi>());
    x.as_mut_ptr().cast()
}

fn ok(rc: i32, what: &str) {
    assert_eq!(rc, 0, "{what}: launch wrapper returned {rc}");
}

// ---------------------------------------------------------------------------------------------
// Host-side preparation: CSRs, launch shapes, shared memory sizes (docs/KERNELS.md).

// The kernels' compile-time constants, from the one host copy (checked against the .cu defines).
const APPLY_ROWS: u32 = geometry::APPLY_ROWS as u32;
const SDDMM_OFFSETS: u32 = geometry::SDDMM_OFFSETS as u32;
/// The device's dynamic shared memory limit without opt-in: configurations above it are not
/// launched (the CUDA path could not launch them either).
const SMEM_LIMIT: u32 = geometry::SMEM_LIMIT as u32;
const BLOCKS: [u32; 4] = [32, 64, 128, 256];

fn band_apply_smem(block: u32, d: usize) -> u32 {
    4 * APPLY_ROWS * (block + 2 * d as u32)
}
fn band_sddmm_smem(block: u32, d: usize, chunk_rows: usize) -> u32 {
    4 * chunk_rows as u32 * (2 * block + 2 * d as u32 + SDDMM_OFFSETS - 1)
}
fn ceil_div(a: usize, b: usize) -> u32 {
    a.div_ceil(b) as u32
}

/// A CSR of the pattern as the kernels take it (i32): `ptr[r+1]`, `idx[nnz]` (the other
/// coordinate), `perm[nnz]` (canonical index k); from the pattern's own ([`Omega::csr_by_row`]).
struct Csr {
    ptr: Vec<i32>,
    idx: Vec<i32>,
    perm: Vec<i32>,
}

fn csr(c: svft::pattern::Csr) -> Csr {
    let i32s = |v: &[u32]| v.iter().map(|&x| i32::try_from(x).unwrap()).collect();
    Csr { ptr: i32s(&c.ptr), idx: i32s(&c.idx), perm: i32s(&c.perm) }
}

/// One pattern, prepared for the kernels.
struct Pat {
    name: String,
    omega: Omega,
    /// `Some(d)` for Plain / Banded (the stencil kernels apply), `None` for COO patterns.
    band: Option<usize>,
    rows: Vec<i32>,
    cols: Vec<i32>,
    by_row: Csr,
    by_col: Csr,
}

impl Pat {
    fn new(spec: &str, f: &Factors) -> Pat {
        let pattern: Pattern = spec.parse().unwrap();
        let omega = pattern.omega(f).unwrap();
        let band = pattern.is_banded().then(|| pattern.d());
        let rows: Vec<i32> = omega.rows.iter().map(|&v| v as i32).collect();
        let cols: Vec<i32> = omega.cols.iter().map(|&v| v as i32).collect();
        let by_row = csr(omega.csr_by_row());
        let by_col = csr(omega.csr_by_col());
        Pat { name: spec.to_string(), omega, band, rows, cols, by_row, by_col }
    }
    fn nnz(&self) -> usize {
        self.omega.len()
    }
}

/// Shapes: r = 37 (rank), n = 53 tokens, and the factors of a 61 x 37 weight (d_out != d_in,
/// so the folds run over n = 61 rows of U and n = 37 rows of V; V square lets top-k use the
/// official score).
const N: usize = 53;
const D_OUT: usize = 61;
const D_IN: usize = 37;
const R: usize = 37;
const SPECS: [&str; 4] = ["plain", "banded:2", "random:3:seed=11", "topk:3:official"];

fn setup() -> (Factors, Vec<Pat>) {
    let f = random_factors(D_OUT, D_IN, R, 2024).unwrap();
    let pats: Vec<Pat> = SPECS.iter().map(|s| Pat::new(s, &f)).collect();
    // The random pattern must exercise duplicates (values add; each gets the full dC).
    let rnd = &pats[2].omega;
    let mut pairs: Vec<(u32, u32)> = rnd.rows.iter().copied().zip(rnd.cols.iter().copied()).collect();
    pairs.sort_unstable();
    let dups = pairs.windows(2).filter(|w| w[0] == w[1]).count();
    assert!(dups > 0, "random:3 at r = {R} was expected to hold duplicate pairs");
    (f, pats)
}

fn round<T: Act>(x: &[f32]) -> Vec<T> {
    x.iter().map(|&v| T::from_f32(v)).collect()
}
fn widen<T: Act>(x: &[T]) -> Vec<f64> {
    x.iter().map(|&v| v.to_f32() as f64).collect()
}
fn to_f32s<T: Act>(x: &[T]) -> Vec<f32> {
    x.iter().map(|&v| v.to_f32()).collect()
}
fn sigmoid(x: f32) -> f32 {
    (1.0 / (1.0 + (-(x as f64)).exp())) as f32
}

// ---------------------------------------------------------------------------------------------
// f64 references (SVFT.md section 2).

/// Dense core `C = diag(s) + g M` in f64 from the f32 values the kernel gets (duplicates add).
fn dense_core(r: usize, s: &[f32], omega: &Omega, m: &[f32], g: f32) -> Vec<f64> {
    let mut c = vec![0.0f64; r * r];
    for i in 0..r {
        c[i * r + i] = s[i] as f64;
    }
    for k in 0..omega.len() {
        c[omega.rows[k] as usize * r + omega.cols[k] as usize] += g as f64 * m[k] as f64;
    }
    c
}

/// forward `Y = X C^T` (`transpose = false`) or backward `Y = X C` (`true`), `X` n x r.
fn apply_ref(x: &[f64], n: usize, r: usize, c: &[f64], transpose: bool) -> Vec<f64> {
    let mut y = vec![0.0f64; n * r];
    for b in 0..n {
        let xr = &x[b * r..(b + 1) * r];
        for i in 0..r {
            y[b * r + i] = (0..r).map(|j| if transpose { xr[j] * c[j * r + i] } else { c[i * r + j] * xr[j] }).sum();
        }
    }
    y
}

/// `sum_{b in [b0, b1)} A[b,i] X[b,j]` for every entry.
fn sddmm_ref(a: &[f64], x: &[f64], r: usize, omega: &Omega, b0: usize, b1: usize) -> Vec<f64> {
    (0..omega.len())
        .map(|k| {
            let (i, j) = (omega.rows[k] as usize, omega.cols[k] as usize);
            (b0..b1).map(|b| a[b * r + i] * x[b * r + j]).sum()
        })
        .collect()
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

// ---------------------------------------------------------------------------------------------
// Launch-status contract.

#[test]
fn launch_status_codes() {
    let x = [1.0f32; 8 * 4];
    let mut y = vec![0.0f32; 8 * 4];
    let s = [1.0f32; 4];
    let m = [0.5f32; 4];
    let run = |c: Cfg, y: &mut [f32]| unsafe {
        svft_interp_coo_apply_f32(
            c,
            x.as_ptr(),
            y.as_mut_ptr(),
            s.as_ptr(),
            m.as_ptr(),
            [0, 1, 2, 3, 4].as_ptr(),
            [0, 1, 2, 3].as_ptr(),
            [0, 1, 2, 3].as_ptr(),
            1.0,
            8,
            4,
        )
    };
    assert_eq!(run(cfg((0, 1), 32, 0), &mut y), 1, "zero grid");
    assert_eq!(run(cfg((1, 0), 32, 0), &mut y), 1, "zero grid");
    assert_eq!(run(cfg((1, 1), 0, 0), &mut y), 2, "zero block");
    assert_eq!(run(cfg((1, 1), 1056, 0), &mut y), 2, "block over 1024");
    assert_eq!(run(cfg((1, 1), 32, 0), &mut y), 0);
    // Y = X (diag(1) + 0.5 I)^T = 1.5 X
    assert!(y.iter().all(|&v| v == 1.5), "{y:?}");
}

// ---------------------------------------------------------------------------------------------
// Core apply: band stencil and CSR gather, forward and backward forms, activations and folds.

/// One apply operation of docs/KERNELS.md's table.
struct ApplyOp {
    what: &'static str,
    /// Backward form `Y = X C` (else forward `Y = X C^T`).
    transpose: bool,
    x: Vec<f32>,
    n: usize,
    /// Launch every block size x both grids (else a reduced set).
    all_launches: bool,
}

fn apply_launches(n: usize, r: usize, all: bool) -> Vec<(u32, (u32, u32))> {
    let mut v = Vec::new();
    for &b in &BLOCKS {
        let full = (ceil_div(r, b as usize), ceil_div(n, APPLY_ROWS as usize));
        // Smaller than full coverage: a single column block and 3 row groups (grid-stride in
        // both dimensions when full coverage needs more).
        let small = (1, 3.min(full.1));
        if all || b == 128 {
            v.push((b, full));
        }
        if all || b == 32 {
            v.push((b, small));
        }
    }
    v
}

fn check_apply<T: Act>() {
    let (f, pats) = setup();
    let k = T::kernels();
    let mut checks = 0;
    for (pi, p) in pats.iter().enumerate() {
        let r = f.r;
        let m = Rng::new(100 + pi as u64).normal_vec(p.nnz(), 0.5);
        // Gate on for every pattern but Plain (g = 1 there, as with the gate off).
        let g = if pi == 0 { 1.0 } else { sigmoid(0.3) };
        let c = dense_core(r, &f.s, &p.omega, &m, g);
        // The test's core is the crate's reference core (up to g's rounding to f32).
        let core = Reference::new(&f, &p.omega, &m, 0.3, pi != 0, None).core();
        let core_f32: Vec<f32> = core.iter().map(|&v| v as f32).collect();
        assert!(rel_err(&core_f32, &c) < 1e-6, "{}: test core != svft::reference core", p.name);

        let ops = [
            ApplyOp {
                what: "S = T C^T",
                transpose: false,
                x: Rng::new(7).normal_vec(N * r, 1.0),
                n: N,
                all_launches: true,
            },
            ApplyOp { what: "A C", transpose: true, x: Rng::new(8).normal_vec(N * r, 1.0), n: N, all_launches: true },
            ApplyOp { what: "U_C = U C", transpose: true, x: f.u.clone(), n: f.d_out, all_launches: false },
            ApplyOp { what: "V_C = V C^T", transpose: false, x: f.v.clone(), n: f.d_in, all_launches: false },
        ];
        for op in &ops {
            let n = op.n;
            let x: Vec<T> = round(&op.x);
            let want = apply_ref(&widen(&x), n, r, &c, op.transpose);
            let csr = if op.transpose { &p.by_col } else { &p.by_row };
            for (block, grid) in apply_launches(n, r, op.all_launches) {
                let ctx = format!("{} {} {} block {block} grid {grid:?}", T::NAME, p.name, op.what);
                let mut check = |y: &[T], kernel: &str| {
                    let e = rel_err(&to_f32s(y), &want);
                    assert!(e < T::TOL, "{kernel} {ctx}: rel err {e:e} >= {:e}", T::TOL);
                    checks += 1;
                };
                // CSR gather (every pattern; a band through its CSR too).
                let mut y = vec![T::nan(); n * r];
                ok(
                    unsafe {
                        (k.coo_apply)(
                            cfg(grid, block, 0),
                            abi(&x),
                            abi_mut(&mut y),
                            f.s.as_ptr(),
                            m.as_ptr(),
                            csr.ptr.as_ptr(),
                            csr.idx.as_ptr(),
                            csr.perm.as_ptr(),
                            g,
                            n as i32,
                            r as i32,
                        )
                    },
                    &ctx,
                );
                check(&y, "coo_apply");
                // Band stencil.
                if let Some(d) = p.band {
                    let smem = band_apply_smem(block, d);
                    assert!(smem <= SMEM_LIMIT);
                    let kern = if op.transpose { k.band_bwd } else { k.band_fwd };
                    let mut y = vec![T::nan(); n * r];
                    ok(
                        unsafe {
                            kern(
                                cfg(grid, block, smem),
                                abi(&x),
                                abi_mut(&mut y),
                                f.s.as_ptr(),
                                m.as_ptr(),
                                g,
                                n as i32,
                                r as i32,
                                d as i32,
                            )
                        },
                        &ctx,
                    );
                    check(&y, if op.transpose { "band_apply_bwd" } else { "band_apply_fwd" });
                }
            }
        }
    }
    eprintln!("apply {}: {checks} checks passed", T::NAME);
}

#[test]
fn apply_f32() {
    check_apply::<f32>();
}
#[test]
fn apply_bf16() {
    check_apply::<bf16>();
}
#[test]
fn apply_f16() {
    check_apply::<f16>();
}

// ---------------------------------------------------------------------------------------------
// SDDMM (fast and deterministic), epilogue and gate gradient, as in a training step.

/// One SDDMM launch shape: block size, grid (None = full coverage, else the given grid),
/// chunk_rows.
#[derive(Clone, Copy, Debug)]
struct SddmmLaunch {
    block: u32,
    grid: Option<(u32, u32)>,
    chunk_rows: usize,
}

/// Launch shapes: with `all`, every block size x {full grid, a smaller grid} at chunk_rows = 16
/// (4 chunks, the last partial), else a subset (the dtype only changes the loads); then other
/// chunkings: 5 rows (11 chunks) and 64 rows (one chunk, larger than n).
fn sddmm_launches(all: bool) -> Vec<SddmmLaunch> {
    let mut v = Vec::new();
    for &block in &BLOCKS {
        if all || block == 32 {
            v.push(SddmmLaunch { block, grid: None, chunk_rows: 16 });
        }
        if all || block == 128 {
            v.push(SddmmLaunch { block, grid: Some((1, 2)), chunk_rows: 16 });
        }
    }
    for chunk_rows in [5, 64] {
        v.push(SddmmLaunch { block: 64, grid: None, chunk_rows });
        v.push(SddmmLaunch { block: 32, grid: Some((1, 3)), chunk_rows });
    }
    v
}

/// The epilogue + gate reduction on `partial` (`nchunks x nnz`), launched with `block` threads
/// and `grid` blocks; returns (dM, dgamma). Outputs and the gate workspace are poisoned.
fn epilogue(
    partial: &[f32],
    nchunks: usize,
    m: &[f32],
    g: f32,
    block: u32,
    grid: u32,
    gate_block: u32,
) -> (Vec<f32>, f32) {
    let nnz = m.len();
    assert_eq!(partial.len(), nchunks * nnz);
    let mut dm = vec![f32::NAN; nnz];
    let mut gate_partial = vec![f32::NAN; grid as usize];
    let mut dgamma = f32::NAN;
    unsafe {
        ok(
            svft_interp_sddmm_epilogue(
                cfg((grid, 1), block, 0),
                partial.as_ptr(),
                nchunks as i32,
                m.as_ptr(),
                g,
                dm.as_mut_ptr(),
                gate_partial.as_mut_ptr(),
                nnz as i32,
                0,
            ),
            "sddmm_epilogue",
        );
        ok(
            svft_interp_gate_grad_reduce(
                cfg((1, 1), gate_block, 0),
                gate_partial.as_ptr(),
                grid as i32,
                g,
                &mut dgamma,
                0,
            ),
            "gate_grad_reduce",
        );
    }
    (dm, dgamma)
}

/// Checks dM = g dC and dgamma = g (1-g) sum M dC against the f64 dC.
fn check_grads(ctx: &str, dm: &[f32], dgamma: f32, dc: &[f64], m: &[f32], g: f32) {
    let g64 = g as f64;
    let want_dm: Vec<f64> = dc.iter().map(|v| g64 * v).collect();
    let e = rel_err(dm, &want_dm);
    assert!(e < 1e-5, "{ctx}: dM rel err {e:e}");
    let gg = g64 * (1.0 - g64);
    let want: f64 = gg * dc.iter().zip(m).map(|(d, &m)| d * m as f64).sum::<f64>();
    let scale: f64 = gg * dc.iter().zip(m).map(|(d, &m)| (d * m as f64).abs()).sum::<f64>();
    assert!(
        dgamma.is_finite() && (dgamma as f64 - want).abs() <= 1e-5 * scale,
        "{ctx}: dgamma {dgamma} vs {want} (scale {scale:e})"
    );
}

/// A deterministic result already seen: (kernel family, chunk_rows, workspace bits, dM bits,
/// dgamma bits).
type Seen = (&'static str, usize, Vec<u32>, Vec<u32>, u32);

fn check_sddmm<T: Act>() {
    let (f, pats) = setup();
    let k = T::kernels();
    let r = f.r;
    let a: Vec<T> = round(&Rng::new(21).normal_vec(N * r, 1.0));
    let x: Vec<T> = round(&Rng::new(22).normal_vec(N * r, 1.0));
    let (a64, x64) = (widen(&a), widen(&x));
    let (ni, ri) = (N as i32, r as i32);
    let g = sigmoid(-0.7);
    let mut checks = 0;
    for (pi, p) in pats.iter().enumerate() {
        let nnz = p.nnz();
        let m = Rng::new(200 + pi as u64).normal_vec(nnz, 0.5);
        let dc_ref = sddmm_ref(&a64, &x64, r, &p.omega, 0, N);
        // Deterministic workspaces per (kernel family, chunk_rows): all launch shapes must agree
        // bit for bit.
        let mut seen: Vec<Seen> = Vec::new();
        let mut remember = |fam: &'static str, chunk_rows: usize, ws: &[f32], dm: &[f32], dgamma: f32, ctx: &str| {
            if let Some((_, _, w0, dm0, dg0)) = seen.iter().find(|s| s.0 == fam && s.1 == chunk_rows) {
                assert!(*w0 == bits(ws), "{ctx}: deterministic workspace differs from the first launch shape's");
                assert!(*dm0 == bits(dm) && *dg0 == dgamma.to_bits(), "{ctx}: deterministic dM/dgamma differ");
            } else {
                seen.push((fam, chunk_rows, bits(ws), bits(dm), dgamma.to_bits()));
            }
        };
        for (li, l) in sddmm_launches(T::NAME == "f32").into_iter().enumerate() {
            let cr = l.chunk_rows;
            let nchunks = N.div_ceil(cr);
            let chunk_ref: Vec<Vec<f64>> =
                (0..nchunks).map(|c| sddmm_ref(&a64, &x64, r, &p.omega, c * cr, ((c + 1) * cr).min(N))).collect();
            let check_ws = |ws: &[f32], ctx: &str| {
                for (c, want) in chunk_ref.iter().enumerate() {
                    let e = rel_err(&ws[c * nnz..(c + 1) * nnz], want);
                    assert!(e < 1e-5, "{ctx}: workspace chunk {c} rel err {e:e}");
                }
            };
            // Epilogue shape fixed for the bitwise comparisons; gate reduction over its blocks.
            let (eb, eg) = (64u32, ceil_div(nnz, 64));

            let mut families: Vec<&'static str> = vec!["coo", "coo (order = NULL)"];
            if p.band.is_some() {
                families.insert(0, "band");
            }
            for fam in families {
                let grid = l.grid.unwrap_or(match fam {
                    "band" => (ceil_div(r, l.block as usize), nchunks as u32),
                    _ => (ceil_div(nnz, l.block as usize), nchunks as u32),
                });
                let ctx = format!("{} {} {fam} block {} grid {grid:?} chunk_rows {cr}", T::NAME, p.name, l.block);
                let smem = match (fam, p.band) {
                    ("band", Some(d)) => band_sddmm_smem(l.block, d, cr),
                    _ => 0,
                };
                // Every shape here is launchable on the device without the shared memory opt-in.
                assert!(smem <= SMEM_LIMIT, "{ctx}: {smem} bytes of dynamic shared memory");
                let c = cfg(grid, l.block, smem);
                let order = if fam == "coo" { p.by_row.perm.as_ptr() } else { std::ptr::null() };
                let run = |out: &mut [f32], atomic: bool| -> i32 {
                    unsafe {
                        match (fam, atomic) {
                            ("band", true) => (k.band_atomic)(
                                c,
                                abi(&a),
                                abi(&x),
                                out.as_mut_ptr(),
                                ni,
                                ri,
                                p.band.unwrap() as i32,
                                cr as i32,
                            ),
                            ("band", false) => (k.band_partial)(
                                c,
                                abi(&a),
                                abi(&x),
                                out.as_mut_ptr(),
                                ni,
                                ri,
                                p.band.unwrap() as i32,
                                cr as i32,
                            ),
                            (_, true) => (k.coo_atomic)(
                                c,
                                abi(&a),
                                abi(&x),
                                p.rows.as_ptr(),
                                p.cols.as_ptr(),
                                order,
                                out.as_mut_ptr(),
                                ni,
                                ri,
                                nnz as i32,
                                cr as i32,
                            ),
                            (_, false) => (k.coo_partial)(
                                c,
                                abi(&a),
                                abi(&x),
                                p.rows.as_ptr(),
                                p.cols.as_ptr(),
                                order,
                                out.as_mut_ptr(),
                                ni,
                                ri,
                                nnz as i32,
                                cr as i32,
                            ),
                        }
                    }
                };

                // Deterministic: workspace (poisoned; every slot must be written) -> epilogue.
                let mut ws = vec![f32::NAN; nchunks * nnz];
                ok(run(&mut ws, false), &ctx);
                check_ws(&ws, &format!("partial {ctx}"));
                let (dm, dgamma) = epilogue(&ws, nchunks, &m, g, eb, eg, 32);
                check_grads(&format!("partial {ctx}"), &dm, dgamma, &dc_ref, &m, g);
                let fam_key = if fam == "band" { "band" } else { "coo" };
                remember(fam_key, cr, &ws, &dm, dgamma, &ctx);
                checks += 3;

                // Fast: dC zeroed by the host, chunk partials added atomically; then (first shape
                // only) the epilogue with nchunks = 1 over a different launch shape.
                let mut dc = vec![0.0f32; nnz];
                ok(run(&mut dc, true), &ctx);
                let e = rel_err(&dc, &dc_ref);
                assert!(e < 1e-5, "atomic {ctx}: dC rel err {e:e}");
                checks += 1;
                if li == 0 {
                    let (dm, dgamma) = epilogue(&dc, 1, &m, g, 128, 2, 64);
                    check_grads(&format!("atomic {ctx}"), &dm, dgamma, &dc_ref, &m, g);
                    checks += 1;
                }
            }
        }

        // Rerun of the first deterministic shape: bitwise identical. Fast mode accumulating into
        // a previous dC (the host leaves it there instead of zeroing).
        let cr = 16;
        let nchunks = N.div_ceil(cr);
        let fams: &[&str] = if p.band.is_some() { &["band", "coo"] } else { &["coo"] };
        for &fam in fams {
            let block = 64;
            let grid =
                if fam == "band" { (ceil_div(r, 64), nchunks as u32) } else { (ceil_div(nnz, 64), nchunks as u32) };
            let smem = if fam == "band" { band_sddmm_smem(block, p.band.unwrap(), cr) } else { 0 };
            let c = cfg(grid, block, smem);
            let ctx = format!("{} {} {fam} rerun", T::NAME, p.name);
            let mut ws = vec![f32::NAN; nchunks * nnz];
            let mut dc = Rng::new(300).normal_vec(nnz, 1.0);
            let dc_prev = dc.clone();
            unsafe {
                if fam == "band" {
                    let d = p.band.unwrap() as i32;
                    ok((k.band_partial)(c, abi(&a), abi(&x), ws.as_mut_ptr(), ni, ri, d, cr as i32), &ctx);
                    ok((k.band_atomic)(c, abi(&a), abi(&x), dc.as_mut_ptr(), ni, ri, d, cr as i32), &ctx);
                } else {
                    let (rp, cp, op) = (p.rows.as_ptr(), p.cols.as_ptr(), p.by_row.perm.as_ptr());
                    ok(
                        (k.coo_partial)(
                            c,
                            abi(&a),
                            abi(&x),
                            rp,
                            cp,
                            op,
                            ws.as_mut_ptr(),
                            ni,
                            ri,
                            nnz as i32,
                            cr as i32,
                        ),
                        &ctx,
                    );
                    ok(
                        (k.coo_atomic)(c, abi(&a), abi(&x), rp, cp, op, dc.as_mut_ptr(), ni, ri, nnz as i32, cr as i32),
                        &ctx,
                    );
                }
            }
            let (dm, dgamma) = epilogue(&ws, nchunks, &m, g, 64, ceil_div(nnz, 64), 32);
            remember(fam, cr, &ws, &dm, dgamma, &ctx);
            let want: Vec<f64> = dc_prev.iter().zip(&dc_ref).map(|(&p, &d)| p as f64 + d).collect();
            let e = rel_err(&dc, &want);
            assert!(e < 1e-5, "{ctx}: accumulating atomic dC rel err {e:e}");
            checks += 2;
        }
        // Bands through the COO kernels and through the stencil give the same dC (not bitwise).
    }
    eprintln!("sddmm {}: {checks} checks passed", T::NAME);
}

#[test]
fn sddmm_f32() {
    check_sddmm::<f32>();
}
#[test]
fn sddmm_bf16() {
    check_sddmm::<bf16>();
}
#[test]
fn sddmm_f16() {
    check_sddmm::<f16>();
}

// ---------------------------------------------------------------------------------------------
// Epilogue and gate reduction on their own: launch shapes, accumulate, aliasing, gate off.

/// The gate's device state from a device gamma: g = sigmoid(gamma) within an ulp or two of the
/// host's `gate_value` (f32 expf against Rust's exp), gamma copied bit for bit, g = 1 with the
/// gate off, and gamma may alias the state's own slot.
#[test]
fn gate_from_gamma_matches_the_host() {
    for gamma in [0.0f32, 0.3, -2.5, 9.0, -17.0, 1e-7] {
        for gate in [true, false] {
            let mut state = [f32::NAN; 2];
            unsafe {
                ok(svft_interp_gate_from_gamma(cfg((1, 1), 1, 0), &gamma, gate as i32, state.as_mut_ptr()), "gate")
            };
            let host = svft::config::gate_value(gate, gamma);
            assert!(
                (state[0] - host).abs() <= 2.0 * f32::EPSILON * host,
                "gamma {gamma} gate {gate}: {} vs {host}",
                state[0]
            );
            assert_eq!(state[1].to_bits(), gamma.to_bits());
            if !gate {
                assert_eq!(state[0], 1.0);
            }
        }
        // In place: gamma read from state[1].
        let mut state = [f32::NAN, gamma];
        let p = state.as_mut_ptr();
        unsafe { ok(svft_interp_gate_from_gamma(cfg((1, 1), 1, 0), p.add(1), 1, p), "gate in place") };
        assert!(
            (state[0] - svft::config::gate_value(true, gamma)).abs() <= 2.0 * f32::EPSILON,
            "in place, gamma {gamma}"
        );
        assert_eq!(state[1].to_bits(), gamma.to_bits());
    }
}

#[test]
fn epilogue_and_gate_reduce() {
    let nnz = 247; // |banded:3| at r = 37
    let nchunks = 4;
    let partial = Rng::new(400).normal_vec(nchunks * nnz, 1.0);
    let g = sigmoid(0.25);
    let dc: Vec<f64> = (0..nnz).map(|k| (0..nchunks).map(|c| partial[c * nnz + k] as f64).sum()).collect();
    // M mostly aligned with dC, so that sum_k M_k dC_k does not cancel and the gate gradient's
    // tolerance (relative to sum_k |M_k dC_k|) is a relative one: a misscaled dgamma fails.
    let m: Vec<f32> = Rng::new(401)
        .normal_vec(nnz, 0.5)
        .iter()
        .zip(&dc)
        .enumerate()
        .map(|(k, (&m, &d))| if k % 7 == 0 { m } else { m.abs() * d.signum() as f32 })
        .collect();
    let mut checks = 0;
    let mut shapes: Vec<(u32, u32, u32)> = Vec::new();
    for block in [32u32, 64, 256] {
        for grid in [1u32, 3, ceil_div(nnz, block as usize)] {
            shapes.push((block, grid, 32));
        }
    }
    shapes.extend([(1024, 1, 32), (32, 8, 64), (64, 4, 256), (128, 2, 1024)]);
    for (block, grid, gate_block) in shapes {
        let ctx = format!("epilogue block {block} grid {grid}, gate_grad_reduce block {gate_block}");
        let (dm, dgamma) = epilogue(&partial, nchunks, &m, g, block, grid, gate_block);
        check_grads(&ctx, &dm, dgamma, &dc, &m, g);
        // Same launch shape: bitwise reproducible.
        let (dm2, dgamma2) = epilogue(&partial, nchunks, &m, g, block, grid, gate_block);
        assert!(bits(&dm) == bits(&dm2) && dgamma.to_bits() == dgamma2.to_bits(), "{ctx}: rerun differs");
        checks += 2;
    }

    // accumulate != 0: dM += g dC, dgamma += g (1-g) sum M dC.
    let dm0 = Rng::new(402).normal_vec(nnz, 1.0);
    let mut dm = dm0.clone();
    let mut gp = vec![f32::NAN; 2];
    let mut dgamma = 0.75f32;
    unsafe {
        ok(
            svft_interp_sddmm_epilogue(
                cfg((2, 1), 96, 0),
                partial.as_ptr(),
                nchunks as i32,
                m.as_ptr(),
                g,
                dm.as_mut_ptr(),
                gp.as_mut_ptr(),
                nnz as i32,
                1,
            ),
            "epilogue accumulate",
        );
        ok(svft_interp_gate_grad_reduce(cfg((1, 1), 32, 0), gp.as_ptr(), 2, g, &mut dgamma, 1), "gate accumulate");
    }
    let g64 = g as f64;
    let want: Vec<f64> = dm0.iter().zip(&dc).map(|(&p, &d)| p as f64 + g64 * d).collect();
    assert!(rel_err(&dm, &want) < 1e-5, "accumulating dM");
    let gsum: f64 = g64 * (1.0 - g64) * dc.iter().zip(&m).map(|(d, &m)| d * m as f64).sum::<f64>();
    let scale: f64 = g64 * (1.0 - g64) * dc.iter().zip(&m).map(|(d, &m)| (d * m as f64).abs()).sum::<f64>();
    assert!((dgamma as f64 - (0.75 + gsum)).abs() <= 1e-5 * (scale + 0.75), "accumulating dgamma {dgamma}");
    checks += 2;

    // dM aliasing the workspace (allowed), gate off: M = NULL, gate_partial = NULL.
    for (block, grid) in [(32u32, 1u32), (128, 2), (64, ceil_div(nnz, 64))] {
        let mut buf = partial.clone();
        let p = buf.as_mut_ptr();
        unsafe {
            ok(
                svft_interp_sddmm_epilogue(
                    cfg((grid, 1), block, 0),
                    p,
                    nchunks as i32,
                    std::ptr::null(),
                    1.0,
                    p,
                    std::ptr::null_mut(),
                    nnz as i32,
                    0,
                ),
                "epilogue aliased, gate off",
            );
        }
        let e = rel_err(&buf[..nnz], &dc);
        assert!(e < 1e-5, "aliased epilogue block {block} grid {grid}: rel err {e:e}");
        assert!(bits(&buf[nnz..]) == bits(&partial[nnz..]), "aliased epilogue wrote past dM");
        checks += 1;
    }
    eprintln!("epilogue/gate: {checks} checks passed");
}

// ---------------------------------------------------------------------------------------------
// Fused band SDDMM + backward apply (kernels/fused_bwd.cu), against the f64 reference and the
// unfused pair (band_sddmm_* and band_apply_bwd_*) it replaces.

#[allow(clippy::type_complexity)]
struct FusedKernels<A> {
    atomic: unsafe extern "C" fn(
        Cfg,
        *const A,
        *const A,
        *mut f32,
        *mut A,
        *const f32,
        *const f32,
        f32,
        i32,
        i32,
        i32,
        i32,
    ) -> i32,
    partial: unsafe extern "C" fn(
        Cfg,
        *const A,
        *const A,
        *mut f32,
        *mut A,
        *const f32,
        *const f32,
        f32,
        i32,
        i32,
        i32,
        i32,
    ) -> i32,
}

macro_rules! declare_fused {
    ($t:ty, $atomic:ident, $partial:ident) => {
        extern "C" {
            fn $atomic(
                c: Cfg,
                a: *const $t,
                x: *const $t,
                dc: *mut f32,
                ac: *mut $t,
                s: *const f32,
                m: *const f32,
                g: f32,
                n: i32,
                r: i32,
                d: i32,
                chunk_rows: i32,
            ) -> i32;
            fn $partial(
                c: Cfg,
                a: *const $t,
                x: *const $t,
                ws: *mut f32,
                ac: *mut $t,
                s: *const f32,
                m: *const f32,
                g: f32,
                n: i32,
                r: i32,
                d: i32,
                chunk_rows: i32,
            ) -> i32;
        }
    };
}
declare_fused!(f32, svft_interp_band_sddmm_apply_bwd_atomic_f32, svft_interp_band_sddmm_apply_bwd_partial_f32);
declare_fused!(u16, svft_interp_band_sddmm_apply_bwd_atomic_bf16, svft_interp_band_sddmm_apply_bwd_partial_bf16);
declare_fused!(u16, svft_interp_band_sddmm_apply_bwd_atomic_f16, svft_interp_band_sddmm_apply_bwd_partial_f16);

trait Fused: Act {
    fn fused() -> FusedKernels<Self::Abi>;
}
impl Fused for f32 {
    fn fused() -> FusedKernels<f32> {
        FusedKernels {
            atomic: svft_interp_band_sddmm_apply_bwd_atomic_f32,
            partial: svft_interp_band_sddmm_apply_bwd_partial_f32,
        }
    }
}
impl Fused for bf16 {
    fn fused() -> FusedKernels<u16> {
        FusedKernels {
            atomic: svft_interp_band_sddmm_apply_bwd_atomic_bf16,
            partial: svft_interp_band_sddmm_apply_bwd_partial_bf16,
        }
    }
}
impl Fused for f16 {
    fn fused() -> FusedKernels<u16> {
        FusedKernels {
            atomic: svft_interp_band_sddmm_apply_bwd_atomic_f16,
            partial: svft_interp_band_sddmm_apply_bwd_partial_f16,
        }
    }
}

const FUSED_OFFSETS: u32 = geometry::FUSED_OFFSETS as u32;
fn fused_smem(block: u32, d: usize, chunk_rows: usize) -> u32 {
    4 * chunk_rows as u32 * (2 * block + 4 * d as u32 + FUSED_OFFSETS - 1)
}

/// The band of half-width `min(d, r-1)` in canonical order (what the kernels index in closed
/// form), as an `Omega`-free pair of coordinate lists.
fn band_entries(r: usize, d: usize) -> (Vec<usize>, Vec<usize>) {
    let d = d.min(r - 1);
    let (mut rows, mut cols) = (Vec::new(), Vec::new());
    for i in 0..r {
        for j in i.saturating_sub(d)..=(i + d).min(r - 1) {
            rows.push(i);
            cols.push(j);
        }
    }
    (rows, cols)
}

fn check_fused<T: Fused>() {
    let fk = T::fused();
    let k = T::kernels();
    let all = T::NAME == "f32";
    let mut checks = 0;
    let mut skipped = 0;
    // (r, n): the odd shape of the other tests, a rank below one warp, and rank 1 (d clamps to 0).
    for (si, &(r, n)) in [(37usize, 53usize), (13, 9), (1, 3)].iter().enumerate() {
        let a: Vec<T> = round(&Rng::new(500 + si as u64).normal_vec(n * r, 1.0));
        let x: Vec<T> = round(&Rng::new(510 + si as u64).normal_vec(n * r, 1.0));
        let (a64, x64) = (widen(&a), widen(&x));
        let s: Vec<f32> = (0..r).map(|i| 2.0 - 1.5 * i as f32 / r as f32).collect();
        let (ni, ri) = (n as i32, r as i32);
        let g = sigmoid(-0.4);
        // d = 16 exceeds r - 1 for r = 13 and r = 1: the kernels clamp it (the host passes it).
        for d in [0usize, 1, 2, 16] {
            let (rows, cols) = band_entries(r, d);
            let nnz = rows.len();
            let m = Rng::new(520 + d as u64).normal_vec(nnz, 0.5);
            // f64 references: AC = A C and dC per chunk.
            let mut ac_ref: Vec<f64> = (0..n * r).map(|e| s[e % r] as f64 * a64[e]).collect();
            for kk in 0..nnz {
                let (i, j) = (rows[kk], cols[kk]);
                for b in 0..n {
                    ac_ref[b * r + j] += g as f64 * a64[b * r + i] * m[kk] as f64;
                }
            }
            let dc_rows = |b0: usize, b1: usize| -> Vec<f64> {
                (0..nnz).map(|kk| (b0..b1).map(|b| a64[b * r + rows[kk]] * x64[b * r + cols[kk]]).sum()).collect()
            };
            let dc_ref = dc_rows(0, n);

            // The unfused band_apply_bwd result (full grid, block 64): the fused AC must equal it.
            let mut ac_unfused = vec![T::nan(); n * r];
            let c = cfg((ceil_div(r, 64), ceil_div(n, APPLY_ROWS as usize)), 64, band_apply_smem(64, d));
            ok(
                unsafe {
                    (k.band_bwd)(c, abi(&a), abi_mut(&mut ac_unfused), s.as_ptr(), m.as_ptr(), g, ni, ri, d as i32)
                },
                "band_apply_bwd",
            );
            let ac_unfused_bits: Vec<u32> = to_f32s(&ac_unfused).iter().map(|v| v.to_bits()).collect();

            // First deterministic workspace seen per chunk_rows (all launch shapes must agree).
            let mut seen: Vec<(usize, Vec<u32>)> = Vec::new();
            for chunk_rows in [3usize, 5, 16, 64] {
                let nchunks = n.div_ceil(chunk_rows);
                let chunk_ref: Vec<Vec<f64>> =
                    (0..nchunks).map(|c| dc_rows(c * chunk_rows, ((c + 1) * chunk_rows).min(n))).collect();
                // The unfused deterministic workspace for this chunking.
                let mut ws_unfused = vec![f32::NAN; nchunks * nnz];
                let c = cfg((ceil_div(r, 32), nchunks as u32), 32, band_sddmm_smem(32, d, chunk_rows));
                ok(
                    unsafe {
                        (k.band_partial)(
                            c,
                            abi(&a),
                            abi(&x),
                            ws_unfused.as_mut_ptr(),
                            ni,
                            ri,
                            d as i32,
                            chunk_rows as i32,
                        )
                    },
                    "band_sddmm_partial",
                );
                for &block in &BLOCKS {
                    if !all && block != 32 && block != 128 {
                        continue;
                    }
                    let full = (ceil_div(r, block as usize), nchunks as u32);
                    for grid in [full, (1, 2), (1, 3.min(full.1))] {
                        let smem = fused_smem(block, d, chunk_rows);
                        let ctx = format!(
                            "{} r={r} n={n} d={d} block {block} grid {grid:?} chunk_rows {chunk_rows}",
                            T::NAME
                        );
                        if smem > SMEM_LIMIT {
                            skipped += 1; // not launchable on the device without opt-in either
                            continue;
                        }
                        let c = cfg(grid, block, smem);
                        let run = |atomic: bool, out: &mut [f32], ac: &mut [T]| unsafe {
                            let f = if atomic { fk.atomic } else { fk.partial };
                            let (op, acp) = (out.as_mut_ptr(), abi_mut(ac));
                            let (sp, mp) = (s.as_ptr(), m.as_ptr());
                            ok(f(c, abi(&a), abi(&x), op, acp, sp, mp, g, ni, ri, d as i32, chunk_rows as i32), &ctx);
                        };
                        let check_ac = |ac: &[T], mode: &str| {
                            let e = rel_err(&to_f32s(ac), &ac_ref);
                            assert!(e < T::TOL, "{mode} {ctx}: AC rel err {e:e}");
                            let b: Vec<u32> = to_f32s(ac).iter().map(|v| v.to_bits()).collect();
                            assert!(b == ac_unfused_bits, "{mode} {ctx}: AC differs from band_apply_bwd's bits");
                        };

                        // Deterministic: poisoned workspace and AC, every slot written.
                        let mut ws = vec![f32::NAN; nchunks * nnz];
                        let mut ac = vec![T::nan(); n * r];
                        run(false, &mut ws, &mut ac);
                        check_ac(&ac, "partial");
                        for (ci, want) in chunk_ref.iter().enumerate() {
                            let e = rel_err(&ws[ci * nnz..(ci + 1) * nnz], want);
                            assert!(e < 1e-5, "partial {ctx}: workspace chunk {ci} rel err {e:e}");
                        }
                        assert!(bits(&ws) == bits(&ws_unfused), "partial {ctx}: workspace != band_sddmm_partial's");
                        match seen.iter().find(|s| s.0 == chunk_rows) {
                            Some((_, w0)) => assert!(*w0 == bits(&ws), "partial {ctx}: differs across launches"),
                            None => seen.push((chunk_rows, bits(&ws))),
                        }
                        // Rerun: bitwise identical.
                        let mut ws2 = vec![f32::NAN; nchunks * nnz];
                        let mut ac2 = vec![T::nan(); n * r];
                        run(false, &mut ws2, &mut ac2);
                        assert!(bits(&ws2) == bits(&ws), "partial {ctx}: rerun differs");
                        checks += 5;

                        // Fast: zeroed dC, chunk partials added atomically.
                        let mut dc = vec![0.0f32; nnz];
                        let mut ac = vec![T::nan(); n * r];
                        run(true, &mut dc, &mut ac);
                        check_ac(&ac, "atomic");
                        let e = rel_err(&dc, &dc_ref);
                        assert!(e < 1e-5, "atomic {ctx}: dC rel err {e:e}");
                        checks += 2;
                    }
                }
            }
            // Through the epilogue, the fused deterministic workspace gives the reference dM and
            // gate gradient (it is the unfused workspace bit for bit, checked above).
            let (cr, ws0) = &seen[0];
            let ws0: Vec<f32> = ws0.iter().map(|&b| f32::from_bits(b)).collect();
            let (dm, dgamma) = epilogue(&ws0, n.div_ceil(*cr), &m, g, 64, ceil_div(nnz, 64), 32);
            check_grads(&format!("{} r={r} n={n} d={d} fused epilogue", T::NAME), &dm, dgamma, &dc_ref, &m, g);
            checks += 1;
        }
    }
    // Skips are only the shared-memory-limited shapes (wide blocks with d = 16 and 64-row chunks).
    assert!(checks > 200 && skipped < checks, "fused {}: {checks} checks, {skipped} skipped", T::NAME);
    eprintln!("fused backward {}: {checks} checks passed ({skipped} shapes over the smem limit skipped)", T::NAME);
}

#[test]
fn fused_bwd_f32() {
    check_fused::<f32>();
}
#[test]
fn fused_bwd_bf16() {
    check_fused::<bf16>();
}
#[test]
fn fused_bwd_f16() {
    check_fused::<f16>();
}

// Skinny products of the small-n plan (skinny_gemm.cu): the kernels alone, then the plan's whole
// forward and backward sequence as src/cuda/layer.rs enqueues it, against the f64 layer.

const SKINNY_TOKENS: usize = geometry::SKINNY_TOKENS;
const SKINNY_NN_KT: u32 = geometry::SKINNY_NN_KT as u32;
const SKINNY_NT_KT: u32 = geometry::SKINNY_NT_KT as u32;
const SKINNY_NT_ROWS: u32 = geometry::SKINNY_NT_ROWS as u32;
const SMALL_NS: [usize; 5] = [1, 5, 16, 17, 40];

/// Staged-tile row stride for `n` tokens (svft_skinny_stride in svft_interp.h).
fn skinny_stride(n: usize) -> u32 {
    let nt = n.clamp(1, SKINNY_TOKENS).next_power_of_two() as u32;
    if nt <= 4 {
        nt
    } else {
        nt + 4
    }
}

/// `out[n x c] = x[n x k] b[k x c]` through skinny_nn + skinny_reduce; `grid` None = full
/// coverage, else (gx, gy, gz). The partials and the output are poisoned first.
#[allow(clippy::too_many_arguments)]
fn run_nn<T: Act>(
    x: &[T],
    b: &[T],
    n: usize,
    k: usize,
    c: usize,
    splits: usize,
    block: u32,
    grid: Option<[u32; 3]>,
) -> Vec<T> {
    let kern = T::kernels();
    let grid = grid.unwrap_or([ceil_div(c, block as usize), splits as u32, ceil_div(n, SKINNY_TOKENS)]);
    let cfg_nn = Cfg { grid, block: [block, 1, 1], shared_mem_bytes: 4 * SKINNY_NN_KT * skinny_stride(n) };
    let mut partial = vec![f32::NAN; splits * n * c];
    let mut y = vec![T::nan(); n * c];
    let (ni, ki, ci, si) = (n as i32, k as i32, c as i32, splits as i32);
    unsafe {
        ok((kern.skinny_nn)(cfg_nn, abi(x), abi(b), partial.as_mut_ptr(), ni, ki, ci, si), "skinny_nn");
        let cfg_r = cfg((grid[0].min(2), 1), block, 0); // undersized on purpose: grid-stride
        ok((kern.skinny_reduce)(cfg_r, partial.as_ptr(), abi_mut(&mut y), si, ni * ci), "skinny_reduce");
    }
    y
}

/// `out[n x m] = x[n x k] b[m x k]^T` through skinny_nt; `grid` None = full coverage.
fn run_nt<T: Act>(x: &[T], b: &[T], n: usize, k: usize, m: usize, block: u32, grid: Option<(u32, u32)>) -> Vec<T> {
    let kern = T::kernels();
    let rows = SKINNY_NT_ROWS * (block / 32);
    let grid = grid.unwrap_or((ceil_div(m, rows as usize), ceil_div(n, SKINNY_TOKENS)));
    let c = cfg(grid, block, 4 * SKINNY_NT_KT * skinny_stride(n));
    let mut y = vec![T::nan(); n * m];
    unsafe {
        ok((kern.skinny_nt)(c, abi(x), abi(b), abi_mut(&mut y), n as i32, k as i32, m as i32), "skinny_nt");
    }
    y
}

/// `x[n x k] b[k x c]` in f64.
fn matmul_ref(x: &[f64], b: &[f64], n: usize, k: usize, c: usize) -> Vec<f64> {
    let mut y = vec![0.0; n * c];
    for i in 0..n {
        for kk in 0..k {
            let xv = x[i * k + kk];
            for j in 0..c {
                y[i * c + j] += xv * b[kk * c + j];
            }
        }
    }
    y
}

fn transpose<T: Copy>(b: &[T], rows: usize, cols: usize) -> Vec<T> {
    (0..cols * rows).map(|e| b[(e % rows) * cols + e / rows]).collect()
}

fn check_skinny<T: Act>() {
    let mut checks = 0;
    // k = 300 spans three nn tiles and two nt tiles; k = 61, c = 37 are multiples of nothing.
    // (Interpret mode is slow: tests/kernels/test_kernels.cpp runs a larger matrix.)
    for &(k, c, ns) in &[(61usize, 37usize, &SMALL_NS[..]), (300, 29, &[1, 17][..])] {
        for &n in ns {
            let x: Vec<T> = round(&Rng::new(n as u64 + 7 * k as u64).normal_vec(n * k, 1.0));
            let b: Vec<T> = round(&Rng::new(c as u64 + 3).normal_vec(k * c, 1.0));
            let want = matmul_ref(&widen(&x), &widen(&b), n, k, c);
            let ctx = format!("{} n={n} k={k} c={c}", T::NAME);
            // Split counts: one, one that does not divide k (full and undersized grids: the
            // bits depend on the split count only), and more than k (empty splits).
            let launches: [(usize, u32, Option<[u32; 3]>); 4] =
                [(1, 128, None), (7, 64, None), (7, 32, Some([1, 2, 1])), (k + 3, 128, None)];
            let mut seven: Option<Vec<f32>> = None;
            for (splits, block, grid) in launches {
                let y = to_f32s(&run_nn(&x, &b, n, k, c, splits, block, grid));
                let e = rel_err(&y, &want);
                assert!(e < T::TOL, "{ctx} nn splits={splits} block={block} grid={grid:?}: rel err {e:e}");
                if splits == 7 {
                    match &seven {
                        None => seven = Some(y),
                        Some(y0) => assert!(bits(y0) == bits(&y), "{ctx} nn splits=7: bits depend on the grid"),
                    }
                }
                checks += 1;
            }
            let bt = transpose(&b, k, c); // c x k: the nt form of the same product
            let y0 = to_f32s(&run_nt(&x, &bt, n, k, c, 128, None));
            let y1 = to_f32s(&run_nt(&x, &bt, n, k, c, 64, Some((2, 1))));
            for (y, what) in [(&y0, "full grid"), (&y1, "grid 2x1")] {
                let e = rel_err(y, &want);
                assert!(e < T::TOL, "{ctx} nt {what}: rel err {e:e}");
            }
            assert!(bits(&y0) == bits(&y1), "{ctx} nt: bits depend on the launch shape");
            checks += 2;
        }
    }
    eprintln!("skinny {}: {checks} checks passed", T::NAME);
}

#[test]
fn skinny_f32() {
    check_skinny::<f32>();
}
#[test]
fn skinny_bf16() {
    check_skinny::<bf16>();
}
#[test]
fn skinny_f16() {
    check_skinny::<f16>();
}

/// The small-n plan's step as `CudaLayer` runs it (T = X V, S = T C^T, Y = S U^T; A = G U,
/// A C, dX = (A C) V^T; the SDDMM is the factored plan's, checked above), with every
/// intermediate stored in T, against the f64 layer of SVFT.md section 2 on the same rounded
/// inputs: d_out = 61 != d_in = 37, r = 37, banded:2 (n around the 16-token chunks) and
/// random:3 (CSR; n = 1, 17), the n = 17 step run twice (bitwise identical).
fn check_small_n_step<T: Act>() {
    let (f, pats) = setup();
    let kern = T::kernels();
    let (d_out, d_in, r) = (f.d_out, f.d_in, f.r);
    let (u, v): (Vec<T>, Vec<T>) = (round(&f.u), round(&f.v));
    let mut fr = f.clone();
    fr.u = to_f32s(&u);
    fr.v = to_f32s(&v);
    let g = sigmoid(0.3);
    for (pat, ns) in [(&pats[1], &SMALL_NS[..]), (&pats[2], &[1, 17][..])] {
        let m = Rng::new(77).normal_vec(pat.nnz(), 0.2);
        let refl = Reference::new(&fr, &pat.omega, &m, 0.3, true, None);
        let core = |x: &[T], n: usize, forward: bool| -> Vec<T> {
            let mut y = vec![T::nan(); n * r];
            let gy = ceil_div(n, APPLY_ROWS as usize);
            let rc = unsafe {
                match pat.band {
                    Some(d) => {
                        let kf = if forward { kern.band_fwd } else { kern.band_bwd };
                        let c = cfg((ceil_div(r, 128), gy), 128, band_apply_smem(128, d));
                        kf(c, abi(x), abi_mut(&mut y), f.s.as_ptr(), m.as_ptr(), g, n as i32, r as i32, d as i32)
                    }
                    None => {
                        let csr = if forward { &pat.by_row } else { &pat.by_col };
                        (kern.coo_apply)(
                            cfg((ceil_div(r, 128), gy), 128, 0),
                            abi(x),
                            abi_mut(&mut y),
                            f.s.as_ptr(),
                            m.as_ptr(),
                            csr.ptr.as_ptr(),
                            csr.idx.as_ptr(),
                            csr.perm.as_ptr(),
                            g,
                            n as i32,
                            r as i32,
                        )
                    }
                }
            };
            ok(rc, "core apply");
            y
        };
        for &n in ns {
            let x: Vec<T> = round(&Rng::new(900 + n as u64).normal_vec(n * d_in, 1.0));
            let gout: Vec<T> = round(&Rng::new(950 + n as u64).normal_vec(n * d_out, 1.0));
            let step = || {
                let t = run_nn(&x, &v, n, d_in, r, 3, 128, None);
                let y = run_nt(&core(&t, n, true), &u, n, r, d_out, 128, None);
                let a = run_nn(&gout, &u, n, d_out, r, 2, 128, None);
                let dx = run_nt(&core(&a, n, false), &v, n, r, d_in, 128, None);
                (to_f32s(&y), to_f32s(&dx))
            };
            let (y, dx) = step();
            let ctx = format!("{} small-n step {} n={n}", T::NAME, pat.name);
            let (xw, gw) = (widen(&x), widen(&gout));
            let ey = rel_err(&y, &refl.forward(&xw, n));
            let edx = rel_err(&dx, &refl.backward(&xw, &gw, n).0);
            // f32: the 1e-5 of SVFT.md; bf16/f16: T, S, A and A C are each rounded once (the
            // layer tolerance of tests/gpu.rs).
            let tol = if T::TOL < 1e-3 { 1e-5 } else { 1e-2 };
            assert!(ey < tol && edx < tol, "{ctx}: rel err Y {ey:e}, dX {edx:e} (tol {tol})");
            if n == 17 {
                let (y2, dx2) = step();
                assert!(bits(&y) == bits(&y2) && bits(&dx) == bits(&dx2), "{ctx}: rerun differs");
            }
        }
    }
}

#[test]
fn small_n_step_f32() {
    check_small_n_step::<f32>();
}
#[test]
fn small_n_step_bf16() {
    check_small_n_step::<bf16>();
}
#[test]
fn small_n_step_f16() {
    check_small_n_step::<f16>();
}
