//! Int4 prefill in panels of 16 weight rows: one `vpdpbusd` lane per output row.
//!
//! [`super::int4`]'s block dots give each 32-block four i32 lanes per output row, so every four
//! blocks of every (activation row, weight row) pair pay a convert, a multiply and an FMA for two
//! `vpdpbusd`. Here, as in llama.cpp's repacked Q4_0 GEMM, 16 weight rows share a register: lane
//! i holds row i's 4 codes, the 4 activations they meet are broadcast, and a block's dot for 16
//! rows is 8 `vpdpbusd` followed by the same three float ops, a quarter of the float work.
//!
//! The panel is packed per call, the way a BLAS GEMM packs B: a task copies its 16 rows' codes
//! dword by dword into `[block][dword][row]` and converts their scales, then runs every
//! activation row against it from L1. So the checkpoint layout stays as it is and no second copy
//! of the weights is kept. Dword `c` of a row's block holds elements `8c, 8c+2, 8c+4, 8c+6` in
//! its low nibbles and `8c+1, …, 8c+7` in its high ones, so the activations of every 8 elements
//! are stored evens first, then odds ([`PanelActs`]).
//!
//! Numerics are [`super::int4`]'s (the same int8 activation blocks and exact i32 dots); only the
//! f32 sums run in a different order. [`panel_matmul`] has a scalar twin ([`ScalarLanes`]) that
//! does the same operations in the same order, so the two agree bit for bit.
#![allow(clippy::needless_range_loop)]

use rayon::prelude::*;

use super::actq::quantize_row;
use super::int4::quantize_block;
use super::qsimd::I4_BLOCK;
use super::Int4Weight;
use crate::kernels::SendPtr;

/// Weight rows per panel: the 16 i32 lanes of a 512-bit register.
pub(super) const PANEL_ROWS: usize = 16;
/// Activation rows from which the panels pay for their packing (below it: the block dots).
pub(super) const PANEL_MIN_M: usize = 4;
/// Activation rows run against a panel at once (their accumulators stay in registers).
const ACT_ROWS: usize = 4;

/// Activation rows rounded to int8 per 32-block, each 8 elements reordered evens then odds.
pub(super) struct PanelActs {
    /// `[m, k]`.
    q: Vec<i8>,
    /// `[m, k/32]`: `sx_b`.
    sx: Vec<f32>,
    /// `[m, k/group]`: `Σ_{b∈g} sx_b·Σxq_b`, which the zeros multiply.
    zsum: Vec<f32>,
}

pub(super) fn panel_acts(inp: &[f32], w: &Int4Weight, m: usize) -> PanelActs {
    let (k, nb, gpr) = (w.k, w.k / I4_BLOCK, w.groups_per_row());
    let mut a = PanelActs { q: vec![0; m * k], sx: vec![0.0; m * nb], zsum: vec![0.0; m * gpr] };
    let rows = a.q.par_chunks_mut(k).zip(a.sx.par_chunks_mut(nb)).zip(a.zsum.par_chunks_mut(gpr));
    rows.zip(inp.par_chunks(k)).for_each(|(((qr, sxr), zr), x)| {
        let mut q = [0i8; I4_BLOCK];
        for b in 0..nb {
            let sx = quantize_block(quantize_row, x, w.act_scale.as_deref(), b, &mut q);
            let dst = &mut qr[b * I4_BLOCK..][..I4_BLOCK];
            for (d8, q8) in dst.chunks_exact_mut(8).zip(q.chunks_exact(8)) {
                for j in 0..4 {
                    d8[j] = q8[2 * j];
                    d8[4 + j] = q8[2 * j + 1];
                }
            }
            sxr[b] = sx;
            let xsum: i32 = q.iter().map(|&v| v as i32).sum();
            zr[b * I4_BLOCK / w.group] += sx * xsum as f32;
        }
    });
    a
}

/// 16 weight rows from `o0`, packed for the lanes (rows past `n` are zero codes, scales, zeros).
struct Panel {
    /// `[k/32, 4, 16]`: dword `c` of row `i`'s block `b` at `(b·4 + c)·16 + i`.
    codes: Vec<u32>,
    /// `[k/group, 16]`: `s_g` and `z_g·s_g` of each row.
    s: Vec<f32>,
    zs: Vec<f32>,
}

impl Panel {
    fn new(w: &Int4Weight) -> Panel {
        let gpr = w.groups_per_row();
        Panel { codes: vec![0; w.k / 8 * PANEL_ROWS], s: vec![0.0; gpr * PANEL_ROWS], zs: vec![0.0; gpr * PANEL_ROWS] }
    }

    fn pack(&mut self, w: &Int4Weight, o0: usize, scratch: &mut [f32]) {
        let (k, gpr) = (w.k, w.groups_per_row());
        let rows = PANEL_ROWS.min(w.n - o0);
        if rows < PANEL_ROWS {
            self.codes.fill(0);
            self.s.fill(0.0);
            self.zs.fill(0.0);
        }
        let (s, z) = scratch.split_at_mut(gpr);
        for i in 0..rows {
            let row = &w.packed[(o0 + i) * k / 2..][..k / 2];
            for (d, c4) in row.chunks_exact(4).enumerate() {
                self.codes[d * PANEL_ROWS + i] = u32::from_le_bytes([c4[0], c4[1], c4[2], c4[3]]);
            }
            let g = (o0 + i) * gpr..(o0 + i + 1) * gpr;
            half::slice::HalfFloatSliceExt::convert_to_f32_slice(&w.scale[g.clone()], s);
            half::slice::HalfFloatSliceExt::convert_to_f32_slice(&w.zero[g], &mut z[..gpr]);
            for j in 0..gpr {
                self.s[j * PANEL_ROWS + i] = s[j];
                self.zs[j * PANEL_ROWS + i] = z[j] * s[j];
            }
        }
    }
}

/// 16 lanes of one panel's arithmetic: a 512-bit register, or the scalar twin.
pub(super) trait PanelLanes {
    /// 16 lanes of 4 codes each.
    type Q: Copy;
    type I: Copy;
    type V: Copy;
    /// The low and high nibbles of the 16 dwords at `p`.
    unsafe fn unpack(p: *const u32) -> (Self::Q, Self::Q);
    unsafe fn izero() -> Self::I;
    /// `acc + Σ_t q[lane][t]·x[t]`, the 4 activations at `x` in every lane.
    unsafe fn dot4(acc: Self::I, q: Self::Q, x: *const i8) -> Self::I;
    unsafe fn cvt(d: Self::I) -> Self::V;
    unsafe fn zero() -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    unsafe fn splat(v: f32) -> Self::V;
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    /// `a·b + c`, rounded once.
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// `c − a·b`, rounded once.
    unsafe fn fnma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn store(v: Self::V, p: *mut f32);
}

/// The 16 lanes in plain Rust, in the order the SIMD path runs them.
pub(super) struct ScalarLanes;

impl PanelLanes for ScalarLanes {
    type Q = [[u8; 4]; 16];
    type I = [i32; 16];
    type V = [f32; 16];
    unsafe fn unpack(p: *const u32) -> (Self::Q, Self::Q) {
        let (mut lo, mut hi) = ([[0u8; 4]; 16], [[0u8; 4]; 16]);
        for i in 0..16 {
            let b = (*p.add(i)).to_le_bytes();
            for t in 0..4 {
                lo[i][t] = b[t] & 0x0F;
                hi[i][t] = b[t] >> 4;
            }
        }
        (lo, hi)
    }
    unsafe fn izero() -> Self::I {
        [0; 16]
    }
    unsafe fn dot4(mut acc: Self::I, q: Self::Q, x: *const i8) -> Self::I {
        for i in 0..16 {
            for t in 0..4 {
                acc[i] += q[i][t] as i32 * *x.add(t) as i32;
            }
        }
        acc
    }
    unsafe fn cvt(d: Self::I) -> Self::V {
        d.map(|v| v as f32)
    }
    unsafe fn zero() -> Self::V {
        [0.0; 16]
    }
    unsafe fn load(p: *const f32) -> Self::V {
        std::array::from_fn(|i| *p.add(i))
    }
    unsafe fn splat(v: f32) -> Self::V {
        [v; 16]
    }
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i] * b[i])
    }
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i].mul_add(b[i], c[i]))
    }
    unsafe fn fnma(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        std::array::from_fn(|i| (-a[i]).mul_add(b[i], c[i]))
    }
    unsafe fn store(v: Self::V, p: *mut f32) {
        std::ptr::copy_nonoverlapping(v.as_ptr(), p, 16)
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::PanelLanes;
    use std::arch::x86_64::*;

    /// AVX512-VNNI: `vpdpbusd` of the panel's u8 codes with a broadcast dword of activations.
    pub(in crate::quant) struct VnniLanes;

    impl PanelLanes for VnniLanes {
        type Q = __m512i;
        type I = __m512i;
        type V = __m512;
        #[inline(always)]
        unsafe fn unpack(p: *const u32) -> (__m512i, __m512i) {
            let (v, m) = (_mm512_loadu_si512(p as *const __m512i), _mm512_set1_epi8(0x0F));
            (_mm512_and_si512(v, m), _mm512_and_si512(_mm512_srli_epi16::<4>(v), m))
        }
        #[inline(always)]
        unsafe fn izero() -> __m512i {
            _mm512_setzero_si512()
        }
        #[inline(always)]
        unsafe fn dot4(acc: __m512i, q: __m512i, x: *const i8) -> __m512i {
            _mm512_dpbusd_epi32(acc, q, _mm512_set1_epi32((x as *const i32).read_unaligned()))
        }
        #[inline(always)]
        unsafe fn cvt(d: __m512i) -> __m512 {
            _mm512_cvtepi32_ps(d)
        }
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn splat(v: f32) -> __m512 {
            _mm512_set1_ps(v)
        }
        #[inline(always)]
        unsafe fn mul(a: __m512, b: __m512) -> __m512 {
            _mm512_mul_ps(a, b)
        }
        #[inline(always)]
        unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
            _mm512_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn fnma(a: __m512, b: __m512, c: __m512) -> __m512 {
            _mm512_fnmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn store(v: __m512, p: *mut f32) {
            _mm512_storeu_ps(p, v)
        }
    }
}

/// What a task reads: the activations and the shape.
struct Ctx<'a> {
    a: &'a PanelActs,
    k: usize,
    nb: usize,
    gpr: usize,
    /// Blocks per group: 1, 2 or 4.
    bpg: usize,
}

/// `R` activation rows from `r0` against the panel, into 16 lanes each:
/// `Σ_g (s_g·Σ_{b∈g} sx_b·dot_b − z_g·s_g·zsum_g)` (group 32: `s_g·sx_b` first, one FMA a block).
#[inline(always)]
unsafe fn panel_rows<L: PanelLanes, const R: usize>(p: &Panel, c: &Ctx, r0: usize) -> [L::V; R] {
    // No closures or array maps here: they would not inherit the caller's target features, and
    // the intrinsics in them would become calls.
    let mut acc = [L::zero(); R];
    let (xq, sx, zsum) =
        (c.a.q.as_ptr().add(r0 * c.k), c.a.sx.as_ptr().add(r0 * c.nb), c.a.zsum.as_ptr().add(r0 * c.gpr));
    for g in 0..c.gpr {
        let s = L::load(p.s.as_ptr().add(g * PANEL_ROWS));
        let mut gacc = [L::zero(); R];
        for b in g * c.bpg..(g + 1) * c.bpg {
            let codes = p.codes.as_ptr().add(b * 4 * PANEL_ROWS);
            let (lo0, hi0) = L::unpack(codes);
            let (lo1, hi1) = L::unpack(codes.add(PANEL_ROWS));
            let (lo2, hi2) = L::unpack(codes.add(2 * PANEL_ROWS));
            let (lo3, hi3) = L::unpack(codes.add(3 * PANEL_ROWS));
            for r in 0..R {
                let x = xq.add(r * c.k + b * I4_BLOCK);
                let mut d = L::dot4(L::izero(), lo0, x);
                d = L::dot4(d, hi0, x.add(4));
                d = L::dot4(d, lo1, x.add(8));
                d = L::dot4(d, hi1, x.add(12));
                d = L::dot4(d, lo2, x.add(16));
                d = L::dot4(d, hi2, x.add(20));
                d = L::dot4(d, lo3, x.add(24));
                d = L::dot4(d, hi3, x.add(28));
                let sxb = L::splat(*sx.add(r * c.nb + b));
                if c.bpg == 1 {
                    acc[r] = L::fma(L::cvt(d), L::mul(s, sxb), acc[r]);
                } else {
                    gacc[r] = L::fma(L::cvt(d), sxb, gacc[r]);
                }
            }
        }
        let zs = L::load(p.zs.as_ptr().add(g * PANEL_ROWS));
        for r in 0..R {
            if c.bpg > 1 {
                acc[r] = L::fma(gacc[r], s, acc[r]);
            }
            acc[r] = L::fnma(zs, L::splat(*zsum.add(r * c.gpr + g)), acc[r]);
        }
    }
    acc
}

/// Every activation row against the panel of rows `o0..`, four at a time, bias added.
#[inline(always)]
unsafe fn panel_task<L: PanelLanes>(
    p: &Panel,
    c: &Ctx,
    out: SendPtr,
    n: usize,
    m: usize,
    o0: usize,
    bias: Option<&[f32]>,
) {
    let rows = PANEL_ROWS.min(n - o0);
    let mut lanes = [0.0f32; PANEL_ROWS];
    let mut r0 = 0;
    while r0 < m {
        let four = r0 + ACT_ROWS <= m;
        let mut v = [L::zero(); ACT_ROWS];
        if four {
            v = panel_rows::<L, ACT_ROWS>(p, c, r0);
        } else {
            v[0] = panel_rows::<L, 1>(p, c, r0)[0];
        }
        for r in 0..if four { ACT_ROWS } else { 1 } {
            L::store(v[r], lanes.as_mut_ptr());
            for i in 0..rows {
                // SAFETY (caller): out is m·n long and only this task writes columns o0..o0+rows.
                *out.0.add((r0 + r) * n + o0 + i) = lanes[i] + bias.map_or(0.0, |b| b[o0 + i]);
            }
        }
        r0 += if four { ACT_ROWS } else { 1 };
    }
}

/// Which lanes [`panel_matmul`] runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum PanelPath {
    Vnni,
    /// The twin the tests hold the SIMD lanes to.
    #[cfg_attr(not(test), allow(dead_code))]
    Scalar,
}

/// `out[m, n] = int4(inp) · Wᵀ + bias` in panels of 16 rows, each a task. The caller checked
/// the operands (as [`super::int4_matmul_isa`] does) and, for `Vnni`, the CPU.
pub(super) fn panel_matmul(
    path: PanelPath,
    out: &mut [f32],
    inp: &[f32],
    w: &Int4Weight,
    bias: Option<&[f32]>,
    m: usize,
) {
    let a = panel_acts(inp, w, m);
    let c = Ctx { a: &a, k: w.k, nb: w.k / I4_BLOCK, gpr: w.groups_per_row(), bpg: w.group / I4_BLOCK };
    let dst = SendPtr(out.as_mut_ptr());
    let n = w.n;
    (0..n.div_ceil(PANEL_ROWS)).into_par_iter().for_each_init(
        || (Panel::new(w), vec![0.0f32; 2 * w.groups_per_row()]),
        |(p, scratch), t| {
            let o0 = t * PANEL_ROWS;
            p.pack(w, o0, scratch);
            // SAFETY: out is m·n long and tile t writes only its columns; Vnni only where detected.
            unsafe {
                match path {
                    #[cfg(target_arch = "x86_64")]
                    PanelPath::Vnni => panel_task_vnni(p, &c, dst, n, m, o0, bias),
                    _ => panel_task::<ScalarLanes>(p, &c, dst, n, m, o0, bias),
                }
            }
        },
    );
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma")]
unsafe fn panel_task_vnni(p: &Panel, c: &Ctx, out: SendPtr, n: usize, m: usize, o0: usize, bias: Option<&[f32]>) {
    unsafe { panel_task::<x86::VnniLanes>(p, c, out, n, m, o0, bias) }
}
