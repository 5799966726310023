//! Many adapters, one batch: every SVFT adapter of one base layer served over the base's shared
//! factors.
//!
//! Adapters of one base share `U`, `s` and `V`; they differ only in their pattern Omega, their
//! coefficients M and their gate. A batch mixing requests for many adapters therefore runs the
//! two big products once for all rows, `T = X V` and `Y = S U^T`, and applies each request's
//! own core `diag(s) + g_a M_a` to its rows of `T` in between (`n |Omega|` work, against
//! `2 n r (d_in + d_out)` for the products). Which rows belong to which adapter is a segment
//! table ([`segments`]): contiguous row ranges, each with an adapter id or [`BASE`] (the base
//! weight alone).
//!
//! - [`Adapter`]: one adapter's own state (pattern, M, gate), backend-independent.
//! - [`segments`]: the segment table and its validation.
//! - [`cpu::CpuBank`]: the bank for one layer on the CPU.
//! - [`layout`]: the bank as the `bank_apply` CUDA kernels (kernels/bank.cu) take it.
//! - [`cuda::CudaBank`]: the bank on a CUDA device (cuBLAS products, the `bank_apply` kernel).
//!
//! Backward for one adapter per segment falls out of the same split (`A = G U` and
//! `dX = (A C_a) V^T` shared, `C_a` applied per segment, the SDDMM for `dM_a` per segment over
//! that segment's rows of `A` and `T`), but a bank serves inference, so it is not built here.

pub mod cpu;
pub mod cuda;
pub mod layout;
pub mod segments;

pub use cpu::CpuBank;
pub use cuda::CudaBank;
pub use segments::{Segment, BASE};

use crate::cpu::CpuLayer;
use crate::error::{check_finite, check_len, check_positive, Result};
use crate::layer::core::LayerCore;
use crate::layer::pattern::Omega;

/// An adapter's own state: its index set, coefficients (canonical order), gate parameter and
/// whether the gate is on (`g = sigmoid(gamma)`, else 1).
#[derive(Debug, Clone, PartialEq)]
pub struct Adapter {
    /// The index set Omega (may differ per adapter: another band, another random seed).
    pub omega: Omega,
    /// Coefficients M, one per entry of Omega.
    pub m: Vec<f32>,
    /// Gate parameter gamma.
    pub gamma: f32,
    /// Whether the gate multiplies M.
    pub gate: bool,
}

impl Adapter {
    /// An adapter from its parts; checks that M has one finite value per entry of Omega and
    /// that gamma is finite (the bank checks Omega against its rank when it takes the adapter).
    pub fn new(omega: Omega, m: Vec<f32>, gamma: f32, gate: bool) -> Result<Self> {
        check_positive("|Omega|", omega.len())?;
        check_len("coefficients", &m, omega.len())?;
        check_finite("coefficients", &m)?;
        LayerCore::check_gamma(gamma)?;
        Ok(Adapter { omega, m, gamma, gate })
    }

    /// The adapter a single-adapter layer holds (its pattern, coefficients and gate).
    pub fn from_layer(layer: &CpuLayer) -> Self {
        Adapter {
            omega: layer.omega().clone(),
            m: layer.coefficients().to_vec(),
            gamma: layer.gamma(),
            gate: layer.config().gate,
        }
    }

    /// The gate value g.
    pub fn g(&self) -> f32 {
        crate::layer::config::gate_value(self.gate, self.gamma)
    }
}
