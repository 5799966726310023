//! Model surgery: an [`SvftModel`] is the set of SVFT layers that adapt a checkpoint's targeted
//! weights, chosen and seeded exactly as the CLI does (`--targets` regex and its default
//! [`DEFAULT_TARGETS`](crate::checkpoint::DEFAULT_TARGETS), per-module seeds
//! [`module_seed`] / [`module_pattern`]), and read and written in the CLI's files: an adapter
//! trained here loads in `svft merge` with the factor file it was made on, and an adapter from
//! `svft init-adapter` loads here.
//!
//! The model's own forward (embeddings, attention, norms) stays the caller's: it asks the
//! `SvftModel` for the layer of each projection by module name (the weight's name without
//! `.weight`) and calls it where it would call its `Linear`.

use std::path::Path;

use candle_core::{bail, Result, Var};
use candle_nn::VarMap;

use super::SvftLinear;
use crate::adapter::{
    module_name, module_pattern, module_seed, save_factors, Adapter, AdapterModule, DecomposedModule, FactorFile,
};
use crate::checkpoint::{natural_cmp, target_regex, Checkpoint, Dtype};
use crate::cpu::CpuLayer;
use crate::layer::config::{Init, LayerConfig};
use crate::layer::pattern::{Omega, Pattern};
use crate::layer::plan::Plan;
use crate::svd::thin_svd;

/// How to adapt a model: the options of `svft decompose` / `svft init-adapter`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdaptConfig {
    /// Pattern spec as the CLI takes it (`plain`, `banded:2`, `random:16[:seed=S]`, `topk:8`).
    pub pattern: String,
    /// How M starts.
    pub init: Init,
    /// The gate; `None`: on with the official init, off with zero init (the CLI's default).
    pub gate: Option<bool>,
    /// Base seed of the per-module seeds.
    pub seed: u64,
    /// Regex over weight names; `None`: the CLI's default targets.
    pub targets: Option<String>,
    /// Truncate the decomposition to this rank (`None`: full rank, the paper's advice).
    pub rank: Option<usize>,
    /// Execution plan of every layer.
    pub plan: Plan,
}

impl Default for AdaptConfig {
    fn default() -> Self {
        AdaptConfig {
            pattern: "plain".into(),
            init: Init::Zero,
            gate: None,
            seed: 0,
            targets: None,
            rank: None,
            plan: Plan::Auto,
        }
    }
}

impl AdaptConfig {
    /// The layer config of module `module`, as `svft init-adapter` derives it: M's init seeded
    /// with `module_seed(seed, module)`, a random pattern re-seeded per module.
    pub fn layer_config(&self, module: &str) -> Result<LayerConfig> {
        let pattern: Pattern = self.pattern.parse().map_err(|e| super::err("AdaptConfig pattern", e))?;
        // `random:D:seed=S` names S; `random:D` takes the base seed (as init-adapter reads it).
        let explicit_seed = self.pattern.trim().split(':').nth(2).is_some();
        Ok(LayerConfig {
            pattern: module_pattern(pattern, explicit_seed, self.seed, module),
            init: self.init,
            gate: self.gate.unwrap_or(self.init == Init::Official),
            plan: self.plan,
            seed: module_seed(self.seed, module),
        })
    }
}

/// One adapted module.
#[derive(Debug, Clone)]
struct Adapted {
    module: String,
    weight: String,
    /// The weight's dtype in the model (the files record it; `svft merge` writes it back).
    dtype: Dtype,
    /// Relative residual of the decomposition (the factor file records it).
    residual: f64,
    linear: SvftLinear,
}

/// The SVFT layers adapting a model (see the module doc).
#[derive(Debug, Clone)]
pub struct SvftModel {
    modules: Vec<Adapted>,
}

/// The frozen bias `{module}.bias` of a checkpoint, if it has one of `d_out` values.
fn read_bias(ckpt: &Checkpoint, module: &str, d_out: usize) -> Result<Option<Vec<f32>>> {
    let name = format!("{module}.bias");
    match ckpt.get(&name) {
        Some(e) if e.shape == [d_out] => Ok(Some(ckpt.read_f32(&name).map_err(|e| super::err("bias", e))?)),
        Some(e) => bail!("`{name}` has shape {:?}, expected [{d_out}]", e.shape),
        None => Ok(None),
    }
}

impl SvftModel {
    /// Decomposes every targeted weight of a safetensors checkpoint (single file or sharded
    /// index; f32, bf16, f16) and adapts it; biases `{module}.bias` are kept frozen.
    pub fn from_checkpoint(model: impl AsRef<Path>, config: &AdaptConfig) -> Result<Self> {
        let ckpt = Checkpoint::open(model.as_ref()).map_err(|e| super::err("SvftModel", e))?;
        let re = target_regex(config.targets.as_deref()).map_err(|e| super::err("SvftModel", e))?;
        let mut modules = Vec::new();
        for e in ckpt.targets(&re) {
            let Some((d_out, d_in)) = e.dims2() else { continue }; // targets are 2-D
            let module = module_name(&e.name).to_string();
            let ctx = |err| super::err(&format!("SvftModel: `{}`", e.name), err);
            let w = ckpt.read_f32(&e.name).map_err(ctx)?;
            let dec = thin_svd(&w, d_out, d_in, config.rank).map_err(ctx)?;
            let bias = read_bias(&ckpt, &module, d_out)?;
            let layer = CpuLayer::new(dec.factors, &config.layer_config(&module)?, bias).map_err(ctx)?;
            let linear = SvftLinear::new(layer)?;
            modules.push(Adapted { module, weight: e.name.clone(), dtype: e.dtype, residual: dec.residual, linear });
        }
        Self::checked(
            modules,
            &format!("no 2-D float weight of {} matches the targets `{}`", model.as_ref().display(), re),
        )
    }

    /// Adapts the modules of a factor file (`svft decompose`'s output) matching `config.targets`
    /// (all of them when `None`); `model` supplies the frozen biases, if any.
    pub fn from_factor_file(factors: impl AsRef<Path>, model: Option<&Path>, config: &AdaptConfig) -> Result<Self> {
        let file = FactorFile::open(factors.as_ref()).map_err(|e| super::err("SvftModel", e))?;
        let ckpt = model.map(Checkpoint::open).transpose().map_err(|e| super::err("SvftModel", e))?;
        let re = config
            .targets
            .as_deref()
            .map(|t| target_regex(Some(t)))
            .transpose()
            .map_err(|e| super::err("SvftModel", e))?;
        let mut modules = Vec::new();
        for info in file.modules() {
            if re.as_ref().is_some_and(|re| !re.is_match(&info.weight)) {
                continue;
            }
            let ctx = |err| super::err(&format!("SvftModel: module `{}`", info.module), err);
            let f = file.load(&info.module).map_err(ctx)?;
            let bias = match &ckpt {
                Some(c) => read_bias(c, &info.module, info.d_out)?,
                None => None,
            };
            let layer = CpuLayer::new(f, &config.layer_config(&info.module)?, bias).map_err(ctx)?;
            modules.push(Adapted {
                module: info.module.clone(),
                weight: info.weight.clone(),
                dtype: info.dtype,
                residual: info.residual,
                linear: SvftLinear::new(layer)?,
            });
        }
        Self::checked(modules, &format!("no module of {} matches the targets", factors.as_ref().display()))
    }

    /// Loads an adapter file (made here, by `svft init-adapter`, or by the Python package) onto
    /// the factor file it was made on, checked module for module as `svft merge` checks it;
    /// `model` supplies the frozen biases, if any.
    pub fn load_adapter(adapter: impl AsRef<Path>, factors: impl AsRef<Path>, model: Option<&Path>) -> Result<Self> {
        let ad = Adapter::load(adapter.as_ref()).map_err(|e| super::err("SvftModel", e))?;
        let file = FactorFile::open(factors.as_ref()).map_err(|e| super::err("SvftModel", e))?;
        ad.check_base(&file).map_err(|e| super::err("SvftModel", e))?;
        let ckpt = model.map(Checkpoint::open).transpose().map_err(|e| super::err("SvftModel", e))?;
        let mut modules = Vec::new();
        for m in &ad.modules {
            let ctx = |err| super::err(&format!("SvftModel: module `{}`", m.module), err);
            // to_layer runs the adapter's own checks (base checksum, core range); it has no
            // bias, so the layer is rebuilt over its factors and index set with the bias.
            let plain = m.to_layer(file.load(&m.module).map_err(ctx)?).map_err(ctx)?;
            let bias = match &ckpt {
                Some(c) => read_bias(c, &m.module, m.d_out)?,
                None => None,
            };
            let omega = Omega::from_indices(m.pattern, m.rank, m.rows.clone(), m.cols.clone()).map_err(ctx)?;
            let mut layer = CpuLayer::with_omega(plain.factors().clone(), omega, &m.config(), bias).map_err(ctx)?;
            layer.set_coefficients(&m.coefficients).map_err(ctx)?;
            layer.set_gamma(m.gamma).map_err(ctx)?;
            let info = file.get(&m.module).expect("check_base found it");
            modules.push(Adapted {
                module: m.module.clone(),
                weight: m.weight.clone(),
                dtype: m.dtype,
                residual: info.residual,
                linear: SvftLinear::new(layer)?,
            });
        }
        Self::checked(modules, "the adapter holds no module")
    }

    fn checked(mut modules: Vec<Adapted>, empty: &str) -> Result<Self> {
        if modules.is_empty() {
            bail!("SvftModel: {empty}")
        }
        modules.sort_by(|a, b| natural_cmp(&a.module, &b.module));
        Ok(SvftModel { modules })
    }

    /// The layer adapting module `module`, if any.
    pub fn get(&self, module: &str) -> Option<&SvftLinear> {
        self.modules.iter().find(|a| a.module == module).map(|a| &a.linear)
    }
    /// The layer adapting module `module`, or an error naming the modules there are.
    pub fn linear(&self, module: &str) -> Result<&SvftLinear> {
        self.get(module).ok_or_else(|| {
            let names: Vec<&str> = self.modules.iter().map(|a| a.module.as_str()).take(8).collect();
            candle_core::Error::Msg(format!("SvftModel: no adapted module `{module}` (some there are: {names:?})"))
        })
    }
    /// Module names and their layers, in natural name order.
    pub fn modules(&self) -> impl Iterator<Item = (&str, &SvftLinear)> {
        self.modules.iter().map(|a| (a.module.as_str(), &a.linear))
    }
    /// Every trainable variable, for an optimiser.
    pub fn vars(&self) -> Vec<Var> {
        self.modules.iter().flat_map(|a| a.linear.vars()).collect()
    }
    /// Trainable parameters in all modules.
    pub fn trainable_params(&self) -> usize {
        self.modules.iter().map(|a| a.linear.trainable_params()).sum()
    }
    /// A `VarMap` holding every variable as `{module}.s_edge` / `{module}.gate`.
    pub fn varmap(&self) -> Result<VarMap> {
        let vm = VarMap::new();
        for a in &self.modules {
            a.linear.register(&vm, &a.module)?;
        }
        Ok(vm)
    }

    /// Writes the adapter file (the CLI's format, through [`Adapter::save`]) with the current
    /// values of the variables.
    pub fn save_adapter(&self, path: impl AsRef<Path>) -> Result<()> {
        let mut ad = Adapter::default();
        for a in &self.modules {
            ad.modules.push(a.linear.with_layer(|l| AdapterModule::from_layer(&a.weight, a.dtype, l))?);
        }
        ad.save(path.as_ref()).map_err(|e| super::err("SvftModel: saving the adapter", e))
    }

    /// Writes the factor file of these layers (f32, through [`save_factors`], as `svft
    /// decompose --dtype f32` would), `source` naming the checkpoint: with it, `svft merge`
    /// takes the adapters made here.
    pub fn save_factors(&self, path: impl AsRef<Path>, source: &str) -> Result<()> {
        let mut modules = Vec::with_capacity(self.modules.len());
        for a in &self.modules {
            let factors = a.linear.with_layer(|l| l.factors().clone())?;
            modules.push(DecomposedModule { weight: a.weight.clone(), dtype: a.dtype, factors, residual: a.residual });
        }
        save_factors(path.as_ref(), source, Dtype::F32, &modules)
            .map(drop)
            .map_err(|e| super::err("SvftModel: saving the factors", e))
    }
}
