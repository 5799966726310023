//! [`CudaBank`] on a device (the virtual GPU in CI: scripts/test-vgpu.sh): a mixed batch equals
//! the CPU bank's (itself checked against single layers and f64 in tests/bank.rs) in f32 to the
//! f32 tolerance, in bf16 to 1e-2 and in f16 to 2e-3, with bias, base-weight and empty
//! segments, segments longer than a tile, band and CSR patterns; after a replace or remove the next forward uses the new
//! adapters; a bad table is an error. Outputs are poisoned with NaN before every call.

mod common;

use common::{factors, gpu_or_skip, randn, wide, F32_TOL};
use svft::bank::{Adapter, CpuBank, CudaBank, Segment};
use svft::cuda::Dtype;
use svft::reference::rel_err;
use svft::Pattern;

fn adapters(f: &svft::svd::Factors) -> Vec<(u32, Adapter)> {
    let specs = ["plain", "banded:2", "random:3:seed=4", "random:1:seed=9", "topk:1:official"];
    specs
        .iter()
        .enumerate()
        .filter_map(|(k, spec)| {
            let omega = spec.parse::<Pattern>().unwrap().omega(f).ok()?;
            let m = randn(omega.len(), 7 + k as u64);
            Some((5 * k as u32 + 2, Adapter::new(omega, m, 0.4 - 0.3 * k as f32, k != 1).unwrap()))
        })
        .collect()
}

fn run<T: Dtype>(
    bank: &mut CudaBank<T>,
    x: &[f32],
    n: usize,
    d_out: usize,
    segs: &[Segment],
) -> svft::Result<Vec<f32>> {
    let stream = bank.stream().clone();
    let xd = stream.clone_htod(&x.iter().map(|&v| T::from_f32(v)).collect::<Vec<T>>()).unwrap();
    let mut yd = stream.clone_htod(&vec![T::from_f32(f32::NAN); n * d_out]).unwrap();
    bank.forward(&xd.slice(..), n, segs, &mut yd.slice_mut(..))?;
    Ok(stream.clone_dtoh(&yd).unwrap().into_iter().map(T::to_f32).collect())
}

#[test]
fn cuda_bank_matches_the_cpu_bank() {
    let Some(gpu) = gpu_or_skip("cuda_bank_matches_the_cpu_bank") else { return };
    let stream = gpu.context().new_stream().unwrap();
    let (d_out, d_in, r) = (45, 29, 29);
    let f = factors(d_out, d_in, r, 3);
    let bias = randn(d_out, 4);
    let mut cpu = CpuBank::new(f.clone(), Some(bias.clone())).unwrap();
    let mut g32 = CudaBank::<f32>::new(gpu.clone(), stream.clone(), &f, Some(&bias)).unwrap();
    let mut g16 = CudaBank::<half::bf16>::new(gpu.clone(), stream.clone(), &f, Some(&bias)).unwrap();
    let mut gh = CudaBank::<half::f16>::new(gpu.clone(), stream.clone(), &f, Some(&bias)).unwrap();
    let list = adapters(&f);
    assert!(list.len() == 5, "every pattern exists for a square core");
    for (id, a) in &list {
        cpu.add(*id, a.clone()).unwrap();
        g32.add(*id, a.clone()).unwrap();
        g16.add(*id, a.clone()).unwrap();
        gh.add(*id, a.clone()).unwrap();
    }
    let n = 71;
    let x = randn(n * d_in, 5);
    let ids: Vec<u32> = list.iter().map(|(id, _)| *id).collect();
    let segs = vec![
        Segment::new(0, 3, ids[0]),
        Segment::base(3, 5),
        Segment::new(5, 5, ids[1]),
        Segment::new(5, 40, ids[2]), // longer than a tile
        Segment::new(40, 41, ids[3]),
        Segment::new(41, 60, ids[4]),
        Segment::new(60, 71, ids[1]),
    ];
    type Banks<'a> = (&'a mut CudaBank<f32>, &'a mut CudaBank<half::bf16>, &'a mut CudaBank<half::f16>);
    let check = |cpu: &mut CpuBank, (g32, g16, gh): Banks<'_>, segs: &[Segment], what: &str| {
        let want = wide(&cpu.forward(&x, n, segs).unwrap());
        let e = rel_err(&run(g32, &x, n, d_out, segs).unwrap(), &want);
        assert!(e < F32_TOL, "{what}: f32 {e:e}");
        let e = rel_err(&run(g16, &x, n, d_out, segs).unwrap(), &want);
        assert!(e < 1e-2, "{what}: bf16 {e:e}");
        // f16 keeps 3 more mantissa bits than bf16.
        let e = rel_err(&run(gh, &x, n, d_out, segs).unwrap(), &want);
        assert!(e < 2e-3, "{what}: f16 {e:e}");
    };
    check(&mut cpu, (&mut g32, &mut g16, &mut gh), &segs, "mixed");

    // Replace one adapter by another pattern, remove another (its rows to the base weight).
    let omega = Pattern::Banded { d: 1 }.omega(&f).unwrap();
    let new = Adapter::new(omega.clone(), randn(omega.len(), 77), 1.0, true).unwrap();
    cpu.replace(ids[2], new.clone()).unwrap();
    cpu.remove(ids[3]).unwrap();
    g32.replace(ids[2], new.clone()).unwrap();
    g32.remove(ids[3]).unwrap();
    g16.replace(ids[2], new).unwrap();
    g16.remove(ids[3]).unwrap();
    gh.replace(ids[2], cpu.adapter(ids[2]).unwrap()).unwrap();
    gh.remove(ids[3]).unwrap();
    let rerouted: Vec<Segment> =
        segs.iter().map(|s| if s.adapter == i64::from(ids[3]) { Segment::base(s.start, s.end) } else { *s }).collect();
    check(&mut cpu, (&mut g32, &mut g16, &mut gh), &rerouted, "after replace and remove");

    // The removed id is an error, and so is a table that does not cover the batch.
    let err = run(&mut g32, &x, n, d_out, &segs).unwrap_err().to_string();
    assert!(err.contains("not in the bank"), "{err}");
    assert!(run(&mut g32, &x, n, d_out, &segs[..3]).is_err());
}
