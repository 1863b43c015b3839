//! Round-to-nearest quantization, and the per-row / per-group grids every other algorithm here
//! quantizes onto.
//!
//! - int8, symmetric per output row: `scale = max|w| / 127`, `q = round(w / scale)` in −127..=127.
//! - int4, asymmetric per group of `group` consecutive inputs (GPTQ's quantizer): the range
//!   `[min(w, 0), max(w, 0)]` maps onto 0..=15, `scale = (max − min) / 15` rounded *up* to f16,
//!   `zero = round(−min / scale)`, `q = round(w / scale) + zero`; including 0 in the range keeps
//!   every element within scale/2 of its code, and an all-zero group gets GPTQ's range [−1, 1].
//!
//! All arithmetic is f64 with round-half-to-even, shared with GPTQ so that GPTQ with an identity
//! Hessian reproduces RTN bit for bit.

use half::f16;
use kiln_tensor::quant::{check_group, pack_int4, Int4Weight, Int8Weight};
use rayon::prelude::*;

use crate::{check_weight, CompressError, Result};

/// Symmetric int8 scale of one row: `max|w| / 127` as f32 (0 for an all-zero row).
pub(crate) fn int8_scale(row: impl Iterator<Item = f64>) -> f32 {
    (row.fold(0.0f64, |a, v| a.max(v.abs())) / 127.0) as f32
}

/// The int8 code of `v` on a row of scale `scale`, and its dequantized value.
#[inline]
pub(crate) fn int8_quant(v: f64, scale: f32) -> (i8, f64) {
    if scale == 0.0 {
        return (0, 0.0);
    }
    let s = scale as f64;
    let q = (v / s).round_ties_even().clamp(-127.0, 127.0);
    (q as i8, q * s)
}

/// One int4 group's grid: `scale` and `zero` exactly as stored (f16), and as f64 for the arithmetic.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Int4Grid {
    pub scale: f16,
    pub zero: f16,
    s: f64,
    z: f64,
}

impl Int4Grid {
    /// The grid of a group of values (see the module doc).
    pub(crate) fn fit(vals: impl Iterator<Item = f64>) -> Result<Int4Grid> {
        let (mut lo, mut hi) = (0.0f64, 0.0f64);
        for v in vals {
            lo = lo.min(v);
            hi = hi.max(v);
        }
        if lo == 0.0 && hi == 0.0 {
            (lo, hi) = (-1.0, 1.0);
        }
        let scale = f16_at_least((hi - lo) / 15.0)?;
        let s = scale.to_f64();
        let z = (-lo / s).round_ties_even().clamp(0.0, 15.0);
        Ok(Int4Grid { scale, zero: f16::from_f64(z), s, z })
    }

    /// A grid from stored parameters (static groups reuse them).
    pub(crate) fn from_stored(scale: f16, zero: f16) -> Int4Grid {
        Int4Grid { scale, zero, s: scale.to_f64(), z: zero.to_f64() }
    }

    /// The 4-bit code of `v` and its dequantized value `(q − zero) · scale`.
    #[inline]
    pub(crate) fn quant(&self, v: f64) -> (u8, f64) {
        let q = ((v / self.s).round_ties_even() + self.z).clamp(0.0, 15.0);
        (q as u8, (q - self.z) * self.s)
    }
}

/// The smallest finite positive f16 at or above `x` (so a group's range never exceeds 15 steps).
fn f16_at_least(x: f64) -> Result<f16> {
    let h = f16::from_f64(x);
    let h = if h.to_f64() < x { f16::from_bits(h.to_bits() + 1) } else { h };
    if !h.is_finite() {
        return Err(CompressError::ScaleRange(x * 15.0));
    }
    // A range below the smallest subnormal still needs a non-zero step.
    Ok(if h.to_bits() == 0 { f16::from_bits(1) } else { h })
}

/// Per-row symmetric int8 by rounding to nearest.
pub fn rtn_int8(w: &[f32], n: usize, k: usize) -> Result<Int8Weight> {
    check_weight(w, n, k)?;
    let mut q = vec![0i8; n * k];
    let scale: Vec<f32> = q
        .par_chunks_mut(k)
        .zip(w.par_chunks(k))
        .map(|(qr, wr)| {
            let s = int8_scale(wr.iter().map(|&v| v as f64));
            qr.iter_mut().zip(wr).for_each(|(c, &v)| *c = int8_quant(v as f64, s).0);
            s
        })
        .collect();
    Ok(Int8Weight::from_parts(n, k, q, scale, None)?)
}

/// Grouped asymmetric int4 by rounding to nearest; `group` is 32, 64 or 128 and divides `k`.
pub fn rtn_int4(w: &[f32], n: usize, k: usize, group: usize) -> Result<Int4Weight> {
    check_weight(w, n, k)?;
    check_group(k, group)?;
    let rows: Vec<(Vec<u8>, Vec<f16>, Vec<f16>)> =
        w.par_chunks(k).map(|row| rtn_int4_row(row, group)).collect::<Result<_>>()?;
    assemble_int4(n, k, group, rows, None)
}

fn rtn_int4_row(row: &[f32], group: usize) -> Result<(Vec<u8>, Vec<f16>, Vec<f16>)> {
    let mut codes = Vec::with_capacity(row.len());
    let (mut scale, mut zero) = (Vec::new(), Vec::new());
    for g in row.chunks_exact(group) {
        let grid = Int4Grid::fit(g.iter().map(|&v| v as f64))?;
        codes.extend(g.iter().map(|&v| grid.quant(v as f64).0));
        scale.push(grid.scale);
        zero.push(grid.zero);
    }
    Ok((codes, scale, zero))
}

/// Packs per-row (codes, scales, zeros) into an [`Int4Weight`].
pub(crate) fn assemble_int4(
    n: usize,
    k: usize,
    group: usize,
    rows: Vec<(Vec<u8>, Vec<f16>, Vec<f16>)>,
    act_scale: Option<Vec<f32>>,
) -> Result<Int4Weight> {
    let mut codes = Vec::with_capacity(n * k);
    let (mut scale, mut zero) = (Vec::new(), Vec::new());
    for (c, s, z) in rows {
        codes.extend(c);
        scale.extend(s);
        zero.extend(z);
    }
    Ok(Int4Weight::from_parts(n, k, group, pack_int4(&codes), scale, zero, act_scale)?)
}

/// The effective float weight of an int8 weight, `q · scale / act_scale`, so that
/// `W_eff · x` is what the kernels compute.
pub fn dequantize_int8(w: &Int8Weight) -> Vec<f32> {
    let k = w.k;
    let act = |i: usize| w.act_scale.as_ref().map_or(1.0, |s| s[i]);
    (0..w.n * k).map(|j| w.q[j] as f32 * w.scale[j / k] / act(j % k)).collect()
}

/// The effective float weight of an int4 weight, `(q − zero) · scale / act_scale`.
pub fn dequantize_int4(w: &Int4Weight) -> Vec<f32> {
    let k = w.k;
    let gpr = w.groups_per_row();
    let act = |i: usize| w.act_scale.as_ref().map_or(1.0, |s| s[i]);
    (0..w.n * k)
        .map(|j| {
            let (o, i) = (j / k, j % k);
            let g = o * gpr + i / w.group;
            (w.code(o, i) as f32 - w.zero[g].to_f32()) * w.scale[g].to_f32() / act(i)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    #[test]
    fn int8_round_trip_is_within_half_a_step() {
        let (n, k) = (13, 77);
        let mut w = randn(&mut rng(1), n * k, 1.0);
        w[3 * k..4 * k].fill(0.0); // an all-zero row
        let q = rtn_int8(&w, n, k).unwrap();
        let d = dequantize_int8(&q);
        for (j, (&a, &b)) in w.iter().zip(&d).enumerate() {
            let s = q.scale[j / k];
            assert!((a - b).abs() <= s * 0.5 * (1.0 + 1e-5), "element {j}: {a} vs {b}, scale {s}");
        }
        assert_eq!(q.scale[3], 0.0);
        // The largest element of each row lands on ±127.
        for o in 0..n {
            if o != 3 {
                assert_eq!(q.q[o * k..(o + 1) * k].iter().map(|c| c.unsigned_abs()).max(), Some(127));
            }
        }
    }

    #[test]
    fn int4_round_trip_is_within_half_a_step_per_group() {
        let (n, k) = (9, 256);
        for group in [32, 64, 128] {
            let mut w = randn(&mut rng(group as u64), n * k, 2.0);
            // Groups that are all zero, all equal positive, all equal negative, one-signed, tiny.
            w[..32].fill(0.0);
            w[k..k + 128].fill(0.7);
            w[2 * k..2 * k + 128].fill(-0.3);
            w[3 * k..4 * k].iter_mut().for_each(|v| *v = v.abs() + 5.0);
            w[4 * k..4 * k + 128].iter_mut().for_each(|v| *v *= 1e-9);
            let q = rtn_int4(&w, n, k, group).unwrap();
            let d = dequantize_int4(&q);
            for (j, (&a, &b)) in w.iter().zip(&d).enumerate() {
                let g = (j / k) * (k / group) + (j % k) / group;
                let s = q.scale[g].to_f32();
                assert!(b.is_finite() && s > 0.0, "group {g}: scale {s}");
                assert!((a - b).abs() <= s * 0.5 * (1.0 + 1e-5), "g{group} element {j}: {a} vs {b}, scale {s}");
            }
            // An all-equal group lands on its value up to the f16 rounding of the scale.
            assert!(d[k..k + 32].iter().all(|&v| (v - 0.7).abs() <= 0.7 / 1024.0), "{:?}", &d[k..k + 4]);
            assert!(d[2 * k..2 * k + 32].iter().all(|&v| (v + 0.3).abs() <= 0.3 / 1024.0));
        }
    }

    #[test]
    fn int4_rejects_bad_groups_and_non_finite_weights() {
        let w = vec![0.5f32; 4 * 96];
        assert!(matches!(rtn_int4(&w, 4, 96, 64), Err(CompressError::Quant(_))));
        assert!(matches!(rtn_int4(&w, 4, 96, 48), Err(CompressError::Quant(_))));
        let mut bad = w.clone();
        bad[7] = f32::NAN;
        assert!(matches!(rtn_int4(&bad, 4, 96, 32), Err(CompressError::NonFinite { index: 7, .. })));
        assert!(matches!(rtn_int8(&w, 4, 95), Err(CompressError::Len { .. })));
        assert!(matches!(rtn_int4(&[1e9f32; 32], 1, 32, 32), Err(CompressError::ScaleRange(_))));
        assert!(matches!(rtn_int4(&[1e9f32, -1e9], 1, 32, 32), Err(CompressError::Len { .. })));
        let mut wide = vec![0.0f32; 32];
        wide[0] = 1e6;
        wide[1] = -1e6;
        assert!(matches!(rtn_int4(&wide, 1, 32, 32), Err(CompressError::ScaleRange(_))));
    }

    #[test]
    fn int4_kernel_runs_the_dequantized_weight() {
        // W_eff from dequantize_int4 is what int4_matmul multiplies by, on the activations
        // rounded to int8 per 32 block (prefill and decode alike): about 0.5% relative on random
        // data, hence 2e-2; kiln-tensor's own tests check the kernel exactly against its definition.
        for m in [3, 6] {
            check_int4_kernel(m, 2e-2);
        }
    }

    fn check_int4_kernel(m: usize, bound: f64) {
        let (n, k) = (11, 128);
        let w = randn(&mut rng(4), n * k, 1.0);
        let mut q = rtn_int4(&w, n, k, 32).unwrap();
        q.act_scale = Some((0..k).map(|i| 0.5 + (i % 7) as f32 * 0.25).collect());
        let d = dequantize_int4(&q);
        let x = randn(&mut rng(5), m * k, 1.0);
        let mut y = vec![0.0; m * n];
        kiln_tensor::quant::int4_matmul(&mut y, &x, &q, None, m);
        let y0 = dense_matmul(&x, &d, m, n, k);
        let e = rel_err(&y, &y0);
        assert!(e < bound, "m = {m}: {e:e}");
    }
}
