//! Machine-limit probes: the f32 FMA peak every speed figure is a fraction of.

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
