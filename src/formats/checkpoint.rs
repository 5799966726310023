//! Reading model checkpoints in the safetensors format: one file, or a sharded checkpoint (an
//! index JSON whose `weight_map` names a shard file per tensor). Only the header is read when a
//! checkpoint is opened; each tensor is read on demand with one seek, so a large model is never
//! held in memory whole. Weights in f32, bf16 and f16 convert to f32 (via `half`).
//!
//! Every problem with a file (missing, truncated, a header that is not JSON, offsets that do not
//! fit the file, a dtype that cannot be a weight) is an [`Error::File`] naming the file and what
//! is wrong with it.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use regex::Regex;
use safetensors::tensor::TensorInfo;
pub use safetensors::Dtype;

use crate::error::{Error, Result};
pub use crate::formats::writer::{check_not_an_input, write_safetensors, OwnedTensor};

/// Which 2-D weights are adapted unless `--targets` says otherwise: the attention and MLP
/// projections of the common transformer families (BERT, Llama/Mistral, GPT-2, GPT-NeoX,
/// OPT, Falcon, T5's `wi`/`wo` aside), never embeddings, norms, poolers or heads.
pub const DEFAULT_TARGETS: &str = r"(^|\.)(q_proj|k_proj|v_proj|o_proj|out_proj|qkv_proj|query|key|value|query_key_value|gate_proj|up_proj|down_proj|fc1|fc2|c_attn|c_proj|c_fc|dense_h_to_4h|dense_4h_to_h|wq|wk|wv|wo|w1|w2|w3|attention\.output\.dense|intermediate\.dense|output\.dense)\.weight$";

/// The largest header this reader accepts (the safetensors limit).
const MAX_HEADER: u64 = 100_000_000;

/// One tensor of a checkpoint: where it lives and what it holds.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    /// Its name in the checkpoint.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    shard: usize,
    /// Absolute byte offset of the data in the shard file.
    start: u64,
    /// Bytes of data.
    len: u64,
}

impl TensorEntry {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// `(rows, cols)` of a 2-D tensor.
    pub fn dims2(&self) -> Option<(usize, usize)> {
        match self.shape[..] {
            [rows, cols] => Some((rows, cols)),
            _ => None,
        }
    }
    /// Whether it is a floating-point type a weight can have (f32, bf16, f16).
    pub fn is_float_weight(&self) -> bool {
        matches!(self.dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16)
    }
}

#[derive(Debug, Clone)]
struct Shard {
    path: PathBuf,
}

/// An opened checkpoint (headers only).
#[derive(Debug, Clone)]
pub struct Checkpoint {
    path: PathBuf,
    shards: Vec<Shard>,
    entries: Vec<TensorEntry>,
    by_name: HashMap<String, usize>,
    metadata: HashMap<String, String>,
}

fn file_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::File { path: path.display().to_string(), reason: reason.into() }
}

fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::Io { path: path.display().to_string(), source }
}

/// The short name of a weight dtype as the CLI prints and parses it.
pub fn dtype_name(dtype: Dtype) -> String {
    match dtype {
        Dtype::F32 => "f32".into(),
        Dtype::BF16 => "bf16".into(),
        Dtype::F16 => "f16".into(),
        other => format!("{other:?}").to_ascii_lowercase(),
    }
}

/// Parses `f32`, `bf16` or `f16`.
pub fn parse_dtype(s: &str) -> Result<Dtype> {
    match s.to_ascii_lowercase().as_str() {
        "f32" | "float32" => Ok(Dtype::F32),
        "bf16" | "bfloat16" => Ok(Dtype::BF16),
        "f16" | "float16" | "half" => Ok(Dtype::F16),
        _ => Err(Error::InvalidArgument(format!("unknown dtype `{s}`: expected f32, bf16 or f16"))),
    }
}

/// Bytes per element, for whole-byte dtypes.
pub fn dtype_size(dtype: Dtype) -> usize {
    dtype.bitsize().div_ceil(8)
}

/// Converts little-endian f32/bf16/f16 bytes to f32.
pub fn bytes_to_f32(dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>> {
    let mut out = crate::alloc::try_with_capacity("f32 values", bytes.len() / dtype_size(dtype).max(1))?;
    match dtype {
        Dtype::F32 => out.extend(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
        Dtype::BF16 => {
            out.extend(bytes.chunks_exact(2).map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()))
        }
        Dtype::F16 => {
            out.extend(bytes.chunks_exact(2).map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()))
        }
        other => {
            return Err(Error::InvalidArgument(format!(
                "dtype {} is not a floating-point weight type (f32, bf16, f16)",
                dtype_name(other)
            )))
        }
    };
    Ok(out)
}

/// Converts f32 values to little-endian bytes of `dtype` (f32, bf16 or f16; round to nearest even).
pub fn f32_to_bytes(dtype: Dtype, values: &[f32]) -> Result<Vec<u8>> {
    let mut out = crate::alloc::try_with_capacity("tensor bytes", values.len().saturating_mul(dtype_size(dtype)))?;
    match dtype {
        Dtype::F32 => out.extend(values.iter().flat_map(|v| v.to_le_bytes())),
        Dtype::BF16 => out.extend(values.iter().flat_map(|&v| half::bf16::from_f32(v).to_bits().to_le_bytes())),
        Dtype::F16 => out.extend(values.iter().flat_map(|&v| half::f16::from_f32(v).to_bits().to_le_bytes())),
        other => {
            return Err(Error::InvalidArgument(format!(
                "cannot write weights as {}: expected f32, bf16 or f16",
                dtype_name(other)
            )))
        }
    };
    Ok(out)
}

/// Rounds f32 values through `dtype` (identity for f32).
pub fn round_through(dtype: Dtype, values: &mut [f32]) {
    match dtype {
        Dtype::BF16 => values.iter_mut().for_each(|v| *v = half::bf16::from_f32(*v).to_f32()),
        Dtype::F16 => values.iter_mut().for_each(|v| *v = half::f16::from_f32(*v).to_f32()),
        _ => {}
    }
}

/// Orders names so that `layer.2` comes before `layer.10` (digit runs compare as numbers).
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, _) => return Ordering::Less,
            (_, None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let da = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let db = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (na, nb) = (&a[..da], &b[..db]);
                let strip = |s: &[u8]| -> usize { s.iter().take_while(|&&c| c == b'0').count() };
                let (ta, tb) = (&na[strip(na)..], &nb[strip(nb)..]);
                let ord = ta.len().cmp(&tb.len()).then(ta.cmp(tb)).then(da.cmp(&db));
                if ord != Ordering::Equal {
                    return ord;
                }
                a = &a[da..];
                b = &b[db..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

/// Reads and checks the header of one safetensors file: its entries (absolute offsets) and
/// its `__metadata__`.
fn read_header(path: &Path, shard: usize) -> Result<(Vec<TensorEntry>, HashMap<String, String>)> {
    let mut file = File::open(path).map_err(|e| io_err(path, e))?;
    let file_len = file.metadata().map_err(|e| io_err(path, e))?.len();
    if file_len < 8 {
        return Err(file_err(path, format!("truncated or not a safetensors file: only {file_len} bytes")));
    }
    let mut n = [0u8; 8];
    file.read_exact(&mut n).map_err(|e| io_err(path, e))?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER {
        return Err(file_err(
            path,
            format!("corrupt header: it claims {n} bytes (more than the 100 MB limit); not a safetensors file?"),
        ));
    }
    if 8 + n > file_len {
        return Err(file_err(
            path,
            format!("truncated: the header alone should be {n} bytes but the file has {file_len} bytes in all"),
        ));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header).map_err(|e| io_err(path, e))?;
    let text =
        std::str::from_utf8(&header).map_err(|e| file_err(path, format!("corrupt header: not UTF-8 text ({e})")))?;
    let json: serde_json::Value =
        serde_json::from_str(text).map_err(|e| file_err(path, format!("corrupt header: not valid JSON ({e})")))?;
    let map = json.as_object().ok_or_else(|| file_err(path, "corrupt header: not a JSON object"))?;
    let data_start = 8 + n;
    let data_len = file_len - data_start;
    let mut metadata = HashMap::new();
    let mut entries = Vec::with_capacity(map.len());
    for (name, value) in map {
        if name == "__metadata__" {
            let meta =
                value.as_object().ok_or_else(|| file_err(path, "corrupt header: __metadata__ is not an object"))?;
            for (k, v) in meta {
                let v = v.as_str().ok_or_else(|| {
                    file_err(path, format!("corrupt header: __metadata__ value of `{k}` is not a string"))
                })?;
                metadata.insert(k.clone(), v.to_string());
            }
            continue;
        }
        let info: TensorInfo = serde_json::from_value(value.clone())
            .map_err(|e| file_err(path, format!("corrupt header: tensor `{name}`: {e}")))?;
        let (begin, end) = info.data_offsets;
        let numel = info.shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        let expected = numel.and_then(|n| n.checked_mul(info.dtype.bitsize())).map(|bits| bits.div_ceil(8));
        if end < begin || Some(end - begin) != expected {
            return Err(file_err(
                path,
                format!(
                    "corrupt header: tensor `{name}` ({:?} {:?}) spans bytes {begin}..{end}, which does not fit its shape",
                    info.dtype, info.shape
                ),
            ));
        }
        if end as u64 > data_len {
            return Err(file_err(
                path,
                format!(
                    "truncated: tensor `{name}` ends at data byte {end} but the file holds only {data_len} data bytes"
                ),
            ));
        }
        entries.push(TensorEntry {
            name: name.clone(),
            dtype: info.dtype,
            shape: info.shape,
            shard,
            start: data_start + begin as u64,
            len: (end - begin) as u64,
        });
    }
    Ok((entries, metadata))
}

impl Checkpoint {
    /// Opens a checkpoint: a `.safetensors` file, a sharded checkpoint's index JSON
    /// (`model.safetensors.index.json`), a path `P` for which `P.index.json` exists, or a
    /// directory holding `model.safetensors` or `model.safetensors.index.json`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if path.is_dir() {
            for name in ["model.safetensors", "model.safetensors.index.json"] {
                if path.join(name).is_file() {
                    return Self::open(path.join(name));
                }
            }
            return Err(file_err(path, "directory holds neither model.safetensors nor model.safetensors.index.json"));
        }
        let is_index = path.extension().is_some_and(|e| e == "json");
        if !is_index && !path.exists() {
            let index = PathBuf::from(format!("{}.index.json", path.display()));
            if index.is_file() {
                return Self::open_index(&index);
            }
        }
        if is_index {
            Self::open_index(path)
        } else {
            let (entries, metadata) = read_header(path, 0)?;
            Ok(Self::build(path, vec![Shard { path: path.to_path_buf() }], entries, metadata))
        }
    }

    fn open_index(index: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index).map_err(|e| io_err(index, e))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| file_err(index, format!("corrupt checkpoint index: not valid JSON ({e})")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| file_err(index, "corrupt checkpoint index: no `weight_map` object"))?;
        let dir = index.parent().unwrap_or_else(|| Path::new("."));
        let mut shard_names: Vec<String> = Vec::new();
        for (tensor, shard) in map {
            let shard = shard.as_str().ok_or_else(|| {
                file_err(index, format!("corrupt checkpoint index: shard of `{tensor}` is not a string"))
            })?;
            // A shard lives beside its index: a path that leaves the folder is not a shard.
            let plain = Path::new(shard).components().all(|c| matches!(c, std::path::Component::Normal(_)));
            if !plain {
                return Err(file_err(
                    index,
                    format!(
                        "corrupt checkpoint index: shard `{shard}` of `{tensor}` is not a file name beside the index"
                    ),
                ));
            }
            if !shard_names.iter().any(|s| s == shard) {
                shard_names.push(shard.to_string());
            }
        }
        shard_names.sort_by(|a, b| natural_cmp(a, b));
        let mut shards = Vec::new();
        let mut entries = Vec::new();
        let mut metadata = HashMap::new();
        for (i, name) in shard_names.iter().enumerate() {
            let path = dir.join(name);
            let (e, m) = read_header(&path, i)?;
            entries.extend(e);
            metadata.extend(m);
            shards.push(Shard { path });
        }
        for (tensor, shard) in map {
            let found = entries
                .iter()
                .any(|e| &e.name == tensor && shards[e.shard].path == dir.join(shard.as_str().unwrap_or_default()));
            if !found {
                return Err(file_err(
                    index,
                    format!("tensor `{tensor}` is listed in shard {shard} but that shard lacks it"),
                ));
            }
        }
        Ok(Self::build(index, shards, entries, metadata))
    }

    fn build(
        path: &Path,
        shards: Vec<Shard>,
        mut entries: Vec<TensorEntry>,
        metadata: HashMap<String, String>,
    ) -> Self {
        entries.sort_by(|a, b| natural_cmp(&a.name, &b.name));
        entries.dedup_by(|a, b| a.name == b.name);
        let by_name = entries.iter().enumerate().map(|(i, e)| (e.name.clone(), i)).collect();
        Checkpoint { path: path.to_path_buf(), shards, entries, by_name, metadata }
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Every file it was read from: the index (if sharded) and each shard.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = self.shards.iter().map(|s| s.path.clone()).collect();
        if !files.contains(&self.path) {
            files.insert(0, self.path.clone());
        }
        files
    }
    /// Number of shard files (1 for a single file).
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }
    /// Every tensor, in natural name order.
    pub fn entries(&self) -> &[TensorEntry] {
        &self.entries
    }
    /// One tensor's entry.
    pub fn get(&self, name: &str) -> Option<&TensorEntry> {
        self.by_name.get(name).map(|&i| &self.entries[i])
    }
    /// The `__metadata__` string map (merged over shards).
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    fn entry(&self, name: &str) -> Result<&TensorEntry> {
        self.get(name).ok_or_else(|| file_err(&self.path, format!("no tensor named `{name}`")))
    }

    /// The raw little-endian bytes of a tensor.
    pub fn read_bytes(&self, name: &str) -> Result<Vec<u8>> {
        let e = self.entry(name)?;
        let path = &self.shards[e.shard].path;
        let mut file = File::open(path).map_err(|err| io_err(path, err))?;
        file.seek(SeekFrom::Start(e.start)).map_err(|err| io_err(path, err))?;
        let len = usize::try_from(e.len).map_err(|_| file_err(path, format!("tensor `{name}` exceeds memory")))?;
        let mut buf = crate::alloc::try_zeroed(&format!("tensor `{name}` of {}", path.display()), len)?;
        file.read_exact(&mut buf).map_err(|err| {
            if err.kind() == std::io::ErrorKind::UnexpectedEof {
                file_err(path, format!("truncated while reading tensor `{name}`"))
            } else {
                io_err(path, err)
            }
        })?;
        Ok(buf)
    }

    /// A floating-point tensor (f32, bf16 or f16) as f32.
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let e = self.entry(name)?;
        if !e.is_float_weight() {
            return Err(file_err(
                &self.path,
                format!("tensor `{name}` is {}, not a floating-point weight (f32, bf16, f16)", dtype_name(e.dtype)),
            ));
        }
        bytes_to_f32(e.dtype, &self.read_bytes(name)?)
    }

    /// An i64 tensor.
    pub fn read_i64(&self, name: &str) -> Result<Vec<i64>> {
        let e = self.entry(name)?;
        if e.dtype != Dtype::I64 {
            return Err(file_err(&self.path, format!("tensor `{name}` is {}, expected i64", dtype_name(e.dtype))));
        }
        let bytes = self.read_bytes(name)?;
        Ok(bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect())
    }

    /// The 2-D floating-point weights whose names match `targets`, in natural order.
    pub fn targets(&self, targets: &Regex) -> Vec<&TensorEntry> {
        self.entries
            .iter()
            .filter(|e| e.dims2().is_some() && e.is_float_weight() && targets.is_match(&e.name))
            .collect()
    }
}

/// Compiles a `--targets` regex, or the [`DEFAULT_TARGETS`] when `None`.
pub fn target_regex(spec: Option<&str>) -> Result<Regex> {
    let spec = spec.unwrap_or(DEFAULT_TARGETS);
    Regex::new(spec).map_err(|e| Error::InvalidArgument(format!("invalid --targets regex `{spec}`: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order() {
        let mut v = vec!["layer.10.q", "layer.2.q", "layer.1.q", "layer.02.k", "a"];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(v, ["a", "layer.1.q", "layer.2.q", "layer.02.k", "layer.10.q"]);
    }

    #[test]
    fn default_targets_pick_projections_only() {
        let re = target_regex(None).unwrap();
        for yes in [
            "encoder.layer.0.attention.self.query.weight",
            "encoder.layer.0.attention.output.dense.weight",
            "encoder.layer.0.intermediate.dense.weight",
            "encoder.layer.0.output.dense.weight",
            "model.layers.3.self_attn.q_proj.weight",
            "model.layers.3.mlp.down_proj.weight",
            "h.0.attn.c_attn.weight",
        ] {
            assert!(re.is_match(yes), "{yes}");
        }
        for no in [
            "pooler.dense.weight",
            "embeddings.word_embeddings.weight",
            "encoder.layer.0.output.LayerNorm.weight",
            "encoder.layer.0.attention.self.query.bias",
            "lm_head.weight",
        ] {
            assert!(!re.is_match(no), "{no}");
        }
    }

    #[test]
    fn half_conversions_round_trip() {
        let v = [1.0f32, -2.5, 0.15625, 65504.0];
        for dt in [Dtype::F32, Dtype::BF16, Dtype::F16] {
            let mut r = v;
            round_through(dt, &mut r);
            assert_eq!(bytes_to_f32(dt, &f32_to_bytes(dt, &v).unwrap()).unwrap(), r);
        }
    }
}
