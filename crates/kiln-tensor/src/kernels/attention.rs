//! Causal multi-head self-attention, flash-attention style: keys are visited in tiles with an
//! online softmax (a running max and sum per query), so no `T × T` score matrix is ever stored.
//! Backward recomputes the probabilities from the saved log-sum-exp (FlashAttention-2).
//!
//! Layout: `qkv [b, t, 3c]` holds q, k, v side by side, head `h` at columns `h·hs..(h+1)·hs` of
//! each; `out [b, t, c]`; `lse [b, nh, t]`. Scores are `q·k / √hs`.

use rayon::prelude::*;

use super::SendPtr;
use crate::simd::{Isa, Simd};

/// Keys per tile: the scores of one query against one tile live on the stack.
const TILE: usize = 64;
/// Largest head size the stack buffers take (GPT-2 and Llama use 64 or 128).
const MAX_HS: usize = 256;

#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_forward_reference(
    out: &mut [f32],
    lse: &mut [f32],
    qkv: &[f32],
    b: usize,
    t: usize,
    nh: usize,
    hs: usize,
) {
    let c = nh * hs;
    let scale = 1.0 / (hs as f64).sqrt();
    let at = |bi: usize, ti: usize, part: usize, h: usize, d: usize| {
        qkv[(bi * t + ti) * 3 * c + part * c + h * hs + d] as f64
    };
    for bi in 0..b {
        for h in 0..nh {
            for i in 0..t {
                let s: Vec<f64> = (0..=i)
                    .map(|j| (0..hs).map(|d| at(bi, i, 0, h, d) * at(bi, j, 1, h, d)).sum::<f64>() * scale)
                    .collect();
                let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = s.iter().map(|x| (x - max).exp()).sum();
                for d in 0..hs {
                    let o: f64 = (0..=i).map(|j| (s[j] - max).exp() / sum * at(bi, j, 2, h, d)).sum();
                    out[(bi * t + i) * c + h * hs + d] = o as f32;
                }
                lse[(bi * nh + h) * t + i] = (max + sum.ln()) as f32;
            }
        }
    }
}

/// Plain softmax backward per row: dS = P ∘ (dP − Σ P∘dP), dQ = dS·K/√hs, dK = dSᵀ·Q/√hs, dV = Pᵀ·dO.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_backward_reference(
    dqkv: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    _out: &[f32],
    lse: &[f32],
    b: usize,
    t: usize,
    nh: usize,
    hs: usize,
) {
    let c = nh * hs;
    let scale = 1.0 / (hs as f64).sqrt();
    let idx = |bi: usize, ti: usize, part: usize, h: usize, d: usize| (bi * t + ti) * 3 * c + part * c + h * hs + d;
    dqkv.fill(0.0);
    let mut acc = vec![0.0f64; dqkv.len()];
    for bi in 0..b {
        for h in 0..nh {
            for i in 0..t {
                let l = lse[(bi * nh + h) * t + i] as f64;
                let go = |d: usize| dout[(bi * t + i) * c + h * hs + d] as f64;
                let p: Vec<f64> = (0..=i)
                    .map(|j| {
                        ((0..hs)
                            .map(|d| qkv[idx(bi, i, 0, h, d)] as f64 * qkv[idx(bi, j, 1, h, d)] as f64)
                            .sum::<f64>()
                            * scale
                            - l)
                            .exp()
                    })
                    .collect();
                let dp: Vec<f64> =
                    (0..=i).map(|j| (0..hs).map(|d| go(d) * qkv[idx(bi, j, 2, h, d)] as f64).sum()).collect();
                let dsum: f64 = (0..=i).map(|j| p[j] * dp[j]).sum();
                for j in 0..=i {
                    let ds = p[j] * (dp[j] - dsum) * scale;
                    for d in 0..hs {
                        acc[idx(bi, i, 0, h, d)] += ds * qkv[idx(bi, j, 1, h, d)] as f64;
                        acc[idx(bi, j, 1, h, d)] += ds * qkv[idx(bi, i, 0, h, d)] as f64;
                        acc[idx(bi, j, 2, h, d)] += p[j] * go(d);
                    }
                }
            }
        }
    }
    for (d, a) in dqkv.iter_mut().zip(acc) {
        *d = a as f32;
    }
}

/// `s[j] = Σ_d q[d] · kt[d·ld + j]` for j < s.len(): one query against a tile of transposed
/// keys, vectorised across keys so no horizontal sums are needed.
#[inline(always)]
unsafe fn tile_scores<S: Simd>(s: &mut [f32], q: *const f32, kt: *const f32, ld: usize, hs: usize) {
    let n = s.len();
    let sp = s.as_mut_ptr();
    let mut j = 0;
    while j + 4 * S::LANES <= n {
        let (mut a0, mut a1, mut a2, mut a3) = (S::zero(), S::zero(), S::zero(), S::zero());
        for d in 0..hs {
            let qd = S::splat(*q.add(d));
            let row = kt.add(d * ld + j);
            a0 = S::fma(qd, S::load(row), a0);
            a1 = S::fma(qd, S::load(row.add(S::LANES)), a1);
            a2 = S::fma(qd, S::load(row.add(2 * S::LANES)), a2);
            a3 = S::fma(qd, S::load(row.add(3 * S::LANES)), a3);
        }
        S::store(sp.add(j), a0);
        S::store(sp.add(j + S::LANES), a1);
        S::store(sp.add(j + 2 * S::LANES), a2);
        S::store(sp.add(j + 3 * S::LANES), a3);
        j += 4 * S::LANES;
    }
    while j + S::LANES <= n {
        let mut a = S::zero();
        for d in 0..hs {
            a = S::fma(S::splat(*q.add(d)), S::load(kt.add(d * ld + j)), a);
        }
        S::store(sp.add(j), a);
        j += S::LANES;
    }
    while j < n {
        let mut a = 0.0;
        for d in 0..hs {
            a += *q.add(d) * *kt.add(d * ld + j);
        }
        *sp.add(j) = a;
        j += 1;
    }
}

/// `y[..n] += a · x[..n]`.
#[inline(always)]
unsafe fn axpy<S: Simd>(y: *mut f32, a: f32, x: *const f32, n: usize) {
    let av = S::splat(a);
    let mut d = 0;
    while d + S::LANES <= n {
        S::store(y.add(d), S::fma(av, S::load(x.add(d)), S::load(y.add(d))));
        d += S::LANES;
    }
    while d < n {
        *y.add(d) += a * *x.add(d);
        d += 1;
    }
}

/// `y[..n] *= a`.
#[inline(always)]
unsafe fn scale_in_place<S: Simd>(y: *mut f32, a: f32, n: usize) {
    let av = S::splat(a);
    let mut d = 0;
    while d + S::LANES <= n {
        S::store(y.add(d), S::mul(av, S::load(y.add(d))));
        d += S::LANES;
    }
    while d < n {
        *y.add(d) *= a;
        d += 1;
    }
}

/// `s[j] = exp(s[j] − shift)`, returning Σ s[j].
#[inline(always)]
unsafe fn exp_shifted_sum<S: Simd>(s: &mut [f32], shift: f32) -> f32 {
    let (n, p) = (s.len(), s.as_mut_ptr());
    let sh = S::splat(shift);
    let mut acc = S::zero();
    let mut j = 0;
    while j + S::LANES <= n {
        let e = S::exp(S::sub(S::load(p.add(j)), sh));
        S::store(p.add(j), e);
        acc = S::add(acc, e);
        j += S::LANES;
    }
    let mut sum = S::reduce_sum(acc);
    while j < n {
        let e = (*p.add(j) - shift).exp();
        *p.add(j) = e;
        sum += e;
        j += 1;
    }
    sum
}

/// One (batch, head): `qs` is q pre-scaled by 1/√hs `[t, hs]`, `kt` is kᵀ `[hs, t]`, `v` `[t, hs]`;
/// writes rows of `out` with stride `out_rs` and the per-query log-sum-exp.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn attn_fwd_head<S: Simd>(
    out: SendPtr,
    out_rs: usize,
    lse: &mut [f32],
    qs: &[f32],
    kt: &[f32],
    v: &[f32],
    t: usize,
    hs: usize,
) {
    let mut s = [0.0f32; TILE];
    let mut acc = [0.0f32; MAX_HS];
    for (i, lse_i) in lse.iter_mut().enumerate().take(t) {
        let q = qs.as_ptr().add(i * hs);
        let (mut m, mut l) = (f32::NEG_INFINITY, 0.0f32);
        acc[..hs].fill(0.0);
        let mut j0 = 0;
        while j0 <= i {
            let n = TILE.min(i + 1 - j0);
            tile_scores::<S>(&mut s[..n], q, kt.as_ptr().add(j0), t, hs);
            let tile_max = s[..n].iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let m_new = m.max(tile_max);
            let corr = (m - m_new).exp();
            let psum = exp_shifted_sum::<S>(&mut s[..n], m_new);
            l = l * corr + psum;
            if corr != 1.0 {
                scale_in_place::<S>(acc.as_mut_ptr(), corr, hs);
            }
            for (j, &p) in s[..n].iter().enumerate() {
                axpy::<S>(acc.as_mut_ptr(), p, v.as_ptr().add((j0 + j) * hs), hs);
            }
            m = m_new;
            j0 += TILE;
        }
        let o = out.0.add(i * out_rs);
        std::ptr::copy_nonoverlapping(acc.as_ptr(), o, hs);
        scale_in_place::<S>(o, 1.0 / l, hs);
        *lse_i = m + l.ln();
    }
}
crate::multiversion!(fn attn_fwd_head_v(out: SendPtr, out_rs: usize, lse: &mut [f32], qs: &[f32], kt: &[f32], v: &[f32], t: usize, hs: usize) => attn_fwd_head);

/// Per-task copies of one head's operands, reused across tasks on a thread.
#[derive(Default)]
struct HeadScratch {
    qs: Vec<f32>,
    k: Vec<f32>,
    kt: Vec<f32>,
    v: Vec<f32>,
    vt: Vec<f32>,
    go: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

impl HeadScratch {
    /// Copies q·scale, k, kᵀ, v and vᵀ of head `h` of sequence `bi` out of `qkv`.
    fn gather(&mut self, qkv: &[f32], bi: usize, h: usize, t: usize, nh: usize, hs: usize, scale: f32) {
        let c = nh * hs;
        for buf in [&mut self.qs, &mut self.k, &mut self.kt, &mut self.v, &mut self.vt] {
            buf.resize(t * hs, 0.0);
        }
        for i in 0..t {
            let row = &qkv[(bi * t + i) * 3 * c..(bi * t + i + 1) * 3 * c];
            let (q, k, v) = (
                &row[h * hs..(h + 1) * hs],
                &row[c + h * hs..c + (h + 1) * hs],
                &row[2 * c + h * hs..2 * c + (h + 1) * hs],
            );
            for d in 0..hs {
                self.qs[i * hs + d] = q[d] * scale;
                self.kt[d * t + i] = k[d];
                self.vt[d * t + i] = v[d];
            }
            self.k[i * hs..(i + 1) * hs].copy_from_slice(k);
            self.v[i * hs..(i + 1) * hs].copy_from_slice(v);
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_forward(
    isa: Isa,
    out: &mut [f32],
    lse: &mut [f32],
    qkv: &[f32],
    b: usize,
    t: usize,
    nh: usize,
    hs: usize,
) {
    let c = nh * hs;
    assert!(hs <= MAX_HS && out.len() == b * t * c && qkv.len() == b * t * 3 * c && lse.len() == b * nh * t);
    let scale = 1.0 / (hs as f32).sqrt();
    let out_ptr = SendPtr(out.as_mut_ptr());
    lse.par_chunks_mut(t).enumerate().for_each_init(HeadScratch::default, |sc, (task, lse_row)| {
        let (bi, h) = (task / nh, task % nh);
        sc.gather(qkv, bi, h, t, nh, hs, scale);
        // SAFETY: task (bi, h) writes only rows bi·t.. and columns h·hs.. of `out`: disjoint.
        let o = unsafe { out_ptr.add(bi * t * c + h * hs) };
        attn_fwd_head_v(isa, o, c, lse_row, &sc.qs, &sc.kt, &sc.v, t, hs);
    });
}

/// One (batch, head) of backward; `go` is dO `[t, hs]`, `dsum[i] = dO_i·O_i`; writes dq, dk, dv.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn attn_bwd_head<S: Simd>(sc: &mut HeadScratch, dsum: &[f32], lse: &[f32], t: usize, hs: usize, scale: f32) {
    let mut p = [0.0f32; TILE];
    let mut dp = [0.0f32; TILE];
    let mut dq = [0.0f32; MAX_HS];
    sc.dk.iter_mut().for_each(|x| *x = 0.0);
    sc.dv.iter_mut().for_each(|x| *x = 0.0);
    let (dkp, dvp) = (sc.dk.as_mut_ptr(), sc.dv.as_mut_ptr());
    for i in 0..t {
        let q = sc.qs.as_ptr().add(i * hs);
        let go = sc.go.as_ptr().add(i * hs);
        dq[..hs].fill(0.0);
        let mut j0 = 0;
        while j0 <= i {
            let n = TILE.min(i + 1 - j0);
            tile_scores::<S>(&mut p[..n], q, sc.kt.as_ptr().add(j0), t, hs);
            exp_shifted_sum::<S>(&mut p[..n], lse[i]);
            tile_scores::<S>(&mut dp[..n], go, sc.vt.as_ptr().add(j0), t, hs);
            for j in 0..n {
                let ds = p[j] * (dp[j] - dsum[i]);
                axpy::<S>(dq.as_mut_ptr(), ds, sc.k.as_ptr().add((j0 + j) * hs), hs);
                axpy::<S>(dkp.add((j0 + j) * hs), ds, q, hs);
                axpy::<S>(dvp.add((j0 + j) * hs), p[j], go, hs);
            }
            j0 += TILE;
        }
        let dqi = sc.dq.as_mut_ptr().add(i * hs);
        std::ptr::copy_nonoverlapping(dq.as_ptr(), dqi, hs);
        scale_in_place::<S>(dqi, scale, hs);
    }
}
crate::multiversion!(fn attn_bwd_head_v(sc: &mut HeadScratch, dsum: &[f32], lse: &[f32], t: usize, hs: usize, scale: f32) => attn_bwd_head);

#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_backward(
    isa: Isa,
    dqkv: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    out: &[f32],
    lse: &[f32],
    b: usize,
    t: usize,
    nh: usize,
    hs: usize,
) {
    let c = nh * hs;
    assert!(hs <= MAX_HS && dqkv.len() == qkv.len() && dout.len() == b * t * c && out.len() == b * t * c);
    let scale = 1.0 / (hs as f32).sqrt();
    let dptr = SendPtr(dqkv.as_mut_ptr());
    (0..b * nh).into_par_iter().for_each_init(HeadScratch::default, |sc, task| {
        let (bi, h) = (task / nh, task % nh);
        sc.gather(qkv, bi, h, t, nh, hs, scale);
        for buf in [&mut sc.go, &mut sc.dq, &mut sc.dk, &mut sc.dv] {
            buf.resize(t * hs, 0.0);
        }
        let mut dsum = vec![0.0f32; t];
        for (i, d) in dsum.iter_mut().enumerate() {
            let r = (bi * t + i) * c + h * hs;
            sc.go[i * hs..(i + 1) * hs].copy_from_slice(&dout[r..r + hs]);
            *d = dout[r..r + hs].iter().zip(&out[r..r + hs]).map(|(a, b)| a * b).sum();
        }
        attn_bwd_head_v(isa, sc, &dsum, &lse[task * t..(task + 1) * t], t, hs, scale);
        for i in 0..t {
            let r = (bi * t + i) * 3 * c + h * hs;
            // SAFETY: task (bi, h) writes only its own head's columns of its own rows.
            unsafe {
                let d = dptr.add(r).0;
                std::ptr::copy_nonoverlapping(sc.dq.as_ptr().add(i * hs), d, hs);
                std::ptr::copy_nonoverlapping(sc.dk.as_ptr().add(i * hs), d.add(c), hs);
                std::ptr::copy_nonoverlapping(sc.dv.as_ptr().add(i * hs), d.add(2 * c), hs);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    #[test]
    fn attention_fast_matches_reference() {
        // t = 150 crosses two key tiles; hs = 19 and 24 are not multiples of 16.
        for &(b, t, nh, hs) in &[(1usize, 1usize, 1usize, 3usize), (2, 13, 3, 19), (1, 150, 2, 24)] {
            let c = nh * hs;
            let mut r = rng(9 + t as u64);
            let qkv = randn(&mut r, b * t * 3 * c, 1.5);
            let dout = randn(&mut r, b * t * c, 1.0);
            let (mut o0, mut l0) = (vec![0.0; b * t * c], vec![0.0; b * nh * t]);
            attention_forward_reference(&mut o0, &mut l0, &qkv, b, t, nh, hs);
            let mut d0 = vec![0.0; qkv.len()];
            attention_backward_reference(&mut d0, &dout, &qkv, &o0, &l0, b, t, nh, hs);
            for isa in Isa::all_supported() {
                let (mut o, mut l) = (vec![0.0; b * t * c], vec![0.0; b * nh * t]);
                attention_forward(isa, &mut o, &mut l, &qkv, b, t, nh, hs);
                assert_close(&format!("attn out {isa:?}"), &o, &o0, 1e-5);
                assert_close(&format!("attn lse {isa:?}"), &l, &l0, 1e-6);
                let mut d = vec![3.0; qkv.len()];
                attention_backward(isa, &mut d, &dout, &qkv, &o, &l, b, t, nh, hs);
                assert_close(&format!("attn dqkv {isa:?}"), &d, &d0, 1e-5);
            }
        }
    }
}
