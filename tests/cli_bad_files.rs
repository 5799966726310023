//! Issue 15's file classes, each through the CLI as a user meets it: metadata that is not what
//! the data says (edited fields, a pattern wider than the rank, two modules on one weight,
//! another dtype), the wrong model given to `merge --model`, an output path that is an input,
//! a write killed midway, and byte-reproducible files. Every case must be a clear error (exit
//! 1, `error:` naming the file or module) that leaves the inputs untouched.

mod cli_support;

use std::path::{Path, PathBuf};

use cli_support::*;
use serde_json::Value;
use svft::adapter::{file_checksum, meta_checksum};
use svft::checkpoint::Checkpoint;

/// A model, its factor file and an adapter (official init, so merging changes the weights).
fn setup(name: &str, dt: Dt) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    let dir = temp_dir(name);
    let model = dir.join("model.safetensors");
    write_checkpoint(&model, &bert_tensors(1, 12, dt), Some(serde_json::json!({"format": "pt"})));
    let factors = dir.join("factors.safetensors");
    svft_ok(&["decompose", s(&model), "-o", s(&factors)]);
    let adapter = dir.join("adapter.safetensors");
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
    ]);
    (dir, model, factors, adapter)
}

/// How much of a hand edit is resealed: nothing, the file's checksum only, or the modules'
/// checksums too (as a user who recomputes every checksum would).
#[derive(Clone, Copy, PartialEq)]
enum Seal {
    None,
    File,
    All,
}

/// Edits module entries of a file's `modules` metadata, then reseals as `seal` says.
fn edit_modules(src: &Path, dst: &Path, seal: Seal, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    std::fs::copy(src, dst).unwrap();
    edit_header(dst, |h| {
        let meta = h["__metadata__"].as_object_mut().unwrap();
        let mut modules: Value = serde_json::from_str(meta["modules"].as_str().unwrap()).unwrap();
        let map = modules.as_object_mut().unwrap();
        edit(map);
        if seal == Seal::All {
            for obj in map.values_mut() {
                let sum = meta_checksum(obj.as_object().unwrap());
                obj["meta_checksum"] = Value::String(sum);
            }
        }
        meta.insert("modules".into(), Value::String(modules.to_string()));
        if seal != Seal::None {
            let strings: std::collections::HashMap<String, String> =
                meta.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string())).collect();
            meta.insert("file_checksum".into(), Value::String(file_checksum(&strings)));
        }
    });
}

const Q: &str = "encoder.layer.0.attention.self.query";
const K: &str = "encoder.layer.0.attention.self.key";

#[test]
fn adapter_metadata_is_checked_not_trusted() {
    let (dir, _, factors, adapter) = setup("bad-meta", Dt::F32);
    let out = dir.join("out.safetensors");
    let edited = dir.join("edited.safetensors");
    let merge = |a: &Path| svft_err(&["merge", "--factors", s(&factors), "--adapter", s(a), "-o", s(&out)]);

    // Any field edited without any checksum: the file's checksum tells.
    edit_modules(&adapter, &edited, Seal::None, |m| m[Q]["gate"] = false.into());
    let err = merge(&edited);
    assert!(err.contains("corrupt metadata") && err.contains("edited or damaged"), "{err}");
    // With the file's checksum resealed, the module's own checksum tells, naming the module.
    for (key, value) in [
        ("pattern", Value::from("banded:100000000")),
        ("gate", Value::from(false)),
        ("dtype", Value::from("bf16")),
        ("weight", Value::from(format!("{K}.weight"))),
        ("d_out", Value::from(1u64 << 40)),
    ] {
        edit_modules(&adapter, &edited, Seal::File, |m| m[Q][key] = value.clone());
        let err = merge(&edited);
        assert!(err.contains("corrupt metadata") && err.contains(Q) && err.contains("checksum"), "{key}: {err}");
    }
    // Resealed by hand: every field is still checked against the data and the factors.
    type Edit = Box<dyn Fn(&mut serde_json::Map<String, Value>)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        ("a pattern wider than the rank", Box::new(|m| m[Q]["pattern"] = "banded:100000000".into()), "below the rank"),
        ("a band that is not its indices", Box::new(|m| m[Q]["pattern"] = "banded:2".into()), "not the banded:2 band"),
        ("two modules on one weight", Box::new(|m| m[K]["weight"] = format!("{Q}.weight").into()), "not its own"),
        ("another dtype than the factors", Box::new(|m| m[Q]["dtype"] = "bf16".into()), "wrong base"),
        ("a rank above min(d_out, d_in)", Box::new(|m| m[Q]["rank"] = 13.into()), "rank 13"),
        ("a shape from nowhere", Box::new(|m| m[Q]["d_in"] = (1u64 << 40).into()), "wrong base"),
    ];
    for (what, edit, want) in cases {
        edit_modules(&adapter, &edited, Seal::All, edit);
        let err = merge(&edited);
        assert!(err.contains(want), "{what}: {err}");
    }
    // Two modules swapped wholesale (names and entries): the base checksums tell.
    edit_modules(&adapter, &edited, Seal::All, |m| {
        let (q, k) = (m[Q].clone(), m[K].clone());
        m[Q] = k;
        m[K] = q;
        m[Q]["weight"] = format!("{Q}.weight").into();
        m[K]["weight"] = format!("{K}.weight").into();
    });
    let err = merge(&edited);
    assert!(err.contains("corrupt") || err.contains("wrong base"), "{err}");

    // Factor files: an edited weight name or residual is caught the same way.
    let f2 = dir.join("f2.safetensors");
    edit_modules(&factors, &f2, Seal::File, |m| m[Q]["weight"] = format!("{K}.weight").into());
    let err = svft_err(&["inspect", s(&f2)]);
    assert!(err.contains("corrupt metadata") && err.contains("checksum"), "{err}");
    edit_modules(&factors, &f2, Seal::All, |m| m[Q]["weight"] = format!("{K}.weight").into());
    let err = svft_err(&["inspect", s(&f2)]);
    assert!(err.contains("not its own"), "{err}");
    // A module's entry deleted (resealed): its tensors belong to nothing, and it is not dropped.
    edit_modules(&adapter, &edited, Seal::All, |m| {
        m.remove(Q);
    });
    let err = merge(&edited);
    assert!(err.contains("belongs to no module") && err.contains(Q), "{err}");
    assert!(!out.exists(), "no failed merge wrote an output");
}

#[test]
fn merge_refuses_the_wrong_model_and_keeps_the_models_dtype() {
    let (dir, model, factors, adapter) = setup("wrong-model", Dt::F32);
    // Same names and shapes, other values: another checkpoint.
    let other = dir.join("other.safetensors");
    let mut tensors = bert_tensors(1, 12, Dt::F32);
    for t in &mut tensors {
        t.values = values(t.values.len(), 777 + t.values.len() as u64);
    }
    write_checkpoint(&other, &tensors, None);
    let out = dir.join("out.safetensors");
    let err =
        svft_err(&["merge", "--factors", s(&factors), "--adapter", s(&adapter), "--model", s(&other), "-o", s(&out)]);
    assert!(err.contains("wrong model") && err.contains(".weight") && err.contains("residual"), "{err}");
    assert!(!out.exists());

    // The same model in bf16 is the same weights rounded: accepted, and every tensor of the
    // output is the model's bf16 (no checkpoint of mixed dtypes).
    let bf16 = dir.join("model-bf16.safetensors");
    write_checkpoint(&bf16, &bert_tensors(1, 12, Dt::BF16), None);
    svft_ok(&["merge", "--factors", s(&factors), "--adapter", s(&adapter), "--model", s(&bf16), "-o", s(&out)]);
    let ck = Checkpoint::open(&out).unwrap();
    let floats: Vec<_> = ck.entries().iter().filter(|e| e.dtype != svft::checkpoint::Dtype::I64).collect();
    assert!(floats.iter().all(|e| e.dtype == svft::checkpoint::Dtype::BF16), "mixed dtypes");
    // And the f32 model itself merges.
    svft_ok(&["merge", "--factors", s(&factors), "--adapter", s(&adapter), "--model", s(&model), "-o", s(&out)]);
}

#[test]
fn an_output_that_is_an_input_is_refused_and_the_input_kept() {
    let (dir, model, factors, adapter) = setup("out-is-in", Dt::F32);
    let keep: Vec<(PathBuf, Vec<u8>)> =
        [&model, &factors, &adapter].iter().map(|p| (p.to_path_buf(), std::fs::read(p).unwrap())).collect();
    // Another spelling of the same path, a symlink and a hard link: identity, not string.
    let dotted = dir.join(".").join("adapter.safetensors");
    let link = dir.join("link.safetensors");
    std::os::unix::fs::symlink(&factors, &link).unwrap();
    let hard = dir.join("hard.safetensors");
    std::fs::hard_link(&model, &hard).unwrap();
    for (args, what) in [
        (vec!["merge", "--factors", s(&factors), "--adapter", s(&adapter), "-o", s(&dotted)], "adapter"),
        (vec!["merge", "--factors", s(&factors), "--adapter", s(&adapter), "-o", s(&link)], "factor file"),
        (
            vec!["merge", "--factors", s(&factors), "--adapter", s(&adapter), "--model", s(&model), "-o", s(&hard)],
            "model file",
        ),
        (vec!["init-adapter", "--factors", s(&factors), "-o", s(&link)], "factor file"),
        (vec!["decompose", s(&model), "-o", s(&hard)], "model"),
    ] {
        let err = svft_err(&args);
        assert!(err.contains("replace an input") && err.contains(what), "{args:?}: {err}");
    }
    for (p, bytes) in keep {
        assert_eq!(std::fs::read(&p).unwrap(), bytes, "{} changed", p.display());
    }
}

#[test]
fn a_killed_write_leaves_no_stray_file() {
    let dir = temp_dir("killed-write");
    let model = dir.join("model.safetensors");
    write_checkpoint(&model, &bert_tensors(4, 256, Dt::F32), None);
    let factors = dir.join("factors.safetensors");
    svft_ok(&["decompose", s(&model), "-o", s(&factors)]);
    let adapter = dir.join("adapter.safetensors");
    svft_ok(&["init-adapter", "--factors", s(&factors), "-o", s(&adapter)]);
    let out = dir.join("out.safetensors");
    let inputs = ["model.safetensors", "factors.safetensors", "adapter.safetensors"];
    // Kill `svft merge --model` at delays spread over its run: whatever the moment, the
    // directory holds the inputs and, at most, a complete output.
    for delay_ms in (0..400).step_by(20) {
        let _ = std::fs::remove_file(&out);
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_svft"))
            .args(["merge", "--factors", s(&factors), "--adapter", s(&adapter), "--model", s(&model), "-o", s(&out)])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = child.kill(); // SIGKILL: no handler runs
        let _ = child.wait();
        let mut names: Vec<String> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.retain(|n| !inputs.contains(&n.as_str()) && n != "out.safetensors");
        assert!(names.is_empty(), "killed after {delay_ms} ms, left {names:?}");
        if out.exists() {
            let ck = Checkpoint::open(&out).unwrap();
            assert!(ck.entries().iter().all(|e| ck.read_bytes(&e.name).is_ok()), "a partial output");
        }
    }
}

#[test]
fn the_same_inputs_give_byte_identical_files() {
    let (dir, model, factors, adapter) = setup("reproducible", Dt::F32);
    let again = |args: &[&str], out: &Path| {
        svft_ok(args);
        std::fs::read(out).unwrap()
    };
    let f2 = dir.join("f2.safetensors");
    assert_eq!(again(&["decompose", s(&model), "-o", s(&f2)], &f2), std::fs::read(&factors).unwrap(), "decompose");
    let a2 = dir.join("a2.safetensors");
    let init = ["init-adapter", "--factors", s(&factors), "-o", s(&a2), "--pattern", "banded:1", "--init", "official"];
    assert_eq!(again(&init, &a2), std::fs::read(&adapter).unwrap(), "init-adapter");
    let (m1, m2) = (dir.join("m1.safetensors"), dir.join("m2.safetensors"));
    let merge = |o: &Path| {
        again(&["merge", "--factors", s(&factors), "--adapter", s(&adapter), "--model", s(&model), "-o", s(o)], o)
    };
    let (b1, b2) = (merge(&m1), merge(&m2));
    // The outputs differ only by nothing: the metadata names the adapter, not the output.
    assert_eq!(b1, b2, "merge");
}
