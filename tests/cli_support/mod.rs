//! Helpers shared by the `tests/cli_*.rs` integration tests: running the binary, writing small
//! safetensors checkpoints by hand (independently of the crate's own writer), and editing files.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The address-space limit (KiB, `ulimit -v`) the spawned `svft` runs under: 6 GiB, or
/// `$SVFT_TEST_MEM_LIMIT_KIB` (0: no limit). An allocation bigger than that fails inside the
/// process (an error, or an abort that fails the test), as on a machine without the memory,
/// instead of passing on a big machine or swapping on a small one.
pub fn mem_limit_kib() -> u64 {
    std::env::var("SVFT_TEST_MEM_LIMIT_KIB").ok().and_then(|v| v.parse().ok()).unwrap_or(6 << 20)
}

/// `program` under [`mem_limit_kib`]: `sh -c 'ulimit -v N && exec "$0" "$@"' program ARGS`.
/// glibc keeps up to 8 malloc arenas per core, 64 MiB of address space each: capped at 4 here
/// so that the limit does not depend on the machine's core count.
pub fn limited(program: impl AsRef<OsStr>) -> Command {
    let kib = mem_limit_kib();
    if kib == 0 {
        return Command::new(program);
    }
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(format!("ulimit -v {kib} && exec \"$0\" \"$@\"")).arg(program);
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        cmd.env("MALLOC_ARENA_MAX", "4");
    }
    cmd
}

/// Runs `svft` with these arguments in `cwd` (or the current directory), under [`limited`].
pub fn svft_in(cwd: Option<&Path>, args: &[&str]) -> Output {
    let mut cmd = limited(env!("CARGO_BIN_EXE_svft"));
    cmd.args(args);
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    cmd.output().expect("run svft")
}

/// Runs `svft` and returns stdout, failing the test with stderr when it fails.
pub fn svft_ok(args: &[&str]) -> String {
    let out = svft_in(None, args);
    assert!(out.status.success(), "svft {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// Runs `svft` with `--json` output and parses it.
pub fn svft_json(args: &[&str]) -> serde_json::Value {
    let out = svft_ok(args);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("svft {args:?}: not one JSON object ({e}):\n{out}"))
}

/// Runs `svft`, expects failure, and returns stderr.
pub fn svft_err(args: &[&str]) -> String {
    let out = svft_in(None, args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "svft {args:?} succeeded; stdout:\n{}", String::from_utf8_lossy(&out.stdout));
    assert!(err.contains("error"), "svft {args:?}: {err}");
    err
}

/// A fresh directory under the target dir's tmp, removed first if it exists.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("svft-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Element types the hand-written checkpoints use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dt {
    F32,
    BF16,
    F16,
    I64,
}

impl Dt {
    fn name(self) -> &'static str {
        match self {
            Dt::F32 => "F32",
            Dt::BF16 => "BF16",
            Dt::F16 => "F16",
            Dt::I64 => "I64",
        }
    }
    /// The little-endian bytes of these values in this dtype.
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            Dt::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Dt::BF16 => values.iter().flat_map(|&v| half::bf16::from_f32(v).to_bits().to_le_bytes()).collect(),
            Dt::F16 => values.iter().flat_map(|&v| half::f16::from_f32(v).to_bits().to_le_bytes()).collect(),
            Dt::I64 => values.iter().flat_map(|&v| (v as i64).to_le_bytes()).collect(),
        }
    }
    /// The values as this dtype stores them, back in f32.
    pub fn round(self, values: &[f32]) -> Vec<f32> {
        match self {
            Dt::F32 | Dt::I64 => values.to_vec(),
            Dt::BF16 => values.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect(),
            Dt::F16 => values.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect(),
        }
    }
}

/// One tensor of a hand-written checkpoint.
#[derive(Clone, Debug)]
pub struct T {
    pub name: String,
    pub dt: Dt,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// Deterministic pseudo-random values in [-1, 1).
pub fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// A small BERT-shaped checkpoint: `layers` blocks of hidden `h` and MLP `4h`, with the tensors
/// that must not be adapted (embeddings, norms, biases, pooler, an i64 buffer).
pub fn bert_tensors(layers: usize, h: usize, dt: Dt) -> Vec<T> {
    let f = 4 * h;
    let mut out = vec![
        T {
            name: "embeddings.position_ids".into(),
            dt: Dt::I64,
            shape: vec![1, 8],
            values: (0..8).map(|i| i as f32).collect(),
        },
        T { name: "embeddings.word_embeddings.weight".into(), dt, shape: vec![50, h], values: values(50 * h, 1) },
        T { name: "embeddings.LayerNorm.weight".into(), dt, shape: vec![h], values: vec![1.0; h] },
        T { name: "pooler.dense.weight".into(), dt, shape: vec![h, h], values: values(h * h, 2) },
    ];
    let mut seed = 10;
    for l in 0..layers {
        for (name, d_out, d_in) in [
            ("attention.self.query", h, h),
            ("attention.self.key", h, h),
            ("attention.self.value", h, h),
            ("attention.output.dense", h, h),
            ("intermediate.dense", f, h),
            ("output.dense", h, f),
        ] {
            seed += 1;
            out.push(T {
                name: format!("encoder.layer.{l}.{name}.weight"),
                dt,
                shape: vec![d_out, d_in],
                values: values(d_out * d_in, seed),
            });
            out.push(T {
                name: format!("encoder.layer.{l}.{name}.bias"),
                dt,
                shape: vec![d_out],
                values: values(d_out, seed + 1000),
            });
        }
        out.push(T {
            name: format!("encoder.layer.{l}.output.LayerNorm.weight"),
            dt,
            shape: vec![h],
            values: vec![1.0; h],
        });
    }
    out
}

/// The 2-D projection weights of [`bert_tensors`] (what the default targets pick).
pub fn projection_names(tensors: &[T]) -> Vec<String> {
    tensors.iter().filter(|t| t.name.starts_with("encoder.") && t.shape.len() == 2).map(|t| t.name.clone()).collect()
}

/// Writes a safetensors file by hand: 8-byte little-endian header length, the JSON header
/// (padded with spaces to 8 bytes), the data in the order given.
pub fn write_checkpoint(path: &Path, tensors: &[T], metadata: Option<serde_json::Value>) {
    let mut header = serde_json::Map::new();
    if let Some(m) = metadata {
        header.insert("__metadata__".into(), m);
    }
    let mut data = Vec::new();
    for t in tensors {
        let bytes = t.dt.encode(&t.values);
        assert_eq!(
            bytes.len(),
            t.shape.iter().product::<usize>()
                * if t.dt == Dt::F32 {
                    4
                } else if t.dt == Dt::I64 {
                    8
                } else {
                    2
                }
        );
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": t.dt.name(), "shape": t.shape, "data_offsets": [data.len(), data.len() + bytes.len()]}),
        );
        data.extend(bytes);
    }
    let mut h = serde_json::Value::Object(header).to_string().into_bytes();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut file = (h.len() as u64).to_le_bytes().to_vec();
    file.extend(h);
    file.extend(data);
    std::fs::write(path, file).unwrap();
}

/// Writes a sharded checkpoint: `model-0000i-of-0000n.safetensors` and
/// `model.safetensors.index.json`, the tensors split into `shards` parts; returns the index path.
pub fn write_sharded(dir: &Path, tensors: &[T], shards: usize) -> PathBuf {
    let per = tensors.len().div_ceil(shards);
    let mut map = serde_json::Map::new();
    for (i, chunk) in tensors.chunks(per).enumerate() {
        let name = format!("model-{:05}-of-{:05}.safetensors", i + 1, shards);
        write_checkpoint(&dir.join(&name), chunk, Some(serde_json::json!({"format": "pt"})));
        for t in chunk {
            map.insert(t.name.clone(), serde_json::json!(name));
        }
    }
    let index = dir.join("model.safetensors.index.json");
    let v = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(&index, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    index
}

/// Rewrites a safetensors file's JSON header through `edit` (the data is kept as is).
pub fn edit_header(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let mut h = header.to_string().into_bytes();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(path, out).unwrap();
}

/// Edits one key of the `__metadata__` of a safetensors file.
pub fn set_metadata(path: &Path, key: &str, value: &str) {
    edit_header(path, |h| {
        h["__metadata__"][key] = serde_json::json!(value);
    });
}

/// A path as `&str`.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
