//! One decode token (m = 1), or a prompt of M rows (prefill), through every int4 (RTN, group 32)
//! linear layer of a model, on a pool of THREADS rayon workers, as `kiln generate` runs them:
//! - `gpt-s` (hot: 6 layers and the 8192 × 384 head, about 6 MB, stay in L3), per shape and in all;
//! - `gpt2-124m` (cold: 12 layers and the 50257 × 768 head, about 45 MB, more than L3).
//!
//!     cargo run --release -p kiln-compress --example int4_token_bench [-- THREADS [M]]

use std::time::Instant;

use kiln_compress::rtn_int4;
use kiln_tensor::quant::{int4_matmul, Int4Weight};

fn weight(n: usize, k: usize, seed: usize) -> Int4Weight {
    let w: Vec<f32> = (0..n * k).map(|i| (((i + seed) * 7919 % 1000) as f32 / 500.0) - 1.0).collect();
    rtn_int4(&w, n, k, 32).expect("finite weights quantize")
}

/// Best seconds of `reps` passes of one `m`-row product through each of `ws`.
fn best_token(ws: &[Int4Weight], m: usize, reps: usize) -> f64 {
    let kmax = ws.iter().map(|w| w.k).max().unwrap_or(0);
    let x: Vec<f32> = (0..m * kmax).map(|i| ((i * 31 % 100) as f32 / 50.0) - 1.0).collect();
    let mut out = vec![0.0f32; m * ws.iter().map(|w| w.n).max().unwrap_or(0)];
    let mut pass = || {
        let t = Instant::now();
        for w in ws {
            int4_matmul(&mut out[..m * w.n], &x[..m * w.k], w, None, m);
        }
        t.elapsed().as_secs_f64()
    };
    pass();
    (0..reps).map(|_| pass()).fold(f64::MAX, f64::min)
}

fn main() {
    let threads: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(2);
    let m: usize = std::env::args().nth(2).and_then(|a| a.parse().ok()).unwrap_or(1);
    let reps = |r: usize| (r / m).max(3);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("a rayon pool");
    // Inside the pool, as decode runs: a call from outside pays a cross-thread handoff each time.
    pool.install(|| {
        println!("{threads} threads, m = {m}");
        let layer = [(1152, 384), (384, 384), (1536, 384), (384, 1536)];
        let mut total = 0.0;
        for (n, k) in layer.into_iter().chain([(8192, 384)]) {
            let t = best_token(&[weight(n, k, 0)], m, reps(2000));
            total += t * if n == 8192 { 1.0 } else { 6.0 };
            println!("gpt-s {n:5} x {k:4}: {:7.2} us  {:6.1} GFLOP/s", t * 1e6, 2.0 * (m * n * k) as f64 / t / 1e9);
        }
        println!("gpt-s token (hot, 6 layers + head): {:.1} us", total * 1e6);
        let gpt2 = [(2304, 768), (768, 768), (3072, 768), (768, 3072)];
        let mut ws: Vec<Int4Weight> = (0..12).flat_map(|l| gpt2.map(|(n, k)| weight(n, k, l))).collect();
        ws.push(weight(50257, 768, 12));
        println!("gpt2-124m token (cold, 12 layers + head): {:.1} us", best_token(&ws, m, reps(30)) * 1e6);
    });
}
