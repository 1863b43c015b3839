//! Reads one GPT-2 124M f32 decode step's weights (12 layers of qkv, proj, fc, fc-proj, then
//! the 50,304-row head) through `matmul_forward` with one row, as generation does, and prints
//! the rate in GB/s beside the measured read bandwidth (`probe::read_bandwidth_gbs`).
//! Run: cargo run --release -p kiln-tensor --example gemv_stream (`KILN_GEMV=one|four` picks the
//! row walk; the default follows the CPU vendor, see `GemvLayout`)

use std::time::Instant;

use kiln_tensor::{probe, CpuKernels, Kernels};

fn main() {
    let k = CpuKernels::default();
    let c = 768;
    let mut shapes = vec![];
    for _ in 0..12 {
        shapes.extend([(c, 3 * c), (c, c), (c, 4 * c), (4 * c, c)]);
    }
    shapes.push((c, 50304));
    let weights: Vec<Vec<f32>> =
        shapes.iter().map(|&(i, o)| (0..i * o).map(|j| (j % 7) as f32 * 0.01).collect()).collect();
    let inputs: Vec<Vec<f32>> = shapes.iter().map(|&(i, _)| vec![0.5f32; i]).collect();
    let mut outputs: Vec<Vec<f32>> = shapes.iter().map(|&(_, o)| vec![0.0f32; o]).collect();
    let bytes: usize = weights.iter().map(|w| w.len() * 4).sum();
    let reps = 20;
    for round in 0..3 {
        let secs = kiln_tensor::on_workers(|| {
            let mut step = || {
                for ((w, x), y) in weights.iter().zip(&inputs).zip(outputs.iter_mut()) {
                    let (c_in, c_out) = (x.len(), y.len());
                    k.matmul_forward(y, x, w, None, c_in, c_out);
                }
            };
            step();
            let t = Instant::now();
            for _ in 0..reps {
                step();
            }
            t.elapsed().as_secs_f64() / reps as f64
        });
        println!(
            "round {round}: decode-step weights {:.1} MB at {:.1} GB/s; read bandwidth probe {:.1} GB/s",
            bytes as f64 / 1e6,
            bytes as f64 / secs / 1e9,
            probe::read_bandwidth_gbs()
        );
    }
}
