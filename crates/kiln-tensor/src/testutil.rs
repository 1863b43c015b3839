//! Random inputs and error measures shared by the reference-versus-fast kernel tests.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

pub fn randn(r: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| (r.random::<f32>() * 2.0 - 1.0) * scale).collect()
}

/// ‖a − b‖ / ‖b‖, the measure every kernel test bounds.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        num += (x as f64 - y as f64).powi(2);
        den += (y as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

pub fn assert_close(what: &str, a: &[f32], b: &[f32], tol: f64) {
    assert!(a.iter().all(|x| x.is_finite()), "{what}: non-finite output");
    let e = rel_err(a, b);
    assert!(e < tol, "{what}: relative error {e:e} exceeds {tol:e}");
}
