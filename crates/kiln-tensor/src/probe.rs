//! Machine-limit probes: the f32 FMA (and bf16 dot-product) peak every speed figure is a
//! fraction of, and the memory read bandwidth.

use std::time::Instant;

use rayon::prelude::*;

use crate::simd::{Isa, Simd};

/// Independent FMA chains per thread: enough to cover the FMA latency on both ports.
const CHAINS: usize = 12;

#[inline(always)]
unsafe fn fma_loop<S: Simd>(iters: usize) -> f32 {
    let mut acc = [S::splat(0.0); CHAINS];
    let (a, b) = (S::splat(0.999_999), S::splat(1e-7));
    for _ in 0..iters {
        for x in acc.iter_mut() {
            *x = S::fma(*x, a, b);
        }
    }
    let mut s = S::zero();
    for x in acc {
        s = S::add(s, x);
    }
    S::reduce_sum(s)
}
crate::multiversion!(fn fma_loop_v(iters: usize) -> f32 => fma_loop);

fn lanes(isa: Isa) -> usize {
    match isa {
        Isa::Avx512 => 16,
        Isa::Avx2 => 8,
        Isa::Scalar => 1,
    }
}

/// Measured peak f32 GFLOP/s on all rayon threads (2 flops per FMA lane), best of a few runs.
pub fn f32_peak_gflops() -> f64 {
    let isa = Isa::detect();
    let threads = rayon::current_num_threads();
    let iters = 2_000_000;
    let mut best: f64 = 0.0;
    for _ in 0..3 {
        let start = Instant::now();
        let sink: f32 = (0..threads).into_par_iter().map(|_| fma_loop_v(isa, iters)).sum();
        let secs = start.elapsed().as_secs_f64();
        std::hint::black_box(sink);
        let flops = (threads * iters * CHAINS * lanes(isa) * 2) as f64;
        best = best.max(flops / secs / 1e9);
    }
    best
}

/// Measured peak bf16 GFLOP/s on all rayon threads: `vdpbf16ps` throughput on AVX512-BF16;
/// elsewhere the bf16 GEMM widens to f32 and FMAs, so its ceiling is [`f32_peak_gflops`].
pub fn bf16_peak_gflops() -> f64 {
    let iters = 2_000_000;
    if crate::bf16::dpbf16_probe(1).is_none() {
        return f32_peak_gflops();
    }
    let threads = rayon::current_num_threads();
    let mut best: f64 = 0.0;
    for _ in 0..3 {
        let start = Instant::now();
        let runs: Vec<(f64, f32)> =
            (0..threads).into_par_iter().map(|_| crate::bf16::dpbf16_probe(iters).expect("checked")).collect();
        let secs = start.elapsed().as_secs_f64();
        let flops: f64 = runs.iter().map(|r| r.0).sum();
        std::hint::black_box(runs.iter().map(|r| r.1).sum::<f32>());
        best = best.max(flops / secs / 1e9);
    }
    best
}

#[inline(always)]
unsafe fn sum_body<S: Simd>(x: &[f32]) -> f32 {
    let (n, p) = (x.len(), x.as_ptr());
    let (mut a0, mut a1, mut a2, mut a3) = (S::zero(), S::zero(), S::zero(), S::zero());
    let mut i = 0;
    while i + 4 * S::LANES <= n {
        a0 = S::add(a0, S::load(p.add(i)));
        a1 = S::add(a1, S::load(p.add(i + S::LANES)));
        a2 = S::add(a2, S::load(p.add(i + 2 * S::LANES)));
        a3 = S::add(a3, S::load(p.add(i + 3 * S::LANES)));
        i += 4 * S::LANES;
    }
    let mut s = S::reduce_sum(S::add(S::add(a0, a1), S::add(a2, a3)));
    while i < n {
        s += *p.add(i);
        i += 1;
    }
    s
}
crate::multiversion!(fn sum_v(x: &[f32]) -> f32 => sum_body);

/// Measured memory read bandwidth in GB/s on all rayon threads: a 256 MiB buffer (far larger
/// than any cache) summed with SIMD loads, best of a few passes.
pub fn read_bandwidth_gbs() -> f64 {
    let isa = Isa::detect();
    let buf = vec![1.0f32; 64 << 20];
    let chunk = buf.len().div_ceil(rayon::current_num_threads() * 8);
    let mut best: f64 = 0.0;
    for _ in 0..4 {
        let start = Instant::now();
        let s: f32 = buf.par_chunks(chunk).map(|c| sum_v(isa, c)).sum();
        let secs = start.elapsed().as_secs_f64();
        std::hint::black_box(s);
        best = best.max((buf.len() * 4) as f64 / secs / 1e9);
    }
    best
}
