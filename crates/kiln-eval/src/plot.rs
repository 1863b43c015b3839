//! Training-loss plots: metrics JSONL → SVG and PNG.
//!
//! A plot is laid out once as a small list of drawing primitives (a [`Scene`]); the SVG writer
//! and the PNG rasterizer both draw that same list, so the two outputs match. The PNG is drawn
//! with `tiny-skia`, and text with glyph outlines from an embedded DejaVu Sans (see
//! `assets/DejaVuSans-LICENSE.txt`), so no system library or system font is needed.
//!
//! Style choices:
//! - Series colours come from a 10-colour palette, one per series, in order.
//! - A series whose label ends in a validation word (`val`, `valid`, `validation`, `eval`,
//!   `test`, e.g. "run1 val") is drawn as a line with circle markers; any other as a solid line.
//! - The y axis is linear and fitted to the last 95% of each series' points (plus every point's
//!   minimum), so the large losses of the first few steps do not squash the rest of the curve;
//!   points above the range are clipped at the top and a note says so. A log scale was the
//!   alternative, but it flattens the late part of the curve, where runs are compared.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::EvalError;

/// One named curve: `(x, y)` points, e.g. `(step, loss)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// A loss plot: a title and the series to draw.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossCurves {
    pub title: String,
    pub series: Vec<Series>,
}

/// Width of the rendered plot, in pixels (SVG user units).
pub const PLOT_WIDTH: u32 = 900;
/// Height of the rendered plot, in pixels (SVG user units).
pub const PLOT_HEIGHT: u32 = 540;

/// Reads one metrics JSONL file: returns a train-loss series (`"<label> train"`, from `loss`)
/// and, if any line has `val_loss`, a val-loss series (`"<label> val"`).
///
/// Lines without `step` are ignored, as are blank lines and `null` values. Points are sorted
/// by step; when a step appears more than once (a resumed run), the last line wins.
///
/// Errors: the file cannot be read; a line is not a JSON object or has a non-numeric `step`,
/// `loss` or `val_loss` (the error names the 1-based line number); no line has a `loss`.
pub fn read_metrics(path: &Path, label: &str) -> Result<Vec<Series>, EvalError> {
    let text = std::fs::read_to_string(path).map_err(|source| EvalError::Io {
        action: "cannot read metrics file",
        path: path.to_path_buf(),
        source,
    })?;
    let mut train: BTreeMap<OrdF64, f64> = BTreeMap::new();
    let mut val: BTreeMap<OrdF64, f64> = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let bad = |message: String| EvalError::MetricsLine { path: path.to_path_buf(), line: line_no, message };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        let obj = value.as_object().ok_or_else(|| bad("expected a JSON object".to_string()))?;
        let step = match obj.get("step") {
            None | Some(serde_json::Value::Null) => continue,
            Some(v) => number(v).ok_or_else(|| bad(format!("\"step\" is not a number: {v}")))?,
        };
        for (key, map) in [("loss", &mut train), ("val_loss", &mut val)] {
            match obj.get(key) {
                None | Some(serde_json::Value::Null) => {}
                Some(v) => {
                    let y = number(v).ok_or_else(|| bad(format!("\"{key}\" is not a number: {v}")))?;
                    map.insert(OrdF64(step), y);
                }
            }
        }
    }
    if train.is_empty() {
        return Err(EvalError::NoLoss { path: path.to_path_buf() });
    }
    let to_points = |m: BTreeMap<OrdF64, f64>| m.into_iter().map(|(k, v)| (k.0, v)).collect();
    let mut out = vec![Series { label: format!("{label} train"), points: to_points(train) }];
    if !val.is_empty() {
        out.push(Series { label: format!("{label} val"), points: to_points(val) });
    }
    Ok(out)
}

/// A finite JSON number as f64.
fn number(v: &serde_json::Value) -> Option<f64> {
    v.as_f64().filter(|x| x.is_finite())
}

/// Total order on finite f64 keys (step numbers).
#[derive(Debug, Clone, Copy, PartialEq)]
struct OrdF64(f64);
impl Eq for OrdF64 {}
impl PartialOrd for OrdF64 {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for OrdF64 {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// Renders the plot as a standalone SVG document (`<svg …>…</svg>`, 900×540).
pub fn render_svg(curves: &LossCurves) -> String {
    svg_from_scene(&build_scene(curves))
}

/// Writes the SVG plot to `path` (atomically: a temporary file in the same folder, renamed).
pub fn write_svg(curves: &LossCurves, path: &Path) -> Result<(), EvalError> {
    write_atomic(path, render_svg(curves).as_bytes())
}

/// Writes the plot as a 900×540 PNG to `path` (atomically: a temporary file, renamed).
pub fn write_png(curves: &LossCurves, path: &Path) -> Result<(), EvalError> {
    let pixmap = rasterize(&build_scene(curves))?;
    let bytes = pixmap.encode_png().map_err(|e| EvalError::Render(format!("PNG encoding failed: {e}")))?;
    write_atomic(path, &bytes)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), EvalError> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let io = |action: &'static str, path: PathBuf| move |source: std::io::Error| EvalError::Io { action, path, source };
    let mut builder = tempfile::Builder::new();
    builder.prefix(".kiln-plot-").suffix(".tmp");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o644));
    }
    let mut tmp = builder.tempfile_in(dir).map_err(io("cannot create a temporary file in", dir.to_path_buf()))?;
    tmp.write_all(bytes)
        .and_then(|()| tmp.flush())
        .map_err(io("cannot write temporary file", tmp.path().to_path_buf()))?;
    tmp.persist(path).map_err(|e| io("cannot write", path.to_path_buf())(e.error))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Scene: layout shared by the SVG and PNG outputs.

#[derive(Debug, Clone, Copy, PartialEq)]
struct Rgb(u8, u8, u8);

impl Rgb {
    fn hex(self) -> String {
        format!("#{:02x}{:02x}{:02x}", self.0, self.1, self.2)
    }
}

const PALETTE: [Rgb; 10] = [
    Rgb(0x1f, 0x77, 0xb4),
    Rgb(0xff, 0x7f, 0x0e),
    Rgb(0x2c, 0xa0, 0x2c),
    Rgb(0xd6, 0x27, 0x28),
    Rgb(0x94, 0x67, 0xbd),
    Rgb(0x8c, 0x56, 0x4b),
    Rgb(0xe3, 0x77, 0xc2),
    Rgb(0x7f, 0x7f, 0x7f),
    Rgb(0xbc, 0xbd, 0x22),
    Rgb(0x17, 0xbe, 0xcf),
];
const WHITE: Rgb = Rgb(255, 255, 255);
const GRID: Rgb = Rgb(0xe3, 0xe3, 0xe3);
const AXIS: Rgb = Rgb(0x44, 0x44, 0x44);
const TEXT: Rgb = Rgb(0x22, 0x22, 0x22);
const NOTE: Rgb = Rgb(0x77, 0x77, 0x77);
const LEGEND_BORDER: Rgb = Rgb(0xbb, 0xbb, 0xbb);

const FONT_FAMILY: &str = "DejaVu Sans, Verdana, Arial, sans-serif";
const TICK_FONT: f32 = 12.0;
const LABEL_FONT: f32 = 14.0;
const TITLE_FONT: f32 = 17.0;
const LEGEND_FONT: f32 = 12.0;
const NOTE_FONT: f32 = 11.0;
const MARKER_R: f32 = 3.2;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Anchor {
    Start,
    Middle,
    End,
}

#[derive(Debug, Clone, PartialEq)]
enum Prim {
    Line {
        x1: f32,
        y1: f32,
        x2: f32,
        y2: f32,
        color: Rgb,
        width: f32,
    },
    Rect {
        x: f32,
        y: f32,
        w: f32,
        h: f32,
        fill: Option<Rgb>,
        stroke: Option<(Rgb, f32)>,
    },
    /// Drawn clipped to the plot area.
    Polyline {
        pts: Vec<(f32, f32)>,
        color: Rgb,
        width: f32,
    },
    /// A marker: filled circle with a thin white outline. `clip`: clip to the plot area.
    Circle {
        cx: f32,
        cy: f32,
        r: f32,
        fill: Rgb,
        clip: bool,
    },
    /// `y` is the baseline; `rotate`: rotated -90° about (x, y) (reads bottom to top).
    Text {
        x: f32,
        y: f32,
        text: String,
        size: f32,
        color: Rgb,
        anchor: Anchor,
        rotate: bool,
    },
}

struct Scene {
    width: u32,
    height: u32,
    /// Plot area (x, y, w, h): the clip rectangle for series.
    clip: (f32, f32, f32, f32),
    title: String,
    prims: Vec<Prim>,
}

fn is_val_label(label: &str) -> bool {
    let last = label.rsplit(|c: char| !c.is_alphanumeric()).find(|s| !s.is_empty()).unwrap_or("").to_lowercase();
    matches!(last.as_str(), "val" | "valid" | "validation" | "eval" | "test")
}

/// Tick positions for [lo, hi] with about `target` intervals, and the decimals to print.
fn nice_ticks(lo: f64, hi: f64, target: usize, min_step: f64) -> (Vec<f64>, usize) {
    let range = (hi - lo).max(f64::MIN_POSITIVE);
    let raw = range / target as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let nice = if norm < 1.5 {
        1.0
    } else if norm < 3.5 {
        2.0
    } else if norm < 7.5 {
        5.0
    } else {
        10.0
    };
    let step = (nice * mag).max(min_step);
    let decimals = (-step.log10() - 1e-9).ceil().clamp(0.0, 12.0) as usize;
    let first = (lo / step - 1e-9).ceil() as i64;
    let last = (hi / step + 1e-9).floor() as i64;
    let ticks = (first..=last).take(100).map(|k| k as f64 * step + 0.0).collect();
    (ticks, decimals)
}

fn fmt_tick(v: f64, decimals: usize) -> String {
    let s = format!("{v:.decimals$}");
    // Avoid "-0" / "-0.0".
    if s.trim_start_matches('-').chars().all(|c| c == '0' || c == '.') {
        s.trim_start_matches('-').to_string()
    } else {
        s
    }
}

/// Reduces a long pixel-space polyline to at most ~4 points per pixel column (first, min, max,
/// last of each column, in order), which draws identically.
fn decimate(pts: &[(f32, f32)], max_points: usize) -> Vec<(f32, f32)> {
    if pts.len() <= max_points {
        return pts.to_vec();
    }
    let mut out = Vec::with_capacity(max_points);
    let mut i = 0;
    while i < pts.len() {
        let col = pts[i].0.floor();
        let mut j = i;
        let (mut lo, mut hi) = (i, i);
        while j < pts.len() && pts[j].0.floor() == col {
            if pts[j].1 < pts[lo].1 {
                lo = j;
            }
            if pts[j].1 > pts[hi].1 {
                hi = j;
            }
            j += 1;
        }
        let mut keep = [i, lo, hi, j - 1];
        keep.sort_unstable();
        let mut prev = usize::MAX;
        for k in keep {
            if k != prev {
                out.push(pts[k]);
                prev = k;
            }
        }
        i = j;
    }
    out
}

fn build_scene(curves: &LossCurves) -> Scene {
    let (w, h) = (PLOT_WIDTH as f32, PLOT_HEIGHT as f32);

    // Finite points of each series.
    let series: Vec<Vec<(f64, f64)>> = curves
        .series
        .iter()
        .map(|s| s.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect())
        .collect();
    let all = || series.iter().flatten();
    let has_data = all().next().is_some();

    // Data ranges.
    let (mut xlo, mut xhi, mut ylo, mut yhi) = (0.0, 1.0, 0.0, 1.0);
    let mut clipped = false;
    if has_data {
        xlo = all().map(|p| p.0).fold(f64::INFINITY, f64::min);
        xhi = all().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
        ylo = all().map(|p| p.1).fold(f64::INFINITY, f64::min);
        // Top of the y range: the largest value of the last 95% of each series.
        yhi = series.iter().flat_map(|s| s[s.len() / 20..].iter()).map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
        let ymax = all().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
        let span = yhi - ylo;
        let pad = if span > 1e-12 * yhi.abs().max(1.0) { 0.05 * span } else { (0.05 * yhi.abs()).max(0.05) };
        clipped = ymax > yhi + pad;
        ylo -= pad;
        yhi += pad;
        if xhi - xlo > 0.0 {
            let xpad = 0.02 * (xhi - xlo);
            xlo -= xpad;
            xhi += xpad;
        } else {
            xlo -= 1.0;
            xhi += 1.0;
        }
    }
    let integer_x = all().all(|p| p.0.fract() == 0.0);
    let (xticks, xdec) = nice_ticks(xlo, xhi, 8, if integer_x { 1.0 } else { 0.0 });
    let (yticks, ydec) = nice_ticks(ylo, yhi, 6, 0.0);
    let ylabels: Vec<String> = yticks.iter().map(|&v| fmt_tick(v, ydec)).collect();
    let ytick_w = ylabels.iter().map(|s| text_width(s, TICK_FONT)).fold(0.0, f32::max);

    // Plot area.
    let px0 = (ytick_w + 8.0 + 34.0).round();
    let px1 = w - 24.0;
    let py0 = 48.0;
    let py1 = h - 58.0;
    let sx = |x: f64| (px0 as f64 + (x - xlo) / (xhi - xlo) * (px1 - px0) as f64) as f32;
    let sy = |y: f64| {
        let v = py1 as f64 - (y - ylo) / (yhi - ylo) * (py1 - py0) as f64;
        v.clamp(py0 as f64 - 20_000.0, py1 as f64 + 20_000.0) as f32
    };
    // Crisp 1px lines: put them on pixel centres.
    let crisp = |v: f32| v.floor() + 0.5;

    let mut prims = vec![Prim::Rect { x: 0.0, y: 0.0, w, h, fill: Some(WHITE), stroke: None }];

    // Grid lines.
    for &x in &xticks {
        let px = crisp(sx(x));
        prims.push(Prim::Line { x1: px, y1: py0, x2: px, y2: py1, color: GRID, width: 1.0 });
    }
    for &y in &yticks {
        let py = crisp(sy(y));
        prims.push(Prim::Line { x1: px0, y1: py, x2: px1, y2: py, color: GRID, width: 1.0 });
    }

    // Series.
    let max_points = 4 * (px1 - px0) as usize;
    for (i, (s, pts)) in curves.series.iter().zip(&series).enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let pix: Vec<(f32, f32)> = pts.iter().map(|&(x, y)| (sx(x), sy(y))).collect();
        if pix.len() >= 2 {
            prims.push(Prim::Polyline {
                pts: decimate(&pix, max_points),
                color,
                width: if is_val_label(&s.label) { 1.4 } else { 1.6 },
            });
        }
        if is_val_label(&s.label) || pix.len() == 1 {
            for &(cx, cy) in &pix {
                prims.push(Prim::Circle { cx, cy, r: MARKER_R, fill: color, clip: true });
            }
        }
    }

    // Frame, ticks and tick labels.
    let (fx0, fy0, fx1, fy1) = (crisp(px0), crisp(py0), crisp(px1), crisp(py1));
    prims.push(Prim::Rect { x: fx0, y: fy0, w: fx1 - fx0, h: fy1 - fy0, fill: None, stroke: Some((AXIS, 1.0)) });
    for &x in &xticks {
        let px = crisp(sx(x));
        prims.push(Prim::Line { x1: px, y1: fy1, x2: px, y2: fy1 + 5.0, color: AXIS, width: 1.0 });
        prims.push(Prim::Text {
            x: px,
            y: fy1 + 19.0,
            text: fmt_tick(x, xdec),
            size: TICK_FONT,
            color: TEXT,
            anchor: Anchor::Middle,
            rotate: false,
        });
    }
    for (&y, label) in yticks.iter().zip(ylabels) {
        let py = crisp(sy(y));
        prims.push(Prim::Line { x1: fx0 - 5.0, y1: py, x2: fx0, y2: py, color: AXIS, width: 1.0 });
        prims.push(Prim::Text {
            x: fx0 - 8.0,
            y: py + 4.0,
            text: label,
            size: TICK_FONT,
            color: TEXT,
            anchor: Anchor::End,
            rotate: false,
        });
    }

    // Axis labels and title.
    prims.push(Prim::Text {
        x: (px0 + px1) / 2.0,
        y: h - 16.0,
        text: "step".to_string(),
        size: LABEL_FONT,
        color: TEXT,
        anchor: Anchor::Middle,
        rotate: false,
    });
    prims.push(Prim::Text {
        x: (fx0 - 8.0 - ytick_w - 12.0).max(LABEL_FONT + 2.0),
        y: (py0 + py1) / 2.0,
        text: "loss".to_string(),
        size: LABEL_FONT,
        color: TEXT,
        anchor: Anchor::Middle,
        rotate: true,
    });
    if !curves.title.is_empty() {
        prims.push(Prim::Text {
            x: w / 2.0,
            y: 30.0,
            text: curves.title.clone(),
            size: TITLE_FONT,
            color: TEXT,
            anchor: Anchor::Middle,
            rotate: false,
        });
    }
    if clipped {
        prims.push(Prim::Text {
            x: w - 8.0,
            y: h - 10.0,
            text: "y range fits the last 95% of steps; earlier values are clipped".to_string(),
            size: NOTE_FONT,
            color: NOTE,
            anchor: Anchor::End,
            rotate: false,
        });
    }
    if !has_data {
        prims.push(Prim::Text {
            x: (px0 + px1) / 2.0,
            y: (py0 + py1) / 2.0,
            text: "no data".to_string(),
            size: LABEL_FONT,
            color: NOTE,
            anchor: Anchor::Middle,
            rotate: false,
        });
    }

    // Legend, top right inside the plot area.
    if !curves.series.is_empty() {
        let row = 18.0;
        let pad = 8.0;
        let sample = 26.0;
        let text_w = curves.series.iter().map(|s| text_width(&s.label, LEGEND_FONT)).fold(0.0, f32::max);
        let bw = (pad + sample + 6.0 + text_w + pad).round();
        let bh = pad * 2.0 + row * curves.series.len() as f32 - 4.0;
        let bx = crisp(px1 - 10.0 - bw);
        let by = crisp(py0 + 10.0);
        prims.push(Prim::Rect { x: bx, y: by, w: bw, h: bh, fill: Some(WHITE), stroke: Some((LEGEND_BORDER, 1.0)) });
        for (i, s) in curves.series.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            let cy = by + pad + 7.0 + row * i as f32;
            let val = is_val_label(&s.label);
            prims.push(Prim::Polyline {
                pts: vec![(bx + pad, cy), (bx + pad + sample, cy)],
                color,
                width: if val { 1.4 } else { 1.8 },
            });
            if val {
                prims.push(Prim::Circle { cx: bx + pad + sample / 2.0, cy, r: MARKER_R, fill: color, clip: false });
            }
            prims.push(Prim::Text {
                x: bx + pad + sample + 6.0,
                y: cy + 4.0,
                text: s.label.clone(),
                size: LEGEND_FONT,
                color: TEXT,
                anchor: Anchor::Start,
                rotate: false,
            });
        }
    }

    Scene {
        width: PLOT_WIDTH,
        height: PLOT_HEIGHT,
        clip: (px0, py0, px1 - px0, py1 - py0),
        title: curves.title.clone(),
        prims,
    }
}

// ---------------------------------------------------------------------------------------------
// Font.

/// DejaVu Sans 2.37 (Bitstream Vera license; see assets/DejaVuSans-LICENSE.txt).
static FONT_DATA: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

fn font() -> Option<&'static ttf_parser::Face<'static>> {
    static FACE: OnceLock<Option<ttf_parser::Face<'static>>> = OnceLock::new();
    FACE.get_or_init(|| ttf_parser::Face::parse(FONT_DATA, 0).ok()).as_ref()
}

fn glyph(face: &ttf_parser::Face<'_>, c: char) -> ttf_parser::GlyphId {
    face.glyph_index(c).unwrap_or(ttf_parser::GlyphId(0))
}

/// Advance width of `text` at `size` px, from the embedded font's metrics.
fn text_width(text: &str, size: f32) -> f32 {
    match font() {
        Some(face) => {
            let scale = size / face.units_per_em() as f32;
            text.chars().map(|c| face.glyph_hor_advance(glyph(face, c)).unwrap_or(0) as f32).sum::<f32>() * scale
        }
        None => text.chars().count() as f32 * size * 0.6,
    }
}

// ---------------------------------------------------------------------------------------------
// SVG output.

fn num(v: f32) -> String {
    let s = format!("{v:.2}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".to_string()
    } else {
        s.to_string()
    }
}

fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Control characters are not allowed in XML 1.0.
            c if (c as u32) < 0x20 && c != '\t' && c != '\n' && c != '\r' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

fn svg_from_scene(scene: &Scene) -> String {
    let mut s = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="{FONT_FAMILY}">"#,
        w = scene.width,
        h = scene.height
    );
    let _ = writeln!(s, "<title>{}</title>", xml_escape(&scene.title));
    let (cx, cy, cw, ch) = scene.clip;
    let _ = writeln!(
        s,
        r#"<defs><clipPath id="plot-area"><rect x="{}" y="{}" width="{}" height="{}"/></clipPath></defs>"#,
        num(cx),
        num(cy),
        num(cw),
        num(ch)
    );
    for p in &scene.prims {
        match p {
            Prim::Line { x1, y1, x2, y2, color, width } => {
                let _ = writeln!(
                    s,
                    r#"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="{}" stroke-width="{}"/>"#,
                    num(*x1),
                    num(*y1),
                    num(*x2),
                    num(*y2),
                    color.hex(),
                    num(*width)
                );
            }
            Prim::Rect { x, y, w, h, fill, stroke } => {
                let fill = fill.map_or("none".to_string(), Rgb::hex);
                let stroke = stroke
                    .map_or(String::new(), |(c, sw)| format!(r#" stroke="{}" stroke-width="{}""#, c.hex(), num(sw)));
                let _ = writeln!(
                    s,
                    r#"<rect x="{}" y="{}" width="{}" height="{}" fill="{fill}"{stroke}/>"#,
                    num(*x),
                    num(*y),
                    num(*w),
                    num(*h)
                );
            }
            Prim::Polyline { pts, color, width } => {
                let mut points = String::with_capacity(pts.len() * 14);
                for (i, (x, y)) in pts.iter().enumerate() {
                    if i > 0 {
                        points.push(' ');
                    }
                    let _ = write!(points, "{},{}", num(*x), num(*y));
                }
                let _ = writeln!(
                    s,
                    r#"<polyline points="{points}" fill="none" stroke="{}" stroke-width="{}" stroke-linejoin="round" stroke-linecap="round" clip-path="url(#plot-area)"/>"#,
                    color.hex(),
                    num(*width)
                );
            }
            Prim::Circle { cx, cy, r, fill, clip } => {
                let clip = if *clip { r#" clip-path="url(#plot-area)""# } else { "" };
                let _ = writeln!(
                    s,
                    r##"<circle cx="{}" cy="{}" r="{}" fill="{}" stroke="#ffffff" stroke-width="0.8"{clip}/>"##,
                    num(*cx),
                    num(*cy),
                    num(*r),
                    fill.hex()
                );
            }
            Prim::Text { x, y, text, size, color, anchor, rotate } => {
                let anchor = match anchor {
                    Anchor::Start => "start",
                    Anchor::Middle => "middle",
                    Anchor::End => "end",
                };
                let rotate = if *rotate {
                    format!(r#" transform="rotate(-90 {} {})""#, num(*x), num(*y))
                } else {
                    String::new()
                };
                let _ = writeln!(
                    s,
                    r#"<text x="{}" y="{}" font-size="{}" fill="{}" text-anchor="{anchor}"{rotate}>{}</text>"#,
                    num(*x),
                    num(*y),
                    num(*size),
                    color.hex(),
                    xml_escape(text)
                );
            }
        }
    }
    s.push_str("</svg>\n");
    s
}

// ---------------------------------------------------------------------------------------------
// PNG output.

fn paint(c: Rgb) -> tiny_skia::Paint<'static> {
    let mut p = tiny_skia::Paint::default();
    p.set_color_rgba8(c.0, c.1, c.2, 255);
    p.anti_alias = true;
    p
}

fn stroke(width: f32, round: bool) -> tiny_skia::Stroke {
    let mut s = tiny_skia::Stroke { width, ..Default::default() };
    if round {
        s.line_join = tiny_skia::LineJoin::Round;
        s.line_cap = tiny_skia::LineCap::Round;
    }
    s
}

/// Appends glyph outlines to a path builder, in pixel space (y down).
struct Outline<'a> {
    pb: &'a mut tiny_skia::PathBuilder,
    x: f32,
    y: f32,
    scale: f32,
}

impl Outline<'_> {
    fn p(&self, x: f32, y: f32) -> (f32, f32) {
        (self.x + x * self.scale, self.y - y * self.scale)
    }
}

impl ttf_parser::OutlineBuilder for Outline<'_> {
    fn move_to(&mut self, x: f32, y: f32) {
        let (x, y) = self.p(x, y);
        self.pb.move_to(x, y);
    }
    fn line_to(&mut self, x: f32, y: f32) {
        let (x, y) = self.p(x, y);
        self.pb.line_to(x, y);
    }
    fn quad_to(&mut self, x1: f32, y1: f32, x: f32, y: f32) {
        let (x1, y1) = self.p(x1, y1);
        let (x, y) = self.p(x, y);
        self.pb.quad_to(x1, y1, x, y);
    }
    fn curve_to(&mut self, x1: f32, y1: f32, x2: f32, y2: f32, x: f32, y: f32) {
        let (x1, y1) = self.p(x1, y1);
        let (x2, y2) = self.p(x2, y2);
        let (x, y) = self.p(x, y);
        self.pb.cubic_to(x1, y1, x2, y2, x, y);
    }
    fn close(&mut self) {
        self.pb.close();
    }
}

/// The outline of `text` with its baseline starting at (x, y).
fn text_path(face: &ttf_parser::Face<'_>, text: &str, x: f32, y: f32, size: f32) -> Option<tiny_skia::Path> {
    let scale = size / face.units_per_em() as f32;
    let mut pb = tiny_skia::PathBuilder::new();
    let mut pen = x;
    for c in text.chars() {
        let g = glyph(face, c);
        let mut outline = Outline { pb: &mut pb, x: pen, y, scale };
        face.outline_glyph(g, &mut outline);
        pen += face.glyph_hor_advance(g).unwrap_or(0) as f32 * scale;
    }
    pb.finish()
}

fn rasterize(scene: &Scene) -> Result<tiny_skia::Pixmap, EvalError> {
    use tiny_skia::{FillRule, Mask, PathBuilder, Pixmap, Rect, Transform};
    let err = |what: &str| EvalError::Render(what.to_string());
    let face = font().ok_or_else(|| err("the embedded font could not be parsed"))?;
    let mut pixmap = Pixmap::new(scene.width, scene.height).ok_or_else(|| err("bad image size"))?;
    pixmap.fill(tiny_skia::Color::WHITE);

    let (cx, cy, cw, ch) = scene.clip;
    let mut mask = Mask::new(scene.width, scene.height).ok_or_else(|| err("bad image size"))?;
    let clip_rect = Rect::from_xywh(cx, cy, cw, ch).ok_or_else(|| err("bad plot area"))?;
    mask.fill_path(&PathBuilder::from_rect(clip_rect), FillRule::Winding, false, Transform::identity());
    let id = Transform::identity();

    for p in &scene.prims {
        match p {
            Prim::Line { x1, y1, x2, y2, color, width } => {
                let mut pb = PathBuilder::new();
                pb.move_to(*x1, *y1);
                pb.line_to(*x2, *y2);
                if let Some(path) = pb.finish() {
                    pixmap.stroke_path(&path, &paint(*color), &stroke(*width, false), id, None);
                }
            }
            Prim::Rect { x, y, w, h, fill, stroke: st } => {
                let Some(rect) = Rect::from_xywh(*x, *y, *w, *h) else {
                    continue;
                };
                let path = PathBuilder::from_rect(rect);
                if let Some(fill) = fill {
                    pixmap.fill_path(&path, &paint(*fill), FillRule::Winding, id, None);
                }
                if let Some((color, width)) = st {
                    pixmap.stroke_path(&path, &paint(*color), &stroke(*width, false), id, None);
                }
            }
            Prim::Polyline { pts, color, width } => {
                let mut pb = PathBuilder::new();
                for (i, &(x, y)) in pts.iter().enumerate() {
                    if i == 0 {
                        pb.move_to(x, y);
                    } else {
                        pb.line_to(x, y);
                    }
                }
                if let Some(path) = pb.finish() {
                    pixmap.stroke_path(&path, &paint(*color), &stroke(*width, true), id, Some(&mask));
                }
            }
            Prim::Circle { cx, cy, r, fill, clip } => {
                let Some(path) = PathBuilder::from_circle(*cx, *cy, *r) else {
                    continue;
                };
                let m = if *clip { Some(&mask) } else { None };
                pixmap.fill_path(&path, &paint(*fill), FillRule::Winding, id, m);
                pixmap.stroke_path(&path, &paint(WHITE), &stroke(0.8, false), id, m);
            }
            Prim::Text { x, y, text, size, color, anchor, rotate } => {
                let width = text_width(text, *size);
                let start = match anchor {
                    Anchor::Start => *x,
                    Anchor::Middle => *x - width / 2.0,
                    Anchor::End => *x - width,
                };
                let Some(path) = text_path(face, text, start, *y, *size) else {
                    continue; // whitespace only
                };
                let transform = if *rotate { Transform::from_rotate_at(-90.0, *x, *y) } else { id };
                pixmap.fill_path(&path, &paint(*color), FillRule::Winding, transform, None);
            }
        }
    }
    Ok(pixmap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_nice() {
        let (t, d) = nice_ticks(0.0, 1000.0, 8, 1.0);
        assert_eq!(t.first(), Some(&0.0));
        assert_eq!(t.last(), Some(&1000.0));
        assert_eq!(d, 0);
        let (t, d) = nice_ticks(2.13, 3.41, 6, 0.0);
        assert_eq!(d, 1);
        assert!(t.iter().all(|v| (2.13..=3.41).contains(v)));
        assert_eq!(fmt_tick(-0.0, 1), "0.0");
    }

    #[test]
    fn val_labels() {
        assert!(is_val_label("run1 val"));
        assert!(is_val_label("val_loss: eval"));
        assert!(!is_val_label("run1 train"));
        assert!(!is_val_label("interval"));
    }

    #[test]
    fn decimation_keeps_extremes() {
        let pts: Vec<(f32, f32)> = (0..10_000).map(|i| (i as f32 / 100.0, (i % 7) as f32)).collect();
        let d = decimate(&pts, 1000);
        assert!(d.len() <= 400);
        assert!(d.iter().any(|p| p.1 == 6.0));
        assert!(d.iter().any(|p| p.1 == 0.0));
    }

    #[test]
    fn font_is_embedded() {
        assert!(font().is_some());
        assert!(text_width("loss", 14.0) > 20.0);
    }
}
