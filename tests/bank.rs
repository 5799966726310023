//! The adapter bank (issue 18): a mixed batch equals every segment run through its own
//! single-adapter layer and through the f64 reference, for every pattern kind, odd shapes,
//! odd and empty segments and base-weight segments; bad tables, ids and adapters are errors;
//! adding, replacing and removing one adapter leaves the others' rows bit for bit unchanged.

mod common;

use common::{factors, poisoned, randn, wide, F32_TOL, SHAPES};
use svft::bank::{Adapter, CpuBank, Segment, BASE};
use svft::cpu::CpuLayer;
use svft::reference::{rel_err, Reference};
use svft::rng::Rng;
use svft::{Error, Init, LayerConfig, Pattern};

/// Pattern specs of every kind, several bands and seeds (the bank's adapters differ in Omega).
const SPECS: [&str; 8] = [
    "plain",
    "banded:1",
    "banded:3",
    "random:2:seed=5",
    "random:2:seed=9",
    "random:4:seed=1",
    "topk:2",
    "topk:1:official",
];

/// One single-adapter layer per spec that exists for these factors (top-k needs a square
/// weight or factor), each with random coefficients and gate; gates alternate on and off.
fn layers(f: &svft::svd::Factors, bias: Option<&[f32]>, seed: u64) -> Vec<CpuLayer> {
    let mut out = Vec::new();
    for (k, spec) in SPECS.iter().enumerate() {
        let pattern: Pattern = spec.parse().unwrap();
        let config = LayerConfig {
            pattern,
            init: Init::Official,
            gate: k % 2 == 0,
            seed: seed + k as u64,
            ..Default::default()
        };
        let Ok(mut layer) = CpuLayer::new(f.clone(), &config, bias.map(<[f32]>::to_vec)) else { continue };
        let m = randn(layer.coefficients().len(), seed * 31 + k as u64);
        layer.set_coefficients(&m).unwrap();
        layer.set_gamma(randn(1, seed + 100 + k as u64)[0]).unwrap();
        out.push(layer);
    }
    out
}

/// A random table over `n` rows: odd lengths, some empty, ids drawn from `ids` and the base.
fn random_table(n: usize, ids: &[u32], rng: &mut Rng) -> Vec<Segment> {
    let mut segs = Vec::new();
    let mut start = 0;
    while start < n {
        let len = match rng.below(6) {
            0 => 0,
            1 => 1 + rng.below(70) as usize, // long enough to span the bank's row pieces
            _ => 1 + 2 * rng.below(4) as usize,
        };
        let end = (start + len).min(n);
        let pick = rng.below(ids.len() as u64 + 1) as usize;
        segs.push(Segment { start, end, adapter: ids.get(pick).map_or(BASE, |&id| i64::from(id)) });
        start = end;
    }
    segs
}

/// Checks `y` (the bank's output for `x`) segment by segment against the single-adapter layer
/// of each segment's id (`by_id`) and the f64 reference (the base weight for BASE).
fn check_rows(
    f: &svft::svd::Factors,
    bias: Option<&[f32]>,
    by_id: &mut [(u32, CpuLayer)],
    x: &[f32],
    y: &[f32],
    segs: &[Segment],
    what: &str,
) {
    let (d_in, d_out) = (f.d_in, f.d_out);
    for s in segs.iter().filter(|s| !s.is_empty()) {
        let (xs, ys) = (&x[s.start * d_in..s.end * d_in], &y[s.start * d_out..s.end * d_out]);
        let reference = if s.adapter == BASE {
            let omega = Pattern::Plain.omega_for_rank(f.r).unwrap();
            Reference::new(f, &omega, &vec![0.0; f.r], 0.0, false, bias)
        } else {
            let layer = &mut by_id.iter_mut().find(|(id, _)| i64::from(*id) == s.adapter).unwrap().1;
            let single = layer.forward(xs, s.len()).unwrap();
            let e = rel_err(ys, &wide(&single));
            assert!(e < F32_TOL, "{what}: segment {s:?} vs its own layer: {e:e}");
            Reference::new(f, layer.omega(), layer.coefficients(), layer.gamma(), layer.config().gate, bias)
        };
        let e = rel_err(ys, &reference.forward(&wide(xs), s.len()));
        assert!(e < F32_TOL, "{what}: segment {s:?} vs the f64 reference: {e:e}");
    }
}

#[test]
fn mixed_batches_equal_each_segment_through_its_own_layer() {
    let mut rng = Rng::new(18);
    for (case, &(d_out, d_in, r)) in SHAPES.iter().enumerate() {
        let f = factors(d_out, d_in, r, case as u64 + 1);
        let bias = (case % 2 == 0).then(|| randn(d_out, 70 + case as u64));
        let mut singles: Vec<(u32, CpuLayer)> = layers(&f, bias.as_deref(), 10 * case as u64)
            .into_iter()
            .enumerate()
            .map(|(k, l)| (3 * k as u32 + 1, l)) // sparse, non-contiguous ids
            .collect();
        assert!(singles.len() >= 6, "{d_out}x{d_in} r={r}: only {} patterns exist", singles.len());
        let mut bank = CpuBank::new(f.clone(), bias.clone()).unwrap();
        for (id, layer) in &singles {
            bank.add_layer(*id, layer).unwrap();
        }
        let ids: Vec<u32> = singles.iter().map(|(id, _)| *id).collect();
        for n in [1, 2, 7, 33, 150, 301] {
            for trial in 0..3 {
                let segs = random_table(n, &ids, &mut rng);
                let x = randn(n * d_in, rng.next_u64());
                let mut y = poisoned(n * d_out);
                bank.forward_into(&x, n, &segs, &mut y).unwrap();
                let what = format!("{d_out}x{d_in} r={r} n={n} trial {trial}");
                check_rows(&f, bias.as_deref(), &mut singles, &x, &y, &segs, &what);
            }
        }
        // Every adapter alone over the whole batch: the bank is the single layer.
        let n = 41;
        let x = randn(n * d_in, 5);
        for (id, layer) in &mut singles {
            let y = bank.forward(&x, n, &[Segment::new(0, n, *id)]).unwrap();
            let e = rel_err(&y, &wide(&layer.forward(&x, n).unwrap()));
            assert!(e < F32_TOL, "adapter {id} alone: {e:e}");
        }
    }
}

#[test]
fn add_replace_remove_leave_the_others_intact() {
    let (d_out, d_in, r) = (29, 35, 27);
    let f = factors(d_out, d_in, r, 7);
    let mut singles: Vec<(u32, CpuLayer)> =
        layers(&f, None, 3).into_iter().enumerate().map(|(k, l)| (k as u32, l)).collect();
    let mut bank = CpuBank::new(f.clone(), None).unwrap();
    for (id, layer) in &singles {
        bank.add(*id, Adapter::from_layer(layer)).unwrap();
    }
    let n = 97;
    let ids: Vec<u32> = singles.iter().map(|(id, _)| *id).collect();
    let segs = random_table(n, &ids, &mut Rng::new(4));
    let x = randn(n * d_in, 11);
    let before = bank.forward(&x, n, &segs).unwrap();
    check_rows(&f, None, &mut singles, &x, &before, &segs, "before");
    let used = |id: u32| segs.iter().any(|s| s.adapter == i64::from(id) && !s.is_empty());
    let victim = *ids.iter().find(|&&id| used(id)).expect("the table uses some adapter");
    let rows_of = |y: &[f32], pred: &dyn Fn(&Segment) -> bool| -> Vec<f32> {
        segs.iter().filter(|s| pred(s)).flat_map(|s| y[s.start * d_out..s.end * d_out].to_vec()).collect()
    };
    let others = |s: &Segment| s.adapter != i64::from(victim);

    // Replace the victim by an adapter with another pattern: its rows change, to the new layer's.
    let config = LayerConfig {
        pattern: "random:3:seed=77".parse().unwrap(),
        init: Init::Official,
        gate: true,
        ..Default::default()
    };
    let new_layer = CpuLayer::new(f.clone(), &config, None).unwrap();
    let old = bank.replace(victim, Adapter::from_layer(&new_layer)).unwrap();
    assert_eq!(old, Adapter::from_layer(&singles.iter().find(|(id, _)| *id == victim).unwrap().1));
    let after = bank.forward(&x, n, &segs).unwrap();
    assert_eq!(rows_of(&before, &others), rows_of(&after, &others), "replace changed another adapter's rows");
    singles.iter_mut().find(|(id, _)| *id == victim).unwrap().1 = new_layer;
    check_rows(&f, None, &mut singles, &x, &after, &segs, "after replace");
    assert_ne!(rows_of(&before, &|s| !others(s)), rows_of(&after, &|s| !others(s)));

    // Remove it: its id is an error in a table, the others' rows stay, its rows can go to the base.
    let removed = bank.remove(victim).unwrap();
    assert_eq!(removed, bank_adapter_of(&singles, victim));
    assert!(!bank.contains(victim) && bank.len() == ids.len() - 1);
    let err = bank.forward(&x, n, &segs).unwrap_err().to_string();
    assert!(err.contains(&format!("adapter id {victim} is not in the bank")), "{err}");
    let rerouted: Vec<Segment> =
        segs.iter().map(|s| if s.adapter == i64::from(victim) { Segment::base(s.start, s.end) } else { *s }).collect();
    let removed_y = bank.forward(&x, n, &rerouted).unwrap();
    assert_eq!(rows_of(&before, &others), rows_of(&removed_y, &others), "remove changed another adapter's rows");
    check_rows(&f, None, &mut singles, &x, &removed_y, &rerouted, "after remove");

    // Add it back under the same id: the table works again, the others still unchanged.
    bank.add(victim, removed).unwrap();
    let again = bank.forward(&x, n, &segs).unwrap();
    assert_eq!(rows_of(&before, &others), rows_of(&again, &others));
    check_rows(&f, None, &mut singles, &x, &again, &segs, "after add");
}

fn bank_adapter_of(singles: &[(u32, CpuLayer)], id: u32) -> Adapter {
    Adapter::from_layer(&singles.iter().find(|(i, _)| *i == id).unwrap().1)
}

#[test]
fn equal_patterns_are_shared_and_dropped_with_their_last_adapter() {
    let f = factors(19, 23, 17, 2);
    let mut bank = CpuBank::new(f.clone(), None).unwrap();
    let omega = |spec: &str| spec.parse::<Pattern>().unwrap().omega(&f).unwrap();
    let adapter = |spec: &str, seed: u64| {
        let o = omega(spec);
        let m = randn(o.len(), seed);
        Adapter::new(o, m, 0.3, true).unwrap()
    };
    for id in 0..10 {
        bank.add(id, adapter(if id < 6 { "banded:2" } else { "random:2:seed=4" }, id as u64)).unwrap();
    }
    assert_eq!(bank.pattern_count(), 2);
    let bytes = bank.resident_bytes();
    let nnz_b = omega("banded:2").len();
    let nnz_r = omega("random:2:seed=4").len();
    // Each adapter keeps its values in the pass layout: a band's diagonal table, a CSR's entries.
    let table = |spec: &str| svft::cpu::sparse::CoreIndex::new(&omega(spec)).table_len();
    assert_eq!((table("banded:2"), table("random:2:seed=4")), (5 * 17, nnz_r));
    assert_eq!(bytes.adapters, 6 * (4 * (table("banded:2") + 1) + 1) + 4 * (4 * (nnz_r + 1) + 1));
    assert!(nnz_b < table("banded:2"));
    for id in 0..10 {
        let a = bank.adapter(id).unwrap();
        assert_eq!(bank.coefficients(id).unwrap(), a.m);
        assert_eq!(a.m, randn(a.omega.len(), id as u64), "M comes back exactly, canonical order");
    }
    assert_eq!(bytes.base, f.bytes());
    for id in 6..10 {
        bank.remove(id).unwrap();
    }
    assert_eq!(bank.pattern_count(), 1, "the random pattern went with its last adapter");
    assert!(bank.resident_bytes().patterns < bytes.patterns);
    // Unshared structures give the same rows (the bench measures what sharing is worth).
    let mut unshared = CpuBank::new(f.clone(), None).unwrap();
    unshared.set_pattern_sharing(false);
    for id in 0..6 {
        unshared.add(id, bank.adapter(id).unwrap()).unwrap();
    }
    assert_eq!(unshared.pattern_count(), 6);
    let n = 40;
    let segs: Vec<Segment> = (0..6).map(|k| Segment::new(k * n / 6, (k + 1) * n / 6, k as u32)).collect();
    let x = randn(n * 23, 3);
    assert_eq!(bank.forward(&x, n, &segs).unwrap(), unshared.forward(&x, n, &segs).unwrap());
}

#[test]
fn bad_tables_ids_and_adapters_are_errors() {
    let (d_out, d_in, r) = (13, 11, 9);
    let f = factors(d_out, d_in, r, 1);
    let bias = randn(d_out, 2);
    let mut bank = CpuBank::new(f.clone(), Some(bias.clone())).unwrap();
    let layer = |f: &svft::svd::Factors, bias: Option<Vec<f32>>| {
        CpuLayer::new(f.clone(), &LayerConfig::official(Pattern::Banded { d: 1 }), bias).unwrap()
    };
    bank.add_layer(1, &layer(&f, Some(bias.clone()))).unwrap();
    let n = 6;
    let x = randn(n * d_in, 4);

    // Tables.
    let invalid = |e: Error, want: &str| {
        let text = e.to_string();
        assert!(matches!(e, Error::InvalidArgument(_)) && text.contains(want), "{text} (wanted `{want}`)");
    };
    let mut y = poisoned(n * d_out);
    for (segs, want) in [
        (vec![], "empty"),
        (vec![Segment::new(0, 3, 1)], "covers rows 0..3"),
        (vec![Segment::new(0, 3, 1), Segment::new(4, 6, 1)], "uncovered"),
        (vec![Segment::new(0, 4, 1), Segment::new(3, 6, 1)], "inside the previous"),
        (vec![Segment::new(0, 7, 1)], "run past"),
        (vec![Segment::new(0, 6, 2)], "adapter id 2 is not in the bank"),
        (vec![Segment { start: 0, end: 6, adapter: -5 }], "invalid"),
        (vec![Segment { start: 0, end: 6, adapter: i64::MAX }], "invalid"),
    ] {
        invalid(bank.forward_into(&x, n, &segs, &mut y).unwrap_err(), want);
        assert!(y.iter().all(|v| v.is_nan()), "a rejected table wrote the output");
    }
    let whole = [Segment::new(0, n, 1)];
    assert!(matches!(bank.forward_into(&x[1..], n, &whole, &mut y), Err(Error::Shape { .. })));
    assert!(matches!(bank.forward_into(&x, n, &whole, &mut y[1..]), Err(Error::Shape { .. })));
    assert!(matches!(bank.forward(&[], 0, &[]), Err(Error::Empty { .. })));

    // Adapters that do not fit the base.
    let other_values = factors(d_out, d_in, r, 99);
    let err = bank.add_layer(2, &layer(&other_values, Some(bias.clone()))).unwrap_err();
    assert!(err.to_string().contains("not over this bank's base"), "{err}");
    assert!(bank.add_layer(2, &layer(&factors(d_out + 1, d_in, r, 1), Some(randn(d_out + 1, 2)))).is_err());
    assert!(bank.add_layer(2, &layer(&f, None)).is_err(), "the base has a bias, the layer none");
    let other_rank = Pattern::Plain.omega_for_rank(r - 1).unwrap();
    invalid(
        bank.add(2, Adapter { omega: other_rank, m: vec![0.0; r - 1], gamma: 0.0, gate: false }).unwrap_err(),
        "rank",
    );
    let plain = Pattern::Plain.omega_for_rank(r).unwrap();
    assert!(matches!(Adapter::new(plain.clone(), vec![0.0; r + 1], 0.0, true), Err(Error::Shape { .. })));
    assert!(matches!(Adapter::new(plain.clone(), vec![f32::NAN; r], 0.0, true), Err(Error::NonFinite { .. })));
    assert!(matches!(Adapter::new(plain.clone(), vec![0.0; r], f32::INFINITY, true), Err(Error::NonFinite { .. })));
    // Public fields can skip Adapter::new: the bank checks again.
    let mut outside = plain.clone();
    outside.rows[0] = r as u32;
    invalid(bank.add(2, Adapter { omega: outside, m: vec![0.0; r], gamma: 0.0, gate: false }).unwrap_err(), "outside");
    assert!(matches!(
        bank.add(2, Adapter { omega: plain.clone(), m: vec![f32::NAN; r], gamma: 0.0, gate: false }),
        Err(Error::NonFinite { .. })
    ));
    assert!(bank.add(2, Adapter { omega: plain.clone(), m: vec![0.0; 2], gamma: 0.0, gate: false }).is_err());
    // A band label on anything but the band, complete and in order, is refused (as from a file).
    let mut reversed = Pattern::Banded { d: 1 }.omega_for_rank(r).unwrap();
    reversed.rows.reverse();
    reversed.cols.reverse();
    let k = reversed.len();
    invalid(
        bank.add(2, Adapter { omega: reversed.clone(), m: vec![0.0; k], gamma: 0.0, gate: false }).unwrap_err(),
        "band",
    );
    // The same indices under a random label are any index set: accepted.
    reversed.pattern = Pattern::Random { d: 1, seed: 0 };
    bank.add(2, Adapter { omega: reversed, m: vec![0.5; k], gamma: 0.0, gate: false }).unwrap();
    bank.remove(2).unwrap();
    assert!(matches!(CpuBank::new(f.clone(), Some(vec![0.0; d_out - 1])), Err(Error::Shape { .. })));

    // Ids.
    let good = Adapter::new(plain, vec![0.5; r], 0.0, true).unwrap();
    invalid(bank.add(1, good.clone()).unwrap_err(), "already in the bank");
    invalid(bank.replace(5, good.clone()).unwrap_err(), "not in the bank");
    invalid(bank.remove(5).unwrap_err(), "not in the bank");
    // None of the failures above changed the bank.
    assert_eq!(bank.len(), 1);
    assert_eq!(bank.ids().collect::<Vec<_>>(), vec![1]);
    let mut y1 = poisoned(n * d_out);
    bank.forward_into(&x, n, &whole, &mut y1).unwrap();
    let e = rel_err(&y1, &wide(&layer(&f, Some(bias)).forward(&x, n).unwrap()));
    assert!(e < F32_TOL, "{e:e}");
}
