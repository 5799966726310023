//! Build script: compiles the CUDA kernels (kernels/*.cu) into one fatbin when nvcc is available,
//! and, with the `interpret` feature, the same kernels as C++ for the CPU (kernels/interpret).
//!
//! CUDA (nvcc found):
//!   - every kernels/*.cu is #included into OUT_DIR/svft_kernels.cu and compiled with
//!     `nvcc --fatbin -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a
//!      -gencode arch=compute_80,code=compute_80 -Xptxas -v` into OUT_DIR/svft_kernels.fatbin;
//!   - `cargo::rustc-env=SVFT_FATBIN=<path>` and `cargo::rustc-cfg=svft_kernels`, so Rust can
//!     `#[cfg(svft_kernels)] static FATBIN: &[u8] = include_bytes!(env!("SVFT_FATBIN"));`
//!   - the ptxas report (registers, smem, stack frame, spill stores/loads per kernel and arch) is
//!     parsed into OUT_DIR/svft_ptxas.json, exposed as `SVFT_PTXAS_REPORT`, and a cargo warning
//!     is emitted if any kernel spills or uses a stack frame.
//!
//! nvcc is looked up in: $NVCC, $CUDA_HOME/bin, $CUDA_PATH/bin, $PATH, /usr/local/cuda/bin,
//! <repo>/.toolchain/cuda/bin (scripts/install-cuda-toolchain.sh). Extra nvcc flags:
//! $SVFT_NVCC_FLAGS (whitespace-separated). Without nvcc the crate builds without kernels (one
//! cargo warning, no cfg); with SVFT_REQUIRE_KERNELS=1 a missing nvcc or a failed compile fails
//! the build.
//!
//! Interpret (feature `interpret`): kernels/interpret/interpret.cpp (the .cu files compiled for the CPU
//! plus the `svft_interp_*` extern "C" launch wrappers of kernels/interpret/svft_interp.h) is built
//! with the cc crate (C++17, -O2, pthread) into a static library linked into the crate. It needs
//! only the CUDA headers cuda_bf16.h / cuda_fp16.h, looked up in $SVFT_CUDA_INCLUDE,
//! $CUDA_HOME/include, $CUDA_PATH/include, <nvcc dir>/../include, /usr/local/cuda/include,
//! <repo>/.toolchain/cuda/include; the build fails with a clear message if they are missing.
use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const GENCODE: [&str; 6] = [
    "-gencode",
    "arch=compute_80,code=sm_80",
    "-gencode",
    "arch=compute_90a,code=sm_90a",
    "-gencode",
    "arch=compute_80,code=compute_80",
];

fn main() {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let kernels = root.join("kernels");

    println!("cargo::rustc-check-cfg=cfg(svft_kernels)");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed={}", kernels.display());
    for var in
        ["NVCC", "CUDA_HOME", "CUDA_PATH", "PATH", "SVFT_REQUIRE_KERNELS", "SVFT_NVCC_FLAGS", "SVFT_CUDA_INCLUDE"]
    {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let stamp = root.join(".toolchain/.stamp");
    if stamp.exists() {
        // Re-run when the pip toolchain is (re)installed.
        println!("cargo::rerun-if-changed={}", stamp.display());
    }

    let require = env::var("SVFT_REQUIRE_KERNELS").is_ok_and(|v| v == "1");
    let nvcc = find_nvcc(&root);
    match &nvcc {
        Some(nvcc) => match compile_fatbin(nvcc, &kernels, &out) {
            Ok(()) => {}
            Err(e) if require => panic!("SVFT_REQUIRE_KERNELS=1 and the kernels failed to build:\n{e}"),
            Err(e) => println!(
                "cargo::warning=svft: CUDA kernels failed to compile with {}; building without them: {}",
                nvcc.display(),
                e.lines().next().unwrap_or("")
            ),
        },
        None if require => panic!(
            "SVFT_REQUIRE_KERNELS=1 but nvcc was not found (looked in $NVCC, $CUDA_HOME/bin, \
             $CUDA_PATH/bin, $PATH, /usr/local/cuda/bin, {}); run scripts/install-cuda-toolchain.sh",
            root.join(".toolchain/cuda/bin").display()
        ),
        None => println!(
            "cargo::warning=svft: nvcc not found, building without CUDA kernels \
             (scripts/install-cuda-toolchain.sh installs one; SVFT_REQUIRE_KERNELS=1 makes this an error)"
        ),
    }

    if env::var_os("CARGO_FEATURE_INTERPRET").is_some() {
        build_interpret(&root, nvcc.as_deref());
    }
}

/// Runs `path --version`; true if it is a working nvcc.
fn nvcc_works(path: &Path) -> bool {
    path.is_file() && Command::new(path).arg("--version").output().is_ok_and(|o| o.status.success())
}

fn find_nvcc(root: &Path) -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = env::var_os("NVCC") {
        candidates.push(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(p) = env::var_os(var) {
            candidates.push(PathBuf::from(p).join("bin/nvcc"));
        }
    }
    if let Some(path) = env::var_os("PATH") {
        candidates.extend(env::split_paths(&path).map(|d| d.join("nvcc")));
    }
    candidates.push(PathBuf::from("/usr/local/cuda/bin/nvcc"));
    candidates.push(root.join(".toolchain/cuda/bin/nvcc"));
    candidates.into_iter().find(|p| nvcc_works(p))
}

/// The .cu files of kernels/, sorted.
fn kernel_sources(kernels: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(kernels)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "cu")).collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

fn compile_fatbin(nvcc: &Path, kernels: &Path, out: &Path) -> Result<(), String> {
    let sources = kernel_sources(kernels);
    if sources.is_empty() {
        return Err(format!("no .cu files in {}", kernels.display()));
    }
    // One translation unit, so that one fatbin (one CUmodule) holds every kernel.
    let unit = out.join("svft_kernels.cu");
    let mut text = String::from("// generated by build.rs: every kernels/*.cu in one unit\n");
    for s in &sources {
        text.push_str(&format!("#include \"{}\"\n", s.display()));
    }
    fs::write(&unit, text).map_err(|e| format!("writing {}: {e}", unit.display()))?;

    let fatbin = out.join("svft_kernels.fatbin");
    let mut cmd = Command::new(nvcc);
    cmd.arg("--fatbin")
        .args(["-std=c++17", "-O3"])
        .args(GENCODE)
        .args(["-Xptxas", "-v"])
        .arg("-I")
        .arg(kernels)
        .arg("-o")
        .arg(&fatbin)
        .arg(&unit);
    if let Ok(extra) = env::var("SVFT_NVCC_FLAGS") {
        cmd.args(extra.split_whitespace());
    }
    let output = cmd.output().map_err(|e| format!("running {}: {e}", nvcc.display()))?;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!("nvcc failed ({}):\n{stdout}{stderr}", output.status));
    }
    fs::write(out.join("svft_ptxas.log"), &stderr).map_err(|e| e.to_string())?;

    let report = parse_ptxas(&stderr);
    if report.is_empty() {
        return Err("nvcc succeeded but printed no ptxas report".into());
    }
    let json_path = out.join("svft_ptxas.json");
    fs::write(&json_path, report_json(nvcc, &report)).map_err(|e| e.to_string())?;
    for k in report.iter().filter(|k| k.stack + k.spill_stores + k.spill_loads > 0) {
        println!(
            "cargo::warning=svft: kernel {} ({}) uses {} bytes stack, {} bytes spill stores, {} bytes spill loads",
            k.name, k.arch, k.stack, k.spill_stores, k.spill_loads
        );
    }

    println!("cargo::rustc-env=SVFT_FATBIN={}", fatbin.display());
    println!("cargo::rustc-env=SVFT_PTXAS_REPORT={}", json_path.display());
    println!("cargo::rustc-cfg=svft_kernels");
    Ok(())
}

#[derive(Default, Clone)]
struct KernelInfo {
    name: String,
    arch: String,
    registers: u64,
    smem: u64,
    stack: u64,
    spill_stores: u64,
    spill_loads: u64,
}

/// The number just before `unit` in `line` ("40 registers" -> 40).
fn number_before(line: &str, unit: &str) -> Option<u64> {
    let at = line.find(unit)?;
    line[..at].split_whitespace().last()?.parse().ok()
}

/// Parses `-Xptxas -v` output:
///   ptxas info    : Compiling entry function 'name' for 'sm_80'
///   ptxas info    : Function properties for name
///       0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
///   ptxas info    : Used 40 registers, used 1 barriers, 128 bytes smem, 400 bytes cmem[0]
fn parse_ptxas(text: &str) -> Vec<KernelInfo> {
    let mut kernels = Vec::new();
    let mut cur: Option<KernelInfo> = None;
    for line in text.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            if let Some(k) = cur.take() {
                kernels.push(k);
            }
            let mut parts = rest.split('\'');
            let name = parts.next().unwrap_or("").to_string();
            let arch = parts.nth(1).unwrap_or("").to_string();
            cur = Some(KernelInfo { name, arch, ..Default::default() });
        } else if let Some(k) = cur.as_mut() {
            if line.contains("bytes stack frame") {
                k.stack = number_before(line, "bytes stack frame").unwrap_or(0);
                k.spill_stores = number_before(line, "bytes spill stores").unwrap_or(0);
                k.spill_loads = number_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used") && line.contains("registers") {
                k.registers = number_before(line, "registers").unwrap_or(0);
                k.smem = number_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    if let Some(k) = cur.take() {
        kernels.push(k);
    }
    kernels.sort_by(|a, b| (&a.name, &a.arch).cmp(&(&b.name, &b.arch)));
    kernels
}

fn json_string(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// {"nvcc": "...", "kernels": [{"name", "arch", "registers", "smem_bytes", "stack_bytes",
///  "spill_stores", "spill_loads"}, ...]}; smem_bytes is static shared memory only (the band
/// kernels' dynamic shared memory is set per launch).
fn report_json(nvcc: &Path, kernels: &[KernelInfo]) -> String {
    let rows: Vec<String> = kernels
        .iter()
        .map(|k| {
            format!(
                "    {{\"name\": {}, \"arch\": {}, \"registers\": {}, \"smem_bytes\": {}, \"stack_bytes\": {}, \"spill_stores\": {}, \"spill_loads\": {}}}",
                json_string(&k.name),
                json_string(&k.arch),
                k.registers,
                k.smem,
                k.stack,
                k.spill_stores,
                k.spill_loads
            )
        })
        .collect();
    format!(
        "{{\n  \"nvcc\": {},\n  \"kernels\": [\n{}\n  ]\n}}\n",
        json_string(&nvcc.display().to_string()),
        rows.join(",\n")
    )
}

fn has_cuda_headers(dir: &Path) -> bool {
    dir.join("cuda_bf16.h").is_file() && dir.join("cuda_fp16.h").is_file()
}

fn find_cuda_include(root: &Path, nvcc: Option<&Path>) -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = env::var_os("SVFT_CUDA_INCLUDE") {
        candidates.push(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(p) = env::var_os(var) {
            candidates.push(PathBuf::from(p).join("include"));
        }
    }
    if let Some(bin) = nvcc.and_then(Path::parent) {
        candidates.push(bin.join("../include"));
    }
    candidates.push(PathBuf::from("/usr/local/cuda/include"));
    candidates.push(root.join(".toolchain/cuda/include"));
    candidates.into_iter().find(|d| has_cuda_headers(d))
}

fn build_interpret(root: &Path, nvcc: Option<&Path>) {
    let Some(cuda_include) = find_cuda_include(root, nvcc) else {
        panic!(
            "feature `interpret` needs the CUDA headers cuda_bf16.h and cuda_fp16.h (no nvcc needed); \
             none found in $SVFT_CUDA_INCLUDE, $CUDA_HOME/include, $CUDA_PATH/include, \
             /usr/local/cuda/include or {}. Run scripts/install-cuda-toolchain.sh.",
            root.join(".toolchain/cuda/include").display()
        );
    };
    let interp = root.join("kernels/interpret");
    cc::Build::new()
        .cpp(true)
        .file(interp.join("interpret.cpp"))
        .include(&interp)
        .include(root.join("kernels"))
        .include(&cuda_include)
        .flag("-std=c++17")
        .flag("-pthread")
        .flag_if_supported("-Wno-unknown-pragmas")
        .opt_level(2)
        .warnings(false)
        .compile("svft_interp");
    println!("cargo::rustc-link-lib=pthread");
}
