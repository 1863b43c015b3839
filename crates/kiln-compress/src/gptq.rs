//! GPTQ (Frantar et al., 2022): quantize a weight column by column and push each column's
//! rounding error onto the columns not yet quantized, weighted by the inverse Hessian of the
//! layer's inputs, so the *output* error `‖(W_q − W)Xᵀ‖²` stays small rather than the weight error.
//!
//! A port of the reference `fasterquant` (and AutoGPTQ's): `H = 2/N Σ xᵀx`; dead inputs
//! (`H_ii = 0`) get `H_ii = 1` and zero weights; `H += damp · mean(diag H) · I`;
//! `U = cholesky(H⁻¹, upper)`; then for each block of `block` columns, column i's error
//! `e = (w_i − q_i) / U_ii` updates the block's later columns at once and the rest of the
//! matrix lazily after the block (`W[:, i2:] −= E · U[i1:i2, i2:]`).
//!
//! Differences, all deliberate:
//! - `U` comes from one Cholesky of the reversed H and one triangular inverse
//!   (`cholesky(H⁻¹, upper) = J·L⁻¹·J` where `J·H·J = L·Lᵀ`), the same matrix as the reference's
//!   cholesky → cholesky_inverse → cholesky with half the work.
//! - When a group starts inside a block, its scale and zero come from the up-to-date weights of
//!   that block; the reference reads the matrix that has not yet received the block's updates.
//!   They agree whenever `group` is a multiple of `block`; `block` is rounded up to a multiple
//!   of `group` so a group never straddles two blocks.
//! - With `act_order` (columns processed by descending `H_ii`), groups are *static*: each group's
//!   grid is fitted on the original weights before any update (AutoGPTQ's `static_groups`), so
//!   the stored groups stay contiguous in the original column order, which is what
//!   [`Int4Weight`] and its kernels need (no `g_idx` permutation at run time).
//! - Rows are independent given U, so threads split the output rows; every sum runs in a fixed
//!   order and the result does not depend on the thread count.

use half::f16;
use kiln_tensor::quant::{check_group, Int4Weight, Int8Weight};
use rayon::prelude::*;

use crate::rtn::{assemble_int4, int8_quant, int8_scale, Int4Grid};
use crate::{check_weight, CompressError, LinearCalib, Result};

/// GPTQ settings; the defaults are the reference's.
#[derive(Clone, Debug)]
pub struct GptqOptions {
    /// Added to the Hessian's diagonal as a fraction of its mean (0.01).
    pub damp: f64,
    /// Quantize columns in order of descending `H_ii` (implies static groups).
    pub act_order: bool,
    /// Fit every group's grid on the original weights before any update.
    pub static_groups: bool,
    /// Columns per lazy-update block (128).
    pub block: usize,
}

impl Default for GptqOptions {
    fn default() -> Self {
        GptqOptions { damp: 0.01, act_order: false, static_groups: false, block: 128 }
    }
}

/// GPTQ onto grouped asymmetric int4.
pub fn gptq_int4(
    w: &[f32],
    n: usize,
    k: usize,
    group: usize,
    calib: &LinearCalib,
    opts: &GptqOptions,
) -> Result<Int4Weight> {
    check_group(k, group)?;
    let prep = Prepared::new(w, n, k, calib, opts)?;
    let statics = opts.static_groups || opts.act_order;
    // Static grids: fitted on the (dead-zeroed) original rows, in original group order.
    let static_grids: Option<Vec<Int4Grid>> = statics
        .then(|| {
            prep.w
                .par_chunks(k)
                .flat_map_iter(|row| row.chunks_exact(group).map(|g| Int4Grid::fit(g.iter().copied())))
                .collect::<Result<Vec<_>>>()
        })
        .transpose()?;
    let gpr = k / group;
    let block = opts.block.max(1).div_ceil(group) * group;
    let rows: Vec<(Vec<u8>, Vec<f16>, Vec<f16>)> = prep
        .w
        .par_chunks(k * ROW_CHUNK)
        .enumerate()
        .map(|(c, chunk)| {
            let rows = chunk.len() / k;
            let mut grids: Vec<Int4Grid> = match &static_grids {
                Some(s) => s[c * ROW_CHUNK * gpr..(c * ROW_CHUNK + rows) * gpr].to_vec(),
                None => vec![Int4Grid::from_stored(f16::ONE, f16::ZERO); rows * gpr],
            };
            let mut codes = vec![0u8; rows * k];
            let mut fit_error = None;
            prep.run(chunk, block, |r, col, p, cur: &[f64]| {
                let gi = r * gpr + col / group;
                // Dynamic groups start on group boundaries in processing order (no permutation then).
                if !statics && p % group == 0 {
                    match Int4Grid::fit(cur[p..p + group].iter().copied()) {
                        Ok(g) => grids[gi] = g,
                        Err(e) => fit_error = Some(e),
                    }
                }
                let (q, deq) = grids[gi].quant(cur[p]);
                codes[r * k + col] = q;
                deq
            });
            if let Some(e) = fit_error {
                return Err(e);
            }
            Ok((0..rows)
                .map(|r| {
                    let g = &grids[r * gpr..(r + 1) * gpr];
                    (
                        codes[r * k..(r + 1) * k].to_vec(),
                        g.iter().map(|x| x.scale).collect(),
                        g.iter().map(|x| x.zero).collect(),
                    )
                })
                .collect::<Vec<_>>())
        })
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .flatten()
        .collect();
    assemble_int4(n, k, group, rows, None)
}

/// GPTQ onto symmetric per-row int8 (each row's scale fitted once on its original weights, as
/// the reference does without groups).
pub fn gptq_int8(w: &[f32], n: usize, k: usize, calib: &LinearCalib, opts: &GptqOptions) -> Result<Int8Weight> {
    let prep = Prepared::new(w, n, k, calib, opts)?;
    let scale: Vec<f32> = prep.w.par_chunks(k).map(|row| int8_scale(row.iter().copied())).collect();
    let block = opts.block.max(1);
    let q: Vec<i8> = prep
        .w
        .par_chunks(k * ROW_CHUNK)
        .enumerate()
        .flat_map_iter(|(c, chunk)| {
            let mut codes = vec![0i8; chunk.len()];
            prep.run(chunk, block, |r, col, p, cur: &[f64]| {
                let (q, deq) = int8_quant(cur[p], scale[c * ROW_CHUNK + r]);
                codes[r * k + col] = q;
                deq
            });
            codes
        })
        .collect();
    Ok(Int8Weight::from_parts(n, k, q, scale, None)?)
}

/// Output rows per task.
const ROW_CHUNK: usize = 8;

/// What every GPTQ variant shares: the weights (f64, dead columns zeroed), the processing
/// order and `U = cholesky(H⁻¹, upper)` in that order.
struct Prepared {
    k: usize,
    /// `[n, k]` in original column order.
    w: Vec<f64>,
    /// `perm[p]` = original column quantized p-th.
    perm: Vec<usize>,
    /// `[k, k]`, rows and columns in processing order.
    u: Vec<f64>,
}

impl Prepared {
    fn new(w: &[f32], n: usize, k: usize, calib: &LinearCalib, opts: &GptqOptions) -> Result<Prepared> {
        check_weight(w, n, k)?;
        calib.check_for(k)?;
        if !calib.has_hessian() {
            return Err(CompressError::Option("GPTQ needs calibration gathered with the Hessian".into()));
        }
        if !(opts.damp.is_finite() && opts.damp >= 0.0) {
            return Err(CompressError::Option(format!("damp must be finite and >= 0, got {}", opts.damp)));
        }
        let mut h = calib.hessian();
        let mut w: Vec<f64> = w.iter().map(|&v| v as f64).collect();
        for i in 0..k {
            if h[i * k + i] == 0.0 {
                h[i * k + i] = 1.0;
                w.iter_mut().skip(i).step_by(k).for_each(|v| *v = 0.0);
            }
        }
        let mut perm: Vec<usize> = (0..k).collect();
        if opts.act_order {
            // Stable: equal diagonals keep their original order.
            perm.sort_by(|&a, &b| h[b * k + b].total_cmp(&h[a * k + a]));
        }
        let mean_diag = (0..k).map(|i| h[i * k + i]).sum::<f64>() / k as f64;
        let damp = opts.damp * mean_diag;
        // The reversed, permuted, damped Hessian: P[a][b] = H[perm[k−1−a]][perm[k−1−b]].
        let mut p = vec![0.0f64; k * k];
        p.par_chunks_mut(k).enumerate().for_each(|(a, row)| {
            let ia = perm[k - 1 - a];
            for (b, v) in row.iter_mut().enumerate() {
                *v = h[ia * k + perm[k - 1 - b]];
            }
            row[a] += damp;
        });
        cholesky_lower(&mut p, k).map_err(|column| CompressError::NotPositiveDefinite {
            column: k - 1 - column,
            k,
            damp: opts.damp,
        })?;
        let cols = lower_inverse_columns(&p, k);
        // U = J·L⁻¹·J: U[a][b] = L⁻¹[k−1−a][k−1−b] = cols[k−1−b][k−1−a].
        let mut u = vec![0.0f64; k * k];
        u.par_chunks_mut(k).enumerate().for_each(|(a, row)| {
            for (b, v) in row.iter_mut().enumerate().skip(a) {
                *v = cols[k - 1 - b][k - 1 - a];
            }
        });
        Ok(Prepared { k, w, perm, u })
    }

    /// Runs the column loop on a chunk of rows (original order, `[rows, k]`). `quant(r, col, p,
    /// cur)` quantizes row r's column `col` (processed p-th) whose current values, in processing
    /// order, are `cur`, and returns the dequantized value.
    fn run(&self, chunk: &[f64], block: usize, mut quant: impl FnMut(usize, usize, usize, &[f64]) -> f64) {
        let k = self.k;
        let rows = chunk.len() / k;
        // Current weights in processing order.
        let mut cur: Vec<f64> = chunk.chunks_exact(k).flat_map(|row| self.perm.iter().map(move |&c| row[c])).collect();
        let mut err = vec![0.0f64; rows * block];
        let mut i1 = 0;
        while i1 < k {
            let i2 = (i1 + block).min(k);
            for p in i1..i2 {
                let urow = &self.u[p * k..(p + 1) * k];
                for r in 0..rows {
                    let wr = &mut cur[r * k..(r + 1) * k];
                    let deq = quant(r, self.perm[p], p, wr);
                    let e = (wr[p] - deq) / urow[p];
                    for (v, &h) in wr[p + 1..i2].iter_mut().zip(&urow[p + 1..i2]) {
                        *v -= e * h;
                    }
                    err[r * block + p - i1] = e;
                }
            }
            // The lazy update of the columns after the block.
            for r in 0..rows {
                let wr = &mut cur[r * k + i2..(r + 1) * k];
                for p in i1..i2 {
                    let e = err[r * block + p - i1];
                    for (v, &h) in wr.iter_mut().zip(&self.u[p * k + i2..(p + 1) * k]) {
                        *v -= e * h;
                    }
                }
            }
            i1 = i2;
        }
    }
}

/// Σ a·b with four partial sums (vectorizes; fixed order).
#[inline]
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0.0f64; 4];
    let (ac, bc) = (a.chunks_exact(4), b.chunks_exact(4));
    let tail: f64 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        for j in 0..4 {
            acc[j] += x[j] * y[j];
        }
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

/// Smallest pivot accepted, relative to the diagonal entry it came from.
const PIVOT_TOL: f64 = 1e-10;

/// In-place lower Cholesky `A = L·Lᵀ` of a symmetric `[k, k]` matrix (upper triangle left as is);
/// `Err(j)` when pivot j is not clearly positive.
fn cholesky_lower(a: &mut [f64], k: usize) -> std::result::Result<(), usize> {
    for j in 0..k {
        let (done, rest) = a.split_at_mut((j + 1) * k);
        let lj = &mut done[j * k..(j + 1) * k];
        let d = lj[j] - dot(&lj[..j], &lj[..j]);
        // A pivot at rounding level means H is singular there; the factor would be noise.
        if !(d > PIVOT_TOL * lj[j] && d.is_finite()) {
            return Err(j);
        }
        lj[j] = d.sqrt();
        let lj = &done[j * k..(j + 1) * k];
        rest.par_chunks_mut(k).for_each(|li| {
            li[j] = (li[j] - dot(&li[..j], &lj[..j])) / lj[j];
        });
    }
    Ok(())
}

/// Columns of `L⁻¹` for lower-triangular `L` (stored in the lower triangle of `l`): column j
/// solves `L·x = e_j` by forward substitution; entries above the diagonal are 0.
fn lower_inverse_columns(l: &[f64], k: usize) -> Vec<Vec<f64>> {
    (0..k)
        .into_par_iter()
        .map(|j| {
            let mut x = vec![0.0f64; k];
            x[j] = 1.0 / l[j * k + j];
            for i in j + 1..k {
                x[i] = -dot(&l[i * k + j..i * k + i], &x[j..i]) / l[i * k + i];
            }
            x
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rtn::{dequantize_int4, dequantize_int8, rtn_int4, rtn_int8};
    use crate::testutil::*;
    use crate::{relative_output_error, LinearCalib};

    #[test]
    fn upper_cholesky_of_the_inverse_is_right() {
        // Uᵀ·U must equal H⁻¹, i.e. H·Uᵀ·U = I, for a random SPD H (act-order permuted too).
        let (k, rows) = (37, 80);
        let x = randn(&mut rng(2), rows * k, 1.0);
        let mut c = LinearCalib::new(k);
        c.observe(&x, rows).unwrap();
        for act_order in [false, true] {
            let opts = GptqOptions { damp: 0.0, act_order, ..Default::default() };
            let prep = Prepared::new(&vec![0.0; k], 1, k, &c, &opts).unwrap();
            let h = c.hessian();
            let hp = |a: usize, b: usize| h[prep.perm[a] * k + prep.perm[b]];
            let u = &prep.u;
            for a in 0..k {
                for b in 0..k {
                    // (H·Uᵀ·U)[a][b] = Σ_i H[a][i] Σ_j U[j][i] U[j][b]
                    let v: f64 =
                        (0..k).map(|i| hp(a, i) * (0..k).map(|j| u[j * k + i] * u[j * k + b]).sum::<f64>()).sum();
                    let want = if a == b { 1.0 } else { 0.0 };
                    assert!((v - want).abs() < 1e-9, "act_order {act_order}: ({a},{b}) = {v}");
                }
                assert!(u[a * k + a] > 0.0 && (0..a).all(|b| u[a * k + b] == 0.0));
            }
        }
    }

    /// Calibration whose Hessian is a multiple of the identity.
    fn identity_calib(k: usize) -> LinearCalib {
        let mut c = LinearCalib::new(k);
        let eye: Vec<f32> = (0..k * k).map(|j| if j / k == j % k { 3.0 } else { 0.0 }).collect();
        c.observe(&eye, k).unwrap();
        c
    }

    #[test]
    fn gptq_with_identity_hessian_is_rtn() {
        let (n, k) = (20, 256);
        let w = gauss(&mut rng(3), n * k);
        let c = identity_calib(k);
        for act_order in [false, true] {
            for block in [128, 50] {
                let opts = GptqOptions { act_order, block, ..Default::default() };
                for group in [32, 128] {
                    let g = gptq_int4(&w, n, k, group, &c, &opts).unwrap();
                    assert_eq!(
                        g,
                        rtn_int4(&w, n, k, group).unwrap(),
                        "int4 g{group} act_order {act_order} block {block}"
                    );
                }
                assert_eq!(gptq_int8(&w, n, k, &c, &opts).unwrap(), rtn_int8(&w, n, k).unwrap());
            }
        }
    }

    /// A random weight, 512 calibration rows and 256 held-out rows of the same correlated
    /// distribution with outlier channels.
    fn correlated_case(seed: u64, n: usize, k: usize) -> (Vec<f32>, LinearCalib, Vec<f32>) {
        let mut r = rng(seed);
        let w = gauss(&mut r, n * k);
        let x = llm_like_activations(&mut r, 768, k, 8, 4, 10.0);
        let mut c = LinearCalib::new(k);
        c.observe(&x[..512 * k], 512).unwrap();
        (w, c, x[512 * k..].to_vec())
    }

    #[test]
    fn gptq_beats_rtn_on_correlated_inputs() {
        let (n, k) = (48, 256);
        let (w, c, x) = correlated_case(5, n, k);
        let rows = x.len() / k;
        for group in [32, 128] {
            let rtn = relative_output_error(&w, &dequantize_int4(&rtn_int4(&w, n, k, group).unwrap()), n, k, &x, rows);
            for act_order in [false, true] {
                let opts = GptqOptions { act_order, ..Default::default() };
                let q = gptq_int4(&w, n, k, group, &c, &opts).unwrap();
                let e = relative_output_error(&w, &dequantize_int4(&q), n, k, &x, rows);
                assert!(e < 0.8 * rtn, "int4 g{group} act_order {act_order}: GPTQ {e} vs RTN {rtn}");
            }
        }
        let rtn = relative_output_error(&w, &dequantize_int8(&rtn_int8(&w, n, k).unwrap()), n, k, &x, rows);
        let e = relative_output_error(
            &w,
            &dequantize_int8(&gptq_int8(&w, n, k, &c, &Default::default()).unwrap()),
            n,
            k,
            &x,
            rows,
        );
        assert!(e < 0.8 * rtn, "int8: GPTQ {e} vs RTN {rtn}");
    }

    #[test]
    fn gptq_is_deterministic_across_thread_counts() {
        let (n, k) = (40, 128);
        let (w, c, _) = correlated_case(6, n, k);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let opts = GptqOptions { act_order: true, ..Default::default() };
                (gptq_int4(&w, n, k, 32, &c, &Default::default()).unwrap(), gptq_int4(&w, n, k, 64, &c, &opts).unwrap())
            })
        };
        assert_eq!(run(1), run(3));
    }

    #[test]
    fn dead_inputs_get_zero_weights_and_bad_hessians_are_errors() {
        let (n, k) = (4, 64);
        let w = gauss(&mut rng(7), n * k);
        let mut x = randn(&mut rng(8), 200 * k, 1.0);
        for row in x.chunks_exact_mut(k) {
            row[10] = 0.0; // input 10 never fires
        }
        let mut c = LinearCalib::new(k);
        c.observe(&x, 200).unwrap();
        let d = dequantize_int4(&gptq_int4(&w, n, k, 32, &c, &Default::default()).unwrap());
        for o in 0..n {
            assert_eq!(d[o * k + 10], 0.0, "row {o}");
        }
        // Rank-deficient H without damping cannot be factored: a clear error, not NaNs.
        let mut low = LinearCalib::new(k);
        low.observe(&x[..8 * k], 8).unwrap();
        let opts = GptqOptions { damp: 0.0, ..Default::default() };
        assert!(matches!(gptq_int4(&w, n, k, 32, &low, &opts), Err(CompressError::NotPositiveDefinite { .. })));
        assert!(gptq_int4(&w, n, k, 32, &low, &Default::default()).is_ok());
        assert!(matches!(
            gptq_int4(&w, n, k, 32, &LinearCalib::new(k), &Default::default()),
            Err(CompressError::NoCalibration)
        ));
    }
}
