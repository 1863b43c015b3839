//! Decode-step (m = 1) throughput of the quantized matmuls against the f32 one, in GB/s of
//! weights streamed and matrix-vector products per second (= tokens/s through that one matrix).
//!
//! Each format cycles through enough copies of the matrix to hold ≥ 256 MB, so the weights come
//! from DRAM as they do in a real decode step ("cold"); a single copy that stays in cache is
//! measured too ("hot"). Then the prefill shape m = 128, once, in GFLOP/s.
//!
//!     cargo run --release -p kiln-compress --example quant_gemv_bench [-- THREADS]

use std::time::Instant;

use kiln_compress::{rtn_int4, rtn_int8};
use kiln_tensor::quant::{int4_matmul, int8_weight_matmul, w8a8_matmul};
use kiln_tensor::{CpuKernels, Isa, Kernels};

/// Seconds per call: cycles through `copies` weights for at least `secs`, after one warm-up pass.
fn time_per_call(copies: usize, secs: f64, mut f: impl FnMut(usize)) -> f64 {
    for c in 0..copies {
        f(c);
    }
    let (t0, mut calls) = (Instant::now(), 0usize);
    while t0.elapsed().as_secs_f64() < secs || calls < copies {
        f(calls % copies);
        calls += 1;
    }
    t0.elapsed().as_secs_f64() / calls as f64
}

fn pseudo_random(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761).max(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32) * 2.0 - 1.0
        })
        .collect()
}

const TARGET_BYTES: usize = 256 << 20;

fn main() {
    let threads: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(2);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool");
    println!("quant_gemv_bench: {threads} threads, isa {}", Isa::detect().name());
    pool.install(|| {
        for (n, k) in [(768usize, 768usize), (3072, 768)] {
            println!("\nn = {n}, k = {k}, m = 1");
            println!(
                "{:<12} {:>9} {:>10} {:>10} {:>10} {:>10} {:>8}",
                "format", "MB", "cold µs", "cold GB/s", "GEMV/s", "hot GB/s", "vs f32"
            );
            let w = pseudo_random(n * k, 1);
            let x = pseudo_random(k, 2);
            let mut y = vec![0.0f32; n];
            let kern = CpuKernels::default();
            let q8 = rtn_int8(&w, n, k).expect("int8");
            let q4 = rtn_int4(&w, n, k, 128).expect("int4");
            let mut f32_cold = 0.0;
            let mut row = |name: &str,
                           bytes: usize,
                           f32_cold: &mut f64,
                           run: &mut dyn FnMut(usize, &mut [f32]),
                           copies: usize| {
                let cold = time_per_call(copies, 1.0, |c| run(c, &mut y));
                let hot = time_per_call(1, 0.5, |_| run(0, &mut y));
                if *f32_cold == 0.0 {
                    *f32_cold = cold;
                }
                println!(
                    "{name:<12} {:>9.2} {:>10.1} {:>10.2} {:>10.0} {:>10.2} {:>7.2}x",
                    bytes as f64 / 1e6,
                    cold * 1e6,
                    bytes as f64 / cold / 1e9,
                    1.0 / cold,
                    bytes as f64 / hot / 1e9,
                    *f32_cold / cold
                );
            };
            let copies = |bytes: usize| TARGET_BYTES.div_ceil(bytes);
            let bytes = 4 * n * k;
            let ws: Vec<Vec<f32>> = (0..copies(bytes)).map(|_| w.clone()).collect();
            row("f32", bytes, &mut f32_cold, &mut |c, y| kern.matmul_forward(y, &x, &ws[c], None, k, n), ws.len());
            drop(ws);
            let bytes = q8.weight_bytes();
            let qs: Vec<_> = (0..copies(bytes)).map(|_| q8.clone()).collect();
            row("int8", bytes, &mut f32_cold, &mut |c, y| int8_weight_matmul(y, &x, &qs[c], None, 1), qs.len());
            row("w8a8", bytes, &mut f32_cold, &mut |c, y| w8a8_matmul(y, &x, &qs[c], None, 1), qs.len());
            drop(qs);
            let bytes = q4.weight_bytes();
            let qs: Vec<_> = (0..copies(bytes)).map(|_| q4.clone()).collect();
            row("int4 g128", bytes, &mut f32_cold, &mut |c, y| int4_matmul(y, &x, &qs[c], None, 1), qs.len());
            drop(qs);

            let m = 128;
            let xm = pseudo_random(m * k, 3);
            let mut ym = vec![0.0f32; m * n];
            let flop = 2.0 * (m * n * k) as f64;
            let gf = |t: f64| flop / t / 1e9;
            let t32 = time_per_call(1, 0.5, |_| kern.matmul_forward(&mut ym, &xm, &w, None, k, n));
            let t8 = time_per_call(1, 0.5, |_| int8_weight_matmul(&mut ym, &xm, &q8, None, m));
            let ta = time_per_call(1, 0.5, |_| w8a8_matmul(&mut ym, &xm, &q8, None, m));
            let t4 = time_per_call(1, 0.5, |_| int4_matmul(&mut ym, &xm, &q4, None, m));
            println!("m = {m}: GFLOP/s f32 {:.1}, int8 {:.1}, w8a8 {:.1}, int4 {:.1}", gf(t32), gf(t8), gf(ta), gf(t4));
        }
    });
}
