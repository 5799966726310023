//! Seeded mutation fuzzing of every file svft reads, on the stable toolchain (issue 15: bad input
//! loses nothing). Real files are written by the CLI in a temporary folder (a small checkpoint,
//! single and sharded, its factor file, two adapters and the merged checkpoint), then mutated:
//! truncation, bit flips (length prefix, header, data), overwritten byte runs, structured edits
//! of the JSON header and of the metadata JSON inside it (numbers to 0, -1, 2^62, u64::MAX,
//! floats, strings; keys deleted, duplicated, renamed; values swapped between modules; modules
//! renamed; pattern specs and dtypes changed), shard index edits, and crafted files whose
//! checksums are recomputed (so that the checks behind the checksums are reached: rank 0,
//! huge dimensions, non-finite and extreme values).
//!
//! Two levels run each mutated input:
//! - in-process (`lib:*`): the library loaders, `Checkpoint::open` and every tensor,
//!   `FactorFile::open` and `load`, `Adapter::load`, then `to_layer`, a merge and a forward,
//!   under `catch_unwind`;
//! - subprocess (`cli:*`): `svft inspect`, `init-adapter`, `merge` (and `decompose` on extreme
//!   weights, and out-of-range sizes on every subcommand), under `ulimit -v`.
//!
//! Every input is classified: accepted with exactly the original result ("same"), accepted as a
//! different but faithfully read input ("other": a checkpoint has no checksum, so a flipped
//! weight bit is another valid checkpoint; it must then read as an independent decoder reads
//! it; crafted inputs with recomputed checksums), a clean error, a panic, an abort (killed by a
//! signal: allocation failure, SIGSEGV), a hang, or a wrong result (accepted, but not what the
//! input says). The oracle for svft's own formats is strict: an accepted mutation must give
//! exactly what the original gives.
//!
//! In-process targets run in a worker process (this test binary re-run with
//! `SVFT_FUZZ_WORKER`) under `ulimit -v`, so that an abort costs one input, not the run: the
//! worker logs each input before it runs it, and the parent restarts it after the one that
//! killed it.
//!
//! Knobs: `SVFT_FUZZ_SECONDS` (wall-clock budget, default 60, split over the targets),
//! `SVFT_FUZZ_SEED` (default below; printed, with every failure's index, to reproduce it),
//! `SVFT_FUZZ_TARGETS` (comma-separated target names or prefixes), `SVFT_FUZZ_REPRO`
//! (`target:index` runs that one input), `SVFT_FUZZ_REPORT_ONLY=1` (print the table without
//! failing: for iterating only). Failing inputs are saved under the corpus folder's
//! `failures/` (printed).

mod cli_support;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cli_support::{bert_tensors, limited, mem_limit_kib, s, svft_ok, temp_dir, write_checkpoint, write_sharded, Dt};
use serde_json::{json, Value};
use svft::adapter::{factors_checksum, file_checksum, meta_checksum, Adapter, FactorFile, FactorInfo};
use svft::checkpoint::{dtype_name, Checkpoint, Dtype};
use svft::rng::Rng;
use svft::svd::Factors;

const DEFAULT_SEED: u64 = 0x5EED_F022_2024;
/// A CLI run longer than this is a hang (the inputs are tiny: a run takes milliseconds).
const CLI_TIMEOUT: Duration = Duration::from_secs(20);
/// Failing inputs kept per target and class.
const KEEP: usize = 3;

const TARGETS: [&str; 14] = [
    "lib:model",
    "lib:sharded",
    "lib:merged",
    "lib:factors",
    "lib:adapter",
    "lib:extreme",
    "cli:inspect",
    "cli:init-adapter",
    "cli:merge-factors",
    "cli:merge-adapter",
    "cli:merge-model",
    "cli:extreme",
    "cli:decompose-extreme",
    "cli:args",
];

// ---------------------------------------------------------------------------------------------
// Outcomes

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    Same,
    Other,
    Clean,
    Panic,
    Abort,
    Hang,
    Wrong,
}

impl Class {
    const ALL: [Class; 7] =
        [Class::Same, Class::Other, Class::Clean, Class::Panic, Class::Abort, Class::Hang, Class::Wrong];
    fn name(self) -> &'static str {
        match self {
            Class::Same => "same",
            Class::Other => "other",
            Class::Clean => "clean",
            Class::Panic => "panic",
            Class::Abort => "abort",
            Class::Hang => "hang",
            Class::Wrong => "wrong",
        }
    }
    fn parse(s: &str) -> Option<Class> {
        Class::ALL.into_iter().find(|c| c.name() == s)
    }
    fn failure(self) -> bool {
        matches!(self, Class::Panic | Class::Abort | Class::Hang | Class::Wrong)
    }
}

type Outcome = (Class, String);

fn same() -> Outcome {
    (Class::Same, String::new())
}
fn other(why: impl Into<String>) -> Outcome {
    (Class::Other, why.into())
}
fn clean(why: impl Into<String>) -> Outcome {
    (Class::Clean, why.into())
}
fn wrong(why: impl Into<String>) -> Outcome {
    (Class::Wrong, why.into())
}

/// One line, no tabs, bounded: for the log and the report.
fn oneline(s: &str) -> String {
    let s: String = s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if s.chars().count() > 300 {
        format!("{}...", s.chars().take(300).collect::<String>())
    } else {
        s
    }
}

// ---------------------------------------------------------------------------------------------
// The independent reference decoder (the oracle for checkpoints, which carry no checksum)

/// A decoded safetensors file: metadata and tensors (dtype, shape, bytes).
#[derive(Debug, Clone, PartialEq, Default)]
struct St {
    meta: BTreeMap<String, String>,
    tensors: BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>,
}

/// Decodes a safetensors file as its specification says, written here without svft's reader:
/// an 8-byte little-endian header length (at most 100 MB), a UTF-8 JSON object header,
/// `__metadata__` a map of strings, each tensor's bytes `data_offsets` into the data, of the
/// exact size its dtype and shape need.
fn decode_st(bytes: &[u8]) -> Result<St, String> {
    let n = u64::from_le_bytes(bytes.get(..8).ok_or("shorter than 8 bytes")?.try_into().unwrap());
    if n > 100_000_000 || 8 + n > bytes.len() as u64 {
        return Err(format!("header length {n} does not fit"));
    }
    let data = &bytes[8 + n as usize..];
    let text = std::str::from_utf8(&bytes[8..8 + n as usize]).map_err(|e| e.to_string())?;
    let header: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let header = header.as_object().ok_or("header is not an object")?;
    let mut st = St::default();
    for (name, v) in header {
        if name == "__metadata__" {
            for (k, v) in v.as_object().ok_or("__metadata__ is not an object")? {
                st.meta.insert(k.clone(), v.as_str().ok_or("metadata value is not a string")?.to_string());
            }
            continue;
        }
        let o = v.as_object().ok_or("tensor info is not an object")?;
        let dtype: Dtype =
            serde_json::from_value(o.get("dtype").ok_or("no dtype")?.clone()).map_err(|e| e.to_string())?;
        let shape: Vec<usize> = o
            .get("shape")
            .and_then(Value::as_array)
            .ok_or("no shape")?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()).ok_or("bad dimension"))
            .collect::<Result<_, _>>()?;
        let offs = o.get("data_offsets").and_then(Value::as_array).ok_or("no data_offsets")?;
        let (b, e) = match offs[..] {
            [ref b, ref e] => (b.as_u64().ok_or("bad offset")?, e.as_u64().ok_or("bad offset")?),
            _ => return Err("data_offsets is not a pair".into()),
        };
        let bits = shape.iter().try_fold(dtype.bitsize() as u128, |a, &d| a.checked_mul(d as u128));
        let size = bits.map(|b| b.div_ceil(8)).ok_or("size overflows")?;
        if b > e || (e - b) as u128 != size || e > data.len() as u64 {
            return Err(format!("tensor `{name}`: offsets {b}..{e} do not fit"));
        }
        st.tensors.insert(name.clone(), (dtype, shape, data[b as usize..e as usize].to_vec()));
    }
    Ok(st)
}

/// Decodes a sharded checkpoint from its index: every shard the `weight_map` names (a plain file
/// name in the index's folder), the tensors of all of them; a tensor in several shards is read
/// from the one the map names. Metadata merges over the shards in natural name order.
fn decode_sharded(index: &Path) -> Result<St, String> {
    let json: Value =
        serde_json::from_slice(&std::fs::read(index).map_err(|e| e.to_string())?).map_err(|e| format!("index: {e}"))?;
    let map = json.get("weight_map").and_then(Value::as_object).ok_or("no weight_map")?;
    let dir = index.parent().unwrap();
    let mut names: Vec<String> = Vec::new();
    for v in map.values() {
        let name = shard_name(v.as_str().ok_or("shard name is not a string")?)?;
        if !names.contains(&name) {
            names.push(name);
        }
    }
    names.sort_by(|a, b| svft::checkpoint::natural_cmp(a, b));
    let mut shards = HashMap::new();
    let mut st = St::default();
    let mut seen: HashMap<String, Vec<String>> = HashMap::new();
    for name in &names {
        let bytes = std::fs::read(dir.join(name)).map_err(|e| format!("{name}: {e}"))?;
        let sh = decode_st(&bytes).map_err(|e| format!("{name}: {e}"))?;
        st.meta.extend(sh.meta.clone());
        for t in sh.tensors.keys() {
            seen.entry(t.clone()).or_default().push(name.clone());
        }
        shards.insert(name.clone(), sh);
    }
    for (t, in_shards) in &seen {
        let from = match map.get(t).and_then(Value::as_str) {
            Some(s) => shard_name(s)?,
            None if in_shards.len() == 1 => in_shards[0].clone(),
            None => return Err(format!("tensor `{t}` is in several shards and not in the map")),
        };
        let tensor = shards[&from].tensors.get(t).ok_or(format!("shard {from} lacks `{t}`"))?;
        st.tensors.insert(t.clone(), tensor.clone());
    }
    for t in map.keys() {
        if !st.tensors.contains_key(t) {
            return Err(format!("`{t}` is in the map but in no shard"));
        }
    }
    Ok(st)
}

/// A shard's file name as the index gives it: a path relative to the index's folder that stays
/// inside it (`./x` is `x`; absolute paths and `..` are refused).
fn shard_name(name: &str) -> Result<String, String> {
    use std::path::Component;
    let mut parts = Vec::new();
    for c in Path::new(name).components() {
        match c {
            Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
            Component::CurDir => {}
            _ => return Err(format!("shard `{name}` is not a file in the checkpoint's folder")),
        }
    }
    if parts.is_empty() {
        return Err(format!("shard `{name}` names no file"));
    }
    Ok(parts.join("/"))
}

fn decode_path(path: &Path) -> Result<St, String> {
    if path.extension().is_some_and(|e| e == "json") {
        decode_sharded(path)
    } else {
        decode_st(&std::fs::read(path).map_err(|e| e.to_string())?)
    }
}

/// What differs between two decoded files (None: nothing).
fn st_diff(got: &St, want: &St) -> Option<String> {
    for (k, v) in &want.meta {
        match got.meta.get(k) {
            None => return Some(format!("metadata `{k}` missing")),
            Some(g) if k == "modules" => {
                let (g, w): (Value, Value) =
                    (serde_json::from_str(g).unwrap_or(Value::Null), serde_json::from_str(v).unwrap_or(Value::Null));
                if g != w {
                    return Some(format!("metadata modules differ: {}", json_diff(&g, &w, "modules")));
                }
            }
            Some(g) if g != v => return Some(format!("metadata `{k}` is {g:?}, expected {v:?}")),
            _ => {}
        }
    }
    if let Some(k) = got.meta.keys().find(|k| !want.meta.contains_key(*k)) {
        return Some(format!("extra metadata `{k}`"));
    }
    for (name, (dt, shape, bytes)) in &want.tensors {
        match got.tensors.get(name) {
            None => return Some(format!("tensor `{name}` missing")),
            Some((gdt, gshape, gbytes)) => {
                if (gdt, gshape) != (dt, shape) {
                    return Some(format!("tensor `{name}` is {gdt:?} {gshape:?}, expected {dt:?} {shape:?}"));
                }
                if gbytes != bytes {
                    let at = gbytes.iter().zip(bytes).position(|(a, b)| a != b).unwrap_or(0);
                    return Some(format!("tensor `{name}` differs from byte {at}"));
                }
            }
        }
    }
    got.tensors.keys().find(|k| !want.tensors.contains_key(*k)).map(|k| format!("extra tensor `{k}`"))
}

/// The first difference between two JSON values, by path.
fn json_diff(got: &Value, want: &Value, at: &str) -> String {
    match (got, want) {
        (Value::Object(g), Value::Object(w)) => {
            for (k, wv) in w {
                match g.get(k) {
                    None => return format!("{at}.{k} missing"),
                    Some(gv) if gv != wv => return json_diff(gv, wv, &format!("{at}.{k}")),
                    _ => {}
                }
            }
            g.keys().find(|k| !w.contains_key(*k)).map(|k| format!("{at}.{k} extra")).unwrap_or_default()
        }
        _ => format!("{at} is {got}, expected {want}"),
    }
}

// ---------------------------------------------------------------------------------------------
// What svft's loaders read

/// A checkpoint through `Checkpoint::open` and every tensor (read as bytes, and as f32 or i64
/// where its dtype allows), as an [`St`].
fn load_ckpt(path: &Path) -> Result<St, String> {
    let ck = Checkpoint::open(path).map_err(|e| e.to_string())?;
    let mut st = St { meta: ck.metadata().iter().map(|(k, v)| (k.clone(), v.clone())).collect(), ..St::default() };
    for e in ck.entries() {
        let bytes = ck.read_bytes(&e.name).map_err(|e| e.to_string())?;
        if e.is_float_weight() {
            let v = ck.read_f32(&e.name).map_err(|e| e.to_string())?;
            if v.len() != e.numel() {
                return Err(format!(
                    "BUG: read_f32 of `{}` gave {} values for {} elements",
                    e.name,
                    v.len(),
                    e.numel()
                ));
            }
        } else if e.dtype == Dtype::I64 {
            ck.read_i64(&e.name).map_err(|e| e.to_string())?;
        }
        st.tensors.insert(e.name.clone(), (e.dtype, e.shape.clone(), bytes));
    }
    Ok(st)
}

/// A factor file as read: its modules' infos, source, storage dtype and every module's factors.
#[derive(Debug, Clone, PartialEq)]
struct FactorContent {
    infos: Vec<FactorInfo>,
    source: Option<String>,
    storage: Option<Dtype>,
    factors: Vec<Factors>,
}

fn load_factors(path: &Path) -> Result<FactorContent, String> {
    let ff = FactorFile::open(path).map_err(|e| e.to_string())?;
    let factors = ff.modules().iter().map(|m| ff.load(&m.module)).collect::<Result<Vec<_>, _>>();
    Ok(FactorContent {
        infos: ff.modules().to_vec(),
        source: ff.source().map(str::to_string),
        storage: ff.storage_dtype(),
        factors: factors.map_err(|e| e.to_string())?,
    })
}

fn factors_eq(a: &Factors, b: &Factors) -> bool {
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    (a.d_out, a.d_in, a.r) == (b.d_out, b.d_in, b.r)
        && bits(&a.u) == bits(&b.u)
        && bits(&a.s) == bits(&b.s)
        && bits(&a.v) == bits(&b.v)
}

fn factor_diff(got: &FactorContent, want: &FactorContent) -> Option<String> {
    if got.infos.len() != want.infos.len() {
        return Some(format!("{} modules, expected {}", got.infos.len(), want.infos.len()));
    }
    for (g, w) in got.infos.iter().zip(&want.infos) {
        if g != w {
            let (gj, wj) = (format!("{g:?}"), format!("{w:?}"));
            let fields = [
                ("module", g.module != w.module),
                ("weight", g.weight != w.weight),
                ("d_out", g.d_out != w.d_out),
                ("d_in", g.d_in != w.d_in),
                ("rank", g.rank != w.rank),
                ("dtype", g.dtype != w.dtype),
                ("checksum", g.checksum != w.checksum),
                ("residual", g.residual.to_bits() != w.residual.to_bits()),
            ];
            let which: Vec<&str> = fields.iter().filter(|f| f.1).map(|f| f.0).collect();
            return Some(format!("factor info {which:?} of `{}` differs: {gj} vs {wj}", w.module));
        }
    }
    if got.source != want.source {
        return Some(format!("source {:?}, expected {:?}", got.source, want.source));
    }
    if got.storage != want.storage {
        return Some(format!("storage dtype {:?}, expected {:?}", got.storage, want.storage));
    }
    got.factors
        .iter()
        .zip(&want.factors)
        .zip(&want.infos)
        .find(|((g, w), _)| !factors_eq(g, w))
        .map(|(_, info)| format!("factors of `{}` differ", info.module))
}

fn adapter_diff(got: &Adapter, want: &Adapter) -> Option<String> {
    if got.modules.len() != want.modules.len() {
        return Some(format!("{} modules, expected {}", got.modules.len(), want.modules.len()));
    }
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for (g, w) in got.modules.iter().zip(&want.modules) {
        let fields = [
            ("module", g.module != w.module),
            ("weight", g.weight != w.weight),
            ("pattern", g.pattern != w.pattern),
            ("init", g.init != w.init),
            ("gate", g.gate != w.gate),
            ("seed", g.seed != w.seed),
            ("d_out", g.d_out != w.d_out),
            ("d_in", g.d_in != w.d_in),
            ("rank", g.rank != w.rank),
            ("dtype", g.dtype != w.dtype),
            ("base_checksum", g.base_checksum != w.base_checksum),
            ("rows", g.rows != w.rows),
            ("cols", g.cols != w.cols),
            ("coefficients", bits(&g.coefficients) != bits(&w.coefficients)),
            ("gamma", g.gamma.to_bits() != w.gamma.to_bits()),
        ];
        let which: Vec<&str> = fields.iter().filter(|f| f.1).map(|f| f.0).collect();
        if !which.is_empty() {
            let show = |m: &svft::adapter::AdapterModule| {
                format!(
                    "{} weight={} pattern={} init={} gate={} seed={} {}x{} r={} dtype={:?}",
                    m.module, m.weight, m.pattern, m.init, m.gate, m.seed, m.d_out, m.d_in, m.rank, m.dtype
                )
            };
            return Some(format!("adapter {which:?} differ: got {} / expected {}", show(g), show(w)));
        }
    }
    None
}

/// The adapter through the whole library pipeline on `factors`: check_base, to_layer, a merge
/// and a forward of a fixed input; per module (weight, merged W bits, Y bits).
type Applied = Vec<(String, Vec<u32>, Vec<u32>)>;

fn apply_adapter(adapter: &Adapter, ff: &FactorFile) -> Result<Applied, String> {
    adapter.check_base(ff).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for m in &adapter.modules {
        let f = ff.load(&m.module).map_err(|e| e.to_string())?;
        let n = 3;
        let x = Rng::new(77).normal_vec(n * f.d_in, 1.0);
        let mut layer = m.to_layer(f).map_err(|e| e.to_string())?;
        let w = layer.merge();
        let y = layer.forward(&x, n).map_err(|e| e.to_string())?;
        out.push((m.weight.clone(), w.iter().map(|v| v.to_bits()).collect(), y.iter().map(|v| v.to_bits()).collect()));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Mutations

/// A safetensors file split into its header (with the metadata's `modules` JSON string parsed,
/// so that edits reach into it) and its data.
struct Doc {
    header: Value,
    modules_parsed: bool,
    data: Vec<u8>,
}

fn split(bytes: &[u8]) -> Doc {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: Value = serde_json::from_slice(&bytes[8..8 + n]).expect("an unmutated header");
    let mut modules_parsed = false;
    if let Some(m) = header.pointer_mut("/__metadata__/modules") {
        if let Some(v) = m.as_str().and_then(|s| serde_json::from_str::<Value>(s).ok()) {
            *m = v;
            modules_parsed = true;
        }
    }
    Doc { header, modules_parsed, data: bytes[8 + n..].to_vec() }
}

/// A duplicated key to write: in the object at `path`, `key` again with `value`, before or
/// after the others (JSON readers keep the last).
struct Dup {
    path: Vec<String>,
    key: String,
    value: Value,
    first: bool,
}

fn ser(v: &Value, path: &mut Vec<String>, dup: Option<&Dup>, modules_parsed: bool) -> String {
    match v {
        Value::Object(o) => {
            let mut parts: Vec<String> = Vec::new();
            for (k, x) in o {
                path.push(k.clone());
                let mut text = ser(x, path, dup, modules_parsed);
                if modules_parsed && path.len() == 2 && path[0] == "__metadata__" && k == "modules" {
                    text = serde_json::to_string(&text).unwrap();
                }
                path.pop();
                parts.push(format!("{}:{text}", serde_json::to_string(k).unwrap()));
            }
            if let Some(d) = dup.filter(|d| &d.path == path) {
                let entry = format!("{}:{}", serde_json::to_string(&d.key).unwrap(), d.value);
                if d.first {
                    parts.insert(0, entry);
                } else {
                    parts.push(entry);
                }
            }
            format!("{{{}}}", parts.join(","))
        }
        other => other.to_string(),
    }
}

fn join(doc: &Doc, dup: Option<&Dup>) -> Vec<u8> {
    let mut h = ser(&doc.header, &mut Vec::new(), dup, doc.modules_parsed).into_bytes();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend_from_slice(&doc.data);
    out
}

fn pick<'a, T>(rng: &mut Rng, v: &'a [T]) -> &'a T {
    &v[rng.idx(v.len())]
}

trait Draw {
    fn idx(&mut self, n: usize) -> usize;
    fn chance(&mut self, p: f64) -> bool;
}
impl Draw for Rng {
    fn idx(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

/// Every path in `v` (object keys only; arrays by index), with the value's kind.
fn paths(v: &Value, at: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    out.push(at.clone());
    match v {
        Value::Object(o) => {
            for (k, x) in o {
                at.push(k.clone());
                paths(x, at, out);
                at.pop();
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                at.push(i.to_string());
                paths(x, at, out);
                at.pop();
            }
        }
        _ => {}
    }
}

fn get_mut<'a>(v: &'a mut Value, path: &[String]) -> Option<&'a mut Value> {
    path.iter().try_fold(v, |v, k| match v {
        Value::Object(o) => o.get_mut(k),
        Value::Array(a) => k.parse::<usize>().ok().and_then(|i| a.get_mut(i)),
        _ => None,
    })
}

fn get<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| match v {
        Value::Object(o) => o.get(k),
        Value::Array(a) => k.parse::<usize>().ok().and_then(|i| a.get(i)),
        _ => None,
    })
}

const SPECS: [&str; 16] = [
    "plain",
    "banded:0",
    "banded:1",
    "banded:2",
    "banded:7",
    "banded:100000000",
    "banded:18446744073709551615",
    "random:1:seed=1",
    "random:64",
    "random:4294967296:seed=3",
    "topk:1",
    "topk:64:official",
    "topk:100000",
    "topk:0",
    "nonsense:3",
    "",
];
const DTYPES: [&str; 12] = ["F32", "F16", "BF16", "F64", "I64", "I32", "U8", "BOOL", "f32", "bf16", "f16", "F8_E4M3"];

fn number_replacement(rng: &mut Rng, old: &Value) -> Value {
    let old_n = old.as_u64().unwrap_or(1);
    match rng.idx(16) {
        0 => json!(0),
        1 => json!(-1),
        2 => json!(1),
        3 => json!(1u64 << 62),
        4 => json!(u64::MAX),
        5 => json!(1u64 << 32),
        6 => json!(1.5),
        7 => json!(1e308),
        8 => json!(old_n.to_string()),
        9 => Value::Null,
        10 => json!(old_n.wrapping_add(1)),
        11 => json!(old_n.saturating_sub(1)),
        12 => json!(old_n * 2),
        13 => json!(-0.0),
        14 => json!(true),
        _ => json!((1u64 << 40) + old_n),
    }
}

fn string_replacement(rng: &mut Rng, old: &str, doc_strings: &[String]) -> Value {
    match rng.idx(12) {
        0 => json!(""),
        1 | 2 => json!(pick(rng, doc_strings)),
        3 | 4 => json!(pick(rng, &SPECS)),
        5 | 6 => json!(pick(rng, &DTYPES)),
        7 => json!(format!("{old}x")),
        8 => json!("fnv1a64:0000000000000000"),
        9 => json!(1),
        10 => json!(old.to_uppercase()),
        _ => json!(old.chars().rev().collect::<String>()),
    }
}

/// Renames a module everywhere it occurs (tensor names, the `modules` key) or in one place.
fn rename_module(doc: &mut Doc, from: &str, to: &str, everywhere: bool, weight_too: bool) -> bool {
    let h = doc.header.as_object_mut().unwrap();
    let keys: Vec<String> = h.keys().filter(|k| k.starts_with(&format!("{from}."))).cloned().collect();
    if everywhere || keys.is_empty() {
        for k in keys {
            let v = h.remove(&k).unwrap();
            h.insert(format!("{to}{}", &k[from.len()..]), v);
        }
    }
    let Some(modules) = doc.header.pointer_mut("/__metadata__/modules").and_then(Value::as_object_mut) else {
        return false;
    };
    if let Some(mut obj) = modules.remove(from) {
        if weight_too {
            obj["weight"] = json!(format!("{to}.weight"));
        }
        modules.insert(to.to_string(), obj);
    }
    true
}

fn module_names(doc: &Doc) -> Vec<String> {
    doc.header
        .pointer("/__metadata__/modules")
        .and_then(Value::as_object)
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

fn tensor_names(doc: &Doc) -> Vec<String> {
    doc.header.as_object().unwrap().keys().filter(|k| *k != "__metadata__").cloned().collect()
}

/// One structured edit of the header (and of the metadata JSON in it).
fn header_edit(rng: &mut Rng, bytes: &[u8]) -> (Vec<u8>, String) {
    let mut doc = split(bytes);
    let mut all = Vec::new();
    paths(&doc.header, &mut Vec::new(), &mut all);
    all.retain(|p| !p.is_empty());
    let strings: Vec<String> = all
        .iter()
        .filter_map(|p| get(&doc.header, p).and_then(Value::as_str).map(str::to_string))
        .chain(all.iter().filter_map(|p| p.last().cloned()))
        .collect();
    let modules = module_names(&doc);
    let tensors = tensor_names(&doc);
    let show = |p: &[String]| p.join(".");
    let mut dup = None;
    let desc = match rng.idx(10) {
        // Replace a leaf.
        0..=3 => {
            let leaves: Vec<&Vec<String>> =
                all.iter().filter(|p| get(&doc.header, p).is_some_and(|v| !v.is_object() && !v.is_array())).collect();
            let p = (*pick(rng, &leaves)).clone();
            let old = get(&doc.header, &p).unwrap().clone();
            let new = match &old {
                Value::Number(_) => number_replacement(rng, &old),
                Value::String(s) => string_replacement(rng, s, &strings),
                Value::Bool(b) => pick(rng, &[json!(!b), json!(b.to_string()), json!(0), Value::Null]).clone(),
                _ => json!(0),
            };
            *get_mut(&mut doc.header, &p).unwrap() = new.clone();
            format!("set {} from {old} to {new}", show(&p))
        }
        // Delete a key.
        4 => {
            let objs: Vec<&Vec<String>> = all
                .iter()
                .filter(|p| get(&doc.header, p).is_some_and(|v| v.as_object().is_some_and(|o| !o.is_empty())))
                .collect();
            let p = if objs.is_empty() || rng.chance(0.2) { Vec::new() } else { (*pick(rng, &objs)).clone() };
            let o = get_mut(&mut doc.header, &p).unwrap().as_object_mut().unwrap();
            let keys: Vec<String> = o.keys().cloned().collect();
            let k = pick(rng, &keys).clone();
            o.remove(&k);
            format!("delete {}", show(&[p, vec![k]].concat()))
        }
        // Duplicate a key, with its own value or a sibling's.
        5 => {
            let objs: Vec<Vec<String>> = std::iter::once(Vec::new())
                .chain(all.iter().filter(|p| get(&doc.header, p).is_some_and(Value::is_object)).cloned())
                .collect();
            let p = pick(rng, &objs).clone();
            let o = get(&doc.header, &p).unwrap().as_object().unwrap();
            let keys: Vec<&String> = o.keys().collect();
            let k = (*pick(rng, &keys)).clone();
            let v = o[*pick(rng, &keys)].clone();
            let first = rng.chance(0.5);
            let d = format!(
                "duplicate key {} ({}) = {}",
                show(&[p.clone(), vec![k.clone()]].concat()),
                if first { "first" } else { "last" },
                oneline(&v.to_string())
            );
            dup = Some(Dup { path: p, key: k, value: v, first });
            d
        }
        // Swap the values of one field between two siblings (two modules, two tensors).
        6 => {
            let parents: Vec<Vec<String>> = std::iter::once(Vec::new())
                .chain(std::iter::once(vec!["__metadata__".to_string(), "modules".to_string()]))
                .filter(|p| get(&doc.header, p).is_some_and(|v| v.as_object().is_some_and(|o| o.len() >= 2)))
                .collect();
            if parents.is_empty() {
                return (bytes.to_vec(), "no-op".into());
            }
            let p = pick(rng, &parents).clone();
            let o = get(&doc.header, &p).unwrap().as_object().unwrap();
            let kids: Vec<String> = o.iter().filter(|(_, v)| v.is_object()).map(|(k, _)| k.clone()).collect();
            if kids.len() < 2 {
                return (bytes.to_vec(), "no-op".into());
            }
            let (a, b) = (pick(rng, &kids).clone(), pick(rng, &kids).clone());
            let fields: Vec<String> = o[&a].as_object().unwrap().keys().cloned().collect();
            if fields.is_empty() {
                return (bytes.to_vec(), "no-op".into());
            }
            let f = pick(rng, &fields).clone();
            let o = get_mut(&mut doc.header, &p).unwrap().as_object_mut().unwrap();
            let va = o[&a].get(&f).cloned().unwrap_or(Value::Null);
            let vb = o[&b].get(&f).cloned().unwrap_or(Value::Null);
            o.get_mut(&a).unwrap()[&f] = vb;
            o.get_mut(&b).unwrap()[&f] = va;
            format!("swap `{f}` between {} and {}", show(&[p.clone(), vec![a]].concat()), show(&[p, vec![b]].concat()))
        }
        // Rename a module (everywhere, in the metadata only or in the tensors only; to a new
        // name or onto another module).
        7 if !modules.is_empty() => {
            let from = pick(rng, &modules).clone();
            let to = if rng.chance(0.5) { pick(rng, &modules).clone() } else { format!("{from}_x") };
            let (everywhere, weight_too) = (rng.chance(0.6), rng.chance(0.5));
            if !everywhere {
                // Rename in the tensors only.
                let h = doc.header.as_object_mut().unwrap();
                let keys: Vec<String> = h.keys().filter(|k| k.starts_with(&format!("{from}."))).cloned().collect();
                for k in keys {
                    let v = h.remove(&k).unwrap();
                    h.insert(format!("{to}{}", &k[from.len()..]), v);
                }
                format!("rename module tensors {from} -> {to}")
            } else {
                rename_module(&mut doc, &from, &to, true, weight_too);
                format!("rename module {from} -> {to} everywhere (weight field too: {weight_too})")
            }
        }
        // Rename a tensor (onto another, or to a new name).
        7 | 8 => {
            let from = pick(rng, &tensors).clone();
            let to = if rng.chance(0.5) { pick(rng, &tensors).clone() } else { format!("{from}.x") };
            let h = doc.header.as_object_mut().unwrap();
            let v = h.remove(&from).unwrap();
            h.insert(to.clone(), v);
            format!("rename tensor {from} -> {to}")
        }
        // A tensor's dtype, and its shape with it when the byte size allows.
        _ => {
            let t = pick(rng, &tensors).clone();
            let dt = *pick(rng, &DTYPES);
            let info = doc.header.get_mut(&t).unwrap();
            let old = info["dtype"].clone();
            info["dtype"] = json!(dt);
            let mut d = format!("set {t}.dtype from {old} to {dt}");
            if rng.chance(0.5) {
                if let Some(shape) = info["shape"].as_array_mut() {
                    if let Some(first) = shape.first_mut() {
                        let (o, n) = (old.as_str().unwrap_or(""), dt);
                        let size = |s: &str| match s {
                            "F32" | "I32" => 4,
                            "F16" | "BF16" => 2,
                            "F64" | "I64" => 8,
                            _ => 1,
                        };
                        let v = first.as_u64().unwrap_or(1) * size(o) / size(n);
                        *first = json!(v);
                        d.push_str(&format!(", first dimension to {v} (same bytes)"));
                    }
                }
            }
            d
        }
    };
    (join(&doc, dup.as_ref()), desc)
}

/// Truncation, bit flips, byte runs.
fn byte_mutation(rng: &mut Rng, bytes: &[u8]) -> (Vec<u8>, String) {
    let mut b = bytes.to_vec();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    match rng.idx(3) {
        0 => {
            let len = match rng.idx(4) {
                0 => rng.idx(8 + n),
                1 => 8 + n + rng.idx(bytes.len() - 8 - n),
                2 => bytes.len() - 1 - rng.idx(8.min(bytes.len() - 1)),
                _ => rng.idx(bytes.len()),
            };
            b.truncate(len);
            (b, format!("truncate to {len} of {} bytes", bytes.len()))
        }
        1 => {
            let flips = 1 + rng.idx(4);
            let mut at = Vec::new();
            for _ in 0..flips {
                let pos = match rng.idx(4) {
                    0 => rng.idx(8),
                    1 => 8 + rng.idx(n),
                    _ => 8 + n + rng.idx(bytes.len() - 8 - n),
                };
                let bit = rng.idx(8);
                b[pos] ^= 1 << bit;
                at.push(format!("{pos}.{bit}"));
            }
            (b, format!("flip bits (byte.bit) {}", at.join(" ")))
        }
        _ => {
            let pos = rng.idx(bytes.len());
            let len = (1 + rng.idx(16)).min(bytes.len() - pos);
            let random = (rng.next_u64() & 0xff) as u8;
            let v = *pick(rng, &[0u8, 0xff, b'9', b'"', b'{', random]);
            b[pos..pos + len].fill(v);
            (b, format!("overwrite {len} bytes at {pos} with {v:#04x}"))
        }
    }
}

/// What an accepted mutated input must give.
#[derive(Clone)]
enum Expect {
    /// Exactly what the original gives.
    Same,
    /// Not judged beyond the crash classes (crafted inputs that are legitimately different).
    Any,
    /// These factors for this module, the rest unchanged (crafted factor values, checksum
    /// recomputed), and only finite values.
    Factors(String, Factors),
}

struct Mutation {
    bytes: Vec<u8>,
    desc: String,
    expect: Expect,
}

/// Rewrites a factor module's tensors and metadata coherently, with its checksum recomputed.
fn craft_factor(doc: &mut Doc, module: &str, f: &Factors) {
    let mut data = std::mem::take(&mut doc.data);
    let h = doc.header.as_object_mut().unwrap();
    for (suffix, values, shape) in
        [("u", &f.u, vec![f.d_out, f.r]), ("s", &f.s, vec![f.r]), ("v", &f.v, vec![f.d_in, f.r])]
    {
        let start = data.len();
        data.extend(values.iter().flat_map(|x| x.to_le_bytes()));
        let info = h.get_mut(&format!("{module}.svft_{suffix}")).unwrap();
        info["dtype"] = json!("F32");
        info["shape"] = json!(shape);
        info["data_offsets"] = json!([start, data.len()]);
    }
    doc.data = data;
    let m = doc.header.pointer_mut(&format!("/__metadata__/modules/{}", module.replace('~', "~0").replace('/', "~1")));
    let m = m.unwrap();
    m["d_out"] = json!(f.d_out);
    m["d_in"] = json!(f.d_in);
    m["rank"] = json!(f.r);
    m["checksum"] = json!(factors_checksum(f));
    let sum = meta_checksum(m.as_object().unwrap());
    m["meta_checksum"] = json!(sum);
    reseal_file(doc);
}

/// Recomputes the file checksum over the metadata as `join` will write it.
fn reseal_file(doc: &mut Doc) {
    let modules_parsed = doc.modules_parsed;
    let meta = doc.header["__metadata__"].as_object_mut().unwrap();
    let strings: std::collections::HashMap<String, String> = meta
        .iter()
        .filter_map(|(k, v)| {
            let text = match v {
                Value::String(s) => s.clone(),
                other if modules_parsed && k == "modules" => {
                    ser(other, &mut vec!["__metadata__".into(), k.clone()], None, false)
                }
                _ => return None,
            };
            Some((k.clone(), text))
        })
        .collect();
    meta.insert("file_checksum".into(), json!(file_checksum(&strings)));
}

/// Crafted factor files: checksums recomputed, so the checks after them are what is tested.
fn crafted_factors(rng: &mut Rng, bytes: &[u8], base: &FactorContent) -> Mutation {
    let mut doc = split(bytes);
    let i = rng.idx(base.infos.len());
    let (info, f) = (&base.infos[i], &base.factors[i]);
    let kind = rng.idx(4);
    let (f2, desc, expect) = match kind {
        // Rank 0: empty factors.
        0 => {
            let f2 = Factors { d_out: f.d_out, d_in: f.d_in, r: 0, u: vec![], s: vec![], v: vec![] };
            (f2, format!("craft `{}` with rank 0", info.module), Expect::Any)
        }
        // Huge dimensions with rank 0 (no data to hold): sizes from the file alone.
        1 => {
            let huge = *pick(rng, &[1usize << 40, 1 << 62, usize::MAX / 3, 1 << 31]);
            let (d_out, d_in) = if rng.chance(0.5) { (huge, f.d_in) } else { (f.d_out, huge) };
            let f2 = Factors { d_out, d_in, r: 0, u: vec![], s: vec![], v: vec![] };
            (f2, format!("craft `{}` as {d_out}x{d_in} rank 0", info.module), Expect::Any)
        }
        // Extreme values in U, s or V.
        _ => {
            let mut f2 = f.clone();
            let x = *pick(rng, &[f32::NAN, f32::INFINITY, -f32::INFINITY, f32::MAX, 1e30, -1e30, 1e-45, -0.0, 0.0]);
            let which = rng.idx(3);
            let v = [&mut f2.u, &mut f2.s, &mut f2.v][which].as_mut_slice();
            let at = rng.idx(v.len());
            v[at] = x;
            let desc = format!("craft `{}`: {}[{at}] = {x:e}", info.module, ["U", "s", "V"][which]);
            (f2.clone(), desc, Expect::Factors(info.module.clone(), f2))
        }
    };
    craft_factor(&mut doc, &info.module, &f2);
    Mutation { bytes: join(&doc, None), desc: format!("{desc} (checksum recomputed)"), expect }
}

/// Edits of a shard index JSON.
fn index_edit(rng: &mut Rng, text: &[u8]) -> (Vec<u8>, String) {
    let mut v: Value = serde_json::from_slice(text).unwrap();
    let map = v["weight_map"].as_object().unwrap().clone();
    let names: Vec<String> = map.keys().cloned().collect();
    let shards: Vec<String> = {
        let mut s: Vec<String> = map.values().map(|v| v.as_str().unwrap().to_string()).collect();
        s.dedup();
        s.sort();
        s.dedup();
        s
    };
    let t = pick(rng, &names).clone();
    let desc = match rng.idx(8) {
        0 => {
            let to = pick(rng, &shards).clone();
            v["weight_map"][&t] = json!(to);
            format!("map {t} to {to}")
        }
        1 => {
            let to = *pick(
                rng,
                &[
                    "missing.safetensors",
                    "../model.safetensors",
                    "",
                    ".",
                    "/dev/zero",
                    "model.safetensors.index.json",
                    "./model-00001-of-00002.safetensors",
                ],
            );
            v["weight_map"][&t] = json!(to);
            format!("map {t} to {to:?}")
        }
        2 => {
            v["weight_map"].as_object_mut().unwrap().remove(&t);
            format!("unmap {t}")
        }
        3 => {
            v["weight_map"]["bogus.weight"] = json!(pick(rng, &shards));
            "map a tensor no shard has".into()
        }
        4 => {
            v["weight_map"][&t] = pick(rng, &[json!(1), Value::Null, json!([]), json!({})]).clone();
            format!("map {t} to a non-string")
        }
        5 => {
            v.as_object_mut().unwrap().remove("weight_map");
            "delete weight_map".into()
        }
        6 => {
            v["weight_map"] = json!([]);
            "weight_map an array".into()
        }
        _ => {
            v["metadata"]["total_size"] = number_replacement(rng, &json!(0));
            "total_size edited".into()
        }
    };
    (serde_json::to_vec_pretty(&v).unwrap(), desc)
}

/// A mutation of a safetensors file (factor files get crafted ones too, when `base` is given).
fn mutate_st(rng: &mut Rng, bytes: &[u8], base: Option<&FactorContent>) -> Mutation {
    let roll = rng.idx(100);
    if let (Some(base), true) = (base, roll < 12) {
        return crafted_factors(rng, bytes, base);
    }
    let (bytes, desc) = if roll < 50 { byte_mutation(rng, bytes) } else { header_edit(rng, bytes) };
    Mutation { bytes, desc, expect: Expect::Same }
}

// ---------------------------------------------------------------------------------------------
// The corpus: real files written by the CLI

struct Corpus {
    dir: PathBuf,
}

impl Corpus {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

const ADAPTER_ARGS: [[&str; 6]; 2] = [
    ["--pattern", "banded:1", "--init", "official", "--seed", "3"],
    ["--pattern", "random:3:seed=7", "--init", "official", "--seed", "5"],
];

fn build_corpus() -> Corpus {
    let dir = temp_dir("fuzz");
    let tensors = bert_tensors(1, 8, Dt::F32);
    let model = dir.join("model.safetensors");
    write_checkpoint(&model, &tensors, Some(json!({"format": "pt"})));
    std::fs::create_dir_all(dir.join("sharded")).unwrap();
    write_sharded(&dir.join("sharded"), &tensors, 2);
    let factors = dir.join("factors.safetensors");
    svft_ok(&["decompose", s(&model), "-o", s(&factors), "--backend", "cpu"]);
    for (i, args) in ADAPTER_ARGS.iter().enumerate() {
        let a = dir.join(format!("adapter{i}.safetensors"));
        let mut all = vec!["init-adapter", "--factors", s(&factors), "-o", s(&a)];
        all.extend(args);
        svft_ok(&all);
    }
    let merged = dir.join("merged.safetensors");
    svft_ok(&[
        "merge",
        "--factors",
        s(&factors),
        "--adapter",
        s(&dir.join("adapter0.safetensors")),
        "--model",
        s(&model),
        "-o",
        s(&merged),
    ]);
    Corpus { dir }
}

// ---------------------------------------------------------------------------------------------
// Running the CLI

/// Runs `svft` under the memory limit with a timeout; classifies its exit.
fn run_cli(cwd: &Path, args: &[String]) -> (Option<Outcome>, String) {
    let mut cmd = limited(env!("CARGO_BIN_EXE_svft"));
    cmd.args(args).current_dir(cwd).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn svft");
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let t_out = std::thread::spawn(move || {
        let mut s = Vec::new();
        std::io::Read::read_to_end(&mut out, &mut s).ok();
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = Vec::new();
        std::io::Read::read_to_end(&mut err, &mut s).ok();
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if start.elapsed() > CLI_TIMEOUT {
            child.kill().ok();
            child.wait().ok();
            break None;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let stdout = String::from_utf8_lossy(&t_out.join().unwrap()).into_owned();
    let stderr = String::from_utf8_lossy(&t_err.join().unwrap()).into_owned();
    let Some(status) = status else {
        return (Some((Class::Hang, format!("no exit after {CLI_TIMEOUT:?}"))), stdout);
    };
    (classify_exit(status, &stderr), stdout)
}

/// None: exit 0 (accepted; the caller judges the result).
fn classify_exit(status: ExitStatus, stderr: &str) -> Option<Outcome> {
    use std::os::unix::process::ExitStatusExt;
    let last = oneline(stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or(""));
    match (status.code(), status.signal()) {
        (Some(0), _) => None,
        (Some(1 | 2), _) if stderr.contains("error") && !stderr.contains("panicked") => Some(clean(last)),
        (Some(101), _) => {
            let msg = stderr.lines().skip_while(|l| !l.contains("panicked")).take(2).collect::<Vec<_>>().join(" ");
            Some((Class::Panic, oneline(&msg)))
        }
        (_, Some(sig)) => Some((Class::Abort, format!("signal {sig}: {last}"))),
        (code, _) => Some((Class::Abort, format!("exit {code:?} without an error message: {last}"))),
    }
}

fn ss(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

// ---------------------------------------------------------------------------------------------
// The worker: runs one target's inputs in this process

static PANIC: Mutex<String> = Mutex::new(String::new());

/// Runs `f` under catch_unwind; a panic becomes a Panic outcome with its message and place.
fn guarded(f: impl FnOnce() -> Outcome) -> Outcome {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(o) => o,
        Err(_) => (Class::Panic, oneline(&PANIC.lock().unwrap_or_else(|e| e.into_inner()))),
    }
}

/// A target's fixed state: its work folder, the files it mutates and their original results.
struct Worker {
    target: String,
    corpus: Corpus,
    work: PathBuf,
    ff: FactorContent,
    base_adapters: Vec<Adapter>,
    applied: Vec<Applied>,
    cli_base: HashMap<String, Value>,
    merged_base: Vec<St>,
    init_base: Option<St>,
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Writes `bytes` to `path`, runs `f`, and puts the original back.
fn with_file<R>(path: &Path, bytes: &[u8], f: impl FnOnce() -> R) -> R {
    let orig = read(path);
    std::fs::write(path, bytes).unwrap();
    let r = f();
    std::fs::write(path, orig).unwrap();
    r
}

impl Worker {
    fn new(target: &str, corpus: Corpus) -> Self {
        let work = corpus.dir.join(format!("work-{}", target.replace(':', "-")));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(work.join("sharded")).unwrap();
        for name in [
            "model.safetensors",
            "factors.safetensors",
            "adapter0.safetensors",
            "adapter1.safetensors",
            "merged.safetensors",
        ] {
            std::fs::copy(corpus.path(name), work.join(name)).unwrap();
        }
        for e in std::fs::read_dir(corpus.path("sharded")).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), work.join("sharded").join(e.file_name())).unwrap();
        }
        let ff = load_factors(&work.join("factors.safetensors")).expect("original factors load");
        let base_adapters: Vec<Adapter> = (0..2)
            .map(|i| Adapter::load(work.join(format!("adapter{i}.safetensors"))).expect("adapter loads"))
            .collect();
        let ffile = FactorFile::open(work.join("factors.safetensors")).unwrap();
        let applied =
            base_adapters.iter().map(|a| apply_adapter(a, &ffile).expect("original adapter applies")).collect();
        let mut w = Worker {
            target: target.to_string(),
            corpus,
            work,
            ff,
            base_adapters,
            applied,
            cli_base: HashMap::new(),
            merged_base: Vec::new(),
            init_base: None,
        };
        if target.starts_with("cli:") {
            for name in [
                "model.safetensors",
                "factors.safetensors",
                "adapter0.safetensors",
                "adapter1.safetensors",
                "merged.safetensors",
            ] {
                let (o, out) = run_cli(&w.work, &ss(&["inspect", "--json", name]));
                assert!(o.is_none(), "inspect {name}: {o:?}");
                w.cli_base.insert(name.to_string(), serde_json::from_str(out.trim()).unwrap());
            }
            for i in 0..2 {
                let (o, _) = run_cli(&w.work, &w.merge_args(i, None));
                assert!(o.is_none(), "merge: {o:?}");
                w.merged_base.push(decode_st(&read(&w.work.join("out.safetensors"))).unwrap());
            }
            let (o, _) = run_cli(&w.work, &w.init_args(0));
            assert!(o.is_none(), "init-adapter: {o:?}");
            w.init_base = Some(decode_st(&read(&w.work.join("init.safetensors"))).unwrap());
        }
        w
    }

    fn merge_args(&self, adapter: usize, model: Option<&str>) -> Vec<String> {
        let a = format!("adapter{adapter}.safetensors");
        let mut v = ss(&["merge", "--factors", "factors.safetensors", "--adapter", &a, "-o", "out.safetensors"]);
        if let Some(m) = model {
            v.extend(ss(&["--model", m]));
        }
        v
    }

    fn init_args(&self, i: usize) -> Vec<String> {
        let mut v = ss(&["init-adapter", "--factors", "factors.safetensors", "-o", "init.safetensors"]);
        v.extend(ss(&ADAPTER_ARGS[i]));
        v
    }

    /// The mutated input number `i`: (file it replaces, mutation).
    fn mutation(&self, rng: &mut Rng) -> (PathBuf, Mutation) {
        let w = &self.work;
        let st = |rng: &mut Rng, name: &str| -> (PathBuf, Mutation) {
            let p = w.join(name);
            let base = (name == "factors.safetensors").then_some(&self.ff);
            let m = mutate_st(rng, &read(&p), base);
            (p, m)
        };
        let sharded = |rng: &mut Rng| -> (PathBuf, Mutation) {
            let dir = w.join("sharded");
            if rng.chance(0.5) {
                let p = dir.join("model.safetensors.index.json");
                let (bytes, desc) = if rng.chance(0.8) {
                    index_edit(rng, &read(&p))
                } else {
                    let mut b = read(&p);
                    let len = rng.idx(b.len());
                    b.truncate(len);
                    (b, format!("truncate the index to {len}"))
                };
                (p, Mutation { bytes, desc: format!("index: {desc}"), expect: Expect::Same })
            } else {
                let name = format!("model-0000{}-of-00002.safetensors", 1 + rng.idx(2));
                let p = dir.join(&name);
                let m = mutate_st(rng, &read(&p), None);
                (p, Mutation { desc: format!("{name}: {}", m.desc), ..m })
            }
        };
        match self.target.as_str() {
            "lib:model" => st(rng, "model.safetensors"),
            "lib:sharded" => sharded(rng),
            "lib:merged" => st(rng, "merged.safetensors"),
            "lib:factors" | "cli:init-adapter" | "cli:merge-factors" => st(rng, "factors.safetensors"),
            "lib:adapter" | "cli:merge-adapter" => {
                let i = rng.idx(2);
                st(rng, &format!("adapter{i}.safetensors"))
            }
            "cli:inspect" => {
                let name = *pick(
                    rng,
                    &[
                        "model.safetensors",
                        "factors.safetensors",
                        "adapter0.safetensors",
                        "adapter1.safetensors",
                        "merged.safetensors",
                    ],
                );
                let (p, m) = st(rng, name);
                (p, Mutation { desc: format!("{name}: {}", m.desc), ..m })
            }
            "cli:merge-model" => {
                if rng.chance(0.5) {
                    let (p, m) = st(rng, "model.safetensors");
                    (p, Mutation { desc: format!("model.safetensors: {}", m.desc), ..m })
                } else {
                    sharded(rng)
                }
            }
            other => panic!("no file mutations for {other}"),
        }
    }

    /// Runs input `i` (seeded by `seed` and `i`); returns its description and outcome.
    fn run(&self, seed: u64, i: u64, save: &dyn Fn(&Path, &str)) -> (String, Outcome) {
        let mut rng = Rng::new(seed ^ fnv(&self.target) ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        match self.target.as_str() {
            "lib:extreme" | "cli:extreme" => return self.extreme(&mut rng, save),
            "cli:decompose-extreme" => return self.decompose_extreme(&mut rng, save),
            "cli:args" => return self.args(&mut rng),
            _ => {}
        }
        let (path, m) = self.mutation(&mut rng);
        let desc = m.desc.clone();
        let outcome = with_file(&path, &m.bytes, || {
            let o = self.judge(&path, &m);
            if o.0.failure() {
                save(&path, o.0.name());
            }
            o
        });
        (desc, outcome)
    }

    fn judge(&self, path: &Path, m: &Mutation) -> Outcome {
        let w = &self.work;
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        match self.target.as_str() {
            "lib:model" | "lib:merged" | "lib:sharded" => {
                let open = if self.target == "lib:sharded" {
                    w.join("sharded/model.safetensors.index.json")
                } else {
                    path.to_path_buf()
                };
                guarded(|| match load_ckpt(&open) {
                    Err(e) => clean(e),
                    Ok(got) => match decode_path(&open) {
                        Err(why) => wrong(format!("accepted, but an independent reader rejects it: {why}")),
                        Ok(want) => match st_diff(&got, &want) {
                            Some(d) => wrong(format!("read differently from the file: {d}")),
                            None if got == decode_path(&self.corpus_twin(&open)).unwrap() => same(),
                            None => other("a different checkpoint, read faithfully"),
                        },
                    },
                })
            }
            "lib:factors" => guarded(|| match load_factors(path) {
                Err(e) => clean(e),
                Ok(got) => match &m.expect {
                    Expect::Same => factor_diff(&got, &self.ff).map_or_else(same, wrong),
                    Expect::Any => other("crafted"),
                    Expect::Factors(module, f) => {
                        let finite = |v: &[f32]| v.iter().all(|x| x.is_finite());
                        let i = got.infos.iter().position(|x| &x.module == module);
                        match i.map(|i| &got.factors[i]) {
                            Some(g) if !factors_eq(g, f) => {
                                wrong(format!("crafted factors of `{module}` read differently"))
                            }
                            Some(g) if !(finite(&g.u) && finite(&g.s) && finite(&g.v)) => {
                                wrong(format!("non-finite factors of `{module}` accepted"))
                            }
                            Some(_) => other("crafted factors read faithfully"),
                            None => wrong(format!("module `{module}` vanished")),
                        }
                    }
                },
            }),
            "lib:adapter" => guarded(|| {
                let i = if name == "adapter0.safetensors" { 0 } else { 1 };
                let a = match Adapter::load(path) {
                    Err(e) => return clean(e.to_string()),
                    Ok(a) => a,
                };
                let ff = FactorFile::open(w.join("factors.safetensors")).unwrap();
                let applied = match apply_adapter(&a, &ff) {
                    Err(e) => return clean(format!("loaded, then rejected: {e}")),
                    Ok(x) => x,
                };
                if let Some(d) = adapter_diff(&a, &self.base_adapters[i]) {
                    return wrong(d);
                }
                if applied != self.applied[i] {
                    return wrong("identical adapter, different merge or forward");
                }
                same()
            }),
            "cli:inspect" => {
                let (o, out) = run_cli(w, &ss(&["inspect", "--json", &name]));
                if let Some(o) = o {
                    return o;
                }
                let Ok(got) = serde_json::from_str::<Value>(out.trim()) else {
                    return wrong(format!("not JSON: {}", oneline(&out)));
                };
                let base = &self.cli_base[&name];
                if &got == base {
                    return same();
                }
                if matches!(m.expect, Expect::Any | Expect::Factors(..)) {
                    return other("crafted");
                }
                // A checkpoint's listing must be what the file says.
                if base["kind"] == "checkpoint" && got["kind"] == "checkpoint" {
                    return match decode_st(&m.bytes) {
                        Err(why) => wrong(format!("listed, but an independent reader rejects it: {why}")),
                        Ok(want) => {
                            let listed: BTreeMap<String, Value> = got["tensors"]
                                .as_array()
                                .unwrap()
                                .iter()
                                .map(|t| (t["name"].as_str().unwrap().to_string(), json!([t["dtype"], t["shape"]])))
                                .collect();
                            let expected: BTreeMap<String, Value> = want
                                .tensors
                                .iter()
                                .map(|(n, (dt, shape, _))| (n.clone(), json!([dtype_name(*dt), shape])))
                                .collect();
                            if listed == expected {
                                other("a different checkpoint, listed faithfully")
                            } else {
                                wrong("the listing is not what the file holds")
                            }
                        }
                    };
                }
                wrong(format!("inspect differs: {}", json_diff(&got, base, "")))
            }
            "cli:init-adapter" => {
                let _ = std::fs::remove_file(w.join("init.safetensors"));
                let (o, _) = run_cli(w, &self.init_args(0));
                if let Some(o) = o {
                    return o;
                }
                if matches!(m.expect, Expect::Any | Expect::Factors(..)) {
                    return other("crafted");
                }
                match decode_st(&read(&w.join("init.safetensors"))) {
                    Err(e) => wrong(format!("wrote an unreadable adapter: {e}")),
                    Ok(got) => st_diff(&got, self.init_base.as_ref().unwrap())
                        .map_or_else(same, |d| wrong(format!("the adapter written differs: {d}"))),
                }
            }
            "cli:merge-factors" | "cli:merge-adapter" | "cli:merge-model" => {
                let adapter = if name == "adapter1.safetensors" { 1 } else { 0 };
                let model = match self.target.as_str() {
                    "cli:merge-model" if name == "model.safetensors" => Some("model.safetensors"),
                    "cli:merge-model" => Some("sharded/model.safetensors.index.json"),
                    _ => None,
                };
                let _ = std::fs::remove_file(w.join("out.safetensors"));
                let (o, _) = run_cli(w, &self.merge_args(adapter, model));
                if let Some(o) = o {
                    return o;
                }
                if matches!(m.expect, Expect::Any | Expect::Factors(..)) {
                    return other("crafted");
                }
                let got = match decode_st(&read(&w.join("out.safetensors"))) {
                    Err(e) => return wrong(format!("wrote an unreadable checkpoint: {e}")),
                    Ok(x) => x,
                };
                let Some(model) = model else {
                    return st_diff(&got, &self.merged_base[adapter])
                        .map_or_else(same, |d| wrong(format!("merged output differs: {d}")));
                };
                // With --model: the adapted weights as before, every other tensor and the
                // metadata as the (mutated) model holds them.
                let Ok(ck) = decode_path(&w.join(model)) else {
                    return wrong("merged with a model an independent reader rejects");
                };
                let base = &self.merged_base[adapter];
                let mut want = St { meta: ck.meta.clone(), tensors: ck.tensors.clone() };
                want.meta.entry("format".into()).or_insert_with(|| "pt".into());
                want.meta.insert("svft_merged_adapter".into(), format!("adapter{adapter}.safetensors"));
                for m in &self.base_adapters[adapter].modules {
                    want.tensors.insert(m.weight.clone(), base.tensors[&m.weight].clone());
                }
                match st_diff(&got, &want) {
                    Some(d) => wrong(format!("merged output differs: {d}")),
                    None if decode_path(&self.corpus_twin(&w.join(model))).as_ref() == Ok(&ck) => same(),
                    None => other("a different model, merged faithfully"),
                }
            }
            other => panic!("unknown target {other}"),
        }
    }

    /// The unmutated twin of a work file, in the corpus folder.
    fn corpus_twin(&self, p: &Path) -> PathBuf {
        self.corpus.dir.join(p.strip_prefix(&self.work).unwrap())
    }

    /// Crafted adapters with extreme coefficients and gate values (checksums recomputed by
    /// `Adapter::save`): the merged weight and a forward must match the f64 reference, or be
    /// rejected when the reference is not finite in f32.
    fn extreme(&self, rng: &mut Rng, save: &dyn Fn(&Path, &str)) -> (String, Outcome) {
        const X: [f32; 14] = [
            f32::NAN,
            f32::INFINITY,
            -f32::INFINITY,
            f32::MAX,
            -f32::MAX,
            3e38,
            1e30,
            -1e30,
            1e20,
            1e-45,
            -1e-40,
            -0.0,
            0.0,
            1e10,
        ];
        let ai = rng.idx(2);
        let mut a = self.base_adapters[ai].clone();
        let mut desc = vec![format!("adapter{ai}")];
        for _ in 0..1 + rng.idx(3) {
            let mi = rng.idx(a.modules.len());
            let m = &mut a.modules[mi];
            if rng.chance(0.3) {
                let g = *pick(rng, &[f32::NAN, f32::INFINITY, -f32::INFINITY, 1e30, -1e30, 88.8, -104.0, 0.0]);
                m.gamma = g;
                desc.push(format!("{}.gamma = {g:e}", m.module));
            } else {
                let count = if rng.chance(0.2) { m.coefficients.len() } else { 1 + rng.idx(3) };
                let x = *pick(rng, &X);
                for _ in 0..count {
                    let k = rng.idx(m.coefficients.len());
                    m.coefficients[k] = x;
                }
                desc.push(format!("{count} coefficients of {} = {x:e}", m.module));
            }
        }
        let desc = format!("crafted {}", desc.join(", "));
        let path = self.work.join("extreme.safetensors");
        if let Err(e) = a.save(&path) {
            return (desc, clean(format!("save refused: {e}")));
        }
        let ff = FactorFile::open(self.work.join("factors.safetensors")).unwrap();
        // What each module must merge to, in f64; None where it is not finite in f32.
        let refs: Vec<(String, Option<Vec<f64>>)> = a
            .modules
            .iter()
            .map(|m| {
                let f = ff.load(&m.module).unwrap();
                let omega = svft::Omega { pattern: m.pattern, r: m.rank, rows: m.rows.clone(), cols: m.cols.clone() };
                let w = svft::reference::Reference::new(&f, &omega, &m.coefficients, m.gamma, m.gate, None).weight();
                let ok = w.iter().all(|v| v.is_finite() && v.abs() <= f32::MAX as f64);
                (m.weight.clone(), ok.then_some(w))
            })
            .collect();
        let check = |weight: &str, got: &[f32]| -> Option<String> {
            let want = refs.iter().find(|r| r.0 == weight)?;
            match &want.1 {
                None => Some(format!("`{weight}`: accepted although the merged weight is not finite in f32")),
                Some(w) if got.iter().any(|v| !v.is_finite()) => Some(format!(
                    "`{weight}`: non-finite output, reference {:e}",
                    w.iter().fold(0f64, |a, b| a.max(b.abs()))
                )),
                Some(w) => {
                    let err = svft::reference::rel_err(got, w);
                    (err > 1e-4).then(|| format!("`{weight}`: relative error {err:e} against the f64 reference"))
                }
            }
        };
        let outcome = if self.target == "lib:extreme" {
            guarded(|| {
                let loaded = match Adapter::load(&path) {
                    Err(e) => return clean(e.to_string()),
                    Ok(x) => x,
                };
                if let Some(d) = adapter_diff(&loaded, &a) {
                    return wrong(format!("read back differently: {d}"));
                }
                let mut first = None;
                for m in &loaded.modules {
                    let mut layer = match m.to_layer(ff.load(&m.module).unwrap()) {
                        Err(e) => return clean(e.to_string()),
                        Ok(l) => l,
                    };
                    let w = layer.merge();
                    if let Some(d) = check(&m.weight, &w) {
                        first.get_or_insert(d);
                    }
                }
                first.map_or_else(|| other("extreme values, merged right"), wrong)
            })
        } else {
            let args = ss(&[
                "merge",
                "--factors",
                "factors.safetensors",
                "--adapter",
                "extreme.safetensors",
                "-o",
                "out.safetensors",
            ]);
            let _ = std::fs::remove_file(self.work.join("out.safetensors"));
            match run_cli(&self.work, &args) {
                (Some(o), _) => o,
                (None, _) => match decode_st(&read(&self.work.join("out.safetensors"))) {
                    Err(e) => wrong(format!("unreadable output: {e}")),
                    Ok(st) => {
                        let mut first = None;
                        for (name, (dt, _, bytes)) in &st.tensors {
                            let got = svft::checkpoint::bytes_to_f32(*dt, bytes).unwrap();
                            if let Some(d) = check(name, &got) {
                                first.get_or_insert(d);
                            }
                        }
                        first.map_or_else(|| other("extreme values, merged right"), wrong)
                    }
                },
            }
        };
        if outcome.0.failure() {
            save(&path, outcome.0.name());
        }
        (desc, outcome)
    }

    /// A model with extreme weight values: decompose must refuse it, or write factors that
    /// reconstruct it.
    fn decompose_extreme(&self, rng: &mut Rng, save: &dyn Fn(&Path, &str)) -> (String, Outcome) {
        let mut tensors = bert_tensors(1, 8, Dt::F32);
        let targets: Vec<usize> = (0..tensors.len())
            .filter(|&i| tensors[i].name.starts_with("encoder.") && tensors[i].shape.len() == 2)
            .collect();
        let ti = *pick(rng, &targets);
        let x = *pick(
            rng,
            &[f32::NAN, f32::INFINITY, -f32::INFINITY, f32::MAX, -f32::MAX, 1e30, 1e20, 1e-30, 1e-45, 0.0, 1e19],
        );
        let t = &mut tensors[ti];
        let count = match rng.idx(3) {
            0 => t.values.len(),
            1 => 1,
            _ => 1 + rng.idx(t.values.len()),
        };
        for _ in 0..count {
            let k = rng.idx(t.values.len());
            t.values[k] = x;
        }
        if count == t.values.len() {
            t.values.iter_mut().for_each(|v| *v = x);
        }
        let desc = format!("{}: {count} values = {x:e}", t.name);
        let path = self.work.join("extreme-model.safetensors");
        write_checkpoint(&path, &tensors, Some(json!({"format": "pt"})));
        let out = self.work.join("extreme-factors.safetensors");
        let _ = std::fs::remove_file(&out);
        let (o, _) = run_cli(
            &self.work,
            &ss(&["decompose", "extreme-model.safetensors", "-o", "extreme-factors.safetensors", "--backend", "cpu"]),
        );
        let outcome = o.unwrap_or_else(|| {
            let got = match load_factors(&out) {
                Err(e) => return wrong(format!("wrote unreadable factors: {e}")),
                Ok(g) => g,
            };
            for (info, f) in got.infos.iter().zip(&got.factors) {
                let w: Vec<f64> =
                    tensors.iter().find(|t| t.name == info.weight).unwrap().values.iter().map(|&v| v as f64).collect();
                if w.iter().any(|v| !v.is_finite()) {
                    return wrong(format!(
                        "`{}`: non-finite weight decomposed (residual {})",
                        info.weight, info.residual
                    ));
                }
                let rec = f.reconstruct_f64();
                let norm = w.iter().map(|v| v * v).sum::<f64>().sqrt();
                let err = rec.iter().zip(&w).map(|(a, b)| (a - b) * (a - b)).sum::<f64>().sqrt();
                if err.is_nan() || err > 1e-3 * norm.max(f64::MIN_POSITIVE) || !info.residual.is_finite() {
                    return wrong(format!(
                        "`{}`: factors reconstruct with error {err:e} (norm {norm:e}, recorded residual {})",
                        info.weight, info.residual
                    ));
                }
            }
            other("extreme weights, decomposed right")
        });
        if outcome.0.failure() {
            save(&path, outcome.0.name());
        }
        (desc, outcome)
    }

    /// Out-of-range sizes and counts on every subcommand's arguments.
    fn args(&self, rng: &mut Rng) -> (String, Outcome) {
        const BIG: [&str; 10] = [
            "0",
            "1",
            "4294967296",
            "1099511627776",
            "4611686018427387904",
            "18446744073709551615",
            "6148914691236517205",
            "-1",
            "1e9",
            "2147483648",
        ];
        let big = |rng: &mut Rng| pick(rng, &BIG).to_string();
        let args: Vec<String> = match rng.idx(6) {
            0 => ss(&[
                "decompose",
                "model.safetensors",
                "-o",
                "args.safetensors",
                "--backend",
                "cpu",
                "--rank",
                &big(rng),
            ]),
            1 => ss(&[
                "init-adapter",
                "--factors",
                "factors.safetensors",
                "-o",
                "args.safetensors",
                "--pattern",
                *pick(rng, &SPECS),
                "--init",
                *pick(rng, &["zero", "official"]),
                "--seed",
                &big(rng),
            ]),
            2 => {
                let (d_out, d_in, tokens) = match rng.idx(3) {
                    0 => (big(rng), "8".to_string(), "4".to_string()),
                    1 => ("8".to_string(), big(rng), "4".to_string()),
                    _ => ("8".to_string(), "8".to_string(), big(rng)),
                };
                ss(&[
                    "bench",
                    "--backend",
                    "cpu",
                    "--d-out",
                    &d_out,
                    "--d-in",
                    &d_in,
                    "--tokens",
                    &tokens,
                    "--seconds",
                    "0.001",
                    "--pattern",
                    *pick(rng, &SPECS[..10]),
                    "--json",
                ])
            }
            3 => {
                let flag = *pick(rng, &["--tokens", "--layers", "--banded", "--lora-rank", "--batches"]);
                let v = *pick(rng, &BIG[2..]);
                ss(&["demo", "--backend", "cpu", "--steps", "1", "--no-plot", "--json", flag, v])
            }
            4 => ss(&[
                "bench",
                "--backend",
                "cpu",
                "--seconds",
                *pick(rng, &["1e300", "-1", "NaN", "inf", "0"]),
                "--d-out",
                "8",
                "--d-in",
                "8",
                "--tokens",
                "2",
                "--json",
            ]),
            _ => ss(&[
                "init-adapter",
                "--factors",
                "factors.safetensors",
                "-o",
                "args.safetensors",
                "--pattern",
                *pick(rng, &SPECS),
                "--modules",
                *pick(rng, &["", "(", "nothing", ".*", "a{1000000}"]),
            ]),
        };
        let desc = format!("svft {}", args.join(" "));
        let (o, _) = run_cli(&self.work, &args);
        (desc, o.unwrap_or_else(|| other("accepted")))
    }
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

fn now_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis()
}

/// The worker's entry: a no-op unless this binary was re-run as a worker by [`fuzz_files`].
#[test]
fn fuzz_worker() {
    let Ok(target) = std::env::var("SVFT_FUZZ_WORKER") else {
        return;
    };
    let env = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} unset"));
    let corpus = Corpus { dir: PathBuf::from(env("SVFT_FUZZ_CORPUS")) };
    let seed: u64 = env("SVFT_FUZZ_SEED").parse().unwrap();
    let start: u64 = env("SVFT_FUZZ_START").parse().unwrap();
    let only = std::env::var("SVFT_FUZZ_ONLY").is_ok();
    let deadline: u128 = env("SVFT_FUZZ_DEADLINE_MS").parse().unwrap();
    let log = PathBuf::from(env("SVFT_FUZZ_LOG"));
    std::panic::set_hook(Box::new(|info| {
        *PANIC.lock().unwrap_or_else(|e| e.into_inner()) = info.to_string();
    }));
    let failures = corpus.dir.join("failures");
    std::fs::create_dir_all(&failures).unwrap();
    let worker = Worker::new(&target, corpus);
    let mut log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    let mut i = start;
    while only || now_ms() < deadline {
        let mut begin = format!("B\t{i}\n").into_bytes();
        log.write_all(&begin).unwrap();
        begin.clear();
        let save = |p: &Path, class: &str| {
            let name = format!("{}-{i}-{class}-{}", target.replace(':', "-"), p.file_name().unwrap().to_string_lossy());
            let _ = std::fs::copy(p, failures.join(name));
        };
        let (desc, (class, detail)) = worker.run(seed, i, &save);
        log.write_all(format!("E\t{i}\t{}\t{}\t{}\n", class.name(), oneline(&desc), oneline(&detail)).as_bytes())
            .unwrap();
        i += 1;
        if only {
            break;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The parent: budget, workers, the table

#[derive(Default)]
struct Stats {
    counts: BTreeMap<Class, usize>,
    examples: BTreeMap<Class, Vec<String>>,
}

impl Stats {
    fn add(&mut self, target: &str, i: u64, class: Class, desc: &str, detail: &str) {
        *self.counts.entry(class).or_default() += 1;
        let ex = self.examples.entry(class).or_default();
        if class.failure() && ex.len() < KEEP {
            ex.push(format!("{target}:{i}: {desc} => {detail}"));
        }
    }
    fn total(&self) -> usize {
        self.counts.values().sum()
    }
    fn get(&self, c: Class) -> usize {
        self.counts.get(&c).copied().unwrap_or(0)
    }
}

/// Runs one target's workers until its deadline; a worker that dies costs the input it was on.
fn run_target(target: &str, corpus: &Corpus, seed: u64, budget: Duration, only: Option<u64>) -> Stats {
    let mut stats = Stats::default();
    let deadline = Instant::now() + budget;
    let deadline_ms = now_ms() + budget.as_millis();
    let log = corpus.dir.join(format!("log-{}.tsv", target.replace(':', "-")));
    let mut next = only.unwrap_or(0);
    loop {
        let _ = std::fs::remove_file(&log);
        let mut cmd = limited(std::env::current_exe().unwrap());
        cmd.args(["fuzz_worker", "--exact", "--nocapture", "--test-threads", "1"])
            .env("SVFT_FUZZ_WORKER", target)
            .env("SVFT_FUZZ_CORPUS", &corpus.dir)
            .env("SVFT_FUZZ_SEED", seed.to_string())
            .env("SVFT_FUZZ_START", next.to_string())
            .env("SVFT_FUZZ_DEADLINE_MS", deadline_ms.to_string())
            .env("SVFT_FUZZ_LOG", &log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if only.is_some() {
            cmd.env("SVFT_FUZZ_ONLY", "1");
        }
        let mut child = cmd.spawn().expect("spawn the fuzz worker");
        let mut err = child.stderr.take().unwrap();
        let t_err = std::thread::spawn(move || {
            let mut s = Vec::new();
            std::io::Read::read_to_end(&mut err, &mut s).ok();
            String::from_utf8_lossy(&s).into_owned()
        });
        let grace = deadline + CLI_TIMEOUT + Duration::from_secs(30);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break Some(st);
            }
            if Instant::now() > grace {
                child.kill().ok();
                child.wait().ok();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let stderr = t_err.join().unwrap();
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let mut open: Option<u64> = None;
        for line in text.lines() {
            let f: Vec<&str> = line.split('\t').collect();
            match f[..] {
                ["B", i] => open = i.parse().ok(),
                ["E", i, class, desc, detail] => {
                    let i: u64 = i.parse().unwrap();
                    stats.add(target, i, Class::parse(class).unwrap(), desc, detail);
                    open = None;
                    next = i + 1;
                }
                _ => {}
            }
        }
        let ok = status.is_some_and(|s| s.success());
        if let Some(i) = open {
            // The worker died (or hung) on input i: rebuild its description for the report.
            let class = match status {
                None => Class::Hang,
                Some(s) if s.code() == Some(101) => Class::Panic,
                Some(_) => Class::Abort,
            };
            let why = oneline(stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("?"));
            stats.add(
                target,
                i,
                class,
                &format!("input {i} (rerun with SVFT_FUZZ_REPRO={target}:{i})"),
                &format!("{status:?}: {why}"),
            );
            next = i + 1;
        } else if !ok {
            panic!("fuzz worker for {target} failed outside any input ({status:?}):\n{stderr}");
        }
        if only.is_some() || ok || Instant::now() >= deadline {
            break;
        }
    }
    stats
}

#[test]
fn fuzz_files() {
    if std::env::var_os("SVFT_FUZZ_WORKER").is_some() {
        return;
    }
    let seconds: f64 = std::env::var("SVFT_FUZZ_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(60.0);
    let seed: u64 = std::env::var("SVFT_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_SEED);
    let filter = std::env::var("SVFT_FUZZ_TARGETS").ok();
    let repro = std::env::var("SVFT_FUZZ_REPRO").ok();
    let mut targets: Vec<&str> = TARGETS
        .iter()
        .copied()
        .filter(|t| filter.as_deref().is_none_or(|f| f.split(',').any(|p| !p.is_empty() && t.starts_with(p.trim()))))
        .collect();
    let only = repro.as_deref().map(|r| {
        let (t, i) = r.rsplit_once(':').expect("SVFT_FUZZ_REPRO=target:index");
        targets = TARGETS.iter().copied().filter(|x| *x == t).collect();
        i.parse::<u64>().expect("SVFT_FUZZ_REPRO=target:index")
    });
    assert!(!targets.is_empty(), "no target matches");
    let corpus = build_corpus();
    let per = Duration::from_secs_f64(seconds / targets.len() as f64);
    println!(
        "svft fuzz: seed {seed} (SVFT_FUZZ_SEED), {seconds} s (SVFT_FUZZ_SECONDS) over {} targets, ulimit -v {} KiB, corpus {}",
        targets.len(),
        mem_limit_kib(),
        corpus.dir.display()
    );
    let started = Instant::now();
    let mut rows = Vec::new();
    for t in &targets {
        rows.push((t.to_string(), run_target(t, &corpus, seed, per, only)));
    }
    let mut report = String::new();
    let head = format!(
        "{:<24} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7}",
        "target", "inputs", "same", "other", "clean", "panics", "aborts", "hangs", "wrong"
    );
    report.push_str(&format!("{head}\n"));
    let mut total = Stats::default();
    let row = |name: &str, st: &Stats| {
        let c = |k| st.get(k);
        format!(
            "{:<24} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7}\n",
            name,
            st.total(),
            c(Class::Same),
            c(Class::Other),
            c(Class::Clean),
            c(Class::Panic),
            c(Class::Abort),
            c(Class::Hang),
            c(Class::Wrong)
        )
    };
    for (t, st) in &rows {
        report.push_str(&row(t, st));
        for (k, v) in &st.counts {
            *total.counts.entry(*k).or_default() += v;
        }
    }
    report.push_str(&row("total", &total));
    report.push_str(&format!("({:.1} s; same = accepted, identical to the original; other = accepted, a legitimately different input read faithfully)\n", started.elapsed().as_secs_f64()));
    let failing: usize = [Class::Panic, Class::Abort, Class::Hang, Class::Wrong].iter().map(|&k| total.get(k)).sum();
    if failing > 0 {
        report.push_str(&format!(
            "\nfailures (reproduce one with SVFT_FUZZ_SEED={seed} SVFT_FUZZ_REPRO=target:index; inputs saved in {}):\n",
            corpus.dir.join("failures").display()
        ));
        for (_, st) in &rows {
            for (class, ex) in &st.examples {
                for e in ex {
                    report.push_str(&format!("  [{}] {e}\n", class.name()));
                }
            }
        }
    }
    println!("{report}");
    let _ = std::fs::write(corpus.dir.join("report.txt"), &report);
    if std::env::var("SVFT_FUZZ_REPORT_ONLY").as_deref() == Ok("1") {
        return;
    }
    assert_eq!(failing, 0, "the fuzz suite found {failing} panics, aborts, hangs or wrong results:\n{report}");
}
