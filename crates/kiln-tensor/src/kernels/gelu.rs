//! GELU, tanh approximation: `y = ½x(1 + tanh(√(2/π)(x + 0.044715x³)))`.

use rayon::prelude::*;

use super::ELEM_CHUNK;
use crate::simd::{Isa, Simd};

const GELU_SCALE: f32 = 0.797_884_6; // √(2/π)
const GELU_CUBE: f32 = 0.044_715;

pub(crate) fn gelu_forward_reference(out: &mut [f32], inp: &[f32]) {
    for (o, &x) in out.iter_mut().zip(inp) {
        let x = x as f64;
        let u = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
        *o = (0.5 * x * (1.0 + u.tanh())) as f32;
    }
}

/// d/dx = ½(1 + tanh u) + ½x·sech²u·√(2/π)(1 + 3·0.044715x²); overwrites `dinp`.
pub(crate) fn gelu_backward_reference(dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
    for i in 0..inp.len() {
        let x = inp[i] as f64;
        let s = (2.0 / std::f64::consts::PI).sqrt();
        let u = s * (x + 0.044715 * x * x * x);
        let th = u.tanh();
        let grad = 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * s * (1.0 + 3.0 * 0.044715 * x * x);
        dinp[i] = (grad * dout[i] as f64) as f32;
    }
}

#[inline(always)]
unsafe fn gelu_fwd_body<S: Simd>(out: &mut [f32], inp: &[f32]) {
    let n = out.len();
    let (o, x) = (out.as_mut_ptr(), inp.as_ptr());
    let (half, one, sc, cu) = (S::splat(0.5), S::splat(1.0), S::splat(GELU_SCALE), S::splat(GELU_CUBE));
    let mut i = 0;
    while i + S::LANES <= n {
        let xv = S::load(x.add(i));
        let x3 = S::mul(S::mul(xv, xv), xv);
        let th = S::tanh(S::mul(sc, S::fma(cu, x3, xv)));
        S::store(o.add(i), S::mul(S::mul(half, xv), S::add(one, th)));
        i += S::LANES;
    }
    while i < n {
        let xv = *x.add(i);
        let th = (GELU_SCALE * (xv + GELU_CUBE * xv * xv * xv)).tanh();
        *o.add(i) = 0.5 * xv * (1.0 + th);
        i += 1;
    }
}
crate::multiversion!(fn gelu_fwd_v(out: &mut [f32], inp: &[f32]) => gelu_fwd_body);

#[inline(always)]
unsafe fn gelu_bwd_body<S: Simd>(dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
    let n = dinp.len();
    let (d, x, g) = (dinp.as_mut_ptr(), inp.as_ptr(), dout.as_ptr());
    let (half, one, sc, cu, cu3) =
        (S::splat(0.5), S::splat(1.0), S::splat(GELU_SCALE), S::splat(GELU_CUBE), S::splat(3.0 * GELU_CUBE));
    let mut i = 0;
    while i + S::LANES <= n {
        let xv = S::load(x.add(i));
        let x2 = S::mul(xv, xv);
        let th = S::tanh(S::mul(sc, S::fma(cu, S::mul(x2, xv), xv)));
        let sech2 = S::sub(one, S::mul(th, th));
        let du = S::mul(sc, S::fma(cu3, x2, one));
        let grad = S::fma(S::mul(S::mul(half, xv), sech2), du, S::mul(half, S::add(one, th)));
        S::store(d.add(i), S::mul(grad, S::load(g.add(i))));
        i += S::LANES;
    }
    while i < n {
        let xv = *x.add(i);
        let th = (GELU_SCALE * (xv + GELU_CUBE * xv * xv * xv)).tanh();
        let grad = 0.5 * (1.0 + th) + 0.5 * xv * (1.0 - th * th) * GELU_SCALE * (1.0 + 3.0 * GELU_CUBE * xv * xv);
        *d.add(i) = grad * *g.add(i);
        i += 1;
    }
}
crate::multiversion!(fn gelu_bwd_v(dinp: &mut [f32], inp: &[f32], dout: &[f32]) => gelu_bwd_body);

pub(crate) fn gelu_forward(isa: Isa, out: &mut [f32], inp: &[f32]) {
    assert_eq!(out.len(), inp.len());
    out.par_chunks_mut(ELEM_CHUNK).zip(inp.par_chunks(ELEM_CHUNK)).for_each(|(o, x)| gelu_fwd_v(isa, o, x));
}

pub(crate) fn gelu_backward(isa: Isa, dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
    assert!(dinp.len() == inp.len() && dout.len() == inp.len());
    dinp.par_chunks_mut(ELEM_CHUNK)
        .zip(inp.par_chunks(ELEM_CHUNK).zip(dout.par_chunks(ELEM_CHUNK)))
        .for_each(|(d, (x, g))| gelu_bwd_v(isa, d, x, g));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    #[test]
    fn gelu_fast_matches_reference() {
        let mut r = rng(3);
        let n = ELEM_CHUNK + 1237;
        let mut x = randn(&mut r, n, 6.0);
        x[0] = 0.0;
        x[1] = -20.0;
        x[2] = 20.0;
        let g = randn(&mut r, n, 1.0);
        let (mut y_ref, mut dx_ref) = (vec![0.0; n], vec![0.0; n]);
        gelu_forward_reference(&mut y_ref, &x);
        gelu_backward_reference(&mut dx_ref, &x, &g);
        for isa in Isa::all_supported() {
            let (mut y, mut dx) = (vec![0.0; n], vec![0.0; n]);
            gelu_forward(isa, &mut y, &x);
            gelu_backward(isa, &mut dx, &x, &g);
            assert_close(&format!("gelu_forward {isa:?}"), &y, &y_ref, 1e-6);
            assert_close(&format!("gelu_backward {isa:?}"), &dx, &dx_ref, 1e-6);
            // Elementwise too: the tails of the curve must not drift.
            for i in 0..n {
                assert!((y[i] - y_ref[i]).abs() <= 1e-5 * (1.0 + y_ref[i].abs()), "{isa:?} x={}", x[i]);
            }
        }
    }
}
