//! Dense products on row-major f32 buffers through faer.
//!
//! Every matrix in the crate is row-major; faer views them without copying
//! (`MatRef::from_row_major_slice`) and a transpose is only a view.

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};

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

/// `c = a b` (or `c += a b` with `accumulate`), `c` row-major `m x n`.
pub fn gemm(c: &mut [f32], a: Operand<'_>, b: Operand<'_>, accumulate: bool) {
    let (m, k) = a.shape();
    let (k2, n) = b.shape();
    assert_eq!(k, k2, "inner dimensions differ");
    assert_eq!(c.len(), m * n, "output size");
    let dst = MatMut::from_row_major_slice_mut(c, m, n);
    let beta = if accumulate { Accum::Add } else { Accum::Replace };
    matmul(dst, beta, a.view(), b.view(), 1.0f32, par_for(2.0 * (m * n * k) as f64));
}

#[cfg(test)]
mod tests {
    use super::*;

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
