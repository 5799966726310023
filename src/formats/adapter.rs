//! The two file formats of the CLI, both safetensors:
//!
//! **Factor files** hold the one-time decomposition of a model, per adapted module
//! (`module` = the weight's name without its `.weight` suffix):
//! `{module}.svft_u` (`d_out x r`), `{module}.svft_s` (`r`), `{module}.svft_v` (`d_in x r`), in
//! f32 or the model's dtype. `__metadata__`: `format = svft-factors`, `format_version`,
//! `crate_version`, `source` (the checkpoint), `storage_dtype`, and `modules`: a JSON object
//! `{module: {weight, d_out, d_in, rank, dtype (the weight's own), checksum, residual}}`.
//!
//! **Adapter files** hold what training learns, per module: `{module}.s_edge` (the
//! coefficients M, f32, canonical order), `{module}.gate` (gamma, f32, one value),
//! `{module}.s_row` and `{module}.s_col` (the pattern's indices, i64, like the official
//! layer's). `__metadata__`: `format = svft-adapter`, `format_version`, `crate_version`, and
//! `modules`: `{module: {weight, pattern, rank, topk_criterion, init, gate, seed, d_out, d_in,
//! dtype, base_checksum, data_checksum}}`.
//!
//! **Checksums** are 64-bit FNV-1a, written `fnv1a64:` and 16 hex digits. The base checksum
//! runs over `d_out`, `d_in`, `r` (u64, little-endian) then the f32 bit patterns of U, s, V
//! (little-endian, row-major) as the factor file stores them after rounding to its storage
//! dtype; an adapter records it so it refuses to load onto other factors. The data checksum
//! runs over the adapter module's own tensors (coefficients, gamma, rows, cols), so flipped bits
//! in a file are caught.

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

use super::meta::{base_metadata, check_format, file_err, Fields};
pub use super::meta::{
    factors_checksum, module_name, module_pattern, module_seed, splitmix64, Fnv1a, ADAPTER_FORMAT, FACTORS_FORMAT,
    FORMAT_VERSION,
};

// ---------------------------------------------------------------------------------------------
// Factor files

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
            json!({
                "weight": info.weight, "d_out": info.d_out, "d_in": info.d_in, "rank": info.rank,
                "dtype": dtype_name(info.dtype), "checksum": info.checksum, "residual": info.residual,
            }),
        );
        tensors.push((format!("{module}.svft_u"), storage, vec![f.d_out, f.r], f32_to_bytes(storage, &f.u)?));
        tensors.push((format!("{module}.svft_s"), storage, vec![f.r], f32_to_bytes(storage, &f.s)?));
        tensors.push((format!("{module}.svft_v"), storage, vec![f.d_in, f.r], f32_to_bytes(storage, &f.v)?));
        infos.push(info);
    }
    let mut metadata = base_metadata(FACTORS_FORMAT, meta);
    metadata.insert("source".into(), source.to_string());
    metadata.insert("storage_dtype".into(), dtype_name(storage));
    write_safetensors(path, &tensors, metadata)?;
    Ok(infos)
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
        let mut modules = Vec::new();
        for (module, obj) in modules_json.as_object().expect("checked") {
            let obj = obj.as_object().ok_or_else(|| file_err(path, format!("corrupt metadata for `{module}`")))?;
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
            for (suffix, shape) in [("u", [info.d_out, info.rank]), ("v", [info.d_in, info.rank])] {
                let name = format!("{module}.svft_{suffix}");
                match ckpt.get(&name) {
                    Some(e) if e.shape == shape => {}
                    Some(e) => {
                        return Err(file_err(
                            path,
                            format!("corrupt: `{name}` has shape {:?}, its metadata says {shape:?}", e.shape),
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
        let mut layer = CpuLayer::with_omega(factors, omega, &self.config(), None)?;
        layer.set_coefficients(&self.coefficients)?;
        layer.set_gamma(self.gamma)?;
        Ok(layer)
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
            meta.insert(
                m.module.clone(),
                json!({
                    "weight": m.weight, "pattern": m.pattern.to_string(), "rank": m.rank,
                    "topk_criterion": criterion_name(&m.pattern), "init": m.init.to_string(), "gate": m.gate,
                    "seed": m.seed, "d_out": m.d_out, "d_in": m.d_in, "dtype": dtype_name(m.dtype),
                    "base_checksum": m.base_checksum, "data_checksum": m.data_checksum(),
                }),
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
        write_safetensors(path, &tensors, base_metadata(ADAPTER_FORMAT, meta))
    }

    /// Reads and checks an adapter file: format and version, metadata, every tensor's shape and
    /// range, and each module's data checksum.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let ckpt = Checkpoint::open(path)?;
        let modules_json = check_format(path, &ckpt, ADAPTER_FORMAT)?;
        let mut modules = Vec::new();
        for (module, obj) in modules_json.as_object().expect("checked") {
            let obj = obj.as_object().ok_or_else(|| file_err(path, format!("corrupt metadata for `{module}`")))?;
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
            let m = AdapterModule {
                module: module.clone(),
                weight: f.str("weight")?.to_string(),
                pattern,
                init,
                gate: f.bool("gate")?,
                seed: f.u64("seed")?,
                d_out: f.usize("d_out")?,
                d_in: f.usize("d_in")?,
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
