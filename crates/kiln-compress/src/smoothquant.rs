//! SmoothQuant (Xiao et al., 2023): move activation outliers into the weights before W8A8.
//!
//! Per input channel j, `s_j = max|X_j|^α / max_o|W_oj|^(1−α)` (both maxima floored at 1e-5,
//! and s too, as the reference does); the layer then runs on `x / s` with weights `W·diag(s)`,
//! which is the same product, with activations flatter across channels (easier to quantize per
//! token) and weights a little less flat. α = 0.5 is the paper's default.

use kiln_tensor::quant::Int8Weight;

use crate::rtn::rtn_int8;
use crate::{check_len, check_weight, scale_columns, CompressError, LinearCalib, Result};

/// SmoothQuant's per-input-channel scales from the activations' channel maxima.
pub fn smoothquant_scales(act_absmax: &[f32], w: &[f32], n: usize, k: usize, alpha: f32) -> Result<Vec<f32>> {
    check_weight(w, n, k)?;
    check_len("act_absmax", k, act_absmax.len())?;
    crate::check_finite("act_absmax", act_absmax)?;
    if !(0.0..=1.0).contains(&alpha) {
        return Err(CompressError::Option(format!("SmoothQuant alpha must be in [0, 1], got {alpha}")));
    }
    let mut wmax = vec![0.0f32; k];
    for row in w.chunks_exact(k) {
        wmax.iter_mut().zip(row).for_each(|(m, &v)| *m = m.max(v.abs()));
    }
    Ok(act_absmax
        .iter()
        .zip(&wmax)
        .map(|(&a, &wm)| {
            let s = (a.abs().max(1e-5) as f64).powf(alpha as f64) / (wm.max(1e-5) as f64).powf(1.0 - alpha as f64);
            (s as f32).clamp(1e-5, f32::MAX)
        })
        .collect())
}

/// W8A8 weights with SmoothQuant: per-row symmetric int8 of `W·diag(s)`, `act_scale = s`.
pub fn w8a8_smoothquant(w: &[f32], n: usize, k: usize, calib: &LinearCalib, alpha: f32) -> Result<Int8Weight> {
    calib.check_for(k)?;
    let s = smoothquant_scales(calib.absmax(), w, n, k, alpha)?;
    let q = rtn_int8(&scale_columns(w, k, &s), n, k)?;
    Ok(Int8Weight::from_parts(n, k, q.q, q.scale, Some(s))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use kiln_tensor::quant::w8a8_matmul;

    #[test]
    fn smoothing_flattens_activations_and_cuts_w8a8_error() {
        let (n, k) = (64, 256);
        let mut r = rng(11);
        let w = gauss(&mut r, n * k);
        let x = llm_like_activations(&mut r, 768, k, 8, 6, 40.0);
        let (calib_x, test_x) = x.split_at(512 * k);
        let rows = test_x.len() / k;
        let mut c = LinearCalib::new(k);
        c.observe(calib_x, 512).unwrap();

        let s = smoothquant_scales(c.absmax(), &w, n, k, 0.5).unwrap();
        let spread = |v: &[f32]| {
            let max = v.iter().copied().fold(0.0f32, f32::max);
            max / (v.iter().sum::<f32>() / v.len() as f32)
        };
        let smoothed: Vec<f32> = c.absmax().iter().zip(&s).map(|(a, s)| a / s).collect();
        let (before, after) = (spread(c.absmax()), spread(&smoothed));
        assert!(after < 0.5 * before, "channel max / mean: {before} before, {after} after smoothing");

        let want = dense_matmul(test_x, &w, rows, n, k);
        let run = |q: &Int8Weight| {
            let mut y = vec![0.0; rows * n];
            w8a8_matmul(&mut y, test_x, q, None, rows);
            rel_err(&y, &want)
        };
        let plain = run(&rtn_int8(&w, n, k).unwrap());
        let smooth = run(&w8a8_smoothquant(&w, n, k, &c, 0.5).unwrap());
        assert!(smooth < 0.7 * plain, "w8a8 output error: plain {plain}, smoothed {smooth}");
    }

    #[test]
    fn alpha_zero_and_zero_channels_are_safe() {
        let (n, k) = (3, 8);
        let mut w = gauss(&mut rng(1), n * k);
        for o in 0..n {
            w[o * k + 2] = 0.0; // a weight column of zeros
        }
        let mut amax = vec![1.0f32; k];
        amax[5] = 0.0; // a channel that never fires
        for alpha in [0.0, 0.5, 1.0] {
            let s = smoothquant_scales(&amax, &w, n, k, alpha).unwrap();
            assert!(s.iter().all(|v| v.is_finite() && *v > 0.0), "alpha {alpha}: {s:?}");
        }
        assert!(matches!(smoothquant_scales(&amax, &w, n, k, 1.5), Err(CompressError::Option(_))));
    }
}
