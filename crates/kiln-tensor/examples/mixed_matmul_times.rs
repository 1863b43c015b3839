//! Milliseconds of one linear layer's forward and backward at the gpt-s training shapes (2048
//! rows), f32 `CpuKernels` against `MixedPrecisionKernels` in bf16 and fp16, timed alternately.
//! Run: cargo run --release -p kiln-tensor --example mixed_matmul_times

use std::time::Instant;

use kiln_tensor::{CpuKernels, Kernels, LowPrecision, MixedPrecisionKernels};

fn main() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().expect("thread pool");
    pool.install(run);
}

fn best_ms(mut f: impl FnMut()) -> f64 {
    f();
    (0..3)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::INFINITY, f64::min)
}

fn run() {
    let m = 2048usize;
    let fill =
        |len: usize, s: usize| (0..len).map(|i| ((i * 7919 + s) % 1000) as f32 / 1000.0 - 0.5).collect::<Vec<f32>>();
    let kernels: Vec<Box<dyn Kernels>> = vec![
        Box::new(CpuKernels::default()),
        Box::new(MixedPrecisionKernels::new(Box::new(CpuKernels::default()), LowPrecision::Bf16, false)),
        Box::new(MixedPrecisionKernels::new(Box::new(CpuKernels::default()), LowPrecision::Fp16, false)),
    ];
    for (k, n) in [(384usize, 1152usize), (384, 384), (384, 1536), (1536, 384), (384, 8192)] {
        let (x, w, b, dy) = (fill(m * k, 1), fill(n * k, 2), fill(n, 3), fill(m * n, 4));
        let (mut y, mut dx, mut dw, mut db) =
            (vec![0.0f32; m * n], vec![0.0f32; m * k], vec![0.0f32; n * k], vec![0.0f32; n]);
        let mut line = format!("k={k:5} n={n:5}");
        for kern in &kernels {
            let f = best_ms(|| kern.matmul_forward(&mut y, &x, &w, Some(&b), k, n));
            let bw = best_ms(|| kern.matmul_backward(&mut dx, &mut dw, Some(&mut db), &dy, &x, &w, k, n));
            line += &format!("   {} fwd {f:6.1} bwd {bw:6.1} ms", kern.name());
        }
        println!("{line}");
    }
}
