//! The ptxas report of the CUDA kernels (issue 3): build.rs compiles kernels/*.cu with
//! `-Xptxas -v` for sm_80 and sm_90a and writes the parsed report as JSON to the file named by
//! `SVFT_PTXAS_REPORT` (set only when nvcc compiled the fatbin). This test asserts that every
//! kernel on every architecture has no stack frame and no register spills, that the report lists
//! exactly the kernels documented in docs/KERNELS.md for both architectures (so a kernel cannot
//! silently drop out of the build), that the host loads exactly the compiled kernels, and prints registers and static shared memory per kernel
//! (written to stderr past the harness's capture, so it shows in CI logs).
//!
//! Without nvcc at build time there is no report: the test prints that it was skipped and
//! passes, unless `SVFT_REQUIRE_KERNELS=1` is set when the test runs (CI), then it fails.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;

use serde_json::Value;

const ARCHS: [&str; 2] = ["sm_80", "sm_90a"];
const KERNELS_MD: &str = include_str!("../docs/KERNELS.md");
const INTERP_H: &str = include_str!("../kernels/interpret/svft_interp.h");

/// Expands `a_{x,y}_b` into `a_x_b`, `a_y_b` (one brace group at most per name, recursively).
fn expand(name: &str) -> Vec<String> {
    match (name.find('{'), name.find('}')) {
        (Some(open), Some(close)) if open < close => name[open + 1..close]
            .split(',')
            .flat_map(|alt| expand(&format!("{}{}{}", &name[..open], alt.trim(), &name[close + 1..])))
            .collect(),
        _ => vec![name.to_string()],
    }
}

/// The kernels docs/KERNELS.md documents: every backquoted name in its `### ` headings,
/// `{f32,bf16,f16}` groups expanded.
fn documented_kernels() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in KERNELS_MD.lines().filter(|l| l.starts_with("### ")) {
        for (i, span) in line.split('`').enumerate() {
            if i % 2 == 1 {
                names.extend(expand(span));
            }
        }
    }
    names
}

/// The kernels with an interpret-mode wrapper: `svft_interp_<kernel>(` in svft_interp.h.
fn interpret_wrappers() -> BTreeSet<String> {
    INTERP_H
        .split("svft_interp_")
        .skip(1)
        .filter_map(|rest| {
            let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))?;
            (rest[end..].starts_with('(')).then(|| rest[..end].to_string())
        })
        .collect()
}

#[test]
fn docs_name_every_interpret_wrapper() {
    let docs = documented_kernels();
    assert!(docs.len() >= 20, "docs/KERNELS.md headings name only {} kernels: {docs:?}", docs.len());
    let wrappers = interpret_wrappers();
    assert_eq!(docs, wrappers, "docs/KERNELS.md headings vs kernels/interpret/svft_interp.h wrappers");
}

/// Writes a line to stderr directly, past the test harness's output capture, so the skip notice
/// and the table show in a plain `cargo test` log.
fn say(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

#[derive(Debug)]
struct Row {
    registers: u64,
    smem_bytes: u64,
    stack_bytes: u64,
    spill_stores: u64,
    spill_loads: u64,
}

fn field(k: &Value, key: &str) -> u64 {
    k.get(key).and_then(Value::as_u64).unwrap_or_else(|| panic!("ptxas report row without integer {key:?}: {k}"))
}

#[test]
fn ptxas_no_spills_every_kernel_both_archs() {
    let Some(path) = option_env!("SVFT_PTXAS_REPORT") else {
        if std::env::var("SVFT_REQUIRE_KERNELS").is_ok_and(|v| v == "1") {
            panic!(
                "SVFT_REQUIRE_KERNELS=1 but the kernels were not compiled (no nvcc at build time): \
                 run scripts/install-cuda-toolchain.sh and rebuild with SVFT_REQUIRE_KERNELS=1"
            );
        }
        say("skipped: kernels were not compiled (no nvcc at build time)");
        return;
    };
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading the ptxas report {path}: {e}"));
    let json: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {path}: {e}"));
    let rows = json.get("kernels").and_then(Value::as_array).unwrap_or_else(|| panic!("{path}: no \"kernels\" array"));

    // (name, arch) -> row; a kernel listed twice for one arch is a parse error.
    let mut report: BTreeMap<(String, String), Row> = BTreeMap::new();
    for k in rows {
        let name = k.get("name").and_then(Value::as_str).unwrap_or_else(|| panic!("row without name: {k}"));
        let arch = k.get("arch").and_then(Value::as_str).unwrap_or_else(|| panic!("row without arch: {k}"));
        let row = Row {
            registers: field(k, "registers"),
            smem_bytes: field(k, "smem_bytes"),
            stack_bytes: field(k, "stack_bytes"),
            spill_stores: field(k, "spill_stores"),
            spill_loads: field(k, "spill_loads"),
        };
        let dup = report.insert((name.to_string(), arch.to_string()), row);
        assert!(dup.is_none(), "{name} ({arch}) is listed twice in {path}");
    }

    // The table: one line per kernel, both architectures side by side.
    let nvcc = json.get("nvcc").and_then(Value::as_str).unwrap_or("?");
    say(&format!("ptxas report ({nvcc}): registers / static smem bytes"));
    say(&format!(
        "{:<28} {:>11} {:>11} {:>11} {:>11}",
        "kernel", "sm_80 regs", "sm_90a regs", "sm_80 smem", "sm_90a smem"
    ));
    let names: BTreeSet<&String> = report.keys().map(|(n, _)| n).collect();
    for name in &names {
        let cell = |arch: &str, f: fn(&Row) -> u64| {
            report.get(&(name.to_string(), arch.to_string())).map_or("-".to_string(), |r| f(r).to_string())
        };
        say(&format!(
            "{:<28} {:>11} {:>11} {:>11} {:>11}",
            name,
            cell("sm_80", |r| r.registers),
            cell("sm_90a", |r| r.registers),
            cell("sm_80", |r| r.smem_bytes),
            cell("sm_90a", |r| r.smem_bytes)
        ));
    }

    let mut failures = Vec::new();
    for ((name, arch), r) in &report {
        if r.stack_bytes != 0 || r.spill_stores != 0 || r.spill_loads != 0 {
            failures.push(format!(
                "{name} ({arch}): {} bytes stack frame, {} bytes spill stores, {} bytes spill loads",
                r.stack_bytes, r.spill_stores, r.spill_loads
            ));
        }
        if !ARCHS.contains(&arch.as_str()) {
            failures.push(format!("{name}: unexpected arch {arch} (expected {ARCHS:?})"));
        }
    }
    let docs = documented_kernels();
    for name in &docs {
        for arch in ARCHS {
            if !report.contains_key(&(name.clone(), arch.to_string())) {
                failures.push(format!("{name} ({arch}): documented in docs/KERNELS.md but missing from the report"));
            }
        }
    }
    for name in names.iter().filter(|n| !docs.contains(**n)) {
        failures.push(format!("{name}: compiled but not documented in docs/KERNELS.md"));
    }
    // What the host loads at startup (svft::cuda::kernel_names) must be what was compiled.
    let loaded: BTreeSet<String> = svft::cuda::kernel_names().into_iter().collect();
    for name in names.iter().filter(|n| !loaded.contains(**n)) {
        failures.push(format!("{name}: compiled but not loaded by Gpu::new (svft::cuda::kernel_names)"));
    }
    for name in loaded.iter().filter(|n| !names.contains(n)) {
        failures.push(format!("{name}: loaded by Gpu::new but not compiled"));
    }
    assert!(failures.is_empty(), "ptxas report {path}:\n  {}", failures.join("\n  "));
    say(&format!("{} kernels x {} archs: 0 bytes stack, 0 spill stores, 0 spill loads", docs.len(), ARCHS.len()));
}
