//! Sparsity patterns Omega for the trainable matrix M (SVFT.md section 1).
//!
//! A [`Pattern`] is the recipe (`banded:2`, `random:16:seed=42`, ...); an [`Omega`] is the
//! materialised index set for one layer: `rows[k], cols[k]` for `k < |Omega|`, in the official
//! implementation's order, so adapters interchange with it. Coefficient `M[k]` belongs to
//! `(rows[k], cols[k])`; duplicate pairs (Random) are separate coefficients whose values add.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::layer::svd::Factors;
use crate::rng::Rng;

/// How the TopK pattern scores the pair `(i, j)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TopKCriterion {
    /// The paper's score `u_i . v_j = (U^T V)_ij`; square weights only.
    Paper,
    /// The official code's score: the entries of `U V` for a square weight, else the raw
    /// entries of whichever factor is square (`U` when d_out = r, `V^T` when d_in = r).
    Official,
}

/// A sparsity pattern recipe, independent of any layer's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pattern {
    /// The diagonal: |Omega| = r.
    Plain,
    /// All `(i, j)` with `|i - j| <= d`, row-major.
    Banded { d: usize },
    /// k(d) pairs drawn uniformly with replacement: all rows first, then all columns.
    Random { d: usize, seed: u64 },
    /// The k(d) largest scores, in descending score order (ties: lower flat index first).
    TopK { d: usize, criterion: TopKCriterion },
}

/// `k(d) = r(2d+1) - d(d+1)`: the size of a band of half-width `d` in an `r x r` matrix.
/// Valid for `d < r`.
pub fn band_size(r: usize, d: usize) -> usize {
    // Saturating: a rank read from a file may be absurd, and must give an error, not a wrap.
    r.saturating_mul(2usize.saturating_mul(d).saturating_add(1)).saturating_sub(d.saturating_mul(d.saturating_add(1)))
}

impl Pattern {
    /// The half-width `d` whose band size fixes |Omega| (0 for Plain).
    pub fn d(&self) -> usize {
        match *self {
            Pattern::Plain => 0,
            Pattern::Banded { d } | Pattern::Random { d, .. } | Pattern::TopK { d, .. } => d,
        }
    }

    /// |Omega| for rank `r`, or an error when `d >= r`.
    pub fn size(&self, r: usize) -> Result<usize> {
        if r == 0 {
            return Err(Error::Empty { what: "rank", value: 0 });
        }
        let d = self.d();
        if d >= r {
            return Err(Error::PatternSize {
                pattern: self.to_string(),
                reason: format!("half-width d = {d} must be below the rank r = {r}"),
            });
        }
        Ok(band_size(r, d))
    }

    /// Materialises the index set for a layer with these factors.
    pub fn omega(&self, factors: &Factors) -> Result<Omega> {
        let r = factors.r;
        let k = self.size(r)?;
        let (rows, cols) = match *self {
            Pattern::Plain | Pattern::Banded { .. } => band_indices(r, self.d()),
            Pattern::Random { seed, .. } => random_indices(r, k, seed),
            Pattern::TopK { criterion, .. } => topk_indices(self, criterion, factors, k)?,
        };
        Ok(Omega { pattern: *self, r, rows, cols })
    }

    /// Materialises the index set from the rank alone (every pattern but TopK).
    pub fn omega_for_rank(&self, r: usize) -> Result<Omega> {
        let k = self.size(r)?;
        let (rows, cols) = match *self {
            Pattern::Plain | Pattern::Banded { .. } => band_indices(r, self.d()),
            Pattern::Random { seed, .. } => random_indices(r, k, seed),
            Pattern::TopK { .. } => {
                return Err(Error::PatternSize {
                    pattern: self.to_string(),
                    reason: "top-k needs the singular vectors to score pairs".into(),
                })
            }
        };
        Ok(Omega { pattern: *self, r, rows, cols })
    }

    /// Whether the pattern is a band around the diagonal (a stencil, no index arrays needed).
    pub fn is_banded(&self) -> bool {
        matches!(self, Pattern::Plain | Pattern::Banded { .. })
    }
}

fn band_indices(r: usize, d: usize) -> (Vec<u32>, Vec<u32>) {
    let k = band_size(r, d);
    let (mut rows, mut cols) = (Vec::with_capacity(k), Vec::with_capacity(k));
    for i in 0..r {
        for j in i.saturating_sub(d)..=(i + d).min(r - 1) {
            rows.push(i as u32);
            cols.push(j as u32);
        }
    }
    debug_assert_eq!(rows.len(), k);
    (rows, cols)
}

fn random_indices(r: usize, k: usize, seed: u64) -> (Vec<u32>, Vec<u32>) {
    let mut rng = Rng::new(seed);
    let rows = (0..k).map(|_| rng.below(r as u64) as u32).collect();
    let cols = (0..k).map(|_| rng.below(r as u64) as u32).collect();
    (rows, cols)
}

fn topk_indices(pattern: &Pattern, criterion: TopKCriterion, f: &Factors, k: usize) -> Result<(Vec<u32>, Vec<u32>)> {
    let r = f.r;
    let impossible = |reason: String| Error::PatternSize { pattern: pattern.to_string(), reason };
    // score(i, j) for the r x r score matrix, computed in f64.
    let scores: Vec<f64> = match criterion {
        TopKCriterion::Paper => {
            if f.d_out != f.d_in {
                return Err(impossible(format!(
                    "the paper's top-k score u_i . v_j needs a square weight, got {}x{}",
                    f.d_out, f.d_in
                )));
            }
            // (U^T V)_ij = sum_p U[p, i] V[p, j]
            let mut s = vec![0.0f64; r * r];
            for p in 0..f.d_out {
                let (urow, vrow) = (&f.u[p * r..(p + 1) * r], &f.v[p * r..(p + 1) * r]);
                for i in 0..r {
                    let ui = urow[i] as f64;
                    for j in 0..r {
                        s[i * r + j] += ui * vrow[j] as f64;
                    }
                }
            }
            s
        }
        TopKCriterion::Official => {
            if f.d_out == f.d_in && f.d_out == r {
                // U V: (U V)_ij = sum_p U[i, p] V[p, j]
                let mut s = vec![0.0f64; r * r];
                for i in 0..r {
                    for p in 0..r {
                        let uip = f.u[i * r + p] as f64;
                        for j in 0..r {
                            s[i * r + j] += uip * f.v[p * r + j] as f64;
                        }
                    }
                }
                s
            } else if f.d_out == r {
                f.u.iter().map(|&x| x as f64).collect()
            } else if f.d_in == r {
                // V^T, row-major: (V^T)_ij = V[j, i]
                (0..r * r).map(|idx| f.v[(idx % r) * r + idx / r] as f64).collect()
            } else {
                return Err(impossible(format!(
                    "the official top-k score needs a square factor, but U is {}x{r} and V is {}x{r}",
                    f.d_out, f.d_in
                )));
            }
        }
    };
    if let Some(bad) = scores.iter().position(|x| !x.is_finite()) {
        return Err(Error::NonFinite { what: "top-k scores", index: bad });
    }
    let mut order: Vec<u32> = (0..(r * r) as u32).collect();
    // Descending score, ties by ascending flat index: a total order, so every platform agrees.
    order.sort_unstable_by(|&a, &b| scores[b as usize].total_cmp(&scores[a as usize]).then(a.cmp(&b)));
    order.truncate(k);
    let rows = order.iter().map(|&f| f / r as u32).collect();
    let cols = order.iter().map(|&f| f % r as u32).collect();
    Ok((rows, cols))
}

/// A materialised pattern: the index set of one layer's trainable coefficients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Omega {
    /// The recipe it came from.
    pub pattern: Pattern,
    /// The rank: indices lie in `[0, r)`.
    pub r: usize,
    /// Row index of coefficient k.
    pub rows: Vec<u32>,
    /// Column index of coefficient k.
    pub cols: Vec<u32>,
}

impl Omega {
    /// Omega grouped by row (entries of row i: columns and canonical indices).
    pub fn csr_by_row(&self) -> Csr {
        Csr::build(self.r, &self.rows, &self.cols)
    }

    /// Omega grouped by column (entries of column j: rows and canonical indices).
    pub fn csr_by_col(&self) -> Csr {
        Csr::build(self.r, &self.cols, &self.rows)
    }

    /// Builds an index set from explicit indices (e.g. loaded from an adapter file).
    pub fn from_indices(pattern: Pattern, r: usize, rows: Vec<u32>, cols: Vec<u32>) -> Result<Self> {
        if rows.len() != cols.len() {
            return Err(Error::Shape { what: "pattern columns", expected: rows.len(), got: cols.len() });
        }
        // Every spec sizes its set (a band exactly, a random label at most): a spec wider than
        // the rank, or more indices than it admits, is refused before anything is built on it.
        let k = pattern.size(r)?;
        if rows.is_empty() || rows.len() > k {
            return Err(Error::PatternSize {
                pattern: pattern.to_string(),
                reason: format!("{} indices: the pattern admits 1 to {k} at rank {r}", rows.len()),
            });
        }
        if let Some(bad) = rows.iter().chain(&cols).position(|&x| x as usize >= r) {
            return Err(Error::InvalidArgument(format!("pattern index {bad} is out of range for rank {r}")));
        }
        // A band is a stencil (the CUDA band kernels find coefficients by position): its index
        // set must be the band's own, complete and in row-major order.
        if pattern.is_banded() {
            let same = rows.len() == k && {
                let (br, bc) = band_indices(r, pattern.d());
                rows == br && cols == bc
            };
            if !same {
                return Err(Error::InvalidArgument(format!(
                    "the indices are not the {pattern} band of rank {r} in row-major order \
                     (name another index set with a random pattern spec)"
                )));
            }
        }
        Ok(Omega { pattern, r, rows, cols })
    }

    /// |Omega|.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether the set is empty (never, for a valid pattern).
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Pattern::Plain => write!(f, "plain"),
            Pattern::Banded { d } => write!(f, "banded:{d}"),
            Pattern::Random { d, seed } => write!(f, "random:{d}:seed={seed}"),
            Pattern::TopK { d, criterion: TopKCriterion::Paper } => write!(f, "topk:{d}"),
            Pattern::TopK { d, criterion: TopKCriterion::Official } => write!(f, "topk:{d}:official"),
        }
    }
}

impl FromStr for Pattern {
    type Err = Error;

    /// Parses `plain`, `banded:D`, `random:D[:seed=S]`, `topk:D[:paper|:official]`.
    fn from_str(spec: &str) -> Result<Self> {
        let bad = |reason: &str| Error::PatternSpec { spec: spec.to_string(), reason: reason.to_string() };
        let parts: Vec<&str> = spec.trim().split(':').collect();
        let parse_d = |s: Option<&&str>| -> Result<usize> {
            let s = s.ok_or_else(|| bad("missing the half-width d, e.g. `banded:2`"))?;
            s.parse::<usize>().map_err(|_| bad("the half-width d must be a non-negative integer"))
        };
        match parts[0].to_ascii_lowercase().as_str() {
            "plain" if parts.len() == 1 => Ok(Pattern::Plain),
            "plain" => Err(bad("`plain` takes no arguments")),
            "banded" if parts.len() == 2 => Ok(Pattern::Banded { d: parse_d(parts.get(1))? }),
            "banded" => Err(bad("expected `banded:D`")),
            "random" => {
                let d = parse_d(parts.get(1))?;
                let seed = match parts.get(2) {
                    None => 0,
                    Some(s) => s
                        .strip_prefix("seed=")
                        .ok_or_else(|| bad("expected `seed=S` after `random:D:`"))?
                        .parse::<u64>()
                        .map_err(|_| bad("the seed must be a non-negative integer"))?,
                };
                if parts.len() > 3 {
                    return Err(bad("expected `random:D[:seed=S]`"));
                }
                Ok(Pattern::Random { d, seed })
            }
            "topk" | "top_k" => {
                let d = parse_d(parts.get(1))?;
                let criterion = match parts.get(2).map(|s| s.to_ascii_lowercase()) {
                    None => TopKCriterion::Paper,
                    Some(s) if s == "paper" => TopKCriterion::Paper,
                    Some(s) if s == "official" => TopKCriterion::Official,
                    Some(_) => return Err(bad("the top-k criterion must be `paper` or `official`")),
                };
                if parts.len() > 3 {
                    return Err(bad("expected `topk:D[:paper|:official]`"));
                }
                Ok(Pattern::TopK { d, criterion })
            }
            "" => Err(bad("empty pattern spec")),
            _ => Err(bad("unknown pattern; expected plain, banded:D, random:D[:seed=S] or topk:D[:official]")),
        }
    }
}

/// A compressed-row structure over an r x r pattern: Omega grouped by row ([`Omega::csr_by_row`])
/// or by column ([`Omega::csr_by_col`]), what the CPU passes and the CUDA CSR kernels walk.
#[derive(Debug, Clone)]
pub struct Csr {
    /// `ptr[i]..ptr[i+1]` are the entries of row i.
    pub ptr: Vec<u32>,
    /// Column of each entry.
    pub idx: Vec<u32>,
    /// Canonical coefficient index of each entry.
    pub perm: Vec<u32>,
}

impl Csr {
    /// Groups entries by `major[k]`, keeping canonical order within a group (a stable
    /// counting sort: O(r + nnz)).
    pub fn build(r: usize, major: &[u32], minor: &[u32]) -> Csr {
        let mut ptr = vec![0u32; r + 1];
        for &i in major {
            ptr[i as usize + 1] += 1;
        }
        for i in 0..r {
            ptr[i + 1] += ptr[i];
        }
        let mut next = ptr.clone();
        let mut idx = vec![0u32; major.len()];
        let mut perm = vec![0u32; major.len()];
        for (k, (&i, &j)) in major.iter().zip(minor).enumerate() {
            let e = next[i as usize] as usize;
            idx[e] = j;
            perm[e] = k as u32;
            next[i as usize] += 1;
        }
        Csr { ptr, idx, perm }
    }

    /// `vals[e] = g * m[perm[e]]`: the coefficients in this structure's order.
    pub fn gather(&self, m: &[f32], g: f32, vals: &mut [f32]) {
        for (v, &k) in vals.iter_mut().zip(&self.perm) {
            *v = g * m[k as usize];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_round_trips() {
        for spec in ["plain", "banded:2", "random:16:seed=42", "topk:8", "topk:8:official", "banded:0"] {
            let p: Pattern = spec.parse().unwrap();
            assert_eq!(p.to_string(), spec);
        }
        assert_eq!("random:3".parse::<Pattern>().unwrap(), Pattern::Random { d: 3, seed: 0 });
        assert_eq!("topk:1:paper".parse::<Pattern>().unwrap().to_string(), "topk:1");
    }

    #[test]
    fn bad_specs_are_errors() {
        for spec in [
            "",
            "band:2",
            "banded",
            "banded:x",
            "banded:-1",
            "plain:1",
            "random:2:s=1",
            "random:2:seed=x",
            "topk:2:best",
            "banded:1:2",
            "random:1:seed=2:3",
        ] {
            let err = spec.parse::<Pattern>().unwrap_err();
            assert!(matches!(err, Error::PatternSpec { .. }), "{spec}: {err}");
        }
    }

    #[test]
    fn band_matches_the_formula_and_is_row_major() {
        for r in 1..12 {
            for d in 0..r {
                let o = Pattern::Banded { d }.omega_for_rank(r).unwrap();
                assert_eq!(o.len(), band_size(r, d));
                let keys: Vec<(u32, u32)> = o.rows.iter().copied().zip(o.cols.iter().copied()).collect();
                let mut sorted = keys.clone();
                sorted.sort();
                sorted.dedup();
                assert_eq!(keys, sorted, "row-major and unique");
                assert!(keys.iter().all(|&(i, j)| (i as i64 - j as i64).unsigned_abs() as usize <= d));
            }
        }
    }

    #[test]
    fn d_at_least_r_is_an_error() {
        assert!(matches!(Pattern::Banded { d: 5 }.size(5), Err(Error::PatternSize { .. })));
        assert!(Pattern::Banded { d: 4 }.size(5).is_ok());
        assert!(Pattern::Plain.size(0).is_err());
    }
}
