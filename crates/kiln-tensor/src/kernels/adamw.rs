//! AdamW (decoupled weight decay), step for step as `torch.optim.AdamW` computes it, and the
//! sum of squares behind global-norm gradient clipping.

use rayon::prelude::*;

use super::ELEM_CHUNK;
use crate::simd::{Isa, Simd};

/// Hyper-parameters of one optimizer step for one tensor.
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// 0 for biases, LayerNorm parameters and other 1-D tensors (GPT-2 / nanoGPT convention).
    pub weight_decay: f32,
    /// 1-based step number, for bias correction.
    pub t: u64,
    /// Multiplies the gradient first: the clipping coefficient (1 when not clipping).
    pub grad_scale: f32,
}

impl AdamWStep {
    /// (1 − lr·wd, lr / (1 − β1ᵗ), √(1 − β2ᵗ)), in f32 as PyTorch computes them.
    fn coefficients(&self) -> (f32, f32, f32) {
        let bc1 = 1.0 - (self.beta1 as f64).powi(self.t as i32);
        let bc2 = 1.0 - (self.beta2 as f64).powi(self.t as i32);
        let decay = 1.0 - self.lr as f64 * self.weight_decay as f64;
        (decay as f32, (self.lr as f64 / bc1) as f32, bc2.sqrt() as f32)
    }
}

pub(crate) fn adamw_reference(params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], s: &AdamWStep) {
    let (decay, step_size, bc2_sqrt) = s.coefficients();
    for i in 0..params.len() {
        let g = grads[i] * s.grad_scale;
        params[i] *= decay;
        m[i] += (g - m[i]) * (1.0 - s.beta1); // lerp, as torch's exp_avg.lerp_
        v[i] = v[i] * s.beta2 + (1.0 - s.beta2) * g * g;
        let denom = v[i].sqrt() / bc2_sqrt + s.eps;
        params[i] -= step_size * (m[i] / denom); // torch: addcdiv_(m, denom, -step_size)
    }
}

#[inline(always)]
unsafe fn adamw_body<S: Simd>(params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], s: &AdamWStep) {
    let (decay, step_size, bc2_sqrt) = s.coefficients();
    let n = params.len();
    let (p, g, mp, vp) = (params.as_mut_ptr(), grads.as_ptr(), m.as_mut_ptr(), v.as_mut_ptr());
    let (sc, dec, b1c, b2, b2c) =
        (S::splat(s.grad_scale), S::splat(decay), S::splat(1.0 - s.beta1), S::splat(s.beta2), S::splat(1.0 - s.beta2));
    let (ss, bc2, eps) = (S::splat(step_size), S::splat(bc2_sqrt), S::splat(s.eps));
    let mut i = 0;
    while i + S::LANES <= n {
        let gv = S::mul(S::load(g.add(i)), sc);
        let pv = S::mul(S::load(p.add(i)), dec);
        let mv = S::load(mp.add(i));
        let mv = S::add(mv, S::mul(S::sub(gv, mv), b1c));
        // Unfused like torch's mul_ then addcmul_, so the moments match it bit for bit.
        let vv = S::add(S::mul(S::load(vp.add(i)), b2), S::mul(S::mul(b2c, gv), gv));
        let denom = S::add(S::div(S::sqrt(vv), bc2), eps);
        S::store(p.add(i), S::sub(pv, S::mul(ss, S::div(mv, denom))));
        S::store(mp.add(i), mv);
        S::store(vp.add(i), vv);
        i += S::LANES;
    }
    if i < n {
        adamw_reference(&mut params[i..], &grads[i..], &mut m[i..], &mut v[i..], s);
    }
}
crate::multiversion!(fn adamw_v(params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], s: &AdamWStep) => adamw_body);

pub(crate) fn adamw_update(isa: Isa, params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], s: &AdamWStep) {
    assert!(grads.len() == params.len() && m.len() == params.len() && v.len() == params.len());
    params
        .par_chunks_mut(ELEM_CHUNK)
        .zip(grads.par_chunks(ELEM_CHUNK))
        .zip(m.par_chunks_mut(ELEM_CHUNK).zip(v.par_chunks_mut(ELEM_CHUNK)))
        .for_each(|((p, g), (m, v))| adamw_v(isa, p, g, m, v, s));
}

pub(crate) fn sum_of_squares_reference(x: &[f32]) -> f64 {
    x.iter().map(|&a| a as f64 * a as f64).sum()
}

#[inline(always)]
unsafe fn sumsq_body<S: Simd>(x: &[f32]) -> f64 {
    let n = x.len();
    let p = x.as_ptr();
    let mut acc = S::zero();
    let mut i = 0;
    while i + S::LANES <= n {
        let a = S::load(p.add(i));
        acc = S::fma(a, a, acc);
        i += S::LANES;
    }
    let mut s = S::reduce_sum(acc) as f64;
    while i < n {
        s += (*p.add(i) as f64).powi(2);
        i += 1;
    }
    s
}
crate::multiversion!(fn sumsq_v(x: &[f32]) -> f64 => sumsq_body);

pub(crate) fn sum_of_squares(isa: Isa, x: &[f32]) -> f64 {
    // f32 partial sums over fixed chunks, combined in order in f64: deterministic and accurate.
    let partial: Vec<f64> = x.par_chunks(ELEM_CHUNK).map(|c| sumsq_v(isa, c)).collect();
    partial.iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    #[test]
    fn adamw_fast_matches_reference_bit_for_bit() {
        let n = 2 * ELEM_CHUNK + 77;
        let mut r = rng(7);
        let p0 = randn(&mut r, n, 1.0);
        let g = randn(&mut r, n, 0.1);
        let m0 = randn(&mut r, n, 0.01);
        let v0: Vec<f32> = randn(&mut r, n, 0.01).iter().map(|x| x * x).collect();
        let s = AdamWStep { lr: 1e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, t: 3, grad_scale: 0.7 };
        let (mut p1, mut m1, mut v1) = (p0.clone(), m0.clone(), v0.clone());
        adamw_reference(&mut p1, &g, &mut m1, &mut v1, &s);
        for isa in Isa::all_supported() {
            let (mut p2, mut m2, mut v2) = (p0.clone(), m0.clone(), v0.clone());
            adamw_update(isa, &mut p2, &g, &mut m2, &mut v2, &s);
            assert_eq!(p1, p2, "{isa:?} params");
            assert_eq!(m1, m2, "{isa:?} m");
            assert_eq!(v1, v2, "{isa:?} v");
        }
        assert!(p1.iter().zip(&p0).any(|(a, b)| a != b), "the step changed nothing");
    }

    #[test]
    fn sum_of_squares_fast_matches_reference() {
        let mut r = rng(8);
        let x = randn(&mut r, 3 * ELEM_CHUNK + 5, 1.0);
        let want = sum_of_squares_reference(&x);
        for isa in Isa::all_supported() {
            let got = sum_of_squares(isa, &x);
            assert!(((got - want) / want).abs() < 1e-6, "{isa:?}: {got} vs {want}");
        }
    }
}
