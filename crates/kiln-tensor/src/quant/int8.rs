//! Int8 linear layers: weight-only (`out = x · (q·scale)ᵀ + b`, activations stay f32) and W8A8
//! (`out = (q_x · q_wᵀ) · s_x · s_w + b`, activations quantized per token on the fly).
//!
//! Weight-only streams one byte per weight instead of four: for up to [`GEMV_MAX_ROWS`] rows
//! (decode) each thread widens int8 to f32 in registers and FMAs against the rows; for more
//! (prefill) it dequantizes a tile of W to f32 once and runs a small GEMM on it.
//!
//! W8A8 quantizes each activation row symmetrically, `s_x = max|x| / 127`,
//! `q_x = round_half_even(x · 127/max|x|)`, and sums `q_x · q_w` exactly in i32 (see
//! [`super::qsimd`]); the reference and every fast path produce the same i32, and the same
//! epilogue turns it into the same f32 bits.
// Register arrays are indexed by row and unroll slot, the way the SIMD loops read.
#![allow(clippy::needless_range_loop)]

use rayon::prelude::*;

use super::qsimd::{IntDot, QSimd, ScalarDot, PREFETCH_BYTES};
use super::{check_operands, for_row_blocks, scaled_input, tiled_prefill, DotPath, Int8Weight, GEMV_MAX_ROWS};
use crate::kernels::SendPtr;
use crate::simd::Isa;

/// Largest k for which W8A8's i32 sums cannot overflow: 2³¹ / (128·127) pairs.
pub const W8A8_MAX_K: usize = 131_072;

/// Weight-only int8, scalar and f64: `out[r, o] = scale[o] · Σ_i (x[r, i] / act_scale[i]) · q[o, i] + bias[o]`.
pub fn int8_weight_matmul_reference(out: &mut [f32], inp: &[f32], w: &Int8Weight, bias: Option<&[f32]>, m: usize) {
    let (n, k) = (w.n, w.k);
    check_operands(out, inp, n, k, bias, m);
    let act = w.act_scale.as_deref();
    for r in 0..m {
        for o in 0..n {
            let mut acc = 0.0f64;
            for i in 0..k {
                let x = inp[r * k + i] as f64 / act.map_or(1.0, |s| s[i] as f64);
                acc += x * w.q[o * k + i] as f64;
            }
            out[r * n + o] = (acc * w.scale[o] as f64 + bias.map_or(0.0, |b| b[o] as f64)) as f32;
        }
    }
}

/// Weight-only int8 on all rayon threads with the widest instruction set this CPU has.
///
/// # Panics
/// If `inp` is not `m·k`, `out` not `m·n`, or `bias` not `n` long.
pub fn int8_weight_matmul(out: &mut [f32], inp: &[f32], w: &Int8Weight, bias: Option<&[f32]>, m: usize) {
    int8_weight_matmul_isa(Isa::detect(), out, inp, w, bias, m)
}

/// [`int8_weight_matmul`] on a given instruction set (tests and comparisons).
pub fn int8_weight_matmul_isa(isa: Isa, out: &mut [f32], inp: &[f32], w: &Int8Weight, bias: Option<&[f32]>, m: usize) {
    let (n, k) = (w.n, w.k);
    check_operands(out, inp, n, k, bias, m);
    assert_eq!(w.q.len(), n * k, "int8 weight: q is not n·k");
    assert_eq!(w.scale.len(), n, "int8 weight: scale is not n");
    if m == 0 || n == 0 {
        return;
    }
    let x = scaled_input(inp, w.act_scale.as_deref(), k);
    if m > GEMV_MAX_ROWS {
        return tiled_prefill(out, &x, n, k, bias, m, |o0, tile| dequant_i8_v(isa, tile, o0, w));
    }
    let dst = SendPtr(out.as_mut_ptr());
    let x = &*x;
    for_row_blocks(n, k, |o0, o1| gemv_i8_v(isa, dst, x, w, bias, m, o0, o1));
}

/// Output rows `o0..o1` for `m ≤ 4` rows: the weight row is widened once per step and used for
/// every activation row.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn gemv_i8<S: QSimd>(
    out: SendPtr,
    x: &[f32],
    w: &Int8Weight,
    bias: Option<&[f32]>,
    m: usize,
    o0: usize,
    o1: usize,
) {
    match m {
        1 => gemv_i8_rows::<S, 1, 4>(out, x, w, bias, o0, o1),
        2 => gemv_i8_rows::<S, 2, 4>(out, x, w, bias, o0, o1),
        3 => gemv_i8_rows::<S, 3, 2>(out, x, w, bias, o0, o1),
        _ => gemv_i8_rows::<S, 4, 2>(out, x, w, bias, o0, o1),
    }
}
crate::multiversion!(fn gemv_i8_v(out: SendPtr, x: &[f32], w: &Int8Weight, bias: Option<&[f32]>, m: usize, o0: usize, o1: usize) => gemv_i8);

/// `R` activation rows, `U` independent accumulators per row (enough to hide the FMA latency
/// without spilling: R·U ≤ 8 vector registers).
#[inline(always)]
unsafe fn gemv_i8_rows<S: QSimd, const R: usize, const U: usize>(
    out: SendPtr,
    x: &[f32],
    w: &Int8Weight,
    bias: Option<&[f32]>,
    o0: usize,
    o1: usize,
) {
    let (n, k) = (w.n, w.k);
    let xp = x.as_ptr();
    for o in o0..o1 {
        let wp = w.q.as_ptr().add(o * k);
        let mut acc = [[S::zero(); U]; R];
        let mut i = 0;
        while i + U * S::LANES <= k {
            // Never dereferenced, so it may point past the weights.
            S::prefetch((wp as *const u8).wrapping_add(i + PREFETCH_BYTES));
            for u in 0..U {
                let wv = S::load_i8(wp.add(i + u * S::LANES));
                for r in 0..R {
                    acc[r][u] = S::fma(S::load(xp.add(r * k + i + u * S::LANES)), wv, acc[r][u]);
                }
            }
            i += U * S::LANES;
        }
        while i + S::LANES <= k {
            let wv = S::load_i8(wp.add(i));
            for r in 0..R {
                acc[r][0] = S::fma(S::load(xp.add(r * k + i)), wv, acc[r][0]);
            }
            i += S::LANES;
        }
        for r in 0..R {
            let mut v = acc[r][0];
            for a in &acc[r][1..] {
                v = S::add(v, *a);
            }
            let mut s = S::reduce_sum(v);
            for j in i..k {
                s += *xp.add(r * k + j) * *wp.add(j) as f32;
            }
            // SAFETY (caller): out is m·n long and only this task writes column o.
            *out.0.add(r * n + o) = s * w.scale[o] + bias.map_or(0.0, |b| b[o]);
        }
    }
}

/// `tile[j, :] = q[o0 + j, :] · scale[o0 + j]` for the rows of one prefill tile.
#[inline(always)]
unsafe fn dequant_i8<S: QSimd>(tile: &mut [f32], o0: usize, w: &Int8Weight) {
    let k = w.k;
    for (j, row) in tile.chunks_exact_mut(k).enumerate() {
        let (q, sc) = (w.q.as_ptr().add((o0 + j) * k), w.scale[o0 + j]);
        let s = S::splat(sc);
        let mut i = 0;
        while i + S::LANES <= k {
            S::store(row.as_mut_ptr().add(i), S::mul(S::load_i8(q.add(i)), s));
            i += S::LANES;
        }
        for (t, y) in row.iter_mut().enumerate().skip(i) {
            *y = *q.add(t) as f32 * sc;
        }
    }
}
crate::multiversion!(fn dequant_i8_v(tile: &mut [f32], o0: usize, w: &Int8Weight) => dequant_i8);

/// Quantizes one activation row (after dividing by `act_scale`) to int8; returns its scale.
/// `q = round_half_even(x · (127 / max|x|))`, `s_x = max|x| / 127`; an all-zero row gives 0, 0.
fn quantize_row(x: &[f32], act_scale: Option<&[f32]>, q: &mut [i8]) -> f32 {
    let xs = |i: usize| match act_scale {
        Some(s) => x[i] / s[i],
        None => x[i],
    };
    let amax = (0..x.len()).fold(0.0f32, |a, i| a.max(xs(i).abs()));
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
/// does the rounding): `round_ties_even` is a libm call without SSE4.1, this vectorizes.
#[inline(always)]
fn round_half_even_small(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (v + MAGIC) - MAGIC
}

/// Per-token dynamic int8 quantization of `inp [m, k]` (divided by `act_scale` first): writes
/// the codes `q [m, k]` and the row scales `sx [m]`, so that `inp ≈ q · sx` row by row.
/// Round half to even; finite inputs expected.
pub fn quantize_activations(inp: &[f32], k: usize, act_scale: Option<&[f32]>, q: &mut [i8], sx: &mut [f32]) {
    let m = sx.len();
    assert!(inp.len() == m * k && q.len() == m * k, "quantize_activations: inp and q must be sx.len()·k");
    assert!(act_scale.is_none_or(|s| s.len() == k), "quantize_activations: act_scale is not k long");
    if k == 0 {
        sx.fill(0.0);
        return;
    }
    if m < 16 {
        // A decode step: not worth waking the pool.
        for ((qr, s), xr) in q.chunks_mut(k).zip(sx.iter_mut()).zip(inp.chunks(k)) {
            *s = quantize_row(xr, act_scale, qr);
        }
        return;
    }
    q.par_chunks_mut(k)
        .zip(sx.par_iter_mut())
        .zip(inp.par_chunks(k))
        .for_each(|((qr, s), xr)| *s = quantize_row(xr, act_scale, qr));
}

/// The one way an i32 accumulator becomes an output, shared by the reference and fast paths.
#[inline(always)]
fn w8a8_epilogue(acc: i32, sx: f32, sw: f32, b: f32) -> f32 {
    acc as f32 * (sx * sw) + b
}

/// W8A8 reference: the same activation quantization, then i64 sums (checked to fit in i32).
pub fn w8a8_matmul_reference(out: &mut [f32], inp: &[f32], w: &Int8Weight, bias: Option<&[f32]>, m: usize) {
    let (n, k) = (w.n, w.k);
    check_operands(out, inp, n, k, bias, m);
    let mut q = vec![0i8; m * k];
    let mut sx = vec![0.0f32; m];
    for r in 0..m {
        sx[r] = quantize_row(&inp[r * k..(r + 1) * k], w.act_scale.as_deref(), &mut q[r * k..(r + 1) * k]);
    }
    for r in 0..m {
        for o in 0..n {
            let acc: i64 = (0..k).map(|i| q[r * k + i] as i64 * w.q[o * k + i] as i64).sum();
            let acc = i32::try_from(acc).expect("w8a8: int8 dot product overflows i32");
            out[r * n + o] = w8a8_epilogue(acc, sx[r], w.scale[o], bias.map_or(0.0, |b| b[o]));
        }
    }
}

/// W8A8 on all rayon threads with the widest instruction set (VNNI where the CPU has it).
///
/// # Panics
/// As [`int8_weight_matmul`], and if `k` exceeds [`W8A8_MAX_K`].
pub fn w8a8_matmul(out: &mut [f32], inp: &[f32], w: &Int8Weight, bias: Option<&[f32]>, m: usize) {
    w8a8_matmul_isa(Isa::detect(), out, inp, w, bias, m)
}

/// [`w8a8_matmul`] on a given instruction set; `Isa::Avx512` uses VNNI when the CPU has it.
pub fn w8a8_matmul_isa(isa: Isa, out: &mut [f32], inp: &[f32], w: &Int8Weight, bias: Option<&[f32]>, m: usize) {
    w8a8_matmul_path(DotPath::for_isa(isa), out, inp, w, bias, m)
}

pub(crate) fn w8a8_matmul_path(
    path: DotPath,
    out: &mut [f32],
    inp: &[f32],
    w: &Int8Weight,
    bias: Option<&[f32]>,
    m: usize,
) {
    let (n, k) = (w.n, w.k);
    check_operands(out, inp, n, k, bias, m);
    assert!(w.q.len() == n * k && w.scale.len() == n, "int8 weight: q is not n·k or scale not n");
    assert!(k <= W8A8_MAX_K, "w8a8: k = {k} exceeds {W8A8_MAX_K}, where i32 sums could overflow");
    if m == 0 || n == 0 {
        return;
    }
    let mut q = vec![0i8; m * k];
    let mut sx = vec![0.0f32; m];
    quantize_activations(inp, k, w.act_scale.as_deref(), &mut q, &mut sx);
    let dst = SendPtr(out.as_mut_ptr());
    let (q, sx) = (&q[..], &sx[..]);
    // SAFETY: out is m·n long and each task writes only its columns o0..o1.
    for_row_blocks(n, k, |o0, o1| unsafe { w8a8_block_on(path, dst, q, sx, w, bias, m, o0, o1) });
}

/// Output columns `o0..o1` for all `m` rows, four activation rows at a time (the rows and the
/// block's weight rows stay in L1 while they are reused).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn w8a8_block<D: IntDot>(
    out: SendPtr,
    q: &[i8],
    sx: &[f32],
    w: &Int8Weight,
    bias: Option<&[f32]>,
    m: usize,
    o0: usize,
    o1: usize,
) {
    let (n, k) = (w.n, w.k);
    let x = |r: usize| q.as_ptr().add(r * k);
    let mut r0 = 0;
    while r0 < m {
        let rows = (m - r0).min(4);
        for o in o0..o1 {
            let wp = w.q.as_ptr().add(o * k);
            let mut acc = [0i32; 4];
            match rows {
                1 => acc[..1].copy_from_slice(&D::dot::<1>(wp, [x(r0)], k)),
                2 => acc[..2].copy_from_slice(&D::dot::<2>(wp, [x(r0), x(r0 + 1)], k)),
                3 => acc[..3].copy_from_slice(&D::dot::<3>(wp, [x(r0), x(r0 + 1), x(r0 + 2)], k)),
                _ => acc = D::dot::<4>(wp, [x(r0), x(r0 + 1), x(r0 + 2), x(r0 + 3)], k),
            }
            let b = bias.map_or(0.0, |b| b[o]);
            for (j, &a) in acc[..rows].iter().enumerate() {
                *out.0.add((r0 + j) * n + o) = w8a8_epilogue(a, sx[r0 + j], w.scale[o], b);
            }
        }
        r0 += 4;
    }
}

/// Runs [`w8a8_block`] with the dot products of `path`, compiled for its target features.
#[allow(clippy::too_many_arguments)]
unsafe fn w8a8_block_on(
    path: DotPath,
    out: SendPtr,
    q: &[i8],
    sx: &[f32],
    w: &Int8Weight,
    bias: Option<&[f32]>,
    m: usize,
    o0: usize,
    o1: usize,
) {
    #[cfg(target_arch = "x86_64")]
    {
        use super::qsimd::{Avx2Dot, Avx512Dot, VnniDot};
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn on_vnni(
            out: SendPtr,
            q: &[i8],
            sx: &[f32],
            w: &Int8Weight,
            b: Option<&[f32]>,
            m: usize,
            o0: usize,
            o1: usize,
        ) {
            unsafe { w8a8_block::<VnniDot>(out, q, sx, w, b, m, o0, o1) }
        }
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn on_avx512(
            out: SendPtr,
            q: &[i8],
            sx: &[f32],
            w: &Int8Weight,
            b: Option<&[f32]>,
            m: usize,
            o0: usize,
            o1: usize,
        ) {
            unsafe { w8a8_block::<Avx512Dot>(out, q, sx, w, b, m, o0, o1) }
        }
        #[target_feature(enable = "avx2")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn on_avx2(
            out: SendPtr,
            q: &[i8],
            sx: &[f32],
            w: &Int8Weight,
            b: Option<&[f32]>,
            m: usize,
            o0: usize,
            o1: usize,
        ) {
            unsafe { w8a8_block::<Avx2Dot>(out, q, sx, w, b, m, o0, o1) }
        }
        // SAFETY: `path` comes from `DotPath::for_isa`/`all_supported`, which checked the CPU.
        match path {
            DotPath::Vnni => return on_vnni(out, q, sx, w, bias, m, o0, o1),
            DotPath::Avx512 => return on_avx512(out, q, sx, w, bias, m, o0, o1),
            DotPath::Avx2 => return on_avx2(out, q, sx, w, bias, m, o0, o1),
            DotPath::Scalar => {}
        }
    }
    w8a8_block::<ScalarDot>(out, q, sx, w, bias, m, o0, o1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::assert_close_to_sum_scale;
    use crate::testutil::*;
    use rand::Rng;

    fn random_weight(seed: u64, n: usize, k: usize, act: bool) -> Int8Weight {
        let mut r = rng(seed);
        let q = (0..n * k).map(|_| r.random_range(-127i32..=127) as i8).collect();
        let scale = (0..n).map(|_| r.random_range(0.001f32..0.02)).collect();
        let act_scale = act.then(|| (0..k).map(|_| r.random_range(0.25f32..4.0)).collect());
        Int8Weight::from_parts(n, k, q, scale, act_scale).unwrap()
    }

    /// The effective f64 weight `q · scale / act_scale`.
    fn dense(w: &Int8Weight) -> Vec<f64> {
        let (n, k) = (w.n, w.k);
        let act = |i: usize| w.act_scale.as_ref().map_or(1.0, |s| s[i] as f64);
        (0..n * k).map(|j| w.q[j] as f64 * w.scale[j / k] as f64 / act(j % k)).collect()
    }

    const MS: [usize; 6] = [1, 2, 3, 4, 5, 17];
    const NS: [usize; 3] = [1, 7, 65];
    const KS: [usize; 6] = [1, 5, 32, 37, 96, 576];

    #[test]
    fn int8_weight_only_fast_matches_reference() {
        for (&m, &n, &k) in MS.iter().flat_map(|m| NS.iter().flat_map(move |n| KS.iter().map(move |k| (m, n, k)))) {
            for act in [false, true] {
                let w = random_weight((m * 1000 + n * 10 + k) as u64, n, k, act);
                let w_eff = dense(&w);
                let mut r = rng(7 + k as u64);
                let x = randn(&mut r, m * k, 2.0);
                let b = randn(&mut r, n, 1.0);
                for bias in [None, Some(&b[..])] {
                    let mut y0 = vec![0.0; m * n];
                    int8_weight_matmul_reference(&mut y0, &x, &w, bias, m);
                    for isa in Isa::all_supported() {
                        let mut y = vec![f32::NAN; m * n];
                        int8_weight_matmul_isa(isa, &mut y, &x, &w, bias, m);
                        let what = format!("int8 {isa:?} m{m} n{n} k{k} act{act}");
                        assert_close_to_sum_scale(&what, &y, &y0, &x, &w_eff, bias, m, n, k, 1e-5);
                    }
                }
            }
        }
    }

    #[test]
    fn int8_dot_products_are_exact_on_every_path() {
        let mut r = rng(3);
        for k in (0usize..200).chain([255, 256, 257, 1000, 4099]) {
            // Extreme codes included: -128 weights and ±127 activations.
            let w: Vec<i8> = (0..k).map(|_| r.random_range(-128i32..=127) as i8).collect();
            let xs: Vec<Vec<i8>> = (0..4)
                .map(|j| {
                    (0..k)
                        .map(|i| if j == 3 { 127 - 254 * (i % 2) as i32 } else { r.random_range(-127..=127) } as i8)
                        .collect()
                })
                .collect();
            let want: Vec<i32> =
                xs.iter().map(|x| x.iter().zip(&w).map(|(&a, &b)| a as i64 * b as i64).sum::<i64>() as i32).collect();
            for path in DotPath::all_supported() {
                let got = dot4_on(path, &w, &xs);
                assert_eq!(got[..], want[..], "{path:?} k={k}");
            }
        }
    }

    fn dot4_on(path: DotPath, w: &[i8], xs: &[Vec<i8>]) -> [i32; 4] {
        let k = w.len();
        let p = [xs[0].as_ptr(), xs[1].as_ptr(), xs[2].as_ptr(), xs[3].as_ptr()];
        #[cfg(target_arch = "x86_64")]
        {
            use super::super::qsimd::{Avx2Dot, Avx512Dot, VnniDot};
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2")]
            unsafe fn vnni(w: *const i8, p: [*const i8; 4], k: usize) -> [i32; 4] {
                unsafe { VnniDot::dot::<4>(w, p, k) }
            }
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
            unsafe fn avx512(w: *const i8, p: [*const i8; 4], k: usize) -> [i32; 4] {
                unsafe { Avx512Dot::dot::<4>(w, p, k) }
            }
            #[target_feature(enable = "avx2")]
            unsafe fn avx2(w: *const i8, p: [*const i8; 4], k: usize) -> [i32; 4] {
                unsafe { Avx2Dot::dot::<4>(w, p, k) }
            }
            // SAFETY: the path was detected on this CPU; every pointer covers k elements.
            unsafe {
                match path {
                    DotPath::Vnni => return vnni(w.as_ptr(), p, k),
                    DotPath::Avx512 => return avx512(w.as_ptr(), p, k),
                    DotPath::Avx2 => return avx2(w.as_ptr(), p, k),
                    DotPath::Scalar => {}
                }
            }
        }
        // SAFETY: every pointer covers k elements.
        unsafe { ScalarDot::dot::<4>(w.as_ptr(), p, k) }
    }

    #[test]
    fn w8a8_fast_is_bit_identical_to_reference() {
        for (&m, &n, &k) in MS.iter().flat_map(|m| NS.iter().flat_map(move |n| KS.iter().map(move |k| (m, n, k)))) {
            for act in [false, true] {
                let w = random_weight((m * 977 + n * 13 + k) as u64, n, k, act);
                let mut r = rng(11 + k as u64);
                let mut x = randn(&mut r, m * k, 3.0);
                if m > 2 {
                    // An all-zero token quantizes to zeros with scale 0.
                    x[k..2 * k].fill(0.0);
                }
                let b = randn(&mut r, n, 1.0);
                for bias in [None, Some(&b[..])] {
                    let mut y0 = vec![0.0; m * n];
                    w8a8_matmul_reference(&mut y0, &x, &w, bias, m);
                    for path in DotPath::all_supported() {
                        let mut y = vec![f32::NAN; m * n];
                        w8a8_matmul_path(path, &mut y, &x, &w, bias, m);
                        let same = y.iter().zip(&y0).all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "w8a8 {path:?} m{m} n{n} k{k} act{act}: not bit-identical");
                    }
                }
            }
        }
    }

    #[test]
    fn w8a8_is_close_to_the_float_product() {
        // Per-token int8 activations on top of int8 weights: about 1% error on random data.
        let (m, n, k) = (8, 33, 256);
        let w = random_weight(5, n, k, true);
        let mut r = rng(6);
        let x = randn(&mut r, m * k, 1.0);
        let (mut y, mut y0) = (vec![0.0; m * n], vec![0.0; m * n]);
        w8a8_matmul(&mut y, &x, &w, None, m);
        int8_weight_matmul_reference(&mut y0, &x, &w, None, m);
        let e = rel_err(&y, &y0);
        assert!(e < 0.02, "w8a8 vs weight-only int8: {e}");
    }

    #[test]
    fn activation_quantization_rounds_half_to_even() {
        // 127 · x / max: 0.5 → 0, 1.5 → 2, -2.5 → -2; the max maps to ±127.
        let x = [0.5f32, 1.5, -2.5, 127.0];
        let (mut q, mut s) = ([0i8; 4], [0.0f32]);
        quantize_activations(&x, 4, None, &mut q, &mut s);
        assert_eq!(q, [0, 2, -2, 127]);
        assert_eq!(s[0], 1.0);
    }

    #[test]
    fn int8_kernels_are_deterministic_across_thread_counts() {
        let (m, n, k) = (17, 130, 300);
        let w = random_weight(9, n, k, true);
        let x = randn(&mut rng(10), m * k, 1.0);
        let run = |threads: usize, m: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let (mut a, mut b) = (vec![0.0; m * n], vec![0.0; m * n]);
                int8_weight_matmul(&mut a, &x[..m * k], &w, None, m);
                w8a8_matmul(&mut b, &x[..m * k], &w, None, m);
                (a, b)
            })
        };
        for m in [1, 3, 17] {
            assert_eq!(run(1, m), run(3, m), "m = {m}");
        }
    }
}
