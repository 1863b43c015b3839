//! Grouped asymmetric int4 linear layer: `out[r, o] = Σ_i x'[r, i] · (q[o, i] − z[o, g]) · s[o, g] + b[o]`
//! with `g = i / group` and `x' = x / act_scale`.
//!
//! Half a byte per weight: for up to [`GEMV_MAX_ROWS`] rows (decode) each thread widens the
//! nibbles to f32 in registers, dequantizes them with one FMA (`q·s + (−z·s)`) and FMAs them
//! against the rows; for more rows (prefill) it dequantizes a tile of W once and runs a small
//! GEMM. Low and high nibbles are widened as they lie (evens, odds), and the activations are
//! reordered to match once per call, which saves the unpacking shuffles in the inner loop.
// Register arrays are indexed by row and unroll slot, the way the SIMD loops read.
#![allow(clippy::needless_range_loop)]

use half::slice::HalfFloatSliceExt;

use super::qsimd::{deinterleave, lanes, QSimd, PREFETCH_BYTES};
use super::{check_operands, for_row_blocks, for_rows, tiled_prefill, Int4Weight, GEMV_MAX_ROWS};
use crate::kernels::SendPtr;
use crate::simd::Isa;

/// Int4, scalar and f64, straight from the definition.
pub fn int4_matmul_reference(out: &mut [f32], inp: &[f32], w: &Int4Weight, bias: Option<&[f32]>, m: usize) {
    let (n, k) = (w.n, w.k);
    check_operands(out, inp, n, k, bias, m);
    let gpr = w.groups_per_row();
    let act = w.act_scale.as_deref();
    for r in 0..m {
        for o in 0..n {
            let mut acc = bias.map_or(0.0, |b| b[o] as f64);
            for i in 0..k {
                let g = o * gpr + i / w.group;
                let wq = (w.code(o, i) as f64 - w.zero[g].to_f64()) * w.scale[g].to_f64();
                acc += inp[r * k + i] as f64 / act.map_or(1.0, |s| s[i] as f64) * wq;
            }
            out[r * n + o] = acc as f32;
        }
    }
}

/// Int4 on all rayon threads with the widest instruction set this CPU has.
///
/// # Panics
/// If `inp` is not `m·k`, `out` not `m·n`, `bias` not `n` long, or the weight's parts do not
/// match its shape (see [`Int4Weight::validate`]).
pub fn int4_matmul(out: &mut [f32], inp: &[f32], w: &Int4Weight, bias: Option<&[f32]>, m: usize) {
    int4_matmul_isa(Isa::detect(), out, inp, w, bias, m)
}

/// [`int4_matmul`] on a given instruction set (tests and comparisons).
pub fn int4_matmul_isa(isa: Isa, out: &mut [f32], inp: &[f32], w: &Int4Weight, bias: Option<&[f32]>, m: usize) {
    let (n, k) = (w.n, w.k);
    check_operands(out, inp, n, k, bias, m);
    assert!(
        matches!(w.group, 32 | 64 | 128) && k.is_multiple_of(w.group),
        "int4 weight: group {} must be 32, 64 or 128 and divide k = {k}",
        w.group
    );
    let gn = n * w.groups_per_row();
    assert!(
        w.packed.len() == n * k / 2 && w.scale.len() == gn && w.zero.len() == gn,
        "int4 weight: parts do not match n, k, group"
    );
    if m == 0 || n == 0 {
        return;
    }
    // x / act_scale, each block of 2·LANES reordered evens-then-odds to meet the codes as they unpack.
    let lanes = lanes(isa);
    let mut x = inp.to_vec();
    let act = w.act_scale.as_deref();
    for_rows(&mut x, k, |row| {
        if let Some(s) = act {
            row.iter_mut().zip(s).for_each(|(v, &d)| *v /= d);
        }
        deinterleave(row, lanes);
    });
    if m > GEMV_MAX_ROWS {
        return tiled_prefill(out, &x, n, k, bias, m, |o0, tile| {
            // The tile's columns come out in the same evens-then-odds order as x.
            let rows = tile.len() / k;
            let (s, nzs) = group_params(w, o0, o0 + rows);
            dequant_i4_v(isa, tile, o0, w, &s, &nzs)
        });
    }
    let dst = SendPtr(out.as_mut_ptr());
    let x = &*x;
    for_row_blocks(n, k / 2, |o0, o1| {
        let (s, nzs) = group_params(w, o0, o1);
        gemv_i4_v(isa, dst, x, w, bias, m, o0, o1, &s, &nzs);
    });
}

/// Scales and `−zero·scale` of rows `o0..o1` as f32 (F16C through `half` where the CPU has it),
/// so the inner loop dequantizes with one FMA.
fn group_params(w: &Int4Weight, o0: usize, o1: usize) -> (Vec<f32>, Vec<f32>) {
    let gpr = w.groups_per_row();
    let range = o0 * gpr..o1 * gpr;
    let mut s = vec![0.0f32; range.len()];
    let mut nzs = vec![0.0f32; range.len()];
    w.scale[range.clone()].convert_to_f32_slice(&mut s);
    w.zero[range].convert_to_f32_slice(&mut nzs);
    nzs.iter_mut().zip(&s).for_each(|(z, &sc)| *z = -*z * sc);
    (s, nzs)
}

/// Output rows `o0..o1` for `m ≤ 4` rows; `s`, `nzs` are those rows' group parameters.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn gemv_i4<S: QSimd>(
    out: SendPtr,
    x: &[f32],
    w: &Int4Weight,
    bias: Option<&[f32]>,
    m: usize,
    o0: usize,
    o1: usize,
    s: &[f32],
    nzs: &[f32],
) {
    // Two unpacks per step (four accumulators a row) when a group holds a whole number of them.
    let wide = w.group.is_multiple_of(4 * S::LANES);
    match (m, wide) {
        (1, true) => gemv_i4_rows::<S, 1, 2>(out, x, w, bias, o0, o1, s, nzs),
        (1, false) => gemv_i4_rows::<S, 1, 1>(out, x, w, bias, o0, o1, s, nzs),
        (2, true) => gemv_i4_rows::<S, 2, 2>(out, x, w, bias, o0, o1, s, nzs),
        (2, false) => gemv_i4_rows::<S, 2, 1>(out, x, w, bias, o0, o1, s, nzs),
        (3, _) => gemv_i4_rows::<S, 3, 1>(out, x, w, bias, o0, o1, s, nzs),
        _ => gemv_i4_rows::<S, 4, 1>(out, x, w, bias, o0, o1, s, nzs),
    }
}
crate::multiversion!(fn gemv_i4_v(out: SendPtr, x: &[f32], w: &Int4Weight, bias: Option<&[f32]>, m: usize, o0: usize, o1: usize, s: &[f32], nzs: &[f32]) => gemv_i4);

/// `R` activation rows; each step unpacks `U` times `2·LANES` codes (group sizes are multiples of it).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn gemv_i4_rows<S: QSimd, const R: usize, const U: usize>(
    out: SendPtr,
    x: &[f32],
    w: &Int4Weight,
    bias: Option<&[f32]>,
    o0: usize,
    o1: usize,
    s: &[f32],
    nzs: &[f32],
) {
    let (n, k, group) = (w.n, w.k, w.group);
    let gpr = w.groups_per_row();
    let xp = x.as_ptr();
    let step = 2 * U * S::LANES;
    for o in o0..o1 {
        let qp = w.packed.as_ptr().add(o * k / 2);
        let mut acc = [[[S::zero(); 2]; U]; R];
        for g in 0..gpr {
            let p = (o - o0) * gpr + g;
            let (sv, bv) = (S::splat(s[p]), S::splat(nzs[p]));
            let mut i = g * group;
            while i < (g + 1) * group {
                // Never dereferenced, so it may point past the weights.
                S::prefetch(qp.wrapping_add(i / 2 + PREFETCH_BYTES));
                for u in 0..U {
                    let j = i + 2 * u * S::LANES;
                    let (q0, q1) = S::load_u4(qp.add(j / 2));
                    let (w0, w1) = (S::fma(q0, sv, bv), S::fma(q1, sv, bv));
                    for r in 0..R {
                        let xr = xp.add(r * k + j);
                        acc[r][u][0] = S::fma(S::load(xr), w0, acc[r][u][0]);
                        acc[r][u][1] = S::fma(S::load(xr.add(S::LANES)), w1, acc[r][u][1]);
                    }
                }
                i += step;
            }
        }
        for r in 0..R {
            let mut v = S::add(acc[r][0][0], acc[r][0][1]);
            for a in &acc[r][1..] {
                v = S::add(v, S::add(a[0], a[1]));
            }
            // SAFETY (caller): out is m·n long and only this task writes column o.
            *out.0.add(r * n + o) = S::reduce_sum(v) + bias.map_or(0.0, |b| b[o]);
        }
    }
}

/// `tile[j, :] = (q[o0 + j, :] − z) · s` for the rows of one prefill tile, columns evens-then-odds per block.
#[inline(always)]
unsafe fn dequant_i4<S: QSimd>(tile: &mut [f32], o0: usize, w: &Int4Weight, s: &[f32], nzs: &[f32]) {
    let (k, group) = (w.k, w.group);
    let gpr = w.groups_per_row();
    for (j, row) in tile.chunks_exact_mut(k).enumerate() {
        let qp = w.packed.as_ptr().add((o0 + j) * k / 2);
        let dst = row.as_mut_ptr();
        for g in 0..gpr {
            let (sv, bv) = (S::splat(s[j * gpr + g]), S::splat(nzs[j * gpr + g]));
            let mut i = g * group;
            while i < (g + 1) * group {
                let (q0, q1) = S::load_u4(qp.add(i / 2));
                S::store(dst.add(i), S::fma(q0, sv, bv));
                S::store(dst.add(i + S::LANES), S::fma(q1, sv, bv));
                i += 2 * S::LANES;
            }
        }
    }
}
crate::multiversion!(fn dequant_i4_v(tile: &mut [f32], o0: usize, w: &Int4Weight, s: &[f32], nzs: &[f32]) => dequant_i4);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{assert_close_to_sum_scale, pack_int4};
    use crate::testutil::*;
    use half::f16;
    use rand::Rng;

    fn random_weight(seed: u64, n: usize, k: usize, group: usize, act: bool) -> Int4Weight {
        let mut r = rng(seed);
        let codes: Vec<u8> = (0..n * k).map(|_| r.random_range(0u8..16)).collect();
        let g = n * k / group;
        let scale = (0..g).map(|_| f16::from_f32(r.random_range(0.001f32..0.05))).collect();
        let zero = (0..g).map(|_| f16::from_f32(r.random_range(0u8..16) as f32)).collect();
        let act_scale = act.then(|| (0..k).map(|_| r.random_range(0.25f32..4.0)).collect());
        Int4Weight::from_parts(n, k, group, pack_int4(&codes), scale, zero, act_scale).unwrap()
    }

    /// The effective f64 weight `(q − z) · s / act_scale`.
    fn dense(w: &Int4Weight) -> Vec<f64> {
        let (n, k) = (w.n, w.k);
        let act = |i: usize| w.act_scale.as_ref().map_or(1.0, |s| s[i] as f64);
        let g = |o: usize, i: usize| o * w.groups_per_row() + i / w.group;
        (0..n * k)
            .map(|j| {
                let (o, i) = (j / k, j % k);
                (w.code(o, i) as f64 - w.zero[g(o, i)].to_f64()) * w.scale[g(o, i)].to_f64() / act(i)
            })
            .collect()
    }

    #[test]
    fn int4_fast_matches_reference() {
        for &m in &[1usize, 2, 3, 4, 5, 17] {
            for &n in &[1usize, 7, 65] {
                for &k in &[32usize, 96, 576, 640] {
                    for group in [32, 64, 128].into_iter().filter(|g| k.is_multiple_of(*g)) {
                        for act in [false, true] {
                            let w = random_weight((m * 7919 + n * 31 + k + group) as u64, n, k, group, act);
                            let w_eff = dense(&w);
                            let mut r = rng(k as u64 + 3);
                            let x = randn(&mut r, m * k, 2.0);
                            let b = randn(&mut r, n, 1.0);
                            for bias in [None, Some(&b[..])] {
                                let mut y0 = vec![0.0; m * n];
                                int4_matmul_reference(&mut y0, &x, &w, bias, m);
                                for isa in Isa::all_supported() {
                                    let mut y = vec![f32::NAN; m * n];
                                    int4_matmul_isa(isa, &mut y, &x, &w, bias, m);
                                    let what = format!("int4 {isa:?} m{m} n{n} k{k} g{group} act{act}");
                                    assert_close_to_sum_scale(&what, &y, &y0, &x, &w_eff, bias, m, n, k, 1e-5);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn int4_nibble_order_is_low_first() {
        // One row, k = 32: codes 0..16 then 15..=0; zero 0, scale 1, x = e_i picks element i.
        let codes: Vec<u8> = (0..16).chain((0..16).rev()).collect();
        let w = Int4Weight::from_parts(1, 32, 32, pack_int4(&codes), vec![f16::ONE], vec![f16::ZERO], None).unwrap();
        assert_eq!(w.packed[0], 0x10);
        for i in 0..32 {
            let mut x = vec![0.0f32; 32];
            x[i] = 1.0;
            let mut y = [0.0f32];
            for isa in Isa::all_supported() {
                int4_matmul_isa(isa, &mut y, &x, &w, None, 1);
                assert_eq!(y[0], codes[i] as f32, "{isa:?} element {i}");
            }
        }
    }

    #[test]
    fn int4_is_deterministic_across_thread_counts() {
        let (n, k) = (130, 256);
        let w = random_weight(1, n, k, 64, true);
        let x = randn(&mut rng(2), 17 * k, 1.0);
        let run = |threads: usize, m: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let mut y = vec![0.0; m * n];
                int4_matmul(&mut y, &x[..m * k], &w, None, m);
                y
            })
        };
        for m in [1, 3, 17] {
            assert_eq!(run(1, m), run(3, m), "m = {m}");
        }
    }

    #[test]
    fn int4_from_parts_rejects_bad_shapes() {
        use crate::quant::QuantError;
        let ok = || (vec![0u8; 32], vec![f16::ONE; 2], vec![f16::ZERO; 2]);
        let (p, s, z) = ok();
        assert_eq!(Int4Weight::from_parts(2, 32, 48, p, s, z, None).unwrap_err(), QuantError::Group(48));
        let (p, s, z) = ok();
        assert!(matches!(Int4Weight::from_parts(2, 32, 32, p[..31].to_vec(), s, z, None), Err(QuantError::Len { .. })));
        let (p, s, z) = ok();
        assert!(matches!(Int4Weight::from_parts(2, 40, 32, p, s, z, None), Err(QuantError::GroupDivide { .. })));
        let (p, mut s, z) = ok();
        s[1] = f16::NAN;
        assert!(matches!(Int4Weight::from_parts(2, 32, 32, p, s, z, None), Err(QuantError::Value { .. })));
        let (p, s, z) = ok();
        assert!(matches!(
            Int4Weight::from_parts(2, 32, 32, p, s, z, Some(vec![0.0; 32])),
            Err(QuantError::Value { what: "act_scale", .. })
        ));
    }
}
