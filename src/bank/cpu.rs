//! [`CpuBank`]: N adapters of one base layer on the CPU, one mixed batch per call.
//!
//! `Y = S U^T + bias` with `S` rows `T C_a^T` for the adapter `a` of each row's segment, where
//! `T = X V`. The products are the crate's GEMMs ([`crate::cpu::gemm`]) run once for the whole
//! batch; the per-segment core is the single-adapter layer's own pass
//! ([`CoreIndex::apply_fwd`], the one [`crate::cpu::CpuLayer`] runs), on that segment's rows.
//!
//! Patterns are interned: adapters with the same index set (same band, same random seed) share
//! one [`CoreIndex`], so a resident adapter costs its coefficients and gate only. Its
//! coefficients are kept in the pass's own layout, so per call and segment piece the pass needs
//! only `g` times them, streamed into a scratch table sized once (nothing at all with the gate
//! off).
//! The rows are split into a bounded number of contiguous pieces (not one task per segment):
//! a batch of many one-row segments still spreads over every thread, and a batch of one large
//! segment still splits, with no allocation per call.

use std::collections::HashMap;
use std::sync::Arc;

use rayon::prelude::*;

use super::segments::{validate, Resolved, Segment};
use super::Adapter;
use crate::cpu::gemm::{gemm, Operand as Op};
use crate::cpu::sparse::{CoreIndex, Structure};
use crate::cpu::CpuLayer;
use crate::error::{check_finite, check_len, Error, Result};
use crate::layer::config::LayerConfig;
use crate::layer::core::LayerCore;
use crate::layer::pattern::{Omega, Pattern};
use crate::layer::svd::Factors;

/// Rows a piece of the core pass should have at least (below it, spawning costs more).
const MIN_PIECE_ROWS: usize = 16;
/// At most this many pieces (bounds the scratch tables: one per piece).
const MAX_PIECES: usize = 64;

/// One interned index set: its recipe and the pass structure built from it (which holds the
/// canonical rows and columns, so Omega is not stored twice).
#[derive(Debug)]
struct SharedPattern {
    pattern: Pattern,
    index: CoreIndex,
}

impl SharedPattern {
    fn is(&self, omega: &Omega) -> bool {
        self.pattern == omega.pattern
            && self.index.r == omega.r
            && self.index.rows == omega.rows
            && self.index.cols == omega.cols
    }

    fn omega(&self) -> Omega {
        let i = &self.index;
        Omega { pattern: self.pattern, r: i.r, rows: i.rows.clone(), cols: i.cols.clone() }
    }

    /// Bytes of the index structures.
    fn bytes(&self) -> usize {
        let i = &self.index;
        let csr = |c: &crate::layer::pattern::Csr| 4 * (c.ptr.len() + c.idx.len() + c.perm.len());
        4 * (i.rows.len() + i.cols.len())
            + match &i.structure {
                Structure::Band(b) => 4 * b.slot.len(),
                Structure::Coo { by_row, by_col } => csr(by_row) + csr(by_col),
            }
    }
}

/// One resident adapter. M is kept in the layout of the pass, ungated: a band's diagonal table
/// (zeros outside the core), a CSR pattern's values in row order. Per call the pass then needs
/// only `g` times it, a sequential scale, where canonical M would need a gather through the
/// pattern's permutation per segment (random access: measured at about as long as the pass
/// itself for one-row segments). Canonical M is recovered exactly (every coefficient has its
/// own position: the bank takes only canonical bands).
#[derive(Debug)]
struct Slot {
    id: u32,
    pattern: Arc<SharedPattern>,
    vals: Vec<f32>,
    gamma: f32,
    gate: bool,
}

impl Slot {
    fn g(&self) -> f32 {
        crate::layer::config::gate_value(self.gate, self.gamma)
    }

    /// M in canonical order.
    fn coefficients(&self) -> Vec<f32> {
        let index = &self.pattern.index;
        match &index.structure {
            Structure::Band(b) => b.slot.iter().map(|&k| self.vals[k as usize]).collect(),
            Structure::Coo { by_row, .. } => {
                let mut m = vec![0.0; self.vals.len()];
                for (&k, &v) in by_row.perm.iter().zip(&self.vals) {
                    m[k as usize] = v;
                }
                m
            }
        }
    }

    fn adapter(&self) -> Adapter {
        Adapter { omega: self.pattern.omega(), m: self.coefficients(), gamma: self.gamma, gate: self.gate }
    }
}

/// Resident bytes of a bank, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BankBytes {
    /// The shared base: U, s, V and the bias.
    pub base: usize,
    /// Every adapter's own state: M, gamma and the gate flag.
    pub adapters: usize,
    /// The distinct index sets and their pass structures (shared by the adapters using them).
    pub patterns: usize,
}

/// Per-call buffers; each grows once to what the largest batch needs.
#[derive(Debug, Default)]
struct Workspace {
    /// T = X V and S (n x r).
    t: Vec<f32>,
    s: Vec<f32>,
    /// Each segment's slot.
    resolved: Vec<Resolved>,
    /// One gathered core table per piece.
    scratch: Vec<f32>,
}

fn sized(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() != len {
        v.resize(len, 0.0);
    }
    v
}

/// The adapters of one base layer, served together (see the module doc).
///
/// ```
/// use svft::bank::{Adapter, CpuBank, Segment, BASE};
/// use svft::{cpu::CpuLayer, LayerConfig, svd::random_factors};
/// let factors = random_factors(6, 5, 5, 1).unwrap();
/// let mut bank = CpuBank::new(factors.clone(), None).unwrap();
/// for (id, spec) in [(7, "plain"), (9, "banded:1")] {
///     let layer = CpuLayer::new(factors.clone(), &LayerConfig::official(spec.parse().unwrap()), None).unwrap();
///     bank.add(id, Adapter::from_layer(&layer)).unwrap();
/// }
/// let x = vec![0.5f32; 4 * 5];                                   // 4 tokens, d_in = 5
/// let table = [Segment::new(0, 1, 9), Segment::base(1, 2), Segment::new(2, 4, 7)];
/// let y = bank.forward(&x, 4, &table).unwrap();                  // 4 x 6
/// assert_eq!(y.len(), 24);
/// assert!(bank.forward(&x, 4, &[Segment::new(0, 4, 8)]).is_err()); // no adapter 8
/// ```
#[derive(Debug)]
pub struct CpuBank {
    factors: Factors,
    bias: Option<Vec<f32>>,
    slots: Vec<Slot>,
    by_id: HashMap<u32, u32>,
    patterns: Vec<Arc<SharedPattern>>,
    share_patterns: bool,
    ws: Workspace,
}

impl CpuBank {
    /// An empty bank over these base factors and optional frozen bias (`d_out` finite values).
    pub fn new(factors: Factors, bias: Option<Vec<f32>>) -> Result<Self> {
        if let Some(b) = &bias {
            check_len("bias", b, factors.d_out)?;
            check_finite("bias", b)?;
        }
        Ok(CpuBank {
            factors,
            bias,
            slots: Vec::new(),
            by_id: HashMap::new(),
            patterns: Vec::new(),
            share_patterns: true,
            ws: Workspace::default(),
        })
    }

    /// An empty bank over a single-adapter layer's base (its factors and bias).
    pub fn from_layer(layer: &CpuLayer) -> Result<Self> {
        Self::new(layer.factors().clone(), layer.bias().map(<[f32]>::to_vec))
    }

    /// The shared base factors.
    pub fn factors(&self) -> &Factors {
        &self.factors
    }
    /// The shared frozen bias, if any.
    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }
    /// Adapters resident.
    pub fn len(&self) -> usize {
        self.slots.len()
    }
    /// Whether no adapter is resident.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
    /// Whether adapter `id` is resident.
    pub fn contains(&self, id: u32) -> bool {
        self.by_id.contains_key(&id)
    }
    /// The resident ids, in no particular order.
    pub fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.slots.iter().map(|s| s.id)
    }
    /// Distinct index sets resident (adapters with equal Omega share one).
    pub fn pattern_count(&self) -> usize {
        self.patterns.len()
    }

    /// A copy of adapter `id`'s state, if resident.
    pub fn adapter(&self, id: u32) -> Option<Adapter> {
        let s = &self.slots[*self.by_id.get(&id)? as usize];
        Some(s.adapter())
    }

    /// Adapter `id`'s coefficients (canonical order), if resident.
    pub fn coefficients(&self, id: u32) -> Option<Vec<f32>> {
        Some(self.slots[*self.by_id.get(&id)? as usize].coefficients())
    }

    /// Whether adapters added from now on share the index structures of an equal index set
    /// already resident (the default), or each build their own. Only for measuring what the
    /// sharing is worth (`svft bench --adapters`); results are the same either way.
    #[doc(hidden)]
    pub fn set_pattern_sharing(&mut self, on: bool) {
        self.share_patterns = on;
    }

    /// Checks an adapter against the base: its pattern is for this rank, non-empty and inside
    /// the `r x r` core (the single-adapter layer's own checks), one finite M value per entry,
    /// a finite gamma.
    fn check(&self, a: &Adapter) -> Result<()> {
        let f = &self.factors;
        LayerCore::check_rank(&a.omega, f.r)?;
        let config = LayerConfig { pattern: a.omega.pattern, gate: a.gate, ..Default::default() };
        let core = LayerCore::new(f.d_out, f.d_in, a.omega.clone(), &config, None)?;
        core.check_coefficients(&a.m)?;
        LayerCore::check_gamma(a.gamma)?;
        // The index set as the crate admits one from a file: a band label only on the band
        // itself, complete and in order (the stored layout relies on one position per
        // coefficient), no more indices than the label allows.
        Omega::from_indices(a.omega.pattern, a.omega.r, a.omega.rows.clone(), a.omega.cols.clone()).map(|_| ())
    }

    /// The interned structure of `omega` (built when no resident adapter has this index set).
    fn intern(&mut self, omega: &Omega) -> Arc<SharedPattern> {
        if self.share_patterns {
            if let Some(p) = self.patterns.iter().find(|p| p.is(omega)) {
                return p.clone();
            }
        }
        let p = Arc::new(SharedPattern { pattern: omega.pattern, index: CoreIndex::new(omega) });
        self.patterns.push(p.clone());
        p
    }

    /// Drops index sets no resident adapter uses any more.
    fn purge_patterns(&mut self) {
        self.patterns.retain(|p| Arc::strong_count(p) > 1);
    }

    fn slot(&mut self, id: u32, a: Adapter) -> Slot {
        let pattern = self.intern(&a.omega);
        // The pass layout with g = 1: the values themselves (1 * v, and 0 + v for a band).
        let index = &pattern.index;
        let mut vals = vec![0.0; index.table_len()];
        match &index.structure {
            Structure::Band(_) => index.gather(&a.m, 1.0, &mut vals, &mut []),
            Structure::Coo { by_row, .. } => by_row.gather(&a.m, 1.0, &mut vals),
        }
        Slot { id, pattern, vals, gamma: a.gamma, gate: a.gate }
    }

    fn missing(id: u32) -> Error {
        Error::InvalidArgument(format!("adapter id {id} is not in the bank"))
    }

    /// Adds adapter `id`; an error (and no change) if `id` is resident or the adapter does not
    /// fit the base. The other adapters are untouched.
    pub fn add(&mut self, id: u32, adapter: Adapter) -> Result<()> {
        if self.contains(id) {
            return Err(Error::InvalidArgument(format!("adapter id {id} is already in the bank (replace it instead)")));
        }
        if self.slots.len() >= u32::MAX as usize {
            return Err(Error::InvalidArgument("the bank is full".into()));
        }
        self.check(&adapter)?;
        let slot = self.slot(id, adapter);
        self.by_id.insert(id, self.slots.len() as u32);
        self.slots.push(slot);
        Ok(())
    }

    /// Adds the adapter a single-adapter layer holds, after checking that the layer is over
    /// this bank's base (the same factors and bias, value for value: an adapter trained on
    /// another base would run without error and give wrong rows).
    pub fn add_layer(&mut self, id: u32, layer: &CpuLayer) -> Result<()> {
        if layer.factors() != &self.factors || layer.bias() != self.bias.as_deref() {
            let f = layer.factors();
            return Err(Error::InvalidArgument(format!(
                "adapter {id}: the layer is not over this bank's base ({}x{} rank {} factors{}, the bank's {}x{} rank {}{})",
                f.d_out,
                f.d_in,
                f.r,
                if layer.bias().is_some() { " with bias" } else { "" },
                self.factors.d_out,
                self.factors.d_in,
                self.factors.r,
                if self.bias.is_some() { " with bias" } else { "" },
            )));
        }
        self.add(id, Adapter::from_layer(layer))
    }

    /// Replaces adapter `id` (which must be resident) and returns the old one; the others are
    /// untouched. Nothing changes on an error.
    pub fn replace(&mut self, id: u32, adapter: Adapter) -> Result<Adapter> {
        let &k = self.by_id.get(&id).ok_or_else(|| Self::missing(id))?;
        self.check(&adapter)?;
        let slot = self.slot(id, adapter);
        let old = std::mem::replace(&mut self.slots[k as usize], slot);
        let out = old.adapter();
        drop(old);
        self.purge_patterns();
        Ok(out)
    }

    /// Removes adapter `id` (which must be resident) and returns it; the others are untouched.
    pub fn remove(&mut self, id: u32) -> Result<Adapter> {
        let k = self.by_id.remove(&id).ok_or_else(|| Self::missing(id))? as usize;
        let old = self.slots.swap_remove(k);
        if let Some(moved) = self.slots.get(k) {
            self.by_id.insert(moved.id, k as u32);
        }
        let out = old.adapter();
        drop(old);
        self.purge_patterns();
        Ok(out)
    }

    /// Resident bytes: the base, the adapters' own state, the shared index sets.
    pub fn resident_bytes(&self) -> BankBytes {
        BankBytes {
            base: self.factors.bytes() + 4 * self.bias.as_ref().map_or(0, Vec::len),
            adapters: self.slots.iter().map(|s| 4 * (s.vals.len() + 1) + 1).sum(),
            patterns: self.patterns.iter().map(|p| p.bytes()).sum(),
        }
    }

    /// `Y` (`n x d_out`) for a mixed batch `x` (`n x d_in`); allocates the result.
    pub fn forward(&mut self, x: &[f32], n: usize, segments: &[Segment]) -> Result<Vec<f32>> {
        let mut y = vec![0.0; n.saturating_mul(self.factors.d_out)];
        self.forward_into(x, n, segments, &mut y)?;
        Ok(y)
    }

    /// Forward of a mixed batch into the caller's `y` (`n x d_out`): row `b` of `y` is row `b`
    /// of `x` through the adapter of the segment holding `b` (or the base weight). The table
    /// is validated in full first; allocates nothing after the first call of a given size.
    pub fn forward_into(&mut self, x: &[f32], n: usize, segments: &[Segment], y: &mut [f32]) -> Result<()> {
        let (d_out, d_in, r) = (self.factors.d_out, self.factors.d_in, self.factors.r);
        let by_id = &self.by_id;
        validate(segments, n, |id| by_id.get(&id).copied(), &mut self.ws.resolved)?;
        check_len("X (n x d_in)", x, n.saturating_mul(d_in))?;
        check_len("Y (n x d_out)", y, n.saturating_mul(d_out))?;
        let f = &self.factors;
        let ws = &mut self.ws;
        let t = sized(&mut ws.t, n * r);
        gemm(t, Op::n(x, n, d_in), Op::n(&f.v, d_in, r), false);
        let s_act = sized(&mut ws.s, n * r);
        apply_cores(&self.slots, &ws.resolved, segments, &f.s, t, s_act, &mut ws.scratch);
        gemm(y, Op::n(s_act, n, r), Op::t(&f.u, d_out, r), false);
        if let Some(b) = &self.bias {
            for row in y.chunks_exact_mut(d_out) {
                for (o, &bi) in row.iter_mut().zip(b) {
                    *o += bi;
                }
            }
        }
        Ok(())
    }
}

impl CpuBank {
    /// The core pass alone: `out = T C_a^T` row by row (`T`, `out`: `n x r`), each segment's
    /// rows through its adapter's core (`diag(s)` for [`BASE`](super::BASE)). What
    /// [`CpuBank::forward_into`] runs between its two products: the CPU twin of the
    /// `bank_apply` kernels (kernels/bank.cu), and what the bench times on its own.
    pub fn core_into(&mut self, t: &[f32], n: usize, segments: &[Segment], out: &mut [f32]) -> Result<()> {
        let r = self.factors.r;
        let by_id = &self.by_id;
        validate(segments, n, |id| by_id.get(&id).copied(), &mut self.ws.resolved)?;
        check_len("T (n x r)", t, n.saturating_mul(r))?;
        check_len("S (n x r)", out, n.saturating_mul(r))?;
        apply_cores(&self.slots, &self.ws.resolved, segments, &self.factors.s, t, out, &mut self.ws.scratch);
        Ok(())
    }
}

/// `out = t C^T` for a validated table (`resolved`: each segment's slot), in contiguous pieces
/// of rows on threads (at most [`MAX_PIECES`], each with its own scratch table).
fn apply_cores(
    slots: &[Slot],
    resolved: &[Resolved],
    segments: &[Segment],
    s: &[f32],
    t: &[f32],
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let r = s.len();
    let n = t.len() / r;
    let pieces = n.div_ceil(MIN_PIECE_ROWS).clamp(1, (4 * rayon::current_num_threads()).clamp(1, MAX_PIECES));
    let per = n.div_ceil(pieces);
    let pieces = n.div_ceil(per);
    // One scratch table per piece, as long as the longest table of the adapters in the batch.
    let table = resolved
        .iter()
        .filter(|&&k| k != Resolved::BASE)
        .map(|k| slots[k.0 as usize].pattern.index.table_len())
        .max()
        .unwrap_or(0)
        .max(1);
    let scratch = sized(scratch, pieces * table);
    out.par_chunks_mut(per * r).zip(scratch.par_chunks_mut(table)).enumerate().for_each(|(c, (out, scratch))| {
        let lo = c * per;
        let hi = lo + out.len() / r;
        // Segments end in order, so the first one reaching past `lo` is a binary search away.
        let mut k = segments.partition_point(|seg| seg.end <= lo);
        while k < segments.len() && segments[k].start < hi {
            let (a, b) = (segments[k].start.max(lo), segments[k].end.min(hi));
            if a < b {
                core_rows(slots, resolved[k], s, &t[a * r..b * r], &mut out[(a - lo) * r..(b - lo) * r], scratch);
            }
            k += 1;
        }
    });
}

/// `out = input C^T` for rows of one segment: `C = diag(s)` for the base, else the slot's core
/// through the single-adapter pass (`scratch` receives `g M` in the pass layout).
fn core_rows(slots: &[Slot], which: Resolved, s: &[f32], input: &[f32], out: &mut [f32], scratch: &mut [f32]) {
    if which == Resolved::BASE {
        for (i, o) in input.chunks_exact(s.len()).zip(out.chunks_exact_mut(s.len())) {
            for ((o, &x), &sv) in o.iter_mut().zip(i).zip(s) {
                *o = sv * x;
            }
        }
        return;
    }
    let slot = &slots[which.0 as usize];
    let g = slot.g();
    // The gate off (g = 1): the stored values are the table; else g times them, streamed.
    let table: &[f32] = if g == 1.0 {
        &slot.vals
    } else {
        let table = &mut scratch[..slot.vals.len()];
        for (t, &v) in table.iter_mut().zip(&slot.vals) {
            *t = g * v;
        }
        table
    };
    slot.pattern.index.apply_fwd(input, out, s, table, &[]);
}
