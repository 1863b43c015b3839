//! Causal multi-head self-attention, flash-attention style: keys are visited in tiles with an
//! online softmax (a running max and sum per query), so no `T × T` score matrix is ever stored.
//! Backward recomputes the probabilities from the saved log-sum-exp (FlashAttention-2).
//!
//! Layout: `qkv [b, t, 3c]` holds q, k, v side by side, head `h` at columns `h·hs..(h+1)·hs` of
//! each; `out [b, t, c]`; `lse [b, nh, t]`. Scores are `q·k / √hs`.

use rayon::prelude::*;

use super::matmul::gemm_strided;
use super::SendPtr;
use crate::simd::{Isa, Simd};

/// Queries and keys per block: one block of scores is TILE × TILE floats (16 KB, in L1).
const TILE: usize = 64;

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

/// `ds[j] = p[j] · (ds[j] − d)`: the softmax backward of one row, in place over dP.
#[inline(always)]
unsafe fn softmax_grad_row<S: Simd>(ds: &mut [f32], p: &[f32], d: f32) {
    let (n, o, pp) = (ds.len(), ds.as_mut_ptr(), p.as_ptr());
    let dv = S::splat(d);
    let mut j = 0;
    while j + S::LANES <= n {
        S::store(o.add(j), S::mul(S::load(pp.add(j)), S::sub(S::load(o.add(j)), dv)));
        j += S::LANES;
    }
    while j < n {
        *o.add(j) = *pp.add(j) * (*o.add(j) - d);
        j += 1;
    }
}

crate::multiversion!(fn scale_v(y: &mut [f32], a: f32) => scale_slice);
crate::multiversion!(fn exp_shifted_sum_v(s: &mut [f32], shift: f32) -> f32 => exp_shifted_sum);
crate::multiversion!(fn softmax_grad_row_v(ds: &mut [f32], p: &[f32], d: f32) => softmax_grad_row);

#[inline(always)]
unsafe fn scale_slice<S: Simd>(y: &mut [f32], a: f32) {
    scale_in_place::<S>(y.as_mut_ptr(), a, y.len())
}

/// Keys of block `j0..j0+bk` that query `i` may see (causal), as a count from the block start.
fn visible(i: usize, j0: usize, bk: usize) -> usize {
    (i + 1).saturating_sub(j0).min(bk)
}

/// Per-task copies of one head's operands, reused across tasks on a thread.
#[derive(Default)]
struct HeadScratch {
    /// q / √hs, `[t, hs]`.
    qs: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Output (forward) or dO (backward), `[t, hs]`.
    o: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    /// One block of scores or probabilities, `[TILE, TILE]`, and one of their gradients.
    s: Vec<f32>,
    ds: Vec<f32>,
}

impl HeadScratch {
    /// Copies q·scale, k and v of head `h` of sequence `bi` out of `qkv`.
    fn gather(&mut self, qkv: &[f32], bi: usize, h: usize, t: usize, nh: usize, hs: usize, scale: f32) {
        let c = nh * hs;
        for buf in [&mut self.qs, &mut self.k, &mut self.v, &mut self.o] {
            buf.resize(t * hs, 0.0);
        }
        self.s.resize(TILE * TILE, 0.0);
        self.ds.resize(TILE * TILE, 0.0);
        for i in 0..t {
            let row = &qkv[(bi * t + i) * 3 * c..(bi * t + i + 1) * 3 * c];
            for d in 0..hs {
                self.qs[i * hs + d] = row[h * hs + d] * scale;
            }
            self.k[i * hs..(i + 1) * hs].copy_from_slice(&row[c + h * hs..c + (h + 1) * hs]);
            self.v[i * hs..(i + 1) * hs].copy_from_slice(&row[2 * c + h * hs..2 * c + (h + 1) * hs]);
        }
    }
}

/// FlashAttention-2 forward for one head: query blocks against key blocks, the two products as
/// small GEMMs, an online softmax in between. Leaves O in `sc.o` and the log-sum-exp in `lse`.
fn attn_fwd_head(isa: Isa, sc: &mut HeadScratch, lse: &mut [f32], t: usize, hs: usize) {
    let (mut m, mut l) = ([0.0f32; TILE], [0.0f32; TILE]);
    sc.o.fill(0.0);
    for i0 in (0..t).step_by(TILE) {
        let bq = TILE.min(t - i0);
        m[..bq].fill(f32::NEG_INFINITY);
        l[..bq].fill(0.0);
        for j0 in (0..i0 + bq).step_by(TILE) {
            let bk = TILE.min(t - j0);
            // S = Qs[i0..] · K[j0..]ᵀ
            gemm_strided(bq, bk, hs, &mut sc.s, bk, false, &sc.qs[i0 * hs..], hs, 1, &sc.k[j0 * hs..], 1, hs, false);
            for r in 0..bq {
                let row = &mut sc.s[r * bk..(r + 1) * bk];
                let n = visible(i0 + r, j0, bk);
                if n == 0 {
                    row.fill(0.0);
                    continue;
                }
                let m_new = row[..n].iter().fold(m[r], |a, &b| a.max(b));
                let corr = (m[r] - m_new).exp();
                l[r] = l[r] * corr + exp_shifted_sum_v(isa, &mut row[..n], m_new);
                row[n..].fill(0.0);
                if corr != 1.0 {
                    scale_v(isa, &mut sc.o[(i0 + r) * hs..(i0 + r + 1) * hs], corr);
                }
                m[r] = m_new;
            }
            // O[i0..] += P · V[j0..]
            gemm_strided(bq, hs, bk, &mut sc.o[i0 * hs..], hs, true, &sc.s, bk, 1, &sc.v[j0 * hs..], hs, 1, false);
        }
        for r in 0..bq {
            scale_v(isa, &mut sc.o[(i0 + r) * hs..(i0 + r + 1) * hs], 1.0 / l[r]);
            lse[i0 + r] = m[r] + l[r].ln();
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
    assert!(out.len() == b * t * c && qkv.len() == b * t * 3 * c && lse.len() == b * nh * t);
    let scale = 1.0 / (hs as f32).sqrt();
    let out_ptr = SendPtr(out.as_mut_ptr());
    lse.par_chunks_mut(t).enumerate().for_each_init(HeadScratch::default, |sc, (task, lse_row)| {
        let (bi, h) = (task / nh, task % nh);
        sc.gather(qkv, bi, h, t, nh, hs, scale);
        attn_fwd_head(isa, sc, lse_row, t, hs);
        for i in 0..t {
            // SAFETY: task (bi, h) writes only rows bi·t.. and columns h·hs.. of `out`: disjoint.
            unsafe {
                let dst = out_ptr.add((bi * t + i) * c + h * hs).0;
                std::ptr::copy_nonoverlapping(sc.o.as_ptr().add(i * hs), dst, hs);
            }
        }
    });
}

/// FlashAttention-2 backward for one head (`sc.o` holds dO): for each key block, every query
/// block that sees it recomputes P from the log-sum-exp, then dV += Pᵀ·dO, dP = dO·Vᵀ,
/// dS = P ∘ (dP − rowsum(dO ∘ O)), dQ += dS·K, dK += dSᵀ·Qs; five small GEMMs.
fn attn_bwd_head(isa: Isa, sc: &mut HeadScratch, dsum: &[f32], lse: &[f32], t: usize, hs: usize, scale: f32) {
    for buf in [&mut sc.dq, &mut sc.dk, &mut sc.dv] {
        buf.clear();
        buf.resize(t * hs, 0.0);
    }
    for j0 in (0..t).step_by(TILE) {
        let bk = TILE.min(t - j0);
        for i0 in (j0..t).step_by(TILE) {
            let bq = TILE.min(t - i0);
            gemm_strided(bq, bk, hs, &mut sc.s, bk, false, &sc.qs[i0 * hs..], hs, 1, &sc.k[j0 * hs..], 1, hs, false);
            for r in 0..bq {
                let row = &mut sc.s[r * bk..(r + 1) * bk];
                let n = visible(i0 + r, j0, bk);
                exp_shifted_sum_v(isa, &mut row[..n], lse[i0 + r]);
                row[n..].fill(0.0);
            }
            // dV[j0..] += Pᵀ · dO[i0..]
            gemm_strided(bk, hs, bq, &mut sc.dv[j0 * hs..], hs, true, &sc.s, 1, bk, &sc.o[i0 * hs..], hs, 1, false);
            // dP = dO[i0..] · V[j0..]ᵀ
            gemm_strided(bq, bk, hs, &mut sc.ds, bk, false, &sc.o[i0 * hs..], hs, 1, &sc.v[j0 * hs..], 1, hs, false);
            for r in 0..bq {
                softmax_grad_row_v(isa, &mut sc.ds[r * bk..(r + 1) * bk], &sc.s[r * bk..(r + 1) * bk], dsum[i0 + r]);
            }
            // dQ[i0..] += dS · K[j0..];  dK[j0..] += dSᵀ · Qs[i0..]
            gemm_strided(bq, hs, bk, &mut sc.dq[i0 * hs..], hs, true, &sc.ds, bk, 1, &sc.k[j0 * hs..], hs, 1, false);
            gemm_strided(bk, hs, bq, &mut sc.dk[j0 * hs..], hs, true, &sc.ds, 1, bk, &sc.qs[i0 * hs..], hs, 1, false);
        }
    }
    scale_v(isa, &mut sc.dq, scale);
}

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
    assert!(dqkv.len() == qkv.len() && dout.len() == b * t * c && out.len() == b * t * c && lse.len() == b * nh * t);
    let scale = 1.0 / (hs as f32).sqrt();
    let dptr = SendPtr(dqkv.as_mut_ptr());
    (0..b * nh).into_par_iter().for_each_init(HeadScratch::default, |sc, task| {
        let (bi, h) = (task / nh, task % nh);
        sc.gather(qkv, bi, h, t, nh, hs, scale);
        let mut dsum = vec![0.0f32; t];
        for (i, d) in dsum.iter_mut().enumerate() {
            let r = (bi * t + i) * c + h * hs;
            sc.o[i * hs..(i + 1) * hs].copy_from_slice(&dout[r..r + hs]);
            *d = dout[r..r + hs].iter().zip(&out[r..r + hs]).map(|(a, b)| a * b).sum();
        }
        attn_bwd_head(isa, sc, &dsum, &lse[task * t..(task + 1) * t], t, hs, scale);
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
