//! bf16 groundwork for mixed-precision training: f32 ⇄ bf16 conversions (round to nearest even
//! as PyTorch's `.to(torch.bfloat16)`, or llm.c-style stochastic rounding) and a GEMM on bf16
//! operands with f32 accumulation ([`matmul_bf16`]).
//!
//! Each fast conversion sits beside its scalar reference and is tested bit-exactly against it.

mod gemm;

pub(crate) use gemm::dpbf16_probe;
pub use gemm::{has_native_bf16_dot, matmul_bf16};

use half::bf16;
use rayon::prelude::*;

use crate::simd::Isa;

/// Elements per parallel task; indices (not thread ids) feed the stochastic hash, so results
/// do not depend on the thread count.
const CHUNK: usize = 1 << 14;

/// Round to nearest even on the raw bits; NaN keeps its sign and payload and becomes quiet
/// (the same bits as `half::bf16::from_f32`).
#[inline(always)]
fn rne_bits(x: u32) -> u16 {
    if x & 0x7fff_ffff > 0x7f80_0000 {
        return ((x >> 16) | 0x0040) as u16;
    }
    (x.wrapping_add(0x7fff + ((x >> 16) & 1)) >> 16) as u16
}

/// lowbias32 (Chris Wellons): a cheap bijective 32-bit mixer, equally cheap in SIMD lanes.
#[inline(always)]
fn mix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

/// Per-call key from the 64-bit seed, so nearby seeds give unrelated streams.
#[inline(always)]
fn seed_key(seed: u64) -> u32 {
    mix32(seed as u32 ^ mix32((seed >> 32) as u32 ^ 0x9e37_79b9))
}

/// Stochastic rounding of element `i`: add 16 random low bits and truncate, so the value rounds
/// away from zero with probability (dropped bits)/2¹⁶ and its expectation is the f32 input.
#[inline(always)]
fn stochastic_bits(x: u32, i: u32, key: u32) -> u16 {
    if x & 0x7fff_ffff > 0x7f80_0000 {
        return ((x >> 16) | 0x0040) as u16;
    }
    (x.wrapping_add(mix32(i ^ key) & 0xffff) >> 16) as u16
}

#[cfg(test)]
pub(crate) fn f32_to_bf16_rne_reference(src: &[f32], dst: &mut [bf16]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = bf16::from_bits(rne_bits(s.to_bits()));
    }
}

#[cfg(test)]
pub(crate) fn f32_to_bf16_stochastic_reference(src: &[f32], dst: &mut [bf16], seed: u64) {
    let key = seed_key(seed);
    for (i, (d, s)) in dst.iter_mut().zip(src).enumerate() {
        *d = bf16::from_bits(stochastic_bits(s.to_bits(), i as u32, key));
    }
}

#[cfg(test)]
pub(crate) fn bf16_to_f32_reference(src: &[bf16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f32::from_bits((s.to_bits() as u32) << 16);
    }
}

/// What a conversion does per element; `Stochastic` carries the key and the index of element 0.
#[derive(Clone, Copy)]
enum Round {
    Nearest,
    Stochastic { key: u32, base: u32 },
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{rne_bits, stochastic_bits, Round};
    use std::arch::x86_64::*;

    /// 8 lanes of `mix32`.
    #[inline(always)]
    unsafe fn mix32_avx2(mut x: __m256i) -> __m256i {
        x = _mm256_xor_si256(x, _mm256_srli_epi32::<16>(x));
        x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7feb_352d));
        x = _mm256_xor_si256(x, _mm256_srli_epi32::<15>(x));
        x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x846c_a68bu32 as i32));
        _mm256_xor_si256(x, _mm256_srli_epi32::<16>(x))
    }

    /// Rounds 8 f32 lanes to bf16 bits held in the low half of each 32-bit lane.
    #[inline(always)]
    unsafe fn round8(x: __m256i, round: Round, i0: u32) -> __m256i {
        let add = match round {
            Round::Nearest => {
                let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(x), _mm256_set1_epi32(1));
                _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))
            }
            Round::Stochastic { key, base } => {
                let idx = _mm256_add_epi32(
                    _mm256_set1_epi32(base.wrapping_add(i0) as i32),
                    _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                );
                let h = mix32_avx2(_mm256_xor_si256(idx, _mm256_set1_epi32(key as i32)));
                _mm256_and_si256(h, _mm256_set1_epi32(0xffff))
            }
        };
        let rounded = _mm256_srli_epi32::<16>(_mm256_add_epi32(x, add));
        // NaN: |x| > inf as integers; keep the payload, set the quiet bit.
        let abs = _mm256_and_si256(x, _mm256_set1_epi32(0x7fff_ffff));
        let nan = _mm256_cmpgt_epi32(abs, _mm256_set1_epi32(0x7f80_0000));
        let quiet = _mm256_or_si256(_mm256_srli_epi32::<16>(x), _mm256_set1_epi32(0x0040));
        _mm256_blendv_epi8(rounded, quiet, nan)
    }

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn to_bf16_avx2(src: &[f32], dst: &mut [u16], round: Round) {
        let n = src.len().min(dst.len());
        let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
        let mut i = 0;
        while i + 16 <= n {
            let lo = round8(_mm256_loadu_si256(s.add(i) as *const __m256i), round, i as u32);
            let hi = round8(_mm256_loadu_si256(s.add(i + 8) as *const __m256i), round, i as u32 + 8);
            // packus works per 128-bit half; the permute puts the four quarters back in order.
            let packed = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packus_epi32(lo, hi));
            _mm256_storeu_si256(d.add(i) as *mut __m256i, packed);
            i += 16;
        }
        tail(src, dst, i, n, round);
    }

    #[target_feature(enable = "avx512f,avx2")]
    pub(super) unsafe fn to_bf16_avx512(src: &[f32], dst: &mut [u16], round: Round) {
        let n = src.len().min(dst.len());
        let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
        let mut i = 0;
        while i + 16 <= n {
            let x = _mm512_loadu_si512(s.add(i) as *const _);
            let add = match round {
                Round::Nearest => {
                    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(x), _mm512_set1_epi32(1));
                    _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))
                }
                Round::Stochastic { key, base } => {
                    let idx = _mm512_add_epi32(
                        _mm512_set1_epi32(base.wrapping_add(i as u32) as i32),
                        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                    );
                    let mut h = _mm512_xor_si512(idx, _mm512_set1_epi32(key as i32));
                    h = _mm512_xor_si512(h, _mm512_srli_epi32::<16>(h));
                    h = _mm512_mullo_epi32(h, _mm512_set1_epi32(0x7feb_352d));
                    h = _mm512_xor_si512(h, _mm512_srli_epi32::<15>(h));
                    h = _mm512_mullo_epi32(h, _mm512_set1_epi32(0x846c_a68bu32 as i32));
                    h = _mm512_xor_si512(h, _mm512_srli_epi32::<16>(h));
                    _mm512_and_si512(h, _mm512_set1_epi32(0xffff))
                }
            };
            let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(x, add));
            let abs = _mm512_and_si512(x, _mm512_set1_epi32(0x7fff_ffff));
            let nan = _mm512_cmpgt_epi32_mask(abs, _mm512_set1_epi32(0x7f80_0000));
            let quiet = _mm512_or_si512(_mm512_srli_epi32::<16>(x), _mm512_set1_epi32(0x0040));
            let r = _mm512_mask_blend_epi32(nan, rounded, quiet);
            // vpmovdw truncates each lane to its low 16 bits, which hold the result.
            _mm256_storeu_si256(d.add(i) as *mut __m256i, _mm512_cvtepi32_epi16(r));
            i += 16;
        }
        tail(src, dst, i, n, round);
    }

    #[inline(always)]
    fn tail(src: &[f32], dst: &mut [u16], from: usize, n: usize, round: Round) {
        for i in from..n {
            let x = src[i].to_bits();
            dst[i] = match round {
                Round::Nearest => rne_bits(x),
                Round::Stochastic { key, base } => stochastic_bits(x, base.wrapping_add(i as u32), key),
            };
        }
    }

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn to_f32_avx2(src: &[u16], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
        let mut i = 0;
        while i + 8 <= n {
            let w = _mm256_cvtepu16_epi32(_mm_loadu_si128(s.add(i) as *const __m128i));
            _mm256_storeu_si256(d.add(i) as *mut __m256i, _mm256_slli_epi32::<16>(w));
            i += 8;
        }
        for j in i..n {
            dst[j] = f32::from_bits((src[j] as u32) << 16);
        }
    }

    #[target_feature(enable = "avx512f,avx2")]
    pub(super) unsafe fn to_f32_avx512(src: &[u16], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
        let mut i = 0;
        while i + 16 <= n {
            let w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(s.add(i) as *const __m256i));
            _mm512_storeu_si512(d.add(i) as *mut _, _mm512_slli_epi32::<16>(w));
            i += 16;
        }
        for j in i..n {
            dst[j] = f32::from_bits((src[j] as u32) << 16);
        }
    }
}

/// The raw bits of a bf16 slice (`bf16` is a transparent `u16`).
pub(crate) fn bits(s: &[bf16]) -> &[u16] {
    // SAFETY: half::bf16 is #[repr(transparent)] over u16.
    unsafe { std::slice::from_raw_parts(s.as_ptr() as *const u16, s.len()) }
}

fn bits_mut(s: &mut [bf16]) -> &mut [u16] {
    // SAFETY: half::bf16 is #[repr(transparent)] over u16.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr() as *mut u16, s.len()) }
}

fn to_bf16_chunk(isa: Isa, src: &[f32], dst: &mut [u16], round: Round) {
    match isa {
        // SAFETY: `isa` comes from `Isa::detect`/`all_supported`, which checked the CPU.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::to_bf16_avx512(src, dst, round) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::to_bf16_avx2(src, dst, round) },
        _ => {
            for (i, (d, s)) in dst.iter_mut().zip(src).enumerate() {
                *d = match round {
                    Round::Nearest => rne_bits(s.to_bits()),
                    Round::Stochastic { key, base } => stochastic_bits(s.to_bits(), base.wrapping_add(i as u32), key),
                };
            }
        }
    }
}

fn to_bf16(isa: Isa, src: &[f32], dst: &mut [bf16], seed: Option<u64>) {
    assert_eq!(src.len(), dst.len(), "bf16 conversion: length mismatch");
    let key = seed.map(seed_key);
    bits_mut(dst).par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).enumerate().for_each(|(c, (d, s))| {
        let round = match key {
            None => Round::Nearest,
            Some(key) => Round::Stochastic { key, base: (c * CHUNK) as u32 },
        };
        to_bf16_chunk(isa, s, d, round);
    });
}

pub(crate) fn f32_to_bf16_rne_with(isa: Isa, src: &[f32], dst: &mut [bf16]) {
    to_bf16(isa, src, dst, None);
}

pub(crate) fn f32_to_bf16_stochastic_with(isa: Isa, src: &[f32], dst: &mut [bf16], seed: u64) {
    to_bf16(isa, src, dst, Some(seed));
}

pub(crate) fn bf16_to_f32_with(isa: Isa, src: &[bf16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "bf16 conversion: length mismatch");
    dst.par_chunks_mut(CHUNK).zip(bits(src).par_chunks(CHUNK)).for_each(|(d, s)| match isa {
        // SAFETY: `isa` comes from `Isa::detect`/`all_supported`, which checked the CPU.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::to_f32_avx512(s, d) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::to_f32_avx2(s, d) },
        _ => {
            for (o, &b) in d.iter_mut().zip(s) {
                *o = f32::from_bits((b as u32) << 16);
            }
        }
    });
}

/// `dst = bf16(src)`, rounding to nearest even; NaN stays NaN (made quiet), ±inf stays ±inf and
/// values beyond the largest bf16 round to ±inf, as PyTorch's `.to(torch.bfloat16)`.
///
/// # Panics
/// If `src` and `dst` differ in length.
pub fn f32_to_bf16_rne(src: &[f32], dst: &mut [bf16]) {
    f32_to_bf16_rne_with(Isa::detect(), src, dst);
}

/// `dst = bf16(src)` with stochastic rounding: element `i` rounds up (away from zero) with
/// probability equal to the fraction of a bf16 ulp it dropped, from a counter-based hash of
/// `(seed, i)`; so the expected bf16 value is the f32 input, and the output depends only on
/// the inputs and `seed` (not on the thread count). Indices wrap at 2³².
///
/// # Panics
/// If `src` and `dst` differ in length.
pub fn f32_to_bf16_stochastic(src: &[f32], dst: &mut [bf16], seed: u64) {
    f32_to_bf16_stochastic_with(Isa::detect(), src, dst, seed);
}

/// `dst = f32(src)`, exact (a 16-bit shift).
///
/// # Panics
/// If `src` and `dst` differ in length.
pub fn bf16_to_f32(src: &[bf16], dst: &mut [f32]) {
    bf16_to_f32_with(Isa::detect(), src, dst);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    fn special_inputs() -> Vec<f32> {
        let mut r = rng(11);
        let mut v = randn(&mut r, 3 * CHUNK + 37, 3.0);
        let specials = [
            0.0f32,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7f80_0001), // signalling NaN
            f32::from_bits(0xffc1_2345),
            f32::MAX,
            -f32::MAX,
            f32::MIN_POSITIVE,
            f32::from_bits(1),           // smallest denormal
            f32::from_bits(0x3f80_8000), // exact tie, even below: rounds down
            f32::from_bits(0x3f81_8000), // exact tie, odd below: rounds up
            f32::from_bits(0x3f80_8001),
            f32::from_bits(0x3f80_7fff),
            f32::from_bits(0x7f7f_8000), // ties to +inf
        ];
        for (i, s) in specials.iter().enumerate() {
            v[i * 7] = *s;
        }
        // A sweep of bit patterns covering every low-16-bit remainder class.
        for i in 0..4096u32 {
            v.push(f32::from_bits(0x3f80_0000 ^ (i * 0x0001_0011)));
            v.push(f32::from_bits(i.wrapping_mul(0x9e37_79b9)));
        }
        v
    }

    #[test]
    fn rne_matches_half_and_scalar_bit_exact() {
        let src = special_inputs();
        let mut want = vec![bf16::ZERO; src.len()];
        f32_to_bf16_rne_reference(&src, &mut want);
        for (s, w) in src.iter().zip(&want) {
            let h = bf16::from_f32(*s);
            if s.is_nan() {
                assert!(w.is_nan() && h.is_nan(), "{s:?}");
            } else {
                assert_eq!(w.to_bits(), h.to_bits(), "rne of {:#010x}", s.to_bits());
            }
        }
        for isa in Isa::all_supported() {
            let mut got = vec![bf16::ZERO; src.len()];
            f32_to_bf16_rne_with(isa, &src, &mut got);
            assert_eq!(bits(&got), bits(&want), "{isa:?}");
        }
    }

    #[test]
    fn stochastic_simd_matches_scalar_and_is_unbiased() {
        let src = special_inputs();
        let mut want = vec![bf16::ZERO; src.len()];
        f32_to_bf16_stochastic_reference(&src, &mut want, 42);
        for (s, w) in src.iter().zip(&want) {
            // Always one of the two neighbours (truncation or one ulp away from zero).
            if s.is_nan() {
                assert!(w.is_nan());
            } else {
                let t = (s.to_bits() >> 16) as u16;
                assert!(w.to_bits() == t || w.to_bits() == t + 1, "{s:?} -> {w:?}");
            }
        }
        for isa in Isa::all_supported() {
            let mut got = vec![bf16::ZERO; src.len()];
            f32_to_bf16_stochastic_with(isa, &src, &mut got, 42);
            assert_eq!(bits(&got), bits(&want), "{isa:?}");
        }
        // Distribution: the mean of many roundings of one value converges to it (unbiased),
        // where round-to-nearest has a fixed bias; n = 2¹⁸ gives a standard error of ulp/1024.
        for &x in &[1.0f32 + 0.3 / 128.0, -3.3, 1.234e-3, 0.1] {
            let n = 1 << 18;
            let src = vec![x; n];
            let mut dst = vec![bf16::ZERO; n];
            f32_to_bf16_stochastic(&src, &mut dst, 7);
            let mean = dst.iter().map(|v| v.to_f64()).sum::<f64>() / n as f64;
            let ulp = (bf16::from_bits(bf16::from_f32(x).to_bits() | 1).to_f64()
                - bf16::from_bits(bf16::from_f32(x).to_bits() & !1).to_f64())
            .abs();
            assert!((mean - x as f64).abs() < 4e-3 * ulp, "x={x} mean={mean} ulp={ulp}");
        }
        // Different seeds give different streams; the same seed the same one.
        let src = vec![0.1f32; 1000];
        let (mut a, mut b, mut c) = (vec![bf16::ZERO; 1000], vec![bf16::ZERO; 1000], vec![bf16::ZERO; 1000]);
        f32_to_bf16_stochastic(&src, &mut a, 1);
        f32_to_bf16_stochastic(&src, &mut b, 2);
        f32_to_bf16_stochastic(&src, &mut c, 1);
        assert_ne!(bits(&a), bits(&b));
        assert_eq!(bits(&a), bits(&c));
    }

    #[test]
    fn widen_is_exact() {
        let src: Vec<bf16> = (0..=u16::MAX).map(bf16::from_bits).chain((0..333).map(bf16::from_bits)).collect();
        let mut want = vec![0.0f32; src.len()];
        bf16_to_f32_reference(&src, &mut want);
        for (s, w) in src.iter().zip(&want) {
            assert_eq!(w.to_bits(), (s.to_bits() as u32) << 16);
            if !s.is_nan() {
                assert_eq!(w.to_bits(), s.to_f32().to_bits());
            }
        }
        for isa in Isa::all_supported() {
            let mut got = vec![0.0f32; src.len()];
            bf16_to_f32_with(isa, &src, &mut got);
            assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{isa:?}");
        }
    }
}
