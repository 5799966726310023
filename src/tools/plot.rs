//! A small PNG line plot with no system dependencies: a hand-rolled rasteriser (thick
//! Bresenham lines, a 3x5 bitmap font for labels) written through the `png` crate. Enough for
//! the demo's loss curves (a title, a log or linear y axis with ticks, an x axis, a legend)
//! and the bench grid's time against tokens on log-log axes.

use std::path::Path;

use crate::error::{Error, Result};

/// One curve: its legend label, colour and values (x = index).
#[derive(Debug, Clone)]
pub struct Series<'a> {
    /// Legend label.
    pub label: &'a str,
    /// RGB colour.
    pub color: [u8; 3],
    /// y values; non-finite or (on a log axis) non-positive values are skipped.
    pub values: &'a [f64],
}

const W: usize = 760;
const H: usize = 460;
const LEFT: usize = 70;
const RIGHT: usize = 20;
const TOP: usize = 40;
const BOTTOM: usize = 50;
const SCALE: usize = 2;

/// 3x5 glyphs, row by row (`#` = ink); letters render upper case.
const GLYPHS: &[(char, &str)] = &[
    ('0', "####.##.##.####"),
    ('1', ".#.##..#..#.###"),
    ('2', "###..#####..###"),
    ('3', "###..#.##..####"),
    ('4', "#.##.####..#..#"),
    ('5', "####..###..####"),
    ('6', "####..####.####"),
    ('7', "###..#.#..#..#."),
    ('8', "####.#####.####"),
    ('9', "####.####..####"),
    ('A', ".#.#.#####.##.#"),
    ('B', "##.#.###.#.###."),
    ('C', ".###..#..#...##"),
    ('D', "##.#.##.##.###."),
    ('E', "####..##.#..###"),
    ('F', "####..##.#..#.."),
    ('G', ".###..#.##.#.##"),
    ('H', "#.##.#####.##.#"),
    ('I', "###.#..#..#.###"),
    ('J', "..#..#..##.#.#."),
    ('K', "#.##.###.#.##.#"),
    ('L', "#..#..#..#..###"),
    ('M', "#.########.##.#"),
    ('N', "##.#.##.##.##.#"),
    ('O', ".#.#.##.##.#.#."),
    ('P', "##.#.###.#..#.."),
    ('Q', ".#.#.##.###..##"),
    ('R', "##.#.###.#.##.#"),
    ('S', ".###...#...###."),
    ('T', "###.#..#..#..#."),
    ('U', "#.##.##.##.####"),
    ('V', "#.##.##.#.#..#."),
    ('W', "#.##.########.#"),
    ('X', "#.##.#.#.#.##.#"),
    ('Y', "#.##.#.#..#..#."),
    ('Z', "###..#.#.#..###"),
    (' ', "..............."),
    ('.', ".............#."),
    (':', "....#.....#...."),
    ('=', "...###...###..."),
    ('-', "......###......"),
    ('+', "....#.###.#...."),
    ('(', "..#.#..#..#...#"),
    (')', "#...#..#..#.#.."),
    ('/', "..#..#.#.#..#.."),
    (',', "..........#.#.."),
];

struct Canvas {
    px: Vec<[u8; 3]>,
}

impl Canvas {
    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < W && (y as usize) < H {
            self.px[y as usize * W + x as usize] = c;
        }
    }
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: [u8; 3], thick: bool) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.set(x, y, c);
            if thick {
                self.set(x + 1, y, c);
                self.set(x, y + 1, c);
            }
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }
    fn text(&mut self, x: i64, y: i64, s: &str, c: [u8; 3]) {
        let mut cx = x;
        for ch in s.chars().map(|c| c.to_ascii_uppercase()) {
            let glyph = GLYPHS.iter().find(|g| g.0 == ch).map_or("###.#.#.#.#.###", |g| g.1).as_bytes();
            for (k, &b) in glyph.iter().enumerate().take(15) {
                if b == b'#' {
                    let (gx, gy) = ((k % 3) as i64, (k / 3) as i64);
                    for (ox, oy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                        self.set(cx + gx * SCALE as i64 + ox, y + gy * SCALE as i64 + oy, c);
                    }
                }
            }
            cx += 4 * SCALE as i64;
        }
    }
}

/// Width in pixels of `s` as [`Canvas::text`] draws it.
fn text_width(s: &str) -> i64 {
    (s.chars().count() * 4 * SCALE) as i64
}

fn tick_label(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let e = v.abs().log10().floor() as i32;
    if (-2..=3).contains(&e) {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        let m = v / 10f64.powi(e);
        if (m - 1.0).abs() < 1e-9 {
            format!("1E{e}")
        } else {
            format!("{m:.1}E{e}")
        }
    }
}

/// One curve of an x-y plot: its legend label, colour and `(x, y)` points in order.
#[derive(Debug, Clone)]
pub struct XySeries<'a> {
    /// Legend label.
    pub label: &'a str,
    /// RGB colour.
    pub color: [u8; 3],
    /// Points; non-finite or (on a log axis) non-positive coordinates are skipped.
    pub points: &'a [(f64, f64)],
}

/// How the x axis maps and is labelled.
#[derive(Debug, Clone, Copy, PartialEq)]
enum XAxis {
    /// x = 0..n-1, integer ticks (the index of a value).
    Index(usize),
    /// log10 of x, a tick per decade.
    Log,
}

/// Draws the series into a PNG at `path` (x = the index of each value).
pub fn line_plot_png(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series<'_>],
    log_y: bool,
) -> Result<()> {
    let n = series.iter().map(|s| s.values.len()).max().unwrap_or(1).max(2);
    let points: Vec<Vec<(f64, f64)>> =
        series.iter().map(|s| s.values.iter().enumerate().map(|(i, &v)| (i as f64, v)).collect()).collect();
    let xy: Vec<XySeries<'_>> =
        series.iter().zip(&points).map(|(s, p)| XySeries { label: s.label, color: s.color, points: p }).collect();
    draw(path, title, x_label, y_label, &xy, XAxis::Index(n), log_y)
}

/// Draws the series into a PNG at `path` on log-log axes, a marker on every point and the
/// legend top left (curves of time against size rise to the right).
pub fn log_log_plot_png(path: &Path, title: &str, x_label: &str, y_label: &str, series: &[XySeries<'_>]) -> Result<()> {
    draw(path, title, x_label, y_label, series, XAxis::Log, true)
}

fn draw(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[XySeries<'_>],
    x_axis: XAxis,
    log_y: bool,
) -> Result<()> {
    let log_x = x_axis == XAxis::Log;
    let ok = |v: f64, log: bool| v.is_finite() && (!log || v > 0.0);
    let ok_point = |&(x, y): &(f64, f64)| ok(x, log_x) && ok(y, log_y);
    let ty = |v: f64| if log_y { v.log10() } else { v };
    let tx = |v: f64| if log_x { v.log10() } else { v };
    let range = |vals: &mut dyn Iterator<Item = f64>| {
        let (lo, hi) = vals.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
        let (mut lo, mut hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
        if hi - lo < 1e-12 {
            lo -= 0.5;
            hi += 0.5;
        }
        let pad = 0.04 * (hi - lo);
        (lo - pad, hi + pad)
    };
    let points = || series.iter().flat_map(|s| s.points.iter()).filter(|p| ok_point(p));
    let (lo, hi) = range(&mut points().map(|p| ty(p.1)));
    let (x_lo, x_hi) = match x_axis {
        XAxis::Index(n) => (0.0, (n - 1) as f64),
        XAxis::Log => range(&mut points().map(|p| tx(p.0))),
    };
    let (pw, ph) = ((W - LEFT - RIGHT) as f64, (H - TOP - BOTTOM) as f64);
    let px = |x: f64| LEFT as i64 + ((tx(x) - x_lo) / (x_hi - x_lo) * pw).round() as i64;
    let py = |v: f64| TOP as i64 + ((hi - ty(v)) / (hi - lo) * ph).round() as i64;

    let mut c = Canvas { px: vec![[255, 255, 255]; W * H] };
    let (ink, grid) = ([40, 40, 40], [225, 225, 225]);
    // y ticks: decades on a log axis, about 5 round steps on a linear one.
    let ticks: Vec<f64> = if log_y {
        (lo.ceil() as i32..=hi.floor() as i32).map(|e| 10f64.powi(e)).collect()
    } else {
        let raw = (hi - lo) / 5.0;
        let mag = 10f64.powf(raw.log10().floor());
        let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|&s| s >= raw).unwrap_or(raw);
        let mut t = (lo / step).ceil() * step;
        let mut v = Vec::new();
        while t <= hi {
            v.push(t);
            t += step;
        }
        v
    };
    for &t in &ticks {
        let y = py(t);
        c.line((LEFT as i64, y), ((W - RIGHT) as i64, y), grid, false);
        let label = tick_label(t);
        c.text(LEFT as i64 - 8 - text_width(&label), y - 5, &label, ink);
    }
    // x ticks: decades on a log axis; about 6 round integer steps on an index axis.
    let x_ticks: Vec<(f64, String)> = match x_axis {
        XAxis::Log => {
            (x_lo.ceil() as i32..=x_hi.floor() as i32).map(|e| (10f64.powi(e), tick_label(10f64.powi(e)))).collect()
        }
        XAxis::Index(n) => {
            let raw = (n - 1) as f64 / 6.0;
            let mag = 10f64.powf(raw.log10().floor().max(0.0));
            let step =
                [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|&s| s >= raw).unwrap_or(raw).max(1.0) as usize;
            (0..n).step_by(step).map(|i| (i as f64, i.to_string())).collect()
        }
    };
    for (v, label) in &x_ticks {
        let x = px(*v);
        c.line((x, TOP as i64), (x, (H - BOTTOM) as i64), grid, false);
        c.text(x - text_width(label) / 2, (H - BOTTOM) as i64 + 8, label, ink);
    }
    // Axes, labels, title.
    let (x0, y0, x1, y1) = (LEFT as i64, TOP as i64, (W - RIGHT) as i64, (H - BOTTOM) as i64);
    for (a, b) in [((x0, y0), (x0, y1)), ((x0, y1), (x1, y1)), ((x1, y0), (x1, y1)), ((x0, y0), (x1, y0))] {
        c.line(a, b, ink, false);
    }
    c.text((W as i64 - text_width(x_label)) / 2, H as i64 - 20, x_label, ink);
    c.text(8, 14, y_label, ink);
    c.text((W as i64 - text_width(title)) / 2, 14, title, ink);
    // Curves (with a 5x5 marker on each point of a log-log plot: grids have few points).
    for s in series {
        let mut prev: Option<(i64, i64)> = None;
        for p in s.points {
            if !ok_point(p) {
                prev = None;
                continue;
            }
            let q = (px(p.0), py(p.1));
            if let Some(o) = prev {
                c.line(o, q, s.color, true);
            }
            if log_x {
                for (dx, dy) in (-2..=2).flat_map(|dx| (-2..=2).map(move |dy| (dx, dy))) {
                    c.set(q.0 + dx, q.1 + dy, s.color);
                }
            }
            prev = Some(q);
        }
    }
    // Legend: top right, or top left on a log-log plot.
    let lw = series.iter().map(|s| text_width(s.label)).max().unwrap_or(0) + 40;
    let (lx, mut ly) = (if log_x { x0 + 10 } else { x1 - lw - 10 }, y0 + 12);
    if log_x {
        // Curves may pass under it: a white box keeps the labels readable.
        for y in ly - 4..ly + 18 * series.len() as i64 {
            for x in lx - 4..lx + lw {
                c.set(x, y, [255, 255, 255]);
            }
        }
    }
    for s in series {
        c.line((lx, ly + 4), (lx + 24, ly + 4), s.color, true);
        c.text(lx + 32, ly, s.label, ink);
        ly += 18;
    }

    let file = std::fs::File::create(path).map_err(|e| Error::Io { path: path.display().to_string(), source: e })?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), W as u32, H as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let write_err = |e: png::EncodingError| Error::File {
        path: path.display().to_string(),
        reason: format!("cannot write PNG: {e}"),
    };
    let mut w = enc.write_header().map_err(write_err)?;
    let data: Vec<u8> = c.px.iter().flatten().copied().collect();
    w.write_image_data(&data).map_err(write_err)?;
    w.finish().map_err(write_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glyphs_are_3x5() {
        for (ch, g) in GLYPHS {
            assert_eq!(g.len(), 15, "glyph {ch:?}");
        }
    }

    #[test]
    fn tick_labels() {
        assert_eq!(tick_label(0.001), "1E-3");
        assert_eq!(tick_label(0.5), "0.5");
        assert_eq!(tick_label(20.0), "20");
        assert_eq!(tick_label(1.0), "1");
        assert_eq!(tick_label(1e4), "1E4");
    }

    #[test]
    fn log_log_plot_writes_a_png() {
        let dir = std::env::temp_dir().join(format!("svft-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("loglog.png");
        let a = [(1.0, 0.02), (16.0, 0.03), (2048.0, 1.5), (8192.0, 6.0)];
        let b = [(1.0, 0.05), (16.0, f64::NAN), (2048.0, 4.0), (8192.0, 15.0)];
        let series = [
            XySeries { label: "svft", color: [200, 30, 30], points: &a },
            XySeries { label: "official", color: [30, 30, 200], points: &b },
        ];
        log_log_plot_png(&path, "time vs n", "tokens", "ms", &series).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
