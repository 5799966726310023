//! Dense products on row-major f32 buffers: faer, or a system BLAS when `SVFT_GEMM` selects one
//! (see [`super::blas`]).
//!
//! Every matrix in the crate is row-major; faer views them without copying
//! (`MatRef::from_row_major_slice`), a BLAS takes them as row-major CBLAS operands, and a
//! transpose is only a flag.

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};

use super::blas::Backend;

/// A row-major matrix operand: `rows x cols` over `data`, optionally used transposed.
#[derive(Clone, Copy)]
pub struct Operand<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    transposed: bool,
}

impl<'a> Operand<'a> {
    /// `data` as a `rows x cols` row-major matrix.
    pub fn n(data: &'a [f32], rows: usize, cols: usize) -> Self {
        debug_assert_eq!(data.len(), rows * cols);
        Operand { data, rows, cols, transposed: false }
    }

    /// The transpose of the `rows x cols` row-major matrix in `data`.
    pub fn t(data: &'a [f32], rows: usize, cols: usize) -> Self {
        debug_assert_eq!(data.len(), rows * cols);
        Operand { data, rows, cols, transposed: true }
    }

    fn view(&self) -> MatRef<'a, f32> {
        let m = MatRef::from_row_major_slice(self.data, self.rows, self.cols);
        if self.transposed {
            m.transpose()
        } else {
            m
        }
    }

    fn shape(&self) -> (usize, usize) {
        if self.transposed {
            (self.cols, self.rows)
        } else {
            (self.rows, self.cols)
        }
    }
}

/// The parallelism for a product of this many FLOPs: threads only where they pay.
fn par_for(flops: f64) -> Par {
    if flops < 2.0e6 {
        Par::Seq
    } else {
        Par::rayon(0)
    }
}

/// `c = a b` (or `c += a b` with `accumulate`), `c` row-major `m x n`, on the selected backend.
pub fn gemm(c: &mut [f32], a: Operand<'_>, b: Operand<'_>, accumulate: bool) {
    gemm_on(super::blas::backend(), c, a, b, accumulate)
}

/// [`gemm`] on a given backend.
pub fn gemm_on(backend: &Backend, c: &mut [f32], a: Operand<'_>, b: Operand<'_>, accumulate: bool) {
    let (m, k) = a.shape();
    let (k2, n) = b.shape();
    assert_eq!(k, k2, "inner dimensions differ");
    assert_eq!(c.len(), m * n, "output size");
    if let Backend::System(blas) = backend {
        if m > 0 && n > 0 {
            blas.sgemm_split(c, a.data, a.transposed, b.data, b.transposed, (m, n, k), accumulate);
        }
        return;
    }
    let dst = MatMut::from_row_major_slice_mut(c, m, n);
    let beta = if accumulate { Accum::Add } else { Accum::Replace };
    matmul(dst, beta, a.view(), b.view(), 1.0f32, par_for(2.0 * (m * n * k) as f64));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_backend_agrees_with_a_plain_loop() {
        // Odd sizes, all four transpose combinations, replace and accumulate, on faer and on
        // the system BLAS when one loads (CI installs OpenBLAS, so both run there).
        let mut backends = vec![Backend::Faer];
        match super::super::blas::requested_system() {
            Ok(b) => backends.push(b),
            // scripts/test.sh installs OpenBLAS and sets this: there, a missing BLAS fails.
            Err(why) if std::env::var_os("SVFT_REQUIRE_BLAS").is_some() => panic!("SVFT_REQUIRE_BLAS: {why}"),
            Err(why) => eprintln!("system BLAS not tested: {why}"),
        }
        // The second size is large enough for the BLAS backend to split it into column blocks
        // (uneven: 203 columns), the first runs whole.
        for (m, n, k) in [(7, 5, 9), (37, 203, 301)] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0).collect();
            let b: Vec<f32> = (0..k * n).map(|i| ((i * 17 % 13) as f32 - 6.0) / 4.0).collect();
            let at: Vec<f32> = (0..m * k).map(|i| a[(i % m) * k + i / m]).collect(); // k x m
            let bt: Vec<f32> = (0..k * n).map(|i| b[(i % k) * n + i / k]).collect(); // n x k
            let want: Vec<f64> = (0..m * n)
                .map(|i| (0..k).map(|p| f64::from(a[(i / n) * k + p]) * f64::from(b[p * n + i % n])).sum::<f64>() + 0.5)
                .collect();
            let close = |got: f32, want: f64| (f64::from(got) - want).abs() < 1e-4 * (1.0 + want.abs());
            for be in &backends {
                for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                    let what = format!("{} {m}x{k}x{n} ta={ta} tb={tb}", be.name());
                    let oa = if ta { Operand::t(&at, k, m) } else { Operand::n(&a, m, k) };
                    let ob = if tb { Operand::t(&bt, n, k) } else { Operand::n(&b, k, n) };
                    let mut c = vec![0.5f32; m * n];
                    gemm_on(be, &mut c, oa, ob, true);
                    assert!(c.iter().zip(&want).all(|(&x, &y)| close(x, y)), "{what}: accumulate");
                    let mut c = vec![f32::NAN; m * n]; // replace must ignore the poisoned output
                    gemm_on(be, &mut c, oa, ob, false);
                    assert!(c.iter().zip(&want).all(|(&x, &y)| close(x, y - 0.5)), "{what}: replace");
                }
            }
        }
    }

    #[test]
    fn transposes_are_views() {
        // a: 2x3, b: 2x3 -> a b^T: 2x2
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let b = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0];
        let mut c = [0.0; 4];
        gemm(&mut c, Operand::n(&a, 2, 3), Operand::t(&b, 2, 3), false);
        assert_eq!(c, [4.0, 2.0, 10.0, 5.0]);
        // a^T b: 3x3, accumulate onto ones
        let mut d = [1.0; 9];
        gemm(&mut d, Operand::t(&a, 2, 3), Operand::n(&b, 2, 3), true);
        assert_eq!(d, [2.0, 5.0, 2.0, 3.0, 6.0, 3.0, 4.0, 7.0, 4.0]);
    }
}
