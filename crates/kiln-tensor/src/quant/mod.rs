//! Integer weight formats and the matmuls that run on them: weight-only int8, int4 (grouped,
//! asymmetric) and W8A8 (int8 weights and per-token dynamic int8 activations).
//!
//! Every product is `out[m, n] = (inp[m, k] / act_scale) · W_effᵀ + bias`, the usual linear
//! layer with weights `[n_out, k_in]` row-major (PyTorch `Linear`). Each kernel comes as a plain
//! reference (f64 or exact integer accumulation, checkable by eye) and a fast version (rayon over
//! output rows, SIMD picked at run time: AVX-512 / AVX512-VNNI, AVX2, scalar), with tests that
//! compare them on awkward shapes for every instruction set this CPU runs.
//!
//! Formats (names as they go into a checkpoint, `{name}.qweight`, `{name}.scale`, `{name}.zero`,
//! `{name}.act_scale`):
//! - [`Int8Weight`]: `q` i8 `[n, k]`, `scale` f32 `[n]`; `w ≈ q · scale[row]` (symmetric).
//! - [`Int4Weight`]: `packed` u8 `[n, k/2]` (element 2j in the low nibble, 2j+1 in the high),
//!   `scale`, `zero` f16 `[n, k/group]`; `w ≈ (q − zero) · scale` with q in 0..=15; the group
//!   size is `k / scale_columns`.
//! - `act_scale` f32 `[k]`, optional on both: a per-input-channel divisor applied to the
//!   activations (AWQ / SmoothQuant store `W·diag(s)` and run on `x / s`), so the model code
//!   stays the same whichever algorithm made the weights.

mod actq;
mod amx;
mod int4;
mod int4_panels;
mod int8;
mod qsimd;

pub use int4::{int4_matmul, int4_matmul_isa, int4_matmul_reference};
pub use int8::{
    int8_weight_matmul, int8_weight_matmul_isa, int8_weight_matmul_reference, quantize_activations, w8a8_matmul,
    w8a8_matmul_isa, w8a8_matmul_reference, W8A8_MAX_K,
};

use half::f16;
use rayon::prelude::*;

/// Why a quantized weight could not be built.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum QuantError {
    #[error("{what}: expected {expected} elements, got {got}")]
    Len { what: &'static str, expected: usize, got: usize },
    #[error("int4 group size {0} is not 32, 64 or 128")]
    Group(usize),
    #[error("k = {k} is not a multiple of the int4 group size {group}")]
    GroupDivide { k: usize, group: usize },
    #[error("{what}[{index}] = {value} is not allowed ({why})")]
    Value { what: &'static str, index: usize, value: f32, why: &'static str },
    #[error("empty weight: n = {n}, k = {k}")]
    Empty { n: usize, k: usize },
}

/// Weight-only or W8A8 int8 linear weight: `w[o, i] ≈ q[o, i] · scale[o]` (symmetric per output row).
#[derive(Clone, Debug, PartialEq)]
pub struct Int8Weight {
    pub n: usize,
    pub k: usize,
    /// `[n, k]` row-major.
    pub q: Vec<i8>,
    /// `[n]`.
    pub scale: Vec<f32>,
    /// `[k]`: the kernels multiply by `W` on `x / act_scale` (AWQ / SmoothQuant fold).
    pub act_scale: Option<Vec<f32>>,
}

/// Grouped asymmetric int4 linear weight: `w[o, i] ≈ (q[o, i] − zero[o, g]) · scale[o, g]`, `g = i / group`.
#[derive(Clone, Debug, PartialEq)]
pub struct Int4Weight {
    pub n: usize,
    pub k: usize,
    /// 32, 64 or 128; divides `k`.
    pub group: usize,
    /// `[n, k/2]`: element 2j in the low nibble of byte j, element 2j+1 in the high nibble.
    pub packed: Vec<u8>,
    /// `[n, k/group]`.
    pub scale: Vec<f16>,
    /// `[n, k/group]`, in code units (usually an integer in 0..=15).
    pub zero: Vec<f16>,
    /// `[k]`, as for [`Int8Weight::act_scale`].
    pub act_scale: Option<Vec<f32>>,
}

fn check_len(what: &'static str, expected: usize, got: usize) -> Result<(), QuantError> {
    if expected == got {
        Ok(())
    } else {
        Err(QuantError::Len { what, expected, got })
    }
}

fn check_finite(what: &'static str, v: impl Iterator<Item = f32>) -> Result<(), QuantError> {
    for (index, value) in v.enumerate() {
        if !value.is_finite() {
            return Err(QuantError::Value { what, index, value, why: "must be finite" });
        }
    }
    Ok(())
}

fn check_act_scale(k: usize, act_scale: &Option<Vec<f32>>) -> Result<(), QuantError> {
    if let Some(s) = act_scale {
        check_len("act_scale", k, s.len())?;
        for (index, &value) in s.iter().enumerate() {
            if !(value.is_finite() && value > 0.0) {
                return Err(QuantError::Value { what: "act_scale", index, value, why: "must be finite and > 0" });
            }
        }
    }
    Ok(())
}

impl Int8Weight {
    /// Builds a weight from its stored parts, checking every length and that the scales are finite.
    pub fn from_parts(
        n: usize,
        k: usize,
        q: Vec<i8>,
        scale: Vec<f32>,
        act_scale: Option<Vec<f32>>,
    ) -> Result<Int8Weight, QuantError> {
        let w = Int8Weight { n, k, q, scale, act_scale };
        w.validate()?;
        Ok(w)
    }

    /// The checks of [`Int8Weight::from_parts`], for a weight whose public fields were edited.
    pub fn validate(&self) -> Result<(), QuantError> {
        if self.n == 0 || self.k == 0 {
            return Err(QuantError::Empty { n: self.n, k: self.k });
        }
        check_len("qweight", self.n * self.k, self.q.len())?;
        check_len("scale", self.n, self.scale.len())?;
        check_finite("scale", self.scale.iter().copied())?;
        check_act_scale(self.k, &self.act_scale)
    }

    /// Bytes the kernels stream per product (codes and scales).
    pub fn weight_bytes(&self) -> usize {
        self.q.len() + 4 * self.scale.len()
    }
}

impl Int4Weight {
    /// Builds a weight from its stored parts, checking the group size, every length and that the
    /// scales and zeros are finite.
    #[allow(clippy::too_many_arguments)]
    pub fn from_parts(
        n: usize,
        k: usize,
        group: usize,
        packed: Vec<u8>,
        scale: Vec<f16>,
        zero: Vec<f16>,
        act_scale: Option<Vec<f32>>,
    ) -> Result<Int4Weight, QuantError> {
        let w = Int4Weight { n, k, group, packed, scale, zero, act_scale };
        w.validate()?;
        Ok(w)
    }

    /// The checks of [`Int4Weight::from_parts`].
    pub fn validate(&self) -> Result<(), QuantError> {
        check_group(self.k, self.group)?;
        if self.n == 0 {
            return Err(QuantError::Empty { n: self.n, k: self.k });
        }
        let groups = self.n * (self.k / self.group);
        check_len("qweight", self.n * self.k / 2, self.packed.len())?;
        check_len("scale", groups, self.scale.len())?;
        check_len("zero", groups, self.zero.len())?;
        check_finite("scale", self.scale.iter().map(|x| x.to_f32()))?;
        check_finite("zero", self.zero.iter().map(|x| x.to_f32()))?;
        check_act_scale(self.k, &self.act_scale)
    }

    /// Groups per output row, `k / group`.
    pub fn groups_per_row(&self) -> usize {
        self.k / self.group
    }

    /// The 4-bit code of element `(o, i)`.
    #[inline]
    pub fn code(&self, o: usize, i: usize) -> u8 {
        let b = self.packed[(o * self.k + i) / 2];
        if i.is_multiple_of(2) {
            b & 0x0F
        } else {
            b >> 4
        }
    }

    /// Bytes the kernels stream per product (codes, scales and zeros).
    pub fn weight_bytes(&self) -> usize {
        self.packed.len() + 2 * (self.scale.len() + self.zero.len())
    }
}

/// The int4 group rule: 32, 64 or 128, dividing a non-zero `k`.
pub fn check_group(k: usize, group: usize) -> Result<(), QuantError> {
    if !matches!(group, 32 | 64 | 128) {
        return Err(QuantError::Group(group));
    }
    if k == 0 || !k.is_multiple_of(group) {
        return Err(QuantError::GroupDivide { k, group });
    }
    Ok(())
}

/// Packs 4-bit codes (each 0..=15) of an even-length row-major matrix, low nibble first.
pub fn pack_int4(codes: &[u8]) -> Vec<u8> {
    codes.chunks(2).map(|p| (p[0] & 0x0F) | (p.get(1).copied().unwrap_or(0) << 4)).collect()
}

/// Checks the operand sizes every quantized matmul shares; a mismatch is a caller bug.
fn check_operands(out: &[f32], inp: &[f32], n: usize, k: usize, bias: Option<&[f32]>, m: usize) {
    assert_eq!(inp.len(), m * k, "quantized matmul: inp holds {} elements, want m·k = {}", inp.len(), m * k);
    assert_eq!(out.len(), m * n, "quantized matmul: out holds {} elements, want m·n = {}", out.len(), m * n);
    assert!(bias.is_none_or(|b| b.len() == n), "quantized matmul: bias length is not n = {n}");
}

/// Activation rows the weight-only kernels run against each weight row at once (a decode step
/// takes one pass; a prompt takes one per four rows, the task's weights staying in L2).
const GEMV_MAX_ROWS: usize = 4;
/// Weight bytes one task streams at most: long contiguous runs for the prefetchers, and still
/// a whole number of tasks per thread.
const TASK_BYTES: usize = 64 << 10;

/// Splits `n` output rows of `row_bytes` each into blocks, a whole number per thread, and runs
/// `f(o0, o1)` on each block in parallel. Every output is computed whole by one task in a fixed
/// order, so the result does not depend on the split (or the thread count).
fn for_row_blocks(n: usize, row_bytes: usize, f: impl Fn(usize, usize) + Sync) {
    let threads = rayon::current_num_threads().max(1);
    let per_thread = (n * row_bytes).div_ceil(threads * TASK_BYTES).max(1);
    let rows = n.div_ceil(threads * per_thread).max(1);
    (0..n.div_ceil(rows)).into_par_iter().for_each(|b| f(b * rows, n.min((b + 1) * rows)));
}

/// The instruction set the int8 dot products of W8A8 run on: the [`crate::Isa`] levels, plus
/// AVX512-VNNI (`vpdpbusd`) where the CPU has it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DotPath {
    Vnni,
    Avx512,
    Avx2,
    Scalar,
}

impl DotPath {
    /// The widest path `isa` allows on this CPU.
    pub(crate) fn for_isa(isa: crate::Isa) -> DotPath {
        match isa {
            crate::Isa::Avx512 if has_vnni() => DotPath::Vnni,
            crate::Isa::Avx512 => DotPath::Avx512,
            crate::Isa::Avx2 => DotPath::Avx2,
            crate::Isa::Scalar => DotPath::Scalar,
        }
    }

    /// Every path this CPU runs, widest first (tests run each).
    #[cfg(test)]
    pub(crate) fn all_supported() -> Vec<DotPath> {
        let mut v = Vec::new();
        for isa in crate::Isa::all_supported() {
            if isa == crate::Isa::Avx512 && has_vnni() {
                v.push(DotPath::Vnni);
            }
            v.push(match isa {
                crate::Isa::Avx512 => DotPath::Avx512,
                crate::Isa::Avx2 => DotPath::Avx2,
                crate::Isa::Scalar => DotPath::Scalar,
            });
        }
        v
    }
}

fn has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Test helper: every `|y − y0|` within `tol · (Σ_i |x_i · w_eff[o, i]| + |b_o|)`, the scale of the
/// rounding error an f32 sum of those terms can make whatever its order (a plain relative error
/// is unbounded when a sum cancels, as single outputs of random data do).
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn assert_close_to_sum_scale(
    what: &str,
    y: &[f32],
    y0: &[f32],
    x: &[f32],
    w_eff: &[f64],
    bias: Option<&[f32]>,
    m: usize,
    n: usize,
    k: usize,
    tol: f64,
) {
    for r in 0..m {
        for o in 0..n {
            let mag: f64 = (0..k).map(|i| (x[r * k + i] as f64 * w_eff[o * k + i]).abs()).sum::<f64>()
                + bias.map_or(0.0, |b| (b[o] as f64).abs());
            let (a, b) = (y[r * n + o], y0[r * n + o]);
            assert!(a.is_finite(), "{what}: non-finite output at ({r}, {o})");
            let e = (a as f64 - b as f64).abs();
            assert!(e <= tol * mag.max(1e-30), "{what}: ({r}, {o}) = {a} vs {b}, error {e:e} > {tol:e} · {mag:e}");
        }
    }
}
