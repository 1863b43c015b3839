//! `G += Xᵀ·X` in f64: the Gram matrix (GPTQ's Hessian `2·XᵀX` up to the factor) that
//! calibration accumulates over batches of activations.
//!
//! The fast version hands row blocks of G to rayon tasks, each a single-threaded `gemm` call
//! that reads X through strides (no transposed copy); the scalar reference sits beside it.

use rayon::prelude::*;

/// Rows of G per task: 64 rows of k ≤ 4096 f64 are at most 2 MB.
const BLOCK: usize = 64;

/// `gram[k, k] += x[rows, k]ᵀ · x`, row-major.
///
/// # Panics
/// If `gram` is not `k·k` long or `x` not `rows·k`.
pub fn gram_accumulate_f64(gram: &mut [f64], x: &[f64], rows: usize, k: usize) {
    assert_eq!(gram.len(), k * k, "gram must be k·k");
    assert_eq!(x.len(), rows * k, "x must be rows·k");
    if rows == 0 || k == 0 {
        return;
    }
    gram.par_chunks_mut(BLOCK * k).enumerate().for_each(|(b, dst)| {
        let i0 = b * BLOCK;
        let bi = dst.len() / k;
        // SAFETY: dst is bi·k (dst_rs = k, dst_cs = 1); the lhs view (i, r) ↦ x[r·k + i0 + i]
        // reads rows < `rows`, columns < i0 + bi ≤ k; the rhs view (r, j) ↦ x[r·k + j] reads
        // within rows·k: every access stays inside the slices, and dst aliases neither.
        unsafe {
            gemm::gemm(
                bi,
                k,
                rows,
                dst.as_mut_ptr(),
                1,
                k as isize,
                true,
                x.as_ptr().add(i0),
                k as isize,
                1,
                x.as_ptr(),
                1,
                k as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    });
}

#[cfg(test)]
fn gram_accumulate_f64_reference(gram: &mut [f64], x: &[f64], rows: usize, k: usize) {
    for r in 0..rows {
        let row = &x[r * k..(r + 1) * k];
        for i in 0..k {
            for j in 0..k {
                gram[i * k + j] += row[i] * row[j];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    #[test]
    fn gram_matches_reference_on_awkward_sizes() {
        let mut r = rng(3);
        for (rows, k) in [(1, 1), (3, 5), (17, 70), (130, 129), (5, 200)] {
            let x: Vec<f64> = randn(&mut r, rows * k, 1.0).into_iter().map(f64::from).collect();
            let start: Vec<f64> = randn(&mut r, k * k, 0.5).into_iter().map(f64::from).collect();
            let (mut fast, mut slow) = (start.clone(), start);
            gram_accumulate_f64(&mut fast, &x, rows, k);
            gram_accumulate_f64_reference(&mut slow, &x, rows, k);
            for (a, b) in fast.iter().zip(&slow) {
                assert!((a - b).abs() <= 1e-12 * (1.0 + b.abs()) * rows as f64, "{rows}×{k}: {a} vs {b}");
            }
        }
    }
}
