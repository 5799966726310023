//! The layer core and its math, independent of any backend: the configuration, the sparsity
//! patterns and their index sets, the execution plans and their cost model, measured plan
//! choice, the one-time SVD and the f64 reference. Both backends build on this; nothing here
//! imports a backend.

pub mod calibrate;
pub mod config;
pub mod core;
pub mod pattern;
pub mod plan;
pub mod reference;
pub mod svd;
