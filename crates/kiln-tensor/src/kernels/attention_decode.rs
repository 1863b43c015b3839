//! Attention of one new query per sequence against that sequence's KV cache (generation).
//!
//! `q [b, nh·hs]` holds each sequence's newest query (heads side by side), `k_cache` /
//! `v_cache` `[b, cap, nkv·hs]` the keys and values of positions `0..lens[s]` (the newest
//! already written). `out [b, nh·hs]` receives softmax(q·Kᵀ/√hs)·V per head. With grouped-query
//! attention (`nkv < nh`) query head h reads key/value head h / (nh/nkv).

use rayon::prelude::*;

use super::{dot, SendPtr};
use crate::simd::{Isa, Simd};

#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_decode_reference(
    out: &mut [f32],
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    lens: &[usize],
    cap: usize,
    nh: usize,
    nkv: usize,
    hs: usize,
) {
    let (c, kvd, group) = (nh * hs, nkv * hs, nh / nkv);
    let scale = 1.0 / (hs as f64).sqrt();
    for (s, &len) in lens.iter().enumerate() {
        for h in 0..nh {
            let qh = &q[s * c + h * hs..s * c + (h + 1) * hs];
            let kvh = h / group;
            let scores: Vec<f64> = (0..len)
                .map(|j| {
                    let kj = &k_cache[(s * cap + j) * kvd + kvh * hs..];
                    (0..hs).map(|d| qh[d] as f64 * kj[d] as f64).sum::<f64>() * scale
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = scores.iter().map(|x| (x - max).exp()).sum();
            for d in 0..hs {
                let o: f64 = (0..len)
                    .map(|j| (scores[j] - max).exp() / sum * v_cache[(s * cap + j) * kvd + kvh * hs + d] as f64)
                    .sum();
                out[s * c + h * hs + d] = o as f32;
            }
        }
    }
}

/// One (sequence, head): scores into `scores`, then the probability-weighted sum of values.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn decode_head<S: Simd>(
    out: SendPtr,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    scores: &mut [f32],
    len: usize,
    c: usize,
    hs: usize,
) {
    let scale = 1.0 / (hs as f32).sqrt();
    let mut max = f32::NEG_INFINITY;
    for (j, sj) in scores[..len].iter_mut().enumerate() {
        *sj = dot::<S>(q.as_ptr(), k.as_ptr().add(j * c), hs) * scale;
        max = max.max(*sj);
    }
    let mut sum = 0.0;
    let mv = S::splat(max);
    let mut j = 0;
    while j + S::LANES <= len {
        let e = S::exp(S::sub(S::load(scores.as_ptr().add(j)), mv));
        S::store(scores.as_mut_ptr().add(j), e);
        sum += S::reduce_sum(e);
        j += S::LANES;
    }
    while j < len {
        scores[j] = (scores[j] - max).exp();
        sum += scores[j];
        j += 1;
    }
    let (o, inv) = (out.0, 1.0 / sum);
    // The weighted sum of values in registers when the head is 1, 2, 4 or 8 vectors wide (a
    // running sum in `out` chains every position through a store and a reload).
    match hs / S::LANES {
        n if n * S::LANES != hs => weighted_values_in_memory::<S>(o, scores, v, len, c, hs, inv),
        1 => weighted_values::<S, 1>(o, scores, v, len, c, inv),
        2 => weighted_values::<S, 2>(o, scores, v, len, c, inv),
        4 => weighted_values::<S, 4>(o, scores, v, len, c, inv),
        8 => weighted_values::<S, 8>(o, scores, v, len, c, inv),
        _ => weighted_values_in_memory::<S>(o, scores, v, len, c, hs, inv),
    }
}

/// `o = Σ_j p_j·inv·v_j` over `N` vectors of lanes, the sums held in registers.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
unsafe fn weighted_values<S: Simd, const N: usize>(o: *mut f32, p: &[f32], v: &[f32], len: usize, c: usize, inv: f32) {
    let mut acc = [S::zero(); N];
    for j in 0..len {
        let (w, vj) = (S::splat(p[j] * inv), v.as_ptr().add(j * c));
        for t in 0..N {
            acc[t] = S::fma(w, S::load(vj.add(t * S::LANES)), acc[t]);
        }
    }
    for t in 0..N {
        S::store(o.add(t * S::LANES), acc[t]);
    }
}

/// [`weighted_values`] for any head size, summing in `o`.
#[inline(always)]
unsafe fn weighted_values_in_memory<S: Simd>(
    o: *mut f32,
    p: &[f32],
    v: &[f32],
    len: usize,
    c: usize,
    hs: usize,
    inv: f32,
) {
    for d in 0..hs {
        *o.add(d) = 0.0;
    }
    for (j, &pj) in p[..len].iter().enumerate() {
        let w = S::splat(pj * inv);
        let vj = v.as_ptr().add(j * c);
        let mut d = 0;
        while d + S::LANES <= hs {
            S::store(o.add(d), S::fma(w, S::load(vj.add(d)), S::load(o.add(d))));
            d += S::LANES;
        }
        while d < hs {
            *o.add(d) += pj * inv * *vj.add(d);
            d += 1;
        }
    }
}
crate::multiversion!(fn decode_head_v(out: SendPtr, q: &[f32], k: &[f32], v: &[f32], scores: &mut [f32], len: usize, c: usize, hs: usize) => decode_head);

#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_decode(
    isa: Isa,
    out: &mut [f32],
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    lens: &[usize],
    cap: usize,
    nh: usize,
    nkv: usize,
    hs: usize,
) {
    let (b, c, kvd) = (lens.len(), nh * hs, nkv * hs);
    assert!(nkv >= 1 && nh.is_multiple_of(nkv), "query heads must be a multiple of key/value heads");
    assert!(out.len() == b * c && q.len() == b * c && k_cache.len() >= b * cap * kvd && v_cache.len() >= b * cap * kvd);
    assert!(lens.iter().all(|&l| l >= 1 && l <= cap), "every sequence needs 1..=cap cached positions");
    let optr = SendPtr(out.as_mut_ptr());
    (0..b * nh).into_par_iter().for_each_init(Vec::new, |scores: &mut Vec<f32>, task| {
        let (s, h) = (task / nh, task % nh);
        scores.resize(cap, 0.0);
        let base = s * cap * kvd + (h / (nh / nkv)) * hs;
        // SAFETY: task (s, h) writes only out[s, h·hs..(h+1)·hs].
        let o = unsafe { optr.add(s * c + h * hs) };
        decode_head_v(
            isa,
            o,
            &q[s * c + h * hs..(s + 1) * c],
            &k_cache[base..],
            &v_cache[base..],
            scores,
            lens[s],
            kvd,
            hs,
        );
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    #[test]
    fn attention_decode_fast_matches_reference() {
        // Multi-head (nkv = nh) and grouped-query (3 query heads per key/value head).
        // Head sizes: 19 sums in memory; 16, 32 and 64 in registers on every lane width.
        for (nh, nkv, hs) in [(3usize, 3usize, 19usize), (6, 2, 19), (3, 3, 64), (6, 2, 32), (2, 1, 16)] {
            let cap = 37usize;
            let (c, kvd) = (nh * hs, nkv * hs);
            let lens = [1usize, 37, 20];
            let b = lens.len();
            let mut r = rng(31);
            let q = randn(&mut r, b * c, 1.5);
            let k = randn(&mut r, b * cap * kvd, 1.5);
            let v = randn(&mut r, b * cap * kvd, 1.0);
            let mut want = vec![0.0; b * c];
            attention_decode_reference(&mut want, &q, &k, &v, &lens, cap, nh, nkv, hs);
            for isa in Isa::all_supported() {
                let mut got = vec![7.0; b * c];
                attention_decode(isa, &mut got, &q, &k, &v, &lens, cap, nh, nkv, hs);
                assert_close(&format!("attention_decode {isa:?} nkv={nkv} hs={hs}"), &got, &want, 1e-5);
            }
            if nkv < nh {
                // Grouped-query equals multi-head attention over the key/value heads repeated.
                let rep = |x: &[f32]| -> Vec<f32> {
                    x.chunks(kvd)
                        .flat_map(|row| (0..nh).flat_map(move |h| row[(h / (nh / nkv)) * hs..][..hs].to_vec()))
                        .collect()
                };
                let mut mha = vec![0.0; b * c];
                attention_decode_reference(&mut mha, &q, &rep(&k), &rep(&v), &lens, cap, nh, nh, hs);
                assert_close("gqa = repeated mha", &mha, &want, 1e-6);
            }
        }
    }
}
