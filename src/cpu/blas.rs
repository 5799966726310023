//! An optional system BLAS for the CPU layer's dense products, loaded at run time.
//!
//! faer's f32 GEMM is portable and always there; a tuned BLAS (OpenBLAS, from Debian's
//! `libopenblas0-pthread`, or any library exporting CBLAS's `cblas_sgemm`) can be faster on a
//! given CPU (docs/PERF.md records the measurement). `SVFT_GEMM` chooses, once per process:
//!
//! - `faer` (the default): faer only;
//! - `blas`: the system BLAS; when none loads, faer, with a warning on stderr at first use
//!   (and reports name the backend, so a benchmark never silently measures the other one);
//! - `auto`: the system BLAS when one loads, else faer.
//!
//! The library runs single-threaded (`openblas_set_num_threads(1)` where it exists) and svft
//! splits each product into column blocks across rayon's threads ([`Blas::sgemm_split`]): with
//! OpenBLAS's own threads, an SVFTLinear step inside PyTorch took up to 1.7x longer (its
//! spinning threads, rayon's and torch's OpenMP threads fought over the cores). faer stays the
//! default; docs/PERF.md section 2d has the figures for both.
//!
//! `SVFT_BLAS_LIB` names the library file; otherwise `libopenblas.so.0`, `libopenblas.so`,
//! `libcblas.so.3` and `libblas.so.3` are tried in that order. Nothing is linked at build time,
//! so a machine without a BLAS builds and runs as before.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::OnceLock;

const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;

type SgemmFn = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    f32,
    *const f32,
    c_int,
    *const f32,
    c_int,
    f32,
    *mut f32,
    c_int,
);

/// A loaded CBLAS: its `cblas_sgemm` and where it came from.
pub struct Blas {
    sgemm: SgemmFn,
    /// The library file it was loaded from.
    pub library: String,
}

/// Which GEMM the CPU layer uses (see the module docs).
pub enum Backend {
    /// faer's GEMM.
    Faer,
    /// A system CBLAS.
    System(&'static Blas),
}

impl Backend {
    /// `faer` or `blas (LIBRARY)`, for reports.
    pub fn name(&self) -> String {
        match self {
            Backend::Faer => "faer".into(),
            Backend::System(b) => format!("blas ({})", b.library),
        }
    }
}

fn load(name: &str) -> Option<Blas> {
    let c_name = CString::new(name).ok()?;
    // SAFETY: dlopen/dlsym with valid NUL-terminated strings; the handle is never closed, so
    // the function pointer stays valid for the life of the process.
    unsafe {
        let handle = libc::dlopen(c_name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
        if handle.is_null() {
            return None;
        }
        let sym: *mut c_void = libc::dlsym(handle, c"cblas_sgemm".as_ptr());
        if sym.is_null() {
            return None;
        }
        // OpenBLAS's own threads would spin on the cores rayon's threads need (and a PyTorch
        // process's OpenMP threads too); svft splits each product across rayon's threads
        // itself ([`Blas::sgemm_split`]), so the library computes single-threaded.
        let threads = libc::dlsym(handle, c"openblas_set_num_threads".as_ptr());
        if !threads.is_null() {
            std::mem::transmute::<*mut c_void, unsafe extern "C" fn(c_int)>(threads)(1);
        }
        Some(Blas { sgemm: std::mem::transmute::<*mut c_void, SgemmFn>(sym), library: name.to_string() })
    }
}

fn system() -> Option<&'static Blas> {
    static BLAS: OnceLock<Option<Blas>> = OnceLock::new();
    BLAS.get_or_init(|| match std::env::var("SVFT_BLAS_LIB") {
        Ok(path) if !path.is_empty() => load(&path),
        _ => ["libopenblas.so.0", "libopenblas.so", "libcblas.so.3", "libblas.so.3"].iter().find_map(|n| load(n)),
    })
    .as_ref()
}

/// The backend `SVFT_GEMM` selects (read once); when the request cannot be met, faer, after a
/// one-line warning on stderr.
pub fn backend() -> &'static Backend {
    static WARNED: OnceLock<&'static Backend> = OnceLock::new();
    WARNED.get_or_init(|| match requested() {
        Ok(b) => b,
        Err(why) => {
            eprintln!("svft: {why}; using faer");
            &Backend::Faer
        }
    })
}

/// The backend `SVFT_GEMM` asks for, or why it cannot be had.
pub fn requested() -> Result<&'static Backend, &'static str> {
    static CHOICE: OnceLock<Result<Backend, String>> = OnceLock::new();
    CHOICE
        .get_or_init(|| match std::env::var("SVFT_GEMM").unwrap_or_default().as_str() {
            "" | "faer" => Ok(Backend::Faer),
            "blas" => system().map(Backend::System).ok_or_else(|| {
                "SVFT_GEMM=blas but no CBLAS library loads (install libopenblas0-pthread, or set SVFT_BLAS_LIB)".into()
            }),
            "auto" => Ok(system().map_or(Backend::Faer, Backend::System)),
            other => Err(format!("SVFT_GEMM=`{other}`: expected faer, blas or auto")),
        })
        .as_ref()
        .map_err(String::as_str)
}

/// A pointer that crosses to rayon's threads (each block writes its own columns).
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: only used for disjoint column blocks of one output, inside a scope that outlives them.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

impl Blas {
    /// [`Blas::sgemm`] split into column blocks of `c`, one per rayon thread, each a
    /// single-threaded library call (see `load`): products too small to pay for threads run
    /// whole on the calling thread.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn sgemm_split(
        &self,
        c: &mut [f32],
        a: &[f32],
        a_t: bool,
        b: &[f32],
        b_t: bool,
        (m, n, k): (usize, usize, usize),
        accumulate: bool,
    ) {
        let threads = rayon::current_num_threads();
        let flops = 2.0 * (m * n * k) as f64;
        if threads < 2 || flops < 2.0e6 || n < 64 {
            return self.sgemm(c, a, a_t, b, b_t, (m, n, k), accumulate);
        }
        let blocks = threads.min(n / 32);
        let per = n.div_ceil(blocks).next_multiple_of(16);
        let cp = SendPtr(c.as_mut_ptr());
        rayon::scope(|scope| {
            for j0 in (0..n).step_by(per) {
                let nb = per.min(n - j0);
                // Columns j0.. of B: an offset along a row (row-major k x n) or down the rows
                // (its transpose stored n x k).
                let b_off = if b_t { j0 * k } else { j0 };
                scope.spawn(move |_| {
                    // SAFETY: block j0 reads a and columns j0..j0+nb of b (in bounds: b holds
                    // the whole k x n operand) and writes only columns j0..j0+nb of c, which no
                    // other block touches; c outlives the scope.
                    unsafe {
                        let b = b.as_ptr().add(b_off);
                        self.raw((a.as_ptr(), a_t), (b, b_t), (m, nb, k), n, cp.get().add(j0), accumulate)
                    }
                });
            }
        });
    }

    /// `c = alpha-free a b (+ c)`: row-major `c (m x n)`, `a (m x k)` or its transpose stored
    /// `k x m`, `b (k x n)` or its transpose stored `n x k`. Dimensions must fit a C int.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn sgemm(
        &self,
        c: &mut [f32],
        a: &[f32],
        a_t: bool,
        b: &[f32],
        b_t: bool,
        (m, n, k): (usize, usize, usize),
        accumulate: bool,
    ) {
        // SAFETY: the slices hold exactly the row-major matrices the arguments describe
        // (checked by the caller), and the library writes only c.
        unsafe { self.raw((a.as_ptr(), a_t), (b.as_ptr(), b_t), (m, n, k), n, c.as_mut_ptr(), accumulate) }
    }

    /// One `cblas_sgemm`: `c (m x n, row stride ldc)` = `a b (+ c)`, the leading dimensions
    /// of `a` and `b` those of the whole operands (`b` may point into a column block).
    ///
    /// # Safety
    /// `a` and `b` valid for the operands described, `c` for `m` rows of stride `ldc`, and no
    /// other thread writing what this call reads or writes.
    unsafe fn raw(
        &self,
        (a, a_t): (*const f32, bool),
        (b, b_t): (*const f32, bool),
        (m, n, k): (usize, usize, usize),
        ldc: usize,
        c: *mut f32,
        accumulate: bool,
    ) {
        let dim = |x: usize| c_int::try_from(x).expect("GEMM dimension beyond a C int");
        let lda = if a_t { m } else { k };
        let ldb = if b_t { k } else { ldc };
        // SAFETY: per the contract.
        unsafe {
            (self.sgemm)(
                ROW_MAJOR,
                if a_t { TRANS } else { NO_TRANS },
                if b_t { TRANS } else { NO_TRANS },
                dim(m),
                dim(n),
                dim(k),
                1.0,
                a,
                dim(lda.max(1)),
                b,
                dim(ldb.max(1)),
                if accumulate { 1.0 } else { 0.0 },
                c,
                dim(ldc.max(1)),
            )
        }
    }
}

/// The system BLAS as a backend, whatever `SVFT_GEMM` says (tests and benchmarks compare both).
pub fn requested_system() -> Result<Backend, &'static str> {
    system().map(Backend::System).ok_or("no CBLAS library loads")
}

/// The library's own version string, where it has one (OpenBLAS's `openblas_get_config`).
pub fn config(blas: &Blas) -> Option<String> {
    let c_name = CString::new(blas.library.as_str()).ok()?;
    // SAFETY: as in `load`; openblas_get_config returns a static NUL-terminated string.
    unsafe {
        let handle = libc::dlopen(c_name.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
        if handle.is_null() {
            return None;
        }
        let sym = libc::dlsym(handle, c"openblas_get_config".as_ptr());
        if sym.is_null() {
            return None;
        }
        let f: unsafe extern "C" fn() -> *const c_char = std::mem::transmute(sym);
        Some(CStr::from_ptr(f()).to_string_lossy().into_owned())
    }
}
