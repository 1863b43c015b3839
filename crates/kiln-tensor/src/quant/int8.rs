//! Int8 linear layers: weight-only (`out = x · (q·scale)ᵀ + b`) and W8A8
//! (`out = (q_x · q_wᵀ) · s_x · s_w + b`, activations quantized per token on the fly).
//!
//! Weight-only runs llama.cpp's Q8_0 × Q8_0 numerics, prefill and decode alike: each activation
//! row is rounded to int8 per block of 32 (`sx_b = max|x_b| / 127`, round half to even, as
//! [`quantize_activations`]), each weight row's block is multiplied by it exactly in i32 (see
//! [`I8Dot`]), and `out = scale[o] · Σ_b sx_b · dot_b + b` in f32. The multiply is integer, one
//! `vpdpbusd` per 32 pairs on VNNI, instead of widening every code to f32 for an FMA. From 8
//! rows on, CPUs with AMX-INT8 run the same integers on tiles ([`super::amx`]; opt out with
//! `KILN_INT8=vnni`), whose f32 sums run in another order than the block dots'. Against the f32-activation
//! product the rounding costs, as relative error on a 3072 × 768 product, 3.7e-3 for Gaussian
//! activations and 1.2e-2 with a few 20× outlier channels (`int8_activation_rounding_error`),
//! the order of the per-channel weight rounding itself.
//!
//! W8A8 quantizes each activation row symmetrically, `s_x = max|x| / 127`,
//! `q_x = round_half_even(x · 127/max|x|)`, and sums `q_x · q_w` exactly in i32 (see
//! [`super::qsimd`]); the reference and every fast path produce the same i32, and the same
//! epilogue turns it into the same f32 bits.
// Register arrays are indexed by row and unroll slot, the way the SIMD loops read.
#![allow(clippy::needless_range_loop)]

use rayon::prelude::*;

use super::actq::{quantize_row, quantize_row_scalar};
#[cfg(target_arch = "x86_64")]
use super::amx::amx_w8a8_matmul;
use super::amx::{amx_int8_matmul, amx_int8_usable, TilePath, AMX_INT8_MIN_M, AMX_W8A8_MIN_M};
use super::qsimd::{I8Dot, IntDot, ScalarDot, I4_BLOCK, PREFETCH_BYTES};
use super::{check_operands, for_row_blocks, DotPath, Int8Weight, GEMV_MAX_ROWS};
use crate::kernels::{GemvLayout, SendPtr};
use crate::simd::Isa;

/// Largest k for which W8A8's i32 sums cannot overflow: 2³¹ / (128·127) pairs.
pub const W8A8_MAX_K: usize = 131_072;

/// Weight-only int8, scalar and f64, straight from the definition: on the activations (divided
/// by `act_scale`) rounded to int8 per 32 block, `scale[o] · Σ_b sx_b · dot_b + bias[o]` with
/// exact i32 `dot_b = Σ_{i∈b} xq[i]·q[o, i]` (the last block may be shorter).
pub fn int8_weight_matmul_reference(out: &mut [f32], inp: &[f32], w: &Int8Weight, bias: Option<&[f32]>, m: usize) {
    let (n, k) = (w.n, w.k);
    check_operands(out, inp, n, k, bias, m);
    let act = w.act_scale.as_deref();
    let mut xq = vec![0i8; k];
    let mut sx = vec![0.0f32; k.div_ceil(I4_BLOCK)];
    for r in 0..m {
        let x = &inp[r * k..(r + 1) * k];
        for (b, s) in sx.iter_mut().enumerate() {
            let is = b * I4_BLOCK..k.min((b + 1) * I4_BLOCK);
            *s = quantize_row_scalar(&x[is.clone()], act.map(|a| &a[is.clone()]), &mut xq[is]);
        }
        for o in 0..n {
            let mut acc = 0.0f64;
            for (b, &s_x) in sx.iter().enumerate() {
                let is = b * I4_BLOCK..k.min((b + 1) * I4_BLOCK);
                let dot: i32 = is.map(|i| xq[i] as i32 * w.q[o * k + i] as i32).sum();
                acc += s_x as f64 * dot as f64;
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

/// [`int8_weight_matmul`] on a given instruction set (tests and comparisons); `Isa::Avx512`
/// uses VNNI when the CPU has it.
pub fn int8_weight_matmul_isa(isa: Isa, out: &mut [f32], inp: &[f32], w: &Int8Weight, bias: Option<&[f32]>, m: usize) {
    int8_weight_matmul_path(DotPath::for_isa(isa), out, inp, w, bias, m)
}

pub(crate) fn int8_weight_matmul_path(
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
    assert!(w.act_scale.as_ref().is_none_or(|s| s.len() == k), "int8 weight: act_scale is not k long");
    if m == 0 || n == 0 {
        return;
    }
    if path == DotPath::Vnni && m >= AMX_INT8_MIN_M && amx_int8_usable() && !vnni_forced() {
        return amx_int8_matmul(TilePath::Amx, out, inp, w, bias, m);
    }
    let a = BlockActs8::new(inp, k, w.act_scale.as_deref(), m, path_flips(path));
    let (dst, a) = (SendPtr(out.as_mut_ptr()), &a);
    for_row_blocks(n, k, |o0, o1| {
        for r0 in (0..m).step_by(GEMV_MAX_ROWS) {
            let rows = GEMV_MAX_ROWS.min(m - r0);
            // SAFETY: out is m·n long (checked above) and this task writes only columns o0..o1.
            unsafe { gemv_i8q_on(path, dst, a, w, bias, r0, rows, o0, o1) }
        }
    });
}

/// `KILN_INT8=vnni` keeps prefill on the VNNI block dots where AMX tiles would run (A/B runs).
fn vnni_forced() -> bool {
    static FORCED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FORCED.get_or_init(|| std::env::var("KILN_INT8").is_ok_and(|v| v == "vnni"))
}

/// Whether `path`'s [`I8Dot`] wants its activations stored as x + 128.
fn path_flips(path: DotPath) -> bool {
    #[cfg(target_arch = "x86_64")]
    if path == DotPath::Vnni {
        return <super::qsimd::VnniDot as I8Dot>::FLIPPED;
    }
    let _ = path;
    <ScalarDot as I8Dot>::FLIPPED
}

/// Activation rows rounded to int8 per 32 block (the last one may be shorter), laid out for
/// [`I8Dot`]: rows padded with zero codes to whole block pairs.
struct BlockActs8 {
    /// Block pairs per row, `⌈k / 64⌉`.
    pairs: usize,
    /// `[m, pairs·64]` codes, stored as x ^ 0x80 (x + 128 as u8) when the path is `FLIPPED`.
    q: Vec<i8>,
    /// `[m, pairs, 16]`: `sx_b` eight times, then `sx_{b+1}` eight times (0 for padding).
    sx: Vec<f32>,
}

impl BlockActs8 {
    fn new(inp: &[f32], k: usize, act: Option<&[f32]>, m: usize, flipped: bool) -> BlockActs8 {
        let pairs = k.div_ceil(2 * I4_BLOCK);
        let row = pairs * 2 * I4_BLOCK;
        let mut a = BlockActs8 { pairs, q: vec![0i8; m * row], sx: vec![0.0; m * pairs * 16] };
        let quantize = |(qr, (sr, xr)): (&mut [i8], (&mut [f32], &[f32]))| {
            for b in 0..k.div_ceil(I4_BLOCK) {
                let is = b * I4_BLOCK..k.min((b + 1) * I4_BLOCK);
                let s = quantize_row(&xr[is.clone()], act.map(|a| &a[is.clone()]), &mut qr[is]);
                sr[8 * b..8 * b + 8].fill(s);
            }
            if flipped {
                qr.iter_mut().for_each(|v| *v ^= i8::MIN);
            }
        };
        if k == 0 {
            return a;
        }
        if m < 16 {
            // A decode step: not worth waking the pool.
            a.q.chunks_mut(row).zip(a.sx.chunks_mut(pairs * 16).zip(inp.chunks(k))).for_each(quantize);
        } else {
            a.q.par_chunks_mut(row).zip(a.sx.par_chunks_mut(pairs * 16).zip(inp.par_chunks(k))).for_each(quantize);
        }
        a
    }
}

/// Output rows `o0..o1` for the `R` activation rows from `r0`, four weight rows at a time
/// ([`pair_dots`]; a last group of fewer two by two, then one); the four rows' lane sums are
/// reduced together, then scaled by `scale[o]` and the bias added. Four rows at once against two
/// by two, on the Xeon: m = 128 +10-20% GFLOP/s, a cache-hot m = 1 GEMV +20%.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn gemv_i8q_rows<D: I8Dot, const R: usize>(
    out: SendPtr,
    a: &BlockActs8,
    w: &Int8Weight,
    bias: Option<&[f32]>,
    r0: usize,
    o0: usize,
    o1: usize,
) {
    let (n, k) = (w.n, w.k);
    let mut pad = [0i8; PAIR];
    let row = |o: usize| w.q.as_ptr().add(o * k);
    let one_stream = GemvLayout::detect() == GemvLayout::OneRow;
    let mut o4 = o0;
    while o4 < o1 {
        let rows = 4.min(o1 - o4);
        let mut tot = [[D::zero(); 4]; R];
        let mut j = 0;
        if R == 1 && one_stream {
            // One weight row at a time, no software prefetch: see `GemvLayout` (AMD).
            while j < rows {
                tot[0][j] = pair_dots::<D, R, 1>([row(o4 + j)], a, k, r0, &mut pad, false)[0][0];
                j += 1;
            }
        }
        if rows == 4 && j == 0 {
            let acc = pair_dots::<D, R, 4>([row(o4), row(o4 + 1), row(o4 + 2), row(o4 + 3)], a, k, r0, &mut pad, true);
            tot = acc;
            j = 4;
        }
        while j + 2 <= rows {
            let acc = pair_dots::<D, R, 2>([row(o4 + j), row(o4 + j + 1)], a, k, r0, &mut pad, true);
            for r in 0..R {
                (tot[r][j], tot[r][j + 1]) = (acc[r][0], acc[r][1]);
            }
            j += 2;
        }
        if j < rows {
            let acc = pair_dots::<D, R, 1>([row(o4 + j)], a, k, r0, &mut pad, true);
            for r in 0..R {
                tot[r][j] = acc[r][0];
            }
        }
        for r in 0..R {
            let sums = D::hsum4(tot[r]);
            for j in 0..rows {
                let o = o4 + j;
                // SAFETY (caller): out is m·n long and only this task writes columns o0..o1.
                *out.0.add((r0 + r) * n + o) = sums[j] * w.scale[o] + bias.map_or(0.0, |b| b[o]);
            }
        }
        o4 += rows;
    }
}

/// Codes per block pair, the unit of [`I8Dot`].
const PAIR: usize = 2 * I4_BLOCK;

/// `R` activation rows from `r0` against `NW` weight rows of `k` codes at `wp`: per block pair
/// the exact dots as f32 lanes (see [`I8Dot`]) times `sx_b`, one accumulator per (activation,
/// weight) row, each activation pair loaded once for the `NW` weight rows. A last partial pair's
/// weights come through `pad`, zero past `k`.
#[inline(always)]
unsafe fn pair_dots<D: I8Dot, const R: usize, const NW: usize>(
    wp: [*const i8; NW],
    a: &BlockActs8,
    k: usize,
    r0: usize,
    pad: &mut [i8; PAIR],
    prefetch: bool,
) -> [[D::V; NW]; R] {
    let (pairs, full) = (a.pairs, k / PAIR);
    let (xrow, sxrow) = (pairs * PAIR, pairs * 16);
    let (xp, sxp) = (a.q.as_ptr().add(r0 * xrow), a.sx.as_ptr().add(r0 * sxrow));
    let mut acc = [[D::zero(); NW]; R];
    // The same pair of the next group of NW rows: rows are contiguous, so a fixed distance
    // shorter than the group lands on lines already in flight (measured on the Xeon: a cold
    // 768-wide GEMV read 20 GB/s prefetching 1 KiB ahead, 24-26 GB/s a group ahead).
    let ahead = prefetch.then_some((NW * k).max(PREFETCH_BYTES));
    const { assert!(NW == 1 || NW == 2 || NW == 4) };
    for p in 0..pairs {
        let mut wv = [prepare_pair::<D>(wp[0], p, full, k, ahead, pad); NW];
        for c in 1..NW {
            wv[c] = prepare_pair::<D>(wp[c], p, full, k, ahead, pad);
        }
        for r in 0..R {
            let (x, sx) = (xp.add(r * xrow + p * PAIR), sxp.add(r * sxrow + p * 16));
            for c in 0..NW {
                acc[r][c] = D::fma_scales(D::dots(wv[c], x), sx, acc[r][c]);
            }
        }
    }
    acc
}

/// Pair `p` of the weight row at `q` (`full` whole pairs in its `k` codes) for [`I8Dot::dots`].
#[inline(always)]
unsafe fn prepare_pair<D: I8Dot>(
    q: *const i8,
    p: usize,
    full: usize,
    k: usize,
    ahead: Option<usize>,
    pad: &mut [i8; PAIR],
) -> D::W {
    if p < full {
        // Never dereferenced, so it may point past the weights.
        if let Some(ahead) = ahead {
            D::prefetch((q as *const u8).wrapping_add(p * PAIR + ahead));
        }
        D::prepare(q.add(p * PAIR))
    } else {
        std::ptr::copy_nonoverlapping(q.add(p * PAIR), pad.as_mut_ptr(), k - p * PAIR);
        D::prepare(pad.as_ptr())
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn gemv_i8q<D: I8Dot>(
    out: SendPtr,
    a: &BlockActs8,
    w: &Int8Weight,
    bias: Option<&[f32]>,
    r0: usize,
    m: usize,
    o0: usize,
    o1: usize,
) {
    match m {
        1 => gemv_i8q_rows::<D, 1>(out, a, w, bias, r0, o0, o1),
        2 => gemv_i8q_rows::<D, 2>(out, a, w, bias, r0, o0, o1),
        3 => gemv_i8q_rows::<D, 3>(out, a, w, bias, r0, o0, o1),
        _ => gemv_i8q_rows::<D, 4>(out, a, w, bias, r0, o0, o1),
    }
}

/// Runs [`gemv_i8q`] with the block products of `path`, compiled for its target features.
#[allow(clippy::too_many_arguments)]
unsafe fn gemv_i8q_on(
    path: DotPath,
    out: SendPtr,
    a: &BlockActs8,
    w: &Int8Weight,
    bias: Option<&[f32]>,
    r0: usize,
    m: usize,
    o0: usize,
    o1: usize,
) {
    #[cfg(target_arch = "x86_64")]
    {
        use super::qsimd::{Avx2Dot, Avx512Dot, VnniDot};
        macro_rules! on {
            ($name:ident, $features:literal, $d:ty) => {
                #[target_feature(enable = $features)]
                #[allow(clippy::too_many_arguments)]
                unsafe fn $name(
                    out: SendPtr,
                    a: &BlockActs8,
                    w: &Int8Weight,
                    bias: Option<&[f32]>,
                    r0: usize,
                    m: usize,
                    o0: usize,
                    o1: usize,
                ) {
                    unsafe { gemv_i8q::<$d>(out, a, w, bias, r0, m, o0, o1) }
                }
            };
        }
        on!(on_vnni, "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma", VnniDot);
        on!(on_avx512, "avx512f,avx512bw,avx512vl,avx2,fma", Avx512Dot);
        on!(on_avx2, "avx2,fma", Avx2Dot);
        // SAFETY: `path` comes from `DotPath::for_isa`/`all_supported`, which checked the CPU
        // (AVX2 with FMA), and the activations were stored for it (`path_flips`).
        match path {
            DotPath::Vnni => return on_vnni(out, a, w, bias, r0, m, o0, o1),
            DotPath::Avx512 => return on_avx512(out, a, w, bias, r0, m, o0, o1),
            DotPath::Avx2 => return on_avx2(out, a, w, bias, r0, m, o0, o1),
            DotPath::Scalar => {}
        }
    }
    gemv_i8q::<ScalarDot>(out, a, w, bias, r0, m, o0, o1)
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
        sx[r] = quantize_row_scalar(&inp[r * k..(r + 1) * k], w.act_scale.as_deref(), &mut q[r * k..(r + 1) * k]);
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
    #[cfg(target_arch = "x86_64")]
    if path == DotPath::Vnni && m >= AMX_W8A8_MIN_M && amx_int8_usable() && !vnni_forced() {
        return amx_w8a8_matmul(out, inp, w, bias, m);
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
    use crate::kernels::with_each_gemv_layout;
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

    const MS: [usize; 7] = [1, 2, 3, 4, 5, 17, 40];
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
                    with_each_gemv_layout(|layout| {
                        for path in DotPath::all_supported() {
                            let mut y = vec![f32::NAN; m * n];
                            int8_weight_matmul_path(path, &mut y, &x, &w, bias, m);
                            let what = format!("int8 {path:?} {layout:?} m{m} n{n} k{k} act{act}");
                            assert_close_to_sum_scale(&what, &y, &y0, &x, &w_eff, bias, m, n, k, 1e-5);
                        }
                    });
                }
            }
        }
    }

    #[test]
    fn int8_block_dots_are_exact_on_every_path() {
        // Integer activations whose every 32 block holds a ±127 round to themselves (sx_b = 1),
        // so with scale 1 each output is the exact integer dot (< 2²⁴, exact in f32); codes
        // include −128 and ±127, the extremes of the sign and x + 128 tricks.
        let mut r = rng(5);
        // m = 17 runs the AMX tiles where the CPU has them.
        for (k, m) in [1, 31, 32, 33, 64, 96, 255, 256].into_iter().flat_map(|k| [(k, 5), (k, 17)]) {
            let n = 9;
            let q: Vec<i8> =
                (0..n * k).map(|j| if j % 7 == 0 { -128 } else { r.random_range(-127i32..=127) as i8 }).collect();
            let w = Int8Weight::from_parts(n, k, q, vec![1.0; n], None).unwrap();
            let x: Vec<f32> = (0..m * k)
                .map(|j| match j % k % 32 {
                    0 => 127.0,
                    1 => -127.0,
                    _ => r.random_range(-127i32..=127) as f32,
                })
                .collect();
            with_each_gemv_layout(|layout| {
                for path in DotPath::all_supported() {
                    let mut y = vec![f32::NAN; m * n];
                    int8_weight_matmul_path(path, &mut y, &x, &w, None, m);
                    for (j, &v) in y.iter().enumerate() {
                        let (row, o) = (j / n, j % n);
                        let dot: i32 = (0..k).map(|i| x[row * k + i] as i32 * w.q[o * k + i] as i32).sum();
                        assert_eq!(v, dot as f32, "{path:?} {layout:?} k{k} ({row}, {o})");
                    }
                }
            });
        }
    }

    #[test]
    fn int8_amx_tiles_match_reference_and_their_scalar_twin() {
        let amx = amx_int8_usable();
        // Tails of every kind: m not a multiple of 16 rows, n not of 16 columns, k not of 32.
        for &m in &[16usize, 17, 40] {
            for &n in &[1usize, 16, 33] {
                for &k in &[1usize, 31, 32, 37, 96, 576] {
                    for act in [false, true] {
                        let w = random_weight((m * 131 + n * 17 + k) as u64, n, k, act);
                        let w_eff = dense(&w);
                        let mut r = rng(k as u64 + 13);
                        let x = randn(&mut r, m * k, 2.0);
                        let b = randn(&mut r, n, 1.0);
                        for bias in [None, Some(&b[..])] {
                            let what = format!("int8 tiles m{m} n{n} k{k} act{act}");
                            let mut y0 = vec![0.0; m * n];
                            int8_weight_matmul_reference(&mut y0, &x, &w, bias, m);
                            let mut ys = vec![f32::NAN; m * n];
                            amx_int8_matmul(TilePath::Scalar, &mut ys, &x, &w, bias, m);
                            assert_close_to_sum_scale(&what, &ys, &y0, &x, &w_eff, bias, m, n, k, 1e-5);
                            if amx {
                                let mut ya = vec![f32::NAN; m * n];
                                amx_int8_matmul(TilePath::Amx, &mut ya, &x, &w, bias, m);
                                let bits = |y: &[f32]| y.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                                assert_eq!(bits(&ya), bits(&ys), "{what}: AMX tiles differ from the scalar twin");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn int8_activation_rounding_error() {
        // The kernel (int8 activations per 32 block) against the f64 product with the f32
        // activations, Gaussian and with a few 20× outlier channels, on a 3072 × 768 shape.
        let (n, k) = (3072, 768);
        let w = random_weight(21, n, k, false);
        let wd = dense(&w);
        let mut r = rng(22);
        for outliers in [false, true] {
            let mut x = randn(&mut r, k, 1.0);
            if outliers {
                (0..k).step_by(97).for_each(|i| x[i] *= 20.0);
            }
            let mut y = vec![0.0; n];
            int8_weight_matmul(&mut y, &x, &w, None, 1);
            let y0: Vec<f32> = wd
                .chunks_exact(k)
                .map(|row| row.iter().zip(&x).map(|(&a, &b)| a * b as f64).sum::<f64>() as f32)
                .collect();
            let e = rel_err(&y, &y0);
            eprintln!("int8 vs f32 activations, outliers {outliers}: relative error {e:.2e}");
            assert!(e < 2e-2, "outliers {outliers}: {e}");
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
