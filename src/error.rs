//! The one error type of the crate. Every fallible public call returns `Result<T, Error>`;
//! nothing in the public API panics on bad input.

use std::fmt;

/// Everything that can go wrong when building or running an SVFT layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A pattern spec string that does not parse.
    #[error("invalid pattern spec `{spec}`: {reason}")]
    PatternSpec { spec: String, reason: String },

    /// A pattern that cannot exist for the given factors (d >= r, non-square top-k, ...).
    #[error("pattern `{pattern}` is impossible here: {reason}")]
    PatternSize { pattern: String, reason: String },

    /// A buffer or matrix whose size does not match what the call needs.
    #[error("wrong size for {what}: expected {expected} elements, got {got}")]
    Shape { what: &'static str, expected: usize, got: usize },

    /// A zero dimension where a positive one is required.
    #[error("empty shape: {what} must be positive (got {value})")]
    Empty { what: &'static str, value: usize },

    /// A NaN or infinity in an input that must be finite.
    #[error("non-finite value in {what} at index {index}")]
    NonFinite { what: &'static str, index: usize },

    /// The requested rank is zero or larger than min(d_out, d_in).
    #[error("rank {rank} out of range: must be in 1..={max}")]
    Rank { rank: usize, max: usize },

    /// The SVD did not converge.
    #[error("SVD failed: {0}")]
    Svd(String),

    /// `backward` was called without a matching `forward` before it.
    #[error("backward called {0}")]
    NoForward(ForwardMismatch),

    /// Any other argument the call cannot use (the message says which and why).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// The CUDA backend is missing or failed (driver, kernels, out of memory, ...).
    #[error("CUDA: {0}")]
    Cuda(String),

    /// The device ran out of memory (nothing was changed; free memory or use fewer tokens).
    #[error("out of memory: {0}")]
    OutOfMemory(String),

    /// Reading or writing a file.
    #[error("I/O error on {path}: {source}")]
    Io { path: String, source: std::io::Error },

    /// A file whose contents cannot be used: not safetensors, truncated or corrupt, an unknown
    /// format version, or an adapter that does not belong to the given base factors.
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
}

/// Why a backward pass could not use the saved forward state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardMismatch {
    /// No forward pass has run since the layer was built or its coefficients changed shape.
    Missing,
    /// The last forward pass used a different number of tokens.
    Tokens { forward: usize, backward: usize },
}

impl fmt::Display for ForwardMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ForwardMismatch::Missing => write!(f, "before any forward pass"),
            ForwardMismatch::Tokens { forward, backward } => {
                write!(f, "with {backward} tokens, but the last forward pass had {forward}")
            }
        }
    }
}

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Checks that `buf` holds exactly `expected` elements.
pub(crate) fn check_len<T>(what: &'static str, buf: &[T], expected: usize) -> Result<()> {
    if buf.len() == expected {
        Ok(())
    } else {
        Err(Error::Shape { what, expected, got: buf.len() })
    }
}

/// Checks that every element of `buf` is finite.
pub(crate) fn check_finite(what: &'static str, buf: &[f32]) -> Result<()> {
    match buf.iter().position(|x| !x.is_finite()) {
        None => Ok(()),
        Some(index) => Err(Error::NonFinite { what, index }),
    }
}

/// Checks that a dimension is positive.
pub(crate) fn check_positive(what: &'static str, value: usize) -> Result<()> {
    if value == 0 {
        Err(Error::Empty { what, value })
    } else {
        Ok(())
    }
}
