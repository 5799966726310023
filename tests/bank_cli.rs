//! `svft bench --adapters`: a tiny run prints every table of the report, JSON parses, and bad
//! arguments are errors with a message (never a panic).

use std::process::Command;

fn svft(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_svft")).args(args).output().expect("running svft");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bench_adapters_runs_and_reports() {
    let base =
        ["bench", "--backend", "cpu", "--adapters", "1,3", "--adapter-shapes", "24x16,16x24", "--adapter-tokens", "9"];
    let (ok, out, err) = svft(&[&base[..], &["--seconds", "0.001", "--pattern", "plain"]].concat());
    assert!(ok, "{err}");
    for want in [
        "24x16",
        "16x24",
        "bank/1",
        "LoRA16",
        "crossover 24x16 n=9",
        "resident bytes per adapter",
        "pattern organisation",
    ] {
        assert!(out.contains(want), "missing `{want}`:\n{out}");
    }
    let (ok, out, err) = svft(&[&base[..], &["--seconds", "0.001", "--json"]].concat());
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    assert_eq!(v["rows"].as_array().map(Vec::len), Some(4), "2 shapes x 1 n x 2 counts");
    assert_eq!(v["rows"][1]["adapters"], 3);
}

#[test]
fn bench_adapters_rejects_bad_arguments() {
    for (args, want) in [
        (vec!["--adapters", "0"], "positive"),
        (vec!["--adapters", "2", "--adapter-shapes", "24by16"], "D_OUTxD_IN"),
        (vec!["--adapters", "2", "--adapter-shapes", "0x16"], "positive"),
        (vec!["--adapters", "2", "--dtype", "bf16"], "f32"),
    ] {
        let (ok, _, err) = svft(&[&["bench", "--backend", "cpu", "--seconds", "0.001"][..], &args].concat());
        assert!(!ok && err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}
