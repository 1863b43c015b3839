//! How far a quantized layer's outputs are from the original's on given inputs: the quantity
//! GPTQ and AWQ minimise, `‖(W_eff − W)·Xᵀ‖²`.

use kiln_tensor::{CpuKernels, Kernels};

/// `‖(W_eff − W)·Xᵀ‖²_F` over `rows` input rows `x [rows, k]`, for weights `[n, k]`
/// (products in f32 on the fast kernels, the sum of squares in f64).
///
/// # Panics
/// If the slices are not `n·k` and `rows·k` long.
pub fn output_error_sq(w: &[f32], w_eff: &[f32], n: usize, k: usize, x: &[f32], rows: usize) -> f64 {
    assert!(w.len() == n * k && w_eff.len() == n * k && x.len() == rows * k, "output_error_sq: sizes");
    let d: Vec<f32> = w_eff.iter().zip(w).map(|(a, b)| a - b).collect();
    sum_sq_of_product(&d, n, k, x, rows)
}

/// `‖(W_eff − W)·Xᵀ‖ / ‖W·Xᵀ‖`: the layer's relative output error on `x`.
///
/// # Panics
/// As [`output_error_sq`].
pub fn relative_output_error(w: &[f32], w_eff: &[f32], n: usize, k: usize, x: &[f32], rows: usize) -> f64 {
    let num = output_error_sq(w, w_eff, n, k, x, rows);
    let den = sum_sq_of_product(w, n, k, x, rows);
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// `‖X·Mᵀ‖²` for `M [n, k]`.
fn sum_sq_of_product(m: &[f32], n: usize, k: usize, x: &[f32], rows: usize) -> f64 {
    let mut out = vec![0.0f32; rows * n];
    CpuKernels::default().matmul_forward(&mut out, x, m, None, k, n);
    out.iter().map(|&v| (v as f64) * (v as f64)).sum()
}
