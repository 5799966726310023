//! The two file formats of the CLI, both safetensors:
//!
//! **Factor files** hold the one-time decomposition of a model, per adapted module
//! (`module` = the weight's name without its `.weight` suffix):
//! `{module}.svft_u` (`d_out x r`), `{module}.svft_s` (`r`), `{module}.svft_v` (`d_in x r`), in
//! f32 or the model's dtype. `__metadata__`: `format = svft-factors`, `format_version`,
//! `crate_version`, `source` (the checkpoint), `storage_dtype`, and `modules`: a JSON object
//! `{module: {weight, d_out, d_in, rank, dtype (the weight's own), checksum, residual,
//! meta_checksum}}`.
//!
//! **Adapter files** hold what training learns, per module: `{module}.s_edge` (the
//! coefficients M, f32, canonical order), `{module}.gate` (gamma, f32, one value),
//! `{module}.s_row` and `{module}.s_col` (the pattern's indices, i64, like the official
//! layer's). `__metadata__`: `format = svft-adapter`, `format_version`, `crate_version`, and
//! `modules`: `{module: {weight, pattern, rank, topk_criterion, init, gate, seed, d_out, d_in,
//! dtype, base_checksum, data_checksum, meta_checksum}}`.
//!
//! **Checksums** are 64-bit FNV-1a, written `fnv1a64:` and 16 hex digits. The base checksum
//! runs over `d_out`, `d_in`, `r` (u64, little-endian) then the f32 bit patterns of U, s, V
//! (little-endian, row-major) as the factor file stores them after rounding to its storage
//! dtype; an adapter records it so it refuses to load onto other factors. The data checksum
//! runs over the adapter module's own tensors (coefficients, gamma, rows, cols), so flipped bits
//! in a file are caught. The meta checksum ([`meta_checksum`]) runs over every other field of the
//! module's metadata object, so an edited weight name, pattern, dtype or size is caught too.
//!
//! **Checks on reading** (every one an [`Error::File`] naming the file and module): the format
//! and version; every field present, typed and covered by its meta checksum; a module's name is
//! its weight's (so no two modules adapt one weight); `1 <= rank <= min(d_out, d_in)`; every
//! tensor of the shape and dtype its metadata says; the pattern fits the rank and the indices are
//! in range (a band's exactly its band); coefficients and gate finite; the data checksums. Used
//! together, an adapter must match its factor file module for module: weight, dtype, shape, rank
//! and base checksum ([`Adapter::check_base`]).

use std::path::Path;

use serde_json::{json, Map};

use crate::cpu::CpuLayer;
use crate::error::{Error, Result};
use crate::formats::checkpoint::{
    bytes_to_f32, dtype_name, f32_to_bytes, parse_dtype, round_through, Checkpoint, Dtype,
};
use crate::formats::checkpoint::{write_safetensors, OwnedTensor};
use crate::layer::config::{Init, LayerConfig};
use crate::layer::pattern::{Omega, Pattern, TopKCriterion};
use crate::layer::svd::Factors;

use super::meta::{
    base_metadata, check_accounted, check_format, check_module_shape, file_err, seal_file, verify_meta, Fields,
};
pub use super::meta::{
    factors_checksum, file_checksum, meta_checksum, module_name, module_pattern, module_seed, splitmix64,
    verify_file_checksum, Fnv1a, ADAPTER_FORMAT, FACTORS_FORMAT, FORMAT_VERSION,
};

// ---------------------------------------------------------------------------------------------
// Factor files

/// A module's metadata object with its `meta_checksum` added.
fn with_meta_checksum(mut v: serde_json::Value) -> serde_json::Value {
    if let Some(obj) = v.as_object_mut() {
        let sum = meta_checksum(obj);
        obj.insert("meta_checksum".into(), sum.into());
    }
    v
}

/// What a factor file says about one module.
#[derive(Debug, Clone, PartialEq)]
pub struct FactorInfo {
    /// Module name (the weight's name without `.weight`).
    pub module: String,
    /// The weight's tensor name in the model.
    pub weight: String,
    /// Output features.
    pub d_out: usize,
    /// Input features.
    pub d_in: usize,
    /// Rank kept.
    pub rank: usize,
    /// The weight's dtype in the model (what `merge` writes back).
    pub dtype: Dtype,
    /// [`factors_checksum`] of the stored factors.
    pub checksum: String,
    /// `||U diag(s) V^T - W0|| / ||W0||` measured at decomposition.
    pub residual: f64,
}

/// One decomposed module, ready to be written to a factor file.
#[derive(Debug, Clone)]
pub struct DecomposedModule {
    /// The weight's tensor name in the model.
    pub weight: String,
    /// The weight's dtype in the model.
    pub dtype: Dtype,
    /// The factors.
    pub factors: Factors,
    /// Relative reconstruction residual.
    pub residual: f64,
}

/// Writes a factor file. The factors are rounded to `storage` (f32, or the model's bf16/f16)
/// first, and the checksums are of the rounded values, i.e. of exactly what is stored.
pub fn save_factors(
    path: &Path,
    source: &str,
    storage: Dtype,
    modules: &[DecomposedModule],
) -> Result<Vec<FactorInfo>> {
    let mut tensors: Vec<OwnedTensor> = Vec::with_capacity(3 * modules.len());
    let mut meta = Map::new();
    let mut infos = Vec::with_capacity(modules.len());
    for m in modules {
        let mut f = m.factors.clone();
        round_through(storage, &mut f.u);
        round_through(storage, &mut f.s);
        round_through(storage, &mut f.v);
        let module = module_name(&m.weight).to_string();
        // Rounding to f16 can overflow (|s| > 65504): refuse to store an infinity.
        for (what, values) in [("U", &f.u), ("s", &f.s), ("V", &f.v)] {
            if let Some(x) = values.iter().find(|x| !x.is_finite()) {
                let max = m.factors.s.first().copied().unwrap_or(0.0);
                return Err(Error::InvalidArgument(format!(
                    "module `{module}`: {what} holds {x} once rounded to {} (largest singular value {max:.4e}); \
                     store the factors in f32",
                    dtype_name(storage)
                )));
            }
        }
        if !m.residual.is_finite() || m.residual < 0.0 {
            return Err(Error::InvalidArgument(format!("module `{module}`: residual {} is not a figure", m.residual)));
        }
        let info = FactorInfo {
            module: module.clone(),
            weight: m.weight.clone(),
            d_out: f.d_out,
            d_in: f.d_in,
            rank: f.r,
            dtype: m.dtype,
            checksum: factors_checksum(&f),
            residual: m.residual,
        };
        if meta.contains_key(&module) {
            return Err(Error::InvalidArgument(format!("module `{module}` appears twice")));
        }
        meta.insert(
            module.clone(),
            with_meta_checksum(json!({
                "weight": info.weight, "d_out": info.d_out, "d_in": info.d_in, "rank": info.rank,
                "dtype": dtype_name(info.dtype), "checksum": info.checksum, "residual": info.residual,
            })),
        );
        tensors.push((format!("{module}.svft_u"), storage, vec![f.d_out, f.r], f32_to_bytes(storage, &f.u)?));
        tensors.push((format!("{module}.svft_s"), storage, vec![f.r], f32_to_bytes(storage, &f.s)?));
        tensors.push((format!("{module}.svft_v"), storage, vec![f.d_in, f.r], f32_to_bytes(storage, &f.v)?));
        infos.push(info);
    }
    let mut metadata = base_metadata(FACTORS_FORMAT, meta);
    metadata.insert("source".into(), source.to_string());
    metadata.insert("storage_dtype".into(), dtype_name(storage));
    seal_file(&mut metadata);
    write_safetensors(path, &tensors, metadata)?;
    Ok(infos)
}

/// Probes whether `factors` decompose `w0` (row-major `d_out x d_in`, e.g. a model's weight):
/// `||U diag(s) V^T X - W0 X||_F / ||W0 X||_F` on 8 seeded random probe columns `X`, in f64,
/// `O(8 (d_out + r) d_in)`. It estimates the relative residual the factor file records; another
/// checkpoint of the same shapes gives a figure near 1 (or above).
pub fn probe_residual(factors: &Factors, w0: &[f32]) -> Result<f64> {
    const PROBES: usize = 8;
    let (d_out, d_in, r) = (factors.d_out, factors.d_in, factors.r);
    crate::error::check_len("W0 (d_out x d_in)", w0, d_out * d_in)?;
    let mut rng = crate::rng::Rng::new(0x5eed_f00d);
    let x: Vec<f64> = (0..d_in * PROBES).map(|_| rng.normal()).collect();
    // t = V^T X (r x PROBES), scaled by s.
    let mut t = vec![0.0f64; r * PROBES];
    for q in 0..d_in {
        let vq = &factors.v[q * r..(q + 1) * r];
        let xq = &x[q * PROBES..(q + 1) * PROBES];
        for (i, &v) in vq.iter().enumerate() {
            for (j, &xv) in xq.iter().enumerate() {
                t[i * PROBES + j] += v as f64 * xv;
            }
        }
    }
    for (i, &s) in factors.s.iter().enumerate() {
        t[i * PROBES..(i + 1) * PROBES].iter_mut().for_each(|v| *v *= s as f64);
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for p in 0..d_out {
        let (mut y0, mut y) = ([0.0f64; PROBES], [0.0f64; PROBES]);
        for (q, &w) in w0[p * d_in..(p + 1) * d_in].iter().enumerate() {
            for j in 0..PROBES {
                y0[j] += w as f64 * x[q * PROBES + j];
            }
        }
        for (i, &u) in factors.u[p * r..(p + 1) * r].iter().enumerate() {
            for j in 0..PROBES {
                y[j] += u as f64 * t[i * PROBES + j];
            }
        }
        for j in 0..PROBES {
            num += (y[j] - y0[j]).powi(2);
            den += y0[j].powi(2);
        }
    }
    Ok(if den == 0.0 { num.sqrt() } else { (num / den).sqrt() })
}

/// Refuses a weight that `factors` (module `info` of a factor file) do not decompose: the
/// probed residual ([`probe_residual`]) must stay within `1.5 x` the recorded one, plus `1e-3`
/// (the probe's sampling spread and f32 rounding), plus the unit roundoff of `dtype`, the
/// weight's dtype in `model` (the same model saved in bf16 is the same weights, rounded; another
/// checkpoint of the same shapes probes near 1). `model` names the checkpoint in the message.
pub fn check_decomposes(info: &FactorInfo, factors: &Factors, w0: &[f32], dtype: Dtype, model: &Path) -> Result<()> {
    let probed = probe_residual(factors, w0)?;
    let roundoff = match dtype {
        Dtype::BF16 => 2f64.powi(-8),
        Dtype::F16 => 2f64.powi(-11),
        _ => 0.0,
    };
    let allowed = 1.5 * info.residual + 1e-3 + roundoff;
    if probed.is_nan() || probed > allowed {
        return Err(file_err(
            model,
            format!(
                "wrong model: its `{}` is not the weight these factors decompose (relative residual {probed:.3e} \
                 on random probes, the factor file records {:.3e}); pass the checkpoint that was decomposed",
                info.weight, info.residual
            ),
        ));
    }
    Ok(())
}

/// An opened factor file; factors are read per module on demand.
#[derive(Debug, Clone)]
pub struct FactorFile {
    ckpt: Checkpoint,
    modules: Vec<FactorInfo>,
}

impl FactorFile {
    /// Opens and checks a factor file's header and metadata.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let ckpt = Checkpoint::open(path)?;
        let modules_json = check_format(path, &ckpt, FACTORS_FORMAT)?;
        check_accounted(path, &ckpt, &modules_json, &["svft_u", "svft_s", "svft_v"])?;
        let mut modules = Vec::new();
        for (module, obj) in modules_json.as_object().expect("checked") {
            let obj = obj.as_object().ok_or_else(|| file_err(path, format!("corrupt metadata for `{module}`")))?;
            verify_meta(path, module, obj)?;
            let f = Fields { path, module, obj };
            let dtype = parse_dtype(f.str("dtype")?).map_err(|_| f.missing("dtype"))?;
            let info = FactorInfo {
                module: module.clone(),
                weight: f.str("weight")?.to_string(),
                d_out: f.usize("d_out")?,
                d_in: f.usize("d_in")?,
                rank: f.usize("rank")?,
                dtype,
                checksum: f.str("checksum")?.to_string(),
                residual: f.f64("residual")?,
            };
            check_module_shape(&f, &info.weight, info.d_out, info.d_in, info.rank)?;
            if !info.residual.is_finite() || info.residual < 0.0 {
                return Err(f.missing("residual"));
            }
            for (suffix, shape) in
                [("u", vec![info.d_out, info.rank]), ("s", vec![info.rank]), ("v", vec![info.d_in, info.rank])]
            {
                let name = format!("{module}.svft_{suffix}");
                match ckpt.get(&name) {
                    Some(e) if e.shape == shape && e.is_float_weight() => {}
                    Some(e) => {
                        return Err(file_err(
                            path,
                            format!(
                                "corrupt: `{name}` is {} of shape {:?}, its metadata says a float tensor of shape {shape:?}",
                                dtype_name(e.dtype),
                                e.shape
                            ),
                        ))
                    }
                    None => return Err(file_err(path, format!("corrupt: module `{module}` has no tensor `{name}`"))),
                }
            }
            modules.push(info);
        }
        modules.sort_by(|a, b| crate::formats::checkpoint::natural_cmp(&a.module, &b.module));
        Ok(FactorFile { ckpt, modules })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        self.ckpt.path()
    }
    /// Every module, in natural name order.
    pub fn modules(&self) -> &[FactorInfo] {
        &self.modules
    }
    /// One module's info.
    pub fn get(&self, module: &str) -> Option<&FactorInfo> {
        self.modules.iter().find(|m| m.module == module)
    }
    /// The checkpoint the factors came from, as recorded.
    pub fn source(&self) -> Option<&str> {
        self.ckpt.metadata().get("source").map(String::as_str)
    }
    /// The dtype the factors are stored in.
    pub fn storage_dtype(&self) -> Option<Dtype> {
        self.ckpt.get(&format!("{}.svft_u", self.modules.first()?.module)).map(|e| e.dtype)
    }

    /// Reads one module's factors and verifies them against their recorded checksum.
    pub fn load(&self, module: &str) -> Result<Factors> {
        let path = self.path();
        let info =
            self.get(module).ok_or_else(|| file_err(path, format!("no module `{module}` in this factor file")))?;
        let read = |suffix: &str| -> Result<Vec<f32>> {
            let name = format!("{module}.svft_{suffix}");
            let e = self.ckpt.get(&name).ok_or_else(|| file_err(path, format!("corrupt: no tensor `{name}`")))?;
            bytes_to_f32(e.dtype, &self.ckpt.read_bytes(&name)?)
        };
        let (u, s, v) = (read("u")?, read("s")?, read("v")?);
        let factors = Factors::new(info.d_out, info.d_in, u, s, v)
            .map_err(|e| file_err(path, format!("corrupt factors for `{module}`: {e}")))?;
        let sum = factors_checksum(&factors);
        if sum != info.checksum {
            return Err(file_err(
                path,
                format!(
                    "corrupt: the factors of `{module}` have checksum {sum} but the file records {}",
                    info.checksum
                ),
            ));
        }
        Ok(factors)
    }
}

// ---------------------------------------------------------------------------------------------
// Adapter files

/// One adapted module of an adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterModule {
    /// Module name.
    pub module: String,
    /// The weight's tensor name in the model.
    pub weight: String,
    /// The pattern recipe (its top-k criterion included).
    pub pattern: Pattern,
    /// How M was initialised.
    pub init: Init,
    /// Whether the gate is on.
    pub gate: bool,
    /// Seed of the init.
    pub seed: u64,
    /// Output features of the base weight.
    pub d_out: usize,
    /// Input features of the base weight.
    pub d_in: usize,
    /// Rank of the base factors.
    pub rank: usize,
    /// The base weight's dtype in the model.
    pub dtype: Dtype,
    /// [`factors_checksum`] of the base factors it was made on.
    pub base_checksum: String,
    /// Pattern rows.
    pub rows: Vec<u32>,
    /// Pattern columns.
    pub cols: Vec<u32>,
    /// The coefficients M.
    pub coefficients: Vec<f32>,
    /// The gate parameter gamma.
    pub gamma: f32,
}

fn criterion_name(p: &Pattern) -> &'static str {
    match p {
        Pattern::TopK { criterion: TopKCriterion::Paper, .. } => "paper",
        Pattern::TopK { criterion: TopKCriterion::Official, .. } => "official",
        _ => "none",
    }
}

impl AdapterModule {
    /// Captures a layer's pattern and trained state.
    pub fn from_layer(weight: &str, dtype: Dtype, layer: &CpuLayer) -> Self {
        let f = layer.factors();
        let c = layer.config();
        AdapterModule {
            module: module_name(weight).to_string(),
            weight: weight.to_string(),
            pattern: c.pattern,
            init: c.init,
            gate: c.gate,
            seed: c.seed,
            d_out: f.d_out,
            d_in: f.d_in,
            rank: f.r,
            dtype,
            base_checksum: factors_checksum(f),
            rows: layer.omega().rows.clone(),
            cols: layer.omega().cols.clone(),
            coefficients: layer.coefficients().to_vec(),
            gamma: layer.gamma(),
        }
    }

    /// The layer config this module was made with.
    pub fn config(&self) -> LayerConfig {
        LayerConfig { pattern: self.pattern, init: self.init, gate: self.gate, seed: self.seed, ..Default::default() }
    }

    /// Checks that `factors` (described by `info`, from `source`) are the base this module was
    /// made on: same shape and rank, same checksum.
    pub fn check_base(&self, info: &FactorInfo, source: &Path) -> Result<()> {
        if (info.d_out, info.d_in, info.rank) != (self.d_out, self.d_in, self.rank) {
            return Err(file_err(
                source,
                format!(
                    "wrong base: adapter module `{}` was made for a {}x{} weight of rank {}, but these factors are {}x{} of rank {}",
                    self.module, self.d_out, self.d_in, self.rank, info.d_out, info.d_in, info.rank
                ),
            ));
        }
        if info.weight != self.weight || info.dtype != self.dtype {
            return Err(file_err(
                source,
                format!(
                    "wrong base: adapter module `{}` adapts `{}` ({}), but these factors decompose `{}` ({})",
                    self.module,
                    self.weight,
                    dtype_name(self.dtype),
                    info.weight,
                    dtype_name(info.dtype)
                ),
            ));
        }
        if info.checksum != self.base_checksum {
            return Err(file_err(
                source,
                format!(
                    "wrong base: adapter module `{}` was made on factors with checksum {}, but these have {} \
                     (another model, or a different decomposition)",
                    self.module, self.base_checksum, info.checksum
                ),
            ));
        }
        Ok(())
    }

    /// A layer over `factors` carrying this module's pattern, coefficients and gate.
    pub fn to_layer(&self, factors: Factors) -> Result<CpuLayer> {
        let sum = factors_checksum(&factors);
        if sum != self.base_checksum {
            return Err(Error::InvalidArgument(format!(
                "wrong base: adapter module `{}` was made on factors with checksum {}, got {sum}",
                self.module, self.base_checksum
            )));
        }
        let omega = Omega::from_indices(self.pattern, self.rank, self.rows.clone(), self.cols.clone())?;
        self.check_core_range(&factors)?;
        let mut layer = CpuLayer::with_omega(factors, omega, &self.config(), None)?;
        layer.set_coefficients(&self.coefficients)?;
        layer.set_gamma(self.gamma)?;
        Ok(layer)
    }

    /// Refuses coefficients whose adapted weight f32 cannot hold. With U and V orthonormal,
    /// every entry of `W = U C V^T`, and every partial sum on the way (`U C`, `C V^T x / |x|`), is
    /// at most `||C||_F` for the core `C = diag(s) + g M`; below `f32::MAX / 4` nothing
    /// overflows, above it the file's values are refused rather than merged to infinities.
    fn check_core_range(&self, factors: &Factors) -> Result<()> {
        let g = if self.gate { 1.0 / (1.0 + (-(self.gamma as f64)).exp()) } else { 1.0 };
        let mut core: std::collections::HashMap<(u32, u32), f64> =
            (0..factors.r as u32).map(|i| ((i, i), factors.s[i as usize] as f64)).collect();
        for ((&i, &j), &m) in self.rows.iter().zip(&self.cols).zip(&self.coefficients) {
            *core.entry((i, j)).or_insert(0.0) += g * m as f64;
        }
        let norm = core.values().map(|c| c * c).sum::<f64>().sqrt();
        if norm.is_nan() || norm > f32::MAX as f64 / 4.0 {
            return Err(Error::InvalidArgument(format!(
                "adapter module `{}`: the core diag(s) + g M has norm {norm:e}, beyond what an f32 weight holds \
                 (largest |M| {:e}, gate {g})",
                self.module,
                self.coefficients.iter().fold(0.0f32, |a, x| a.max(x.abs()))
            )));
        }
        Ok(())
    }

    fn data_checksum(&self) -> String {
        let mut h = Fnv1a::default();
        h.write_f32(&self.coefficients);
        h.write_f32(&[self.gamma]);
        self.rows.iter().chain(&self.cols).for_each(|&x| h.write(&(x as i64).to_le_bytes()));
        h.finish()
    }
}

/// An adapter: the trained state of every adapted module.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Adapter {
    /// The modules, in natural name order once loaded.
    pub modules: Vec<AdapterModule>,
}

impl Adapter {
    /// Writes the adapter file.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let mut tensors: Vec<OwnedTensor> = Vec::with_capacity(4 * self.modules.len());
        let mut meta = Map::new();
        for m in &self.modules {
            let k = m.coefficients.len();
            if m.rows.len() != k || m.cols.len() != k {
                return Err(Error::InvalidArgument(format!("module `{}`: pattern and coefficients differ", m.module)));
            }
            if meta.contains_key(&m.module) {
                return Err(Error::InvalidArgument(format!("module `{}` appears twice", m.module)));
            }
            if module_name(&m.weight) != m.module {
                return Err(Error::InvalidArgument(format!(
                    "module `{}` names the weight `{}`, which is not its own",
                    m.module, m.weight
                )));
            }
            meta.insert(
                m.module.clone(),
                with_meta_checksum(json!({
                    "weight": m.weight, "pattern": m.pattern.to_string(), "rank": m.rank,
                    "topk_criterion": criterion_name(&m.pattern), "init": m.init.to_string(), "gate": m.gate,
                    "seed": m.seed, "d_out": m.d_out, "d_in": m.d_in, "dtype": dtype_name(m.dtype),
                    "base_checksum": m.base_checksum, "data_checksum": m.data_checksum(),
                })),
            );
            let idx = |v: &[u32]| v.iter().flat_map(|&x| (x as i64).to_le_bytes()).collect::<Vec<u8>>();
            tensors.push((
                format!("{}.s_edge", m.module),
                Dtype::F32,
                vec![k],
                f32_to_bytes(Dtype::F32, &m.coefficients)?,
            ));
            tensors.push((format!("{}.gate", m.module), Dtype::F32, vec![1], m.gamma.to_le_bytes().to_vec()));
            tensors.push((format!("{}.s_row", m.module), Dtype::I64, vec![k], idx(&m.rows)));
            tensors.push((format!("{}.s_col", m.module), Dtype::I64, vec![k], idx(&m.cols)));
        }
        let mut metadata = base_metadata(ADAPTER_FORMAT, meta);
        seal_file(&mut metadata);
        write_safetensors(path, &tensors, metadata)
    }

    /// Reads and checks an adapter file: format and version, metadata, every tensor's shape and
    /// range, and each module's data checksum.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let ckpt = Checkpoint::open(path)?;
        let modules_json = check_format(path, &ckpt, ADAPTER_FORMAT)?;
        check_accounted(path, &ckpt, &modules_json, &["s_edge", "gate", "s_row", "s_col"])?;
        let mut modules = Vec::new();
        for (module, obj) in modules_json.as_object().expect("checked") {
            let obj = obj.as_object().ok_or_else(|| file_err(path, format!("corrupt metadata for `{module}`")))?;
            verify_meta(path, module, obj)?;
            let f = Fields { path, module, obj };
            let pattern: Pattern = f
                .str("pattern")?
                .parse()
                .map_err(|e| file_err(path, format!("corrupt metadata: module `{module}`: {e}")))?;
            if f.str("topk_criterion")? != criterion_name(&pattern) {
                return Err(f.missing("topk_criterion"));
            }
            let init: Init = f.str("init")?.parse().map_err(|_| f.missing("init"))?;
            let dtype = parse_dtype(f.str("dtype")?).map_err(|_| f.missing("dtype"))?;
            let rank = f.usize("rank")?;
            let (weight, d_out, d_in) = (f.str("weight")?.to_string(), f.usize("d_out")?, f.usize("d_in")?);
            check_module_shape(&f, &weight, d_out, d_in, rank)?;
            let tensor = |suffix: &str| -> Result<String> {
                let name = format!("{module}.{suffix}");
                ckpt.get(&name)
                    .map(|_| name.clone())
                    .ok_or_else(|| file_err(path, format!("corrupt: no tensor `{name}`")))
            };
            let coefficients = ckpt.read_f32(&tensor("s_edge")?)?;
            let gate = ckpt.read_f32(&tensor("gate")?)?;
            let to_index = |name: String| -> Result<Vec<u32>> {
                ckpt.read_i64(&name)?
                    .into_iter()
                    .map(|x| {
                        u32::try_from(x).ok().filter(|&x| (x as usize) < rank).ok_or_else(|| {
                            file_err(path, format!("corrupt: `{name}` holds index {x}, outside the rank {rank}"))
                        })
                    })
                    .collect()
            };
            let rows = to_index(tensor("s_row")?)?;
            let cols = to_index(tensor("s_col")?)?;
            if gate.len() != 1 || rows.len() != coefficients.len() || cols.len() != coefficients.len() {
                return Err(file_err(path, format!("corrupt: the tensors of module `{module}` have mismatched sizes")));
            }
            if coefficients.iter().chain(&gate).any(|x| !x.is_finite()) {
                return Err(file_err(path, format!("module `{module}` holds a non-finite coefficient or gate")));
            }
            // The pattern fits the rank and names exactly these indices (a band its own band).
            let omega = Omega::from_indices(pattern, rank, rows, cols)
                .map_err(|e| file_err(path, format!("corrupt: module `{module}`: {e}")))?;
            let (rows, cols) = (omega.rows, omega.cols);
            let m = AdapterModule {
                module: module.clone(),
                weight,
                pattern,
                init,
                gate: f.bool("gate")?,
                seed: f.u64("seed")?,
                d_out,
                d_in,
                rank,
                dtype,
                base_checksum: f.str("base_checksum")?.to_string(),
                rows,
                cols,
                coefficients,
                gamma: gate[0],
            };
            let recorded = f.str("data_checksum")?;
            let actual = m.data_checksum();
            if actual != recorded {
                return Err(file_err(
                    path,
                    format!(
                        "corrupt: the data of module `{module}` has checksum {actual} but the file records {recorded}"
                    ),
                ));
            }
            modules.push(m);
        }
        modules.sort_by(|a, b| crate::formats::checkpoint::natural_cmp(&a.module, &b.module));
        Ok(Adapter { modules })
    }

    /// Checks every module against a factor file (present, same shape, same checksum).
    pub fn check_base(&self, factors: &FactorFile) -> Result<()> {
        for m in &self.modules {
            let info = factors.get(&m.module).ok_or_else(|| {
                file_err(
                    factors.path(),
                    format!("wrong base: it has no module `{}`, which the adapter adapts", m.module),
                )
            })?;
            m.check_base(info, factors.path())?;
        }
        Ok(())
    }

    /// Trainable parameters in all modules (coefficients, plus one per gated module).
    pub fn trainable_params(&self) -> usize {
        self.modules.iter().map(|m| m.coefficients.len() + usize::from(m.gate)).sum()
    }
}
