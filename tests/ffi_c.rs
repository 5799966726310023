//! The C ABI from C: tests/c/*.c compiled with the system C compiler (`cc`) against
//! include/svft.h and the built library, both shared (libsvft.so) and static (libsvft.a).
//!
//! - `cycle.c` runs create, forward, backward, merge, set coefficients and gate, a second step,
//!   and a rebuild from saved factors; its outputs are checked here against the f64
//!   reference (`svft::reference::Reference`) on the factors and pattern it used.
//! - `bad_input.c` calls every export with wrong arguments and must see the documented status
//!   codes, with zero crashes.
//! - `cuda_cycle.c` runs the cycle on `SVFT_BACKEND_CUDA` with device memory it allocates through
//!   the CUDA driver API (linked against the virtual GPU's libcuda, `$SVFT_VGPU_LIB`, or the
//!   system's) and checks it against the same calls on the CPU backend.

mod cli_support;
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use svft::cpu::CpuLayer;
use svft::reference::{rel_err, Reference};
use svft::rng::Rng;
use svft::svd::Factors;
use svft::{Init, LayerConfig, Pattern, Plan};

const F32_TOL: f64 = 1e-5;

/// target/<profile>/, the directory of the built libsvft.{so,a}: the test binary lives in its
/// deps/ subdirectory.
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).expect("test binary under target/<profile>/deps").to_path_buf();
    for lib in ["libsvft.so", "libsvft.a"] {
        assert!(dir.join(lib).exists(), "{} missing: is [lib] crate-type cdylib + staticlib?", dir.join(lib).display());
    }
    dir
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Link {
    Shared,
    Static,
}

fn compile(src: &str, link: Link) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = lib_dir();
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("ffi_c_{link:?}").to_lowercase());
    std::fs::create_dir_all(&out_dir).unwrap();
    let exe = out_dir.join(src.trim_end_matches(".c"));
    let mut cmd = Command::new("cc");
    cmd.args(["-std=c11", "-O1", "-g", "-Wall", "-Wextra", "-pedantic", "-Werror"])
        .arg("-I")
        .arg(root.join("include"))
        .arg(root.join("tests/c").join(src))
        .arg("-o")
        .arg(&exe);
    match link {
        Link::Shared => {
            cmd.arg("-L").arg(&lib).arg("-lsvft").arg(format!("-Wl,-rpath,{}", lib.display())).arg("-lm");
        }
        Link::Static => {
            cmd.arg(lib.join("libsvft.a"));
            if cfg!(feature = "interpret") {
                cmd.arg("-lstdc++"); // the interpret-mode kernels are C++
            }
            cmd.args(["-lgcc_s", "-lutil", "-lrt", "-lpthread", "-lm", "-ldl", "-lc"]);
        }
    }
    let output = cmd.output().expect("run cc");
    assert!(
        output.status.success(),
        "cc failed for {src} ({link:?}):\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    exe
}

/// Each program, compiled once per link mode for the whole test binary.
fn program(src: &'static str, link: Link) -> PathBuf {
    static BUILT: OnceLock<std::sync::Mutex<std::collections::HashMap<(String, String), PathBuf>>> = OnceLock::new();
    let mut built = BUILT.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    built.entry((src.to_string(), format!("{link:?}"))).or_insert_with(|| compile(src, link)).clone()
}

/// Runs a program under the memory limit; a crash (signal) or a nonzero exit fails with its
/// output.
fn run(exe: &Path, args: &[&Path]) -> String {
    let output = cli_support::limited(exe).args(args).output().expect("run C program");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.code().is_some(),
        "{} crashed ({:?}):\n{stdout}{}",
        exe.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "{} failed ({:?}):\n{stdout}{}",
        exe.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

struct Case {
    d_out: usize,
    d_in: usize,
    n: usize,
    rank: usize, // 0: full
    pattern: &'static str,
    init: Init,
    gate: bool,
    plan: Plan,
    bias: bool,
    seed: u64,
}

const CASES: [Case; 4] = [
    Case {
        d_out: 12,
        d_in: 9,
        n: 5,
        rank: 0,
        pattern: "plain",
        init: Init::Zero,
        gate: false,
        plan: Plan::Factored,
        bias: false,
        seed: 1,
    },
    Case {
        d_out: 13,
        d_in: 17,
        n: 7,
        rank: 0,
        pattern: "banded:2",
        init: Init::Official,
        gate: true,
        plan: Plan::Auto,
        bias: true,
        seed: 2,
    },
    Case {
        d_out: 16,
        d_in: 11,
        n: 40,
        rank: 8,
        pattern: "random:2:seed=5",
        init: Init::Official,
        gate: true,
        plan: Plan::Merged,
        bias: true,
        seed: 3,
    },
    Case {
        d_out: 10,
        d_in: 10,
        n: 3,
        rank: 0,
        pattern: "topk:1",
        init: Init::Official,
        gate: false,
        plan: Plan::Factored,
        bias: false,
        seed: 4,
    },
];

fn put_u64(buf: &mut Vec<u8>, v: u64) {
    buf.extend_from_slice(&v.to_le_bytes());
}
fn put_f32(buf: &mut Vec<u8>, v: &[f32]) {
    v.iter().for_each(|x| buf.extend_from_slice(&x.to_le_bytes()));
}

/// Reads the records `(u64 count, 4-byte data[count])` of cycle.c's output.
fn records(bytes: &[u8]) -> Vec<Vec<[u8; 4]>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let count = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
        at += 8;
        out.push(bytes[at..at + 4 * count].chunks_exact(4).map(|c| c.try_into().unwrap()).collect());
        at += 4 * count;
    }
    out
}

fn f32s(r: &[[u8; 4]]) -> Vec<f32> {
    r.iter().map(|b| f32::from_le_bytes(*b)).collect()
}
fn u32s(r: &[[u8; 4]]) -> Vec<u32> {
    r.iter().map(|b| u32::from_le_bytes(*b)).collect()
}

fn wide(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// Checks one step's outputs (y, dx, dm, dgamma, w) against the f64 reference.
fn check_step(what: &str, outs: &[Vec<f32>], reference: &Reference, x: &[f32], gy: &[f32], n: usize) {
    let (y, dx, dm, dgamma, w) = (&outs[0], &outs[1], &outs[2], outs[3][0], &outs[4]);
    let (dx_ref, dm_ref, dgamma_ref) = reference.backward(&wide(x), &wide(gy), n);
    let errs = [
        ("Y", rel_err(y, &reference.forward(&wide(x), n))),
        ("dX", rel_err(dx, &dx_ref)),
        ("dM", rel_err(dm, &dm_ref)),
        ("W", rel_err(w, &reference.weight())),
    ];
    for (name, err) in errs {
        assert!(err < F32_TOL, "{what}: {name} relative error {err}");
    }
    let g = reference.g();
    let scale: f64 = g * (1.0 - g) * dm_ref.iter().zip(&reference.m).map(|(d, m)| (d / g * m).abs()).sum::<f64>();
    if reference.gate {
        assert!(
            (dgamma as f64 - dgamma_ref).abs() <= F32_TOL * scale.max(1e-30),
            "{what}: dgamma {dgamma} vs {dgamma_ref}"
        );
    } else {
        assert_eq!(dgamma, 0.0, "{what}: dgamma without a gate");
    }
}

fn cycle(link: Link) {
    let exe = program("cycle.c", link);
    for (ci, c) in CASES.iter().enumerate() {
        let what = format!("{link:?} case {ci} ({} {}x{} n={})", c.pattern, c.d_out, c.d_in, c.n);
        let mut rng = Rng::new(100 + ci as u64);
        let w0 = rng.normal_vec(c.d_out * c.d_in, 0.5);
        let bias = c.bias.then(|| rng.normal_vec(c.d_out, 1.0));
        let x = rng.normal_vec(c.n * c.d_in, 1.0);
        let gy = rng.normal_vec(c.n * c.d_out, 1.0);
        let r = if c.rank == 0 { c.d_out.min(c.d_in) } else { c.rank };
        let pattern: Pattern = c.pattern.parse().unwrap();
        let nnz = pattern.size(r).unwrap();
        let m2 = rng.normal_vec(nnz, 0.3);
        let gamma2 = if c.gate { 0.7f32 } else { 0.0 };

        let mut input = Vec::new();
        for v in [c.d_out, c.d_in, c.n, c.rank, c.init as usize, c.gate as usize, c.seed as usize] {
            put_u64(&mut input, v as u64);
        }
        put_u64(
            &mut input,
            match c.plan {
                Plan::Auto => 0,
                Plan::Factored => 1,
                Plan::Merged => 2,
                Plan::SmallN => 3,
            },
        );
        put_u64(&mut input, c.bias as u64);
        put_u64(&mut input, c.pattern.len() as u64);
        input.extend_from_slice(c.pattern.as_bytes());
        put_f32(&mut input, &w0);
        if let Some(b) = &bias {
            put_f32(&mut input, b);
        }
        put_f32(&mut input, &x);
        put_f32(&mut input, &gy);
        put_f32(&mut input, &m2);
        put_f32(&mut input, &[gamma2]);
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let (in_path, out_path) =
            (dir.join(format!("cycle_{link:?}_{ci}.in")), dir.join(format!("cycle_{link:?}_{ci}.out")));
        std::fs::write(&in_path, &input).unwrap();
        let stdout = run(&exe, &[&in_path, &out_path]);
        let recs = records(&std::fs::read(&out_path).unwrap());
        assert_eq!(recs.len(), 18, "{what}: record count");
        let outs: Vec<Vec<f32>> = recs.iter().map(|r| f32s(r)).collect();

        // The factors the C side used: a faithful SVD of W0, and the pattern the spec names.
        let factors = Factors::new(c.d_out, c.d_in, outs[13].clone(), outs[14].clone(), outs[15].clone()).unwrap();
        assert_eq!(factors.r, r);
        if c.rank == 0 {
            assert!(factors.residual(&w0).unwrap() < F32_TOL, "{what}: SVD residual");
        }
        let mut omega = pattern.omega(&factors).unwrap();
        assert_eq!((u32s(&recs[16]), u32s(&recs[17])), (omega.rows.clone(), omega.cols.clone()), "{what}: indices");

        // Initial coefficients and gate: as a Rust layer with the same config starts.
        let config = LayerConfig { pattern, init: c.init, gate: c.gate, plan: c.plan, seed: c.seed };
        let rust = CpuLayer::new(factors.clone(), &config, bias.clone()).unwrap();
        assert_eq!(outs[5], rust.coefficients(), "{what}: initial M");
        assert_eq!(outs[6], [0.0], "{what}: initial gamma");

        // Sizes.
        let fields: Vec<usize> = stdout.split_whitespace().skip(1).map(|v| v.parse().unwrap()).collect();
        let saved = match rust.plan_for(c.n) {
            svft::ExecPlan::Factored | svft::ExecPlan::SmallN => 4 * c.n * r,
            svft::ExecPlan::Merged => 4 * c.n * c.d_in,
        };
        assert_eq!(fields[..5], [c.d_out, c.d_in, r, nnz, nnz + c.gate as usize], "{what}: shape {stdout}");
        assert_eq!(fields[6..], [saved, rust.persistent_bytes()], "{what}: memory {stdout}");
        assert!(fields[5] >= saved, "{what}: workspace below saved bytes");

        // Step 1 (initial parameters), step 2 (m2, gamma2), and the rebuilt layer.
        omega = rust.omega().clone();
        let r1 = Reference::new(&factors, &omega, &outs[5], 0.0, c.gate, bias.as_deref());
        check_step(&format!("{what} step 1"), &outs[0..5], &r1, &x, &gy, c.n);
        let r2 = Reference::new(&factors, &omega, &m2, gamma2, c.gate, bias.as_deref());
        check_step(&format!("{what} step 2"), &outs[7..12], &r2, &x, &gy, c.n);
        assert!(rel_err(&outs[12], &wide(&outs[7])) < 1e-6, "{what}: layer rebuilt from factors differs");
    }
}

#[test]
fn cycle_shared() {
    cycle(Link::Shared);
}

#[test]
fn cycle_static() {
    cycle(Link::Static);
}

fn bad_input(link: Link) {
    let stdout = run(&program("bad_input.c", link), &[]);
    let last = stdout.lines().last().unwrap_or_default();
    assert!(last.starts_with("checks ") && last.ends_with(" failures 0"), "{link:?}:\n{stdout}");
    let checks: usize = last.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(checks > 100, "only {checks} checks ran");
}

#[test]
fn bad_input_shared() {
    bad_input(Link::Shared);
}

#[test]
fn bad_input_static() {
    bad_input(Link::Static);
}

/// The header is also valid C++ (when a C++ compiler is present).
#[test]
fn header_compiles_as_cpp() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let Ok(output) = Command::new("c++")
        .args(["-std=c++11", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-x", "c++"])
        .arg(root.join("include/svft.h"))
        .output()
    else {
        eprintln!("skipped: no c++ compiler");
        return;
    };
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}

// ---- cuda_cycle.c: the C ABI on CUDA with the caller's own device memory and stream ----------

/// The folder holding `cuda.h`: $CUDA_HOME, $CUDA_PATH, the pip toolchain, /usr/local/cuda.
fn cuda_include() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let from_env = ["CUDA_HOME", "CUDA_PATH"].into_iter().filter_map(std::env::var_os).map(PathBuf::from);
    from_env
        .chain([root.join(".toolchain/cuda"), PathBuf::from("/usr/local/cuda")])
        .map(|d| d.join("include"))
        .find(|d| d.join("cuda.h").is_file())
}

/// The CUDA driver library to link: the virtual GPU's when `$SVFT_VGPU_LIB` is set (and only
/// then, so that a test run on the virtual GPU never picks up a real driver), else the system's.
fn cuda_driver() -> std::result::Result<PathBuf, String> {
    let dirs: Vec<PathBuf> = match common::vgpu_lib_dir("lib") {
        Some(d) => vec![PathBuf::from(d)],
        None => ["/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/lib64"]
            .into_iter()
            .map(PathBuf::from)
            .collect(),
    };
    dirs.iter()
        .flat_map(|d| [d.join("libcuda.so"), d.join("libcuda.so.1")])
        .find(|p| p.is_file())
        .ok_or_else(|| format!("no CUDA driver library (libcuda.so) in {dirs:?}"))
}

/// Builds cuda_cycle.c against the shared libsvft and the driver library `libcuda`.
fn compile_cuda_cycle(cuda_include: &Path, libcuda: &Path) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = lib_dir();
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ffi_c_cuda");
    std::fs::create_dir_all(&out_dir).unwrap();
    let exe = out_dir.join("cuda_cycle");
    // The run path: libsvft's folder, libcuda's, and the folder of the file it links to (the
    // virtual GPU's libcuda.so is a link to a library of another soname, which is what the
    // program then needs).
    let real = std::fs::canonicalize(libcuda).unwrap();
    let rpath = [&lib, libcuda.parent().unwrap(), real.parent().unwrap()].map(|d| d.display().to_string()).join(":");
    let output = Command::new("cc")
        .args(["-std=c11", "-O1", "-g", "-Wall", "-Wextra", "-pedantic", "-Werror"])
        .arg("-I")
        .arg(root.join("include"))
        .arg("-isystem") // cuda.h is not ours to keep -pedantic clean
        .arg(cuda_include)
        .arg(root.join("tests/c/cuda_cycle.c"))
        .arg("-o")
        .arg(&exe)
        .arg("-L")
        .arg(&lib)
        .arg("-lsvft")
        .arg(libcuda)
        .arg(format!("-Wl,-rpath,{rpath}"))
        .arg("-lm")
        .output()
        .expect("run cc");
    assert!(
        output.status.success(),
        "cc failed for cuda_cycle.c:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    exe
}

/// Skips `test` with `why` in one line (logged for scripts/test.sh), or fails with
/// SVFT_REQUIRE_GPU=1.
fn skip_gpu_test(test: &str, why: &str) {
    assert!(!common::gpu_required(), "{test}: SVFT_REQUIRE_GPU=1 but {why}");
    common::gpu_log(&format!("skipped: {test}: {why}"));
    println!("{test}: skipped: {why}");
}

#[test]
fn cuda_cycle() {
    const TEST: &str = "cuda_cycle";
    let Some(include) = cuda_include() else {
        return skip_gpu_test(TEST, "no cuda.h (set CUDA_HOME or run scripts/install-cuda-toolchain.sh)");
    };
    let libcuda = match cuda_driver() {
        Ok(p) => p,
        Err(why) => return skip_gpu_test(TEST, &why),
    };
    let exe = compile_cuda_cycle(&include, &libcuda);
    // libsvft opens the driver by name (cudarc's dlopen, which does not see the program's run
    // path): the folder of the libcuda it was linked with goes first on the loader path.
    let mut path = vec![libcuda.parent().unwrap().to_path_buf()];
    path.extend(
        std::env::var_os("LD_LIBRARY_PATH").map(|p| std::env::split_paths(&p).collect::<Vec<_>>()).unwrap_or_default(),
    );
    // Under the memory limit too: the virtual GPU maps each device allocation (with red zones)
    // from host memory, which counts, and the cycle's buffers are small.
    let output = cli_support::limited(&exe)
        .env("LD_LIBRARY_PATH", std::env::join_paths(path).unwrap())
        .output()
        .expect("run cuda_cycle");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let text = format!("{stdout}{}", String::from_utf8_lossy(&output.stderr));
    match output.status.code() {
        Some(0) => {
            let device = stdout.lines().find_map(|l| l.strip_prefix("device: ")).unwrap_or("?");
            let last = stdout.lines().last().unwrap_or_default();
            assert!(last.starts_with("cuda_cycle: ") && last.ends_with(" 0 failures"), "{TEST}:\n{text}");
            common::gpu_log(&format!("ran: {TEST} on {device}"));
        }
        Some(77) => skip_gpu_test(TEST, stdout.trim().trim_start_matches("skipped: ")),
        _ => panic!("{} failed ({:?}):\n{text}", exe.display(), output.status),
    }
}
