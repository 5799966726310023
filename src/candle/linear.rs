//! [`SvftLinear`]: an SVFT layer as a `candle_nn::Module` (see the [module doc](super)).

use std::sync::{Arc, Mutex};

use candle_core::{bail, DType, Device, Module, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use super::op::{lock, SvftOp};
use crate::cpu::CpuLayer;
use crate::layer::config::LayerConfig;

/// An SVFT linear layer, `y = x (U (diag(s) + g M) V^T)^T + bias`, over inputs `[.., d_in]`.
/// Clones share the layer and its variables.
#[derive(Clone)]
pub struct SvftLinear {
    layer: Arc<Mutex<CpuLayer>>,
    m: Var,
    /// gamma with the gate on; `None` without it.
    gamma: Option<Var>,
    /// The op's third argument when the gate is off (ignored there, never trained).
    no_gamma: Tensor,
    d_out: usize,
    d_in: usize,
}

impl std::fmt::Debug for SvftLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SvftLinear")
            .field("d_out", &self.d_out)
            .field("d_in", &self.d_in)
            .field("nnz", &self.m.elem_count())
            .field("gate", &self.gamma.is_some())
            .finish()
    }
}

/// Refuses a device the layer cannot run on.
fn check_cpu(device: &Device, what: &str) -> Result<()> {
    if !device.is_cpu() {
        bail!(
            "SvftLinear: {what} is on {:?}, but the layer runs on the CPU only (candle's CUDA backend \
             cannot be built with this crate: see svft::candle); move it with `.to_device(&Device::Cpu)`",
            device.location()
        )
    }
    Ok(())
}

impl SvftLinear {
    /// Wraps a CPU layer: its current M (and gamma, with the gate on) become the variables.
    pub fn new(layer: CpuLayer) -> Result<Self> {
        let dev = Device::Cpu;
        let (d_out, d_in) = (layer.factors().d_out, layer.factors().d_in);
        let m = Var::from_tensor(&Tensor::new(layer.coefficients(), &dev)?)?;
        let gamma =
            if layer.config().gate { Some(Var::from_tensor(&Tensor::new(&[layer.gamma()], &dev)?)?) } else { None };
        let no_gamma = Tensor::zeros(1, DType::F32, &dev)?;
        Ok(SvftLinear { layer: Arc::new(Mutex::new(layer)), m, gamma, no_gamma, d_out, d_in })
    }

    /// Decomposes a `(d_out, d_in)` weight tensor (any float dtype; read as f32) and adapts it
    /// with `config`, optionally truncated to `rank`; `bias` is `(d_out,)` and stays frozen.
    pub fn from_weight(w: &Tensor, bias: Option<&Tensor>, config: &LayerConfig, rank: Option<usize>) -> Result<Self> {
        check_cpu(w.device(), "the weight")?;
        let (d_out, d_in) = w.dims2()?;
        let w = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let bias = match bias {
            Some(b) => {
                check_cpu(b.device(), "the bias")?;
                if b.dims() != [d_out] {
                    bail!("SvftLinear: bias of shape {:?} for a {d_out} x {d_in} weight", b.dims())
                }
                Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?)
            }
            None => None,
        };
        let layer = CpuLayer::from_weight(&w, d_out, d_in, rank, config, bias)
            .map_err(|e| super::err("SvftLinear from a weight", e))?;
        Self::new(layer)
    }

    /// Output features.
    pub fn d_out(&self) -> usize {
        self.d_out
    }
    /// Input features.
    pub fn d_in(&self) -> usize {
        self.d_in
    }
    /// The coefficients M (|Omega| values, the layer's canonical order).
    pub fn coefficients(&self) -> &Var {
        &self.m
    }
    /// gamma (one value) when the gate is on.
    pub fn gamma(&self) -> Option<&Var> {
        self.gamma.as_ref()
    }
    /// The trainable variables, for an optimiser: M, then gamma when the gate is on.
    pub fn vars(&self) -> Vec<Var> {
        std::iter::once(self.m.clone()).chain(self.gamma.clone()).collect()
    }
    /// Trainable parameters: |Omega| (+1 with the gate).
    pub fn trainable_params(&self) -> usize {
        self.m.elem_count() + usize::from(self.gamma.is_some())
    }

    /// Puts the variables into `varmap` as `{module}.s_edge` and `{module}.gate` (the adapter
    /// file's names), so `varmap.save` / `varmap.load` carry them. Refuses a name already taken.
    pub fn register(&self, varmap: &VarMap, module: &str) -> Result<()> {
        let mut data = lock(varmap.data(), "VarMap")?;
        let mut entries = vec![(format!("{module}.s_edge"), self.m.clone())];
        entries.extend(self.gamma.iter().map(|g| (format!("{module}.gate"), g.clone())));
        if let Some((name, _)) = entries.iter().find(|(name, _)| data.contains_key(name)) {
            bail!("SvftLinear: the VarMap already holds `{name}`")
        }
        data.extend(entries);
        Ok(())
    }

    /// Runs `f` on the CPU layer after copying the variables' current values into it (for
    /// merging, saving, or reading its factors).
    pub fn with_layer<R>(&self, f: impl FnOnce(&mut CpuLayer) -> R) -> Result<R> {
        let m = self.m.as_tensor().to_vec1::<f32>()?;
        let mut layer = lock(&self.layer, "layer")?;
        layer.set_coefficients(&m).map_err(|e| super::err("SvftLinear: coefficients", e))?;
        if let Some(g) = &self.gamma {
            let g = g.as_tensor().to_vec1::<f32>()?;
            layer.set_gamma(g[0]).map_err(|e| super::err("SvftLinear: gamma", e))?;
        }
        Ok(f(&mut layer))
    }

    /// The dense adapted weight `U C V^T`, `(d_out, d_in)` f32 (bias not included).
    pub fn merge(&self) -> Result<Tensor> {
        let w = self.with_layer(|l| l.merge())?;
        Tensor::from_vec(w, (self.d_out, self.d_in), &Device::Cpu)
    }
}

impl Module for SvftLinear {
    /// `x`: `[.., d_in]` on the CPU, any float dtype (see the module doc); returns `[.., d_out]`
    /// in `x`'s dtype.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        check_cpu(x.device(), "the input")?;
        let dtype = x.dtype();
        if !matches!(dtype, DType::F32 | DType::F64 | DType::BF16 | DType::F16) {
            bail!("SvftLinear: input dtype {dtype:?} is not a float type (f32; f64, bf16, f16 are converted)")
        }
        let dims = x.dims();
        let Some((&last, lead)) = dims.split_last() else {
            bail!("SvftLinear: input is a scalar, expected [.., {}]", self.d_in)
        };
        if last != self.d_in {
            bail!("SvftLinear: input of shape {dims:?} has {last} features, the layer takes {}", self.d_in)
        }
        let n: usize = lead.iter().product();
        if n == 0 {
            bail!("SvftLinear: input of shape {dims:?} holds no tokens")
        }
        // Flatten the leading dims into tokens; the op wants contiguous f32 rows.
        let x2 = x.to_dtype(DType::F32)?.reshape((n, self.d_in))?.contiguous()?;
        let gamma = self.gamma.as_ref().map_or(&self.no_gamma, |g| g.as_tensor());
        let op = SvftOp::new(self.layer.clone(), self.gamma.is_some());
        let y = x2.apply_op3(self.m.as_tensor(), gamma, op)?;
        let mut out = lead.to_vec();
        out.push(self.d_out);
        y.reshape(out)?.to_dtype(dtype)
    }
}

/// Like `candle_nn::linear(in_dim, out_dim, vb)`: reads `weight` (`(out_dim, in_dim)`) and, if
/// present, `bias` from `vb` as frozen tensors and returns them adapted with `config`.
/// (The per-module seeds of the CLI are [`AdaptConfig::layer_config`](super::AdaptConfig::layer_config).)
pub fn svft_linear(in_dim: usize, out_dim: usize, config: &LayerConfig, vb: VarBuilder) -> Result<SvftLinear> {
    let w = vb.get((out_dim, in_dim), "weight")?;
    let bias = if vb.contains_tensor("bias") { Some(vb.get(out_dim, "bias")?) } else { None };
    SvftLinear::from_weight(&w, bias.as_ref(), config, None)
}
