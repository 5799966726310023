//! Measured plan choice: the FLOP model corrected by what a device actually achieves.
//!
//! The FLOP model of [`crate::layer::plan`] ranks plans by arithmetic alone. Real plans run at
//! different efficiencies (the merged plan also streams two `d_out x d_in` matrices, the
//! small-n path trades tensor cores for a single pass over U and V), so `Plan::Auto` can be
//! wrong near a crossover. A [`PlanTable`] holds measured milliseconds per plan at a few token
//! counts for one (device, dtype, shape, pattern); a layer that holds one resolves `Auto` by
//!
//! ```text
//! predicted_ms(plan, n) = measured_ms(plan, n0) * flops(plan, n) / flops(plan, n0)
//! ```
//!
//! with `n0` the calibrated token count nearest to `n` on a log scale, and picks the smallest.
//! At a calibrated `n` that is the measured winner; between points it is the FLOP model scaled
//! by each plan's measured efficiency. Outside the calibrated range (more than a factor 2 beyond
//! its ends) the plain FLOP model decides.
//!
//! Calibrating costs a few forward+backward passes per plan and token count, once per device
//! and shape: tables are cached in a JSON file (`SVFT_PLAN_CACHE`, default
//! `$XDG_CACHE_HOME/svft/plans.json` or `~/.cache/svft/plans.json`; `SVFT_PLAN_CACHE=off`
//! disables it) keyed by [`CalibrationKey`]. A fixed plan (`Plan::Factored`, ...) always
//! overrides the table; the cache file can be edited or deleted by hand.
//!
//! Layers never read the cache on their own: `calibrate` (measure, or load when cached) is an
//! explicit call, so a layer's behaviour does not depend on files a test machine happens to have.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::layer::plan::{Dims, ExecPlan, Plan};

/// Token counts calibrated by default: every `n` is within a factor 2 of one of them.
pub const DEFAULT_TOKENS: [usize; 8] = [1, 4, 16, 64, 256, 1024, 4096, 16384];

/// Version of the cache file layout.
const CACHE_VERSION: u64 = 1;

/// Measured milliseconds of each candidate plan (forward + backward) at one token count.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanPoint {
    /// Tokens per call.
    pub n: usize,
    /// Median milliseconds per forward + backward, per plan measured.
    pub ms: Vec<(ExecPlan, f64)>,
}

impl PlanPoint {
    /// The fastest plan measured here.
    pub fn best(&self) -> Option<ExecPlan> {
        self.ms.iter().min_by(|a, b| a.1.total_cmp(&b.1)).map(|p| p.0)
    }
}

/// Measured plan timings of one layer shape on one device (points sorted by `n`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PlanTable {
    points: Vec<PlanPoint>,
}

impl PlanTable {
    /// A table from measured points (any order; one point per `n`, the later one wins).
    pub fn new(points: Vec<PlanPoint>) -> Result<Self> {
        let mut by_n: BTreeMap<usize, PlanPoint> = BTreeMap::new();
        for p in points {
            if p.n == 0 {
                return Err(Error::InvalidArgument("a calibration point needs n >= 1".into()));
            }
            if p.ms.is_empty() || p.ms.iter().any(|&(_, ms)| !(ms.is_finite() && ms > 0.0)) {
                return Err(Error::InvalidArgument(format!(
                    "calibration point n = {}: every plan needs a positive finite time",
                    p.n
                )));
            }
            by_n.insert(p.n, p);
        }
        Ok(PlanTable { points: by_n.into_values().collect() })
    }

    /// The measured points, by increasing `n`.
    pub fn points(&self) -> &[PlanPoint] {
        &self.points
    }

    /// The plan to run for `n` tokens, or `None` when `n` lies outside the calibrated range.
    pub fn choose(&self, dims: &Dims, n: usize) -> Option<ExecPlan> {
        let (first, last) = (self.points.first()?, self.points.last()?);
        if n == 0 || 2 * n < first.n || n > 2 * last.n {
            return None;
        }
        let ln = (n as f64).ln();
        let nearest = self.points.iter().min_by(|a, b| {
            let da = ((a.n as f64).ln() - ln).abs();
            let db = ((b.n as f64).ln() - ln).abs();
            da.total_cmp(&db)
        })?;
        nearest
            .ms
            .iter()
            .map(|&(plan, ms)| (plan, ms * plan.flops(dims, n) / plan.flops(dims, nearest.n)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|p| p.0)
    }

    fn to_json(&self) -> Value {
        Value::Array(
            self.points
                .iter()
                .map(|p| {
                    let ms: serde_json::Map<String, Value> =
                        p.ms.iter().map(|(plan, ms)| (plan.to_string(), json!(ms))).collect();
                    json!({ "n": p.n, "ms": ms })
                })
                .collect(),
        )
    }

    fn from_json(v: &Value) -> Result<Self> {
        let bad = |why: &str| Error::InvalidArgument(format!("plan cache: {why}"));
        let mut points = Vec::new();
        for p in v.as_array().ok_or_else(|| bad("a table is not an array"))? {
            let n = p["n"].as_u64().ok_or_else(|| bad("a point has no n"))? as usize;
            let mut ms = Vec::new();
            for (name, t) in p["ms"].as_object().ok_or_else(|| bad("a point has no ms"))? {
                let plan = name.parse::<Plan>()?.fixed().ok_or_else(|| bad("`auto` is not a measured plan"))?;
                ms.push((plan, t.as_f64().ok_or_else(|| bad("a time is not a number"))?));
            }
            points.push(PlanPoint { n, ms });
        }
        PlanTable::new(points)
    }
}

/// What a calibration is valid for: the same device, dtype, shape and pattern.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct CalibrationKey {
    /// `cpu` or `cuda`.
    pub backend: String,
    /// The device's name (the CPU model and thread count, or the GPU's name).
    pub device: String,
    /// Activation dtype (`f32`, `bf16`, `f16`).
    pub dtype: String,
    /// Output features.
    pub d_out: usize,
    /// Input features.
    pub d_in: usize,
    /// Rank.
    pub r: usize,
    /// The pattern's spec string (its size and kernel family matter).
    pub pattern: String,
}

impl CalibrationKey {
    fn to_string_key(&self) -> String {
        format!(
            "{}|{}|{}|{}x{}|r{}|{}",
            self.backend, self.device, self.dtype, self.d_out, self.d_in, self.r, self.pattern
        )
    }
}

/// Where the plan cache lives, or `None` when disabled (`SVFT_PLAN_CACHE=off` or empty, or no
/// home directory).
pub fn cache_path() -> Option<PathBuf> {
    match std::env::var_os("SVFT_PLAN_CACHE") {
        Some(v) if v.is_empty() || v == "off" => None,
        Some(v) => Some(PathBuf::from(v)),
        None => {
            let base =
                std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()).map(PathBuf::from).or_else(|| {
                    std::env::var_os("HOME").filter(|v| !v.is_empty()).map(|h| PathBuf::from(h).join(".cache"))
                })?;
            Some(base.join("svft").join("plans.json"))
        }
    }
}

fn file_err(path: &Path, reason: String) -> Error {
    Error::File { path: path.display().to_string(), reason }
}

fn read_cache(path: &Path) -> Result<serde_json::Map<String, Value>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Default::default()),
        Err(e) => return Err(file_err(path, format!("reading the plan cache: {e}"))),
    };
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| file_err(path, format!("the plan cache is not JSON ({e}); delete it")))?;
    if v["version"].as_u64() != Some(CACHE_VERSION) {
        // Another layout: start afresh rather than misread it.
        return Ok(Default::default());
    }
    Ok(v["tables"].as_object().cloned().unwrap_or_default())
}

/// The cached table for `key` in the cache file at `path`, if any.
pub fn load(path: &Path, key: &CalibrationKey) -> Result<Option<PlanTable>> {
    read_cache(path)?.get(&key.to_string_key()).map(PlanTable::from_json).transpose()
}

/// Stores `table` for `key` in the cache file at `path` (other entries kept; written to a
/// temporary file and renamed, so a crash never leaves half a file).
pub fn store(path: &Path, key: &CalibrationKey, table: &PlanTable) -> Result<()> {
    let mut tables = read_cache(path)?;
    tables.insert(key.to_string_key(), table.to_json());
    let text = serde_json::to_string_pretty(&json!({ "version": CACHE_VERSION, "tables": tables }))
        .map_err(|e| file_err(path, format!("encoding the plan cache: {e}")))?;
    let io = |e: std::io::Error| file_err(path, format!("writing the plan cache: {e}"));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, text).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Settings of one calibration.
#[derive(Debug, Clone)]
pub struct CalibrationOptions {
    /// Token counts to measure (default [`DEFAULT_TOKENS`]).
    pub tokens: Vec<usize>,
    /// Time spent per plan and token count, after one warm-up call (at least 5 samples).
    pub budget: Duration,
    /// Read and write the plan cache at this path (`None`: measure, store nothing).
    pub cache: Option<PathBuf>,
}

impl Default for CalibrationOptions {
    fn default() -> Self {
        CalibrationOptions { tokens: DEFAULT_TOKENS.to_vec(), budget: Duration::from_millis(100), cache: cache_path() }
    }
}

/// Loads the table for `key` from the cache, or measures one and caches it. `time(plan, n)`
/// runs one forward + backward of `plan` at `n` tokens and returns its milliseconds; at each
/// token count every candidate plan that `applies(plan, n)` is run once to warm up, then the
/// plans take turns (rounds of one call each, so a load change on the machine hits all of them
/// alike) until `budget` per plan is spent and at least 5 rounds ran; each plan's median counts.
pub fn calibrate(
    key: &CalibrationKey,
    candidates: &[ExecPlan],
    options: &CalibrationOptions,
    mut time: impl FnMut(ExecPlan, usize) -> Result<f64>,
    applies: impl Fn(ExecPlan, usize) -> bool,
) -> Result<PlanTable> {
    if options.tokens.is_empty() || candidates.is_empty() {
        return Err(Error::InvalidArgument("calibration needs token counts and candidate plans".into()));
    }
    if let Some(path) = &options.cache {
        if let Some(table) = load(path, key)? {
            if options.tokens.iter().all(|n| table.points().iter().any(|p| p.n == *n)) {
                return Ok(table);
            }
        }
    }
    let mut points = Vec::new();
    for &n in &options.tokens {
        let plans: Vec<ExecPlan> = candidates.iter().copied().filter(|&p| applies(p, n)).collect();
        if plans.is_empty() {
            continue; // no candidate runs at this n: nothing to measure
        }
        let mut samples: Vec<Vec<f64>> = vec![Vec::new(); plans.len()];
        for &plan in &plans {
            time(plan, n)?;
        }
        let start = Instant::now();
        let total = options.budget.saturating_mul(plans.len() as u32);
        while samples[0].len() < 5 || (start.elapsed() < total && samples[0].len() < 200) {
            for (s, &plan) in samples.iter_mut().zip(&plans) {
                s.push(time(plan, n)?);
            }
        }
        let ms = plans
            .iter()
            .zip(samples)
            .map(|(&plan, mut s)| {
                s.sort_by(f64::total_cmp);
                (plan, s[s.len() / 2])
            })
            .collect();
        points.push(PlanPoint { n, ms });
    }
    let table = PlanTable::new(points)?;
    if let Some(path) = &options.cache {
        store(path, key, &table)?;
    }
    Ok(table)
}

/// `plan` resolved for `n` tokens: a fixed plan as asked; `Auto` from the measured table when
/// it covers `n`, else from the FLOP model.
pub fn resolve(plan: Plan, table: Option<&PlanTable>, dims: &Dims, n: usize) -> ExecPlan {
    match (plan, table.and_then(|t| t.choose(dims, n))) {
        (Plan::Auto, Some(measured)) => measured,
        _ => plan.resolve(dims, n),
    }
}

/// Whether [`resolve`] takes `plan` for `n` tokens from the measured table (else it is fixed,
/// or the FLOP model's choice).
pub fn measured(plan: Plan, table: Option<&PlanTable>, dims: &Dims, n: usize) -> bool {
    plan == Plan::Auto && table.is_some_and(|t| t.choose(dims, n).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims() -> Dims {
        Dims { d_out: 1024, d_in: 1024, r: 1024, nnz: 1024 }
    }

    fn point(n: usize, f: f64, m: f64) -> PlanPoint {
        PlanPoint { n, ms: vec![(ExecPlan::Factored, f), (ExecPlan::Merged, m)] }
    }

    #[test]
    fn measured_winner_at_calibrated_points_and_flop_scaling_between() {
        let d = dims();
        // Pretend merged runs 3x more efficiently than its FLOPs say at n = 1024 (it does not
        // tie the FLOP model's crossover at 2d any more) and factored wins at 64.
        let t = PlanTable::new(vec![point(1024, 2.0, 1.0), point(64, 0.1, 5.0)]).unwrap();
        assert_eq!(t.choose(&d, 1024), Some(ExecPlan::Merged));
        assert_eq!(t.choose(&d, 64), Some(ExecPlan::Factored));
        assert_eq!(d.cheaper(1024), ExecPlan::Factored, "the FLOP model alone disagrees at 1024");
        // Outside [n_min / 2, 2 n_max]: the FLOP model.
        assert_eq!(t.choose(&d, 31), None);
        assert_eq!(t.choose(&d, 2049), None);
        assert_eq!(resolve(Plan::Auto, Some(&t), &d, 100_000), d.cheaper(100_000));
        // A fixed plan overrides the table.
        assert_eq!(resolve(Plan::Factored, Some(&t), &d, 1024), ExecPlan::Factored);
        assert_eq!(resolve(Plan::Auto, Some(&t), &d, 1024), ExecPlan::Merged);
        assert_eq!(resolve(Plan::Auto, None, &d, 1024), ExecPlan::Factored);
        // Between points the nearest (log scale) point's efficiencies scale with FLOPs: at
        // n = 600 the nearest point is 1024, where merged's measured time is half factored's;
        // merged's FLOPs barely fall with n while factored's fall in proportion, so compute it.
        let pf = 2.0 * d.factored_flops(600) / d.factored_flops(1024);
        let pm = 1.0 * d.merged_flops(600) / d.merged_flops(1024);
        let want = if pf < pm { ExecPlan::Factored } else { ExecPlan::Merged };
        assert_eq!(t.choose(&d, 600), Some(want));
    }

    #[test]
    fn bad_points_are_refused() {
        assert!(PlanTable::new(vec![point(0, 1.0, 1.0)]).is_err());
        assert!(PlanTable::new(vec![point(4, f64::NAN, 1.0)]).is_err());
        assert!(PlanTable::new(vec![point(4, 1.0, 0.0)]).is_err());
        assert!(PlanTable::new(vec![PlanPoint { n: 4, ms: vec![] }]).is_err());
    }

    #[test]
    fn cache_round_trip_keeps_other_entries_and_measures_once() {
        let dir = std::env::temp_dir().join(format!("svft-plan-cache-{}", std::process::id()));
        let path = dir.join("plans.json");
        let _ = std::fs::remove_file(&path);
        let key = |pattern: &str| CalibrationKey {
            backend: "cpu".into(),
            device: "test".into(),
            dtype: "f32".into(),
            d_out: 8,
            d_in: 6,
            r: 6,
            pattern: pattern.into(),
        };
        let options = CalibrationOptions { tokens: vec![1, 16], budget: Duration::ZERO, cache: Some(path.clone()) };
        let calls = std::cell::Cell::new(0);
        let timer = |plan: ExecPlan, n: usize| -> Result<f64> {
            calls.set(calls.get() + 1);
            Ok(if plan == ExecPlan::Merged { 1.0 } else { n as f64 })
        };
        let plans = [ExecPlan::Factored, ExecPlan::Merged];
        let all = |_: ExecPlan, _: usize| true;
        let a = calibrate(&key("plain"), &plans, &options, timer, all).unwrap();
        assert_eq!(a.points().len(), 2);
        assert_eq!(a.points()[1].best(), Some(ExecPlan::Merged));
        let b = calibrate(&key("banded:1"), &plans, &options, timer, all).unwrap();
        assert_eq!(calls.get(), 48, "two tables of 2 token counts x 2 plans x (1 warm-up + 5 rounds)");
        // Cached: no new measurements, the same table back, both entries kept.
        let again = calibrate(&key("plain"), &plans, &options, timer, all).unwrap();
        assert_eq!((calls.get(), &again), (48, &a));
        assert_eq!(load(&path, &key("banded:1")).unwrap().as_ref(), Some(&b));
        assert_eq!(load(&path, &key("random:3")).unwrap(), None);
        // Asking for a token count the cached table lacks measures again.
        let more = CalibrationOptions { tokens: vec![1, 16, 64], ..options.clone() };
        calibrate(&key("plain"), &plans, &more, timer, all).unwrap();
        assert_eq!(calls.get(), 48 + 36);
        // A corrupt file is a named error, not a panic or a silent reset.
        std::fs::write(&path, "{not json").unwrap();
        let err = calibrate(&key("plain"), &plans, &options, timer, all).unwrap_err().to_string();
        assert!(err.contains("plan cache") && err.contains("not JSON"), "{err}");
        // No candidate applies at a token count: that count is skipped, not a panic.
        let none = CalibrationOptions { tokens: vec![4, 100], budget: Duration::ZERO, cache: None };
        let t = calibrate(&key("plain"), &[ExecPlan::SmallN], &none, timer, |_, n| n <= 64).unwrap();
        assert_eq!(t.points().iter().map(|p| p.n).collect::<Vec<_>>(), [4]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
