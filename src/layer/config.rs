//! Backend-independent layer configuration.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;
use crate::layer::pattern::Pattern;
use crate::layer::plan::Plan;

/// How the trainable coefficients start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Init {
    /// `M = 0`: the adapted layer equals W0 exactly at step 0 (the paper's formulation).
    #[default]
    Zero,
    /// `M ~ N(0, 2/|Omega|)` (Kaiming normal, fan_in = |Omega|) and `gamma = 0`, so `g = 0.5`
    /// with the gate on. The layer is NOT W0 at step 0. This is what the published results used.
    Official,
}

impl fmt::Display for Init {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Init::Zero => "zero",
            Init::Official => "official",
        })
    }
}

impl FromStr for Init {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.to_ascii_lowercase().as_str() {
            "zero" => Ok(Init::Zero),
            "official" | "kaiming" => Ok(Init::Official),
            _ => Err(Error::InvalidArgument(format!("unknown init `{s}`: expected zero or official"))),
        }
    }
}

/// Everything about a layer except its factors and bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerConfig {
    /// Which entries of M are trainable.
    pub pattern: Pattern,
    /// How M starts.
    pub init: Init,
    /// Whether the scalar gate `g = sigmoid(gamma)` multiplies M (official: on).
    pub gate: bool,
    /// Which execution plan to run.
    pub plan: Plan,
    /// Seed of the `Official` init's normal draw.
    pub seed: u64,
}

impl Default for LayerConfig {
    fn default() -> Self {
        LayerConfig { pattern: Pattern::Plain, init: Init::Zero, gate: false, plan: Plan::Auto, seed: 0 }
    }
}

impl LayerConfig {
    /// The official layer's construction: this pattern, `Official` init, gate on.
    pub fn official(pattern: Pattern) -> Self {
        LayerConfig { pattern, init: Init::Official, gate: true, ..Default::default() }
    }
}

/// The gate value `g` for a given `gamma`.
pub fn gate_value(gate: bool, gamma: f32) -> f32 {
    if gate {
        1.0 / (1.0 + (-gamma).exp())
    } else {
        1.0
    }
}
