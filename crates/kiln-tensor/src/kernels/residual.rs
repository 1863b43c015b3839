//! Residual connection: `out = a + b`.

use rayon::prelude::*;

use super::ELEM_CHUNK;
use crate::simd::Isa;

pub(crate) fn residual_forward_reference(out: &mut [f32], a: &[f32], b: &[f32]) {
    for i in 0..out.len() {
        out[i] = a[i] + b[i];
    }
}

pub(crate) fn residual_forward(isa: Isa, out: &mut [f32], a: &[f32], b: &[f32]) {
    assert!(a.len() == out.len() && b.len() == out.len());
    out.par_chunks_mut(ELEM_CHUNK).zip(a.par_chunks(ELEM_CHUNK).zip(b.par_chunks(ELEM_CHUNK))).for_each(
        |(o, (a, b))| {
            o.copy_from_slice(a);
            super::encoder::accumulate_row(isa, o, b);
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    #[test]
    fn residual_fast_matches_reference() {
        let mut r = rng(2);
        let n = 3 * ELEM_CHUNK + 37;
        let (a, b) = (randn(&mut r, n, 1.0), randn(&mut r, n, 1.0));
        let mut want = vec![0.0; n];
        residual_forward_reference(&mut want, &a, &b);
        for isa in Isa::all_supported() {
            let mut got = vec![0.0; n];
            residual_forward(isa, &mut got, &a, &b);
            assert_eq!(got, want, "{isa:?}");
        }
    }
}
