//! The bank kernels (kernels/bank.cu) in interpret mode: `bank_apply_fwd` against the CPU bank's
//! own core pass ([`CpuBank::core_into`], its twin) and both directions against an f64 dense
//! reference built from each adapter's core, for bands (plain, banded:1, banded:3) and CSR
//! patterns (random with duplicates, top-k, and a band's indices reversed under a random label),
//! odd shapes, tables with base-weight and empty segments and segments longer than a tile,
//! blocks of 32 and 128 threads, full and grid-strided grids, in f32 and bf16. Outputs are
//! poisoned with NaN before every launch.
#![cfg(feature = "interpret")]

mod common;

use common::{factors, randn, wide, F32_TOL};
use half::bf16;
use svft::bank::layout::KernelLayout;
use svft::bank::{Adapter, CpuBank, Segment, BASE};
use svft::reference::{rel_err, Reference};
use svft::rng::Rng;
use svft::svd::Factors;
use svft::Pattern;

#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct Cfg {
    grid: [u32; 3],
    block: [u32; 3],
    shared_mem_bytes: u32,
}

macro_rules! declare {
    ($($name:ident: $t:ty),*) => {
        extern "C" {
            $(fn $name(
                c: Cfg, x: *const $t, y: *mut $t, s: *const f32, m: *const f32, g: *const f32,
                info: *const i32, ptr: *const i32, idx: *const i32, perm: *const i32,
                tiles: *const i32, ntiles: i32, r: i32,
            ) -> i32;)*
        }
    };
}
declare!(svft_interp_bank_apply_fwd_f32: f32, svft_interp_bank_apply_bwd_f32: f32,
         svft_interp_bank_apply_fwd_bf16: u16, svft_interp_bank_apply_bwd_bf16: u16);

type Launch<T> = unsafe extern "C" fn(
    Cfg,
    *const T,
    *mut T,
    *const f32,
    *const f32,
    *const f32,
    *const i32,
    *const i32,
    *const i32,
    *const i32,
    *const i32,
    i32,
    i32,
) -> i32;

/// Runs one launch of `kernel` over `x` (`n x r`) into a NaN-poisoned output.
#[allow(clippy::too_many_arguments)]
fn launch<T: Copy>(
    kernel: Launch<T>,
    c: Cfg,
    x: &[T],
    nan: T,
    s: &[f32],
    l: &KernelLayout,
    tiles: &[i32],
    r: usize,
) -> Vec<T> {
    let mut y = vec![nan; x.len()];
    // SAFETY: every buffer is as long as the kernel reads or writes (kernels/bank.cu's header):
    // the layout and tiles come from KernelLayout over this bank, x and y are n x r.
    let rc = unsafe {
        kernel(
            c,
            x.as_ptr(),
            y.as_mut_ptr(),
            s.as_ptr(),
            l.m.as_ptr(),
            l.g.as_ptr(),
            l.info.as_ptr(),
            l.ptr.as_ptr(),
            l.idx.as_ptr(),
            l.perm.as_ptr(),
            tiles.as_ptr(),
            (tiles.len() / 3) as i32,
            r as i32,
        )
    };
    assert_eq!(rc, 0, "launch failed");
    y
}

/// `out[b] = C_a x[b]` (forward: `x C^T`) or `x[b] C_a` (backward), in f64, per segment.
fn reference(f: &Factors, bank: &CpuBank, segs: &[Segment], x: &[f64], forward: bool) -> Vec<f64> {
    let r = f.r;
    let mut out = vec![0.0; x.len()];
    for s in segs {
        let core = if s.adapter == BASE {
            let omega = Pattern::Plain.omega_for_rank(r).unwrap();
            Reference::new(f, &omega, &vec![0.0; r], 0.0, false, None).core()
        } else {
            let a = bank.adapter(s.adapter as u32).unwrap();
            Reference::new(f, &a.omega, &a.m, a.gamma, a.gate, None).core()
        };
        for b in s.start..s.end {
            for i in 0..r {
                out[b * r + i] =
                    (0..r).map(|j| if forward { core[i * r + j] } else { core[j * r + i] } * x[b * r + j]).sum();
            }
        }
    }
    out
}

fn bank_for(f: &Factors) -> CpuBank {
    let mut bank = CpuBank::new(f.clone(), None).unwrap();
    let specs = ["plain", "banded:1", "banded:3", "random:2:seed=3", "random:2:seed=8", "topk:1:official"];
    for (k, spec) in specs.iter().enumerate() {
        let p: Pattern = spec.parse().unwrap();
        let Ok(omega) = p.omega(f) else { continue };
        let m = randn(omega.len(), 40 + k as u64);
        bank.add(10 + k as u32, Adapter::new(omega, m, 0.3 * k as f32 - 0.5, k % 2 == 0).unwrap()).unwrap();
    }
    // A band's indices in another order under a random label: the layout must use a CSR.
    let mut odd = Pattern::Banded { d: 1 }.omega_for_rank(f.r).unwrap();
    odd.rows.reverse();
    odd.cols.reverse();
    odd.pattern = Pattern::Random { d: 1, seed: 0 };
    let m = randn(odd.len(), 99);
    bank.add(30, Adapter::new(odd, m, 0.0, true).unwrap()).unwrap();
    bank
}

fn table(n: usize, ids: &[u32], rng: &mut Rng) -> Vec<Segment> {
    let mut segs = Vec::new();
    let mut start = 0;
    while start < n {
        let len = [0, 1, 3, 17, 40][rng.below(5) as usize];
        let end = (start + len).min(n);
        let pick = rng.below(ids.len() as u64 + 1) as usize;
        segs.push(Segment { start, end, adapter: ids.get(pick).map_or(BASE, |&i| i64::from(i)) });
        start = end;
    }
    segs
}

#[test]
fn bank_apply_matches_the_cpu_bank_and_f64() {
    let mut rng = Rng::new(31);
    for (d_out, d_in, r) in [(37, 23, 23), (29, 29, 29), (41, 19, 13)] {
        let f = factors(d_out, d_in, r, r as u64);
        let mut bank = bank_for(&f);
        let ids: Vec<u32> = bank.ids().collect();
        let (fwd, bwd) = (KernelLayout::new(&bank, true).unwrap(), KernelLayout::new(&bank, false).unwrap());
        assert!(fwd.info.chunks(4).any(|i| i[0] == -1) && fwd.info.chunks(4).any(|i| i[0] >= 0), "both kinds");
        for n in [1, 5, 53, 130] {
            let segs = table(n, &ids, &mut rng);
            let mut tiles = Vec::new();
            fwd.tiles(&segs, n, &mut tiles).unwrap();
            let x = randn(n * r, rng.next_u64());
            let mut twin = vec![f32::NAN; n * r];
            bank.core_into(&x, n, &segs, &mut twin).unwrap();
            let xw: Vec<f64> = x.iter().map(|&v| v as f64).collect();
            let (want_f, want_b) = (reference(&f, &bank, &segs, &xw, true), reference(&f, &bank, &segs, &xw, false));
            let e = rel_err(&twin, &want_f);
            assert!(e < F32_TOL, "CPU twin vs f64: {e:e}");
            let ntiles = (tiles.len() / 3) as u32;
            let grids = [(r.div_ceil(32) as u32, ntiles, 32), (r.div_ceil(128) as u32, ntiles, 128), (1, 3, 32)];
            for (gx, gy, block) in grids {
                let c = Cfg { grid: [gx, gy.max(1), 1], block: [block, 1, 1], shared_mem_bytes: 0 };
                let ctx = format!("{d_out}x{d_in} r={r} n={n} grid ({gx}, {gy}) block {block}");
                let y = launch(svft_interp_bank_apply_fwd_f32, c, &x, f32::NAN, &f.s, &fwd, &tiles, r);
                assert!(rel_err(&y, &wide(&twin)) < F32_TOL, "{ctx}: fwd vs the CPU bank");
                assert!(rel_err(&y, &want_f) < F32_TOL, "{ctx}: fwd vs f64");
                let y = launch(svft_interp_bank_apply_bwd_f32, c, &x, f32::NAN, &f.s, &bwd, &tiles, r);
                assert!(rel_err(&y, &want_b) < F32_TOL, "{ctx}: bwd vs f64");
                // bf16 activations: the reference sees the rounded inputs; one rounding on store.
                let xb: Vec<u16> = x.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
                let xr: Vec<f64> = xb.iter().map(|&b| bf16::from_bits(b).to_f64()).collect();
                let nan = bf16::NAN.to_bits();
                for (kernel, layout, forward) in [
                    (svft_interp_bank_apply_fwd_bf16 as Launch<u16>, &fwd, true),
                    (svft_interp_bank_apply_bwd_bf16 as Launch<u16>, &bwd, false),
                ] {
                    let y = launch(kernel, c, &xb, nan, &f.s, layout, &tiles, r);
                    let y: Vec<f32> = y.iter().map(|&b| bf16::from_bits(b).to_f32()).collect();
                    let e = rel_err(&y, &reference(&f, &bank, &segs, &xr, forward));
                    assert!(e < 1e-2, "{ctx}: bf16 forward={forward}: {e:e}");
                }
            }
        }
    }
}

#[test]
fn tiles_cover_the_table_and_bad_tables_are_errors() {
    let f = factors(13, 11, 9, 1);
    let bank = bank_for(&f);
    let layout = KernelLayout::new(&bank, true).unwrap();
    let segs = [Segment::new(0, 40, 10), Segment::base(40, 40), Segment::base(40, 41), Segment::new(41, 45, 30)];
    let mut tiles = Vec::new();
    layout.tiles(&segs, 45, &mut tiles).unwrap();
    let t: Vec<[i32; 3]> = tiles.chunks(3).map(|c| [c[0], c[1], c[2]]).collect();
    let slot10 = t[0][2];
    assert_eq!(t, vec![[0, 16, slot10], [16, 16, slot10], [32, 8, slot10], [40, 1, -1], [41, 4, t[4][2]]]);
    assert_ne!(t[4][2], slot10);
    assert!(layout.tiles(&[Segment::new(0, 45, 77)], 45, &mut tiles).is_err());
    assert!(layout.tiles(&[Segment::new(0, 44, 10)], 45, &mut tiles).is_err());
}
