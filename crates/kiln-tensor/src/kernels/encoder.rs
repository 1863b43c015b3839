//! Token + position embedding: `out[b,t] = wte[token] + wpe[t]`, and its scatter-add backward.

use rayon::prelude::*;

use crate::simd::{Isa, Simd};

pub(crate) fn encoder_forward_reference(out: &mut [f32], tokens: &[u32], wte: &[f32], wpe: &[f32], t: usize, c: usize) {
    for (i, &tok) in tokens.iter().enumerate() {
        let (tok, pos) = (tok as usize, i % t);
        for j in 0..c {
            out[i * c + j] = wte[tok * c + j] + wpe[pos * c + j];
        }
    }
}

pub(crate) fn encoder_backward_reference(
    dwte: &mut [f32],
    dwpe: &mut [f32],
    dout: &[f32],
    tokens: &[u32],
    t: usize,
    c: usize,
) {
    for (i, &tok) in tokens.iter().enumerate() {
        let (tok, pos) = (tok as usize, i % t);
        for j in 0..c {
            dwte[tok * c + j] += dout[i * c + j];
            dwpe[pos * c + j] += dout[i * c + j];
        }
    }
}

#[inline(always)]
unsafe fn add_rows<S: Simd>(out: &mut [f32], a: &[f32], b: &[f32]) {
    let n = out.len();
    let (o, a, b) = (out.as_mut_ptr(), a.as_ptr(), b.as_ptr());
    let mut j = 0;
    while j + S::LANES <= n {
        S::store(o.add(j), S::add(S::load(a.add(j)), S::load(b.add(j))));
        j += S::LANES;
    }
    while j < n {
        *o.add(j) = *a.add(j) + *b.add(j);
        j += 1;
    }
}
crate::multiversion!(fn add_rows_v(out: &mut [f32], a: &[f32], b: &[f32]) => add_rows);

#[inline(always)]
unsafe fn acc_row<S: Simd>(acc: &mut [f32], x: &[f32]) {
    let n = acc.len();
    let (o, x) = (acc.as_mut_ptr(), x.as_ptr());
    let mut j = 0;
    while j + S::LANES <= n {
        S::store(o.add(j), S::add(S::load(o.add(j)), S::load(x.add(j))));
        j += S::LANES;
    }
    while j < n {
        *o.add(j) += *x.add(j);
        j += 1;
    }
}
crate::multiversion!(pub(crate) fn accumulate_row(acc: &mut [f32], x: &[f32]) => acc_row);

pub(crate) fn encoder_forward(isa: Isa, out: &mut [f32], tokens: &[u32], wte: &[f32], wpe: &[f32], t: usize, c: usize) {
    assert_eq!(out.len(), tokens.len() * c);
    out.par_chunks_mut(c).enumerate().for_each(|(i, row)| {
        let tok = tokens[i] as usize;
        let pos = i % t;
        add_rows_v(isa, row, &wte[tok * c..(tok + 1) * c], &wpe[pos * c..(pos + 1) * c]);
    });
}

pub(crate) fn encoder_backward(
    isa: Isa,
    dwte: &mut [f32],
    dwpe: &mut [f32],
    dout: &[f32],
    tokens: &[u32],
    t: usize,
    c: usize,
) {
    assert_eq!(dout.len(), tokens.len() * c);
    // Positions of each token id, in order (a CSR index), so every dwte row is owned by one task
    // and summed in sequence order: deterministic whatever the thread count.
    let vocab = dwte.len() / c;
    let mut counts = vec![0usize; vocab + 1];
    for &tok in tokens {
        counts[tok as usize + 1] += 1;
    }
    for i in 0..vocab {
        counts[i + 1] += counts[i];
    }
    let mut fill = counts.clone();
    let mut order = vec![0usize; tokens.len()];
    for (i, &tok) in tokens.iter().enumerate() {
        order[fill[tok as usize]] = i;
        fill[tok as usize] += 1;
    }
    dwte.par_chunks_mut(c).enumerate().for_each(|(tok, row)| {
        for &i in &order[counts[tok]..counts[tok + 1]] {
            accumulate_row(isa, row, &dout[i * c..(i + 1) * c]);
        }
    });
    let rows = tokens.len() / t;
    dwpe[..t * c].par_chunks_mut(c).enumerate().for_each(|(pos, row)| {
        for b in 0..rows {
            let i = b * t + pos;
            accumulate_row(isa, row, &dout[i * c..(i + 1) * c]);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    #[test]
    fn encoder_fast_matches_reference() {
        let (b, t, c, v) = (3, 7, 37, 29);
        let mut r = rng(1);
        let wte = randn(&mut r, v * c, 1.0);
        let wpe = randn(&mut r, 11 * c, 1.0);
        let tokens: Vec<u32> = (0..b * t).map(|i| ((i * 7 + 3) % v) as u32).collect();
        let dout = randn(&mut r, b * t * c, 1.0);
        let mut out_ref = vec![0.0; b * t * c];
        encoder_forward_reference(&mut out_ref, &tokens, &wte, &wpe, t, c);
        let (mut dwte_ref, mut dwpe_ref) = (vec![0.5; v * c], vec![0.25; 11 * c]);
        encoder_backward_reference(&mut dwte_ref, &mut dwpe_ref, &dout, &tokens, t, c);
        for isa in Isa::all_supported() {
            let mut out = vec![0.0; b * t * c];
            encoder_forward(isa, &mut out, &tokens, &wte, &wpe, t, c);
            assert_close("encoder_forward", &out, &out_ref, 1e-7);
            let (mut dwte, mut dwpe) = (vec![0.5; v * c], vec![0.25; 11 * c]);
            encoder_backward(isa, &mut dwte, &mut dwpe, &dout, &tokens, t, c);
            assert_close("encoder_backward dwte", &dwte, &dwte_ref, 1e-6);
            assert_close("encoder_backward dwpe", &dwpe, &dwpe_ref, 1e-6);
        }
    }
}
