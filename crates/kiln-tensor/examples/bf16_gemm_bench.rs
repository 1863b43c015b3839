//! GFLOP/s of `bf16::matmul_bf16` against the f32 `CpuKernels::matmul_forward` at the gpt-s
//! training shapes (2048 rows), on 2 threads, timed alternately so both see the same machine.
//! Run: cargo run --release -p kiln-tensor --example bf16_gemm_bench

use std::time::Instant;

use half::bf16;
use kiln_tensor::{CpuKernels, Kernels};

fn main() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().expect("thread pool");
    pool.install(run);
}

fn run() {
    let kern = CpuKernels::default();
    let m = 2048usize;
    let fill =
        |len: usize, s: usize| (0..len).map(|i| ((i * 7919 + s) % 1000) as f32 / 1000.0 - 0.5).collect::<Vec<f32>>();
    println!("{} ; isa {:?}; 2 threads; m = {m}", kern.name(), kiln_tensor::Isa::detect());
    for (k, n) in [(384usize, 1152usize), (384, 384), (384, 1536), (1536, 384), (384, 8192)] {
        let (x, w, b) = (fill(m * k, 1), fill(n * k, 2), fill(n, 3));
        let (mut xb, mut wb) = (vec![bf16::ZERO; m * k], vec![bf16::ZERO; n * k]);
        kiln_tensor::bf16::f32_to_bf16_rne(&x, &mut xb);
        kiln_tensor::bf16::f32_to_bf16_rne(&w, &mut wb);
        let mut y = vec![0.0f32; m * n];
        let (mut t_bf, mut t_f32) = (f64::INFINITY, f64::INFINITY);
        // Warm-up, then best of alternating A/B repetitions.
        kiln_tensor::bf16::matmul_bf16(&mut y, &xb, &wb, Some(&b), m, k, n);
        kern.matmul_forward(&mut y, &x, &w, Some(&b), k, n);
        for _ in 0..5 {
            let t = Instant::now();
            kiln_tensor::bf16::matmul_bf16(&mut y, &xb, &wb, Some(&b), m, k, n);
            t_bf = t_bf.min(t.elapsed().as_secs_f64());
            let t = Instant::now();
            kern.matmul_forward(&mut y, &x, &w, Some(&b), k, n);
            t_f32 = t_f32.min(t.elapsed().as_secs_f64());
        }
        let gf = 2.0 * (m * k * n) as f64 / 1e9;
        println!(
            "k={k:5} n={n:5}  bf16 {:7.2} ms {:6.1} GFLOP/s   f32 {:7.2} ms {:6.1} GFLOP/s   ratio {:.2}",
            t_bf * 1e3,
            gf / t_bf,
            t_f32 * 1e3,
            gf / t_f32,
            t_f32 / t_bf
        );
    }
}
