//! LayerNorm over the last dimension: `y = (x − μ)/σ · w + b`, σ = √(var + 1e-5).

use rayon::prelude::*;

use super::ROW_CHUNK;
use crate::simd::{Isa, Simd};

const EPS: f32 = 1e-5;

#[allow(clippy::too_many_arguments)]
pub(crate) fn layernorm_forward_reference(
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: &[f32],
    c: usize,
) {
    for r in 0..inp.len() / c {
        let x = &inp[r * c..(r + 1) * c];
        let m = x.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
        let var = x.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / c as f64;
        let s = 1.0 / (var + EPS as f64).sqrt();
        for j in 0..c {
            out[r * c + j] = ((x[j] as f64 - m) * s * weight[j] as f64 + bias[j] as f64) as f32;
        }
        mean[r] = m as f32;
        rstd[r] = s as f32;
    }
}

/// dx = (g·w − mean(g·w) − x̂·mean(g·w·x̂)) · rstd, with x̂ the normalised input.
#[allow(clippy::too_many_arguments)]
pub(crate) fn layernorm_backward_reference(
    dinp: &mut [f32],
    dweight: &mut [f32],
    dbias: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    mean: &[f32],
    rstd: &[f32],
    c: usize,
) {
    for r in 0..inp.len() / c {
        let (m, s) = (mean[r] as f64, rstd[r] as f64);
        let (mut mean_gw, mut mean_gwx) = (0.0f64, 0.0f64);
        for j in 0..c {
            let xh = (inp[r * c + j] as f64 - m) * s;
            let gw = dout[r * c + j] as f64 * weight[j] as f64;
            mean_gw += gw;
            mean_gwx += gw * xh;
        }
        mean_gw /= c as f64;
        mean_gwx /= c as f64;
        for j in 0..c {
            let xh = (inp[r * c + j] as f64 - m) * s;
            let g = dout[r * c + j] as f64;
            dbias[j] += g as f32;
            dweight[j] += (g * xh) as f32;
            dinp[r * c + j] += ((g * weight[j] as f64 - mean_gw - xh * mean_gwx) * s) as f32;
        }
    }
}

#[inline(always)]
unsafe fn ln_fwd_rows<S: Simd>(
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: &[f32],
    c: usize,
) {
    let (w, bs) = (weight.as_ptr(), bias.as_ptr());
    let lanes_end = c - c % S::LANES;
    for r in 0..mean.len() {
        let x = inp.as_ptr().add(r * c);
        let o = out.as_mut_ptr().add(r * c);
        let mut acc = S::zero();
        let mut j = 0;
        while j < lanes_end {
            acc = S::add(acc, S::load(x.add(j)));
            j += S::LANES;
        }
        let mut sum = S::reduce_sum(acc);
        for j in lanes_end..c {
            sum += *x.add(j);
        }
        let m = sum / c as f32;
        let mv = S::splat(m);
        let mut acc = S::zero();
        let mut j = 0;
        while j < lanes_end {
            let d = S::sub(S::load(x.add(j)), mv);
            acc = S::fma(d, d, acc);
            j += S::LANES;
        }
        let mut var = S::reduce_sum(acc);
        for j in lanes_end..c {
            let d = *x.add(j) - m;
            var += d * d;
        }
        let s = 1.0 / (var / c as f32 + EPS).sqrt();
        let sv = S::splat(s);
        let mut j = 0;
        while j < lanes_end {
            let xh = S::mul(S::sub(S::load(x.add(j)), mv), sv);
            S::store(o.add(j), S::fma(xh, S::load(w.add(j)), S::load(bs.add(j))));
            j += S::LANES;
        }
        for j in lanes_end..c {
            *o.add(j) = (*x.add(j) - m) * s * *w.add(j) + *bs.add(j);
        }
        mean[r] = m;
        rstd[r] = s;
    }
}
crate::multiversion!(fn ln_fwd_v(out: &mut [f32], mean: &mut [f32], rstd: &mut [f32], inp: &[f32], weight: &[f32], bias: &[f32], c: usize) => ln_fwd_rows);

/// Backward for a block of rows; `dw`/`db` are this block's own partial sums.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn ln_bwd_rows<S: Simd>(
    dinp: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    mean: &[f32],
    rstd: &[f32],
    c: usize,
) {
    let w = weight.as_ptr();
    let lanes_end = c - c % S::LANES;
    for r in 0..mean.len() {
        let x = inp.as_ptr().add(r * c);
        let g = dout.as_ptr().add(r * c);
        let dx = dinp.as_mut_ptr().add(r * c);
        let (m, s) = (mean[r], rstd[r]);
        let (mv, sv) = (S::splat(m), S::splat(s));
        let (mut a1, mut a2) = (S::zero(), S::zero());
        let mut j = 0;
        while j < lanes_end {
            let xh = S::mul(S::sub(S::load(x.add(j)), mv), sv);
            let gw = S::mul(S::load(g.add(j)), S::load(w.add(j)));
            a1 = S::add(a1, gw);
            a2 = S::fma(gw, xh, a2);
            j += S::LANES;
        }
        let (mut mean_gw, mut mean_gwx) = (S::reduce_sum(a1), S::reduce_sum(a2));
        for j in lanes_end..c {
            let xh = (*x.add(j) - m) * s;
            let gw = *g.add(j) * *w.add(j);
            mean_gw += gw;
            mean_gwx += gw * xh;
        }
        mean_gw /= c as f32;
        mean_gwx /= c as f32;
        let (mgw, mgwx) = (S::splat(mean_gw), S::splat(mean_gwx));
        let mut j = 0;
        while j < lanes_end {
            let xh = S::mul(S::sub(S::load(x.add(j)), mv), sv);
            let gv = S::load(g.add(j));
            S::store(db.as_mut_ptr().add(j), S::add(S::load(db.as_ptr().add(j)), gv));
            S::store(dw.as_mut_ptr().add(j), S::fma(gv, xh, S::load(dw.as_ptr().add(j))));
            let t = S::sub(S::sub(S::mul(gv, S::load(w.add(j))), mgw), S::mul(xh, mgwx));
            S::store(dx.add(j), S::fma(t, sv, S::load(dx.add(j))));
            j += S::LANES;
        }
        for j in lanes_end..c {
            let xh = (*x.add(j) - m) * s;
            let gv = *g.add(j);
            db[j] += gv;
            dw[j] += gv * xh;
            *dx.add(j) += (gv * *w.add(j) - mean_gw - xh * mean_gwx) * s;
        }
    }
}
crate::multiversion!(fn ln_bwd_v(dinp: &mut [f32], dw: &mut [f32], db: &mut [f32], dout: &[f32], inp: &[f32], weight: &[f32], mean: &[f32], rstd: &[f32], c: usize) => ln_bwd_rows);

#[allow(clippy::too_many_arguments)]
pub(crate) fn layernorm_forward(
    isa: Isa,
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: &[f32],
    c: usize,
) {
    let rows = inp.len() / c;
    assert!(out.len() == inp.len() && mean.len() >= rows && rstd.len() >= rows && weight.len() == c && bias.len() == c);
    out.par_chunks_mut(ROW_CHUNK * c)
        .zip(mean[..rows].par_chunks_mut(ROW_CHUNK).zip(rstd[..rows].par_chunks_mut(ROW_CHUNK)))
        .zip(inp.par_chunks(ROW_CHUNK * c))
        .for_each(|((o, (m, s)), x)| ln_fwd_v(isa, o, m, s, x, weight, bias, c));
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn layernorm_backward(
    isa: Isa,
    dinp: &mut [f32],
    dweight: &mut [f32],
    dbias: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    mean: &[f32],
    rstd: &[f32],
    c: usize,
) {
    let rows = inp.len() / c;
    assert!(dinp.len() == inp.len() && dout.len() == inp.len() && dweight.len() == c && dbias.len() == c);
    // Each fixed block of rows sums its own dweight/dbias; blocks are then added in order, so
    // the result does not depend on how many threads ran.
    let blocks = rows.div_ceil(ROW_CHUNK);
    let mut partial = vec![0.0f32; blocks * 2 * c];
    dinp.par_chunks_mut(ROW_CHUNK * c).zip(partial.par_chunks_mut(2 * c)).enumerate().for_each(|(bi, (dx, p))| {
        let r0 = bi * ROW_CHUNK;
        let r1 = (r0 + ROW_CHUNK).min(rows);
        let (dw, db) = p.split_at_mut(c);
        ln_bwd_v(isa, dx, dw, db, &dout[r0 * c..r1 * c], &inp[r0 * c..r1 * c], weight, &mean[r0..r1], &rstd[r0..r1], c);
    });
    for p in partial.chunks(2 * c) {
        super::encoder::accumulate_row(isa, dweight, &p[..c]);
        super::encoder::accumulate_row(isa, dbias, &p[c..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    #[test]
    fn layernorm_fast_matches_reference() {
        for &(rows, c) in &[(1usize, 7usize), (37, 67), (53, 389)] {
            let mut r = rng(4 + c as u64);
            let inp: Vec<f32> = randn(&mut r, rows * c, 2.0).iter().map(|x| x + 0.7).collect();
            let w = randn(&mut r, c, 1.0);
            let b = randn(&mut r, c, 1.0);
            let g = randn(&mut r, rows * c, 1.0);
            let (mut y0, mut m0, mut s0) = (vec![0.0; rows * c], vec![0.0; rows], vec![0.0; rows]);
            layernorm_forward_reference(&mut y0, &mut m0, &mut s0, &inp, &w, &b, c);
            let (mut dx0, mut dw0, mut db0) = (vec![0.1; rows * c], vec![0.2; c], vec![0.3; c]);
            layernorm_backward_reference(&mut dx0, &mut dw0, &mut db0, &g, &inp, &w, &m0, &s0, c);
            for isa in Isa::all_supported() {
                let (mut y, mut m, mut s) = (vec![0.0; rows * c], vec![0.0; rows], vec![0.0; rows]);
                layernorm_forward(isa, &mut y, &mut m, &mut s, &inp, &w, &b, c);
                assert_close("ln fwd", &y, &y0, 1e-6);
                assert_close("ln mean", &m, &m0, 1e-6);
                assert_close("ln rstd", &s, &s0, 1e-6);
                let (mut dx, mut dw, mut db) = (vec![0.1; rows * c], vec![0.2; c], vec![0.3; c]);
                layernorm_backward(isa, &mut dx, &mut dw, &mut db, &g, &inp, &w, &m, &s, c);
                assert_close("ln dinp", &dx, &dx0, 1e-5);
                assert_close("ln dweight", &dw, &dw0, 1e-5);
                assert_close("ln dbias", &db, &db0, 1e-5);
            }
        }
    }
}
