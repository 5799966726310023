//! `svft bench --adapters`: many adapters in one batch (issue 18), inference: CPU f32 here,
//! CUDA (any dtype, the same rows timed with CUDA events) in `adapters_cuda.rs`.
//!
//! For each shape, token count `n` and adapter count `N` (equal segments of `n / N` rows, the
//! last one shorter when `N` does not divide `n`), in one process, medians of interleaved
//! rounds (so machine load hits every method alike):
//! - `bank`: [`CpuBank`] with `N` distinct adapters (shared `X V`, `S U^T`; a core per segment);
//! - `one`: the same batch through one adapter (one segment): what serving a single adapter
//!   costs, the floor the bank is compared with;
//! - `dense`: `N` merged dense weights resident, `Y_seg = X_seg W_a^T + bias` per segment
//!   (refused with a message when `N d_out d_in` floats do not fit in memory);
//! - `lora`: LoRA r=16 the usual way: `Y = X W0^T` once, then per segment
//!   `Y_seg += (X_seg A_a^T) B_a^T`.
//!
//! Plus resident bytes per adapter (SVFT plain and banded:2: M, gamma, gate; the index set is
//! shared by every adapter with the same pattern and counted once; LoRA r=16: A and B), and a
//! measurement of how patterns should be organised: many adapters over a few distinct random
//! patterns, the table interleaved (the pattern changes every segment) or grouped by pattern,
//! the index structures shared or one copy per adapter, or every adapter its own pattern.
//! Timing does not depend on the values, so the dense weights and LoRA's factors are bench
//! values (as the grid's factors are, see [`bench_factors`]) rather than real merges.

use std::time::Duration;

use rayon::prelude::*;
use serde_json::{json, Value};

use super::{bench_factors, bench_values, interleaved_medians_indexed_ms, LORA_RANK};
use crate::alloc::{check_fits, show_bytes, try_zeroed};
use crate::bank::segments::equal_segments;
use crate::bank::{Adapter, CpuBank, Segment, BASE};
use crate::cpu::gemm::{gemm, Operand as Op};
use crate::error::{Error, Result};
use crate::layer::pattern::Pattern;
use crate::layer::svd::Factors;
use crate::rng::Rng;

/// What `svft bench --adapters` runs.
#[derive(Debug, Clone)]
pub struct AdaptersConfig {
    /// `(d_out, d_in)` of each layer.
    pub shapes: Vec<(usize, usize)>,
    /// Tokens per batch.
    pub tokens: Vec<usize>,
    /// Distinct adapters per batch.
    pub counts: Vec<usize>,
    /// The SVFT adapters' pattern.
    pub pattern: Pattern,
    /// Minimum measuring time per timed quantity.
    pub budget: Duration,
    /// Also run the pattern-organisation measurement (first shape and token count, largest count).
    pub grouping: bool,
}

impl Default for AdaptersConfig {
    fn default() -> Self {
        AdaptersConfig {
            shapes: vec![(1024, 1024), (4096, 1024)],
            tokens: vec![512, 2048],
            counts: vec![1, 8, 64, 512],
            pattern: Pattern::Banded { d: 2 },
            budget: Duration::from_millis(500),
            grouping: true,
        }
    }
}

/// One measured case (milliseconds, medians of interleaved rounds).
#[derive(Debug, Clone)]
pub struct AdaptersRow {
    /// Output features.
    pub d_out: usize,
    /// Input features.
    pub d_in: usize,
    /// Tokens.
    pub n: usize,
    /// Distinct adapters in the batch.
    pub adapters: usize,
    /// Rows per segment.
    pub segment_rows: usize,
    /// The bank, N distinct adapters.
    pub bank_ms: f64,
    /// The same batch through one adapter.
    pub one_ms: f64,
    /// N merged dense weights, per segment (`None`: they do not fit, see `dense_note`).
    pub dense_ms: Option<f64>,
    /// Why dense was not timed.
    pub dense_note: Option<String>,
    /// LoRA r=16, per-segment low-rank products.
    pub lora_ms: f64,
}

impl AdaptersRow {
    /// The row as JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "d_out": self.d_out, "d_in": self.d_in, "tokens": self.n, "adapters": self.adapters,
            "segment_rows": self.segment_rows, "bank_ms": self.bank_ms, "one_adapter_ms": self.one_ms,
            "bank_over_one": self.bank_ms / self.one_ms, "dense_merged_ms": self.dense_ms,
            "dense_note": self.dense_note, "lora_ms": self.lora_ms,
        })
    }
}

/// Resident bytes per adapter for one shape.
#[derive(Debug, Clone)]
pub struct AdapterBytes {
    /// Output features.
    pub d_out: usize,
    /// Input features.
    pub d_in: usize,
    /// SVFT plain: per adapter, and the shared index set (once per pattern).
    pub plain: (usize, usize),
    /// SVFT banded:2, as `plain`.
    pub banded2: (usize, usize),
    /// LoRA r=16 (A and B).
    pub lora: usize,
    /// A merged dense weight.
    pub dense: usize,
}

/// One variant of the pattern-organisation measurement.
#[derive(Debug, Clone)]
pub struct GroupingRow {
    /// What was timed.
    pub variant: &'static str,
    /// Distinct index structures resident.
    pub structures: usize,
    /// Median forward.
    pub ms: f64,
}

/// Everything one run measured.
#[derive(Debug, Clone, Default)]
pub struct AdaptersReport {
    /// "cpu" or "cuda".
    pub backend: &'static str,
    /// The activation dtype ("f32", "bf16", "f16").
    pub dtype: &'static str,
    /// The CPU or GPU.
    pub device: String,
    /// The SVFT pattern of the timed adapters.
    pub pattern: String,
    /// The timed cases.
    pub rows: Vec<AdaptersRow>,
    /// Bytes per adapter, per shape.
    pub bytes: Vec<AdapterBytes>,
    /// The pattern-organisation measurement: its case and its variants.
    pub grouping: Option<(String, Vec<GroupingRow>)>,
}

/// `count` adapters over `f`, adapter `id` of `pattern(id)`, with distinct M and gamma.
pub(super) fn bench_adapters(f: &Factors, count: usize, pattern: impl Fn(usize) -> Pattern) -> Result<Vec<Adapter>> {
    let mut rng = Rng::new(5);
    let mut omegas: Vec<(Pattern, crate::layer::pattern::Omega)> = Vec::new();
    let mut out = Vec::with_capacity(count);
    for id in 0..count {
        let p = pattern(id);
        if !omegas.iter().any(|(q, _)| *q == p) {
            omegas.push((p, p.omega(f)?));
        }
        let omega = omegas.iter().find(|(q, _)| *q == p).map(|(_, o)| o.clone()).expect("pushed above");
        let m = bench_values(100 + id as u64, omega.len(), 0.05);
        out.push(Adapter::new(omega, m, rng.normal() as f32, true)?);
    }
    Ok(out)
}

/// A bank over `f` with `count` adapters of `pattern` (ids 0..count), distinct M and gamma.
pub(super) fn bank_of(f: &Factors, count: usize, pattern: impl Fn(usize) -> Pattern, share: bool) -> Result<CpuBank> {
    let mut bank = CpuBank::new(f.clone(), Some(bench_values(9, f.d_out, 0.1)))?;
    bank.set_pattern_sharing(share);
    for (id, a) in bench_adapters(f, count, pattern)?.into_iter().enumerate() {
        bank.add(id as u32, a)?;
    }
    Ok(bank)
}

impl AdaptersConfig {
    /// Checks that there is something to run and that every size is positive.
    pub fn check(&self) -> Result<()> {
        if self.shapes.is_empty() || self.tokens.is_empty() || self.counts.is_empty() {
            return Err(Error::InvalidArgument("--adapters: needs shapes, token counts and adapter counts".into()));
        }
        if self.counts.contains(&0) || self.tokens.contains(&0) || self.shapes.iter().any(|&(o, i)| o == 0 || i == 0) {
            return Err(Error::InvalidArgument("--adapters: counts, tokens and shapes must be positive".into()));
        }
        Ok(())
    }
}

/// Runs the bench; `on_row` sees each row as it is measured (progress, JSON lines).
pub fn run(cfg: &AdaptersConfig, on_row: &mut dyn FnMut(&AdaptersRow)) -> Result<AdaptersReport> {
    cfg.check()?;
    let max_n = *cfg.tokens.iter().max().expect("non-empty");
    let max_count = *cfg.counts.iter().max().expect("non-empty");
    let mut report = AdaptersReport {
        backend: "cpu",
        dtype: "f32",
        device: crate::cpu::device_name(),
        pattern: cfg.pattern.to_string(),
        ..Default::default()
    };
    for &(d_out, d_in) in &cfg.shapes {
        let r = d_out.min(d_in);
        // The inputs, factors, LoRA's base weight and adapters (the dense weights are checked
        // per row, as they are made).
        let (o, i) = (d_out as u128, d_in as u128);
        let floats = max_n as u128 * i + (o + i) * r as u128 + o * i + (LORA_RANK * max_count) as u128 * (o + i);
        check_fits(&format!("the {d_out}x{d_in} adapters bench"), 4 * floats)?;
        let f = bench_factors(d_out, d_in, r, 1)?;
        let bank = bank_of(&f, max_count, |_| cfg.pattern, true)?;
        report.bytes.push(bytes_per_adapter(&f)?);
        let x = bench_values(2, max_n * d_in, 1.0);
        let lora = Lora::new(d_out, d_in, max_count);
        let mut shape = Shape { f: &f, bank, lora, x, bias: bench_values(9, d_out, 0.1) };
        for &n in &cfg.tokens {
            for &count in &cfg.counts {
                let row = shape.row(n, count, cfg.budget)?;
                on_row(&row);
                report.rows.push(row);
            }
        }
        if cfg.grouping && report.grouping.is_none() {
            let n = cfg.tokens[0];
            report.grouping = Some(grouping(&f, &shape.x[..n * d_in], n, max_count.max(8), cfg.budget)?);
        }
    }
    Ok(report)
}

/// LoRA r=16 adapters over a shared dense base.
struct Lora {
    w0: Vec<f32>,
    /// `A_a`: `r_l x d_in` each, back to back.
    a: Vec<f32>,
    /// `B_a`: `d_out x r_l` each.
    b: Vec<f32>,
    /// `H = X A^T` per row (n x r_l).
    h: Vec<f32>,
}

impl Lora {
    fn new(d_out: usize, d_in: usize, count: usize) -> Self {
        Lora {
            w0: bench_values(4, d_out * d_in, 1.0 / (d_in as f64).sqrt()),
            a: bench_values(6, count * LORA_RANK * d_in, 1.0 / (d_in as f64).sqrt()),
            b: bench_values(7, count * d_out * LORA_RANK, 1e-3),
            h: Vec::new(),
        }
    }
}

struct Shape<'a> {
    f: &'a Factors,
    bank: CpuBank,
    lora: Lora,
    x: Vec<f32>,
    bias: Vec<f32>,
}

impl Shape<'_> {
    fn row(&mut self, n: usize, count: usize, budget: Duration) -> Result<AdaptersRow> {
        let (d_out, d_in) = (self.f.d_out, self.f.d_in);
        let seg = n.div_ceil(count);
        let ids: Vec<i64> = (0..count as i64).collect();
        let table = equal_segments(n, seg, &ids);
        let one = [Segment::new(0, n, 0)];
        let x = &self.x[..n * d_in];
        let mut y = vec![0.0f32; n * d_out];
        // N merged dense weights, when they fit (with room to spare: the machine is shared).
        let dense_bytes = 4 * (count as u128) * (d_out * d_in) as u128;
        let dense = check_fits(&format!("{count} merged {d_out}x{d_in} weights"), 2 * dense_bytes)
            .and_then(|_| try_zeroed::<f32>("merged dense weights", count * d_out * d_in));
        let (mut dense, dense_note) = match dense {
            Ok(mut w) => {
                w.par_chunks_mut(d_out * d_in).enumerate().for_each(|(a, wa)| {
                    wa.copy_from_slice(&bench_values(1000 + a as u64, d_out * d_in, 1.0 / (d_in as f64).sqrt()))
                });
                (Some(w), None)
            }
            Err(e) => (None, Some(format!("not timed: {e}"))),
        };
        let lora = &mut self.lora;
        lora.h.resize(n * LORA_RANK, 0.0);
        let (bank, bias) = (&mut self.bank, &self.bias);
        let mut failure = None;
        let timed = if dense.is_some() { 4 } else { 3 };
        let ms = interleaved_medians_indexed_ms(budget, timed, |i| match i {
            0 => {
                if let Err(e) = bank.forward_into(x, n, &table, &mut y) {
                    failure.get_or_insert(e);
                }
            }
            1 => {
                if let Err(e) = bank.forward_into(x, n, &one, &mut y) {
                    failure.get_or_insert(e);
                }
            }
            2 => lora_forward(lora, x, n, seg, d_out, d_in, bias, &mut y),
            _ => {
                dense_forward(dense.as_deref().expect("timed only when present"), x, n, seg, d_out, d_in, bias, &mut y)
            }
        });
        dense.take();
        if let Some(e) = failure {
            return Err(e);
        }
        Ok(AdaptersRow {
            d_out,
            d_in,
            n,
            adapters: table.len(), // fewer than `count` when `count` exceeds `n` or does not divide it
            segment_rows: seg,
            bank_ms: ms[0],
            one_ms: ms[1],
            dense_ms: ms.get(3).copied(),
            dense_note,
            lora_ms: ms[2],
        })
    }
}

/// `Y = X W0^T + bias`, then `Y_seg += (X_seg A_a^T) B_a^T` for segment `a`, segments in
/// parallel (each a pair of small products).
#[allow(clippy::too_many_arguments)]
fn lora_forward(l: &mut Lora, x: &[f32], n: usize, seg: usize, d_out: usize, d_in: usize, bias: &[f32], y: &mut [f32]) {
    gemm(y, Op::n(x, n, d_in), Op::t(&l.w0, d_out, d_in), false);
    add_bias(y, bias);
    let (a, b) = (&l.a, &l.b);
    let rl = LORA_RANK;
    y.par_chunks_mut(seg * d_out)
        .zip(x.par_chunks(seg * d_in))
        .zip(l.h[..n * rl].par_chunks_mut(seg * rl))
        .enumerate()
        .for_each(|(k, ((ys, xs), hs))| {
            let rows = xs.len() / d_in;
            gemm(hs, Op::n(xs, rows, d_in), Op::t(&a[k * rl * d_in..(k + 1) * rl * d_in], rl, d_in), false);
            gemm(ys, Op::n(hs, rows, rl), Op::t(&b[k * d_out * rl..(k + 1) * d_out * rl], d_out, rl), true);
        });
}

/// `Y_seg = X_seg W_a^T + bias` for segment `a`, segments in parallel.
#[allow(clippy::too_many_arguments)]
fn dense_forward(w: &[f32], x: &[f32], n: usize, seg: usize, d_out: usize, d_in: usize, bias: &[f32], y: &mut [f32]) {
    let per = d_out * d_in;
    y[..n * d_out].par_chunks_mut(seg * d_out).zip(x.par_chunks(seg * d_in)).enumerate().for_each(|(k, (ys, xs))| {
        let rows = xs.len() / d_in;
        gemm(ys, Op::n(xs, rows, d_in), Op::t(&w[k * per..(k + 1) * per], d_out, d_in), false);
        add_bias(ys, bias);
    });
}

fn add_bias(y: &mut [f32], bias: &[f32]) {
    for row in y.chunks_exact_mut(bias.len()) {
        for (o, &b) in row.iter_mut().zip(bias) {
            *o += b;
        }
    }
}

/// Bytes per resident adapter, measured on banks of 8 adapters.
fn bytes_per_adapter(f: &Factors) -> Result<AdapterBytes> {
    let per = |p: Pattern| -> Result<(usize, usize)> {
        let b = bank_of(f, 8, |_| p, true)?.resident_bytes();
        Ok((b.adapters / 8, b.patterns))
    };
    Ok(AdapterBytes {
        d_out: f.d_out,
        d_in: f.d_in,
        plain: per(Pattern::Plain)?,
        banded2: per(Pattern::Banded { d: 2 })?,
        lora: 4 * LORA_RANK * (f.d_in + f.d_out),
        dense: 4 * f.d_out * f.d_in,
    })
}

/// How to organise patterns: `count` one-row-or-more segments over `PATTERNS` random:16
/// patterns (or one pattern per adapter), timed against the base weight alone (the products
/// and the diagonal without any adapter core: what the cores add is the difference).
fn grouping(f: &Factors, x: &[f32], n: usize, count: usize, budget: Duration) -> Result<(String, Vec<GroupingRow>)> {
    const PATTERNS: usize = 8;
    let d = 16.min(f.r - 1);
    let few = |id: usize| Pattern::Random { d, seed: (id % PATTERNS) as u64 };
    let seg = n.div_ceil(count);
    // Segment k serves adapter k: adapter k's pattern changes with every segment (interleaved);
    // the grouped table serves the adapters sorted by pattern instead.
    let interleaved = equal_segments(n, seg, &(0..count as i64).collect::<Vec<_>>());
    let mut by_pattern: Vec<i64> = (0..count as i64).collect();
    by_pattern.sort_by_key(|&id| (id as usize % PATTERNS, id));
    let grouped = equal_segments(n, seg, &by_pattern);
    let base = equal_segments(n, seg, &[BASE]);
    let mut shared = bank_of(f, count, few, true)?;
    let mut copies = bank_of(f, count, few, false)?;
    let mut distinct = bank_of(f, count, |id| Pattern::Random { d, seed: id as u64 }, true)?;
    let mut y = vec![0.0f32; n * f.d_out];
    let variants: [(&str, usize); 5] = [
        ("base weight alone (no adapter core)", 0),
        ("8 shared patterns, table interleaved", shared.pattern_count()),
        ("8 shared patterns, table grouped by pattern", shared.pattern_count()),
        ("8 patterns, one structure copy per adapter", copies.pattern_count()),
        ("a distinct pattern per adapter", distinct.pattern_count()),
    ];
    let mut failure = None;
    let ms = interleaved_medians_indexed_ms(budget, variants.len(), |i| {
        let step = match i {
            0 => shared.forward_into(x, n, &base, &mut y),
            1 => shared.forward_into(x, n, &interleaved, &mut y),
            2 => shared.forward_into(x, n, &grouped, &mut y),
            3 => copies.forward_into(x, n, &interleaved, &mut y),
            _ => distinct.forward_into(x, n, &interleaved, &mut y),
        };
        if let Err(e) = step {
            failure.get_or_insert(e);
        }
    });
    if let Some(e) = failure {
        return Err(e);
    }
    let case = format!(
        "{}x{}, n = {n}, {count} adapters (segments of {seg} rows), random:{d} ({} coefficients each)",
        f.d_out,
        f.d_in,
        few(0).size(f.r)?
    );
    let rows =
        variants.iter().zip(ms).map(|(&(variant, structures), ms)| GroupingRow { variant, structures, ms }).collect();
    Ok((case, rows))
}

/// The segment size (rows) at which dense merged weights start to win, from the measured rows
/// of one shape and token count: the smallest measured segment size where dense is faster,
/// if every larger measured size is dense's too.
pub fn crossover(rows: &[&AdaptersRow]) -> Option<usize> {
    let mut pts: Vec<(usize, bool)> =
        rows.iter().filter_map(|r| Some((r.segment_rows, r.dense_ms? < r.bank_ms))).collect();
    pts.sort();
    let first = pts.iter().position(|p| p.1)?;
    pts[first..].iter().all(|p| p.1).then_some(pts[first].0)
}

impl AdaptersReport {
    /// The report as text tables.
    pub fn to_table(&self) -> String {
        let mut out = format!(
            "svft bench --adapters ({}: {}, {}, inference): forward ms, {}; SVFT {}\n",
            self.backend,
            self.device,
            self.dtype,
            if self.backend == "cpu" { "medians of interleaved rounds" } else { "medians of CUDA-event batches" },
            self.pattern
        );
        out += &format!(
            "{:<11}{:>6}{:>6}{:>6}{:>10}{:>10}{:>9}{:>10}{:>10}{:>9}{:>9}\n",
            "shape", "n", "N", "rows", "bank", "one", "bank/1", "dense", "LoRA16", "dns/bnk", "LoRA/bnk"
        );
        for r in &self.rows {
            let dense = r.dense_ms.map_or("-".to_string(), |d| format!("{d:.3}"));
            let dratio = r.dense_ms.map_or("-".to_string(), |d| format!("{:.2}", d / r.bank_ms));
            out += &format!(
                "{:<11}{:>6}{:>6}{:>6}{:>10.3}{:>10.3}{:>9.3}{:>10}{:>10.3}{:>9}{:>9.2}\n",
                format!("{}x{}", r.d_out, r.d_in),
                r.n,
                r.adapters,
                r.segment_rows,
                r.bank_ms,
                r.one_ms,
                r.bank_ms / r.one_ms,
                dense,
                r.lora_ms,
                dratio,
                r.lora_ms / r.bank_ms
            );
        }
        for r in self.rows.iter().filter(|r| r.dense_note.is_some()) {
            out += &format!(
                "dense at {}x{} n={} N={}: {}\n",
                r.d_out,
                r.d_in,
                r.n,
                r.adapters,
                r.dense_note.as_deref().unwrap_or("")
            );
        }
        // Crossover per shape and n.
        let mut keys: Vec<(usize, usize, usize)> = self.rows.iter().map(|r| (r.d_out, r.d_in, r.n)).collect();
        keys.dedup();
        for (o, i, n) in keys {
            let rows: Vec<&AdaptersRow> = self.rows.iter().filter(|r| (r.d_out, r.d_in, r.n) == (o, i, n)).collect();
            let text = match crossover(&rows) {
                Some(s) => format!("dense merged weights win from segments of {s} rows up (of those measured)"),
                None if rows.iter().any(|r| r.dense_ms.is_some_and(|d| d < r.bank_ms)) => {
                    "dense wins at some measured segment sizes, not monotonically (noise?)".into()
                }
                None => "the bank wins at every measured segment size".into(),
            };
            out += &format!("crossover {o}x{i} n={n}: {text}\n");
        }
        out += &format!(
            "\nresident bytes per adapter (SVFT: M in f32, gamma, gate{}; the index set is shared, counted once; \
             LoRA and dense in {})\n",
            if self.backend == "cuda" { ", slot record: the device layout" } else { "" },
            self.dtype
        );
        for b in &self.bytes {
            out += &format!(
                "{}x{}: SVFT plain {} (+{} shared), banded:2 {} (+{} shared), LoRA r={LORA_RANK} {}, merged dense {}; \
                 plain/LoRA {:.3}, banded:2/LoRA {:.3}\n",
                b.d_out,
                b.d_in,
                show_bytes(b.plain.0 as u128),
                show_bytes(b.plain.1 as u128),
                show_bytes(b.banded2.0 as u128),
                show_bytes(b.banded2.1 as u128),
                show_bytes(b.lora as u128),
                show_bytes(b.dense as u128),
                b.plain.0 as f64 / b.lora as f64,
                b.banded2.0 as f64 / b.lora as f64
            );
        }
        if let Some((case, rows)) = &self.grouping {
            out += &format!("\npattern organisation: {case}\n");
            let floor = rows.first().map_or(f64::NAN, |r| r.ms);
            for r in rows {
                out += &format!(
                    "{:<46}{:>6} structures{:>10.3} ms  (+{:.3} over the base weight)\n",
                    r.variant,
                    r.structures,
                    r.ms,
                    r.ms - floor
                );
            }
        }
        out
    }

    /// The report as one JSON object.
    pub fn to_json(&self) -> Value {
        json!({
            "backend": self.backend,
            "dtype": self.dtype,
            "device": self.device,
            "pattern": self.pattern,
            "rows": self.rows.iter().map(AdaptersRow::to_json).collect::<Vec<_>>(),
            "bytes_per_adapter": self.bytes.iter().map(|b| json!({
                "d_out": b.d_out, "d_in": b.d_in, "svft_plain": b.plain.0, "svft_plain_shared_index": b.plain.1,
                "svft_banded2": b.banded2.0, "svft_banded2_shared_index": b.banded2.1, "lora16": b.lora, "dense": b.dense,
            })).collect::<Vec<_>>(),
            "grouping": self.grouping.as_ref().map(|(case, rows)| json!({
                "case": case,
                "variants": rows.iter().map(|r| json!({"variant": r.variant, "structures": r.structures, "ms": r.ms})).collect::<Vec<_>>(),
            })),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tiny_run_measures_every_method() {
        let cfg = AdaptersConfig {
            shapes: vec![(24, 16)],
            tokens: vec![12],
            counts: vec![1, 4],
            pattern: Pattern::Banded { d: 1 },
            budget: Duration::from_millis(1),
            grouping: true,
        };
        let mut seen = 0;
        let report = run(&cfg, &mut |_| seen += 1).unwrap();
        assert_eq!((seen, report.rows.len()), (2, 2));
        let r = &report.rows[1];
        assert_eq!((r.adapters, r.segment_rows), (4, 3));
        assert!(r.bank_ms > 0.0 && r.one_ms > 0.0 && r.lora_ms > 0.0 && r.dense_ms.is_some_and(|d| d > 0.0));
        let b = &report.bytes[0];
        assert_eq!(b.plain.0, 4 * (16 + 1) + 1);
        assert_eq!(b.lora, 4 * LORA_RANK * 40);
        assert_eq!(report.grouping.as_ref().unwrap().1.len(), 5);
        let table = report.to_table();
        assert!(table.contains("24x16") && table.contains("pattern organisation"), "{table}");
        assert!(run(&AdaptersConfig { counts: vec![0], ..cfg }, &mut |_| ()).is_err());
    }

    #[test]
    fn crossover_is_the_smallest_segment_from_which_dense_always_wins() {
        let row = |seg, bank, dense| AdaptersRow {
            d_out: 1,
            d_in: 1,
            n: 1,
            adapters: 1,
            segment_rows: seg,
            bank_ms: bank,
            one_ms: 1.0,
            dense_ms: Some(dense),
            dense_note: None,
            lora_ms: 1.0,
        };
        let rows = [row(1, 1.0, 5.0), row(8, 1.0, 0.9), row(64, 1.0, 0.5)];
        assert_eq!(crossover(&rows.iter().collect::<Vec<_>>()), Some(8));
        let mixed = [row(1, 1.0, 0.5), row(8, 1.0, 2.0)];
        assert_eq!(crossover(&mixed.iter().collect::<Vec<_>>()), None);
    }
}
