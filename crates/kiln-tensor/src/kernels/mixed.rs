//! Mixed precision as `torch.autocast` does it: every other kernel runs in f32 on the inner
//! backend, while linear layers multiply low-precision operands with f32 accumulation and round
//! what they produce back to the low precision.
//!
//! - bf16: operands rounded to bf16. Where the CPU has AVX512-BF16 they are multiplied by
//!   [`matmul_bf16`] (`vdpbf16ps`, half the bytes and twice the FLOPs of f32 FMA); elsewhere the
//!   bf16 values, held in f32, go through the inner f32 GEMM: every bf16 product is exact in
//!   f32, so this is the same arithmetic (f32 accumulation), only in another summation order,
//!   and measured 1.3–1.6× faster than widening inside `matmul_bf16` on AVX2. The f32 master
//!   weights are rounded on each call, to nearest even or (llm.c's choice) stochastically with
//!   a key hashed from the weights themselves: forward and backward of a step (same weights)
//!   round alike, every optimizer step (new weights) draws afresh, data-parallel replicas
//!   (bit-identical weights) agree, and a resumed run repeats the rounding exactly.
//! - fp16: operands rounded to fp16 (F16C where present, through `half`) and multiplied by the
//!   inner f32 GEMM; values beyond ±65504 become ±inf, which is what dynamic loss scaling watches.
//!
//! Outputs and input gradients of a linear layer are rounded to the low precision (autocast's
//! bf16/fp16 activations); weight and bias gradients stay f32 (they accumulate into f32 grads).

use half::{bf16, f16};
use rayon::prelude::*;

use super::{AdamWStep, Kernels};
use crate::bf16::{f32_to_bf16_rne, f32_to_bf16_stochastic, has_native_bf16_dot, matmul_bf16};

/// The low precision a [`MixedPrecisionKernels`] multiplies in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LowPrecision {
    Bf16,
    Fp16,
}

/// Elements per rayon task in the rounding passes.
const CHUNK: usize = 1 << 14;

/// f32 kernels with autocast-style low-precision linear layers; see the module docs.
pub struct MixedPrecisionKernels {
    inner: Box<dyn Kernels>,
    precision: LowPrecision,
    stochastic: bool,
    /// bf16 operands go to `matmul_bf16` (else: the inner f32 GEMM on bf16-rounded values).
    bf16_gemm: bool,
}

impl MixedPrecisionKernels {
    /// `stochastic` rounds the f32 weights to bf16 stochastically (ignored for fp16, which
    /// always rounds to nearest even).
    pub fn new(inner: Box<dyn Kernels>, precision: LowPrecision, stochastic: bool) -> MixedPrecisionKernels {
        let bf16_gemm = has_native_bf16_dot();
        MixedPrecisionKernels { inner, precision, stochastic, bf16_gemm }
    }

    /// Forces the bf16 path: `matmul_bf16` (true) or the inner f32 GEMM on bf16 values (false);
    /// tests run both on any CPU.
    pub fn with_bf16_gemm(mut self, bf16_gemm: bool) -> MixedPrecisionKernels {
        self.bf16_gemm = bf16_gemm;
        self
    }

    pub fn precision(&self) -> LowPrecision {
        self.precision
    }

    /// The stochastic-rounding seed of one weight matrix: its shape and 64 of its values spread
    /// over it (an optimizer step moves them all, so each step draws a fresh key).
    fn weight_seed(&self, w: &[f32], c_in: usize, c_out: usize) -> u64 {
        let mut h = 0x9e37_79b9_7f4a_7c15u64;
        let stride = (w.len() / 64).max(1);
        let samples = w.iter().step_by(stride).map(|x| x.to_bits() as u64);
        for v in [c_in as u64, c_out as u64].into_iter().chain(samples) {
            h = (h ^ v).wrapping_mul(0x1000_0000_01b3).rotate_left(29);
        }
        h
    }

    fn weight_bf16(&self, w: &[f32], c_in: usize, c_out: usize) -> Vec<bf16> {
        let mut out = vec![bf16::ZERO; w.len()];
        if self.stochastic {
            f32_to_bf16_stochastic(w, &mut out, self.weight_seed(w, c_in, c_out));
        } else {
            f32_to_bf16_rne(w, &mut out);
        }
        out
    }

    /// The same bf16 weights as [`Self::weight_bf16`], held in f32.
    fn weight_bf16_values(&self, w: &[f32], c_in: usize, c_out: usize) -> Vec<f32> {
        if !self.stochastic {
            return rounded_bf16(w);
        }
        let b = self.weight_bf16(w, c_in, c_out);
        let mut out = vec![0.0f32; w.len()];
        crate::bf16::bf16_to_f32(&b, &mut out);
        out
    }
}

fn to_bf16(x: &[f32]) -> Vec<bf16> {
    let mut out = vec![bf16::ZERO; x.len()];
    f32_to_bf16_rne(x, &mut out);
    out
}

/// `x ← bf16(x)` rounded to nearest even, kept in f32.
fn round_to_bf16_in_place(x: &mut [f32]) {
    x.par_chunks_mut(CHUNK).for_each(|c| {
        let mut tmp = vec![bf16::ZERO; c.len()];
        f32_to_bf16_rne(c, &mut tmp);
        for (o, b) in c.iter_mut().zip(&tmp) {
            *o = b.to_f32();
        }
    });
}

/// `x ← fp16(x)` rounded to nearest even, kept in f32; beyond ±65504 gives ±inf.
fn round_to_f16_in_place(x: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    x.par_chunks_mut(CHUNK).for_each(|c| {
        let mut tmp = vec![f16::ZERO; c.len()];
        tmp.convert_from_f32_slice(c);
        tmp.convert_to_f32_slice(c);
    });
}

fn rounded_bf16(x: &[f32]) -> Vec<f32> {
    let mut v = x.to_vec();
    round_to_bf16_in_place(&mut v);
    v
}

fn rounded_f16(x: &[f32]) -> Vec<f32> {
    let mut v = x.to_vec();
    round_to_f16_in_place(&mut v);
    v
}

/// `src [rows, cols]` → bf16 `[cols, rows]`, rounding to nearest even (32 × 32 tiles so both
/// sides stay in cache).
fn transpose_bf16(src: &[bf16], rows: usize, cols: usize) -> Vec<bf16> {
    const TILE: usize = 32;
    let mut out = vec![bf16::ZERO; src.len()];
    // Each task owns TILE output rows (TILE source columns).
    out.par_chunks_mut(TILE * rows).enumerate().for_each(|(tc, dst)| {
        let c0 = tc * TILE;
        let nc = dst.len() / rows;
        for r0 in (0..rows).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                for c in 0..nc {
                    dst[c * rows + r] = src[r * cols + c0 + c];
                }
            }
        }
    });
    out
}

/// `out[rows, n] += part[rows, n]`.
fn add_into(out: &mut [f32], part: &[f32]) {
    out.par_chunks_mut(CHUNK).zip(part.par_chunks(CHUNK)).for_each(|(o, p)| {
        for (a, b) in o.iter_mut().zip(p) {
            *a += b;
        }
    });
}

/// `db[j] += Σ_r dout[r, j]`, rows in order.
fn bias_grad(db: &mut [f32], dout: &[f32], c_out: usize) {
    for row in dout.chunks(c_out) {
        for (a, b) in db.iter_mut().zip(row) {
            *a += b;
        }
    }
}

impl MixedPrecisionKernels {
    fn bf16_forward(&self, out: &mut [f32], inp: &[f32], w: &[f32], bias: Option<&[f32]>, c_in: usize, c_out: usize) {
        if self.bf16_gemm {
            let rows = inp.len() / c_in;
            let (a, wb) = (to_bf16(inp), self.weight_bf16(w, c_in, c_out));
            matmul_bf16(out, &a, &wb, bias, rows, c_in, c_out);
        } else {
            let (a, wv) = (rounded_bf16(inp), self.weight_bf16_values(w, c_in, c_out));
            self.inner.matmul_forward(out, &a, &wv, bias, c_in, c_out);
        }
        round_to_bf16_in_place(out);
    }

    #[allow(clippy::too_many_arguments)]
    fn bf16_backward(
        &self,
        dinp: &mut [f32],
        dweight: &mut [f32],
        dbias: Option<&mut [f32]>,
        dout: &[f32],
        inp: &[f32],
        w: &[f32],
        c_in: usize,
        c_out: usize,
    ) {
        if !self.bf16_gemm {
            let (d, a, wv) = (rounded_bf16(dout), rounded_bf16(inp), self.weight_bf16_values(w, c_in, c_out));
            self.inner.matmul_backward(dinp, dweight, None, &d, &a, &wv, c_in, c_out);
            round_to_bf16_in_place(dinp);
            if let Some(db) = dbias {
                bias_grad(db, &d, c_out);
            }
            return;
        }
        let rows = inp.len() / c_in;
        let d = to_bf16(dout);
        // dinp[rows, c_in] = dout[rows, c_out] · W[c_out, c_in] = dout · (Wᵀ)ᵀ
        let wt = transpose_bf16(&self.weight_bf16(w, c_in, c_out), c_out, c_in);
        matmul_bf16(dinp, &d, &wt, None, rows, c_out, c_in);
        round_to_bf16_in_place(dinp);
        // dW[c_out, c_in] += doutᵀ[c_out, rows] · inp[rows, c_in] = doutᵀ · (inpᵀ)ᵀ
        let (dt, it) = (transpose_bf16(&d, rows, c_out), transpose_bf16(&to_bf16(inp), rows, c_in));
        let mut part = vec![0.0f32; c_out * c_in];
        matmul_bf16(&mut part, &dt, &it, None, c_out, rows, c_in);
        add_into(dweight, &part);
        if let Some(db) = dbias {
            let mut dv = vec![0.0f32; d.len()];
            crate::bf16::bf16_to_f32(&d, &mut dv);
            bias_grad(db, &dv, c_out);
        }
    }
}

impl Kernels for MixedPrecisionKernels {
    fn name(&self) -> String {
        let p = match (self.precision, self.stochastic) {
            (LowPrecision::Bf16, false) => "bf16",
            (LowPrecision::Bf16, true) => "bf16-sr",
            (LowPrecision::Fp16, _) => "fp16",
        };
        format!("{p}+{}", self.inner.name())
    }

    fn matmul_forward(
        &self,
        out: &mut [f32],
        inp: &[f32],
        weight: &[f32],
        bias: Option<&[f32]>,
        c_in: usize,
        c_out: usize,
    ) {
        match self.precision {
            LowPrecision::Bf16 => self.bf16_forward(out, inp, weight, bias, c_in, c_out),
            LowPrecision::Fp16 => {
                let (a, w) = (rounded_f16(inp), rounded_f16(weight));
                self.inner.matmul_forward(out, &a, &w, bias, c_in, c_out);
                round_to_f16_in_place(out);
            }
        }
    }

    fn matmul_backward(
        &self,
        dinp: &mut [f32],
        dweight: &mut [f32],
        dbias: Option<&mut [f32]>,
        dout: &[f32],
        inp: &[f32],
        weight: &[f32],
        c_in: usize,
        c_out: usize,
    ) {
        match self.precision {
            LowPrecision::Bf16 => self.bf16_backward(dinp, dweight, dbias, dout, inp, weight, c_in, c_out),
            LowPrecision::Fp16 => {
                let (d, a, w) = (rounded_f16(dout), rounded_f16(inp), rounded_f16(weight));
                self.inner.matmul_backward(dinp, dweight, None, &d, &a, &w, c_in, c_out);
                round_to_f16_in_place(dinp);
                if let Some(db) = dbias {
                    bias_grad(db, &d, c_out);
                }
            }
        }
    }

    // Everything else is f32 on the inner backend (autocast's fp32 list: norms, softmax,
    // cross-entropy, reductions, the optimizer).
    fn encoder_forward(&self, out: &mut [f32], tokens: &[u32], wte: &[f32], wpe: &[f32], t: usize, c: usize) {
        self.inner.encoder_forward(out, tokens, wte, wpe, t, c)
    }
    fn encoder_backward(&self, dwte: &mut [f32], dwpe: &mut [f32], dout: &[f32], tokens: &[u32], t: usize, c: usize) {
        self.inner.encoder_backward(dwte, dwpe, dout, tokens, t, c)
    }
    fn layernorm_forward(
        &self,
        out: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
        inp: &[f32],
        weight: &[f32],
        bias: &[f32],
        c: usize,
    ) {
        self.inner.layernorm_forward(out, mean, rstd, inp, weight, bias, c)
    }
    fn layernorm_backward(
        &self,
        dinp: &mut [f32],
        dweight: &mut [f32],
        dbias: &mut [f32],
        dout: &[f32],
        inp: &[f32],
        weight: &[f32],
        mean: &[f32],
        rstd: &[f32],
        c: usize,
    ) {
        self.inner.layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd, c)
    }
    fn attention_forward(
        &self,
        out: &mut [f32],
        lse: &mut [f32],
        qkv: &[f32],
        b: usize,
        t: usize,
        nh: usize,
        hs: usize,
    ) {
        self.inner.attention_forward(out, lse, qkv, b, t, nh, hs)
    }
    fn attention_backward(
        &self,
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
        self.inner.attention_backward(dqkv, dout, qkv, out, lse, b, t, nh, hs)
    }
    fn attention_decode(
        &self,
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
        self.inner.attention_decode(out, q, k_cache, v_cache, lens, cap, nh, nkv, hs)
    }
    fn rmsnorm_forward(&self, out: &mut [f32], rstd: &mut [f32], inp: &[f32], weight: &[f32], c: usize, eps: f32) {
        self.inner.rmsnorm_forward(out, rstd, inp, weight, c, eps)
    }
    fn rmsnorm_backward(
        &self,
        dinp: &mut [f32],
        dweight: &mut [f32],
        dout: &[f32],
        inp: &[f32],
        weight: &[f32],
        rstd: &[f32],
        c: usize,
    ) {
        self.inner.rmsnorm_backward(dinp, dweight, dout, inp, weight, rstd, c)
    }
    fn rope(&self, x: &mut [f32], pos: &[usize], cos: &[f32], sin: &[f32], n_heads: usize, hs: usize, inverse: bool) {
        self.inner.rope(x, pos, cos, sin, n_heads, hs, inverse)
    }
    fn swiglu_forward(&self, out: &mut [f32], gate: &[f32], up: &[f32]) {
        self.inner.swiglu_forward(out, gate, up)
    }
    fn swiglu_backward(&self, dgate: &mut [f32], dup: &mut [f32], gate: &[f32], up: &[f32], dout: &[f32]) {
        self.inner.swiglu_backward(dgate, dup, gate, up, dout)
    }
    fn gelu_forward(&self, out: &mut [f32], inp: &[f32]) {
        self.inner.gelu_forward(out, inp)
    }
    fn gelu_backward(&self, dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
        self.inner.gelu_backward(dinp, inp, dout)
    }
    fn residual_forward(&self, out: &mut [f32], a: &[f32], b: &[f32]) {
        self.inner.residual_forward(out, a, b)
    }
    fn crossentropy_forward_backward(
        &self,
        logits: &mut [f32],
        losses: &mut [f32],
        targets: &[u32],
        v: usize,
        vp: usize,
        dloss: Option<f32>,
    ) {
        self.inner.crossentropy_forward_backward(logits, losses, targets, v, vp, dloss)
    }
    fn sum_of_squares(&self, x: &[f32]) -> f64 {
        self.inner.sum_of_squares(x)
    }
    fn adamw_update(&self, params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], step: &AdamWStep) {
        self.inner.adamw_update(params, grads, m, v, step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use crate::{CpuKernels, ReferenceKernels};

    fn round_bf16(x: &[f32]) -> Vec<f32> {
        x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect()
    }
    fn round_f16(x: &[f32]) -> Vec<f32> {
        x.iter().map(|&v| f16::from_f32(v).to_f32()).collect()
    }

    /// The definition: round the operands, multiply exactly (f64), round the output.
    fn forward_want(inp: &[f32], w: &[f32], bias: &[f32], c_in: usize, c_out: usize, p: LowPrecision) -> Vec<f32> {
        let r = |x: &[f32]| if p == LowPrecision::Bf16 { round_bf16(x) } else { round_f16(x) };
        let (a, wr) = (r(inp), r(w));
        let mut out = vec![0.0f32; inp.len() / c_in * c_out];
        ReferenceKernels.matmul_forward(&mut out, &a, &wr, Some(bias), c_in, c_out);
        r(&out)
    }

    #[test]
    fn low_precision_matmuls_match_their_definition_and_differ_from_f32() {
        let (rows, c_in, c_out) = (37, 70, 45);
        let mut g = rng(5);
        let (inp, w, bias) =
            (randn(&mut g, rows * c_in, 1.0), randn(&mut g, c_out * c_in, 0.3), randn(&mut g, c_out, 0.1));
        let dout = randn(&mut g, rows * c_out, 1.0);
        for (p, bf16_gemm) in [(LowPrecision::Bf16, true), (LowPrecision::Bf16, false), (LowPrecision::Fp16, false)] {
            let k = MixedPrecisionKernels::new(Box::new(CpuKernels::default()), p, false).with_bf16_gemm(bf16_gemm);
            let mut out = vec![0.0; rows * c_out];
            k.matmul_forward(&mut out, &inp, &w, Some(&bias), c_in, c_out);
            let want = forward_want(&inp, &w, &bias, c_in, c_out, p);
            // One low-precision ulp at most: f32 accumulation order may flip the final rounding.
            let ulp = if p == LowPrecision::Bf16 { 1.0 / 128.0 } else { 1.0 / 1024.0 };
            for (g, w) in out.iter().zip(&want) {
                assert!((g - w).abs() <= ulp * w.abs().max(1e-3), "{p:?} forward {g} vs {w}");
            }
            let mut f32_out = vec![0.0; rows * c_out];
            CpuKernels::default().matmul_forward(&mut f32_out, &inp, &w, Some(&bias), c_in, c_out);
            let e = rel_err(&out, &f32_out);
            assert!(e > 1e-5 && e < 2e-2, "{p:?}: distance from f32 {e:e} is not the rounding's");

            // Backward against the f32 reference on rounded operands.
            let r = |x: &[f32]| if p == LowPrecision::Bf16 { round_bf16(x) } else { round_f16(x) };
            let (mut dinp, mut dw, mut db) = (vec![0.0; rows * c_in], vec![0.5; c_out * c_in], vec![0.25; c_out]);
            k.matmul_backward(&mut dinp, &mut dw, Some(&mut db), &dout, &inp, &w, c_in, c_out);
            let (mut rdinp, mut rdw, mut rdb) = (vec![0.0; rows * c_in], vec![0.5; c_out * c_in], vec![0.25; c_out]);
            ReferenceKernels.matmul_backward(
                &mut rdinp,
                &mut rdw,
                Some(&mut rdb),
                &r(&dout),
                &r(&inp),
                &r(&w),
                c_in,
                c_out,
            );
            assert_close("dinp", &dinp, &r(&rdinp), 2e-3);
            assert_close("dweight", &dw, &rdw, 1e-5);
            assert_close("dbias", &db, &rdb, 1e-5);
        }
    }

    #[test]
    fn fp16_overflow_becomes_inf_and_bf16_does_not() {
        let (c_in, c_out) = (4, 2);
        let inp = vec![300.0f32; c_in];
        let w = vec![100.0f32; c_out * c_in]; // each output 4 · 30000 = 120000 > 65504
        let mut out = vec![0.0; c_out];
        MixedPrecisionKernels::new(Box::new(CpuKernels::default()), LowPrecision::Fp16, false)
            .matmul_forward(&mut out, &inp, &w, None, c_in, c_out);
        assert!(out.iter().all(|x| x.is_infinite()), "{out:?}");
        MixedPrecisionKernels::new(Box::new(CpuKernels::default()), LowPrecision::Bf16, false)
            .matmul_forward(&mut out, &inp, &w, None, c_in, c_out);
        // 120000 to the nearest bf16 (an ulp of 512 there) is 119808: finite.
        assert_eq!(out, vec![119_808.0; c_out]);
    }

    #[test]
    fn stochastic_weights_are_fixed_for_given_weights_and_change_with_them() {
        let (rows, c_in, c_out) = (8, 64, 32);
        let mut g = rng(9);
        let (inp, w) = (randn(&mut g, rows * c_in, 1.0), randn(&mut g, c_out * c_in, 0.3));
        let run = |k: &MixedPrecisionKernels, w: &[f32]| {
            let mut out = vec![0.0; rows * c_out];
            k.matmul_forward(&mut out, &inp, w, None, c_in, c_out);
            out
        };
        let mut per_path = Vec::new();
        for bf16_gemm in [true, false] {
            let k = MixedPrecisionKernels::new(Box::new(CpuKernels::default()), LowPrecision::Bf16, true)
                .with_bf16_gemm(bf16_gemm);
            let (a, b) = (run(&k, &w), run(&k, &w));
            assert_eq!(a, b, "same weights, same rounding");
            // A step's worth of change in one weight redraws the key for the whole matrix: the
            // outputs that do not read that weight change too.
            let mut w2 = w.clone();
            w2[0] += 1e-3;
            let b = run(&k, &w2);
            let other_columns =
                |o: &[f32]| o.iter().enumerate().filter(|(i, _)| i % c_out != 0).map(|(_, x)| *x).collect::<Vec<_>>();
            assert_ne!(other_columns(&a), other_columns(&b));
            per_path.push(a);
        }
        // Both paths round the weights identically: outputs differ by accumulation order only.
        assert_close("bf16 paths", &per_path[0], &per_path[1], 1e-2);
    }
}
