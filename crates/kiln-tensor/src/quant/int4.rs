//! Grouped asymmetric int4 linear layer: `out[r, o] = Σ_i x'[r, i] · (q[o, i] − z[o, g]) · s[o, g] + b[o]`
//! with `g = i / group` and `x' = x / act_scale`.
//!
//! Prefill and decode both run llama.cpp's Q4_0 × Q8_0 numerics: each row of `x'` is rounded to
//! int8 per block of 32 (`sx_b = max|x'_b| / 127`, round half to even, as
//! [`quantize_activations`]), each weight row's 32-block is multiplied by it exactly in i32
//! (`dot_b = Σ q·xq`, see [`I4Dot`]), and `out = Σ_b s_g·(sx_b·dot_b − z_g·sx_b·Σxq_b) + bias`
//! in f32. That makes the multiply integer (half a byte of weight and one byte of activation per
//! element) instead of two f32 FMAs per element, and a prompt's rows get the same numbers as the
//! tokens decoded after it. Against the f32-activation product the rounding costs, as relative
//! error (‖Δ‖₂/‖y‖₂) on a 3072 × 768 group-32 product, 3.5e-3 for Gaussian activations and
//! 1.0e-2 with a few 20× outlier channels (`int4_activation_rounding_error`).
// Register arrays are indexed by row and unroll slot, the way the SIMD loops read.
#![allow(clippy::needless_range_loop)]

use super::actq::{quantize_row, quantize_row_scalar};
use super::amx::{amx_int4_matmul, amx_int8_usable, TilePath, AMX_INT4_MIN_M};
use super::int4_panels::{panel_matmul, PanelPath, PANEL_MIN_M};
use super::qsimd::{I4Dot, ScalarDot, I4_BLOCK, PREFETCH_BYTES};
use super::{check_operands, for_row_blocks, DotPath, Int4Weight, GEMV_MAX_ROWS};
use crate::kernels::{GemvLayout, SendPtr};
use crate::simd::Isa;

/// Int4, scalar and f64, straight from the definition: on the activations rounded to int8 per
/// 32 block, `Σ_b s_g·sx_b·(dot_b − z_g·Σxq_b)` with exact i32 `dot_b` and f64 arithmetic on
/// the f16/f32 scales.
pub fn int4_matmul_reference(out: &mut [f32], inp: &[f32], w: &Int4Weight, bias: Option<&[f32]>, m: usize) {
    let (n, k) = (w.n, w.k);
    check_operands(out, inp, n, k, bias, m);
    let gpr = w.groups_per_row();
    let act = w.act_scale.as_deref();
    let mut xq = vec![0i8; k];
    let mut sx = vec![0.0f32; k / I4_BLOCK];
    for r in 0..m {
        for (b, (q, s)) in xq.chunks_exact_mut(I4_BLOCK).zip(&mut sx).enumerate() {
            *s = quantize_block(quantize_row_scalar, &inp[r * k..(r + 1) * k], act, b, q);
        }
        for o in 0..n {
            let mut acc = bias.map_or(0.0, |b| b[o] as f64);
            for (b, &s_x) in sx.iter().enumerate() {
                let g = o * gpr + b * I4_BLOCK / w.group;
                let is = b * I4_BLOCK..(b + 1) * I4_BLOCK;
                let dot: i32 = is.clone().map(|i| w.code(o, i) as i32 * xq[i] as i32).sum();
                let xsum: i32 = is.map(|i| xq[i] as i32).sum();
                let (sg, zg) = (w.scale[g].to_f64(), w.zero[g].to_f64());
                acc += sg * s_x as f64 * (dot as f64 - zg * xsum as f64);
            }
            out[r * n + o] = acc as f32;
        }
    }
}

/// Block `b` of the row `x` divided by `act_scale`, rounded to int8 in element order into `q`
/// by `round` (the definition in the reference, its SIMD twin in the kernels); returns `sx_b`.
pub(super) fn quantize_block(round: RowRounding, x: &[f32], act: Option<&[f32]>, b: usize, q: &mut [i8]) -> f32 {
    let is = b * I4_BLOCK..(b + 1) * I4_BLOCK;
    round(&x[is.clone()], act.map(|s| &s[is]), q)
}

type RowRounding = fn(&[f32], Option<&[f32]>, &mut [i8]) -> f32;

/// Int4 on all rayon threads with the widest instruction set this CPU has.
///
/// # Panics
/// If `inp` is not `m·k`, `out` not `m·n`, `bias` not `n` long, or the weight's parts do not
/// match its shape (see [`Int4Weight::validate`]).
pub fn int4_matmul(out: &mut [f32], inp: &[f32], w: &Int4Weight, bias: Option<&[f32]>, m: usize) {
    int4_matmul_isa(Isa::detect(), out, inp, w, bias, m)
}

/// [`int4_matmul`] on a given instruction set (tests and comparisons).
pub fn int4_matmul_isa(isa: Isa, out: &mut [f32], inp: &[f32], w: &Int4Weight, bias: Option<&[f32]>, m: usize) {
    let (n, k) = (w.n, w.k);
    check_operands(out, inp, n, k, bias, m);
    assert!(
        matches!(w.group, 32 | 64 | 128) && k.is_multiple_of(w.group),
        "int4 weight: group {} must be 32, 64 or 128 and divide k = {k}",
        w.group
    );
    let gn = n * w.groups_per_row();
    assert!(
        w.packed.len() == n * k / 2 && w.scale.len() == gn && w.zero.len() == gn,
        "int4 weight: parts do not match n, k, group"
    );
    if m == 0 || n == 0 {
        return;
    }
    let path = DotPath::for_isa(isa);
    if path == DotPath::Vnni && m >= AMX_INT4_MIN_M && amx_int8_usable() && forced().is_none() {
        return amx_int4_matmul(TilePath::Amx, out, inp, w, bias, m);
    }
    if path == DotPath::Vnni && m >= PANEL_MIN_M && forced() != Some(Int4Forced::Blocks) {
        return panel_matmul(PanelPath::Vnni, out, inp, w, bias, m);
    }
    int4_block_dots(path, out, inp, w, bias, m)
}

/// Which prefill kernel `KILN_INT4` keeps int4 on (A/B runs): `blocks` the block dots,
/// `panels` the VNNI panels where AMX tiles would run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Int4Forced {
    Blocks,
    Panels,
}

fn forced() -> Option<Int4Forced> {
    static FORCED: std::sync::OnceLock<Option<Int4Forced>> = std::sync::OnceLock::new();
    *FORCED.get_or_init(|| match std::env::var("KILN_INT4").as_deref() {
        Ok("blocks") => Some(Int4Forced::Blocks),
        Ok("panels") => Some(Int4Forced::Panels),
        _ => None,
    })
}

/// Activation rows quantized per 32-block, laid out for [`I4Dot`].
struct BlockActs {
    /// Blocks per row, `k / 32`, and block pairs per row (the last may hold one block).
    nb: usize,
    pairs: usize,
    /// `[m, pairs·64]`: per four blocks ([`act_offsets`]: "quad layout"), their 16 even
    /// elements each, then their odd ones; blocks past the last whole four per pair, block b's
    /// 16 even elements, block b+1's, then their odd ones ("pair layout"; a missing b+1 is zeros).
    q: Vec<i8>,
    /// `[m, pairs, 8]`: `sx_b` four times, then `sx_{b+1}` four times (0 for a missing block).
    sx: Vec<f32>,
    /// `[m, gpr8]`: `Σ_{b∈g} sx_b·Σxq_b`, which the zeros multiply, each row padded with zeros
    /// to `gpr8`, the groups per row rounded up to 8, so it is read 8 at a time.
    zsum: Vec<f32>,
    gpr8: usize,
}

fn block_acts(inp: &[f32], w: &Int4Weight, m: usize) -> BlockActs {
    let (k, gpr) = (w.k, w.groups_per_row());
    let gpr8 = gpr.next_multiple_of(8);
    let nb = k / I4_BLOCK;
    let pairs = nb.div_ceil(2);
    let mut a = BlockActs {
        nb,
        pairs,
        q: vec![0i8; m * pairs * 2 * I4_BLOCK],
        sx: vec![0.0; m * pairs * 8],
        zsum: vec![0.0; m * gpr8],
        gpr8,
    };
    let mut q = [0i8; I4_BLOCK];
    for r in 0..m {
        let x = &inp[r * k..(r + 1) * k];
        let row = &mut a.q[r * pairs * 2 * I4_BLOCK..][..pairs * 2 * I4_BLOCK];
        for b in 0..nb {
            let sx = quantize_block(quantize_row, x, w.act_scale.as_deref(), b, &mut q);
            let (p, h) = (r * pairs + b / 2, b % 2);
            let (even, odd) = act_offsets(b, nb);
            for j in 0..I4_BLOCK / 2 {
                row[even + j] = q[2 * j];
                row[odd + j] = q[2 * j + 1];
            }
            a.sx[p * 8 + 4 * h..][..4].fill(sx);
            let xsum: i32 = q.iter().map(|&v| v as i32).sum();
            a.zsum[r * gpr8 + b * I4_BLOCK / w.group] += sx * xsum as f32;
        }
    }
    a
}

/// Where block `b` of a row of `nb` blocks keeps its 16 even and 16 odd activation codes in
/// [`BlockActs::q`]: quad layout within the whole fours, pair layout after them.
fn act_offsets(b: usize, nb: usize) -> (usize, usize) {
    if b < nb / 4 * 4 {
        let (quad, i) = (b / 4, b % 4);
        (quad * 128 + 16 * i, quad * 128 + 64 + 16 * i)
    } else {
        let (pair, h) = (b / 2, b % 2);
        (pair * 64 + 16 * h, pair * 64 + 32 + 16 * h)
    }
}

/// The rows quantized once per call, then output rows split over the threads; each task runs
/// four activation rows at a time against its weight rows, which stay in L2 between them.
fn int4_block_dots(path: DotPath, out: &mut [f32], inp: &[f32], w: &Int4Weight, bias: Option<&[f32]>, m: usize) {
    let a = block_acts(inp, w, m);
    let dst = SendPtr(out.as_mut_ptr());
    let a = &a;
    let gpr = w.groups_per_row();
    // The x86 paths convert the f16 scales with F16C, which every AVX2 CPU we know of has.
    let path = if path == DotPath::Scalar || has_f16c() { path } else { DotPath::Scalar };
    for_row_blocks(w.n, w.k / 2, |o0, o1| {
        // Four weight rows' scales and zeros, and 8 more read past the last (finite: zeros or older rows).
        let mut gs = GroupScales { s: vec![0.0; 4 * gpr + 8], z: vec![0.0; 4 * gpr + 8] };
        for r0 in (0..m).step_by(GEMV_MAX_ROWS) {
            let rows = GEMV_MAX_ROWS.min(m - r0);
            // SAFETY: out is m·n long (checked by the caller) and this task writes only columns o0..o1.
            unsafe { gemv_i4q_on(path, dst, a, w, bias, r0, rows, o0, o1, &mut gs) }
        }
    });
}

fn has_f16c() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Four weight rows' scales and zeros as f32, `[4, gpr]` and 8 finite values more: a row's
/// groups are read 8 at a time against [`BlockActs::zsum`], whose zero padding cancels what
/// lies past them.
struct GroupScales {
    s: Vec<f32>,
    z: Vec<f32>,
}

/// Output rows `o0..o1` for the `R` activation rows from `r0`, `G32` when a group is one block.
/// Four weight rows at a time: their scales and zeros to f32 in `gs` (converted next to the
/// rows they scale, so a cold decode streams both together), then [`weight_rows_dots`]: one
/// weight row at a time against the `R` rows, or, for one activation row (decode), the four
/// weight rows side by side (measured on the Xeon: gpt-s int4 decode +11-13%). Four weight rows'
/// lane sums are reduced together, then the bias added.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn gemv_i4q_rows<D: I4Dot, const R: usize, const G32: bool>(
    out: SendPtr,
    a: &BlockActs,
    w: &Int4Weight,
    bias: Option<&[f32]>,
    r0: usize,
    o0: usize,
    o1: usize,
    gs: &mut GroupScales,
) {
    let (n, k, gpr, gpr8) = (w.n, w.k, w.groups_per_row(), a.gpr8);
    let (nb, pairs) = (a.nb, a.pairs);
    // Pairs per group: 1 (group 64) or 2 (group 128); unused for group 32.
    let pshift = (w.group / (2 * I4_BLOCK)).max(1).trailing_zeros();
    let (xrow, sxrow) = (pairs * 2 * I4_BLOCK, pairs * 8);
    let (xp, sxp) = (a.q.as_ptr().add(r0 * xrow), a.sx.as_ptr().add(r0 * sxrow));
    let (zsump, out) = (a.zsum.as_ptr().add(r0 * gpr8), SendPtr(out.0.add(r0 * n)));
    assert!(gs.s.len() == 4 * gpr + 8 && gs.z.len() == gs.s.len());
    let one_stream = GemvLayout::detect() == GemvLayout::OneRow;
    let mut o4 = o0;
    while o4 < o1 {
        let rows = 4.min(o1 - o4);
        // F16C inline: `half`'s slice conversion, a call per 8 values, took a quarter of a decode.
        let g = o4 * gpr..(o4 + rows) * gpr;
        D::f16_to_f32(&w.scale[g.clone()], &mut gs.s[..rows * gpr]);
        D::f16_to_f32(&w.zero[g], &mut gs.z[..rows * gpr]);
        let mut tot = [[D::zero(); 4]; R];
        let ctx = RowCtx { xp, sxp, zsump, xrow, sxrow, gpr8, nb, pairs, pshift, group: w.group };
        let qp = |j: usize| w.packed.as_ptr().add((o4 + j) * k / 2);
        let (sp, zp) = (|j: usize| gs.s.as_ptr().add(j * gpr), |j: usize| gs.z.as_ptr().add(j * gpr));
        if R == 1 && rows == 4 && !one_stream {
            // Decode: four weight rows side by side, each activation vector loaded once for them
            // (one row at a time where `GemvLayout` says so: AMD).
            let t = weight_rows_dots::<D, R, 4, G32>(
                [0, 1, 2, 3].map(qp),
                [0, 1, 2, 3].map(sp),
                [0, 1, 2, 3].map(zp),
                &ctx,
            );
            tot[0] = t[0];
        } else {
            for j in 0..rows {
                let t = weight_rows_dots::<D, R, 1, G32>([qp(j)], [sp(j)], [zp(j)], &ctx);
                for r in 0..R {
                    tot[r][j] = t[r][0];
                }
            }
        }
        for r in 0..R {
            let sums = D::hsum4(tot[r]);
            for j in 0..rows {
                // SAFETY (caller): out is m·n long and only this task writes columns o0..o1.
                *out.0.add(r * n + o4 + j) = sums[j] + bias.map_or(0.0, |b| b[o4 + j]);
            }
        }
        o4 += rows;
    }
}

/// A task's activation rows as [`weight_rows_dots`] reads them.
struct RowCtx {
    /// Codes, activation scales and zero-point sums of the first activation row.
    xp: *const i8,
    sxp: *const f32,
    zsump: *const f32,
    xrow: usize,
    sxrow: usize,
    gpr8: usize,
    nb: usize,
    pairs: usize,
    /// log2 of the pairs per group (group 64 or 128).
    pshift: u32,
    group: usize,
}

/// `J` weight rows (codes at `qp`, f32 scales and zeros at `sp`, `zp`) against `R` activation
/// rows: per block pair the exact dots as f32 lanes, times `sx_b`, times `s_g` into an
/// accumulator per (activation, weight) row, less `Σ_g z_g·s_g·zsum_g` taken 8 groups at a
/// time; the lane sums are left to the caller.
#[inline(always)]
unsafe fn weight_rows_dots<D: I4Dot, const R: usize, const J: usize, const G32: bool>(
    qp: [*const u8; J],
    sp: [*const f32; J],
    zp: [*const f32; J],
    c: &RowCtx,
) -> [[D::V; J]; R] {
    // −Σ_g z_g·s_g·zsum_g first, a chain of its own that overlaps the dots.
    let mut zneg = [[D::zero(); J]; R];
    for r in 0..R {
        for j in 0..J {
            let mut g = 0;
            while g < c.gpr8 {
                zneg[r][j] = D::sub_products8(zp[j].add(g), sp[j].add(g), c.zsump.add(r * c.gpr8 + g), zneg[r][j]);
                g += 8;
            }
        }
    }
    let mut acc4 = [[D::zero4(); J]; R];
    let full = c.nb / 2;
    let mut p = 0;
    // Whole fours of blocks (quad layout), then the pairs and block left (pair layout).
    while p + 2 <= full {
        let mut q4 = [D::unpack4(qp[0].add(p * I4_BLOCK)); J];
        let mut s4 = [D::scales4(0.0, 0.0); J];
        for j in 0..J {
            // Never dereferenced, so it may point past the weights.
            D::prefetch(qp[j].wrapping_add(p * I4_BLOCK + PREFETCH_BYTES));
            q4[j] = D::unpack4(qp[j].add(p * I4_BLOCK));
            s4[j] = if G32 {
                D::scales4_g32(sp[j].add(2 * p))
            } else {
                D::scales4(*sp[j].add(p >> c.pshift), *sp[j].add((p + 1) >> c.pshift))
            };
        }
        for r in 0..R {
            let (x, sx) = (c.xp.add(r * c.xrow + p * 2 * I4_BLOCK), c.sxp.add(r * c.sxrow + p * 8));
            for j in 0..J {
                acc4[r][j] = D::quad(q4[j], x, sx, s4[j], acc4[r][j]);
            }
        }
        p += 2;
    }
    let mut acc = [[D::zero(); J]; R];
    for r in 0..R {
        for j in 0..J {
            acc[r][j] = D::fold4(acc4[r][j]);
        }
    }
    while p < c.pairs {
        // One pair left, and/or one block (odd k/32) whose scale fills both halves.
        for j in 0..J {
            let (q0, s0) = if p < full {
                let s = if G32 { D::splat2(sp[j].add(2 * p)) } else { D::splat(*sp[j].add(p >> c.pshift)) };
                (D::unpack(qp[j].add(p * I4_BLOCK)), s)
            } else {
                (D::unpack_one(qp[j].add(p * I4_BLOCK)), D::splat(*sp[j].add((2 * p * I4_BLOCK) / c.group)))
            };
            for r in 0..R {
                let (x, sx) = (c.xp.add(r * c.xrow + p * 2 * I4_BLOCK), c.sxp.add(r * c.sxrow + p * 8));
                acc[r][j] = D::fma(D::mul(D::dots(q0, x, x.add(I4_BLOCK)), D::load(sx)), s0, acc[r][j]);
            }
        }
        p += 1;
    }
    for r in 0..R {
        for j in 0..J {
            acc[r][j] = D::add(acc[r][j], zneg[r][j]);
        }
    }
    acc
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn gemv_i4q<D: I4Dot>(
    out: SendPtr,
    a: &BlockActs,
    w: &Int4Weight,
    bias: Option<&[f32]>,
    r0: usize,
    m: usize,
    o0: usize,
    o1: usize,
    gs: &mut GroupScales,
) {
    match (m, w.group == I4_BLOCK) {
        (1, true) => gemv_i4q_rows::<D, 1, true>(out, a, w, bias, r0, o0, o1, gs),
        (1, false) => gemv_i4q_rows::<D, 1, false>(out, a, w, bias, r0, o0, o1, gs),
        (2, true) => gemv_i4q_rows::<D, 2, true>(out, a, w, bias, r0, o0, o1, gs),
        (2, false) => gemv_i4q_rows::<D, 2, false>(out, a, w, bias, r0, o0, o1, gs),
        (3, true) => gemv_i4q_rows::<D, 3, true>(out, a, w, bias, r0, o0, o1, gs),
        (3, false) => gemv_i4q_rows::<D, 3, false>(out, a, w, bias, r0, o0, o1, gs),
        (_, true) => gemv_i4q_rows::<D, 4, true>(out, a, w, bias, r0, o0, o1, gs),
        (_, false) => gemv_i4q_rows::<D, 4, false>(out, a, w, bias, r0, o0, o1, gs),
    }
}

/// Runs [`gemv_i4q`] with the block products of `path`, compiled for its target features.
#[allow(clippy::too_many_arguments)]
unsafe fn gemv_i4q_on(
    path: DotPath,
    out: SendPtr,
    a: &BlockActs,
    w: &Int4Weight,
    bias: Option<&[f32]>,
    r0: usize,
    m: usize,
    o0: usize,
    o1: usize,
    gs: &mut GroupScales,
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
                    a: &BlockActs,
                    w: &Int4Weight,
                    bias: Option<&[f32]>,
                    r0: usize,
                    m: usize,
                    o0: usize,
                    o1: usize,
                    gs: &mut GroupScales,
                ) {
                    unsafe { gemv_i4q::<$d>(out, a, w, bias, r0, m, o0, o1, gs) }
                }
            };
        }
        on!(on_vnni, "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c", VnniDot);
        on!(on_avx512, "avx512f,avx512bw,avx512vl,avx2,fma,f16c", Avx512Dot);
        on!(on_avx2, "avx2,fma,f16c", Avx2Dot);
        // SAFETY: `path` comes from `DotPath::for_isa`/`all_supported`, which checked the CPU
        // (AVX2 with FMA), and `int4_block_dots` checked F16C.
        match path {
            DotPath::Vnni => return on_vnni(out, a, w, bias, r0, m, o0, o1, gs),
            DotPath::Avx512 => return on_avx512(out, a, w, bias, r0, m, o0, o1, gs),
            DotPath::Avx2 => return on_avx2(out, a, w, bias, r0, m, o0, o1, gs),
            DotPath::Scalar => {}
        }
    }
    gemv_i4q::<ScalarDot>(out, a, w, bias, r0, m, o0, o1, gs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::with_each_gemv_layout;
    use crate::quant::{assert_close_to_sum_scale, pack_int4};
    use crate::testutil::*;
    use half::f16;
    use rand::Rng;

    fn random_weight(seed: u64, n: usize, k: usize, group: usize, act: bool) -> Int4Weight {
        let mut r = rng(seed);
        let codes: Vec<u8> = (0..n * k).map(|_| r.random_range(0u8..16)).collect();
        let g = n * k / group;
        let scale = (0..g).map(|_| f16::from_f32(r.random_range(0.001f32..0.05))).collect();
        let zero = (0..g).map(|_| f16::from_f32(r.random_range(0u8..16) as f32)).collect();
        let act_scale = act.then(|| (0..k).map(|_| r.random_range(0.25f32..4.0)).collect());
        Int4Weight::from_parts(n, k, group, pack_int4(&codes), scale, zero, act_scale).unwrap()
    }

    /// The effective f64 weight `(q − z) · s / act_scale`.
    fn dense(w: &Int4Weight) -> Vec<f64> {
        let (n, k) = (w.n, w.k);
        let act = |i: usize| w.act_scale.as_ref().map_or(1.0, |s| s[i] as f64);
        let g = |o: usize, i: usize| o * w.groups_per_row() + i / w.group;
        (0..n * k)
            .map(|j| {
                let (o, i) = (j / k, j % k);
                (w.code(o, i) as f64 - w.zero[g(o, i)].to_f64()) * w.scale[g(o, i)].to_f64() / act(i)
            })
            .collect()
    }

    /// The f64 weight `(q − z) · s`, without `act_scale` (the kernel folds it into the activations).
    fn dense_no_act(w: &Int4Weight) -> Vec<f64> {
        let mut u = w.clone();
        u.act_scale = None;
        dense(&u)
    }

    /// The activations as the kernel multiplies them: `xq · sx_b` per 32 block.
    fn block_rounded(x: &[f32], w: &Int4Weight, m: usize) -> Vec<f32> {
        let k = w.k;
        let mut q = [0i8; I4_BLOCK];
        let mut y = vec![0.0; m * k];
        for r in 0..m {
            for b in 0..k / I4_BLOCK {
                let sx = quantize_block(quantize_row_scalar, &x[r * k..(r + 1) * k], w.act_scale.as_deref(), b, &mut q);
                for j in 0..I4_BLOCK {
                    y[r * k + b * I4_BLOCK + j] = q[j] as f32 * sx;
                }
            }
        }
        y
    }

    #[test]
    fn int4_fast_matches_reference() {
        for &m in &[1usize, 2, 3, 4, 5, 17] {
            for &n in &[1usize, 7, 65] {
                for &k in &[32usize, 96, 224, 576, 640] {
                    for group in [32, 64, 128].into_iter().filter(|g| k.is_multiple_of(*g)) {
                        for act in [false, true] {
                            let w = random_weight((m * 7919 + n * 31 + k + group) as u64, n, k, group, act);
                            let mut r = rng(k as u64 + 3);
                            let mut x = randn(&mut r, m * k, 2.0);
                            if m > 1 {
                                // An all-zero block rounds to zeros with scale 0.
                                x[k..k + 32].fill(0.0);
                            }
                            let b = randn(&mut r, n, 1.0);
                            // The kernel multiplies the block-rounded activations by (q − z)·s.
                            let (x_eff, w_eff) = (block_rounded(&x, &w, m), dense_no_act(&w));
                            for bias in [None, Some(&b[..])] {
                                let mut y0 = vec![0.0; m * n];
                                int4_matmul_reference(&mut y0, &x, &w, bias, m);
                                let check = |what: String, y: &[f32]| {
                                    assert_close_to_sum_scale(&what, y, &y0, &x_eff, &w_eff, bias, m, n, k, 1e-5)
                                };
                                for isa in Isa::all_supported() {
                                    let mut y = vec![f32::NAN; m * n];
                                    int4_matmul_isa(isa, &mut y, &x, &w, bias, m);
                                    check(format!("int4 {isa:?} m{m} n{n} k{k} g{group} act{act}"), &y);
                                }
                                with_each_gemv_layout(|layout| {
                                    for path in DotPath::all_supported() {
                                        let mut y = vec![f32::NAN; m * n];
                                        int4_block_dots(path, &mut y, &x, &w, bias, m);
                                        let what = format!("int4 {path:?} {layout:?} m{m} n{n} k{k} g{group} act{act}");
                                        check(what, &y);
                                    }
                                });
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn int4_panels_match_reference_and_their_scalar_twin() {
        let vnni = DotPath::all_supported().contains(&DotPath::Vnni);
        // Tails of both kinds: m not a multiple of 4 rows, n not a multiple of 16 lanes.
        for &m in &[1usize, 4, 5, 11] {
            for &n in &[1usize, 16, 33] {
                for &k in &[32usize, 224, 640] {
                    for group in [32, 64, 128].into_iter().filter(|g| k.is_multiple_of(*g)) {
                        for act in [false, true] {
                            let w = random_weight((m * 131 + n * 17 + k + group) as u64, n, k, group, act);
                            let mut r = rng(k as u64 + 11);
                            let mut x = randn(&mut r, m * k, 2.0);
                            if m > 1 {
                                x[k..k + 32].fill(0.0);
                            }
                            let b = randn(&mut r, n, 1.0);
                            let (x_eff, w_eff) = (block_rounded(&x, &w, m), dense_no_act(&w));
                            for bias in [None, Some(&b[..])] {
                                let what = format!("int4 panels m{m} n{n} k{k} g{group} act{act}");
                                let mut y0 = vec![0.0; m * n];
                                int4_matmul_reference(&mut y0, &x, &w, bias, m);
                                let mut ys = vec![f32::NAN; m * n];
                                panel_matmul(PanelPath::Scalar, &mut ys, &x, &w, bias, m);
                                assert_close_to_sum_scale(&what, &ys, &y0, &x_eff, &w_eff, bias, m, n, k, 1e-5);
                                if vnni {
                                    let mut yv = vec![f32::NAN; m * n];
                                    panel_matmul(PanelPath::Vnni, &mut yv, &x, &w, bias, m);
                                    let bits = |y: &[f32]| y.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                                    assert_eq!(bits(&yv), bits(&ys), "{what}: VNNI lanes differ from the scalar twin");
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn int4_amx_tiles_match_reference_and_their_scalar_twin() {
        let amx = amx_int8_usable();
        // Tails: m not a multiple of 16 rows, n not a multiple of 16 weight rows.
        for &m in &[16usize, 17, 40] {
            for &n in &[1usize, 16, 33] {
                for &k in &[32usize, 224, 640] {
                    for group in [32, 64, 128].into_iter().filter(|g| k.is_multiple_of(*g)) {
                        for act in [false, true] {
                            let w = random_weight((m * 131 + n * 17 + k + group) as u64, n, k, group, act);
                            let mut r = rng(k as u64 + 19);
                            let mut x = randn(&mut r, m * k, 2.0);
                            x[k..k + 32].fill(0.0);
                            let b = randn(&mut r, n, 1.0);
                            let (x_eff, w_eff) = (block_rounded(&x, &w, m), dense_no_act(&w));
                            for bias in [None, Some(&b[..])] {
                                let what = format!("int4 tiles m{m} n{n} k{k} g{group} act{act}");
                                let mut y0 = vec![0.0; m * n];
                                int4_matmul_reference(&mut y0, &x, &w, bias, m);
                                let mut ys = vec![f32::NAN; m * n];
                                amx_int4_matmul(TilePath::Scalar, &mut ys, &x, &w, bias, m);
                                assert_close_to_sum_scale(&what, &ys, &y0, &x_eff, &w_eff, bias, m, n, k, 1e-5);
                                if amx {
                                    let mut ya = vec![f32::NAN; m * n];
                                    amx_int4_matmul(TilePath::Amx, &mut ya, &x, &w, bias, m);
                                    let bits = |y: &[f32]| y.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                                    assert_eq!(bits(&ya), bits(&ys), "{what}: AMX tiles differ from the scalar twin");
                                    if group == 32 {
                                        // One block a group: the panels run the same f32 steps.
                                        let mut yp = vec![f32::NAN; m * n];
                                        panel_matmul(PanelPath::Vnni, &mut yp, &x, &w, bias, m);
                                        assert_eq!(bits(&ya), bits(&yp), "{what}: AMX tiles differ from the panels");
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn int4_activation_rounding_error() {
        // The kernel (int8 activations per 32 block) against the f64 product with the f32
        // activations: Gaussian-ish activations, and the same with a few 20× outlier channels
        // as LLM hidden states have, on a 3072 × 768 (MLP up) shape with group 32.
        let (n, k) = (3072, 768);
        let w = random_weight(21, n, k, 32, false);
        let wd = dense(&w);
        let mut r = rng(22);
        for outliers in [false, true] {
            let mut x = randn(&mut r, k, 1.0);
            if outliers {
                (0..k).step_by(97).for_each(|i| x[i] *= 20.0);
            }
            let mut y = vec![0.0; n];
            int4_matmul(&mut y, &x, &w, None, 1);
            let y0: Vec<f32> = wd
                .chunks_exact(k)
                .map(|row| row.iter().zip(&x).map(|(&a, &b)| a * b as f64).sum::<f64>() as f32)
                .collect();
            let e = rel_err(&y, &y0);
            eprintln!("int4 vs f32 activations, outliers {outliers}: relative error {e:.2e}");
            assert!(e < 2e-2, "outliers {outliers}: {e}");
        }
    }

    #[test]
    fn int4_nibble_order_is_low_first() {
        // One row, k = 32: codes 0..16 then 15..=0; zero 0, scale 1, x = e_i picks element i.
        let codes: Vec<u8> = (0..16).chain((0..16).rev()).collect();
        let w = Int4Weight::from_parts(1, 32, 32, pack_int4(&codes), vec![f16::ONE], vec![f16::ZERO], None).unwrap();
        assert_eq!(w.packed[0], 0x10);
        for i in 0..32 {
            let mut x = vec![0.0f32; 32];
            x[i] = 1.0;
            let mut y = [0.0f32];
            for isa in Isa::all_supported() {
                int4_matmul_isa(isa, &mut y, &x, &w, None, 1);
                assert_eq!(y[0], codes[i] as f32, "{isa:?} element {i}");
            }
        }
    }

    #[test]
    fn int4_is_deterministic_across_thread_counts() {
        let (n, k) = (130, 256);
        let w = random_weight(1, n, k, 64, true);
        let x = randn(&mut rng(2), 17 * k, 1.0);
        let run = |threads: usize, m: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let mut y = vec![0.0; m * n];
                int4_matmul(&mut y, &x[..m * k], &w, None, m);
                y
            })
        };
        for m in [1, 3, 17] {
            assert_eq!(run(1, m), run(3, m), "m = {m}");
        }
    }

    #[test]
    fn int4_from_parts_rejects_bad_shapes() {
        use crate::quant::QuantError;
        let ok = || (vec![0u8; 32], vec![f16::ONE; 2], vec![f16::ZERO; 2]);
        let (p, s, z) = ok();
        assert_eq!(Int4Weight::from_parts(2, 32, 48, p, s, z, None).unwrap_err(), QuantError::Group(48));
        let (p, s, z) = ok();
        assert!(matches!(Int4Weight::from_parts(2, 32, 32, p[..31].to_vec(), s, z, None), Err(QuantError::Len { .. })));
        let (p, s, z) = ok();
        assert!(matches!(Int4Weight::from_parts(2, 40, 32, p, s, z, None), Err(QuantError::GroupDivide { .. })));
        let (p, mut s, z) = ok();
        s[1] = f16::NAN;
        assert!(matches!(Int4Weight::from_parts(2, 32, 32, p, s, z, None), Err(QuantError::Value { .. })));
        let (p, s, z) = ok();
        assert!(matches!(
            Int4Weight::from_parts(2, 32, 32, p, s, z, Some(vec![0.0; 32])),
            Err(QuantError::Value { what: "act_scale", .. })
        ));
    }
}
