//! The hand-written sparse passes of the CPU backend: the core C applied to activations or
//! folded into a factor, the SDDMM for dC, and the gate reduction.
//!
//! The pattern is fixed, so its index structure is built once ([`CoreIndex`]): a CSR by row and
//! a CSR by column, each entry remembering its canonical coefficient index. Per call only the
//! values `g * M` are gathered into CSR order (|Omega| work), then every pass streams rows.
//! Rows are independent, so the passes split rows across threads; the SDDMM reduces per-chunk
//! partial sums in a fixed order, so its result does not depend on the thread count.

use rayon::prelude::*;

use crate::pattern::Omega;

/// Row count under which a pass stays on the calling thread (spawning costs more).
const PAR_MIN_ROWS: usize = 64;
/// The SDDMM splits the batch into at most this many chunks (bounds its partial-sum workspace).
pub const SDDMM_MAX_CHUNKS: usize = 16;

/// A compressed-row structure over an r x r pattern.
#[derive(Debug, Clone)]
pub struct Csr {
    /// `ptr[i]..ptr[i+1]` are the entries of row i.
    pub ptr: Vec<u32>,
    /// Column of each entry.
    pub idx: Vec<u32>,
    /// Canonical coefficient index of each entry.
    pub perm: Vec<u32>,
}

impl Csr {
    /// Groups entries by `major[k]`, keeping canonical order within a group (a stable
    /// counting sort: O(r + nnz)).
    fn build(r: usize, major: &[u32], minor: &[u32]) -> Csr {
        let mut ptr = vec![0u32; r + 1];
        for &i in major {
            ptr[i as usize + 1] += 1;
        }
        for i in 0..r {
            ptr[i + 1] += ptr[i];
        }
        let mut next = ptr.clone();
        let mut idx = vec![0u32; major.len()];
        let mut perm = vec![0u32; major.len()];
        for (k, (&i, &j)) in major.iter().zip(minor).enumerate() {
            let e = next[i as usize] as usize;
            idx[e] = j;
            perm[e] = k as u32;
            next[i as usize] += 1;
        }
        Csr { ptr, idx, perm }
    }

    /// `vals[e] = g * m[perm[e]]`: the coefficients in this structure's order.
    pub fn gather(&self, m: &[f32], g: f32, vals: &mut [f32]) {
        for (v, &k) in vals.iter_mut().zip(&self.perm) {
            *v = g * m[k as usize];
        }
    }
}

/// The pattern's index structures, built once per layer.
#[derive(Debug, Clone)]
pub struct CoreIndex {
    /// Rank.
    pub r: usize,
    /// Canonical rows (SDDMM).
    pub rows: Vec<u32>,
    /// Canonical columns (SDDMM).
    pub cols: Vec<u32>,
    /// Entries grouped by row: `S = T C^T` and `V_C = V C^T`.
    pub by_row: Csr,
    /// Entries grouped by column: `A C` and `U_C = U C`.
    pub by_col: Csr,
}

impl CoreIndex {
    /// Builds both CSRs of an index set.
    pub fn new(omega: &Omega) -> Self {
        CoreIndex {
            r: omega.r,
            rows: omega.rows.clone(),
            cols: omega.cols.clone(),
            by_row: Csr::build(omega.r, &omega.rows, &omega.cols),
            by_col: Csr::build(omega.r, &omega.cols, &omega.rows),
        }
    }

    /// |Omega|.
    pub fn nnz(&self) -> usize {
        self.rows.len()
    }
}

/// `out[b, i] = s[i] in[b, i] + sum_{e in row i of csr} vals[e] in[b, idx[e]]` for every row b.
///
/// With `by_row` and `vals = g M` this is `S = T C^T` (forward) and `V_C = V C^T` (fold);
/// with `by_col` it is `A C` (backward) and `U_C = U C` (fold).
pub fn apply_core(input: &[f32], out: &mut [f32], r: usize, s: &[f32], csr: &Csr, vals: &[f32]) {
    debug_assert_eq!(input.len(), out.len());
    let one_row = |(inp, o): (&[f32], &mut [f32])| {
        for i in 0..r {
            let (lo, hi) = (csr.ptr[i] as usize, csr.ptr[i + 1] as usize);
            let mut acc = s[i] * inp[i];
            for e in lo..hi {
                acc += vals[e] * inp[csr.idx[e] as usize];
            }
            o[i] = acc;
        }
    };
    let rows = input.len() / r;
    if rows < PAR_MIN_ROWS {
        input
            .chunks_exact(r)
            .zip(out.chunks_exact_mut(r))
            .for_each(one_row);
    } else {
        input
            .par_chunks_exact(r)
            .zip(out.par_chunks_exact_mut(r))
            .with_min_len(PAR_MIN_ROWS / 4)
            .for_each(one_row);
    }
}

/// Chunking of `rows` batch rows for the SDDMM: depends on `rows` only, never on threads.
pub fn sddmm_chunks(rows: usize) -> (usize, usize) {
    let chunks = rows.div_ceil(PAR_MIN_ROWS).clamp(1, SDDMM_MAX_CHUNKS);
    let per = rows.div_ceil(chunks);
    (rows.div_ceil(per), per)
}

/// `dc[k] = sum_b a[b, rows[k]] t[b, cols[k]]` over the `rows x r` matrices `a` and `t`.
/// `partial` must hold `sddmm_chunks(rows).0 * nnz` floats. Bitwise deterministic.
pub fn sddmm(
    a: &[f32],
    t: &[f32],
    r: usize,
    index: &CoreIndex,
    partial: &mut [f32],
    dc: &mut [f32],
) {
    let nnz = index.nnz();
    let rows = a.len() / r;
    let (chunks, per) = sddmm_chunks(rows);
    debug_assert!(partial.len() >= chunks * nnz);
    let (ri, ci) = (&index.rows, &index.cols);
    let chunk_sum = |(c, p): (usize, &mut [f32])| {
        p.fill(0.0);
        let (lo, hi) = (c * per, ((c + 1) * per).min(rows));
        for b in lo..hi {
            let (ar, tr) = (&a[b * r..(b + 1) * r], &t[b * r..(b + 1) * r]);
            for k in 0..nnz {
                p[k] += ar[ri[k] as usize] * tr[ci[k] as usize];
            }
        }
    };
    let partial = &mut partial[..chunks * nnz];
    if chunks == 1 {
        chunk_sum((0, partial));
    } else {
        partial.par_chunks_mut(nnz).enumerate().for_each(chunk_sum);
    }
    dc.copy_from_slice(&partial[..nnz]);
    for c in 1..chunks {
        for (d, &p) in dc.iter_mut().zip(&partial[c * nnz..(c + 1) * nnz]) {
            *d += p;
        }
    }
}

/// Turns dC into the coefficient gradients: `dm = g dc`, and returns
/// `dgamma = g (1 - g) sum_k m[k] dc[k]` (0 with the gate off).
pub fn coefficient_grads(dc: &[f32], m: &[f32], g: f32, gate: bool, dm: &mut [f32]) -> f32 {
    for (o, &d) in dm.iter_mut().zip(dc) {
        *o = g * d;
    }
    if !gate {
        return 0.0;
    }
    let dot: f64 = m.iter().zip(dc).map(|(&a, &b)| a as f64 * b as f64).sum();
    (g as f64 * (1.0 - g as f64) * dot) as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pattern::Pattern;

    #[test]
    fn csr_groups_and_keeps_canonical_order() {
        let omega = Omega::from_indices(
            Pattern::Random { d: 0, seed: 0 },
            3,
            vec![2, 0, 2, 1],
            vec![1, 1, 0, 1],
        )
        .unwrap();
        let idx = CoreIndex::new(&omega);
        assert_eq!(idx.by_row.ptr, vec![0, 1, 2, 4]);
        assert_eq!(idx.by_row.perm, vec![1, 3, 0, 2]);
        assert_eq!(idx.by_col.ptr, vec![0, 1, 4, 4]);
        assert_eq!(idx.by_col.perm, vec![2, 0, 1, 3]);
    }

    #[test]
    fn chunks_cover_all_rows() {
        for rows in [1, 63, 64, 65, 1000, 4097] {
            let (c, per) = sddmm_chunks(rows);
            assert!(c * per >= rows && (c - 1) * per < rows && c <= SDDMM_MAX_CHUNKS);
        }
    }
}
