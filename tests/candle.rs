//! The candle integration (feature `candle`): SvftLinear's custom op against CpuLayer and the
//! f64 reference for every pattern, gate and init on odd shapes; candle autograd through a
//! two-layer stack against central finite differences in f64; model surgery with the CLI's
//! targets and seeds; and the adapter round trip through the CLI's files (`svft init-adapter`,
//! `svft merge`).
#![cfg(feature = "candle")]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::Optimizer;
use common::*;
use svft::adapter::Adapter;
use svft::candle::{AdaptConfig, SvftLinear, SvftModel};
use svft::checkpoint::{f32_to_bytes, write_safetensors, Checkpoint, Dtype};
use svft::cpu::CpuLayer;
use svft::reference::{rel_err, Reference};
use svft::{Init, LayerConfig, Pattern, Plan};

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// A fresh seed per run (time and a counter), printed on failure through the messages: the
/// inputs are new every run, the assertions must hold for all of them.
fn fresh_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    svft::adapter::splitmix64(t ^ COUNT.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9e37_79b9))
}

#[test]
fn candle_op_matches_cpu_layer_and_the_f64_reference() {
    let base = fresh_seed();
    let mut cases = 0;
    for (si, &(d_out, d_in, r)) in SHAPES.iter().enumerate() {
        let f = factors(d_out, d_in, r, base ^ si as u64);
        for spec in PATTERNS {
            let pattern: Pattern = spec.parse().unwrap();
            if !pattern_possible(&pattern, d_out, d_in, r) {
                continue;
            }
            for gate in [false, true] {
                for init in [Init::Zero, Init::Official] {
                    let config = LayerConfig { pattern, init, gate, plan: Plan::Auto, seed: base };
                    let bias = gate.then(|| randn(d_out, base + 1));
                    let mut direct = CpuLayer::new(f.clone(), &config, bias.clone()).unwrap();
                    // Trained state (nonzero M and gamma) for the official init; zero init as is.
                    if init == Init::Official {
                        let k = direct.omega().len();
                        let m: Vec<f32> = randn(k, base + 2).iter().map(|v| v * 0.3).collect();
                        direct.set_coefficients(&m).unwrap();
                        direct.set_gamma(0.7).unwrap();
                    }
                    let mut copy = CpuLayer::new(f.clone(), &config, bias.clone()).unwrap();
                    copy.set_coefficients(direct.coefficients()).unwrap();
                    copy.set_gamma(direct.gamma()).unwrap();
                    let lin = SvftLinear::new(copy).unwrap();
                    let what = format!("{d_out}x{d_in} r={r} {spec} gate={gate} {init} seed={base}");
                    // Leading dims are flattened: n = 1, n between the sizes, n above both.
                    for lead in [vec![1], vec![2, 15], vec![3, 4, 25]] {
                        let n: usize = lead.iter().product();
                        check_case(&lin, &mut direct, &lead, n, base + 10 + n as u64, &what);
                        cases += 1;
                    }
                }
            }
        }
    }
    assert!(cases > 80, "only {cases} cases ran");
}

/// One forward and backward through candle, compared with the CPU layer's stateless pair and
/// with the f64 reference.
fn check_case(lin: &SvftLinear, direct: &mut CpuLayer, lead: &[usize], n: usize, seed: u64, what: &str) {
    let fct = direct.factors().clone();
    let (d_out, d_in, r) = (fct.d_out, fct.d_in, fct.r);
    let dev = Device::Cpu;
    let x = randn(n * d_in, seed);
    let gy = randn(n * d_out, seed + 1);
    let mut xs = lead.to_vec();
    xs.push(d_in);
    let mut ys = lead.to_vec();
    ys.push(d_out);
    let xv = Var::from_vec(x.clone(), xs, &dev).unwrap();
    let y = lin.forward(xv.as_tensor()).unwrap();
    assert_eq!(y.dims(), &ys[..], "{what}: output shape");
    // L = sum(Y * R), so dL/dY = R.
    let rt = Tensor::from_vec(gy.clone(), ys, &dev).unwrap();
    let grads = (&y * &rt).unwrap().sum_all().unwrap().backward().unwrap();
    let dx = values(grads.get(xv.as_tensor()).expect("dX"));
    let dm = values(grads.get(lin.coefficients().as_tensor()).expect("dM"));
    let dgamma = lin.gamma().map(|g| values(grads.get(g.as_tensor()).expect("dgamma"))[0]);
    assert_eq!(dgamma.is_some(), direct.config().gate, "{what}: a gamma variable exactly with the gate");

    // The CPU layer itself, on the same inputs.
    let (mut y_d, mut t) = (poisoned(n * d_out), poisoned(n * r));
    direct.forward_saving(&x, n, &mut y_d, &mut t).unwrap();
    let (mut dx_d, mut dm_d) = (poisoned(n * d_in), poisoned(direct.omega().len()));
    let dg_d = direct.backward_saved(&t, &gy, n, &mut dx_d, &mut dm_d).unwrap();
    let y = values(&y);
    for (name, got, want) in [("Y", &y, &y_d), ("dX", &dx, &dx_d), ("dM", &dm, &dm_d)] {
        let err = rel_err(got, &wide(want));
        assert!(err < 1e-6, "{what} n={n}: {name} differs from CpuLayer's by {err}");
    }
    if let Some(dg) = dgamma {
        assert!((dg - dg_d).abs() <= 1e-6 * (1.0 + dg_d.abs()), "{what}: dgamma {dg} vs CpuLayer's {dg_d}");
    }

    // The f64 reference.
    let refl = Reference::new(
        &fct,
        direct.omega(),
        direct.coefficients(),
        direct.gamma(),
        direct.config().gate,
        direct.bias(),
    );
    let (xw, gw) = (wide(&x), wide(&gy));
    let y_ref = refl.forward(&xw, n);
    let (dx_ref, dm_ref, dg_ref) = refl.backward(&xw, &gw, n);
    for (name, got, want) in [("Y", &y, &y_ref), ("dX", &dx, &dx_ref), ("dM", &dm, &dm_ref)] {
        let err = rel_err(got, want);
        assert!(err < F32_TOL, "{what} n={n}: {name} err {err} against the f64 reference");
    }
    if let Some(dg) = dgamma {
        // One sum of signed terms: its error is measured against the size of the terms.
        let g = refl.g();
        let scale: f64 = g * (1.0 - g) * dm_ref.iter().zip(&refl.m).map(|(d, m)| (d / g * m).abs()).sum::<f64>();
        assert!(
            (dg as f64 - dg_ref).abs() <= F32_TOL * scale.max(f64::MIN_POSITIVE),
            "{what}: dgamma {dg} vs {dg_ref}"
        );
    }
}

/// Two layers with a tanh between them, in f64 through the references.
fn stack_loss(l1: &Reference, l2: &Reference, x: &[f64], rr: &[f64], n: usize) -> f64 {
    let h: Vec<f64> = l1.forward(x, n).iter().map(|v| v.tanh()).collect();
    l2.forward(&h, n).iter().zip(rr).map(|(a, b)| a * b).sum()
}

#[test]
#[allow(clippy::needless_range_loop)] // k indexes both the perturbed value and its gradient
fn autograd_through_a_two_layer_stack_matches_finite_differences() {
    let seed = fresh_seed();
    let dev = Device::Cpu;
    let (d_in, d_mid, d_out, lead) = (11, 9, 7, [2usize, 3]);
    let n = lead.iter().product::<usize>();
    let mk = |d_o: usize, d_i: usize, spec: &str, s: u64, bias: bool| {
        let config = LayerConfig {
            pattern: spec.parse().unwrap(),
            init: Init::Official,
            gate: true,
            seed: s,
            ..Default::default()
        };
        let mut l =
            CpuLayer::new(factors(d_o, d_i, d_o.min(d_i), s), &config, bias.then(|| randn(d_o, s + 1))).unwrap();
        l.set_gamma(0.4).unwrap();
        l
    };
    let l1 = mk(d_mid, d_in, "banded:1", seed, false);
    let l2 = mk(d_out, d_mid, "random:2", seed + 7, true);
    let mut refs =
        [&l1, &l2].map(|l| Reference::new(l.factors(), l.omega(), l.coefficients(), l.gamma(), true, l.bias()));
    let (c1, c2) = (SvftLinear::new(l1).unwrap(), SvftLinear::new(l2).unwrap());

    let x = randn(n * d_in, seed + 20);
    let rr = randn(n * d_out, seed + 21);
    let xv = Var::from_vec(x.clone(), (lead[0], lead[1], d_in), &dev).unwrap();
    let y = c2.forward(&c1.forward(xv.as_tensor()).unwrap().tanh().unwrap()).unwrap();
    let rt = Tensor::from_vec(rr.clone(), (lead[0], lead[1], d_out), &dev).unwrap();
    let grads = (&y * &rt).unwrap().sum_all().unwrap().backward().unwrap();

    let (xw, rw) = (wide(&x), wide(&rr));
    let h = 1e-6;
    let central = |refs: &mut [Reference; 2], set: &dyn Fn(&mut [Reference; 2], f64)| {
        set(refs, h);
        let up = stack_loss(&refs[0], &refs[1], &xw, &rw, n);
        set(refs, -2.0 * h);
        let down = stack_loss(&refs[0], &refs[1], &xw, &rw, n);
        set(refs, h);
        (up - down) / (2.0 * h)
    };
    for (li, lin) in [&c1, &c2].into_iter().enumerate() {
        let dm = values(grads.get(lin.coefficients().as_tensor()).expect("dM"));
        let dg = values(grads.get(lin.gamma().unwrap().as_tensor()).expect("dgamma"));
        let mut numeric = Vec::new();
        for k in 0..dm.len() {
            numeric.push(central(&mut refs, &|r: &mut [Reference; 2], d| r[li].m[k] += d));
        }
        numeric.push(central(&mut refs, &|r: &mut [Reference; 2], d| r[li].gamma += d));
        let got: Vec<f32> = dm.iter().copied().chain(dg).collect();
        let err = rel_err(&got, &numeric);
        assert!(err < F32_TOL, "layer {li}: (dM, dgamma) err {err} against finite differences (seed {seed})");
    }
    let dx = values(grads.get(xv.as_tensor()).expect("dX"));
    let mut numeric = Vec::new();
    let mut xp = xw.clone();
    for i in 0..xw.len() {
        xp[i] = xw[i] + h;
        let up = stack_loss(&refs[0], &refs[1], &xp, &rw, n);
        xp[i] = xw[i] - h;
        let down = stack_loss(&refs[0], &refs[1], &xp, &rw, n);
        xp[i] = xw[i];
        numeric.push((up - down) / (2.0 * h));
    }
    let err = rel_err(&dx, &numeric);
    assert!(err < F32_TOL, "dX err {err} against finite differences (seed {seed})");
}

#[test]
fn bad_inputs_are_candle_errors() {
    let config = LayerConfig { pattern: "banded:1".parse().unwrap(), gate: true, ..Default::default() };
    let lin = SvftLinear::new(CpuLayer::new(factors(6, 5, 5, 1), &config, None).unwrap()).unwrap();
    let dev = Device::Cpu;
    let msg = |r: candle_core::Result<Tensor>| r.expect_err("must fail").to_string();
    assert!(msg(lin.forward(&Tensor::zeros((3, 4), DType::F32, &dev).unwrap())).contains("4 features"));
    assert!(msg(lin.forward(&Tensor::zeros((0, 5), DType::F32, &dev).unwrap())).contains("no tokens"));
    assert!(msg(lin.forward(&Tensor::zeros((3, 5), DType::U32, &dev).unwrap())).contains("not a float"));
    assert!(msg(lin.forward(&Tensor::new(1f32, &dev).unwrap())).contains("scalar"));
    let nan = Tensor::new(&[f32::NAN; 5], &dev).unwrap().reshape((1, 5)).unwrap();
    // A NaN coefficient is refused rather than spread through the model.
    let k = lin.coefficients().elem_count();
    lin.coefficients().set(&Tensor::new(vec![f32::NAN; k].as_slice(), &dev).unwrap()).unwrap();
    assert!(msg(lin.forward(&nan)).contains("coefficients"));
    // Other float dtypes run through f32 and come back in their own dtype.
    let lin = SvftLinear::new(CpuLayer::new(factors(6, 5, 5, 1), &config, None).unwrap()).unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 5), &dev).unwrap();
    let y32 = lin.forward(&x).unwrap();
    for dt in [DType::F64, DType::BF16, DType::F16] {
        let y = lin.forward(&x.to_dtype(dt).unwrap()).unwrap();
        assert_eq!(y.dtype(), dt);
        let diff = (y.to_dtype(DType::F32).unwrap() - &y32).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 0.05, "{dt:?} output far from f32's");
    }
    // A weight that is not 2-D, a bias of the wrong size.
    let w = Tensor::randn(0f32, 1.0, (6, 5), &dev).unwrap();
    assert!(SvftLinear::from_weight(&w.flatten_all().unwrap(), None, &config, None).is_err());
    assert!(SvftLinear::from_weight(&w, Some(&Tensor::zeros(5, DType::F32, &dev).unwrap()), &config, None).is_err());
}

// ---- model surgery and the CLI's files ------------------------------------------------------

struct TempDir(PathBuf);
impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("svft-candle-{}-{name}-{}", std::process::id(), fresh_seed()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A small BERT-named checkpoint: two targeted projections (one with a bias), a norm and a head
/// the default targets skip.
fn write_model(path: &Path, seed: u64) {
    let t = |name: &str, shape: Vec<usize>, s: u64| {
        let n = shape.iter().product();
        (name.to_string(), Dtype::F32, shape, f32_to_bytes(Dtype::F32, &randn(n, seed + s)).unwrap())
    };
    let tensors = vec![
        t("enc.0.attention.self.query.weight", vec![13, 11], 1),
        t("enc.0.attention.self.query.bias", vec![13], 2),
        t("enc.0.intermediate.dense.weight", vec![17, 13], 3),
        t("enc.0.LayerNorm.weight", vec![13], 4),
        t("head.weight", vec![2, 13], 5),
    ];
    write_safetensors(path, &tensors, HashMap::new()).unwrap();
}

fn svft(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_svft")).args(args).output().expect("run svft");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "svft {args:?} failed:\n{text}");
    text
}

#[test]
fn trained_adapter_round_trips_through_the_cli_files() {
    let seed = fresh_seed() % 1000;
    let dir = TempDir::new("roundtrip");
    let (model, factors_path, adapter, merged) = (
        dir.path("model.safetensors"),
        dir.path("f.safetensors"),
        dir.path("a.safetensors"),
        dir.path("m.safetensors"),
    );
    write_model(&model, seed);
    let config = AdaptConfig { pattern: "random:3".into(), init: Init::Official, seed, ..Default::default() };
    let svm = SvftModel::from_checkpoint(&model, &config).unwrap();
    let names: Vec<&str> = svm.modules().map(|(m, _)| m).collect();
    assert_eq!(names, ["enc.0.attention.self.query", "enc.0.intermediate.dense"], "the CLI's default targets");
    assert!(svm.linear("head").is_err());

    // Same per-module patterns and inits as `svft init-adapter` on the same factors.
    svm.save_factors(&factors_path, &model.display().to_string()).unwrap();
    let cli_init = dir.path("init.safetensors");
    let seed_s = seed.to_string();
    let fp = factors_path.to_str().unwrap();
    svft(&[
        "init-adapter",
        "--factors",
        fp,
        "-o",
        cli_init.to_str().unwrap(),
        "--pattern",
        "random:3",
        "--init",
        "official",
        "--seed",
        &seed_s,
    ]);
    svm.save_adapter(&adapter).unwrap();
    let (ours, cli) = (Adapter::load(&adapter).unwrap(), Adapter::load(&cli_init).unwrap());
    assert_eq!(ours, cli, "an untrained SvftModel is what init-adapter writes");

    // Train a few AdamW steps on a random target, through candle's autograd.
    let dev = Device::Cpu;
    let q = svm.linear("enc.0.attention.self.query").unwrap();
    let up = svm.linear("enc.0.intermediate.dense").unwrap();
    let x = Tensor::randn(0f32, 1.0, (4, 5, 11), &dev).unwrap();
    let target = Tensor::randn(0f32, 1.0, (4, 5, 17), &dev).unwrap();
    let fwd = |x: &Tensor| up.forward(&q.forward(x).unwrap().gelu().unwrap()).unwrap();
    let loss = |x: &Tensor| (fwd(x) - &target).unwrap().sqr().unwrap().mean_all().unwrap();
    let mut opt = candle_nn::AdamW::new_lr(svm.vars(), 1e-2).unwrap();
    let before = loss(&x).to_scalar::<f32>().unwrap();
    for _ in 0..5 {
        opt.backward_step(&loss(&x)).unwrap();
    }
    let after = loss(&x).to_scalar::<f32>().unwrap();
    assert!(after < before, "training did not lower the loss: {before} -> {after}");
    svm.save_adapter(&adapter).unwrap();
    let trained = Adapter::load(&adapter).unwrap();
    assert_ne!(trained, cli, "the file holds the trained values");
    assert_eq!(trained.modules[0].rows, cli.modules[0].rows, "training keeps the pattern");

    // Loaded back (with the model's biases): the same function.
    let back = SvftModel::load_adapter(&adapter, &factors_path, Some(&model)).unwrap();
    let fwd_back = {
        let (q, up) =
            (back.linear("enc.0.attention.self.query").unwrap(), back.linear("enc.0.intermediate.dense").unwrap());
        up.forward(&q.forward(&x).unwrap().gelu().unwrap()).unwrap()
    };
    let err = rel_err(&values(&fwd_back), &wide(&values(&fwd(&x))));
    assert!(err < 1e-6, "reloaded adapter computes another function: {err}");

    // `svft merge` takes it: its dense weights are the layers' U C V^T.
    svft(&[
        "merge",
        "--factors",
        fp,
        "--adapter",
        adapter.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "-o",
        merged.to_str().unwrap(),
    ]);
    let ck = Checkpoint::open(&merged).unwrap();
    for (module, lin) in svm.modules() {
        let w = ck.read_f32(&format!("{module}.weight")).unwrap();
        let err = rel_err(&w, &wide(&values(&lin.merge().unwrap())));
        assert!(err < F32_TOL, "{module}: svft merge's weight differs from the layer's by {err}");
    }
    // The VarMap carries the variables under the adapter's names.
    let vm = svm.varmap().unwrap();
    assert!(vm.data().lock().unwrap().contains_key("enc.0.attention.self.query.s_edge"));
    assert_eq!(vm.all_vars().iter().map(|v| v.elem_count()).sum::<usize>(), svm.trainable_params());
}

#[test]
fn factor_file_and_var_builder_paths_adapt_the_same_weights() {
    let seed = fresh_seed() % 1000;
    let dir = TempDir::new("vb");
    let model = dir.path("model.safetensors");
    write_model(&model, seed);
    let fpath = dir.path("f.safetensors");
    svft(&["decompose", model.to_str().unwrap(), "-o", fpath.to_str().unwrap()]);
    let config = AdaptConfig { pattern: "banded:1".into(), targets: Some("query".into()), ..Default::default() };
    let from_file = SvftModel::from_factor_file(&fpath, Some(&model), &config).unwrap();
    assert_eq!(from_file.modules().count(), 1, "targets filter the factor file's modules");
    let dev = Device::Cpu;
    let vb = unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&[&model], DType::F32, &dev).unwrap() };
    let lc = config.layer_config("enc.0.attention.self.query").unwrap();
    let from_vb = svft::candle::svft_linear(11, 13, &lc, vb.pp("enc.0.attention.self.query")).unwrap();
    let x = Tensor::randn(0f32, 1.0, (3, 11), &dev).unwrap();
    let a = values(&from_file.linear("enc.0.attention.self.query").unwrap().forward(&x).unwrap());
    let b = values(&from_vb.forward(&x).unwrap());
    // Zero init: both are the original linear layer, W0 x + bias.
    let ck = Checkpoint::open(&model).unwrap();
    let (w, bias) = (
        ck.read_f32("enc.0.attention.self.query.weight").unwrap(),
        ck.read_f32("enc.0.attention.self.query.bias").unwrap(),
    );
    let xv = values(&x);
    let want: Vec<f64> = (0..3)
        .flat_map(|i| {
            let (w, bias, xv) = (&w, &bias, &xv);
            (0..13).map(move |o| {
                bias[o] as f64 + (0..11).map(|j| w[o * 11 + j] as f64 * xv[i * 11 + j] as f64).sum::<f64>()
            })
        })
        .collect();
    assert!(rel_err(&a, &want) < F32_TOL && rel_err(&b, &want) < F32_TOL, "zero init must reproduce W0 x + b");
}
