//! The candle custom op behind [`SvftLinear`](super::SvftLinear): `Y = op(X, M, gamma)`.
//!
//! Forward runs [`CpuLayer::forward_saving`] with the op's M and gamma and keeps `T = X V`
//! (`n x r`, the only activation SVFT's backward needs) in the op object. candle builds a fresh
//! op object per call (`Tensor::apply_op3` wraps it in an `Arc` stored in the graph), so a layer
//! used twice in one graph, or several graphs in flight, each keep their own `T`; the layer
//! itself holds no per-call state. Backward runs [`CpuLayer::backward_saved`] on that `T` and
//! returns `dX` (so layers stack), `dM` and, with the gate on, `dgamma`.

use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor};

use crate::cpu::CpuLayer;

/// One application of an SVFT layer (see the module doc).
pub struct SvftOp {
    layer: Arc<Mutex<CpuLayer>>,
    /// Whether gamma is trained (else the third argument is ignored and gets no gradient).
    gate: bool,
    /// `T = X V` of this op's forward, `n x r`.
    saved: Mutex<Option<Vec<f32>>>,
}

impl SvftOp {
    /// An op over `layer` (shared with the module and every other op of it).
    pub fn new(layer: Arc<Mutex<CpuLayer>>, gate: bool) -> Self {
        SvftOp { layer, gate, saved: Mutex::new(None) }
    }
}

/// Locks a mutex, turning poisoning (a panic elsewhere while it was held) into an error.
pub(crate) fn lock<'a, T>(m: &'a Mutex<T>, what: &str) -> Result<MutexGuard<'a, T>> {
    m.lock().map_err(|_| candle_core::Error::Msg(format!("SvftLinear: the {what} lock is poisoned")))
}

/// The f32 values of a contiguous CPU storage.
fn f32_values<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else { bail!("SvftLinear: {what} must be f32, got {:?}", s.dtype()) };
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("SvftLinear: {what} must be contiguous"),
    }
}

/// Runs `f` on the f32 values of a CPU tensor (made contiguous first).
fn with_values<R>(t: &Tensor, what: &str, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => f(f32_values(cpu, layout, what)?),
        _ => bail!("SvftLinear: {what} is on {:?}; the layer runs on the CPU", t.device().location()),
    }
}

/// Loads M and gamma into the layer (both checked there: length, finiteness).
fn load_parameters(layer: &mut CpuLayer, m: &[f32], gamma: &[f32], gate: bool) -> Result<()> {
    layer.set_coefficients(m).map_err(|e| super::err("SvftLinear: coefficients", e))?;
    if gate {
        let &[g] = gamma else { bail!("SvftLinear: gamma must hold one value, got {}", gamma.len()) };
        layer.set_gamma(g).map_err(|e| super::err("SvftLinear: gamma", e))?;
    }
    Ok(())
}

impl CustomOp3 for SvftOp {
    fn name(&self) -> &'static str {
        "svft-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, d_in) = l1.shape().dims2()?;
        let (x, m, gamma) = (f32_values(s1, l1, "X")?, f32_values(s2, l2, "M")?, f32_values(s3, l3, "gamma")?);
        let mut layer = lock(&self.layer, "layer")?;
        let f = layer.factors();
        let (d_out, r) = (f.d_out, f.r);
        if d_in != f.d_in {
            bail!("SvftLinear: X has {d_in} features, the layer takes {}", f.d_in)
        }
        load_parameters(&mut layer, m, gamma, self.gate)?;
        let mut y = vec![0.0f32; n * d_out];
        let mut t = vec![0.0f32; n * r];
        layer.forward_saving(x, n, &mut y, &mut t).map_err(|e| super::err("SvftLinear forward", e))?;
        *lock(&self.saved, "saved activations")? = Some(t);
        Ok((CpuStorage::F32(y), Shape::from((n, d_out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        m: &Tensor,
        gamma: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, d_in) = x.dims2()?;
        let saved = lock(&self.saved, "saved activations")?;
        let Some(t) = saved.as_ref() else { bail!("SvftLinear: backward before forward") };
        let m_vals = m.flatten_all()?.to_vec1::<f32>()?;
        let gamma_vals = gamma.flatten_all()?.to_vec1::<f32>()?;
        let mut layer = lock(&self.layer, "layer")?;
        load_parameters(&mut layer, &m_vals, &gamma_vals, self.gate)?;
        let mut dx = vec![0.0f32; n * d_in];
        let mut dm = vec![0.0f32; m_vals.len()];
        let dgamma = with_values(grad, "dL/dY", |g| {
            layer.backward_saved(t, g, n, &mut dx, &mut dm).map_err(|e| super::err("SvftLinear backward", e))
        })?;
        let dev = x.device();
        let dx = Tensor::from_vec(dx, (n, d_in), dev)?;
        let dm = Tensor::from_vec(dm, m.shape(), dev)?;
        let dgamma = if self.gate { Some(Tensor::from_vec(vec![dgamma], gamma.shape(), dev)?) } else { None };
        Ok((Some(dx), Some(dm), dgamma))
    }
}
