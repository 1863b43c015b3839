//! The integer loads the quantized kernels add to [`Simd`], and the exact int8 dot products of W8A8.
//!
//! [`QSimd`] widens stored codes to f32 lanes (int8 → f32; two 4-bit codes per byte → f32 in
//! element order) so the weight-only kernels dequantize in registers and stream only the packed
//! bytes. [`IntDot`] is Σ w·x over int8 pairs into i32 on one weight row and up to four
//! activation rows: AVX2 and AVX-512BW sign-extend to i16 and use `vpmaddwd` (a pair of i8·i8
//! products cannot overflow i32, so nothing saturates); AVX512-VNNI uses `vpdpbusd`, which wants
//! one unsigned operand, so it runs on x + 128 (x ^ 0x80) and subtracts 128·Σw. All integer sums
//! wrap modulo 2³², so every path gives the same i32 whenever the true sum fits in one.
#![allow(clippy::missing_safety_doc)]
// Register arrays are indexed by row and unroll slot, the way the SIMD loops read.
#![allow(clippy::needless_range_loop)]

use crate::simd::{Isa, Scalar, Simd};

/// Code-widening loads on top of the f32 lanes of [`Simd`].
pub(crate) trait QSimd: Simd {
    /// `LANES` int8 values at `p`, as f32.
    unsafe fn load_i8(p: *const i8) -> Self::V;
    /// `2·LANES` 4-bit codes from the `LANES` bytes at `p` as f32: the low nibbles (elements
    /// 0, 2, 4, …) and the high nibbles (elements 1, 3, 5, …). Pairing them with activations
    /// stored in that order ([`deinterleave`]) saves unpacking the nibbles into element order.
    unsafe fn load_u4(p: *const u8) -> (Self::V, Self::V);
    /// Hints that the cache line at `p` (any address; nothing is read) will be read soon.
    #[inline(always)]
    unsafe fn prefetch(_p: *const u8) {}
}

/// How far ahead of the weights being multiplied the decode kernels prefetch: on a Xeon
/// (AVX-512, 2 threads) it cut a cold int8/int4 decode GEMV's time by 15–35%.
pub(crate) const PREFETCH_BYTES: usize = 1024;

impl QSimd for Scalar {
    #[inline(always)]
    unsafe fn load_i8(p: *const i8) -> f32 {
        *p as f32
    }
    #[inline(always)]
    unsafe fn load_u4(p: *const u8) -> (f32, f32) {
        let b = *p;
        ((b & 0x0F) as f32, (b >> 4) as f32)
    }
}

/// The f32 lanes of the fast kernels on `isa` (the pairing width of [`QSimd::load_u4`]).
pub(crate) fn lanes(isa: Isa) -> usize {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => 16,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => 8,
        _ => 1,
    }
}

/// Reorders each block of `2·lanes` values of a row to its even elements then its odd ones,
/// the order [`QSimd::load_u4`] yields codes in. `row.len()` must be a multiple of `2·lanes`.
pub(crate) fn deinterleave(row: &mut [f32], lanes: usize) {
    let mut tmp = [0.0f32; 32];
    for blk in row.chunks_exact_mut(2 * lanes) {
        for j in 0..lanes {
            tmp[j] = blk[2 * j];
            tmp[lanes + j] = blk[2 * j + 1];
        }
        blk.copy_from_slice(&tmp[..2 * lanes]);
    }
}

/// Exact int8 dot products of one weight row with `R` (1..=4) activation rows.
pub(crate) trait IntDot {
    /// `[Σ_i w[i]·x[r][i] for r in 0..R]` over `k` elements, wrapping i32.
    unsafe fn dot<const R: usize>(w: *const i8, x: [*const i8; R], k: usize) -> [i32; R];
}

/// The plain loop, also the reference for every vector path.
#[derive(Clone, Copy)]
pub(crate) struct ScalarDot;

impl IntDot for ScalarDot {
    #[inline(always)]
    unsafe fn dot<const R: usize>(w: *const i8, x: [*const i8; R], k: usize) -> [i32; R] {
        let mut acc = [0i32; R];
        for i in 0..k {
            let wi = *w.add(i) as i32;
            for r in 0..R {
                acc[r] = acc[r].wrapping_add(wi * *x[r].add(i) as i32);
            }
        }
        acc
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Avx2Dot, Avx512Dot, VnniDot};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{IntDot, QSimd};
    use crate::simd::{Avx2, Avx512};
    use std::arch::x86_64::*;

    impl QSimd for Avx2 {
        #[inline(always)]
        unsafe fn load_i8(p: *const i8) -> __m256 {
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i)))
        }
        #[inline(always)]
        unsafe fn load_u4(p: *const u8) -> (__m256, __m256) {
            let v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i));
            let lo = _mm256_and_si256(v, _mm256_set1_epi32(0x0F));
            (_mm256_cvtepi32_ps(lo), _mm256_cvtepi32_ps(_mm256_srli_epi32::<4>(v)))
        }
        #[inline(always)]
        unsafe fn prefetch(p: *const u8) {
            _mm_prefetch::<_MM_HINT_T0>(p as *const i8)
        }
    }

    impl QSimd for Avx512 {
        #[inline(always)]
        unsafe fn load_i8(p: *const i8) -> __m512 {
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i)))
        }
        #[inline(always)]
        unsafe fn load_u4(p: *const u8) -> (__m512, __m512) {
            let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i));
            let lo = _mm512_and_si512(v, _mm512_set1_epi32(0x0F));
            (_mm512_cvtepi32_ps(lo), _mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(v)))
        }
        #[inline(always)]
        unsafe fn prefetch(p: *const u8) {
            _mm_prefetch::<_MM_HINT_T0>(p as *const i8)
        }
    }

    #[inline(always)]
    unsafe fn hsum256(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        _mm_cvtsi128_si32(s)
    }

    /// AVX2: 16 pairs a step, sign-extended to i16, `vpmaddwd` into i32 lanes.
    #[derive(Clone, Copy)]
    pub(crate) struct Avx2Dot;

    impl IntDot for Avx2Dot {
        #[inline(always)]
        unsafe fn dot<const R: usize>(w: *const i8, x: [*const i8; R], k: usize) -> [i32; R] {
            let mut acc = [_mm256_setzero_si256(); R];
            let mut i = 0;
            while i + 16 <= k {
                _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(i + super::PREFETCH_BYTES));
                let wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(w.add(i) as *const __m128i));
                for r in 0..R {
                    let xv = _mm256_cvtepi8_epi16(_mm_loadu_si128(x[r].add(i) as *const __m128i));
                    acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(wv, xv));
                }
                i += 16;
            }
            let mut out = [0i32; R];
            for r in 0..R {
                out[r] = hsum256(acc[r]);
                for j in i..k {
                    out[r] = out[r].wrapping_add(*w.add(j) as i32 * *x[r].add(j) as i32);
                }
            }
            out
        }
    }

    /// AVX-512BW without VNNI: 32 pairs a step via `vpmaddwd`; the tail through a masked load.
    #[derive(Clone, Copy)]
    pub(crate) struct Avx512Dot;

    impl IntDot for Avx512Dot {
        #[inline(always)]
        unsafe fn dot<const R: usize>(w: *const i8, x: [*const i8; R], k: usize) -> [i32; R] {
            let mut acc = [_mm512_setzero_si512(); R];
            let mut i = 0;
            while i < k {
                // Masked-out bytes load as 0 and add nothing.
                let mask: __mmask32 = if k - i >= 32 { !0 } else { (1u32 << (k - i)) - 1 };
                _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(i + super::PREFETCH_BYTES));
                let wv = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, w.add(i)));
                for r in 0..R {
                    let xv = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, x[r].add(i)));
                    acc[r] = _mm512_add_epi32(acc[r], _mm512_madd_epi16(wv, xv));
                }
                i += 32;
            }
            let mut out = [0i32; R];
            for r in 0..R {
                out[r] = _mm512_reduce_add_epi32(acc[r]);
            }
            out
        }
    }

    /// AVX512-VNNI: 64 pairs a step with `vpdpbusd` on (x + 128) as u8, minus 128·Σw at the end.
    #[derive(Clone, Copy)]
    pub(crate) struct VnniDot;

    impl IntDot for VnniDot {
        #[inline(always)]
        unsafe fn dot<const R: usize>(w: *const i8, x: [*const i8; R], k: usize) -> [i32; R] {
            let ones = _mm512_set1_epi8(1);
            let flip = _mm512_set1_epi8(i8::MIN);
            let mut wsum = _mm512_setzero_si512();
            let mut acc = [_mm512_setzero_si512(); R];
            let mut i = 0;
            while i < k {
                // Masked-out lanes: w = 0, so (0 ^ 0x80)·0 adds nothing to either sum.
                let mask: __mmask64 = if k - i >= 64 { !0 } else { (1u64 << (k - i)) - 1 };
                _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(i + super::PREFETCH_BYTES));
                let wv = _mm512_maskz_loadu_epi8(mask, w.add(i));
                wsum = _mm512_dpbusd_epi32(wsum, ones, wv);
                for r in 0..R {
                    let xu = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, x[r].add(i)), flip);
                    acc[r] = _mm512_dpbusd_epi32(acc[r], xu, wv);
                }
                i += 64;
            }
            let bias = _mm512_reduce_add_epi32(wsum).wrapping_mul(128);
            let mut out = [0i32; R];
            for r in 0..R {
                out[r] = _mm512_reduce_add_epi32(acc[r]).wrapping_sub(bias);
            }
            out
        }
    }
}
