//! Fused softmax + cross-entropy over the (padded) vocabulary, forward and backward in one pass.
//!
//! loss = logsumexp(z) − z[target]; dz = dloss · (softmax(z) − onehot(target)). Writing dz over
//! the logits saves a `[rows, vocab]` buffer, the largest activation of a small model.

use rayon::prelude::*;

use crate::simd::{Isa, Simd};

pub(crate) fn crossentropy_reference(
    logits: &mut [f32],
    losses: &mut [f32],
    targets: &[u32],
    v: usize,
    vp: usize,
    dloss: Option<f32>,
) {
    for (r, &tgt) in targets.iter().enumerate() {
        let z = &mut logits[r * vp..(r + 1) * vp];
        let max = z[..v].iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
        let sum: f64 = z[..v].iter().map(|&x| (x as f64 - max).exp()).sum();
        let lse = max + sum.ln();
        losses[r] = (lse - z[tgt as usize] as f64) as f32;
        if let Some(g) = dloss {
            for (j, zj) in z.iter_mut().enumerate() {
                *zj = if j < v {
                    let p = (*zj as f64 - lse).exp();
                    ((p - if j == tgt as usize { 1.0 } else { 0.0 }) * g as f64) as f32
                } else {
                    0.0
                };
            }
        }
    }
}

#[inline(always)]
unsafe fn ce_row<S: Simd>(z: &mut [f32], v: usize, tgt: usize, dloss: f32, backward: bool) -> f32 {
    let p = z.as_mut_ptr();
    let lanes_end = v - v % S::LANES;
    let mut mv = S::splat(f32::NEG_INFINITY);
    let mut j = 0;
    while j < lanes_end {
        mv = S::max(mv, S::load(p.add(j)));
        j += S::LANES;
    }
    let mut max = S::reduce_max(mv);
    for j in lanes_end..v {
        max = max.max(*p.add(j));
    }
    let maxv = S::splat(max);
    let mut acc = S::zero();
    let mut j = 0;
    while j < lanes_end {
        acc = S::add(acc, S::exp(S::sub(S::load(p.add(j)), maxv)));
        j += S::LANES;
    }
    let mut sum = S::reduce_sum(acc) as f64;
    for j in lanes_end..v {
        sum += (*p.add(j) - max).exp() as f64;
    }
    let log_sum = sum.ln() as f32;
    // (max − z[target]) + ln Σ: both terms accurate even when the loss is near zero.
    let loss = (max - *p.add(tgt)) + log_sum;
    if backward {
        let (maxv, lsv, g) = (S::splat(max), S::splat(log_sum), S::splat(dloss));
        let mut j = 0;
        while j < lanes_end {
            let e = S::exp(S::sub(S::sub(S::load(p.add(j)), maxv), lsv));
            S::store(p.add(j), S::mul(e, g));
            j += S::LANES;
        }
        for j in lanes_end..v {
            *p.add(j) = ((*p.add(j) - max) - log_sum).exp() * dloss;
        }
        *p.add(tgt) -= dloss;
        z[v..].fill(0.0);
    }
    loss
}
crate::multiversion!(fn ce_row_v(z: &mut [f32], v: usize, tgt: usize, dloss: f32, backward: bool) -> f32 => ce_row);

pub(crate) fn crossentropy_forward_backward(
    isa: Isa,
    logits: &mut [f32],
    losses: &mut [f32],
    targets: &[u32],
    v: usize,
    vp: usize,
    dloss: Option<f32>,
) {
    assert!(v <= vp && logits.len() == targets.len() * vp && losses.len() >= targets.len());
    assert!(targets.iter().all(|&t| (t as usize) < v), "target outside the vocabulary");
    logits.par_chunks_mut(vp).zip(losses.par_iter_mut()).zip(targets.par_iter()).for_each(|((z, loss), &tgt)| {
        *loss = ce_row_v(isa, z, v, tgt as usize, dloss.unwrap_or(0.0), dloss.is_some());
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    #[test]
    fn crossentropy_fast_matches_reference() {
        for &(rows, v, vp) in &[(1usize, 5usize, 64usize), (13, 97, 128), (29, 1000, 1024), (3, 67, 67)] {
            let mut r = rng(6 + v as u64);
            let logits = randn(&mut r, rows * vp, 8.0);
            let targets: Vec<u32> = (0..rows).map(|i| ((i * 31 + 7) % v) as u32).collect();
            for dloss in [None, Some(1.0 / rows as f32)] {
                let (mut z0, mut l0) = (logits.clone(), vec![0.0; rows]);
                crossentropy_reference(&mut z0, &mut l0, &targets, v, vp, dloss);
                for isa in Isa::all_supported() {
                    let (mut z, mut l) = (logits.clone(), vec![0.0; rows]);
                    crossentropy_forward_backward(isa, &mut z, &mut l, &targets, v, vp, dloss);
                    // A loss near zero is ln(1 + tiny): bound it by f32 resolution, not relatively.
                    for (a, b) in l.iter().zip(&l0) {
                        assert!((a - b).abs() <= 5e-7 * (1.0 + b.abs()), "{isa:?} ce loss {a} vs {b}");
                    }
                    assert_close("ce dlogits", &z, &z0, 1e-5);
                    if dloss.is_some() {
                        assert!(z.chunks(vp).all(|row| row[v..].iter().all(|&x| x == 0.0)));
                    }
                }
            }
        }
    }
}
