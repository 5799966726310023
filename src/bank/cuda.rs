//! [`CudaBank`]: the adapter bank on a CUDA device, on the caller's buffers and stream.
//!
//! The same batch as [`super::CpuBank`]: `T = X V` and `Y = S U^T (+ bias)` through cuBLAS
//! once for the whole batch, and between them the `bank_apply_fwd` kernel (kernels/bank.cu),
//! every tile of rows through its own adapter's core. The adapters themselves live in a host
//! [`CpuBank`] (which checks them and gives them ids); their device layout
//! ([`KernelLayout`]: coefficients, gates, CSRs) is uploaded again on the first forward after
//! an add, replace or remove, and never otherwise. Per call only the tiles of the segment table
//! (3 ints per 16 rows) go to the device; forward only enqueues work on the stream.

use std::sync::Arc;

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DeviceRepr, ValidAsZeroBits};

use super::layout::KernelLayout;
use super::{Adapter, CpuBank, Segment};
use crate::cuda::{bank_apply, blas_err, driver_err, gemm, BankArgs, Dtype, Gpu, Mat};
use crate::error::{check_len, Error, Result};
use crate::layer::svd::Factors;

/// The layout on the device.
#[derive(Debug)]
struct DeviceLayout {
    m: CudaSlice<f32>,
    g: CudaSlice<f32>,
    info: CudaSlice<i32>,
    ptr: CudaSlice<i32>,
    idx: CudaSlice<i32>,
    perm: CudaSlice<i32>,
}

/// Grows `slot` to at least `len` elements (allocating only then).
fn grow<'a, E: DeviceRepr + ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    slot: &'a mut Option<CudaSlice<E>>,
    len: usize,
) -> Result<&'a mut CudaSlice<E>> {
    if slot.as_ref().is_none_or(|s| s.len() < len) {
        *slot = None;
        *slot = Some(stream.alloc_zeros::<E>(len.max(1)).map_err(|e| driver_err("allocating the bank workspace", e))?);
    }
    Ok(slot.as_mut().expect("just allocated"))
}

/// The adapters of one base layer on a CUDA device (see the module doc).
#[derive(Debug)]
pub struct CudaBank<T: Dtype> {
    gpu: Arc<Gpu>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    host: CpuBank,
    u: CudaSlice<T>,
    v: CudaSlice<T>,
    s: CudaSlice<f32>,
    bias: Option<CudaSlice<T>>,
    /// `None` after a change of the adapters: uploaded again by the next forward.
    layout: Option<(KernelLayout, DeviceLayout)>,
    tiles_host: Vec<i32>,
    tiles: Option<CudaSlice<i32>>,
    t: Option<CudaSlice<T>>,
    s_act: Option<CudaSlice<T>>,
    ones: Option<CudaSlice<T>>,
}

impl<T: Dtype> CudaBank<T> {
    /// An empty bank over these base factors (uploaded in `T`) and optional bias.
    pub fn new(gpu: Arc<Gpu>, stream: Arc<CudaStream>, factors: &Factors, bias: Option<&[f32]>) -> Result<Self> {
        let host = CpuBank::new(factors.clone(), bias.map(<[f32]>::to_vec))?;
        let f = factors;
        for (what, v) in [("d_out", f.d_out), ("d_in", f.d_in)] {
            if v > i32::MAX as usize / 2 {
                return Err(Error::InvalidArgument(format!("{what} = {v} is too large for the kernels")));
            }
        }
        let narrow = |x: &[f32]| x.iter().map(|&v| T::from_f32(v)).collect::<Vec<T>>();
        let up_t = |x: &[f32]| stream.clone_htod(&narrow(x)).map_err(|e| driver_err("uploading the factors", e));
        let blas = CudaBlas::new(stream.clone()).map_err(|e| blas_err("creating the cuBLAS handle", e))?;
        Ok(CudaBank {
            u: up_t(&f.u)?,
            v: up_t(&f.v)?,
            s: stream.clone_htod(&f.s).map_err(|e| driver_err("uploading the factors", e))?,
            bias: bias.map(up_t).transpose()?,
            host,
            layout: None,
            tiles_host: Vec::new(),
            tiles: None,
            t: None,
            s_act: None,
            ones: None,
            blas,
            gpu,
            stream,
        })
    }

    /// The adapters, on the host (ids, states, resident bytes).
    pub fn adapters(&self) -> &CpuBank {
        &self.host
    }
    /// The stream every call enqueues on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    /// Adds adapter `id` (see [`CpuBank::add`]); uploaded with the next forward.
    pub fn add(&mut self, id: u32, adapter: Adapter) -> Result<()> {
        self.host.add(id, adapter)?;
        self.layout = None;
        Ok(())
    }
    /// Replaces adapter `id` (see [`CpuBank::replace`]).
    pub fn replace(&mut self, id: u32, adapter: Adapter) -> Result<Adapter> {
        let old = self.host.replace(id, adapter)?;
        self.layout = None;
        Ok(old)
    }
    /// Removes adapter `id` (see [`CpuBank::remove`]).
    pub fn remove(&mut self, id: u32) -> Result<Adapter> {
        let old = self.host.remove(id)?;
        self.layout = None;
        Ok(old)
    }

    /// The device layout, uploaded when the adapters changed since the last forward.
    fn layout(&mut self) -> Result<&(KernelLayout, DeviceLayout)> {
        if self.layout.is_none() {
            let host = KernelLayout::new(&self.host, true)?;
            let up_f = |x: &[f32]| self.stream.clone_htod(x).map_err(|e| driver_err("uploading the adapters", e));
            let up_i = |x: &[i32]| self.stream.clone_htod(x).map_err(|e| driver_err("uploading the adapters", e));
            let dev = DeviceLayout {
                m: up_f(&host.m)?,
                g: up_f(&host.g)?,
                info: up_i(&host.info)?,
                ptr: up_i(&host.ptr)?,
                idx: up_i(&host.idx)?,
                perm: up_i(&host.perm)?,
            };
            self.layout = Some((host, dev));
        }
        Ok(self.layout.as_ref().expect("set above"))
    }

    /// `Y` (`n x d_out`) for a mixed batch `x` (`n x d_in`), both on this bank's device: row
    /// `b` through the adapter of the segment holding it. The table is validated in full on
    /// the host before anything is enqueued.
    pub fn forward(
        &mut self,
        x: &CudaView<'_, T>,
        n: usize,
        segments: &[Segment],
        y: &mut CudaViewMut<'_, T>,
    ) -> Result<()> {
        let f = self.host.factors();
        let (d_out, d_in, r) = (f.d_out, f.d_in, f.r);
        check_len("X (n x d_in)", &vec![(); x.len()], n.saturating_mul(d_in))?;
        check_len("Y (n x d_out)", &vec![(); y.len()], n.saturating_mul(d_out))?;
        if n > i32::MAX as usize / d_out.max(d_in).max(r) {
            return Err(Error::InvalidArgument(format!("{n} tokens are too many for one call")));
        }
        self.layout()?;
        let mut tiles_host = std::mem::take(&mut self.tiles_host);
        let cut = self.layout.as_ref().expect("uploaded above").0.tiles(segments, n, &mut tiles_host);
        self.tiles_host = tiles_host;
        cut?;
        let stream = self.stream.clone();
        let tiles = grow(&stream, &mut self.tiles, self.tiles_host.len())?;
        let ntiles = self.tiles_host.len() / 3;
        if ntiles > 0 {
            stream
                .memcpy_htod(&self.tiles_host, &mut tiles.slice_mut(..self.tiles_host.len()))
                .map_err(|e| driver_err("uploading the tiles", e))?;
        }
        let t = grow(&stream, &mut self.t, n * r)?;
        gemm(
            &self.blas,
            &mut t.slice_mut(..n * r),
            Mat { data: x, rows: n, cols: d_in, trans: false },
            Mat { data: &self.v.slice(..), rows: d_in, cols: r, trans: false },
            false,
        )?;
        let s_act = grow(&stream, &mut self.s_act, n * r)?;
        let dev = &self.layout.as_ref().expect("uploaded above").1;
        let (m, g, info, ptr, idx, perm) = (
            dev.m.slice(..),
            dev.g.slice(..),
            dev.info.slice(..),
            dev.ptr.slice(..),
            dev.idx.slice(..),
            dev.perm.slice(..),
        );
        let tiles_v = tiles.slice(..);
        let args = BankArgs { m: &m, g: &g, info: &info, ptr: &ptr, idx: &idx, perm: &perm, tiles: &tiles_v, ntiles };
        let t_v = t.slice(..n * r);
        bank_apply(&self.gpu, &stream, true, &t_v, &mut s_act.slice_mut(..n * r), &self.s.slice(..), &args, r)?;
        gemm(
            &self.blas,
            y,
            Mat { data: &s_act.slice(..n * r), rows: n, cols: r, trans: false },
            Mat { data: &self.u.slice(..), rows: d_out, cols: r, trans: true },
            false,
        )?;
        if let Some(bias) = &self.bias {
            // Y += ones(n x 1) bias(1 x d_out): a rank-1 product, no extra kernel.
            let fresh = self.ones.as_ref().is_none_or(|o| o.len() < n);
            let ones = grow(&stream, &mut self.ones, n)?;
            if fresh {
                let host = vec![T::from_f32(1.0); ones.len()];
                stream.memcpy_htod(&host, ones).map_err(|e| driver_err("filling ones", e))?;
            }
            gemm(
                &self.blas,
                y,
                Mat { data: &ones.slice(..n), rows: n, cols: 1, trans: false },
                Mat { data: &bias.slice(..), rows: 1, cols: d_out, trans: false },
                true,
            )?;
        }
        Ok(())
    }
}
