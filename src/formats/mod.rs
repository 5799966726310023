//! The file formats: safetensors checkpoints (read lazily, single or sharded) and the factor
//! and adapter files written by `svft decompose` / `svft init-adapter`, with their checksums.

pub mod adapter;
pub mod checkpoint;
mod meta;
mod writer;
