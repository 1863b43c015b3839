//! Symmetric int8 quantization and the fixed-point requantisation of integer-only inference:
//! the gemmlowp / TFLite `MultiplyByQuantizedMultiplier` form.

/// Per-output-channel symmetric int8: for each row of `w [out, in]`, scale = max|row|/127 and
/// code = round(w/scale) (half away from zero), in [−127, 127]. A zero row gets scale 1.
pub fn quantize_rows(w: &[f32], out: usize, inp: usize) -> (Vec<i8>, Vec<f32>) {
    let mut codes = vec![0i8; out * inp];
    let mut scales = vec![1.0f32; out];
    for o in 0..out {
        let row = &w[o * inp..(o + 1) * inp];
        let amax = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        if amax > 0.0 {
            scales[o] = amax / 127.0;
        }
        for (c, &v) in codes[o * inp..(o + 1) * inp].iter_mut().zip(row) {
            *c = (v / scales[o]).round().clamp(-127.0, 127.0) as i8;
        }
    }
    (codes, scales)
}

/// The scale that maps a calibrated |max| onto `levels` integer steps (1 for a zero range, so
/// every code is 0 and nothing divides by zero).
pub fn scale_for(absmax: f32, levels: f32) -> f64 {
    if absmax > 0.0 && absmax.is_finite() {
        absmax as f64 / levels as f64
    } else {
        1.0
    }
}

/// A real multiplier `M` > 0 as `M0 · 2^shift / 2^31` with `M0` in [2^30, 2^31): what an
/// integer accelerator multiplies by, made once at conversion (the only float is here).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuantMultiplier {
    pub m0: i32,
    /// Power of two: positive shifts left, negative right (TFLite's convention).
    pub shift: i32,
}

impl QuantMultiplier {
    /// The nearest representable multiplier; multipliers below 2^-62 become 0 (M0 = 0) and
    /// ones at or above 2^31 are refused by clamping to the largest (callers size scales so
    /// this never happens).
    pub fn from_f64(m: f64) -> QuantMultiplier {
        if m.is_nan() || m <= 0.0 || !m.is_finite() {
            return QuantMultiplier { m0: 0, shift: 0 };
        }
        let mut shift = 0i32;
        let mut q = m;
        while q >= 1.0 {
            q /= 2.0;
            shift += 1;
        }
        while q < 0.5 {
            q *= 2.0;
            shift -= 1;
        }
        let mut m0 = (q * (1u64 << 31) as f64).round() as i64;
        if m0 == 1i64 << 31 {
            m0 /= 2;
            shift += 1;
        }
        if shift < -62 {
            return QuantMultiplier { m0: 0, shift: 0 };
        }
        QuantMultiplier { m0: m0 as i32, shift: shift.min(30) }
    }
}

/// gemmlowp's SaturatingRoundingDoublingHighMul: a·b / 2^31 rounded to nearest with ties
/// toward +∞ (its nudge-then-truncate), saturating the one overflow (i32::MIN · i32::MIN).
pub fn srdhm(a: i32, b: i32) -> i32 {
    if a == i32::MIN && b == i32::MIN {
        return i32::MAX;
    }
    let ab = a as i64 * b as i64;
    let nudge: i64 = if ab >= 0 { 1 << 30 } else { 1 - (1 << 30) };
    ((ab + nudge) / (1i64 << 31)) as i32
}

/// gemmlowp's RoundingDivideByPOT: x / 2^e rounded to nearest, halves away from zero.
pub fn rounding_divide_by_pot(x: i64, e: u32) -> i64 {
    if e == 0 {
        return x;
    }
    let e = e.min(63);
    let mask = (1i64 << e) - 1;
    let rem = x & mask;
    let threshold = (mask >> 1) + i64::from(x < 0);
    (x >> e) + i64::from(rem > threshold)
}

/// TFLite's MultiplyByQuantizedMultiplier: a left shift (saturating), `x · M0 / 2^31` rounded
/// (ties toward +∞), then a right shift rounded half away from zero; right shifts may exceed 31.
pub fn multiply_by_quantized_multiplier(x: i32, m: QuantMultiplier) -> i32 {
    let left = m.shift.max(0) as u32;
    let right = (-m.shift).max(0) as u32;
    let shifted = (x as i64) << left;
    let xs = shifted.clamp(i32::MIN as i64, i32::MAX as i64) as i32;
    let hi = srdhm(xs, m.m0) as i64;
    rounding_divide_by_pot(hi, right).clamp(i32::MIN as i64, i32::MAX as i64) as i32
}

/// Requantises an i64 value that may exceed 32 bits: a rounding right shift by `pre` (fixed at
/// conversion from the value's known range) brings it into i32, then the multiplier.
pub fn requantize_i64(x: i64, pre: u32, m: QuantMultiplier) -> i32 {
    let y = rounding_divide_by_pot(x, pre).clamp(i32::MIN as i64, i32::MAX as i64) as i32;
    multiply_by_quantized_multiplier(y, m)
}

/// Saturates to the symmetric int8 range [−127, 127].
pub fn sat_i8(x: i32) -> i8 {
    x.clamp(-127, 127) as i8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_divide_matches_float_rounding_half_away() {
        for x in -1000i64..=1000 {
            for e in 0..6u32 {
                let want = (x as f64 / (1u64 << e) as f64).round() as i64;
                assert_eq!(rounding_divide_by_pot(x, e), want, "x {x} e {e}");
            }
        }
    }

    #[test]
    fn srdhm_is_rounded_high_product() {
        for &(a, b) in &[(3i32, 1 << 30), (-3, 1 << 30), (123_456_789, 987_654_321), (-7, -9), (i32::MAX, i32::MAX)] {
            // floor(a·b/2^31 + 1/2), exact in i128.
            let want = ((a as i128 * b as i128 + (1 << 30)).div_euclid(1 << 31)) as i64;
            assert_eq!(srdhm(a, b) as i64, want, "{a}·{b}");
        }
        // The tie: −1.5 goes to −1, +1.5 to 2.
        assert_eq!(srdhm(-3, 1 << 30), -1);
        assert_eq!(srdhm(3, 1 << 30), 2);
        assert_eq!(srdhm(i32::MIN, i32::MIN), i32::MAX);
    }
}
