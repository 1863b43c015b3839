//! The exact integer dot products of the quantized kernels.
//!
//! [`IntDot`] is Σ w·x over int8 pairs into i32 on one weight row and up to four
//! activation rows: AVX2 and AVX-512BW sign-extend to i16 and use `vpmaddwd` (a pair of i8·i8
//! products cannot overflow i32, so nothing saturates); AVX512-VNNI uses `vpdpbusd`, which wants
//! one unsigned operand, so it runs on x + 128 (x ^ 0x80) and subtracts 128·Σw. All integer sums
//! wrap modulo 2³², so every path gives the same i32 whenever the true sum fits in one.
//!
//! [`I4Dot`] is the int4 kernel's block product: 32 4-bit codes (16 packed bytes) times 32 int8
//! activations, exact in i32, scaled into f32 partial sums (llama.cpp's Q4_0 × Q8_0 block);
//! [`I8Dot`] the same for 32 int8 codes (Q8_0 × Q8_0), used by the int8 weight-only kernel.
#![allow(clippy::missing_safety_doc)]
// Register arrays are indexed by row and unroll slot, the way the SIMD loops read.
#![allow(clippy::needless_range_loop)]

use half::f16;

/// How far ahead of the weights being multiplied the decode kernels prefetch: on a Xeon
/// (AVX-512, 2 threads) it cut a cold int8/int4 decode GEMV's time by 15–35%.
pub(crate) const PREFETCH_BYTES: usize = 1024;

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

/// Elements per int4 decode block: one activation scale, one exact i32 dot per weight row.
pub(crate) const I4_BLOCK: usize = 32;

/// Exact products of int4 weight blocks with int8 activations, two 32-element blocks at a time
/// (llama.cpp's Q4_0 × Q8_0 block product, two at once so one 256-bit load covers both).
///
/// The codes of blocks b, b+1 are 32 bytes (element 2j in the low nibble of byte j). The
/// activations of the pair are stored as 64 bytes: block b's 16 even elements, block b+1's 16
/// even ones, then their odd ones likewise (the order the nibbles unpack in, so no shuffle).
/// [`I4Dot::dots`] gives f32 lanes whose first half sums to block b's i32 dot and second half to
/// block b+1's; the sums are exact (|dot| ≤ 32·15·127 < 2²⁴, so they also convert exactly).
pub(crate) trait I4Dot {
    /// The unpacked codes of a pair, used for every activation row.
    type Q: Copy;
    /// f32 lanes, the first half for block b and the second for block b+1.
    type V: Copy;
    unsafe fn zero() -> Self::V;
    /// The codes of blocks b, b+1 (32 bytes at `q`).
    unsafe fn unpack(q: *const u8) -> Self::Q;
    /// Block b alone (16 bytes at `q`; block b+1's codes read as 0).
    unsafe fn unpack_one(q: *const u8) -> Self::Q;
    /// The two exact dots with the activations whose 32 even-element bytes are at `xl` (block
    /// b's 16, then block b+1's) and 32 odd-element bytes at `xh`, spread over the lanes.
    unsafe fn dots(q: Self::Q, xl: *const i8, xh: *const i8) -> Self::V;
    /// The 8 floats at `p` (the scalar path reads lanes 0 and 4, one per half).
    unsafe fn load(p: *const f32) -> Self::V;
    unsafe fn splat(v: f32) -> Self::V;
    /// `p[0]` in the first half, `p[1]` in the second.
    unsafe fn splat2(p: *const f32) -> Self::V;
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    /// `a·b + c`.
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// `acc` less `Σ_{l<8} a[l]·b[l]·c[l]`, spread over its lanes (its lane sum drops by that).
    unsafe fn sub_products8(a: *const f32, b: *const f32, c: *const f32, acc: Self::V) -> Self::V;
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    /// The lane sums of four vectors (four output rows reduced together).
    unsafe fn hsum4(v: [Self::V; 4]) -> [f32; 4];
    /// `dst = src` as f32 (F16C on x86): a task's group scales and zeros.
    unsafe fn f16_to_f32(src: &[f16], dst: &mut [f32]);
    /// Hints that the cache line at `p` (any address; nothing is read) will be read soon.
    #[inline(always)]
    unsafe fn prefetch(_p: *const u8) {}

    // Four blocks (two pairs) at a time: one 512-bit step on AVX512-VNNI, two pair steps elsewhere.
    /// The codes of blocks b..b+3 (64 bytes), used for every activation row.
    type Q4: Copy;
    /// The four blocks' weight scales, laid out for [`I4Dot::quad`].
    type S4: Copy;
    /// A running sum over quads.
    type A4: Copy;
    unsafe fn zero4() -> Self::A4;
    unsafe fn unpack4(q: *const u8) -> Self::Q4;
    /// Group 32: the scales of the four blocks, the four floats at `p`.
    unsafe fn scales4_g32(p: *const f32) -> Self::S4;
    /// Groups of 64 or 128: `a` scales the first pair, `b` the second.
    unsafe fn scales4(a: f32, b: f32) -> Self::S4;
    /// `acc + dots·sx·s` for the four blocks: the activations at `x` in quad layout (128 bytes:
    /// the four blocks' 16 even elements each, then their odd ones), `sx` 16 floats (each
    /// block's activation scale four times).
    unsafe fn quad(q: Self::Q4, x: *const i8, sx: *const f32, s: Self::S4, acc: Self::A4) -> Self::A4;
    /// The running sum as pair lanes (their lane sum is what counts).
    unsafe fn fold4(acc: Self::A4) -> Self::V;
}

/// [`I4Dot`]'s quad items as two pair steps, for the paths without 512-bit registers.
macro_rules! two_pair_quads {
    ($q:ty, $v:ty) => {
        type Q4 = ($q, $q);
        type S4 = ($v, $v);
        type A4 = ($v, $v);
        #[inline(always)]
        unsafe fn zero4() -> ($v, $v) {
            (<Self as I4Dot>::zero(), <Self as I4Dot>::zero())
        }
        #[inline(always)]
        unsafe fn unpack4(q: *const u8) -> ($q, $q) {
            (<Self as I4Dot>::unpack(q), <Self as I4Dot>::unpack(q.add(32)))
        }
        #[inline(always)]
        unsafe fn scales4_g32(p: *const f32) -> ($v, $v) {
            (<Self as I4Dot>::splat2(p), <Self as I4Dot>::splat2(p.add(2)))
        }
        #[inline(always)]
        unsafe fn scales4(a: f32, b: f32) -> ($v, $v) {
            (<Self as I4Dot>::splat(a), <Self as I4Dot>::splat(b))
        }
        #[inline(always)]
        unsafe fn quad(
            (q0, q1): ($q, $q),
            x: *const i8,
            sx: *const f32,
            (s0, s1): ($v, $v),
            (a0, a1): ($v, $v),
        ) -> ($v, $v) {
            let d0 = <Self as I4Dot>::mul(<Self as I4Dot>::dots(q0, x, x.add(64)), <Self as I4Dot>::load(sx));
            let d1 =
                <Self as I4Dot>::mul(<Self as I4Dot>::dots(q1, x.add(32), x.add(96)), <Self as I4Dot>::load(sx.add(8)));
            (<Self as I4Dot>::fma(d0, s0, a0), <Self as I4Dot>::fma(d1, s1, a1))
        }
        #[inline(always)]
        unsafe fn fold4((a0, a1): ($v, $v)) -> $v {
            <Self as I4Dot>::add(a0, a1)
        }
    };
}

impl I4Dot for ScalarDot {
    two_pair_quads!((*const u8, bool), [f32; 2]);
    #[inline(always)]
    unsafe fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
        dst.iter_mut().zip(src).for_each(|(d, s)| *d = s.to_f32());
    }
    type Q = (*const u8, bool);
    type V = [f32; 2];
    #[inline(always)]
    unsafe fn zero() -> [f32; 2] {
        [0.0; 2]
    }
    #[inline(always)]
    unsafe fn unpack(q: *const u8) -> (*const u8, bool) {
        (q, true)
    }
    #[inline(always)]
    unsafe fn unpack_one(q: *const u8) -> (*const u8, bool) {
        (q, false)
    }
    #[inline(always)]
    unsafe fn dots((q, two): (*const u8, bool), xl: *const i8, xh: *const i8) -> [f32; 2] {
        let mut d = [0i32; 2];
        for (h, dh) in d.iter_mut().enumerate().take(1 + two as usize) {
            for j in 0..16 {
                let b = *q.add(16 * h + j) as i32;
                *dh += (b & 0x0F) * *xl.add(16 * h + j) as i32 + (b >> 4) * *xh.add(16 * h + j) as i32;
            }
        }
        [d[0] as f32, d[1] as f32]
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> [f32; 2] {
        [*p, *p.add(4)]
    }

    #[inline(always)]
    unsafe fn splat(v: f32) -> [f32; 2] {
        [v; 2]
    }
    #[inline(always)]
    unsafe fn splat2(p: *const f32) -> [f32; 2] {
        [*p, *p.add(1)]
    }
    #[inline(always)]
    unsafe fn mul(a: [f32; 2], b: [f32; 2]) -> [f32; 2] {
        [a[0] * b[0], a[1] * b[1]]
    }
    #[inline(always)]
    unsafe fn fma(a: [f32; 2], b: [f32; 2], c: [f32; 2]) -> [f32; 2] {
        [a[0] * b[0] + c[0], a[1] * b[1] + c[1]]
    }
    #[inline(always)]
    unsafe fn sub_products8(a: *const f32, b: *const f32, c: *const f32, acc: [f32; 2]) -> [f32; 2] {
        let d = |h: usize| (4 * h..4 * h + 4).map(|l| *a.add(l) * (*b.add(l) * *c.add(l))).sum::<f32>();
        [acc[0] - d(0), acc[1] - d(1)]
    }
    #[inline(always)]
    unsafe fn add(a: [f32; 2], b: [f32; 2]) -> [f32; 2] {
        [a[0] + b[0], a[1] + b[1]]
    }
    #[inline(always)]
    unsafe fn hsum4(v: [[f32; 2]; 4]) -> [f32; 4] {
        v.map(|v| v[0] + v[1])
    }
}

/// Exact products of int8 weight blocks with int8 activation blocks, two 32-element blocks (64
/// codes) at a time: the int8 weight-only kernel's block product (llama.cpp's Q8_0 × Q8_0).
///
/// [`I8Dot::dots`] gives f32 lanes whose first half sums to block b's i32 dot and second half to
/// block b+1's; each lane holds at most four products (|Σ| ≤ 4·128·127 < 2²⁴), so it converts
/// exactly. Where `FLIPPED`, the activations are stored as x ^ 0x80 (x + 128 as u8, for
/// `vpdpbusd`) and [`I8Dot::prepare`] folds −128·Σw into the weight pair.
pub(crate) trait I8Dot {
    /// A weight pair ready for every activation row, held by value (not a pointer to the codes).
    type W: Copy;
    /// f32 lanes, the first half for block b and the second for block b+1.
    type V: Copy;
    const FLIPPED: bool;
    unsafe fn zero() -> Self::V;
    /// The 64 codes at `w`.
    unsafe fn prepare(w: *const i8) -> Self::W;
    /// The two exact dots with the 64 activation bytes at `x`, spread over the lanes.
    unsafe fn dots(w: Self::W, x: *const i8) -> Self::V;
    /// `acc + d·s` with `s` 16 floats: block b's scale 8 times, then block b+1's.
    unsafe fn fma_scales(d: Self::V, s: *const f32, acc: Self::V) -> Self::V;
    /// The lane sums of four vectors (four output rows reduced together).
    unsafe fn hsum4(v: [Self::V; 4]) -> [f32; 4];
    /// Hints that the cache line at `p` (any address; nothing is read) will be read soon.
    #[inline(always)]
    unsafe fn prefetch(_p: *const u8) {}
}

impl I8Dot for ScalarDot {
    /// A copy: the codes may come from a scratch buffer that the next row overwrites.
    type W = [i8; 64];
    type V = [f32; 2];
    const FLIPPED: bool = false;
    #[inline(always)]
    unsafe fn zero() -> [f32; 2] {
        [0.0; 2]
    }
    #[inline(always)]
    unsafe fn prepare(w: *const i8) -> [i8; 64] {
        *(w as *const [i8; 64])
    }
    #[inline(always)]
    unsafe fn dots(w: [i8; 64], x: *const i8) -> [f32; 2] {
        let d = |h: usize| (32 * h..32 * h + 32).map(|i| w[i] as i32 * *x.add(i) as i32).sum::<i32>();
        [d(0) as f32, d(1) as f32]
    }
    #[inline(always)]
    unsafe fn fma_scales(d: [f32; 2], s: *const f32, acc: [f32; 2]) -> [f32; 2] {
        [d[0] * *s + acc[0], d[1] * *s.add(8) + acc[1]]
    }
    #[inline(always)]
    unsafe fn hsum4(v: [[f32; 2]; 4]) -> [f32; 4] {
        v.map(|v| v[0] + v[1])
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Avx2Dot, Avx512Dot, VnniDot};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{I4Dot, I8Dot, IntDot};
    use half::f16;
    use std::arch::x86_64::*;

    /// The low nibbles of 32 bytes (block b's evens, block b+1's) and the high ones (their odds).
    #[inline(always)]
    unsafe fn nibbles(v: __m256i) -> (__m256i, __m256i) {
        let m = _mm256_set1_epi8(0x0F);
        (_mm256_and_si256(v, m), _mm256_and_si256(_mm256_srli_epi16::<4>(v), m))
    }

    /// The [`I4Dot`] items every x86 path shares (8 f32 lanes, halves = 128-bit lanes); `$dots`
    /// turns (low codes, high codes, activations) into i32 lanes.
    macro_rules! i4dot_x86 {
        ($t:ty, $dots:ident, $($quads:tt)*) => {
            impl I4Dot for $t {
                $($quads)*
                type Q = (__m256i, __m256i);
                type V = __m256;
                #[inline(always)]
                unsafe fn zero() -> __m256 {
                    _mm256_setzero_ps()
                }
                #[inline(always)]
                unsafe fn unpack(q: *const u8) -> (__m256i, __m256i) {
                    nibbles(_mm256_loadu_si256(q as *const __m256i))
                }
                #[inline(always)]
                unsafe fn unpack_one(q: *const u8) -> (__m256i, __m256i) {
                    nibbles(_mm256_zextsi128_si256(_mm_loadu_si128(q as *const __m128i)))
                }
                #[inline(always)]
                unsafe fn dots((lo, hi): (__m256i, __m256i), xl: *const i8, xh: *const i8) -> __m256 {
                    let xl = _mm256_loadu_si256(xl as *const __m256i);
                    let xh = _mm256_loadu_si256(xh as *const __m256i);
                    _mm256_cvtepi32_ps($dots(lo, xl, hi, xh))
                }
                #[inline(always)]
                unsafe fn load(p: *const f32) -> __m256 {
                    _mm256_loadu_ps(p)
                }

                #[inline(always)]
                unsafe fn splat(v: f32) -> __m256 {
                    _mm256_set1_ps(v)
                }
                #[inline(always)]
                unsafe fn splat2(p: *const f32) -> __m256 {
                    let two = _mm_castpd_ps(_mm_load_sd(p as *const f64));
                    _mm256_permutevar8x32_ps(_mm256_castps128_ps256(two), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1))
                }
                #[inline(always)]
                unsafe fn mul(a: __m256, b: __m256) -> __m256 {
                    _mm256_mul_ps(a, b)
                }
                #[inline(always)]
                unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
                    _mm256_fmadd_ps(a, b, c)
                }
                #[inline(always)]
                unsafe fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
                    let n = src.len().min(dst.len());
                    let (sp, dp) = (src.as_ptr() as *const u16, dst.as_mut_ptr());
                    let mut i = 0;
                    while i + 8 <= n {
                        let h = _mm_loadu_si128(sp.add(i) as *const __m128i);
                        _mm256_storeu_ps(dp.add(i), _mm256_cvtph_ps(h));
                        i += 8;
                    }
                    while i < n {
                        *dp.add(i) = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(*sp.add(i) as i32)));
                        i += 1;
                    }
                }
                #[inline(always)]
                unsafe fn sub_products8(a: *const f32, b: *const f32, c: *const f32, acc: __m256) -> __m256 {
                    let bc = _mm256_mul_ps(_mm256_loadu_ps(b), _mm256_loadu_ps(c));
                    _mm256_fnmadd_ps(_mm256_loadu_ps(a), bc, acc)
                }
                #[inline(always)]
                unsafe fn add(a: __m256, b: __m256) -> __m256 {
                    _mm256_add_ps(a, b)
                }
                #[inline(always)]
                unsafe fn hsum4([a, b, c, d]: [__m256; 4]) -> [f32; 4] {
                    hsum4_256(a, b, c, d)
                }
                #[inline(always)]
                unsafe fn prefetch(p: *const u8) {
                    _mm_prefetch::<_MM_HINT_T0>(p as *const i8)
                }
            }
        };
    }

    /// `vpmaddubsw` (u8 code × i8 activation, pairs to i16: 2·15·127 = 3810), the low and high
    /// products added in i16 (7620, no saturation), then `vpmaddwd` with ones into i32.
    #[inline(always)]
    unsafe fn dots_maddubs(lo: __m256i, xl: __m256i, hi: __m256i, xh: __m256i) -> __m256i {
        let p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh));
        _mm256_madd_epi16(p, _mm256_set1_epi16(1))
    }

    /// AVX512-VNNI (256-bit, AVX512VL): `vpdpbusd` does u8 × i8 → i32 in one instruction.
    #[inline(always)]
    unsafe fn dots_vnni(lo: __m256i, xl: __m256i, hi: __m256i, xh: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, xl), hi, xh)
    }

    /// [`I4Dot`]'s quad items on AVX512-VNNI: four blocks are one 512-bit vector, so a quad is
    /// one step (two `vpdpbusd`, a convert, a multiply and an FMA for 128 products) where two
    /// pair steps take twice the instructions.
    macro_rules! vnni_quads {
        () => {
            type Q4 = (__m512i, __m512i);
            type S4 = __m512;
            type A4 = __m512;
            #[inline(always)]
            unsafe fn zero4() -> __m512 {
                _mm512_setzero_ps()
            }
            #[inline(always)]
            unsafe fn unpack4(q: *const u8) -> (__m512i, __m512i) {
                let (v, m) = (_mm512_loadu_si512(q as *const __m512i), _mm512_set1_epi8(0x0F));
                (_mm512_and_si512(v, m), _mm512_and_si512(_mm512_srli_epi16::<4>(v), m))
            }
            #[inline(always)]
            unsafe fn scales4_g32(p: *const f32) -> __m512 {
                let idx = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
                _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_loadu_ps(p)))
            }
            #[inline(always)]
            unsafe fn scales4(a: f32, b: f32) -> __m512 {
                _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(a), _mm512_set1_ps(b))
            }
            #[inline(always)]
            unsafe fn quad(
                (lo, hi): (__m512i, __m512i),
                x: *const i8,
                sx: *const f32,
                s: __m512,
                acc: __m512,
            ) -> __m512 {
                let xl = _mm512_loadu_si512(x as *const __m512i);
                let xh = _mm512_loadu_si512(x.add(64) as *const __m512i);
                let d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xl), hi, xh);
                _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(d), _mm512_loadu_ps(sx)), s, acc)
            }
            #[inline(always)]
            unsafe fn fold4(a: __m512) -> __m256 {
                let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(a)));
                _mm256_add_ps(_mm512_castps512_ps256(a), hi)
            }
        };
    }

    // A pair of blocks is one 256-bit vector; AVX-512BW runs the AVX2 code with EVEX encodings.
    i4dot_x86!(Avx2Dot, dots_maddubs, two_pair_quads!((__m256i, __m256i), __m256););
    i4dot_x86!(Avx512Dot, dots_maddubs, two_pair_quads!((__m256i, __m256i), __m256););
    i4dot_x86!(VnniDot, dots_vnni, vnni_quads!(););

    /// Row j's lane sum in lane j: pairwise adds, then the two 128-bit halves.
    #[inline(always)]
    unsafe fn hsum4_256(a: __m256, b: __m256, c: __m256, d: __m256) -> [f32; 4] {
        let h = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
        let s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
        let mut out = [0.0f32; 4];
        _mm_storeu_ps(out.as_mut_ptr(), s);
        out
    }

    /// One block's 32 codes for the sign trick: |w| as u8, and w for its signs.
    #[inline(always)]
    unsafe fn sign_block(w: *const i8) -> (__m256i, __m256i) {
        let w = _mm256_loadu_si256(w as *const __m256i);
        (_mm256_abs_epi8(w), w)
    }

    /// llama.cpp's sign trick: |w| (u8) times x with w's sign, `vpmaddubsw` (≤ 2·128·127 per
    /// i16, no saturation), then `vpmaddwd` with ones into i32.
    #[inline(always)]
    unsafe fn sign_dots((aw, w): (__m256i, __m256i), x: *const i8) -> __m256 {
        let sx = _mm256_sign_epi8(_mm256_loadu_si256(x as *const __m256i), w);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), _mm256_set1_epi16(1)))
    }

    /// AVX2 and AVX-512BW without VNNI: one 256-bit vector per block (`vpsignb` has no 512-bit form).
    macro_rules! i8dot_sign {
        ($t:ty) => {
            impl I8Dot for $t {
                type W = [(__m256i, __m256i); 2];
                type V = [__m256; 2];
                const FLIPPED: bool = false;
                #[inline(always)]
                unsafe fn zero() -> [__m256; 2] {
                    [_mm256_setzero_ps(); 2]
                }
                #[inline(always)]
                unsafe fn prepare(w: *const i8) -> Self::W {
                    [sign_block(w), sign_block(w.add(32))]
                }
                #[inline(always)]
                unsafe fn dots([w0, w1]: Self::W, x: *const i8) -> [__m256; 2] {
                    [sign_dots(w0, x), sign_dots(w1, x.add(32))]
                }
                #[inline(always)]
                unsafe fn fma_scales([d0, d1]: [__m256; 2], s: *const f32, [a0, a1]: [__m256; 2]) -> [__m256; 2] {
                    [_mm256_fmadd_ps(d0, _mm256_loadu_ps(s), a0), _mm256_fmadd_ps(d1, _mm256_loadu_ps(s.add(8)), a1)]
                }
                #[inline(always)]
                unsafe fn hsum4([a, b, c, d]: [[__m256; 2]; 4]) -> [f32; 4] {
                    // No closures: they would not inherit the target features, nor inline these.
                    let (a, b) = (_mm256_add_ps(a[0], a[1]), _mm256_add_ps(b[0], b[1]));
                    let (c, d) = (_mm256_add_ps(c[0], c[1]), _mm256_add_ps(d[0], d[1]));
                    hsum4_256(a, b, c, d)
                }
                #[inline(always)]
                unsafe fn prefetch(p: *const u8) {
                    _mm_prefetch::<_MM_HINT_T0>(p as *const i8)
                }
            }
        };
    }
    i8dot_sign!(Avx2Dot);
    i8dot_sign!(Avx512Dot);

    /// The two 256-bit halves of `x` added.
    #[inline(always)]
    unsafe fn fold512(x: __m512) -> __m256 {
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(x)));
        _mm256_add_ps(_mm512_castps512_ps256(x), hi)
    }

    /// VNNI: one 512-bit `vpdpbusd` of (x + 128) with w per block pair, started from −128·Σw of
    /// each lane's four codes.
    impl I8Dot for VnniDot {
        type W = (__m512i, __m512i);
        type V = __m512;
        const FLIPPED: bool = true;
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn prepare(w: *const i8) -> (__m512i, __m512i) {
            let w = _mm512_loadu_si512(w as *const __m512i);
            let sum128 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(i8::MIN), w);
            (w, _mm512_sub_epi32(_mm512_setzero_si512(), sum128))
        }
        #[inline(always)]
        unsafe fn dots((w, neg): (__m512i, __m512i), x: *const i8) -> __m512 {
            _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(neg, _mm512_loadu_si512(x as *const __m512i), w))
        }
        #[inline(always)]
        unsafe fn fma_scales(d: __m512, s: *const f32, acc: __m512) -> __m512 {
            _mm512_fmadd_ps(d, _mm512_loadu_ps(s), acc)
        }
        #[inline(always)]
        unsafe fn hsum4([a, b, c, d]: [__m512; 4]) -> [f32; 4] {
            // No closures: they would not inherit the target features, nor inline these.
            hsum4_256(fold512(a), fold512(b), fold512(c), fold512(d))
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
