//! The segment table of a mixed batch: contiguous row ranges, each served by one adapter of
//! the bank (or by the base weight alone), and its validation.
//!
//! A table is checked in full before any work starts, so a bad table from a request router
//! (or the C ABI) is an error naming the offending segment, never a panic or a silently wrong
//! row: the segments must tile `0..n` exactly and in order (empty segments are allowed, so a
//! router may emit one per adapter whatever its row count), and every id must name an adapter
//! in the bank.

use crate::error::{check_positive, Error, Result};

/// The adapter id of a segment served by the base weight alone (`core = diag(s)`).
pub const BASE: i64 = -1;

/// Rows `start..end` of a batch, served by adapter `adapter` ([`BASE`]: the base weight).
/// `#[repr(C)]`: the C ABI takes an array of these as it is.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// First row.
    pub start: usize,
    /// One past the last row (`start == end`: an empty segment).
    pub end: usize,
    /// The adapter's id, or [`BASE`].
    pub adapter: i64,
}

impl Segment {
    /// Rows `start..end` through adapter `id`.
    pub fn new(start: usize, end: usize, id: u32) -> Self {
        Segment { start, end, adapter: i64::from(id) }
    }

    /// Rows `start..end` through the base weight alone.
    pub fn base(start: usize, end: usize) -> Self {
        Segment { start, end, adapter: BASE }
    }

    /// Rows in the segment.
    pub fn len(&self) -> usize {
        self.end.saturating_sub(self.start)
    }

    /// Whether the segment holds no row.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a validated segment resolves to: [`Resolved::BASE`] or a slot of the bank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolved(pub u32);

impl Resolved {
    /// The base weight.
    pub const BASE: Resolved = Resolved(u32::MAX);
}

/// Checks that `segments` tile `0..n` in order and that every id resolves (`slot_of` maps an
/// adapter id to its slot, `None` when the bank has no such adapter); writes each segment's
/// slot into `out` (cleared first; it keeps its capacity, so a serving loop allocates once).
pub fn validate(
    segments: &[Segment],
    n: usize,
    slot_of: impl Fn(u32) -> Option<u32>,
    out: &mut Vec<Resolved>,
) -> Result<()> {
    check_positive("tokens", n)?;
    out.clear();
    let bad = |k: usize, why: String| Err(Error::InvalidArgument(format!("segment table, segment {k}: {why}")));
    if segments.is_empty() {
        return Err(Error::InvalidArgument(format!("segment table is empty: it must cover the {n} rows")));
    }
    let mut next = 0usize;
    for (k, s) in segments.iter().enumerate() {
        if s.start != next {
            let why = if k == 0 {
                format!("starts at row {}, but the first segment must start at row 0", s.start)
            } else if s.start < next {
                format!("starts at row {} inside the previous segment (which ends at {next})", s.start)
            } else {
                format!("starts at row {}, leaving rows {next}..{} uncovered", s.start, s.start)
            };
            return bad(k, why);
        }
        if s.end < s.start {
            return bad(k, format!("ends at row {} before it starts at row {}", s.end, s.start));
        }
        if s.end > n {
            return bad(k, format!("rows {}..{} run past the batch's {n} rows", s.start, s.end));
        }
        let resolved = match s.adapter {
            BASE => Resolved::BASE,
            id if id < 0 || id > i64::from(u32::MAX) => {
                return bad(
                    k,
                    format!("adapter id {id} is invalid (ids are 0..=4294967295, or -1 for the base weight)"),
                )
            }
            id => match slot_of(id as u32) {
                Some(slot) => Resolved(slot),
                None => return bad(k, format!("adapter id {id} is not in the bank")),
            },
        };
        out.push(resolved);
        next = s.end;
    }
    if next != n {
        return Err(Error::InvalidArgument(format!("segment table covers rows 0..{next}, but the batch has {n} rows")));
    }
    Ok(())
}

/// Segments of `len` rows each over `n` rows (the last one shorter), served by `ids` in turn:
/// the equal-split table of the bench and the tests.
pub fn equal_segments(n: usize, len: usize, ids: &[i64]) -> Vec<Segment> {
    let len = len.max(1);
    (0..n.div_ceil(len))
        .map(|k| Segment { start: k * len, end: ((k + 1) * len).min(n), adapter: ids[k % ids.len().max(1)] })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(segs: &[Segment], n: usize) -> Result<Vec<Resolved>> {
        let mut out = Vec::new();
        validate(segs, n, |id| (id < 3).then_some(id + 10), &mut out).map(|_| out)
    }

    #[test]
    fn accepts_tilings_with_empty_segments_and_the_base() {
        let segs = [Segment::new(0, 2, 1), Segment::base(2, 2), Segment::new(2, 5, 0), Segment::new(5, 5, 2)];
        assert_eq!(check(&segs, 5).unwrap(), vec![Resolved(11), Resolved::BASE, Resolved(10), Resolved(12)]);
    }

    #[test]
    fn rejects_gaps_overlaps_and_bad_ids() {
        let cases: [(&[Segment], &str); 8] = [
            (&[], "empty"),
            (&[Segment::new(1, 5, 0)], "must start at row 0"),
            (&[Segment::new(0, 2, 0), Segment::new(3, 5, 0)], "uncovered"),
            (&[Segment::new(0, 3, 0), Segment::new(2, 5, 0)], "inside the previous"),
            (&[Segment::new(0, 3, 0), Segment { start: 3, end: 2, adapter: 0 }], "before it starts"),
            (&[Segment::new(0, 6, 0)], "run past"),
            (&[Segment::new(0, 4, 0)], "covers rows 0..4"),
            (&[Segment::new(0, 5, 7)], "not in the bank"),
        ];
        for (segs, want) in cases {
            let err = check(segs, 5).unwrap_err().to_string();
            assert!(err.contains(want), "{segs:?}: {err}");
        }
        let err = check(&[Segment { start: 0, end: 5, adapter: -2 }], 5).unwrap_err().to_string();
        assert!(err.contains("invalid"), "{err}");
        assert!(check(&[Segment::new(0, 0, 0)], 0).is_err(), "no rows");
    }

    #[test]
    fn equal_split_tiles() {
        let segs = equal_segments(10, 3, &[0, BASE]);
        let mut out = Vec::new();
        validate(&segs, 10, Some, &mut out).unwrap();
        assert_eq!(segs.len(), 4);
        assert_eq!(segs[3], Segment::base(9, 10));
    }
}
