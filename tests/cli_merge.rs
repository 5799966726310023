//! Adapters and `svft init-adapter`, `svft merge`, `svft inspect`: exact save/load round trips,
//! Zero init merging back to the original weights, a trained adapter merging to
//! `U (diag(s) + g M) V^T`, and every way a file can be wrong, each a clear error naming it.

mod cli_support;

use std::path::{Path, PathBuf};

use cli_support::*;
use svft::adapter::{module_seed, Adapter, FactorFile};
use svft::checkpoint::Checkpoint;
use svft::Pattern;

/// A model, its factor file and a zero-init adapter in a fresh directory.
fn setup(name: &str, dt: Dt, seed_shift: u64) -> (PathBuf, Vec<T>, PathBuf, PathBuf) {
    let dir = temp_dir(name);
    let mut tensors = bert_tensors(1, 12, dt);
    if seed_shift > 0 {
        for t in &mut tensors {
            t.values = values(t.values.len(), seed_shift + t.values.len() as u64);
        }
    }
    let model = dir.join("model.safetensors");
    write_checkpoint(&model, &tensors, Some(serde_json::json!({"format": "pt"})));
    let factors = dir.join("factors.safetensors");
    svft_ok(&["decompose", s(&model), "-o", s(&factors)]);
    let adapter = dir.join("adapter.safetensors");
    svft_ok(&["init-adapter", "--factors", s(&factors), "-o", s(&adapter)]);
    (dir, tensors, factors, adapter)
}

#[test]
fn adapter_round_trip_is_exact() {
    let (dir, _, factors, _) = setup("merge-roundtrip", Dt::F32, 0);
    for (pattern, init) in [("random:3:seed=7", "official"), ("topk:2:official", "zero"), ("plain", "official")] {
        let path = dir.join(format!("{}.safetensors", pattern.replace(':', "_")));
        svft_ok(&[
            "init-adapter",
            "--factors",
            s(&factors),
            "-o",
            s(&path),
            "--pattern",
            pattern,
            "--init",
            init,
            "--seed",
            "5",
        ]);
        let a = Adapter::load(&path).unwrap();
        assert_eq!(a.modules.len(), 6);
        // Change every value, save, load: identical down to the bit.
        let mut b = a.clone();
        for (i, m) in b.modules.iter_mut().enumerate() {
            m.coefficients.iter_mut().enumerate().for_each(|(k, c)| *c = (k as f32 * 0.37 + i as f32).sin() / 3.0);
            m.gamma = -0.25 * i as f32;
        }
        let again = dir.join("again.safetensors");
        b.save(&again).unwrap();
        let c = Adapter::load(&again).unwrap();
        assert_eq!(b, c, "{pattern}");
        for (x, y) in b.modules.iter().zip(&c.modules) {
            assert!(x.coefficients.iter().zip(&y.coefficients).all(|(p, q)| p.to_bits() == q.to_bits()));
            assert_eq!(x.gamma.to_bits(), y.gamma.to_bits());
        }
        assert_eq!(a.modules[0].gate, init == "official");
        // Seeds per module: module_seed(5, name) for the init; a random pattern's own seed 7
        // is the base of each module's (so modules differ), other patterns are as given.
        for m in &a.modules {
            assert_eq!(m.seed, module_seed(5, &m.module), "{}", m.module);
            let want = match pattern.parse::<Pattern>().unwrap() {
                Pattern::Random { d, .. } => Pattern::Random { d, seed: module_seed(7, &m.module) },
                p => p,
            };
            assert_eq!(m.pattern, want, "{}", m.module);
        }
        if pattern.starts_with("random") {
            assert_ne!(a.modules[0].rows, a.modules[1].rows, "random patterns differ per module");
        }
        // s_row / s_col are i64 tensors, as in the official layer.
        let ck = Checkpoint::open(&path).unwrap();
        let e = ck.get("encoder.layer.0.attention.self.query.s_row").unwrap();
        assert_eq!(e.dtype, svft::checkpoint::Dtype::I64);
        let v = svft_json(&["inspect", s(&path), "--json"]);
        assert_eq!(v["kind"], "svft-adapter");
        assert_eq!(v["modules"].as_array().unwrap().len(), 6);
    }
    // top-k with the paper's score is impossible for the 48x12 MLP weights: a clear error.
    let err = svft_err(&[
        "init-adapter",
        "--factors",
        s(&factors),
        "-o",
        s(&dir.join("x.safetensors")),
        "--pattern",
        "topk:2",
        "--modules",
        "intermediate",
    ]);
    assert!(err.contains("intermediate") && err.contains("square"), "{err}");
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn zero_init_merges_back_to_the_model_in_its_dtype() {
    for (dt, name, tol) in [(Dt::F32, "f32", 1e-5f32), (Dt::BF16, "bf16", 1e-2), (Dt::F16, "f16", 2e-3)] {
        let (dir, tensors, factors, adapter) = setup(&format!("merge-zero-{name}"), dt, 0);
        let merged = dir.join("merged.safetensors");
        // Adapted weights only.
        let v = svft_json(&["merge", "--factors", s(&factors), "--adapter", s(&adapter), "-o", s(&merged), "--json"]);
        assert_eq!(v["merged"], 6);
        for m in v["modules"].as_array().unwrap() {
            assert!(m["max_abs_diff"].as_f64().unwrap() < 1e-6, "zero init: W = U diag(s) V^T: {m}");
        }
        let ck = Checkpoint::open(&merged).unwrap();
        assert_eq!(ck.entries().len(), 6);
        for t in tensors.iter().filter(|t| projection_names(&tensors).contains(&t.name)) {
            let e = ck.get(&t.name).unwrap();
            assert_eq!(svft::checkpoint::dtype_name(e.dtype), name, "merged in the model's dtype");
            assert_eq!(e.shape, t.shape);
            let w = ck.read_f32(&t.name).unwrap();
            let d = max_abs_diff(&w, &dt.round(&t.values));
            assert!(d <= tol, "{name} {}: {d}", t.name);
        }
        // With --model: a complete drop-in checkpoint, other tensors copied bit for bit.
        let full = dir.join("full.safetensors");
        let model = dir.join("model.safetensors");
        let v = svft_json(&[
            "merge",
            "--factors",
            s(&factors),
            "--adapter",
            s(&adapter),
            "-o",
            s(&full),
            "--model",
            s(&model),
            "--json",
        ]);
        assert_eq!(v["copied"].as_u64().unwrap() as usize, tensors.len() - 6);
        let orig = Checkpoint::open(&model).unwrap();
        let ck = Checkpoint::open(&full).unwrap();
        assert_eq!(ck.entries().len(), tensors.len());
        assert_eq!(ck.metadata().get("format").map(String::as_str), Some("pt"));
        for e in orig.entries() {
            let same = orig.read_bytes(&e.name).unwrap() == ck.read_bytes(&e.name).unwrap();
            if !projection_names(&tensors).contains(&e.name) {
                assert!(same, "{} copied", e.name);
            }
        }
        for m in v["modules"].as_array().unwrap() {
            assert!(m["max_abs_diff"].as_f64().unwrap() <= tol as f64, "{m}");
        }
        let table = svft_ok(&[
            "merge",
            "--factors",
            s(&factors),
            "--adapter",
            s(&adapter),
            "-o",
            s(&full),
            "--model",
            s(&model),
        ]);
        assert!(table.contains("max |W-W0|") && table.contains("encoder.layer.0.output.dense.weight"), "{table}");
    }
}

#[test]
fn trained_adapter_merges_to_u_c_vt() {
    let (dir, _, factors, _) = setup("merge-trained", Dt::F32, 0);
    let adapter = dir.join("official.safetensors");
    svft_ok(&[
        "init-adapter",
        "--factors",
        s(&factors),
        "-o",
        s(&adapter),
        "--pattern",
        "banded:1",
        "--init",
        "official",
        "--seed",
        "3",
    ]);
    let mut a = Adapter::load(&adapter).unwrap();
    a.modules[0].gamma = 0.7;
    a.save(&adapter).unwrap();
    let merged = dir.join("merged.safetensors");
    let v = svft_json(&["merge", "--factors", s(&factors), "--adapter", s(&adapter), "-o", s(&merged), "--json"]);
    let ff = FactorFile::open(&factors).unwrap();
    let ck = Checkpoint::open(&merged).unwrap();
    for (m, row) in a.modules.iter().zip(v["modules"].as_array().unwrap()) {
        assert_eq!(row["module"].as_str().unwrap(), m.module);
        let f = ff.load(&m.module).unwrap();
        // f64: W = U (diag(s) + g M) V^T with M scattered on (rows, cols).
        let g = 1.0 / (1.0 + (-(m.gamma as f64)).exp());
        let r = f.r;
        let mut c = vec![0.0f64; r * r];
        for i in 0..r {
            c[i * r + i] = f.s[i] as f64;
        }
        for k in 0..m.coefficients.len() {
            c[m.rows[k] as usize * r + m.cols[k] as usize] += g * m.coefficients[k] as f64;
        }
        let w = ck.read_f32(&m.weight).unwrap();
        let (mut err, mut max_delta) = (0.0f64, 0.0f64);
        for p in 0..f.d_out {
            for q in 0..f.d_in {
                let mut want = 0.0;
                let mut base = 0.0;
                for i in 0..r {
                    let ui = f.u[p * r + i] as f64;
                    base += ui * f.s[i] as f64 * f.v[q * r + i] as f64;
                    for j in 0..r {
                        want += ui * c[i * r + j] * f.v[q * r + j] as f64;
                    }
                }
                err = err.max((w[p * f.d_in + q] as f64 - want).abs());
                max_delta = max_delta.max((want - base).abs());
            }
        }
        assert!(err < 1e-5, "{}: {err}", m.module);
        let reported = row["max_abs_diff"].as_f64().unwrap();
        assert!((reported - max_delta).abs() < 1e-4 && reported > 1e-3, "{}: {reported} vs {max_delta}", m.module);
    }
}

fn copy(src: &Path, dst: &Path) -> PathBuf {
    std::fs::copy(src, dst).unwrap();
    dst.to_path_buf()
}

#[test]
fn wrong_base_and_damaged_files_are_named_errors() {
    let (dir, _, factors, adapter) = setup("merge-errors-a", Dt::F32, 0);
    let (_, _, other_factors, _) = setup("merge-errors-b", Dt::F32, 99);
    let out = dir.join("out.safetensors");
    let merge = |f: &Path, a: &Path| svft_err(&["merge", "--factors", s(f), "--adapter", s(a), "-o", s(&out)]);

    // Same shapes, another model: the base checksum tells.
    let err = merge(&other_factors, &adapter);
    assert!(err.contains("wrong base") && err.contains("checksum"), "{err}");
    // Other shapes.
    let small = temp_dir("merge-errors-c");
    let model = small.join("m.safetensors");
    write_checkpoint(&model, &bert_tensors(1, 8, Dt::F32), None);
    let f8 = small.join("f.safetensors");
    svft_ok(&["decompose", s(&model), "-o", s(&f8)]);
    let err = merge(&f8, &adapter);
    assert!(err.contains("wrong base") && err.contains("12x12") && err.contains("8x8"), "{err}");
    // A module the factors lack.
    svft_ok(&[
        "decompose",
        s(&dir.join("model.safetensors")),
        "-o",
        s(&small.join("q.safetensors")),
        "--targets",
        "query",
    ]);
    let err = merge(&small.join("q.safetensors"), &adapter);
    assert!(err.contains("wrong base") && err.contains("no module"), "{err}");
    // A merge --model whose weights do not fit.
    let err =
        svft_err(&["merge", "--factors", s(&factors), "--adapter", s(&adapter), "-o", s(&out), "--model", s(&model)]);
    assert!(err.contains("wrong model"), "{err}");

    let bytes = std::fs::read(&adapter).unwrap();
    // Truncated.
    let cut = dir.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 9]).unwrap();
    let err = merge(&factors, &cut);
    assert!(err.contains("truncated") && err.contains("cut.safetensors"), "{err}");
    // Corrupt header.
    let mut bad = bytes.clone();
    bad[9] = b'@';
    std::fs::write(&cut, &bad).unwrap();
    let err = merge(&factors, &cut);
    assert!(err.contains("corrupt header"), "{err}");
    // Corrupt data: one flipped bit in a coefficient.
    let mut a = Adapter::load(&adapter).unwrap();
    a.modules[2].coefficients[5] = 0.5;
    let flipped = dir.join("flipped.safetensors");
    a.save(&flipped).unwrap();
    let mut raw = std::fs::read(&flipped).unwrap();
    let pos = raw.windows(4).rposition(|w| w == 0.5f32.to_le_bytes()).unwrap();
    raw[pos + 3] ^= 0x01;
    std::fs::write(&flipped, raw).unwrap();
    let err = merge(&factors, &flipped);
    assert!(err.contains("corrupt") && err.contains("checksum"), "{err}");
    // Unknown version.
    let v99 = copy(&adapter, &dir.join("v99.safetensors"));
    set_metadata(&v99, "format_version", "99");
    let err = merge(&factors, &v99);
    assert!(err.contains("unsupported adapter format version `99`"), "{err}");
    // Not an adapter at all, or the files swapped.
    let err = merge(&factors, &dir.join("model.safetensors"));
    assert!(err.contains("not an SVFT adapter"), "{err}");
    let err = merge(&adapter, &factors);
    assert!(err.contains("not a factor file"), "{err}");
    // Damaged factor file: a changed singular value fails its checksum.
    let mut raw = std::fs::read(&factors).unwrap();
    let n = raw.len();
    raw[n - 3] ^= 0x40;
    let damaged = dir.join("damaged-factors.safetensors");
    std::fs::write(&damaged, raw).unwrap();
    let err = merge(&damaged, &adapter);
    assert!(err.contains("checksum"), "{err}");
    // Unknown factor file version.
    let f99 = copy(&factors, &dir.join("f99.safetensors"));
    set_metadata(&f99, "format_version", "1");
    let err = merge(&f99, &adapter);
    assert!(err.contains("unsupported factor file format version `1`"), "{err}");
}
