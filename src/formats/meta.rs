//! What the factor and adapter files share: the format names and version, the FNV-1a
//! checksums, the `__metadata__` header every file carries and the typed reading of its JSON
//! fields. The formats themselves are described in `adapter.rs`.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::formats::checkpoint::Checkpoint;
use crate::layer::svd::Factors;

/// The version of both file formats this crate writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// `format` of a factor file.
pub const FACTORS_FORMAT: &str = "svft-factors";
/// `format` of an adapter file.
pub const ADAPTER_FORMAT: &str = "svft-adapter";

/// 64-bit FNV-1a, incrementally.
#[derive(Debug, Clone, Copy)]
pub struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a {
    /// Feeds bytes.
    pub fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    /// Feeds f32 values (their little-endian bit patterns).
    pub fn write_f32(&mut self, values: &[f32]) {
        values.iter().for_each(|v| self.write(&v.to_le_bytes()));
    }
    /// `fnv1a64:` and 16 hex digits.
    pub fn finish(&self) -> String {
        format!("fnv1a64:{:016x}", self.0)
    }
}

/// The base checksum of a module's factors (see the module docs).
pub fn factors_checksum(f: &Factors) -> String {
    let mut h = Fnv1a::default();
    for d in [f.d_out, f.d_in, f.r] {
        h.write(&(d as u64).to_le_bytes());
    }
    h.write_f32(&f.u);
    h.write_f32(&f.s);
    h.write_f32(&f.v);
    h.finish()
}

/// The module name of a weight: its tensor name without a trailing `.weight`.
pub fn module_name(weight: &str) -> &str {
    weight.strip_suffix(".weight").unwrap_or(weight)
}

pub(super) fn file_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::File { path: path.display().to_string(), reason: reason.into() }
}

/// Checks `format` and `format_version` of an opened file's metadata.
pub(super) fn check_format(path: &Path, ckpt: &Checkpoint, want: &str) -> Result<Value> {
    let meta = ckpt.metadata();
    let what = if want == ADAPTER_FORMAT { "adapter" } else { "factor file" };
    match meta.get("format").map(String::as_str) {
        Some(f) if f == want => {}
        Some(FACTORS_FORMAT) => {
            return Err(file_err(path, format!("this is an SVFT factor file, not an {what} (pass it with --factors)")))
        }
        Some(ADAPTER_FORMAT) => {
            return Err(file_err(path, format!("this is an SVFT adapter, not a {what} (pass it with --adapter)")))
        }
        Some(other) => return Err(file_err(path, format!("not an SVFT {what}: its format is `{other}`"))),
        None => {
            return Err(file_err(path, format!("not an SVFT {what}: no `format = {want}` in its safetensors metadata")))
        }
    }
    let version = meta.get("format_version").ok_or_else(|| file_err(path, "no format_version in its metadata"))?;
    if version.parse::<u32>().ok() != Some(FORMAT_VERSION) {
        let by = meta.get("crate_version").map(|v| format!(", written by svft {v}")).unwrap_or_default();
        return Err(file_err(
            path,
            format!(
                "unsupported {what} format version `{version}`{by}: this svft ({}) reads version {FORMAT_VERSION}",
                env!("CARGO_PKG_VERSION")
            ),
        ));
    }
    let modules = meta.get("modules").ok_or_else(|| file_err(path, "corrupt metadata: no `modules` entry"))?;
    let modules: Value = serde_json::from_str(modules)
        .map_err(|e| file_err(path, format!("corrupt metadata: `modules` is not valid JSON ({e})")))?;
    if !modules.is_object() {
        return Err(file_err(path, "corrupt metadata: `modules` is not a JSON object"));
    }
    Ok(modules)
}

pub(super) fn base_metadata(format: &str, modules: Map<String, Value>) -> HashMap<String, String> {
    HashMap::from([
        ("format".to_string(), format.to_string()),
        ("format_version".to_string(), FORMAT_VERSION.to_string()),
        ("crate_version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
        ("modules".to_string(), Value::Object(modules).to_string()),
    ])
}

/// Typed access to one module's metadata object.
pub(super) struct Fields<'a> {
    pub(super) path: &'a Path,
    pub(super) module: &'a str,
    pub(super) obj: &'a Map<String, Value>,
}

impl Fields<'_> {
    pub(super) fn missing(&self, key: &str) -> Error {
        file_err(self.path, format!("corrupt metadata: module `{}` lacks a valid `{key}`", self.module))
    }
    pub(super) fn usize(&self, key: &str) -> Result<usize> {
        self.obj.get(key).and_then(Value::as_u64).map(|v| v as usize).ok_or_else(|| self.missing(key))
    }
    pub(super) fn str(&self, key: &str) -> Result<&str> {
        self.obj.get(key).and_then(Value::as_str).ok_or_else(|| self.missing(key))
    }
    pub(super) fn bool(&self, key: &str) -> Result<bool> {
        self.obj.get(key).and_then(Value::as_bool).ok_or_else(|| self.missing(key))
    }
    pub(super) fn f64(&self, key: &str) -> Result<f64> {
        self.obj.get(key).and_then(Value::as_f64).ok_or_else(|| self.missing(key))
    }
    pub(super) fn u64(&self, key: &str) -> Result<u64> {
        self.obj.get(key).and_then(Value::as_u64).ok_or_else(|| self.missing(key))
    }
}
