//! Int8 and int4 prefill on AMX tiles: `tdpbssd` multiplies 16 weight rows by 16 activation rows over
//! a 32-block (8,192 i8 products) in one instruction, where AVX512-VNNI takes 128 `vpdpbusd`.
//!
//! Weight-only numerics are [`super::int8`]'s (llama.cpp's Q8_0 × Q8_0): activations rounded
//! to int8 per 32-block, exact i32 block dots, `out = scale[o] · Σ_b sx_b · dot_b + b`. The
//! activation scale changes every block, so a tile's dots cannot run on across blocks: each
//! block's 16 × 16 i32 tile is stored and 16 AVX-512 rows add it in (convert, one FMA with the
//! 16 rows' `sx_b`). That store and epilogue, not the multiply, set the speed. W8A8 has one
//! scale per token, so its tiles sum the whole k and the epilogue runs once.
//!
//! The weights are the A operand, 16 rows of a block at the row stride, read from the
//! checkpoint as they are (a zero-padded copy only for a last partial panel or k not whole
//! blocks). The activations, quantized once per call, are packed into the B layout (dword `c`
//! of row j's block b at `(b·8 + c)·16 + j`), so C row i holds weight row i for 16 tokens and
//! the result is transposed on the way out. Packing the weights per task instead (as
//! [`super::int4_panels`] must, to unpack nibbles) took half the time of a 768 × 768 product.
//!
//! Int4 runs the same block loop with `tdpbusd` on its unsigned codes: a task unpacks its 16
//! rows' nibbles to bytes (per block the 16 low nibbles, then the 16 high ones, so the
//! activations are stored evens then odds), and each block adds `s_g·sx_b·dot` and, at a
//! group's end, subtracts `z_g·s_g·Σ sx_b·Σxq_b`, [`super::int4`]'s numerics in another order.
//!
//! [`task_scalar`] and [`int4_task_scalar`] are the twins: the same operations in the same
//! order, so they agree bit for bit. W8A8 tiles give exactly [`super::w8a8_matmul_reference`]'s bits.
#![allow(clippy::needless_range_loop)]

use rayon::prelude::*;

use super::actq::quantize_row;
use super::int4::quantize_block;
use super::qsimd::I4_BLOCK;
use super::{Int4Weight, Int8Weight};
use crate::kernels::SendPtr;

/// Rows of an A or C tile, and weight rows per panel (one C row is 16 i32).
const TILE: usize = 16;
// Activation rows from which the tiles beat the VNNI paths. A tile pass costs the same for 1
// row as for 16, so few rows lose; measured on the 2-core AMX Xeon, 3072 × 768, 2 threads
// (`int8_prefill_bench`, `int4_token_bench`), tiles against VNNI:
/// Int8 weight-only: m = 4 0.8×, m = 8 1.4×, m = 12 2.1×, m = 16 2.8×.
pub(super) const AMX_INT8_MIN_M: usize = 8;
/// W8A8 (no per-block epilogue): m = 2 0.75×, m = 4 1.15×, m = 8 2.3×.
pub(super) const AMX_W8A8_MIN_M: usize = 4;
/// Int4 (its nibbles unpacked per call): m = 16 0.78×, m = 32 1.0×, m = 48 0.84–1.15×, m = 64
/// 1.15×, m = 128 1.2–1.3× (the VNNI panels, whose packing is cheaper, below).
pub(super) const AMX_INT4_MIN_M: usize = 64;

/// Whether the CPU has AMX-TILE and AMX-INT8 and the kernel let this process use the tile
/// registers (Linux asks each process to request them, `ARCH_REQ_XCOMP_PERM`).
pub(super) fn amx_int8_usable() -> bool {
    static USABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *USABLE.get_or_init(request_amx)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_amx() -> bool {
    // CPUID.(7,0):EDX bit 24 AMX-TILE, bit 25 AMX-INT8; the epilogue needs AVX-512.
    let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
    let cpu = leaf7.edx >> 24 & 1 == 1 && leaf7.edx >> 25 & 1 == 1 && is_x86_feature_detected!("avx512bw");
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with this request only changes the process's permitted XSAVE features.
    cpu && unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) } == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn request_amx() -> bool {
    false
}

/// Activation rows rounded to int8 per 32-block in the B-tile layout, 16 rows to a tile:
/// `[m16/16, nb, 8, 16]` dwords, row j's codes `4c..4c+4` of block b at `(b·8 + c)·16 + j`
/// (zero codes past `k` and on rows past `m`; `m16` = `m` up to a multiple of 16).
pub(super) struct TileActs {
    nb: usize,
    /// `[m16/16, nb, 8, 16]`.
    q: Vec<u32>,
    /// `[m16/16, nb, 16]`: `sx_b` of the tile's 16 rows (0 on padding rows).
    sx: Vec<f32>,
}

fn tile_acts(inp: &[f32], w: &Int8Weight, m: usize) -> TileActs {
    let (k, act) = (w.k, w.act_scale.as_deref());
    let nb = k.div_ceil(I4_BLOCK);
    let tiles = m.div_ceil(TILE);
    let mut a = TileActs { nb, q: vec![0; tiles * nb * 8 * TILE], sx: vec![0.0; tiles * nb * TILE] };
    let rows = |t: usize| &inp[t * TILE * k..k * m.min((t + 1) * TILE)];
    a.q.par_chunks_mut(nb * 8 * TILE).zip(a.sx.par_chunks_mut(nb * TILE)).enumerate().for_each(|(t, (q, sx))| {
        let mut codes = [0i8; I4_BLOCK];
        for (j, x) in rows(t).chunks(k).enumerate() {
            for b in 0..nb {
                let is = b * I4_BLOCK..k.min((b + 1) * I4_BLOCK);
                codes.fill(0);
                sx[b * TILE + j] = quantize_row(&x[is.clone()], act.map(|a| &a[is.clone()]), &mut codes[..is.len()]);
                for (c, c4) in codes.chunks_exact(4).enumerate() {
                    q[(b * 8 + c) * TILE + j] =
                        u32::from_le_bytes([c4[0] as u8, c4[1] as u8, c4[2] as u8, c4[3] as u8]);
                }
            }
        }
    });
    a
}

/// Where a task reads its 16 weight rows from, as the A tiles want them (16 rows of 32 bytes at
/// a stride): the checkpoint itself when k is whole blocks and all 16 rows exist, else a copy
/// padded with zeros to `nb·32` columns and 16 rows.
struct WeightRows {
    pad: Vec<i8>,
    scale: [f32; TILE],
    bias: [f32; TILE],
}

impl WeightRows {
    /// Rows padded to `cols` codes (a multiple of the tile step).
    fn with_columns(cols: usize) -> WeightRows {
        WeightRows { pad: vec![0; TILE * cols], scale: [0.0; TILE], bias: [0.0; TILE] }
    }

    /// 16 zero rows (a panel past `n`).
    fn zeros(&mut self) -> (*const i8, usize) {
        self.pad.fill(0);
        self.scale = [0.0; TILE];
        self.bias = [0.0; TILE];
        (self.pad.as_ptr(), self.pad.len() / TILE)
    }

    /// `(first row, stride)` of rows `o0..o0+16`: the checkpoint's when k is already the padded
    /// width and all 16 rows exist.
    fn load(&mut self, w: &Int8Weight, bias: Option<&[f32]>, o0: usize) -> (*const i8, usize) {
        let (k, rows) = (w.k, TILE.min(w.n - o0));
        self.scale = [0.0; TILE];
        self.bias = [0.0; TILE];
        for i in 0..rows {
            self.scale[i] = w.scale[o0 + i];
            self.bias[i] = bias.map_or(0.0, |b| b[o0 + i]);
        }
        let stride = self.pad.len() / TILE;
        if rows == TILE && k == stride {
            return (w.q[o0 * k..].as_ptr(), k);
        }
        self.pad.fill(0);
        for i in 0..rows {
            self.pad[i * stride..i * stride + k].copy_from_slice(&w.q[(o0 + i) * k..(o0 + i + 1) * k]);
        }
        (self.pad.as_ptr(), stride)
    }
}

/// Which arithmetic [`amx_int8_matmul`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum TilePath {
    Amx,
    /// The twin the tests hold the tiles to.
    #[cfg_attr(not(test), allow(dead_code))]
    Scalar,
}

/// A task's view: its weight rows and the activations.
struct Task<'a, A> {
    w: *const i8,
    stride: usize,
    rows: &'a WeightRows,
    a: &'a A,
}

/// `out[m, n] = int8 weight-only product` on tiles, one task per 16 weight rows. The caller
/// checked the operands (as [`super::int8_weight_matmul`] does) and, for `Amx`,
/// [`amx_int8_usable`].
pub(super) fn amx_int8_matmul(
    path: TilePath,
    out: &mut [f32],
    inp: &[f32],
    w: &Int8Weight,
    bias: Option<&[f32]>,
    m: usize,
) {
    let a = tile_acts(inp, w, m);
    let (dst, a, n) = (SendPtr(out.as_mut_ptr()), &a, w.n);
    (0..n.div_ceil(TILE)).into_par_iter().for_each_init(
        || WeightRows::with_columns(a.nb * I4_BLOCK),
        |rows, t| {
            let o0 = t * TILE;
            let (wp, stride) = rows.load(w, bias, o0);
            let task = Task { w: wp, stride, rows, a };
            // SAFETY: `wp` has 16 rows of nb·32 codes at `stride`; out is m·n long and task t
            // writes only columns o0..o0+16 of rows < m; Amx only where `amx_int8_usable` said so.
            unsafe {
                match path {
                    #[cfg(target_arch = "x86_64")]
                    TilePath::Amx => x86::task_amx(&task, dst, n, m, o0),
                    _ => task_scalar(&task, dst, n, m, o0),
                }
            }
        },
    );
}

/// The twin: per 16 activation rows, per block, the exact i32 tile, then
/// `acc = fma(f32(dot), sx_b, acc)` per element; `out = acc · scale + bias`.
unsafe fn task_scalar(t: &Task<TileActs>, out: SendPtr, n: usize, m: usize, o0: usize) {
    let (nb, cols) = (t.a.nb, TILE.min(n - o0));
    for r0 in (0..m).step_by(TILE) {
        let (q, sx) = (&t.a.q[r0 / TILE * nb * 8 * TILE..], &t.a.sx[r0 / TILE * nb * TILE..]);
        let mut acc = [[0.0f32; TILE]; TILE];
        for b in 0..nb {
            for i in 0..TILE {
                let wr = t.w.add(i * t.stride + b * I4_BLOCK);
                for j in 0..TILE {
                    let mut dot = 0i32;
                    for c in 0..8 {
                        let x = q[(b * 8 + c) * TILE + j].to_le_bytes();
                        for e in 0..4 {
                            dot += *wr.add(4 * c + e) as i32 * x[e] as i8 as i32;
                        }
                    }
                    acc[i][j] = (dot as f32).mul_add(sx[b * TILE + j], acc[i][j]);
                }
            }
        }
        for j in 0..TILE.min(m - r0) {
            for i in 0..cols {
                *out.0.add((r0 + j) * n + o0 + i) = acc[i][j] * t.rows.scale[i] + t.rows.bias[i];
            }
        }
    }
}

/// W8A8's per-token int8 activations in the B-tile layout for whole-k products: `[m16/16,
/// kp/4, 16]` dwords (`kp` = k up to a multiple of 64), row j's codes `4d..4d+4` at `d·16 + j`.
pub(super) struct TokenActs {
    kp: usize,
    q: Vec<u32>,
    /// `[m16]`: `s_x` per token (0 on padding rows).
    sx: Vec<f32>,
}

/// Codes per W8A8 tile step: a whole 64-byte A row, so the i32 sums run on across all of k.
const W8A8_STEP: usize = 64;

fn token_acts(inp: &[f32], w: &Int8Weight, m: usize) -> TokenActs {
    let k = w.k;
    let kp = k.div_ceil(W8A8_STEP) * W8A8_STEP;
    let tiles = m.div_ceil(TILE);
    let mut q = vec![0i8; m * k];
    let mut sx = vec![0.0f32; tiles * TILE];
    super::quantize_activations(inp, k, w.act_scale.as_deref(), &mut q, &mut sx[..m]);
    let mut a = TokenActs { kp, q: vec![0; tiles * kp / 4 * TILE], sx };
    let q = &q;
    a.q.par_chunks_mut(kp / 4 * TILE).enumerate().for_each(|(t, dst)| {
        for (j, row) in q[t * TILE * k..k * m.min((t + 1) * TILE)].chunks(k).enumerate() {
            for (d, c4) in row.chunks(4).enumerate() {
                let mut b = [0u8; 4];
                for (e, &c) in c4.iter().enumerate() {
                    b[e] = c as u8;
                }
                dst[d * TILE + j] = u32::from_le_bytes(b);
            }
        }
    });
    a
}

/// `out[m, n] = W8A8 product` on tiles, exactly [`super::w8a8_matmul_reference`]'s bits: the
/// i32 sums are exact in any order and the epilogue is the same. One task per 32 weight rows,
/// which meet two activation tiles at a time (four C tiles). The caller checked the operands
/// (k ≤ `W8A8_MAX_K` included) and [`amx_int8_usable`].
#[cfg(target_arch = "x86_64")]
pub(super) fn amx_w8a8_matmul(out: &mut [f32], inp: &[f32], w: &Int8Weight, bias: Option<&[f32]>, m: usize) {
    let a = token_acts(inp, w, m);
    let (dst, a, n, kp) = (SendPtr(out.as_mut_ptr()), &a, w.n, a.kp);
    (0..n.div_ceil(2 * TILE)).into_par_iter().for_each_init(
        || (WeightRows::with_columns(kp), WeightRows::with_columns(kp)),
        |(r0, r1), t| {
            let o0 = t * 2 * TILE;
            let (w0, s0) = r0.load(w, bias, o0);
            // A missing second panel runs on zero rows (its columns are never written).
            let (w1, s1) = if o0 + TILE < n { r1.load(w, bias, o0 + TILE) } else { r1.zeros() };
            let panels = [Task { w: w0, stride: s0, rows: r0, a: &() }, Task { w: w1, stride: s1, rows: r1, a: &() }];
            // SAFETY: each panel has 16 rows of kp codes at its stride; out is m·n long and task
            // t writes only columns o0..o0+32 of rows < m; the caller checked the CPU.
            unsafe { x86::w8a8_task_amx(&panels, a, dst, n, m, o0) }
        },
    );
}

/// Int4's activations: [`TileActs`] with each block's 32 codes stored evens first, then odds
/// (the order [`Int4Rows`] unpacks the nibbles in), and the zero-point sums.
pub(super) struct Int4Acts {
    t: TileActs,
    gpr: usize,
    /// Blocks per group: 1, 2 or 4.
    bpg: usize,
    /// `[m16/16, gpr, 16]`: `Σ_{b∈g} sx_b·Σxq_b` of the tile's 16 rows.
    zsum: Vec<f32>,
}

fn int4_acts(inp: &[f32], w: &Int4Weight, m: usize) -> Int4Acts {
    let (k, nb, gpr, bpg) = (w.k, w.k / I4_BLOCK, w.groups_per_row(), w.group / I4_BLOCK);
    let tiles = m.div_ceil(TILE);
    let mut t = TileActs { nb, q: vec![0; tiles * nb * 8 * TILE], sx: vec![0.0; tiles * nb * TILE] };
    let mut zsum = vec![0.0f32; tiles * gpr * TILE];
    let rows = |t: usize| &inp[t * TILE * k..k * m.min((t + 1) * TILE)];
    let parts =
        t.q.par_chunks_mut(nb * 8 * TILE).zip(t.sx.par_chunks_mut(nb * TILE)).zip(zsum.par_chunks_mut(gpr * TILE));
    parts.enumerate().for_each(|(ti, ((q, sx), zs))| {
        let (mut codes, mut order) = ([0i8; I4_BLOCK], [0u8; I4_BLOCK]);
        for (j, x) in rows(ti).chunks(k).enumerate() {
            for b in 0..nb {
                let s = quantize_block(quantize_row, x, w.act_scale.as_deref(), b, &mut codes);
                for e in 0..I4_BLOCK / 2 {
                    (order[e], order[I4_BLOCK / 2 + e]) = (codes[2 * e] as u8, codes[2 * e + 1] as u8);
                }
                for (c, c4) in order.chunks_exact(4).enumerate() {
                    q[(b * 8 + c) * TILE + j] = u32::from_le_bytes([c4[0], c4[1], c4[2], c4[3]]);
                }
                sx[b * TILE + j] = s;
                let xsum: i32 = codes.iter().map(|&v| v as i32).sum();
                zs[b / bpg * TILE + j] += s * xsum as f32;
            }
        }
    });
    Int4Acts { t, gpr, bpg, zsum }
}

/// 16 int4 weight rows unpacked to one code a byte for the A tiles: per block its 16 low
/// nibbles (elements 0, 2, …, 30), then its 16 high ones; rows past `n` are zeros.
pub(super) struct Int4Rows {
    /// `[16, k]`.
    codes: Vec<u8>,
    /// `[gpr, 16]`: `s_g` and `z_g·s_g` of each row.
    s: Vec<f32>,
    zs: Vec<f32>,
    bias: [f32; TILE],
}

impl Int4Rows {
    fn new(w: &Int4Weight) -> Int4Rows {
        let gpr = w.groups_per_row();
        Int4Rows { codes: vec![0; TILE * w.k], s: vec![0.0; gpr * TILE], zs: vec![0.0; gpr * TILE], bias: [0.0; TILE] }
    }

    fn unpack(&mut self, w: &Int4Weight, bias: Option<&[f32]>, o0: usize) {
        let (k, gpr) = (w.k, w.groups_per_row());
        let rows = TILE.min(w.n - o0);
        if rows < TILE {
            self.codes.fill(0);
            self.s.fill(0.0);
            self.zs.fill(0.0);
            self.bias = [0.0; TILE];
        }
        const LOW: u64 = 0x0F0F_0F0F_0F0F_0F0F;
        for i in 0..rows {
            let packed = &w.packed[(o0 + i) * k / 2..][..k / 2];
            let dst = &mut self.codes[i * k..][..k];
            for (d, p) in dst.chunks_exact_mut(I4_BLOCK).zip(packed.chunks_exact(I4_BLOCK / 2)) {
                for h in 0..2 {
                    let v = u64::from_le_bytes(p[8 * h..8 * h + 8].try_into().expect("8 bytes"));
                    d[8 * h..8 * h + 8].copy_from_slice(&(v & LOW).to_le_bytes());
                    d[16 + 8 * h..16 + 8 * h + 8].copy_from_slice(&(v >> 4 & LOW).to_le_bytes());
                }
            }
            for g in 0..gpr {
                let (s, z) = (w.scale[(o0 + i) * gpr + g].to_f32(), w.zero[(o0 + i) * gpr + g].to_f32());
                self.s[g * TILE + i] = s;
                self.zs[g * TILE + i] = z * s;
            }
            self.bias[i] = bias.map_or(0.0, |b| b[o0 + i]);
        }
    }
}

/// `out[m, n] = int4(inp) · Wᵀ + bias` on tiles, one task per 16 weight rows (unpacked per
/// call, as [`super::int4_panels`] packs). The caller checked the operands (as
/// [`super::int4_matmul_isa`] does) and, for `Amx`, [`amx_int8_usable`].
pub(super) fn amx_int4_matmul(
    path: TilePath,
    out: &mut [f32],
    inp: &[f32],
    w: &Int4Weight,
    bias: Option<&[f32]>,
    m: usize,
) {
    let a = int4_acts(inp, w, m);
    let (dst, a, n) = (SendPtr(out.as_mut_ptr()), &a, w.n);
    (0..n.div_ceil(TILE)).into_par_iter().for_each_init(
        || Int4Rows::new(w),
        |rows, t| {
            let o0 = t * TILE;
            rows.unpack(w, bias, o0);
            // SAFETY: out is m·n long and task t writes only columns o0..o0+16 of rows < m;
            // Amx only where `amx_int8_usable` said so.
            unsafe {
                match path {
                    #[cfg(target_arch = "x86_64")]
                    TilePath::Amx => x86::int4_task_amx(rows, a, dst, n, m, o0),
                    _ => int4_task_scalar(rows, a, dst, n, m, o0),
                }
            }
        },
    );
}

/// The int4 twin: per block the exact i32 tile, `acc = fma(f32(dot), s_g·sx_b, acc)`, after a
/// group's last block `acc = fma(−z_g·s_g, zsum_g, acc)`; `out = acc + bias`.
unsafe fn int4_task_scalar(r: &Int4Rows, a: &Int4Acts, out: SendPtr, n: usize, m: usize, o0: usize) {
    let (nb, k, cols) = (a.t.nb, a.t.nb * I4_BLOCK, TILE.min(n - o0));
    for r0 in (0..m).step_by(TILE) {
        let at = r0 / TILE;
        let (q, sx) = (&a.t.q[at * nb * 8 * TILE..], &a.t.sx[at * nb * TILE..]);
        let zsum = &a.zsum[at * a.gpr * TILE..];
        let mut acc = [[0.0f32; TILE]; TILE];
        for b in 0..nb {
            let g = b / a.bpg;
            for i in 0..TILE {
                let wr = &r.codes[i * k + b * I4_BLOCK..][..I4_BLOCK];
                for j in 0..TILE {
                    let mut dot = 0i32;
                    for c in 0..8 {
                        let x = q[(b * 8 + c) * TILE + j].to_le_bytes();
                        for e in 0..4 {
                            dot += wr[4 * c + e] as i32 * x[e] as i8 as i32;
                        }
                    }
                    acc[i][j] = (dot as f32).mul_add(r.s[g * TILE + i] * sx[b * TILE + j], acc[i][j]);
                }
                if (b + 1).is_multiple_of(a.bpg) {
                    for j in 0..TILE {
                        acc[i][j] = (-r.zs[g * TILE + i]).mul_add(zsum[g * TILE + j], acc[i][j]);
                    }
                }
            }
        }
        for j in 0..TILE.min(m - r0) {
            for i in 0..cols {
                *out.0.add((r0 + j) * n + o0 + i) = acc[i][j] + r.bias[i];
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Int4Acts, Int4Rows, Task, TileActs, TokenActs, I4_BLOCK, TILE, W8A8_STEP};
    use crate::kernels::SendPtr;
    use std::arch::asm;
    use std::arch::x86_64::*;

    /// Palette 1: tmm0..tmm3 C (16 weight rows of 16 i32, one per activation row), tmm4/tmm5
    /// A (16 weight rows of a 32-byte block), tmm6/tmm7 B (8 rows of 16 activation dwords).
    /// Four C tiles let two blocks' multiplies run ahead of the one being added in (with two,
    /// each block waited on the previous block's multiply: 1.6× slower on the Xeon).
    fn tile_config() -> [u8; 64] {
        let mut c = [0u8; 64];
        c[0] = 1;
        for (t, rows, colsb) in
            [(0, 16, 64u16), (1, 16, 64), (2, 16, 64), (3, 16, 64), (4, 16, 32), (5, 16, 32), (6, 8, 64), (7, 8, 64)]
        {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&colsb.to_le_bytes());
            c[48 + t] = rows;
        }
        c
    }

    /// C tile `$c` = A tile `$a` (16 weight rows from `$w`, stride `$ws`) times B tile `$b`
    /// (the activation tile's block at `$x`), from zero, by `$dp` (`tdpbssd` or `tdpbusd`).
    macro_rules! tile_block {
        ($dp:literal, $c:literal, $a:literal, $b:literal, $w:expr, $ws:expr, $x:expr) => {
            asm!(
                concat!("tilezero ", $c),
                concat!("tileloadd ", $a, ", [{w} + {ws}*1]"),
                concat!("tileloadd ", $b, ", [{x} + {xs}*1]"),
                concat!($dp, " ", $c, ", ", $a, ", ", $b),
                w = in(reg) $w,
                ws = in(reg) $ws,
                x = in(reg) $x,
                xs = in(reg) 4 * TILE,
                options(nostack, readonly),
            )
        };
    }

    macro_rules! tile_store {
        ($c:literal, $dst:expr) => {
            asm!(
                concat!("tilestored [{d} + {s}*1], ", $c),
                d = in(reg) $dst,
                s = in(reg) 4 * TILE,
                options(nostack),
            )
        };
    }

    /// What a block-by-block task adds in per block: int8's `sx_b`, or int4's scales and zeros.
    trait BlockAdd {
        /// Weight codes are unsigned (`tdpbusd`), not signed (`tdpbssd`).
        const UNSIGNED_A: bool;
        /// Block `b`'s i32 tile (row i: weight row i for the 16 activation rows of tile `at`).
        unsafe fn add(&self, acc: &mut [__m512; TILE], tile: *const i32, at: usize, b: usize);
        /// Weight row i's sums for the 16 activation rows, finished.
        unsafe fn finish(&self, acc: __m512, i: usize) -> __m512;
    }

    /// Int8: `acc[i] = fma(f32(tile row i), sx_b, acc[i])`; `acc · scale + bias` at the end.
    struct Int8Add<'a> {
        t: &'a Task<'a, TileActs>,
    }

    impl BlockAdd for Int8Add<'_> {
        const UNSIGNED_A: bool = false;
        #[inline(always)]
        unsafe fn add(&self, acc: &mut [__m512; TILE], tile: *const i32, at: usize, b: usize) {
            let s = _mm512_loadu_ps(self.t.a.sx.as_ptr().add((at * self.t.a.nb + b) * TILE));
            for i in 0..TILE {
                let d = _mm512_cvtepi32_ps(_mm512_load_si512(tile.add(i * TILE) as *const __m512i));
                acc[i] = _mm512_fmadd_ps(d, s, acc[i]);
            }
        }
        #[inline(always)]
        unsafe fn finish(&self, acc: __m512, i: usize) -> __m512 {
            let v = _mm512_mul_ps(acc, _mm512_set1_ps(self.t.rows.scale[i]));
            _mm512_add_ps(v, _mm512_set1_ps(self.t.rows.bias[i]))
        }
    }

    /// Int4: `acc[i] = fma(f32(tile row i), s_g[i]·sx_b, acc[i])`, and after a group's last
    /// block `acc[i] −= z_g·s_g[i] · zsum_g`; `acc + bias` at the end.
    struct Int4Add<'a> {
        r: &'a Int4Rows,
        a: &'a Int4Acts,
    }

    impl BlockAdd for Int4Add<'_> {
        const UNSIGNED_A: bool = true;
        #[inline(always)]
        unsafe fn add(&self, acc: &mut [__m512; TILE], tile: *const i32, at: usize, b: usize) {
            let (a, r) = (self.a, self.r);
            let g = b / a.bpg;
            let sx = _mm512_loadu_ps(a.t.sx.as_ptr().add((at * a.t.nb + b) * TILE));
            let s = r.s.as_ptr().add(g * TILE);
            for i in 0..TILE {
                let d = _mm512_cvtepi32_ps(_mm512_load_si512(tile.add(i * TILE) as *const __m512i));
                acc[i] = _mm512_fmadd_ps(d, _mm512_mul_ps(_mm512_set1_ps(*s.add(i)), sx), acc[i]);
            }
            if (b + 1).is_multiple_of(a.bpg) {
                let zsum = _mm512_loadu_ps(a.zsum.as_ptr().add((at * a.gpr + g) * TILE));
                let zs = r.zs.as_ptr().add(g * TILE);
                for i in 0..TILE {
                    acc[i] = _mm512_fnmadd_ps(_mm512_set1_ps(*zs.add(i)), zsum, acc[i]);
                }
            }
        }
        #[inline(always)]
        unsafe fn finish(&self, acc: __m512, i: usize) -> __m512 {
            _mm512_add_ps(acc, _mm512_set1_ps(self.r.bias[i]))
        }
    }

    #[repr(align(64))]
    struct Tiles([[i32; TILE * TILE]; 4]);

    /// 16 weight rows (16 rows of nb·32 codes at `ws` from `wc`) against every activation tile
    /// of `xq` (`[tiles, nb, 8, 16]` dwords), block by block through `e`.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn block_task<E: BlockAdd>(
        e: &E,
        wc: *const u8,
        ws: usize,
        xq: *const u32,
        nb: usize,
        out: SendPtr,
        n: usize,
        m: usize,
        o0: usize,
    ) {
        let cfg = tile_config();
        let mut tiles = Tiles([[0; TILE * TILE]; 4]);
        let tb: [*mut i32; 4] = std::array::from_fn(|i| tiles.0[i].as_mut_ptr());
        let mut res = [[0.0f32; TILE]; TILE];
        let cols = TILE.min(n - o0);
        let mask: __mmask16 = ((1u32 << cols) - 1) as u16;
        let column = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(TILE as i32),
        );
        // SAFETY (all tile asm): the A loads read 16 rows of 32 bytes at `ws` from `wc` (16 rows
        // of nb·32 codes), the B loads 8 rows of 64 bytes inside `xq`; stores go to `tiles`.
        asm!("ldtilecfg [{}]", in(reg) cfg.as_ptr(), options(nostack, readonly));
        for r0 in (0..m).step_by(TILE) {
            let at = r0 / TILE;
            let x = xq.add(at * nb * 8 * TILE);
            let mut acc = [_mm512_setzero_ps(); TILE];
            // Block b goes through C tile b % 4, started two blocks before it is added in.
            let block = |b: usize| (wc.add(b * I4_BLOCK), x.add(b * 8 * TILE));
            macro_rules! start {
                ($b:expr, $c:literal, $a:literal, $bt:literal) => {
                    if $b < nb {
                        let (w, x) = block($b);
                        if E::UNSIGNED_A {
                            tile_block!("tdpbusd", $c, $a, $bt, w, ws, x);
                        } else {
                            tile_block!("tdpbssd", $c, $a, $bt, w, ws, x);
                        }
                    }
                };
            }
            macro_rules! finish {
                ($b:expr, $c:literal, $buf:expr) => {
                    if $b < nb {
                        tile_store!($c, $buf);
                        e.add(&mut acc, $buf, at, $b);
                    }
                };
            }
            start!(0, "tmm0", "tmm4", "tmm6");
            start!(1, "tmm1", "tmm5", "tmm7");
            for b in (0..nb).step_by(4) {
                start!(b + 2, "tmm2", "tmm4", "tmm6");
                finish!(b, "tmm0", tb[0]);
                start!(b + 3, "tmm3", "tmm5", "tmm7");
                finish!(b + 1, "tmm1", tb[1]);
                start!(b + 4, "tmm0", "tmm4", "tmm6");
                finish!(b + 2, "tmm2", tb[2]);
                start!(b + 5, "tmm1", "tmm5", "tmm7");
                finish!(b + 3, "tmm3", tb[3]);
            }
            // acc[i] holds weight row o0+i for the 16 activation rows; out wants them by row.
            for i in 0..TILE {
                _mm512_storeu_ps(res[i].as_mut_ptr(), e.finish(acc[i], i));
            }
            let base = res.as_ptr() as *const f32;
            for j in 0..TILE.min(m - r0) {
                let v = _mm512_i32gather_ps::<4>(_mm512_add_epi32(column, _mm512_set1_epi32(j as i32)), base);
                // SAFETY (caller): row r0+j < m, columns o0.. of `mask` are this task's.
                _mm512_mask_storeu_ps(out.0.add((r0 + j) * n + o0), mask, v);
            }
        }
        asm!("tilerelease", options(nostack, nomem));
    }

    #[target_feature(enable = "avx512f,avx512bw,fma")]
    pub(super) unsafe fn task_amx(t: &Task<TileActs>, out: SendPtr, n: usize, m: usize, o0: usize) {
        block_task(&Int8Add { t }, t.w as *const u8, t.stride, t.a.q.as_ptr(), t.a.nb, out, n, m, o0)
    }

    #[target_feature(enable = "avx512f,avx512bw,fma")]
    pub(super) unsafe fn int4_task_amx(r: &Int4Rows, a: &Int4Acts, out: SendPtr, n: usize, m: usize, o0: usize) {
        block_task(&Int4Add { r, a }, r.codes.as_ptr(), a.t.nb * I4_BLOCK, a.t.q.as_ptr(), a.t.nb, out, n, m, o0)
    }

    /// W8A8 palette: tmm0..tmm3 C (panel p × activation tile a at `2a + p`), tmm4/tmm5 A (the
    /// two panels' 16 rows of 64 codes), tmm6/tmm7 B (16 rows of 16 activation dwords).
    fn w8a8_config() -> [u8; 64] {
        let mut c = [0u8; 64];
        c[0] = 1;
        for t in 0..8 {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
            c[48 + t] = 16;
        }
        c
    }

    macro_rules! tile_load {
        ($t:literal, $p:expr, $s:expr) => {
            asm!(concat!("tileloadd ", $t, ", [{p} + {s}*1]"), p = in(reg) $p, s = in(reg) $s, options(nostack, readonly))
        };
    }

    /// Two panels of 16 weight rows against every activation tile, two tiles at a time; each C
    /// tile sums the whole k, then `acc · (s_x · s_w) + b` as the reference.
    #[target_feature(enable = "avx512f,avx512bw,fma")]
    pub(super) unsafe fn w8a8_task_amx(p: &[Task<()>; 2], a: &TokenActs, out: SendPtr, n: usize, m: usize, o0: usize) {
        let cfg = w8a8_config();
        let steps = a.kp / W8A8_STEP;
        let tiles = m.div_ceil(TILE);
        let mut buf = Tiles([[0; TILE * TILE]; 4]);
        let mut res = [[0.0f32; TILE]; TILE];
        let column = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(TILE as i32),
        );
        let tile_x = |t: usize| a.q.as_ptr().add(t.min(tiles - 1) * a.kp / 4 * TILE) as *const u8;
        // SAFETY (all tile asm): A loads read 16 rows of 64 codes inside each panel's kp codes;
        // B loads 16 rows of 64 bytes inside a tile's kp/4·16 dwords; stores go to `buf`.
        asm!("ldtilecfg [{}]", in(reg) cfg.as_ptr(), options(nostack, readonly));
        for t in (0..tiles).step_by(2) {
            // A lone last tile runs twice; the copy is never written out.
            let (x0, x1) = (tile_x(t), tile_x(t + 1));
            asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
            for s in 0..steps {
                tile_load!("tmm4", p[0].w.add(s * W8A8_STEP), p[0].stride);
                tile_load!("tmm5", p[1].w.add(s * W8A8_STEP), p[1].stride);
                tile_load!("tmm6", x0.add(s * W8A8_STEP * TILE), 4 * TILE);
                tile_load!("tmm7", x1.add(s * W8A8_STEP * TILE), 4 * TILE);
                asm!(
                    "tdpbssd tmm0, tmm4, tmm6",
                    "tdpbssd tmm1, tmm5, tmm6",
                    "tdpbssd tmm2, tmm4, tmm7",
                    "tdpbssd tmm3, tmm5, tmm7",
                    options(nostack, nomem)
                );
            }
            tile_store!("tmm0", buf.0[0].as_mut_ptr());
            tile_store!("tmm1", buf.0[1].as_mut_ptr());
            tile_store!("tmm2", buf.0[2].as_mut_ptr());
            tile_store!("tmm3", buf.0[3].as_mut_ptr());
            for at in 0..2 {
                let r0 = (t + at) * TILE;
                if r0 >= m {
                    break;
                }
                let sx = _mm512_loadu_ps(a.sx.as_ptr().add(r0));
                for (pi, panel) in p.iter().enumerate() {
                    let c0 = o0 + pi * TILE;
                    if c0 >= n {
                        break;
                    }
                    let acc = buf.0[2 * at + pi].as_ptr();
                    for i in 0..TILE {
                        let d = _mm512_cvtepi32_ps(_mm512_load_si512(acc.add(i * TILE) as *const __m512i));
                        let scale = _mm512_mul_ps(sx, _mm512_set1_ps(panel.rows.scale[i]));
                        let v = _mm512_add_ps(_mm512_mul_ps(d, scale), _mm512_set1_ps(panel.rows.bias[i]));
                        _mm512_storeu_ps(res[i].as_mut_ptr(), v);
                    }
                    let mask: __mmask16 = ((1u32 << TILE.min(n - c0)) - 1) as u16;
                    let base = res.as_ptr() as *const f32;
                    for j in 0..TILE.min(m - r0) {
                        let v = _mm512_i32gather_ps::<4>(_mm512_add_epi32(column, _mm512_set1_epi32(j as i32)), base);
                        // SAFETY (caller): row r0+j < m, columns c0.. of `mask` are this task's.
                        _mm512_mask_storeu_ps(out.0.add((r0 + j) * n + c0), mask, v);
                    }
                }
            }
        }
        asm!("tilerelease", options(nostack, nomem));
    }
}
