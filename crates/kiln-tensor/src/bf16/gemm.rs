//! `out[m, n] = inp[m, k] · W[n, k]ᵀ + bias` on bf16 operands with f32 accumulation.
//!
//! Output tiles of `MB × NB` run as rayon tasks. Per block of `KC` along k a task copies its
//! `MB` input rows and `NB` weight rows into zero-padded scratch once (widened to f32 for the
//! FMA paths, kept bf16 for `vdpbf16ps`) and reuses them across the whole tile in a 4 × 3
//! register-blocked dot-product micro-kernel. Every output element is its bias plus the
//! per-k-block partial sums added in k order, so results do not depend on the thread count.

use half::bf16;
use rayon::prelude::*;

use super::bits;
use crate::kernels::SendPtr;
use crate::simd::{Isa, Simd};

/// Rows per task (a multiple of `MR`); one widened weight tile serves all of them.
const MB: usize = 96;
/// Output columns per task (a multiple of `NR`).
const NB: usize = 48;
/// k per block: 4 input rows of f32 (6 KiB) stay in L1 while the tile's 48 weight rows stream
/// from L2 (measured ~15% faster than 256 with 64-row tasks at the gpt-s shapes).
const KC: usize = 384;
/// Padding of each k block: 32 bf16 = one `vdpbf16ps` operand, and a multiple of every f32 width.
const KPAD: usize = 32;
const MR: usize = 4;
const NR: usize = 3;

/// Which inner loop runs: `vdpbf16ps` on AVX512-BF16, or widen-and-FMA on an [`Isa`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Path {
    Dpbf16,
    Simd(Isa),
}

impl Path {
    fn detect() -> Path {
        let isa = Isa::detect();
        if isa == Isa::Avx512 && has_avx512bf16() {
            return Path::Dpbf16;
        }
        Path::Simd(isa)
    }

    /// Every path this CPU can run; tests run each of them.
    #[cfg(test)]
    pub(crate) fn all_supported() -> Vec<Path> {
        let isas = Isa::all_supported();
        let mut v = Vec::new();
        if isas.contains(&Isa::Avx512) && has_avx512bf16() {
            v.push(Path::Dpbf16);
        }
        v.extend(isas.into_iter().map(Path::Simd));
        v
    }
}

fn has_avx512bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// f64 accumulation of the exact bf16 products (each is exact in f64).
#[cfg(test)]
pub(crate) fn matmul_bf16_reference(
    out: &mut [f32],
    inp: &[bf16],
    weight: &[bf16],
    bias: Option<&[f32]>,
    m: usize,
    k: usize,
    n: usize,
) {
    for r in 0..m {
        for o in 0..n {
            let mut acc = bias.map_or(0.0, |b| b[o] as f64);
            for i in 0..k {
                acc += inp[r * k + i].to_f64() * weight[o * k + i].to_f64();
            }
            out[r * n + o] = acc as f32;
        }
    }
}

/// One path's scratch element and micro-kernel.
trait TileKernel {
    type E: Copy + Default;
    fn from_bits(b: u16) -> Self::E;
    /// Dot products of `MR` rows of `a` with `NR` rows of `w`, each `kp` long (a multiple of KPAD).
    unsafe fn micro(a: *const Self::E, w: *const Self::E, kp: usize) -> [[f32; NR]; MR];
}

struct Fma<S>(S);

impl<S: Simd> TileKernel for Fma<S> {
    type E = f32;
    #[inline(always)]
    fn from_bits(b: u16) -> f32 {
        f32::from_bits((b as u32) << 16)
    }
    #[inline(always)]
    unsafe fn micro(a: *const f32, w: *const f32, kp: usize) -> [[f32; NR]; MR] {
        let mut acc = [[S::zero(); NR]; MR];
        let mut kk = 0;
        while kk < kp {
            let wv = [S::load(w.add(kk)), S::load(w.add(kp + kk)), S::load(w.add(2 * kp + kk))];
            for (r, accr) in acc.iter_mut().enumerate() {
                let x = S::load(a.add(r * kp + kk));
                for c in 0..NR {
                    accr[c] = S::fma(x, wv[c], accr[c]);
                }
            }
            kk += S::LANES;
        }
        let mut res = [[0.0f32; NR]; MR];
        for r in 0..MR {
            for c in 0..NR {
                res[r][c] = S::reduce_sum(acc[r][c]);
            }
        }
        res
    }
}

#[cfg(target_arch = "x86_64")]
struct Dp;

#[cfg(target_arch = "x86_64")]
impl TileKernel for Dp {
    type E = u16;
    #[inline(always)]
    fn from_bits(b: u16) -> u16 {
        b
    }
    #[inline(always)]
    unsafe fn micro(a: *const u16, w: *const u16, kp: usize) -> [[f32; NR]; MR] {
        use std::arch::x86_64::*;
        #[inline(always)]
        unsafe fn ld(p: *const u16) -> __m512bh {
            std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p as *const _))
        }
        let mut acc = [[_mm512_setzero_ps(); NR]; MR];
        let mut kk = 0;
        while kk < kp {
            let wv = [ld(w.add(kk)), ld(w.add(kp + kk)), ld(w.add(2 * kp + kk))];
            for (r, accr) in acc.iter_mut().enumerate() {
                let x = ld(a.add(r * kp + kk));
                for c in 0..NR {
                    accr[c] = _mm512_dpbf16_ps(accr[c], x, wv[c]);
                }
            }
            kk += 32;
        }
        let mut res = [[0.0f32; NR]; MR];
        for r in 0..MR {
            for c in 0..NR {
                res[r][c] = _mm512_reduce_add_ps(acc[r][c]);
            }
        }
        res
    }
}

/// Copies `rows` rows of `len` from `src` (row stride `k`, starting at column `kb`) into `dst`
/// with row stride `kp`, zero-filling columns past `len` and rows up to `rows_pad`.
#[inline(always)]
fn pack<K: TileKernel>(
    dst: &mut [K::E],
    src: &[u16],
    k: usize,
    kb: usize,
    len: usize,
    kp: usize,
    rows: usize,
    rows_pad: usize,
) {
    for i in 0..rows_pad {
        let d = &mut dst[i * kp..(i + 1) * kp];
        if i < rows {
            for (o, &b) in d[..len].iter_mut().zip(&src[i * k + kb..i * k + kb + len]) {
                *o = K::from_bits(b);
            }
            d[len..].fill(K::E::default());
        } else {
            d.fill(K::E::default());
        }
    }
}

/// The tile geometry one task works on.
#[derive(Clone, Copy)]
struct Tile {
    k: usize,
    n: usize,
    r0: usize,
    rows: usize,
    c0: usize,
    cols: usize,
}

/// Adds `inp[r0.., :] · W[c0.., :]ᵀ` into the tile's block of `out`.
#[inline(always)]
unsafe fn tile_body<K: TileKernel>(out: SendPtr, inp: &[u16], weight: &[u16], t: Tile, a: &mut [K::E], w: &mut [K::E]) {
    let (rows_pad, cols_pad) = (t.rows.next_multiple_of(MR), t.cols.next_multiple_of(NR));
    let (a_src, w_src) = (&inp[t.r0 * t.k..], &weight[t.c0 * t.k..]);
    let mut kb = 0;
    while kb < t.k {
        let len = KC.min(t.k - kb);
        let kp = len.next_multiple_of(KPAD);
        pack::<K>(a, a_src, t.k, kb, len, kp, t.rows, rows_pad);
        pack::<K>(w, w_src, t.k, kb, len, kp, t.cols, cols_pad);
        for i in (0..rows_pad).step_by(MR) {
            for j in (0..cols_pad).step_by(NR) {
                let res = K::micro(a.as_ptr().add(i * kp), w.as_ptr().add(j * kp), kp);
                for (ii, resr) in res.iter().enumerate().take(t.rows.saturating_sub(i).min(MR)) {
                    let o = out.0.add((t.r0 + i + ii) * t.n + t.c0 + j);
                    for (jj, v) in resr.iter().enumerate().take(t.cols.saturating_sub(j).min(NR)) {
                        *o.add(jj) += *v;
                    }
                }
            }
        }
        kb += KC;
    }
}

#[inline(always)]
unsafe fn tile_fma<S: Simd>(out: SendPtr, inp: &[u16], weight: &[u16], t: Tile, a: &mut [f32], w: &mut [f32]) {
    tile_body::<Fma<S>>(out, inp, weight, t, a, w)
}
crate::multiversion!(fn tile_fma_v(out: SendPtr, inp: &[u16], weight: &[u16], t: Tile, a: &mut [f32], w: &mut [f32]) => tile_fma);

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl,avx2,fma")]
unsafe fn tile_dp(out: SendPtr, inp: &[u16], weight: &[u16], t: Tile, a: &mut [u16], w: &mut [u16]) {
    unsafe { tile_body::<Dp>(out, inp, weight, t, a, w) }
}

/// `vdpbf16ps` chains for the peak probe: 12 independent accumulators cover its latency.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
unsafe fn dpbf16_loop(iters: usize) -> f32 {
    use std::arch::x86_64::*;
    let x = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi16(0x3f80)); // bf16 1.0
    let y = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi16(0x3380)); // bf16 ~6e-8
    let mut acc = [_mm512_setzero_ps(); 12];
    for _ in 0..iters {
        for a in acc.iter_mut() {
            *a = _mm512_dpbf16_ps(*a, x, y);
        }
    }
    let mut s = _mm512_setzero_ps();
    for a in acc {
        s = _mm512_add_ps(s, a);
    }
    _mm512_reduce_add_ps(s)
}

/// FLOPs one thread does in `iters` iterations of [`dpbf16_loop`], and the result (kept so the
/// loop is not optimised away); None where the CPU has no AVX512-BF16.
pub(crate) fn dpbf16_probe(iters: usize) -> Option<(f64, f32)> {
    #[cfg(target_arch = "x86_64")]
    if has_avx512bf16() {
        // SAFETY: the CPU has AVX512-BF16 (checked at run time just above).
        let sink = unsafe { dpbf16_loop(iters) };
        // Each vdpbf16ps: 16 lanes × 2 products × (multiply + add).
        return Some(((iters * 12 * 16 * 4) as f64, sink));
    }
    let _ = iters;
    None
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_bf16_with(
    path: Path,
    out: &mut [f32],
    inp: &[bf16],
    weight: &[bf16],
    bias: Option<&[f32]>,
    m: usize,
    k: usize,
    n: usize,
) {
    assert!(m.checked_mul(k) == Some(inp.len()), "matmul_bf16: inp must be [m, k]");
    assert!(n.checked_mul(k) == Some(weight.len()), "matmul_bf16: weight must be [n, k]");
    assert!(m.checked_mul(n) == Some(out.len()), "matmul_bf16: out must be [m, n]");
    assert!(bias.is_none_or(|b| b.len() == n), "matmul_bf16: bias must be [n]");
    if m == 0 || n == 0 {
        return;
    }
    match bias {
        Some(b) => out.par_chunks_mut(n).for_each(|row| row.copy_from_slice(b)),
        None => out.par_chunks_mut(n).for_each(|row| row.fill(0.0)),
    }
    if k == 0 {
        return;
    }
    let (inp, weight) = (bits(inp), bits(weight));
    let (mt, nt) = (m.div_ceil(MB), n.div_ceil(NB));
    let out_ptr = SendPtr(out.as_mut_ptr());
    let tile = move |ti: usize| {
        let (rb, cb) = (ti / nt, ti % nt);
        let (r0, c0) = (rb * MB, cb * NB);
        Tile { k, n, r0, rows: MB.min(m - r0), c0, cols: NB.min(n - c0) }
    };
    match path {
        #[cfg(target_arch = "x86_64")]
        Path::Dpbf16 => (0..mt * nt).into_par_iter().for_each_init(
            || (vec![0u16; MB * KC], vec![0u16; NB * KC]),
            // SAFETY: Dpbf16 is chosen only after `avx512bf16` was detected; tiles are disjoint
            // blocks of `out` (asserted [m, n] above), so no two tasks write the same element.
            |(a, w), ti| unsafe { tile_dp(out_ptr, inp, weight, tile(ti), a, w) },
        ),
        Path::Simd(isa) => (0..mt * nt).into_par_iter().for_each_init(
            || (vec![0f32; MB * KC], vec![0f32; NB * KC]),
            // Tiles are disjoint blocks of `out` (asserted [m, n] above): no element is written twice.
            |(a, w), ti| tile_fma_v(isa, out_ptr, inp, weight, tile(ti), a, w),
        ),
        #[cfg(not(target_arch = "x86_64"))]
        Path::Dpbf16 => unreachable!("Dpbf16 is only detected on x86_64"),
    }
}

/// Whether [`matmul_bf16`] runs on bf16 dot-product hardware (`vdpbf16ps`) here; without it
/// the kernel widens to f32, and an f32 GEMM on bf16-rounded values is as exact and faster.
pub fn has_native_bf16_dot() -> bool {
    Path::detect() == Path::Dpbf16
}

/// `out[m, n] = inp[m, k] · weight[n, k]ᵀ + bias` (weight in PyTorch `Linear` layout), bf16
/// operands, f32 accumulation, on all rayon threads; the result is the same for any thread
/// count. Uses `vdpbf16ps` where the CPU has AVX512-BF16, else widens to f32 and FMAs
/// (AVX-512, AVX2 or scalar, picked at run time).
///
/// # Panics
/// If `inp.len() != m·k`, `weight.len() != n·k`, `out.len() != m·n` or a bias is not `n` long.
pub fn matmul_bf16(out: &mut [f32], inp: &[bf16], weight: &[bf16], bias: Option<&[f32]>, m: usize, k: usize, n: usize) {
    matmul_bf16_with(Path::detect(), out, inp, weight, bias, m, k, n);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use crate::{CpuKernels, Kernels};

    fn rand_bf16(seed: u64, len: usize) -> Vec<bf16> {
        randn(&mut rng(seed), len, 2.0).into_iter().map(bf16::from_f32).collect()
    }

    /// Per element: |got − want| ≤ 1e-5 · (|bias| + Σ|a·b|), the slack f32 accumulation in a
    /// different order needs.
    #[allow(clippy::too_many_arguments)]
    fn check(
        what: &str,
        got: &[f32],
        want: &[f32],
        inp: &[bf16],
        w: &[bf16],
        bias: Option<&[f32]>,
        m: usize,
        k: usize,
        n: usize,
    ) {
        for r in 0..m {
            for o in 0..n {
                let mag = bias.map_or(0.0, |b| b[o].abs() as f64)
                    + (0..k).map(|i| (inp[r * k + i].to_f64() * w[o * k + i].to_f64()).abs()).sum::<f64>();
                let (g, e) = (got[r * n + o] as f64, want[r * n + o] as f64);
                assert!((g - e).abs() <= 1e-5 * mag, "{what} m={m} k={k} n={n} [{r},{o}]: {g} vs {e} (Σ|ab| {mag})");
            }
        }
    }

    #[test]
    fn matmul_bf16_fast_matches_reference() {
        for &m in &[1usize, 3, 17, 64] {
            for &n in &[1usize, 7, 65, 129] {
                for &k in &[1usize, 15, 64, 257] {
                    let seed = (m * 1000 + n * 10 + k) as u64;
                    let (x, w) = (rand_bf16(seed, m * k), rand_bf16(seed + 1, n * k));
                    let b = randn(&mut rng(seed + 2), n, 1.0);
                    for bias in [Some(&b[..]), None] {
                        let mut want = vec![0.0; m * n];
                        matmul_bf16_reference(&mut want, &x, &w, bias, m, k, n);
                        for path in Path::all_supported() {
                            let mut got = vec![7.0; m * n];
                            matmul_bf16_with(path, &mut got, &x, &w, bias, m, k, n);
                            check(&format!("{path:?}"), &got, &want, &x, &w, bias, m, k, n);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn matmul_bf16_matches_f32_gemm_of_widened_inputs() {
        let kern = CpuKernels::default();
        for &(m, k, n) in &[(64usize, 384usize, 129usize), (130, 257, 96), (5, 600, 33)] {
            let (x, w) = (rand_bf16(m as u64, m * k), rand_bf16(n as u64 + 99, n * k));
            let b = randn(&mut rng(3), n, 1.0);
            let (mut xf, mut wf) = (vec![0.0; m * k], vec![0.0; n * k]);
            super::super::bf16_to_f32(&x, &mut xf);
            super::super::bf16_to_f32(&w, &mut wf);
            let mut want = vec![0.0; m * n];
            kern.matmul_forward(&mut want, &xf, &wf, Some(&b), k, n);
            let mut got = vec![0.0; m * n];
            matmul_bf16(&mut got, &x, &w, Some(&b), m, k, n);
            check("bf16 vs f32 gemm", &got, &want, &x, &w, Some(&b), m, k, n);
        }
    }

    #[test]
    fn matmul_bf16_is_deterministic_across_thread_counts() {
        let (m, k, n) = (130usize, 300usize, 100usize);
        let (x, w) = (rand_bf16(1, m * k), rand_bf16(2, n * k));
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let mut out = vec![0.0f32; m * n];
            pool.install(|| matmul_bf16(&mut out, &x, &w, None, m, k, n));
            out
        };
        let one = run(1);
        for t in [2, 3] {
            assert!(run(t).iter().zip(&one).all(|(a, b)| a.to_bits() == b.to_bits()), "{t} threads");
        }
    }
}
