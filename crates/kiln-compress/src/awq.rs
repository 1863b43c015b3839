//! AWQ (Lin et al., 2024): activation-aware int4. Input channels that carry large activations
//! matter most, so scale them up in the weight before rounding (`W·diag(s)`, run on `x / s`)
//! and they lose less to quantization.
//!
//! The scale search is the reference's `_search_module_scales` on one linear: for α on a grid
//! in [0, 1), `s = max(mean|x|^α, 1e-4)`, normalised by `sqrt(max(s)·min(s))`; keep the α that
//! minimises `‖(Q(W·diag(s))·diag(s)⁻¹ − W)·Xᵀ‖²` on the calibration sample (α = 0 is plain RTN,
//! and ties keep the smaller α). The optional clipping search is the reference's
//! `auto_clip_layer`: per output row and group, shrink the symmetric range `max|w|` by
//! `1 − i/grid` for i below `max_shrink·grid`, and keep the range whose group output error
//! `Σ_t (x_t·(Q(clip(w)) − w))²` over the sample is smallest (measured in the scaled domain).

use kiln_tensor::quant::{check_group, Int4Weight};
use rayon::prelude::*;

use crate::rtn::{dequantize_int4, rtn_int4, Int4Grid};
use crate::{check_weight, metrics::output_error_sq, scale_columns, CompressError, LinearCalib, Result};

/// AWQ settings; the defaults are the reference's.
#[derive(Clone, Debug)]
pub struct AwqOptions {
    /// α grid points in [0, 1) (20).
    pub grid: usize,
    /// Search a clipping range per group after scaling (on).
    pub clip: bool,
    /// Clipping grid (20) and the largest shrink tried (0.5).
    pub clip_grid: usize,
    pub max_shrink: f32,
}

impl Default for AwqOptions {
    fn default() -> Self {
        AwqOptions { grid: 20, clip: true, clip_grid: 20, max_shrink: 0.5 }
    }
}

/// The candidate scales for one α.
fn candidate(absmean: &[f32], alpha: f64) -> Vec<f32> {
    let s: Vec<f64> = absmean.iter().map(|&m| (m as f64).powf(alpha).max(1e-4)).collect();
    let max = s.iter().copied().fold(f64::MIN, f64::max);
    let min = s.iter().copied().fold(f64::MAX, f64::min);
    let norm = (max * min).sqrt();
    s.iter().map(|&v| (v / norm) as f32).collect()
}

fn check_inputs(w: &[f32], n: usize, k: usize, group: usize, calib: &LinearCalib) -> Result<()> {
    check_weight(w, n, k)?;
    check_group(k, group)?;
    calib.check_for(k)
}

/// AWQ's per-input-channel scales (`grid` values of α in [0, 1); `grid = 1` tries α = 0 only).
pub fn awq_scales(w: &[f32], n: usize, k: usize, group: usize, calib: &LinearCalib, grid: usize) -> Result<Vec<f32>> {
    check_inputs(w, n, k, group, calib)?;
    if grid == 0 {
        return Err(CompressError::Option("AWQ grid must be at least 1".into()));
    }
    let absmean = calib.absmean();
    let (x, rows) = (calib.samples(), calib.sample_rows());
    let mut best: Option<(f64, Vec<f32>)> = None;
    for a in 0..grid {
        let s = candidate(&absmean, a as f64 / grid as f64);
        let mut q = rtn_int4(&scale_columns(w, k, &s), n, k, group)?;
        q.act_scale = Some(s);
        let err = output_error_sq(w, &dequantize_int4(&q), n, k, x, rows);
        if best.as_ref().is_none_or(|(e, _)| err < *e) {
            best = Some((err, q.act_scale.take().unwrap_or_default()));
        }
    }
    Ok(best.map(|(_, s)| s).unwrap_or_else(|| vec![1.0; k]))
}

/// AWQ int4 with the scale search only (no clipping): RTN of `W·diag(s)`, `act_scale = s`.
pub fn awq_int4(w: &[f32], n: usize, k: usize, group: usize, calib: &LinearCalib, grid: usize) -> Result<Int4Weight> {
    awq_int4_with(w, n, k, group, calib, &AwqOptions { grid, clip: false, ..Default::default() })
}

/// AWQ int4 with every option: scale search, then (if `clip`) the clipping search.
pub fn awq_int4_with(
    w: &[f32],
    n: usize,
    k: usize,
    group: usize,
    calib: &LinearCalib,
    opts: &AwqOptions,
) -> Result<Int4Weight> {
    let s = awq_scales(w, n, k, group, calib, opts.grid)?;
    let mut ws = scale_columns(w, k, &s);
    if opts.clip {
        if opts.clip_grid == 0 || !(0.0..1.0).contains(&opts.max_shrink) {
            return Err(CompressError::Option("AWQ clip_grid must be >= 1 and max_shrink in [0, 1)".into()));
        }
        // The search runs in the scaled domain: weights W·diag(s), inputs x / s.
        let xs: Vec<f32> =
            calib.samples().chunks_exact(k).flat_map(|row| row.iter().zip(&s).map(|(v, d)| v / d)).collect();
        clip_search(&mut ws, k, group, &xs, opts)?;
    }
    let q = rtn_int4(&ws, n, k, group)?;
    Ok(Int4Weight { act_scale: Some(s), ..q })
}

/// Clamps each group of `w [n, k]` to the symmetric range with the smallest sample output error.
fn clip_search(w: &mut [f32], k: usize, group: usize, x: &[f32], opts: &AwqOptions) -> Result<()> {
    let rows = x.len() / k;
    let steps = ((opts.max_shrink * opts.clip_grid as f32) as usize).max(1);
    w.par_chunks_mut(k).try_for_each(|row| {
        let mut d = vec![0.0f32; group];
        for (g, wg) in row.chunks_exact_mut(group).enumerate() {
            let org_max = wg.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let (mut best_err, mut best_max) = (f64::INFINITY, org_max);
            for i in 0..steps {
                let mv = org_max * (1.0 - i as f32 / opts.clip_grid as f32);
                let grid = Int4Grid::fit(wg.iter().map(|v| v.clamp(-mv, mv) as f64))?;
                for (dj, &v) in d.iter_mut().zip(wg.iter()) {
                    *dj = (grid.quant(v.clamp(-mv, mv) as f64).1 - v as f64) as f32;
                }
                let err: f64 =
                    (0..rows).map(|t| (dot(&x[t * k + g * group..t * k + (g + 1) * group], &d) as f64).powi(2)).sum();
                if err < best_err {
                    (best_err, best_max) = (err, mv);
                }
            }
            wg.iter_mut().for_each(|v| *v = v.clamp(-best_max, best_max));
        }
        Ok(())
    })
}

/// Σ a·b with eight partial sums (vectorizes; fixed order).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for j in 0..8 {
            acc[j] += x[j] * y[j];
        }
    }
    let tail: f32 = a.chunks_exact(8).remainder().iter().zip(b.chunks_exact(8).remainder()).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relative_output_error;
    use crate::testutil::*;

    fn outlier_case(seed: u64, n: usize, k: usize) -> (Vec<f32>, LinearCalib, Vec<f32>) {
        let mut r = rng(seed);
        let w = gauss(&mut r, n * k);
        let x = llm_like_activations(&mut r, 768, k, 8, 6, 20.0);
        let mut c = LinearCalib::new(k);
        c.observe(&x[..512 * k], 512).unwrap();
        (w, c, x[512 * k..].to_vec())
    }

    #[test]
    fn awq_with_alpha_zero_is_rtn() {
        let (n, k) = (16, 256);
        let (w, c, _) = outlier_case(1, n, k);
        let s = awq_scales(&w, n, k, 64, &c, 1).unwrap();
        assert!(s.iter().all(|&v| v == 1.0));
        let a = awq_int4(&w, n, k, 64, &c, 1).unwrap();
        let r = rtn_int4(&w, n, k, 64).unwrap();
        assert_eq!(Int4Weight { act_scale: None, ..a }, r);
    }

    #[test]
    fn awq_beats_rtn_on_outlier_channels() {
        let (n, k) = (64, 256);
        let (w, c, x) = outlier_case(2, n, k);
        let rows = x.len() / k;
        for group in [64, 128] {
            let rtn = relative_output_error(&w, &dequantize_int4(&rtn_int4(&w, n, k, group).unwrap()), n, k, &x, rows);
            let awq = awq_int4(&w, n, k, group, &c, 20).unwrap();
            let e = relative_output_error(&w, &dequantize_int4(&awq), n, k, &x, rows);
            assert!(e < 0.8 * rtn, "g{group}: AWQ {e} vs RTN {rtn}");
            let clipped = awq_int4_with(&w, n, k, group, &c, &AwqOptions::default()).unwrap();
            let ec = relative_output_error(&w, &dequantize_int4(&clipped), n, k, &x, rows);
            // Clipping is chosen on the sample; on held-out rows it may not help, but must not hurt much.
            assert!(ec < 1.1 * e, "g{group}: AWQ+clip {ec} vs AWQ {e}");
        }
    }

    #[test]
    fn awq_is_deterministic_and_checks_its_inputs() {
        let (n, k) = (8, 128);
        let (w, c, _) = outlier_case(3, n, k);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| awq_int4_with(&w, n, k, 32, &c, &AwqOptions::default()).unwrap())
        };
        assert_eq!(run(1), run(3));
        assert!(matches!(awq_scales(&w, n, k, 32, &c, 0), Err(CompressError::Option(_))));
        assert!(matches!(awq_scales(&w, n, k, 32, &LinearCalib::new(k), 20), Err(CompressError::NoCalibration)));
        assert!(matches!(awq_scales(&w, n, k, 32, &LinearCalib::new(64), 20), Err(CompressError::CalibK { .. })));
    }
}
