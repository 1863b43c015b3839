//! Random weights and calibration data shared by the algorithm tests.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Uniform in [−scale, scale).
pub fn randn(r: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| (r.random::<f32>() * 2.0 - 1.0) * scale).collect()
}

/// Approximately standard normal (sum of four uniforms, rescaled).
pub fn gauss(r: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| (0..4).map(|_| r.random::<f32>() - 0.5).sum::<f32>() * 1.732).collect()
}

/// Activations like a transformer's: low-rank correlated structure plus noise, with a few
/// channels (`outliers` of them) `boost` times larger than the rest.
pub fn llm_like_activations(
    r: &mut ChaCha8Rng,
    rows: usize,
    k: usize,
    rank: usize,
    outliers: usize,
    boost: f32,
) -> Vec<f32> {
    let basis = gauss(r, rank * k);
    let mut x = vec![0.0f32; rows * k];
    for row in x.chunks_exact_mut(k) {
        let coef = gauss(r, rank);
        for (i, v) in row.iter_mut().enumerate() {
            *v = (0..rank).map(|j| coef[j] * basis[j * k + i]).sum::<f32>() + 0.3 * gauss(r, 1)[0];
        }
    }
    let channels: Vec<usize> = (0..outliers).map(|j| (j * 37 + 5) % k).collect();
    for row in x.chunks_exact_mut(k) {
        for &c in &channels {
            row[c] *= boost;
        }
    }
    x
}

/// `x [m, k] · wᵀ` with w `[n, k]`, in f64.
pub fn dense_matmul(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut y = vec![0.0f32; m * n];
    for r in 0..m {
        for o in 0..n {
            y[r * n + o] = (0..k).map(|i| x[r * k + i] as f64 * w[o * k + i] as f64).sum::<f64>() as f32;
        }
    }
    y
}

/// ‖a − b‖ / ‖b‖.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}
