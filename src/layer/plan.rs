//! Execution plans (SVFT.md section 3) and the FLOP cost model that chooses between them.
//!
//! - **Factored**: `T = X V`, `Y = S U^T` (or `Y = T U_C^T`), backward `A = G U`,
//!   `dX = (A C) V^T` (or `A V_C^T`) and an SDDMM for dC. Saves T (`n x r`).
//! - **Merged** (the official order): `W = U_C V^T` every step, `Y = X W^T`, backward `dX = G W`,
//!   `P = G^T X`, `Q = P V`, `dC_ij = U[:, i] . Q[:, j]`. Saves X (`n x d_in`).
//!
//! Inside the factored plan the core C is applied to whichever is smaller: the activations
//! (`n x r`) or the frozen factor (`d_out x r` forward, `d_in x r` backward).

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// The plan a caller asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Plan {
    /// Let the cost model choose per token count.
    #[default]
    Auto,
    /// Always the factored plan.
    Factored,
    /// Always the merged (official-order) plan.
    Merged,
    /// The small-n path: the factored plan's arithmetic with the dense products done by
    /// hand-written skinny kernels that stream U and V once per pass (CUDA; the CPU backend runs
    /// its factored plan). Valid at any n; meant for n <= [`SMALL_N_MAX`].
    SmallN,
}

/// Largest token count for which `Auto` considers the small-n path.
pub const SMALL_N_MAX: usize = 64;

/// The plan actually run for a given token count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExecPlan {
    /// See [`Plan::Factored`].
    Factored,
    /// See [`Plan::Merged`].
    Merged,
    /// See [`Plan::SmallN`].
    SmallN,
}

impl From<ExecPlan> for Plan {
    /// The fixed plan that always runs `p`.
    fn from(p: ExecPlan) -> Plan {
        match p {
            ExecPlan::Factored => Plan::Factored,
            ExecPlan::Merged => Plan::Merged,
            ExecPlan::SmallN => Plan::SmallN,
        }
    }
}

impl ExecPlan {
    /// Whether this plan keeps the factored order (saves T, never forms W): Factored and SmallN.
    pub fn is_factored(self) -> bool {
        !matches!(self, ExecPlan::Merged)
    }
    /// FLOPs of this plan's dense products for `n` tokens.
    pub fn gemm_flops(self, dims: &Dims, n: usize) -> f64 {
        if self.is_factored() {
            dims.factored_gemm_flops(n)
        } else {
            dims.merged_gemm_flops(n)
        }
    }
    /// FLOPs of this plan for `n` tokens, sparse passes included.
    pub fn flops(self, dims: &Dims, n: usize) -> f64 {
        if self.is_factored() {
            dims.factored_flops(n)
        } else {
            dims.merged_flops(n)
        }
    }
}

/// The merged plan is chosen only when its FLOPs are below this fraction of the factored plan's.
pub const MERGED_MARGIN: f64 = 0.9;

/// Layer dimensions that the cost model needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    /// Output features.
    pub d_out: usize,
    /// Input features.
    pub d_in: usize,
    /// Rank.
    pub r: usize,
    /// |Omega|.
    pub nnz: usize,
}

impl Dims {
    /// FLOPs of the factored plan's dense products, forward plus backward, for n tokens:
    /// `4 n r (d_in + d_out)`.
    pub fn factored_gemm_flops(&self, n: usize) -> f64 {
        4.0 * n as f64 * self.r as f64 * (self.d_in + self.d_out) as f64
    }

    /// FLOPs of the factored plan including the sparse passes (core apply twice, SDDMM).
    pub fn factored_flops(&self, n: usize) -> f64 {
        let core_fwd = 2.0 * (n.min(self.d_out) * (self.r + self.nnz)) as f64;
        let core_bwd = 2.0 * (n.min(self.d_in) * (self.r + self.nnz)) as f64;
        self.factored_gemm_flops(n) + core_fwd + core_bwd + 2.0 * (n * self.nnz) as f64
    }

    /// FLOPs of the merged plan's dense products: `4 d_out d_in r + 6 n d_out d_in`.
    pub fn merged_gemm_flops(&self, n: usize) -> f64 {
        let (o, i, r) = (self.d_out as f64, self.d_in as f64, self.r as f64);
        4.0 * o * i * r + 6.0 * n as f64 * o * i
    }

    /// FLOPs of the merged plan including its sparse passes (fold, SDDMM over d_out rows).
    pub fn merged_flops(&self, n: usize) -> f64 {
        self.merged_gemm_flops(n) + 4.0 * (self.d_out * (self.r + self.nnz)) as f64
    }

    /// LoRA rank `rl` with dX, forward plus backward (SVFT.md section 3).
    pub fn lora_flops(&self, n: usize, rl: usize) -> f64 {
        let (o, i) = (self.d_out as f64, self.d_in as f64);
        let (n, rl) = (n as f64, rl as f64);
        4.0 * n * i * o + 6.0 * n * rl * (i + o)
    }

    /// The cheaper plan by FLOP count. Merged must win by [`MERGED_MARGIN`]: it also writes
    /// and reads two `d_out x d_in` matrices (W and P) every step, which FLOPs do not count,
    /// and near the tie (square weights at n = 2d) the factored plan measured faster.
    pub fn cheaper(&self, n: usize) -> ExecPlan {
        if self.merged_flops(n) < MERGED_MARGIN * self.factored_flops(n) {
            ExecPlan::Merged
        } else {
            ExecPlan::Factored
        }
    }
}

impl Plan {
    /// The plan a fixed choice always runs; `None` for `Auto`.
    pub fn fixed(self) -> Option<ExecPlan> {
        match self {
            Plan::Factored => Some(ExecPlan::Factored),
            Plan::Merged => Some(ExecPlan::Merged),
            Plan::SmallN => Some(ExecPlan::SmallN),
            Plan::Auto => None,
        }
    }
    /// Resolves `Auto` for `n` tokens.
    pub fn resolve(self, dims: &Dims, n: usize) -> ExecPlan {
        self.fixed().unwrap_or_else(|| dims.cheaper(n))
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Plan::Auto => "auto",
            Plan::Factored => "factored",
            Plan::Merged => "merged",
            Plan::SmallN => "small-n",
        })
    }
}

impl fmt::Display for ExecPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ExecPlan::Factored => "factored",
            ExecPlan::Merged => "merged",
            ExecPlan::SmallN => "small-n",
        })
    }
}

impl FromStr for Plan {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Plan::Auto),
            "factored" => Ok(Plan::Factored),
            "merged" | "official" => Ok(Plan::Merged),
            "small-n" | "small_n" | "smalln" => Ok(Plan::SmallN),
            _ => Err(Error::InvalidArgument(format!("unknown plan `{s}`: expected auto, factored, merged or small-n"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn square_merged_wins_only_beyond_2d() {
        let dims = Dims { d_out: 1024, d_in: 1024, r: 1024, nnz: 1024 };
        assert_eq!(dims.factored_gemm_flops(100), 8.0 * 100.0 * 1024f64.powi(2));
        assert_eq!(dims.cheaper(512), ExecPlan::Factored);
        assert_eq!(dims.cheaper(2048), ExecPlan::Factored, "a tie goes to factored");
        assert_eq!(dims.cheaper(8192), ExecPlan::Merged);
        // Rectangular: r = min, factored wins at every n.
        let rect = Dims { d_out: 4096, d_in: 512, r: 512, nnz: 512 };
        assert_eq!(rect.cheaper(1 << 20), ExecPlan::Factored);
    }
}
