//! Rotary position embedding (RoPE), Hugging Face's "rotate half" layout: within each head,
//! element i pairs with element i + hs/2 and the pair turns by angle pos·θᵢ.
//!
//! `x [rows, n_heads·hs]` is rotated in place; row r sits at position `pos[r]`; `cos`/`sin`
//! are `[positions, hs/2]` tables. The backward is the same turn by −angle (`inverse`).

use rayon::prelude::*;

use super::ROW_CHUNK;

pub(crate) fn rope_reference(
    x: &mut [f32],
    pos: &[usize],
    cos: &[f32],
    sin: &[f32],
    n_heads: usize,
    hs: usize,
    inverse: bool,
) {
    let half = hs / 2;
    let sign = if inverse { -1.0f64 } else { 1.0 };
    for (r, &p) in pos.iter().enumerate() {
        for h in 0..n_heads {
            let base = r * n_heads * hs + h * hs;
            for i in 0..half {
                let (c, s) = (cos[p * half + i] as f64, sign * sin[p * half + i] as f64);
                let (a, b) = (x[base + i] as f64, x[base + half + i] as f64);
                x[base + i] = (a * c - b * s) as f32;
                x[base + half + i] = (b * c + a * s) as f32;
            }
        }
    }
}

/// Plain loops the compiler vectorises; RoPE is O(rows·c), a rounding error beside the GEMMs.
#[allow(clippy::too_many_arguments)]
pub(crate) fn rope(x: &mut [f32], pos: &[usize], cos: &[f32], sin: &[f32], n_heads: usize, hs: usize, inverse: bool) {
    let (half, w) = (hs / 2, n_heads * hs);
    assert!(hs.is_multiple_of(2) && x.len() == pos.len() * w);
    assert!(pos.iter().all(|&p| (p + 1) * half <= cos.len().min(sin.len())), "position outside the RoPE table");
    let sign = if inverse { -1.0f32 } else { 1.0 };
    x.par_chunks_mut(ROW_CHUNK * w).zip(pos.par_chunks(ROW_CHUNK)).for_each(|(rows, ps)| {
        for (row, &p) in rows.chunks_mut(w).zip(ps) {
            let (c, s) = (&cos[p * half..(p + 1) * half], &sin[p * half..(p + 1) * half]);
            for head in row.chunks_mut(hs) {
                let (a, b) = head.split_at_mut(half);
                for i in 0..half {
                    let (ai, bi, si) = (a[i], b[i], sign * s[i]);
                    a[i] = ai * c[i] - bi * si;
                    b[i] = bi * c[i] + ai * si;
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    #[test]
    fn rope_fast_matches_reference_and_inverts() {
        let (rows, nh, hs, maxp) = (37usize, 3usize, 18usize, 50usize);
        let mut r = rng(12);
        let x0 = randn(&mut r, rows * nh * hs, 1.0);
        let pos: Vec<usize> = (0..rows).map(|i| (i * 7) % maxp).collect();
        let ang: Vec<f64> =
            (0..maxp * hs / 2).map(|k| (k / (hs / 2)) as f64 * 0.1 * (1 + k % (hs / 2)) as f64).collect();
        let cos: Vec<f32> = ang.iter().map(|a| a.cos() as f32).collect();
        let sin: Vec<f32> = ang.iter().map(|a| a.sin() as f32).collect();
        let mut want = x0.clone();
        rope_reference(&mut want, &pos, &cos, &sin, nh, hs, false);
        let mut got = x0.clone();
        rope(&mut got, &pos, &cos, &sin, nh, hs, false);
        assert_close("rope", &got, &want, 1e-6);
        // A rotation keeps each pair's length, and the inverse turns it back.
        let norm = |v: &[f32]| v.iter().map(|&a| (a as f64).powi(2)).sum::<f64>().sqrt();
        assert!((norm(&got) / norm(&x0) - 1.0).abs() < 1e-6);
        rope(&mut got, &pos, &cos, &sin, nh, hs, true);
        assert_close("rope inverse", &got, &x0, 1e-6);
    }
}
