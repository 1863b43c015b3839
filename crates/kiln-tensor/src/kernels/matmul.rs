//! Linear layer: `out = inp · Wᵀ + b` with W `[out, in]`, and its backward.
//!
//! The fast path is the `gemm` crate (BLIS-style packing, its own run-time AVX-512/AVX2
//! dispatch, rayon threads): it runs near the FMA peak here and handles the transposed
//! operands of backward through strides, with no copies.

use std::sync::OnceLock;

use rayon::prelude::*;

use super::dot;
use crate::simd::{Isa, Simd};

pub(crate) fn matmul_forward_reference(
    out: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    c_in: usize,
    c_out: usize,
) {
    for r in 0..inp.len() / c_in {
        for o in 0..c_out {
            let mut acc = bias.map_or(0.0, |b| b[o] as f64);
            for i in 0..c_in {
                acc += inp[r * c_in + i] as f64 * weight[o * c_in + i] as f64;
            }
            out[r * c_out + o] = acc as f32;
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_backward_reference(
    dinp: &mut [f32],
    dweight: &mut [f32],
    dbias: Option<&mut [f32]>,
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    c_in: usize,
    c_out: usize,
) {
    let rows = inp.len() / c_in;
    for r in 0..rows {
        for i in 0..c_in {
            let mut acc = 0.0f64;
            for o in 0..c_out {
                acc += dout[r * c_out + o] as f64 * weight[o * c_in + i] as f64;
            }
            dinp[r * c_in + i] = acc as f32;
        }
    }
    for o in 0..c_out {
        for i in 0..c_in {
            let mut acc = 0.0f64;
            for r in 0..rows {
                acc += dout[r * c_out + o] as f64 * inp[r * c_in + i] as f64;
            }
            dweight[o * c_in + i] += acc as f32;
        }
    }
    if let Some(db) = dbias {
        for o in 0..c_out {
            db[o] += (0..rows).map(|r| dout[r * c_out + o] as f64).sum::<f64>() as f32;
        }
    }
}

fn parallelism() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

/// `dst[m, n] (+)= lhs[m, k] · rhs[k, n]`, each operand given by (slice, row stride, column
/// stride); on all rayon threads, or on the calling thread alone for small blocks inside an
/// already parallel kernel (attention).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_strided(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: &[f32],
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: &[f32],
    rhs_rs: usize,
    rhs_cs: usize,
    parallel: bool,
) {
    let par = if parallel { parallelism() } else { gemm::Parallelism::None };
    if m == 0 || n == 0 {
        return;
    }
    // Bounds: the last element each operand view touches must lie inside its slice.
    assert!(dst.len() >= (m - 1) * dst_rs + n);
    if k > 0 {
        assert!(lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs);
        assert!(rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs);
    }
    // SAFETY: the asserts above keep every strided access inside the slices; dst does not alias.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// Rows up to which the forward uses dot products instead of a GEMM: generation's decode step
/// multiplies one row per sequence, where packing for a GEMM costs more than it saves.
const GEMV_MAX_ROWS: usize = 4;

/// How [`gemv_block`] walks the weight rows: the DRAM side of a decode step, where the best
/// order depends on the memory system rather than the instruction set. Measured with
/// `examples/gemv_stream.rs` (one GPT-2 124M decode step's weights, 2 threads):
/// - 2-core Intel Xeon (AVX-512, 2026-12-07): four rows side by side 26-28 GB/s, one row at a
///   time (one accumulator) 24-26, beside a read-bandwidth probe of 28-31;
/// - 2-core AMD EPYC Zen 4 (AVX-512, 2026-12-07): one row at a time 33-34 GB/s, four rows side
///   by side 27-29, alternated, with the probe at 32-36 then (a standalone copy of both walks
///   read 41-43 against 29-31 with the probe at 50-54). Zen 4's prefetchers follow one
///   sequential stream per thread far better than four streams a row (3 KiB) apart. The int8 and int4 decode
///   kernels follow the same choice: there GPT-2 124M decode went 132-139 -> 198-224 tok/s
///   (int8, also without software prefetch) and 185-226 -> 235-277 (int4) one row at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GemvLayout {
    /// One weight row at a time, two accumulators: one sequential stream per thread.
    OneRow,
    /// Four weight rows side by side, the activation loaded once for all four.
    FourRows,
}

impl GemvLayout {
    /// AMD parts stream one row at a time, others four; `KILN_GEMV=one|four` overrides it.
    pub(crate) fn detect() -> GemvLayout {
        #[cfg(test)]
        match FORCED_LAYOUT.load(std::sync::atomic::Ordering::Relaxed) {
            1 => return GemvLayout::OneRow,
            2 => return GemvLayout::FourRows,
            _ => {}
        }
        static LAYOUT: OnceLock<GemvLayout> = OnceLock::new();
        *LAYOUT.get_or_init(|| match std::env::var("KILN_GEMV").ok().as_deref() {
            Some("one") => GemvLayout::OneRow,
            Some("four") => GemvLayout::FourRows,
            _ if cpu_vendor_is_amd() => GemvLayout::OneRow,
            _ => GemvLayout::FourRows,
        })
    }
}

/// The layout tests force (0: none, 1: one row, 2: four rows). Every layout is correct, so a test
/// running beside one that forces a layout still checks a valid kernel.
#[cfg(test)]
static FORCED_LAYOUT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Runs `f` under each layout in turn, whatever this CPU's vendor picks (tests of the decode
/// kernels that read [`GemvLayout::detect`]).
#[cfg(test)]
pub(crate) fn with_each_gemv_layout(mut f: impl FnMut(GemvLayout)) {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    for (code, layout) in [(1, GemvLayout::OneRow), (2, GemvLayout::FourRows)] {
        FORCED_LAYOUT.store(code, std::sync::atomic::Ordering::Relaxed);
        f(layout);
    }
    FORCED_LAYOUT.store(0, std::sync::atomic::Ordering::Relaxed);
}

fn cpu_vendor_is_amd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let r = std::arch::x86_64::__cpuid(0);
        let vendor = [r.ebx, r.edx, r.ecx].map(u32::to_le_bytes).concat();
        vendor == b"AuthenticAMD"
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `out[r] = Σ inp[r]·w` for `rows` rows against a block of output channels, the weight rows
/// walked as `layout` says.
#[inline(always)]
unsafe fn gemv_block<S: Simd>(
    out: &mut [f32],
    o0: usize,
    inp: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    c_in: usize,
    layout: GemvLayout,
) {
    const FOUR: usize = 4;
    let rows = inp.len() / c_in;
    let n_o = out.len() / rows;
    let bias_of = |o: usize| bias.map_or(0.0, |b| b[o]);
    let mut oi = 0;
    while layout == GemvLayout::FourRows && oi + FOUR <= n_o {
        let w = weight.as_ptr().add((o0 + oi) * c_in);
        for r in 0..rows {
            let x = inp.as_ptr().add(r * c_in);
            let mut acc = [S::zero(); FOUR];
            let mut i = 0;
            while i + S::LANES <= c_in {
                let xv = S::load(x.add(i));
                for (j, a) in acc.iter_mut().enumerate() {
                    *a = S::fma(xv, S::load(w.add(j * c_in + i)), *a);
                }
                i += S::LANES;
            }
            for (j, a) in acc.iter().enumerate() {
                let mut sum = S::reduce_sum(*a);
                for t in i..c_in {
                    sum += *x.add(t) * *w.add(j * c_in + t);
                }
                out[r * n_o + oi + j] = sum + bias_of(o0 + oi + j);
            }
        }
        oi += FOUR;
    }
    for oi in oi..n_o {
        let w = weight.as_ptr().add((o0 + oi) * c_in);
        for r in 0..rows {
            out[r * n_o + oi] = dot::<S>(inp.as_ptr().add(r * c_in), w, c_in) + bias_of(o0 + oi);
        }
    }
}
crate::multiversion!(fn gemv_block_v(out: &mut [f32], o0: usize, inp: &[f32], weight: &[f32], bias: Option<&[f32]>, c_in: usize, layout: GemvLayout) => gemv_block);

/// Copies per-block results `parts[b]` (`[rows, n_b]`, output channels `b·width ..`) into their
/// columns of `out[rows, c_out]`.
fn scatter_column_blocks(out: &mut [f32], parts: &[Vec<f32>], width: usize, rows: usize, c_out: usize) {
    for (b, part) in parts.iter().enumerate() {
        let (o0, n) = (b * width, part.len() / rows);
        for r in 0..rows {
            out[r * c_out + o0..r * c_out + o0 + n].copy_from_slice(&part[r * n..(r + 1) * n]);
        }
    }
}

/// Few-row forward: output channels split in blocks across threads, results scattered per row.
fn matmul_forward_gemv(
    isa: Isa,
    layout: GemvLayout,
    out: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    c_in: usize,
    c_out: usize,
) {
    const BLOCK: usize = 64;
    let rows = inp.len() / c_in;
    if rows == 1 {
        // One row: each block's outputs are contiguous, written in place.
        out.par_chunks_mut(BLOCK)
            .enumerate()
            .for_each(|(bi, o)| gemv_block_v(isa, o, bi * BLOCK, inp, weight, bias, c_in, layout));
        return;
    }
    let blocks: Vec<Vec<f32>> = (0..c_out.div_ceil(BLOCK))
        .into_par_iter()
        .map(|bi| {
            let o0 = bi * BLOCK;
            let n = BLOCK.min(c_out - o0);
            let mut part = vec![0.0f32; rows * n];
            gemv_block_v(isa, &mut part, o0, inp, weight, bias, c_in, layout);
            part
        })
        .collect();
    scatter_column_blocks(out, &blocks, BLOCK, rows, c_out);
}

/// Rows up to which the forward transposes the weight itself, one panel of output channels at a
/// time: with few rows (a prompt's prefill) the GEMM cannot amortise packing a `[c_out, c_in]`
/// weight, which `gemm` does one strided scalar at a time straight from DRAM (measured: 40% of
/// the GEMM time of a GPT-2 124M prefill of 128 tokens).
const PANEL_MAX_ROWS: usize = 256;
/// Output channels per panel: a `[c_in, PANEL]` transposed slice stays in L2 beside the input.
const PANEL: usize = 128;

/// `wt[i, o] = w[o, i]` for a `[n, c_in]` block: the fastest kernel the CPU has.
fn transpose_panel(isa: Isa, wt: &mut [f32], w: &[f32], n: usize, c_in: usize) {
    assert!(w.len() >= n * c_in && wt.len() >= n * c_in);
    #[cfg(target_arch = "x86_64")]
    if matches!(isa, Isa::Avx512 | Isa::Avx2) {
        // SAFETY: AVX2 is present (`isa` was checked at detection); the assert bounds every access.
        return unsafe { transpose_panel_avx2(wt, w, n, c_in) };
    }
    let _ = isa;
    transpose_region(wt, w, n, c_in, 0..n, 0..c_in);
}

/// The scalar transpose of `w[o_range, i_range]` into `wt`, in 16 × 16 tiles so that reads run
/// along rows: the whole block for the scalar kernel, the ragged edges for the SIMD one.
fn transpose_region(
    wt: &mut [f32],
    w: &[f32],
    n: usize,
    c_in: usize,
    o_range: std::ops::Range<usize>,
    i_range: std::ops::Range<usize>,
) {
    const TILE: usize = 16;
    for o0 in o_range.clone().step_by(TILE) {
        for i0 in i_range.clone().step_by(TILE) {
            for o in o0..(o0 + TILE).min(o_range.end) {
                let row = &w[o * c_in..(o + 1) * c_in];
                for i in i0..(i0 + TILE).min(i_range.end) {
                    wt[i * n + o] = row[i];
                }
            }
        }
    }
}

/// 8 × 8 blocks transposed in registers (unpack pairs, then quads, then 128-bit halves); the
/// scalar loop stored one float at a time with a 512-byte stride and took a third of a `gpt-s`
/// prefill.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn transpose_panel_avx2(wt: &mut [f32], w: &[f32], n: usize, c_in: usize) {
    use std::arch::x86_64::*;
    let (n8, c8) = (n / 8 * 8, c_in / 8 * 8);
    let (src, dst) = (w.as_ptr(), wt.as_mut_ptr());
    for o0 in (0..n8).step_by(8) {
        for i0 in (0..c8).step_by(8) {
            let r: [__m256; 8] = std::array::from_fn(|k| _mm256_loadu_ps(src.add((o0 + k) * c_in + i0)));
            let t0 = _mm256_unpacklo_ps(r[0], r[1]);
            let t1 = _mm256_unpackhi_ps(r[0], r[1]);
            let t2 = _mm256_unpacklo_ps(r[2], r[3]);
            let t3 = _mm256_unpackhi_ps(r[2], r[3]);
            let t4 = _mm256_unpacklo_ps(r[4], r[5]);
            let t5 = _mm256_unpackhi_ps(r[4], r[5]);
            let t6 = _mm256_unpacklo_ps(r[6], r[7]);
            let t7 = _mm256_unpackhi_ps(r[6], r[7]);
            let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
            let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
            let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
            let cols = [
                _mm256_permute2f128_ps::<0x20>(u0, u4),
                _mm256_permute2f128_ps::<0x20>(u1, u5),
                _mm256_permute2f128_ps::<0x20>(u2, u6),
                _mm256_permute2f128_ps::<0x20>(u3, u7),
                _mm256_permute2f128_ps::<0x31>(u0, u4),
                _mm256_permute2f128_ps::<0x31>(u1, u5),
                _mm256_permute2f128_ps::<0x31>(u2, u6),
                _mm256_permute2f128_ps::<0x31>(u3, u7),
            ];
            for (k, col) in cols.into_iter().enumerate() {
                _mm256_storeu_ps(dst.add((i0 + k) * n + o0), col);
            }
        }
    }
    transpose_region(wt, w, n, c_in, 0..n8, c8..c_in);
    transpose_region(wt, w, n, c_in, n8..n, 0..c_in);
}

/// Few-row forward: each thread transposes a panel of output channels into its own buffer and
/// runs a one-thread GEMM on it, so the weight streams from memory once, along its rows.
fn matmul_forward_panels(
    isa: Isa,
    out: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    c_in: usize,
    c_out: usize,
) {
    let rows = inp.len() / c_in;
    let parts: Vec<Vec<f32>> = (0..c_out.div_ceil(PANEL))
        .into_par_iter()
        .map_init(
            || vec![0.0f32; c_in * PANEL],
            |wt, p| {
                let o0 = p * PANEL;
                let n = PANEL.min(c_out - o0);
                transpose_panel(isa, &mut wt[..c_in * n], &weight[o0 * c_in..(o0 + n) * c_in], n, c_in);
                let mut part = vec![0.0f32; rows * n];
                if let Some(b) = bias {
                    part.chunks_mut(n).for_each(|r| r.copy_from_slice(&b[o0..o0 + n]));
                }
                gemm_strided(rows, n, c_in, &mut part, n, bias.is_some(), inp, c_in, 1, wt, n, 1, false);
                part
            },
        )
        .collect();
    scatter_column_blocks(out, &parts, PANEL, rows, c_out);
}

pub(crate) fn matmul_forward(
    isa: Isa,
    out: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    c_in: usize,
    c_out: usize,
) {
    let rows = inp.len() / c_in;
    assert!(out.len() == rows * c_out && weight.len() == c_out * c_in);
    assert!(bias.is_none_or(|b| b.len() == c_out));
    if rows <= GEMV_MAX_ROWS {
        return matmul_forward_gemv(isa, GemvLayout::detect(), out, inp, weight, bias, c_in, c_out);
    }
    if rows <= PANEL_MAX_ROWS {
        return matmul_forward_panels(isa, out, inp, weight, bias, c_in, c_out);
    }
    if let Some(b) = bias {
        assert_eq!(b.len(), c_out);
        out.par_chunks_mut(c_out).for_each(|row| row.copy_from_slice(b));
    }
    // out[rows, c_out] (+)= inp[rows, c_in] · Wᵀ, where Wᵀ[i, o] = W[o * c_in + i].
    gemm_strided(rows, c_out, c_in, out, c_out, bias.is_some(), inp, c_in, 1, weight, 1, c_in, true);
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_backward(
    isa: Isa,
    dinp: &mut [f32],
    dweight: &mut [f32],
    dbias: Option<&mut [f32]>,
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    c_in: usize,
    c_out: usize,
) {
    let rows = inp.len() / c_in;
    assert!(dinp.len() == rows * c_in && dout.len() == rows * c_out && dweight.len() == c_out * c_in);
    // dinp[rows, c_in] = dout[rows, c_out] · W[c_out, c_in]
    gemm_strided(rows, c_in, c_out, dinp, c_in, false, dout, c_out, 1, weight, c_in, 1, true);
    // dW[c_out, c_in] += doutᵀ[c_out, rows] · inp[rows, c_in]
    gemm_strided(c_out, c_in, rows, dweight, c_in, true, dout, 1, c_out, inp, c_in, 1, true);
    if let Some(db) = dbias {
        assert_eq!(db.len(), c_out);
        // Column sums, one block of columns per task, rows in order: deterministic.
        const COLS: usize = 64;
        db.par_chunks_mut(COLS).enumerate().for_each(|(blk, acc)| {
            let j0 = blk * COLS;
            for r in 0..rows {
                let row = &dout[r * c_out + j0..r * c_out + j0 + acc.len()];
                super::encoder::accumulate_row(isa, acc, row);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    #[test]
    fn transpose_panel_matches_scalar_on_ragged_blocks() {
        for &(n, c_in) in &[(1usize, 1usize), (7, 9), (8, 8), (16, 24), (37, 29), (128, 389), (130, 96)] {
            let w = randn(&mut rng(n as u64 * 31 + c_in as u64), n * c_in, 1.0);
            let mut want = vec![f32::NAN; n * c_in];
            for o in 0..n {
                for i in 0..c_in {
                    want[i * n + o] = w[o * c_in + i];
                }
            }
            for isa in Isa::all_supported() {
                let mut wt = vec![f32::NAN; n * c_in];
                transpose_panel(isa, &mut wt, &w, n, c_in);
                assert!(wt.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{isa:?} n={n} c_in={c_in}");
            }
        }
    }

    #[test]
    fn matmul_fast_matches_reference() {
        for &(rows, c_in, c_out) in &[
            (1usize, 5usize, 3usize),
            (1, 389, 131),
            (3, 389, 131),
            (4, 64, 9),
            (2, 16, 70),
            (37, 67, 131),
            (70, 389, 29),
            (130, 96, 300),
            (300, 67, 290),
        ] {
            let mut r = rng(5 + c_in as u64);
            let inp = randn(&mut r, rows * c_in, 1.0);
            let w = randn(&mut r, c_out * c_in, 1.0);
            let b = randn(&mut r, c_out, 1.0);
            let g = randn(&mut r, rows * c_out, 1.0);
            let mut y0 = vec![0.0; rows * c_out];
            matmul_forward_reference(&mut y0, &inp, &w, Some(&b), c_in, c_out);
            let mut y0nb = vec![0.0; rows * c_out];
            matmul_forward_reference(&mut y0nb, &inp, &w, None, c_in, c_out);
            let (mut dx0, mut dw0, mut db0) = (vec![0.0; rows * c_in], vec![0.5; c_out * c_in], vec![0.25; c_out]);
            matmul_backward_reference(&mut dx0, &mut dw0, Some(&mut db0), &g, &inp, &w, c_in, c_out);
            for isa in Isa::all_supported() {
                let mut y = vec![7.0; rows * c_out];
                matmul_forward(isa, &mut y, &inp, &w, Some(&b), c_in, c_out);
                assert_close("matmul fwd", &y, &y0, 1e-6);
                let mut y = vec![7.0; rows * c_out];
                matmul_forward(isa, &mut y, &inp, &w, None, c_in, c_out);
                assert_close("matmul fwd no bias", &y, &y0nb, 1e-6);
                let (mut dx, mut dw, mut db) = (vec![9.0; rows * c_in], vec![0.5; c_out * c_in], vec![0.25; c_out]);
                matmul_backward(isa, &mut dx, &mut dw, Some(&mut db), &g, &inp, &w, c_in, c_out);
                assert_close("matmul dinp", &dx, &dx0, 1e-6);
                assert_close("matmul dweight", &dw, &dw0, 1e-6);
                assert_close("matmul dbias", &db, &db0, 1e-6);
                if rows <= GEMV_MAX_ROWS {
                    // Both walks of the decode GEMV, whichever this CPU's vendor picks.
                    for layout in [GemvLayout::OneRow, GemvLayout::FourRows] {
                        let mut y = vec![7.0; rows * c_out];
                        matmul_forward_gemv(isa, layout, &mut y, &inp, &w, Some(&b), c_in, c_out);
                        assert_close(&format!("gemv {layout:?}"), &y, &y0, 1e-6);
                    }
                }
            }
        }
    }
}
