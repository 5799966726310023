//! The device layout of a bank for the `bank_apply` kernels (kernels/bank.cu): every adapter's
//! coefficients back to back, one gate value and one info record per slot, the CSRs of the
//! non-band patterns (one per distinct pattern), and the tiles a segment table is cut into.
//! Built on the host from a [`CpuBank`]'s adapters; what a CUDA bank uploads, and what the
//! interpret-mode tests hand the kernels directly.

use std::collections::HashMap;

use super::segments::{validate, Resolved, Segment};
use super::CpuBank;
use crate::error::{Error, Result};
use crate::layer::pattern::{Omega, Pattern};

/// Rows per tile: a block's share of one segment (several row groups of the kernel).
pub const TILE_ROWS: usize = 16;

/// The kernels' arguments that depend on the adapters, not on the batch (see kernels/bank.cu).
#[derive(Debug, Clone, Default)]
pub struct KernelLayout {
    /// Every slot's coefficients, back to back.
    pub m: Vec<f32>,
    /// One gate value per slot.
    pub g: Vec<f32>,
    /// 4 per slot: d (or -1: CSR), M offset, ptr offset, idx offset.
    pub info: Vec<i32>,
    /// CSR row (forward) or column (backward) pointers, `r + 1` per distinct CSR pattern.
    pub ptr: Vec<i32>,
    /// CSR entries: the other index.
    pub idx: Vec<i32>,
    /// CSR entries: the canonical coefficient index.
    pub perm: Vec<i32>,
    /// Adapter id to slot.
    slot_of: HashMap<u32, u32>,
}

/// Whether `omega` is its band's canonical index set (the band kernel finds coefficients by
/// position); any other set, a band label included, goes through a CSR.
fn canonical_band(omega: &Omega) -> Option<usize> {
    if !omega.pattern.is_banded() {
        return None;
    }
    let d = omega.pattern.d();
    let band = Pattern::Banded { d }.omega_for_rank(omega.r).ok()?;
    (band.rows == omega.rows && band.cols == omega.cols).then_some(d)
}

fn int(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v)
        .map_err(|_| Error::InvalidArgument(format!("bank layout: {what} ({v}) exceeds the kernels' 32-bit indices")))
}

impl KernelLayout {
    /// The layout of `bank`'s adapters for the forward (`S = T C^T`, CSR by row) or backward
    /// (`A C`, CSR by column) kernels. Adapters with the same non-band pattern share one CSR.
    pub fn new(bank: &CpuBank, forward: bool) -> Result<Self> {
        let mut out = KernelLayout::default();
        let mut ids: Vec<u32> = bank.ids().collect();
        ids.sort_unstable();
        let mut csrs: Vec<(Omega, i32, i32)> = Vec::new();
        for (slot, id) in ids.into_iter().enumerate() {
            let a = bank.adapter(id).expect("listed by the bank");
            let m_off = int("total coefficients", out.m.len())?;
            out.m.extend_from_slice(&a.m);
            int("total coefficients", out.m.len())?;
            out.g.push(a.g());
            match canonical_band(&a.omega) {
                Some(d) => out.info.extend([int("d", d)?, m_off, 0, 0]),
                None => {
                    let (p_off, i_off) = match csrs.iter().find(|c| c.0 == a.omega) {
                        Some(c) => (c.1, c.2),
                        None => {
                            let csr = if forward { a.omega.csr_by_row() } else { a.omega.csr_by_col() };
                            let offs = (int("CSR pointers", out.ptr.len())?, int("CSR entries", out.idx.len())?);
                            out.ptr.extend(csr.ptr.iter().map(|&p| p as i32));
                            out.idx.extend(csr.idx.iter().map(|&p| p as i32));
                            out.perm.extend(csr.perm.iter().map(|&p| p as i32));
                            int("CSR entries", out.idx.len())?;
                            csrs.push((a.omega.clone(), offs.0, offs.1));
                            offs
                        }
                    };
                    out.info.extend([-1, m_off, p_off, i_off]);
                }
            }
            out.slot_of.insert(id, slot as u32);
        }
        // The kernels take non-null pointers even when no slot uses a CSR.
        for v in [&mut out.ptr, &mut out.idx, &mut out.perm] {
            if v.is_empty() {
                v.push(0);
            }
        }
        if out.m.is_empty() {
            out.m.push(0.0);
            out.g.push(0.0);
            out.info.extend([-2, 0, 0, 0]);
        }
        Ok(out)
    }

    /// Validates `segments` over `n` rows against the adapters of this layout and cuts them
    /// into the kernels' tiles (3 ints each: first row, rows, slot or -1), into `tiles`
    /// (cleared first). Empty segments give no tile.
    pub fn tiles(&self, segments: &[Segment], n: usize, tiles: &mut Vec<i32>) -> Result<()> {
        let mut resolved = Vec::with_capacity(segments.len());
        validate(segments, n, |id| self.slot_of.get(&id).copied(), &mut resolved)?;
        int("tokens", n)?;
        tiles.clear();
        for (s, which) in segments.iter().zip(resolved) {
            let slot = if which == Resolved::BASE { -1 } else { which.0 as i32 };
            let mut row = s.start;
            while row < s.end {
                let rows = (s.end - row).min(TILE_ROWS);
                tiles.extend([row as i32, rows as i32, slot]);
                row += rows;
            }
        }
        Ok(())
    }
}
