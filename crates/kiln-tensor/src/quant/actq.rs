//! Symmetric int8 rounding of one activation row (a token, or a 32 block of one), the step every
//! integer kernel runs before its dots: `s_x = max|x| / 127`, `q = round_half_even(x · 127/max|x|)`,
//! after dividing by `act_scale` when the weights carry one.
//!
//! [`quantize_row_scalar`] is the definition; [`quantize_row`] runs the same arithmetic on
//! AVX-512 or AVX2 and gives the same codes and scale bit for bit (`max` is exact in any order,
//! the division and the multiply are the same IEEE operations, and `cvtps2dq` rounds half to
//! even like the scalar trick). A prompt's activations are rounded per 32 block for every
//! layer, so the scalar loop (max as a serial fold) was 9% of a cache-hot int8 prefill.
#![allow(clippy::missing_safety_doc)]

use crate::simd::Isa;

/// [`quantize_row_scalar`] on the widest instruction set this CPU has.
#[inline]
pub(crate) fn quantize_row(x: &[f32], act_scale: Option<&[f32]>, q: &mut [i8]) -> f32 {
    quantize_row_isa(Isa::detect(), x, act_scale, q)
}

/// [`quantize_row_scalar`] on `isa` (tests and comparisons).
pub(crate) fn quantize_row_isa(isa: Isa, x: &[f32], act_scale: Option<&[f32]>, q: &mut [i8]) -> f32 {
    assert!(q.len() >= x.len() && act_scale.is_none_or(|s| s.len() == x.len()), "quantize_row: lengths");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `Isa::detect`/`all_supported` checked the features; lengths checked above.
    unsafe {
        match isa {
            Isa::Avx512 => return x86::quantize_row_avx512(x, act_scale, q),
            Isa::Avx2 => return x86::quantize_row_avx2(x, act_scale, q),
            Isa::Scalar => {}
        }
    }
    let _ = isa;
    quantize_row_scalar(x, act_scale, q)
}

/// The definition, one element at a time: rounds `x / act_scale` to int8 into `q[..x.len()]`
/// and returns its scale; an all-zero row gives codes 0 and scale 0, a NaN element code 0.
pub(crate) fn quantize_row_scalar(x: &[f32], act_scale: Option<&[f32]>, q: &mut [i8]) -> f32 {
    // The branch outside the loops, so each one is straight-line code.
    match act_scale {
        None => quantize_row_by(x.len(), |i| x[i], q),
        Some(s) => quantize_row_by(x.len(), |i| x[i] / s[i], q),
    }
}

#[inline(always)]
fn quantize_row_by(len: usize, xs: impl Fn(usize) -> f32, q: &mut [i8]) -> f32 {
    let amax = (0..len).fold(0.0f32, |a, i| a.max(xs(i).abs()));
    let q = &mut q[..len];
    if amax == 0.0 {
        q.fill(0);
        return 0.0;
    }
    let inv = 127.0 / amax;
    for (i, qi) in q.iter_mut().enumerate() {
        *qi = round_half_even_small(xs(i) * inv).clamp(-127.0, 127.0) as i8;
    }
    amax / 127.0
}

/// Round half to even for |v| < 2²², by adding and removing 1.5·2²³ (IEEE round-to-nearest-even
/// does the rounding): `round_ties_even` is a libm call without SSE4.1.
#[inline(always)]
fn round_half_even_small(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (v + MAGIC) - MAGIC
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::round_half_even_small;
    use std::arch::x86_64::*;

    /// `x / s` lanes at `i` (16 wide), or `x` alone.
    #[inline(always)]
    unsafe fn load16(x: &[f32], s: Option<&[f32]>, i: usize) -> __m512 {
        let v = _mm512_loadu_ps(x.as_ptr().add(i));
        match s {
            Some(s) => _mm512_div_ps(v, _mm512_loadu_ps(s.as_ptr().add(i))),
            None => v,
        }
    }

    #[inline(always)]
    unsafe fn load8(x: &[f32], s: Option<&[f32]>, i: usize) -> __m256 {
        let v = _mm256_loadu_ps(x.as_ptr().add(i));
        match s {
            Some(s) => _mm256_div_ps(v, _mm256_loadu_ps(s.as_ptr().add(i))),
            None => v,
        }
    }

    /// The scalar tail's max and codes, on the elements from `from`.
    #[inline(always)]
    fn tail_amax(x: &[f32], s: Option<&[f32]>, from: usize) -> f32 {
        (from..x.len()).fold(0.0f32, |a, i| a.max(s.map_or(x[i], |s| x[i] / s[i]).abs()))
    }

    /// Codes for elements `from..` with the row's `inv`, as the scalar definition rounds them.
    #[inline(always)]
    fn tail_codes(x: &[f32], s: Option<&[f32]>, from: usize, inv: f32, q: &mut [i8]) {
        for i in from..x.len() {
            let v = s.map_or(x[i], |s| x[i] / s[i]) * inv;
            q[i] = round_half_even_small(v).clamp(-127.0, 127.0) as i8;
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
    pub(super) unsafe fn quantize_row_avx512(x: &[f32], s: Option<&[f32]>, q: &mut [i8]) -> f32 {
        let n = x.len();
        let body = n / 16 * 16;
        let abs = _mm512_set1_epi32(i32::MAX);
        let mut m = _mm512_setzero_ps();
        for i in (0..body).step_by(16) {
            let a = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(load16(x, s, i)), abs));
            // max(a, m) returns m when a is NaN, as the scalar fold skips it.
            m = _mm512_max_ps(a, m);
        }
        let amax = _mm512_reduce_max_ps(m).max(tail_amax(x, s, body));
        if amax == 0.0 {
            q[..n].fill(0);
            return 0.0;
        }
        let inv = 127.0 / amax;
        let (vinv, lo) = (_mm512_set1_ps(inv), _mm512_set1_epi32(-127));
        for i in (0..body).step_by(16) {
            let v = _mm512_mul_ps(load16(x, s, i), vinv);
            // NaN lanes become 0, as `NaN as i8` does; the rest round half to even (MXCSR default).
            let ordered = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(v, v);
            let c = _mm512_max_epi32(_mm512_maskz_cvtps_epi32(ordered, v), lo);
            _mm_storeu_si128(q.as_mut_ptr().add(i) as *mut __m128i, _mm512_cvtsepi32_epi8(c));
        }
        tail_codes(x, s, body, inv, q);
        amax / 127.0
    }

    /// Eight codes at `i` as i32 (NaN lanes 0, the rest at least −127); a function, not a
    /// closure, so the intrinsics inline into the `target_feature` caller.
    #[inline(always)]
    unsafe fn code8(x: &[f32], s: Option<&[f32]>, vinv: __m256, lo: __m256i, i: usize) -> __m256i {
        let v = _mm256_mul_ps(load8(x, s, i), vinv);
        let v = _mm256_and_ps(v, _mm256_cmp_ps::<_CMP_ORD_Q>(v, v));
        _mm256_max_epi32(_mm256_cvtps_epi32(v), lo)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn quantize_row_avx2(x: &[f32], s: Option<&[f32]>, q: &mut [i8]) -> f32 {
        let n = x.len();
        let body = n / 8 * 8;
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MAX));
        let mut m = _mm256_setzero_ps();
        for i in (0..body).step_by(8) {
            m = _mm256_max_ps(_mm256_and_ps(load8(x, s, i), abs), m);
        }
        let h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        let h = _mm_max_ss(h, _mm_shuffle_ps::<0b01>(h, h));
        let amax = _mm_cvtss_f32(h).max(tail_amax(x, s, body));
        if amax == 0.0 {
            q[..n].fill(0);
            return 0.0;
        }
        let inv = 127.0 / amax;
        let (vinv, lo) = (_mm256_set1_ps(inv), _mm256_set1_epi32(-127));
        // Four vectors of 8 codes at a time through the saturating packs, whose 128-bit lanes
        // interleave them; the permute puts the 32 bytes back in order.
        let body32 = n / 32 * 32;
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for i in (0..body32).step_by(32) {
            let ab = _mm256_packs_epi32(code8(x, s, vinv, lo, i), code8(x, s, vinv, lo, i + 8));
            let cd = _mm256_packs_epi32(code8(x, s, vinv, lo, i + 16), code8(x, s, vinv, lo, i + 24));
            let bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(ab, cd), order);
            _mm256_storeu_si256(q.as_mut_ptr().add(i) as *mut __m256i, bytes);
        }
        tail_codes(x, s, body32, inv, q);
        amax / 127.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{randn, rng};
    use rand::Rng;

    /// Rows that exercise every branch: ties at .5, NaN, an all-zero row, lengths around the
    /// vector widths, and act_scale on and off.
    #[test]
    fn quantize_row_matches_the_scalar_definition_on_every_isa() {
        let mut r = rng(11);
        for isa in Isa::all_supported() {
            for len in [0, 1, 7, 8, 15, 16, 17, 31, 32, 33, 40, 64, 100, 384, 769] {
                for case in 0..5 {
                    let mut x = randn(&mut r, len, 3.0);
                    match case {
                        // amax 127 makes inv 1, so the halves are real ties.
                        1 if len > 2 => {
                            x.iter_mut().enumerate().for_each(|(i, v)| *v = (i % 255) as f32 * 0.5 - 63.5);
                            x[0] = 127.0;
                        }
                        2 => x.fill(0.0),
                        3 if len > 3 => x[len / 2] = f32::NAN,
                        _ => {}
                    }
                    let act: Option<Vec<f32>> =
                        (case == 4).then(|| (0..len).map(|_| 0.25 + r.random::<f32>()).collect());
                    let (mut q0, mut q1) = (vec![99i8; len], vec![-99i8; len]);
                    let s0 = quantize_row_scalar(&x, act.as_deref(), &mut q0);
                    let s1 = quantize_row_isa(isa, &x, act.as_deref(), &mut q1);
                    assert_eq!(s0.to_bits(), s1.to_bits(), "{isa:?} len {len} case {case}: scale");
                    assert_eq!(q0, q1, "{isa:?} len {len} case {case}: codes");
                    if case == 1 && len > 4 {
                        // −62.5 and −61.5 both round to the even −62.
                        assert_eq!((q0[1], q0[2], q0[4]), (-63, -62, -62), "half to even");
                    }
                }
            }
        }
    }
}
