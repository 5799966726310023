//! `svft decompose` on hand-written checkpoints: f32, bf16, f16 and sharded; the default targets
//! pick exactly the projections; the factor file reproduces every weight; bad inputs are clear
//! errors that name the problem.

mod cli_support;

use cli_support::*;
use svft::adapter::FactorFile;

/// Relative Frobenius error of `U diag(s) V^T` against `w`.
fn rel_err(f: &svft::svd::Factors, w: &[f32]) -> f64 {
    f.residual(w).unwrap()
}

#[test]
fn f32_checkpoint_default_targets_and_exact_factors() {
    let dir = temp_dir("decompose-f32");
    let tensors = bert_tensors(2, 16, Dt::F32);
    let model = dir.join("model.safetensors");
    write_checkpoint(&model, &tensors, Some(serde_json::json!({"format": "pt"})));
    let out = dir.join("f.safetensors");
    let v = svft_json(&["decompose", s(&model), "-o", s(&out), "--json"]);
    let names: Vec<&str> = v["modules"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    let mut want = projection_names(&tensors);
    want.sort_by(|a, b| svft::checkpoint::natural_cmp(a, b));
    assert_eq!(names, want, "default targets: the 12 projections, nothing else");
    for m in v["modules"].as_array().unwrap() {
        let r = m["residual"].as_f64().unwrap();
        assert!(r < 1e-5, "{m}");
        assert!(m["ms"].as_f64().unwrap() >= 0.0);
    }
    let ff = FactorFile::open(&out).unwrap();
    assert_eq!(ff.modules().len(), 12);
    for t in tensors.iter().filter(|t| want.contains(&t.name)) {
        let info = ff.modules().iter().find(|m| m.weight == t.name).unwrap();
        assert_eq!((info.d_out, info.d_in, info.rank), (t.shape[0], t.shape[1], t.shape[0].min(t.shape[1])));
        let f = ff.load(&info.module).unwrap();
        assert!(rel_err(&f, &t.values) < 1e-5, "{}", t.name);
    }
    // The table names every module with its shape and residual.
    let table = svft_ok(&["decompose", s(&model), "-o", s(&out)]);
    assert!(table.contains("encoder.layer.1.intermediate.dense.weight") && table.contains("64x16"), "{table}");
    assert!(table.contains("largest residual"), "{table}");
}

#[test]
fn bf16_and_f16_checkpoints() {
    for (dt, name) in [(Dt::BF16, "bf16"), (Dt::F16, "f16")] {
        let dir = temp_dir(&format!("decompose-{name}"));
        let tensors = bert_tensors(1, 16, dt);
        let model = dir.join("model.safetensors");
        write_checkpoint(&model, &tensors, None);
        // f32 factors of the half-precision weights: exact up to f32.
        let out = dir.join("f32.safetensors");
        let v = svft_json(&["decompose", s(&model), "-o", s(&out), "--json"]);
        assert_eq!(v["storage_dtype"], "f32");
        assert!(v["max_residual"].as_f64().unwrap() < 1e-5, "{v}");
        let ff = FactorFile::open(&out).unwrap();
        let q = tensors.iter().find(|t| t.name == "encoder.layer.0.attention.self.query.weight").unwrap();
        let info = ff.get("encoder.layer.0.attention.self.query").unwrap();
        assert_eq!(svft::checkpoint::dtype_name(info.dtype), name);
        assert!(rel_err(&ff.load(&info.module).unwrap(), &dt.round(&q.values)) < 1e-5);
        // Factors stored in the model's dtype: half the size, residual at that precision.
        let out16 = dir.join("model-dtype.safetensors");
        let v = svft_json(&["decompose", s(&model), "-o", s(&out16), "--dtype", "model", "--json"]);
        assert_eq!(v["storage_dtype"], name);
        let r = v["max_residual"].as_f64().unwrap();
        assert!(r > 1e-6 && r < 3e-2, "{name}: {r}");
        let ff16 = FactorFile::open(&out16).unwrap();
        assert_eq!(svft::checkpoint::dtype_name(ff16.storage_dtype().unwrap()), name);
        assert!(std::fs::metadata(&out16).unwrap().len() < std::fs::metadata(&out).unwrap().len() * 6 / 10);
        // Checksums cover the stored (rounded) values, so loading verifies.
        ff16.load("encoder.layer.0.output.dense").unwrap();
    }
}

#[test]
fn sharded_checkpoint_by_index_directory_or_name() {
    let dir = temp_dir("decompose-sharded");
    let tensors = bert_tensors(2, 8, Dt::F32);
    let index = write_sharded(&dir, &tensors, 3);
    let out = dir.join("f.safetensors");
    let v = svft_json(&["decompose", s(&index), "-o", s(&out), "--json"]);
    assert_eq!(v["modules"].as_array().unwrap().len(), 12);
    // The directory, and the missing `model.safetensors` next to its index, open the same.
    for path in [dir.clone(), dir.join("model.safetensors")] {
        let v2 = svft_json(&["decompose", s(&path), "-o", s(&out), "--json"]);
        let names = |v: &serde_json::Value| -> Vec<String> {
            v["modules"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap().to_string()).collect()
        };
        assert_eq!(names(&v2), names(&v));
    }
    let table = svft_ok(&["decompose", s(&index), "-o", s(&out)]);
    assert!(table.contains("3 shards"), "{table}");
    // A default output name next to the model.
    svft_ok(&["decompose", s(&index)]);
    assert!(dir.join("model.svft-factors.safetensors").is_file());
    // A shard that lacks a tensor the index lists.
    let mut idx: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
    idx["weight_map"]["encoder.layer.0.attention.self.query.weight"] =
        serde_json::json!("model-00003-of-00003.safetensors");
    std::fs::write(&index, idx.to_string()).unwrap();
    let err = svft_err(&["decompose", s(&index), "-o", s(&out)]);
    assert!(err.contains("encoder.layer.0.attention.self.query.weight") && err.contains("lacks"), "{err}");
}

#[test]
fn targets_rank_and_bad_inputs() {
    let dir = temp_dir("decompose-errors");
    let tensors = bert_tensors(1, 8, Dt::F32);
    let model = dir.join("model.safetensors");
    write_checkpoint(&model, &tensors, None);
    let out = dir.join("f.safetensors");
    let v = svft_json(&["decompose", s(&model), "-o", s(&out), "--targets", r"query\.weight$", "--json"]);
    assert_eq!(v["modules"].as_array().unwrap().len(), 1);
    let v = svft_json(&["decompose", s(&model), "-o", s(&out), "--targets", "pooler", "--rank", "3", "--json"]);
    assert_eq!(v["modules"][0]["rank"], 3);

    let err = svft_err(&["decompose", s(&model), "--targets", "nothing-matches"]);
    assert!(err.contains("matches --targets"), "{err}");
    let err = svft_err(&["decompose", s(&model), "--targets", "(unclosed"]);
    assert!(err.contains("invalid --targets regex"), "{err}");
    let err = svft_err(&["decompose", s(&model), "--rank", "99", "-o", s(&out)]);
    assert!(err.contains("rank 99"), "{err}");
    let err = svft_err(&["decompose", s(&dir.join("missing.safetensors"))]);
    assert!(err.contains("missing.safetensors"), "{err}");
    if svft::cuda::device_count().is_err() {
        // No usable GPU here: --backend cuda says why; --backend auto falls back to the CPU.
        let err = svft_err(&["decompose", s(&model), "--backend", "cuda", "-o", s(&out)]);
        assert!(err.contains("CUDA"), "{err}");
        let v = svft_json(&["decompose", s(&model), "--backend", "auto", "-o", s(&out), "--json"]);
        assert_eq!(v["backend"], "cpu");
    }

    // Truncated: the data section is cut short.
    let bytes = std::fs::read(&model).unwrap();
    let cut = dir.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let err = svft_err(&["decompose", s(&cut), "-o", s(&out)]);
    assert!(err.contains("truncated"), "{err}");
    // Cut inside the header.
    std::fs::write(&cut, &bytes[..20]).unwrap();
    let err = svft_err(&["decompose", s(&cut), "-o", s(&out)]);
    assert!(err.contains("truncated"), "{err}");
    // Corrupt header: not JSON.
    let mut bad = bytes.clone();
    bad[8..16].copy_from_slice(b"#garbage");
    std::fs::write(&cut, &bad).unwrap();
    let err = svft_err(&["decompose", s(&cut), "-o", s(&out)]);
    assert!(err.contains("corrupt header") && err.contains("JSON"), "{err}");
    // Not a safetensors file at all (an absurd header length).
    std::fs::write(&cut, b"this is not a safetensors file, just text").unwrap();
    let err = svft_err(&["decompose", s(&cut), "-o", s(&out)]);
    assert!(err.contains("corrupt header"), "{err}");
    // Offsets that do not fit the shape.
    std::fs::write(&cut, &bytes).unwrap();
    edit_header(&cut, |h| h["pooler.dense.weight"]["shape"] = serde_json::json!([8, 9]));
    let err = svft_err(&["decompose", s(&cut), "-o", s(&out)]);
    assert!(err.contains("corrupt header") && err.contains("pooler.dense.weight"), "{err}");
}
