//! What the factor and adapter files share: the format names and version, the FNV-1a
//! checksums, the `__metadata__` header every file carries and the typed reading of its JSON
//! fields. The formats themselves are described in `adapter.rs`.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::formats::checkpoint::Checkpoint;
use crate::layer::pattern::Pattern;
use crate::layer::svd::Factors;

/// The version of both file formats this crate writes and reads.
/// Version 2 added each module's `meta_checksum` and the file's `file_checksum`.
pub const FORMAT_VERSION: u32 = 2;
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

/// SplitMix64's output for the state `x` (one step: add the golden-ratio increment, then mix):
/// a bijection of u64 with good avalanche, the same function that seeds [`crate::rng::Rng`].
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The seed one module gets from a base seed: `splitmix64(seed ^ fnv1a64(module))`, with
/// `fnv1a64` over the name's UTF-8 bytes (64-bit FNV-1a, the checksums' hash) and all
/// arithmetic wrapping on u64. `module` is the module's name as the files write it (the
/// weight's tensor name without `.weight`, which is also its qualified name in a PyTorch model).
///
/// `svft init-adapter` and the Python package (`svft.files.module_seed`) both use it, so the
/// same seed gives the same adapter either way: M's official init of module `name` is seeded
/// with `module_seed(seed, name)`, and a random pattern `random:D:seed=S` becomes, for that
/// module, `random:D:seed={module_seed(S, name)}` (`random:D` without a seed takes `S = seed`).
/// Every module thus gets its own pattern, as the official code's fresh draw per layer does.
pub fn module_seed(seed: u64, module: &str) -> u64 {
    let mut h = Fnv1a::default();
    h.write(module.as_bytes());
    splitmix64(seed ^ h.0)
}

/// The pattern one module gets from a config's pattern (see [`module_seed`]): a random
/// pattern's seed is derived per module from `S` (the spec's seed when `explicit_seed`, else
/// `seed`); every other pattern is the same for every module.
pub fn module_pattern(pattern: Pattern, explicit_seed: bool, seed: u64, module: &str) -> Pattern {
    match pattern {
        Pattern::Random { d, seed: s } => {
            Pattern::Random { d, seed: module_seed(if explicit_seed { s } else { seed }, module) }
        }
        other => other,
    }
}

/// The checksum of one module's metadata object: 64-bit FNV-1a over `key=value\n` for every
/// key but `meta_checksum`, in sorted key order, with strings as their UTF-8 text, integers in
/// decimal, booleans as `true`/`false` and other numbers as their f64 bit pattern in 16 hex
/// digits (nested values as compact JSON). Files record it per module so that no field a
/// loader acts on (weight name, pattern, dtype, sizes, the data checksum) can change unseen.
pub fn meta_checksum(obj: &Map<String, Value>) -> String {
    let mut keys: Vec<&String> = obj.keys().filter(|k| k.as_str() != "meta_checksum").collect();
    keys.sort();
    let mut h = Fnv1a::default();
    for k in keys {
        let v = match &obj[k] {
            Value::String(s) => s.clone(),
            Value::Bool(b) => b.to_string(),
            Value::Number(n) if n.is_u64() || n.is_i64() => n.to_string(),
            Value::Number(n) => format!("{:016x}", n.as_f64().unwrap_or(f64::NAN).to_bits()),
            other => other.to_string(),
        };
        h.write(format!("{k}={v}\n").as_bytes());
    }
    h.finish()
}

/// Checks a module's recorded `meta_checksum`.
pub(super) fn verify_meta(path: &Path, module: &str, obj: &Map<String, Value>) -> Result<()> {
    let recorded = obj
        .get("meta_checksum")
        .and_then(Value::as_str)
        .ok_or_else(|| file_err(path, format!("corrupt metadata: module `{module}` lacks its `meta_checksum`")))?;
    let actual = meta_checksum(obj);
    if actual != recorded {
        return Err(file_err(
            path,
            format!(
                "corrupt metadata: the fields of module `{module}` have checksum {actual} but the file records {recorded} \
                 (edited or damaged)"
            ),
        ));
    }
    Ok(())
}

/// Checks what every module entry of both formats must satisfy: its module name is its
/// weight's (so no two modules name one weight), its shape is non-empty and its rank fits.
pub(super) fn check_module_shape(f: &Fields<'_>, weight: &str, d_out: usize, d_in: usize, rank: usize) -> Result<()> {
    if module_name(weight) != f.module {
        return Err(file_err(
            f.path,
            format!("corrupt metadata: module `{}` names the weight `{weight}`, which is not its own", f.module),
        ));
    }
    if d_out == 0 || d_in == 0 || rank == 0 || rank > d_out.min(d_in) {
        return Err(file_err(
            f.path,
            format!("corrupt metadata: module `{}` is {d_out}x{d_in} of rank {rank}", f.module),
        ));
    }
    Ok(())
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
    if !meta.contains_key("file_checksum") {
        return Err(file_err(path, "corrupt metadata: no `file_checksum`"));
    }
    verify_file_checksum(path, ckpt)?;
    let modules = meta.get("modules").ok_or_else(|| file_err(path, "corrupt metadata: no `modules` entry"))?;
    let modules: Value = serde_json::from_str(modules)
        .map_err(|e| file_err(path, format!("corrupt metadata: `modules` is not valid JSON ({e})")))?;
    if !modules.is_object() {
        return Err(file_err(path, "corrupt metadata: `modules` is not a JSON object"));
    }
    Ok(modules)
}

/// The checksum of a whole `__metadata__` map: FNV-1a over `key=value\n` for every key but
/// `file_checksum`, in sorted order. It covers the file-level fields (`source`,
/// `storage_dtype`, `modules_to_save`, ...) that no module's checksum does.
pub fn file_checksum(metadata: &HashMap<String, String>) -> String {
    let mut keys: Vec<&String> = metadata.keys().filter(|k| k.as_str() != "file_checksum").collect();
    keys.sort();
    let mut h = Fnv1a::default();
    for k in keys {
        h.write(format!("{k}={}\n", metadata[k]).as_bytes());
    }
    h.finish()
}

/// Checks a file's recorded [`file_checksum`], when it records one (`svft inspect` also uses
/// it to tell a damaged SVFT file from a plain checkpoint).
pub fn verify_file_checksum(path: &Path, ckpt: &Checkpoint) -> Result<()> {
    let meta = ckpt.metadata();
    let Some(recorded) = meta.get("file_checksum") else { return Ok(()) };
    let actual = file_checksum(meta);
    if &actual != recorded {
        return Err(file_err(
            path,
            format!("corrupt metadata: it has checksum {actual} but the file records {recorded} (edited or damaged)"),
        ));
    }
    Ok(())
}

/// Adds the [`file_checksum`] of a metadata map about to be written.
pub(super) fn seal_file(metadata: &mut HashMap<String, String>) {
    let sum = file_checksum(metadata);
    metadata.insert("file_checksum".into(), sum);
}

/// Checks that every tensor of a file is one its metadata accounts for: `{module}.{suffix}` of
/// a listed module, or a name in the `modules_to_save` list (the Python package's extra
/// tensors). A tensor outside them means its module's entry was lost.
pub(super) fn check_accounted(path: &Path, ckpt: &Checkpoint, modules: &Value, suffixes: &[&str]) -> Result<()> {
    let extra: Vec<&str> = ckpt
        .metadata()
        .get("modules_to_save")
        .map(|s| s.split(',').filter(|x| !x.is_empty()).collect())
        .unwrap_or_default();
    let listed = modules.as_object().expect("checked");
    for e in ckpt.entries() {
        let known = e
            .name
            .rsplit_once('.')
            .is_some_and(|(module, suffix)| suffixes.contains(&suffix) && listed.contains_key(module))
            || extra.contains(&e.name.as_str());
        if !known {
            return Err(file_err(
                path,
                format!(
                    "corrupt: tensor `{}` belongs to no module of the file's metadata (an entry was lost?)",
                    e.name
                ),
            ));
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_seed_is_pinned() {
        // FNV-1a's published vectors, then splitmix64 on top. The Python twin
        // (python/tests/test_adapter_files.py) checks the same values: a change on either side
        // changes every random pattern and init ever saved, so it must be deliberate.
        let fnv = |s: &str| {
            let mut h = Fnv1a::default();
            h.write(s.as_bytes());
            h.0
        };
        assert_eq!(fnv(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv("foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(splitmix64(0), 0xe220_a839_7b1d_cdaf);
        assert_eq!(module_seed(0, ""), splitmix64(0xcbf2_9ce4_8422_2325));
        let names = ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.key", "fc1"];
        let seeds: Vec<u64> = names.iter().map(|n| module_seed(42, n)).collect();
        assert_eq!(seeds, vec![GOLDEN[0], GOLDEN[1], GOLDEN[2]], "{seeds:#x?}");
        // Distinct names, distinct seeds; another base seed, other seeds.
        assert!(seeds[0] != seeds[1] && seeds[1] != seeds[2]);
        assert_ne!(module_seed(43, names[0]), seeds[0]);
    }

    // module_seed(42, name) for the three names above (also pinned in the Python test).
    const GOLDEN: [u64; 3] = [0x9967_b7f4_c372_61c1, 0xfe88_6824_35df_a0a1, 0x300f_459b_e75a_e763];

    #[test]
    fn meta_checksum_is_pinned_and_covers_every_field() {
        // The Python twin (svft.files.meta_checksum, python/tests/test_adapter_files.py) pins
        // the same object to the same value.
        let obj = serde_json::json!({
            "weight": "fc1.weight", "d_out": 12, "d_in": 7, "rank": 7, "dtype": "bf16",
            "checksum": "fnv1a64:0123456789abcdef", "residual": 1.5e-7, "gate": true, "seed": u64::MAX,
            "meta_checksum": "ignored",
        });
        let obj = obj.as_object().unwrap();
        assert_eq!(meta_checksum(obj), "fnv1a64:95150d8bbf921c56");
        for key in obj.keys().filter(|k| *k != "meta_checksum") {
            let mut edited = obj.clone();
            edited[key] = serde_json::json!("other");
            assert_ne!(meta_checksum(&edited), meta_checksum(obj), "{key} is not covered");
        }
    }

    #[test]
    fn module_pattern_derives_random_seeds_only() {
        let name = "model.layers.3.mlp.up_proj";
        assert_eq!(module_pattern(Pattern::Banded { d: 2 }, false, 9, name), Pattern::Banded { d: 2 });
        assert_eq!(
            module_pattern(Pattern::Random { d: 4, seed: 0 }, false, 9, name),
            Pattern::Random { d: 4, seed: module_seed(9, name) }
        );
        assert_eq!(
            module_pattern(Pattern::Random { d: 4, seed: 7 }, true, 9, name),
            Pattern::Random { d: 4, seed: module_seed(7, name) }
        );
    }
}
