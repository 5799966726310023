//! The hand-written sparse passes of the CPU backend: the core C applied to activations or
//! folded into a factor, the SDDMM for dC, and the gate reduction.
//!
//! The pattern is fixed, so its index structure is built once ([`CoreIndex`]). A band (Plain,
//! Banded) is a shifted-diagonal stencil: the values sit in a diagonal-major table
//! `D[(o + d) r + i] = g M(i, i + o)`, so every pass is a handful of contiguous, vectorisable
//! loops, one per diagonal. Any other pattern (Random, TopK) uses a CSR by row and a CSR by
//! column, each entry remembering its canonical coefficient index. Per call only the values
//! `g * M` are gathered into that layout (|Omega| work), then every pass streams rows.
//! Rows are independent, so the passes split rows across threads; the SDDMM reduces per-chunk
//! partial sums in a fixed order, so its result does not depend on the thread count.

use rayon::prelude::*;

use crate::layer::pattern::{Csr, Omega};

/// Row count under which a pass stays on the calling thread (spawning costs more).
const PAR_MIN_ROWS: usize = 64;
/// The SDDMM splits the batch into at most this many chunks (bounds its partial-sum workspace).
pub const SDDMM_MAX_CHUNKS: usize = 16;

/// A band of half-width `d`: where each canonical coefficient sits in the diagonal table.
#[derive(Debug, Clone)]
pub struct Band {
    /// Half-width.
    pub d: usize,
    /// `slot[k] = (o + d) r + i` for coefficient k at `(i, i + o)`.
    pub slot: Vec<u32>,
}

/// How the core's off-diagonal part is laid out for the passes.
#[derive(Debug, Clone)]
pub enum Structure {
    /// A shifted-diagonal stencil.
    Band(Band),
    /// Arbitrary pairs: CSR by row (`S = T C^T`, `V_C`) and by column (`A C`, `U_C`).
    Coo { by_row: Csr, by_col: Csr },
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
    /// The layout of the values.
    pub structure: Structure,
}

impl CoreIndex {
    /// Builds the structure of an index set: a stencil for bands, CSRs otherwise.
    pub fn new(omega: &Omega) -> Self {
        let r = omega.r;
        let structure = if omega.pattern.is_banded()
            && omega
                .rows
                .iter()
                .zip(&omega.cols)
                .all(|(&i, &j)| (i as i64 - j as i64).unsigned_abs() as usize <= omega.pattern.d())
        {
            let d = omega.pattern.d();
            let slot = omega
                .rows
                .iter()
                .zip(&omega.cols)
                .map(|(&i, &j)| ((j as i64 - i as i64 + d as i64) as usize * r + i as usize) as u32)
                .collect();
            Structure::Band(Band { d, slot })
        } else {
            Structure::Coo { by_row: omega.csr_by_row(), by_col: omega.csr_by_col() }
        };
        CoreIndex { r, rows: omega.rows.clone(), cols: omega.cols.clone(), structure }
    }

    /// |Omega|.
    pub fn nnz(&self) -> usize {
        self.rows.len()
    }

    /// Length of the gathered value table (and of each SDDMM partial).
    pub fn table_len(&self) -> usize {
        match &self.structure {
            Structure::Band(b) => (2 * b.d + 1) * self.r,
            Structure::Coo { .. } => self.nnz(),
        }
    }

    /// Gathers `g M` into the table(s): `fwd` for `S = T C^T`, `bwd` for `A C` (a band uses
    /// one table for both and leaves `bwd` untouched). Both are `table_len()` long.
    pub fn gather(&self, m: &[f32], g: f32, fwd: &mut [f32], bwd: &mut [f32]) {
        match &self.structure {
            Structure::Band(b) => {
                fwd.fill(0.0); // slots outside the matrix stay zero
                for (&slot, &v) in b.slot.iter().zip(m) {
                    fwd[slot as usize] += g * v;
                }
            }
            Structure::Coo { by_row, by_col } => {
                by_row.gather(m, g, fwd);
                by_col.gather(m, g, bwd);
            }
        }
    }

    /// `out = in C^T` row by row: `S = T C^T` (forward) and `V_C = V C^T` (fold).
    pub fn apply_fwd(&self, input: &[f32], out: &mut [f32], s: &[f32], fwd: &[f32], _bwd: &[f32]) {
        match &self.structure {
            Structure::Band(b) => for_rows(input, out, self.r, |i, o| band_row_fwd(i, o, s, fwd, b.d)),
            Structure::Coo { by_row, .. } => for_rows(input, out, self.r, |i, o| csr_row(i, o, s, by_row, fwd)),
        }
    }

    /// `out = in C` row by row: `A C` (backward) and `U_C = U C` (fold).
    pub fn apply_bwd(&self, input: &[f32], out: &mut [f32], s: &[f32], fwd: &[f32], bwd: &[f32]) {
        match &self.structure {
            Structure::Band(b) => for_rows(input, out, self.r, |i, o| band_row_bwd(i, o, s, fwd, b.d)),
            Structure::Coo { by_col, .. } => for_rows(input, out, self.r, |i, o| csr_row(i, o, s, by_col, bwd)),
        }
    }

    /// Floats of SDDMM partial sums needed for `rows` batch rows.
    pub fn sddmm_partial_len(&self, rows: usize) -> usize {
        sddmm_chunks(rows).0 * self.table_len()
    }
}

/// Runs `f(in_row, out_row)` over the rows of two `rows x r` matrices, on threads when it pays.
fn for_rows(input: &[f32], out: &mut [f32], r: usize, f: impl Fn(&[f32], &mut [f32]) + Sync) {
    debug_assert_eq!(input.len(), out.len());
    if input.len() / r < PAR_MIN_ROWS {
        input.chunks_exact(r).zip(out.chunks_exact_mut(r)).for_each(|(i, o)| f(i, o));
    } else {
        input
            .par_chunks_exact(r)
            .zip(out.par_chunks_exact_mut(r))
            .with_min_len(PAR_MIN_ROWS / 4)
            .for_each(|(i, o)| f(i, o));
    }
}

/// One row of `in C^T` for a band: `o[i] = s_i x[i] + sum_off D[off][i] x[i + off]`.
#[inline]
fn band_row_fwd(x: &[f32], o: &mut [f32], s: &[f32], table: &[f32], d: usize) {
    let r = x.len();
    for i in 0..r {
        o[i] = s[i] * x[i];
    }
    for k in 0..=2 * d {
        let diag = &table[k * r..(k + 1) * r];
        if k >= d {
            let off = k - d; // o[i] += D[i] x[i + off], i < r - off
            let n = r.saturating_sub(off);
            for ((oi, di), xi) in o[..n].iter_mut().zip(&diag[..n]).zip(&x[off..]) {
                *oi += di * xi;
            }
        } else {
            let off = d - k; // o[i] += D[i] x[i - off], i >= off
            if off < r {
                for ((oi, di), xi) in o[off..].iter_mut().zip(&diag[off..]).zip(&x[..r - off]) {
                    *oi += di * xi;
                }
            }
        }
    }
}

/// One row of `in C` for a band: `o[j] = s_j x[j] + sum_(i,j) x[i] M(i, j)`, i.e. for each
/// diagonal `o[i + off] += D[off][i] x[i]`.
#[inline]
fn band_row_bwd(x: &[f32], o: &mut [f32], s: &[f32], table: &[f32], d: usize) {
    let r = x.len();
    for i in 0..r {
        o[i] = s[i] * x[i];
    }
    for k in 0..=2 * d {
        let diag = &table[k * r..(k + 1) * r];
        if k >= d {
            let off = k - d; // o[i + off] += D[i] x[i], i < r - off
            let n = r.saturating_sub(off);
            for ((oj, di), xi) in o[off..].iter_mut().zip(&diag[..n]).zip(&x[..n]) {
                *oj += di * xi;
            }
        } else {
            let off = d - k; // o[i - off] += D[i] x[i], i >= off
            if off < r {
                for ((oj, di), xi) in o[..r - off].iter_mut().zip(&diag[off..]).zip(&x[off..]) {
                    *oj += di * xi;
                }
            }
        }
    }
}

/// One row through a CSR: `o[i] = s_i x[i] + sum_e vals[e] x[idx[e]]`.
#[inline]
fn csr_row(x: &[f32], o: &mut [f32], s: &[f32], csr: &Csr, vals: &[f32]) {
    for i in 0..x.len() {
        let (lo, hi) = (csr.ptr[i] as usize, csr.ptr[i + 1] as usize);
        let mut acc = s[i] * x[i];
        for e in lo..hi {
            acc += vals[e] * x[csr.idx[e] as usize];
        }
        o[i] = acc;
    }
}

/// Chunking of `rows` batch rows for the SDDMM: depends on `rows` only, never on threads.
pub fn sddmm_chunks(rows: usize) -> (usize, usize) {
    let chunks = rows.div_ceil(PAR_MIN_ROWS).clamp(1, SDDMM_MAX_CHUNKS);
    let per = rows.div_ceil(chunks);
    (rows.div_ceil(per), per)
}

/// `dc[k] = sum_b a[b, rows[k]] t[b, cols[k]]` over the `rows x r` matrices `a` and `t`.
/// `partial` must hold `index.sddmm_partial_len(rows)` floats. Bitwise deterministic: the
/// chunks depend on `rows` only and are summed in a fixed order.
pub fn sddmm(a: &[f32], t: &[f32], index: &CoreIndex, partial: &mut [f32], dc: &mut [f32]) {
    let r = index.r;
    let rows = a.len() / r;
    let (chunks, per) = sddmm_chunks(rows);
    let len = index.table_len();
    let partial = &mut partial[..chunks * len];
    let chunk_sum = |(c, p): (usize, &mut [f32])| {
        p.fill(0.0);
        let (lo, hi) = (c * per, ((c + 1) * per).min(rows));
        for b in lo..hi {
            let (ar, tr) = (&a[b * r..(b + 1) * r], &t[b * r..(b + 1) * r]);
            match &index.structure {
                // P[off][i] += a[i] t[i + off]: one contiguous loop per diagonal.
                Structure::Band(band) => {
                    let d = band.d;
                    for k in 0..=2 * d {
                        let pk = &mut p[k * r..(k + 1) * r];
                        if k >= d {
                            let n = r.saturating_sub(k - d);
                            for ((pi, ai), ti) in pk[..n].iter_mut().zip(&ar[..n]).zip(&tr[k - d..]) {
                                *pi += ai * ti;
                            }
                        } else if d - k < r {
                            let off = d - k;
                            for ((pi, ai), ti) in pk[off..].iter_mut().zip(&ar[off..]).zip(&tr[..r - off]) {
                                *pi += ai * ti;
                            }
                        }
                    }
                }
                Structure::Coo { .. } => {
                    for ((pk, &i), &j) in p.iter_mut().zip(&index.rows).zip(&index.cols) {
                        *pk += ar[i as usize] * tr[j as usize];
                    }
                }
            }
        }
    };
    if chunks == 1 {
        chunk_sum((0, partial));
    } else {
        partial.par_chunks_mut(len).enumerate().for_each(chunk_sum);
    }
    let slot_of = |k: usize| match &index.structure {
        Structure::Band(b) => b.slot[k] as usize,
        Structure::Coo { .. } => k,
    };
    for (k, out) in dc.iter_mut().enumerate() {
        let slot = slot_of(k);
        let mut acc = partial[slot];
        for c in 1..chunks {
            acc += partial[c * len + slot];
        }
        *out = acc;
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
    use crate::layer::pattern::Pattern;

    #[test]
    fn csr_groups_and_keeps_canonical_order() {
        let omega =
            Omega::from_indices(Pattern::Random { d: 1, seed: 0 }, 3, vec![2, 0, 2, 1], vec![1, 1, 0, 1]).unwrap();
        let Structure::Coo { by_row, by_col } = CoreIndex::new(&omega).structure else { panic!("not COO") };
        assert_eq!(by_row.ptr, vec![0, 1, 2, 4]);
        assert_eq!(by_row.perm, vec![1, 3, 0, 2]);
        assert_eq!(by_col.ptr, vec![0, 1, 4, 4]);
        assert_eq!(by_col.perm, vec![2, 0, 1, 3]);
    }

    #[test]
    fn chunks_cover_all_rows() {
        for rows in [1, 63, 64, 65, 1000, 4097] {
            let (c, per) = sddmm_chunks(rows);
            assert!(c * per >= rows && (c - 1) * per < rows && c <= SDDMM_MAX_CHUNKS);
        }
    }
}
