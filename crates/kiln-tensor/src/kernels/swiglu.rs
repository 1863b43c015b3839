//! SwiGLU (Llama's MLP activation): `y = silu(gate) · up`, silu(g) = g·σ(g).

use rayon::prelude::*;

use super::ELEM_CHUNK;
use crate::simd::{Isa, Simd};

pub(crate) fn swiglu_forward_reference(out: &mut [f32], gate: &[f32], up: &[f32]) {
    for i in 0..out.len() {
        let g = gate[i] as f64;
        out[i] = (g / (1.0 + (-g).exp()) * up[i] as f64) as f32;
    }
}

/// dgate = dy·up·σ(g)(1 + g(1 − σ(g))), dup = dy·silu(g); both overwritten.
pub(crate) fn swiglu_backward_reference(dgate: &mut [f32], dup: &mut [f32], gate: &[f32], up: &[f32], dout: &[f32]) {
    for i in 0..gate.len() {
        let g = gate[i] as f64;
        let sig = 1.0 / (1.0 + (-g).exp());
        let d = dout[i] as f64;
        dgate[i] = (d * up[i] as f64 * sig * (1.0 + g * (1.0 - sig))) as f32;
        dup[i] = (d * g * sig) as f32;
    }
}

#[inline(always)]
unsafe fn swiglu_fwd_body<S: Simd>(out: &mut [f32], gate: &[f32], up: &[f32]) {
    let n = out.len();
    let (o, g, u) = (out.as_mut_ptr(), gate.as_ptr(), up.as_ptr());
    let (one, zero) = (S::splat(1.0), S::zero());
    let mut i = 0;
    while i + S::LANES <= n {
        let gv = S::load(g.add(i));
        let sig = S::div(one, S::add(one, S::exp(S::sub(zero, gv))));
        S::store(o.add(i), S::mul(S::mul(gv, sig), S::load(u.add(i))));
        i += S::LANES;
    }
    while i < n {
        let gv = *g.add(i);
        *o.add(i) = gv / (1.0 + (-gv).exp()) * *u.add(i);
        i += 1;
    }
}
crate::multiversion!(fn swiglu_fwd_v(out: &mut [f32], gate: &[f32], up: &[f32]) => swiglu_fwd_body);

#[inline(always)]
unsafe fn swiglu_bwd_body<S: Simd>(dgate: &mut [f32], dup: &mut [f32], gate: &[f32], up: &[f32], dout: &[f32]) {
    let n = gate.len();
    let (dg, du, g, u, d) = (dgate.as_mut_ptr(), dup.as_mut_ptr(), gate.as_ptr(), up.as_ptr(), dout.as_ptr());
    let (one, zero) = (S::splat(1.0), S::zero());
    let mut i = 0;
    while i + S::LANES <= n {
        let gv = S::load(g.add(i));
        let dv = S::load(d.add(i));
        let sig = S::div(one, S::add(one, S::exp(S::sub(zero, gv))));
        let silu = S::mul(gv, sig);
        let dsilu = S::mul(sig, S::add(one, S::mul(gv, S::sub(one, sig))));
        S::store(dg.add(i), S::mul(S::mul(dv, S::load(u.add(i))), dsilu));
        S::store(du.add(i), S::mul(dv, silu));
        i += S::LANES;
    }
    while i < n {
        let gv = *g.add(i);
        let sig = 1.0 / (1.0 + (-gv).exp());
        *dg.add(i) = *d.add(i) * *u.add(i) * sig * (1.0 + gv * (1.0 - sig));
        *du.add(i) = *d.add(i) * gv * sig;
        i += 1;
    }
}
crate::multiversion!(fn swiglu_bwd_v(dgate: &mut [f32], dup: &mut [f32], gate: &[f32], up: &[f32], dout: &[f32]) => swiglu_bwd_body);

pub(crate) fn swiglu_forward(isa: Isa, out: &mut [f32], gate: &[f32], up: &[f32]) {
    assert!(out.len() == gate.len() && out.len() == up.len());
    out.par_chunks_mut(ELEM_CHUNK)
        .zip(gate.par_chunks(ELEM_CHUNK).zip(up.par_chunks(ELEM_CHUNK)))
        .for_each(|(o, (g, u))| swiglu_fwd_v(isa, o, g, u));
}

pub(crate) fn swiglu_backward(isa: Isa, dgate: &mut [f32], dup: &mut [f32], gate: &[f32], up: &[f32], dout: &[f32]) {
    let n = gate.len();
    assert!(dgate.len() == n && dup.len() == n && up.len() == n && dout.len() == n);
    dgate
        .par_chunks_mut(ELEM_CHUNK)
        .zip(dup.par_chunks_mut(ELEM_CHUNK))
        .zip(gate.par_chunks(ELEM_CHUNK).zip(up.par_chunks(ELEM_CHUNK)).zip(dout.par_chunks(ELEM_CHUNK)))
        .for_each(|((dg, du), ((g, u), d))| swiglu_bwd_v(isa, dg, du, g, u, d));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    #[test]
    fn swiglu_fast_matches_reference() {
        let n = ELEM_CHUNK + 1237;
        let mut r = rng(21);
        let mut gate = randn(&mut r, n, 8.0);
        gate[0] = -90.0;
        gate[1] = 90.0;
        gate[2] = 0.0;
        let up = randn(&mut r, n, 2.0);
        let dy = randn(&mut r, n, 1.0);
        let mut y0 = vec![0.0; n];
        swiglu_forward_reference(&mut y0, &gate, &up);
        let (mut dg0, mut du0) = (vec![0.0; n], vec![0.0; n]);
        swiglu_backward_reference(&mut dg0, &mut du0, &gate, &up, &dy);
        for isa in Isa::all_supported() {
            let mut y = vec![0.0; n];
            swiglu_forward(isa, &mut y, &gate, &up);
            assert_close(&format!("swiglu {isa:?}"), &y, &y0, 1e-6);
            let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
            swiglu_backward(isa, &mut dg, &mut du, &gate, &up, &dy);
            assert_close(&format!("swiglu dgate {isa:?}"), &dg, &dg0, 1e-6);
            assert_close(&format!("swiglu dup {isa:?}"), &du, &du0, 1e-6);
        }
    }
}
