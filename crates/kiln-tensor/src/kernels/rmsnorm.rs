//! RMSNorm over the last dimension (Llama's): `y = x / √(mean(x²) + eps) · w`.

use rayon::prelude::*;

use super::ROW_CHUNK;
use crate::simd::{Isa, Simd};

pub(crate) fn rmsnorm_forward_reference(
    out: &mut [f32],
    rstd: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    c: usize,
    eps: f32,
) {
    for r in 0..inp.len() / c {
        let x = &inp[r * c..(r + 1) * c];
        let ms = x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / c as f64;
        let s = 1.0 / (ms + eps as f64).sqrt();
        for j in 0..c {
            out[r * c + j] = (x[j] as f64 * s * weight[j] as f64) as f32;
        }
        rstd[r] = s as f32;
    }
}

/// With x̂ = x·s: dx = s·(g·w − x̂·mean(g·w·x̂)); accumulates `dinp` and `dweight`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn rmsnorm_backward_reference(
    dinp: &mut [f32],
    dweight: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    rstd: &[f32],
    c: usize,
) {
    for r in 0..inp.len() / c {
        let s = rstd[r] as f64;
        let mut mean_gwx = 0.0f64;
        for j in 0..c {
            mean_gwx += dout[r * c + j] as f64 * weight[j] as f64 * inp[r * c + j] as f64 * s;
        }
        mean_gwx /= c as f64;
        for j in 0..c {
            let xh = inp[r * c + j] as f64 * s;
            let g = dout[r * c + j] as f64;
            dweight[j] += (g * xh) as f32;
            dinp[r * c + j] += ((g * weight[j] as f64 - xh * mean_gwx) * s) as f32;
        }
    }
}

#[inline(always)]
unsafe fn rms_fwd_rows<S: Simd>(out: &mut [f32], rstd: &mut [f32], inp: &[f32], weight: &[f32], c: usize, eps: f32) {
    let w = weight.as_ptr();
    let lanes_end = c - c % S::LANES;
    for (r, rs) in rstd.iter_mut().enumerate() {
        let x = inp.as_ptr().add(r * c);
        let o = out.as_mut_ptr().add(r * c);
        let mut acc = S::zero();
        let mut j = 0;
        while j < lanes_end {
            let v = S::load(x.add(j));
            acc = S::fma(v, v, acc);
            j += S::LANES;
        }
        let mut ss = S::reduce_sum(acc);
        for j in lanes_end..c {
            ss += *x.add(j) * *x.add(j);
        }
        let s = 1.0 / (ss / c as f32 + eps).sqrt();
        let sv = S::splat(s);
        let mut j = 0;
        while j < lanes_end {
            S::store(o.add(j), S::mul(S::mul(S::load(x.add(j)), sv), S::load(w.add(j))));
            j += S::LANES;
        }
        for j in lanes_end..c {
            *o.add(j) = *x.add(j) * s * *w.add(j);
        }
        *rs = s;
    }
}
crate::multiversion!(fn rms_fwd_v(out: &mut [f32], rstd: &mut [f32], inp: &[f32], weight: &[f32], c: usize, eps: f32) => rms_fwd_rows);

/// Backward for a block of rows; `dw` is this block's own partial sum.
#[inline(always)]
unsafe fn rms_bwd_rows<S: Simd>(
    dinp: &mut [f32],
    dw: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    rstd: &[f32],
    c: usize,
) {
    let w = weight.as_ptr();
    let lanes_end = c - c % S::LANES;
    for (r, &s) in rstd.iter().enumerate() {
        let x = inp.as_ptr().add(r * c);
        let g = dout.as_ptr().add(r * c);
        let dx = dinp.as_mut_ptr().add(r * c);
        let sv = S::splat(s);
        let mut acc = S::zero();
        let mut j = 0;
        while j < lanes_end {
            let gw = S::mul(S::load(g.add(j)), S::load(w.add(j)));
            acc = S::fma(gw, S::load(x.add(j)), acc);
            j += S::LANES;
        }
        let mut gwx = S::reduce_sum(acc);
        for j in lanes_end..c {
            gwx += *g.add(j) * *w.add(j) * *x.add(j);
        }
        let mean_gwx = gwx * s / c as f32;
        let mv = S::splat(mean_gwx);
        let mut j = 0;
        while j < lanes_end {
            let xh = S::mul(S::load(x.add(j)), sv);
            let gv = S::load(g.add(j));
            S::store(dw.as_mut_ptr().add(j), S::fma(gv, xh, S::load(dw.as_ptr().add(j))));
            let t = S::sub(S::mul(gv, S::load(w.add(j))), S::mul(xh, mv));
            S::store(dx.add(j), S::fma(t, sv, S::load(dx.add(j))));
            j += S::LANES;
        }
        for (j, dwj) in dw.iter_mut().enumerate().take(c).skip(lanes_end) {
            let xh = *x.add(j) * s;
            let gv = *g.add(j);
            *dwj += gv * xh;
            *dx.add(j) += (gv * *w.add(j) - xh * mean_gwx) * s;
        }
    }
}
crate::multiversion!(fn rms_bwd_v(dinp: &mut [f32], dw: &mut [f32], dout: &[f32], inp: &[f32], weight: &[f32], rstd: &[f32], c: usize) => rms_bwd_rows);

pub(crate) fn rmsnorm_forward(
    isa: Isa,
    out: &mut [f32],
    rstd: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    c: usize,
    eps: f32,
) {
    let rows = inp.len() / c;
    assert!(out.len() == inp.len() && rstd.len() >= rows && weight.len() == c);
    out.par_chunks_mut(ROW_CHUNK * c)
        .zip(rstd[..rows].par_chunks_mut(ROW_CHUNK))
        .zip(inp.par_chunks(ROW_CHUNK * c))
        .for_each(|((o, s), x)| rms_fwd_v(isa, o, s, x, weight, c, eps));
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn rmsnorm_backward(
    isa: Isa,
    dinp: &mut [f32],
    dweight: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    rstd: &[f32],
    c: usize,
) {
    let rows = inp.len() / c;
    assert!(dinp.len() == inp.len() && dout.len() == inp.len() && dweight.len() == c && rstd.len() >= rows);
    // Fixed blocks of rows sum their own dweight, added in order: thread-count independent.
    let blocks = rows.div_ceil(ROW_CHUNK);
    let mut partial = vec![0.0f32; blocks * c];
    dinp.par_chunks_mut(ROW_CHUNK * c).zip(partial.par_chunks_mut(c)).enumerate().for_each(|(bi, (dx, dw))| {
        let r0 = bi * ROW_CHUNK;
        let r1 = (r0 + ROW_CHUNK).min(rows);
        rms_bwd_v(isa, dx, dw, &dout[r0 * c..r1 * c], &inp[r0 * c..r1 * c], weight, &rstd[r0..r1], c);
    });
    for p in partial.chunks(c) {
        super::encoder::accumulate_row(isa, dweight, p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    #[test]
    fn rmsnorm_fast_matches_reference() {
        for &(rows, c) in &[(1usize, 7usize), (37, 67), (53, 389)] {
            let mut r = rng(40 + c as u64);
            let inp: Vec<f32> = randn(&mut r, rows * c, 2.0).iter().map(|x| x + 0.3).collect();
            let w = randn(&mut r, c, 1.0);
            let g = randn(&mut r, rows * c, 1.0);
            let (mut y0, mut s0) = (vec![0.0; rows * c], vec![0.0; rows]);
            rmsnorm_forward_reference(&mut y0, &mut s0, &inp, &w, c, 1e-6);
            let (mut dx0, mut dw0) = (vec![0.1; rows * c], vec![0.2; c]);
            rmsnorm_backward_reference(&mut dx0, &mut dw0, &g, &inp, &w, &s0, c);
            for isa in Isa::all_supported() {
                let (mut y, mut s) = (vec![0.0; rows * c], vec![0.0; rows]);
                rmsnorm_forward(isa, &mut y, &mut s, &inp, &w, c, 1e-6);
                assert_close("rms fwd", &y, &y0, 1e-6);
                assert_close("rms rstd", &s, &s0, 1e-6);
                let (mut dx, mut dw) = (vec![0.1; rows * c], vec![0.2; c]);
                rmsnorm_backward(isa, &mut dx, &mut dw, &g, &inp, &w, &s, c);
                assert_close("rms dinp", &dx, &dx0, 1e-5);
                assert_close("rms dweight", &dw, &dw0, 1e-5);
            }
        }
    }

    /// The backward is the derivative of the forward: a finite-difference check in f64.
    #[test]
    fn rmsnorm_backward_is_the_gradient() {
        let (rows, c) = (3usize, 11usize);
        let mut r = rng(9);
        let inp = randn(&mut r, rows * c, 1.5);
        let w = randn(&mut r, c, 1.0);
        let g = randn(&mut r, rows * c, 1.0);
        let loss = |x: &[f32]| {
            let (mut y, mut s) = (vec![0.0; rows * c], vec![0.0; rows]);
            rmsnorm_forward_reference(&mut y, &mut s, x, &w, c, 1e-5);
            y.iter().zip(&g).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>()
        };
        let (mut y, mut s) = (vec![0.0; rows * c], vec![0.0; rows]);
        rmsnorm_forward_reference(&mut y, &mut s, &inp, &w, c, 1e-5);
        let (mut dx, mut dw) = (vec![0.0; rows * c], vec![0.0; c]);
        rmsnorm_backward_reference(&mut dx, &mut dw, &g, &inp, &w, &s, c);
        for i in [0, 5, 17, 32] {
            let h = 1e-3f32;
            let (mut a, mut b) = (inp.clone(), inp.clone());
            a[i] += h;
            b[i] -= h;
            let fd = (loss(&a) - loss(&b)) / (2.0 * h as f64);
            assert!((fd - dx[i] as f64).abs() < 2e-3 * (1.0 + fd.abs()), "dx[{i}]: {fd} vs {}", dx[i]);
        }
    }
}
