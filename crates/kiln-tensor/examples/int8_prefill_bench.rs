//! Int8 weight-only (or W8A8) prefill of m activation rows alone, in GFLOP/s, for A/B runs of
//! the paths: `KILN_INT8=vnni` keeps the VNNI block dots where the AMX tiles would run.
//!
//!     cargo run --release -p kiln-tensor --example int8_prefill_bench [-- M N K SECONDS THREADS [w8a8]]

use std::time::Instant;

use kiln_tensor::quant::{int8_weight_matmul, w8a8_matmul, Int8Weight};

fn main() {
    let arg = |i: usize, d: usize| std::env::args().nth(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    let (m, n, k, secs, threads) = (arg(1, 128), arg(2, 768), arg(3, 768), arg(4, 2), arg(5, 2));
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool");
    let q = (0..n * k).map(|i| ((i * 7919 % 255) as i32 - 127) as i8).collect();
    let w = Int8Weight::from_parts(n, k, q, vec![0.01; n], None).expect("weight");
    let x: Vec<f32> = (0..m * k).map(|i| (i * 104_729 % 1000) as f32 / 500.0 - 1.0).collect();
    let mut y = vec![0.0f32; m * n];
    let w8a8 = std::env::args().nth(6).is_some_and(|a| a == "w8a8");
    let matmul = if w8a8 { w8a8_matmul } else { int8_weight_matmul };
    pool.install(|| {
        matmul(&mut y, &x, &w, None, m);
        let (t0, mut calls) = (Instant::now(), 0usize);
        while t0.elapsed().as_secs_f64() < secs as f64 {
            matmul(&mut y, &x, &w, None, m);
            calls += 1;
        }
        let t = t0.elapsed().as_secs_f64() / calls as f64;
        println!(
            "{} m {m} n {n} k {k}, {threads} threads: {:.1} µs, {:.1} GFLOP/s",
            if w8a8 { "w8a8" } else { "int8" },
            t * 1e6,
            2.0 * (m * n * k) as f64 / t / 1e9
        );
    });
}
