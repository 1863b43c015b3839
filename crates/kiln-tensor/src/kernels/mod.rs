//! The kernel boundary: every op a GPT training step needs, behind one trait.
//!
//! [`ReferenceKernels`] is the plain scalar version (f64 accumulation where it matters), kept
//! simple enough to check by eye; [`CpuKernels`] is the fast one (rayon threads and SIMD picked
//! at run time). Every op's two versions live side by side in one file with a test that runs
//! both on random inputs of awkward sizes.
//!
//! Conventions (llm.c's): activations are row-major `[rows, channels]`; linear weights are
//! `[out, in]` like PyTorch; backward kernels *accumulate* into weight gradients (`+=`, so
//! gradient accumulation is free) and say per op whether the input gradient is overwritten or
//! accumulated.

mod adamw;
mod attention;
mod attention_decode;
mod crossentropy;
mod encoder;
mod gelu;
mod layernorm;
mod matmul;
#[cfg(test)]
pub(crate) use matmul::with_each_gemv_layout;
pub(crate) use matmul::GemvLayout;
mod mixed;
mod residual;
mod rmsnorm;
mod rope;
mod swiglu;

pub use adamw::AdamWStep;
pub use mixed::{LowPrecision, MixedPrecisionKernels};

use crate::simd::Isa;

/// `a · b` over `n` values with two accumulators, so the FMA latency never bounds a stream
/// (attention scores; the one-row decode GEMV).
#[inline(always)]
pub(crate) unsafe fn dot<S: crate::simd::Simd>(a: *const f32, b: *const f32, n: usize) -> f32 {
    let (mut a0, mut a1) = (S::zero(), S::zero());
    let mut d = 0;
    while d + 2 * S::LANES <= n {
        a0 = S::fma(S::load(a.add(d)), S::load(b.add(d)), a0);
        a1 = S::fma(S::load(a.add(d + S::LANES)), S::load(b.add(d + S::LANES)), a1);
        d += 2 * S::LANES;
    }
    let mut s = S::reduce_sum(S::add(a0, a1));
    while d < n {
        s += *a.add(d) * *b.add(d);
        d += 1;
    }
    s
}

/// A `*mut f32` that rayon tasks may share when each writes a disjoint region.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub *mut f32);
// SAFETY: only used by kernels whose tasks write provably disjoint index sets.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// Offsets the pointer; a method so closures capture the whole (Send) wrapper.
    ///
    /// # Safety
    /// As `pointer::add`: the result must stay inside the original allocation.
    #[inline(always)]
    pub(crate) unsafe fn add(self, n: usize) -> SendPtr {
        SendPtr(unsafe { self.0.add(n) })
    }
}

pub trait Kernels: Send + Sync {
    fn name(&self) -> String;

    /// `out[b,t,:] = wte[tokens[b,t]] + wpe[t]`; tokens `[b, t]`, out `[b, t, c]`.
    fn encoder_forward(&self, out: &mut [f32], tokens: &[u32], wte: &[f32], wpe: &[f32], t: usize, c: usize);
    /// `dwte[tok] += dout`, `dwpe[t] += dout` (both accumulate).
    fn encoder_backward(&self, dwte: &mut [f32], dwpe: &mut [f32], dout: &[f32], tokens: &[u32], t: usize, c: usize);

    /// Row-wise LayerNorm over `c` channels (eps 1e-5, biased variance, as PyTorch); saves mean and 1/std.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_forward(
        &self,
        out: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
        inp: &[f32],
        weight: &[f32],
        bias: &[f32],
        c: usize,
    );
    /// Accumulates into `dinp` (the residual stream), `dweight` and `dbias`.
    #[allow(clippy::too_many_arguments)]
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
    );

    /// `out[n, c_out] = inp[n, c_in] · weight[c_out, c_in]ᵀ + bias`.
    fn matmul_forward(
        &self,
        out: &mut [f32],
        inp: &[f32],
        weight: &[f32],
        bias: Option<&[f32]>,
        c_in: usize,
        c_out: usize,
    );
    /// Overwrites `dinp = dout · weight`; accumulates `dweight += doutᵀ · inp` and `dbias += Σ dout`.
    #[allow(clippy::too_many_arguments)]
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
    );

    /// Causal multi-head attention on `qkv [b, t, 3c]` (q, k, v each `nh` heads of `hs`);
    /// writes `out [b, t, c]` and the softmax log-sum-exp `lse [b, nh, t]` for backward.
    #[allow(clippy::too_many_arguments)]
    fn attention_forward(
        &self,
        out: &mut [f32],
        lse: &mut [f32],
        qkv: &[f32],
        b: usize,
        t: usize,
        nh: usize,
        hs: usize,
    );
    /// Overwrites `dqkv` from `dout`, recomputing the probabilities from `lse`.
    #[allow(clippy::too_many_arguments)]
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
    );

    /// One new query per sequence against its KV cache: `q [b, nh·hs]`, caches
    /// `[b, cap, nkv·hs]` holding `lens[s]` positions each (the newest included); writes
    /// `out [b, nh·hs]`. Query head h reads key/value head h / (nh/nkv) (grouped-query attention).
    #[allow(clippy::too_many_arguments)]
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
    );

    /// Row-wise RMSNorm over `c` channels (Llama's); saves 1/rms per row.
    fn rmsnorm_forward(&self, out: &mut [f32], rstd: &mut [f32], inp: &[f32], weight: &[f32], c: usize, eps: f32);
    /// Accumulates into `dinp` (the residual stream) and `dweight`.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_backward(
        &self,
        dinp: &mut [f32],
        dweight: &mut [f32],
        dout: &[f32],
        inp: &[f32],
        weight: &[f32],
        rstd: &[f32],
        c: usize,
    );

    /// Rotates `x [rows, n_heads·hs]` in place by RoPE at positions `pos` (tables
    /// `cos`/`sin` `[positions, hs/2]`, rotate-half layout); `inverse` turns back (backward).
    #[allow(clippy::too_many_arguments)]
    fn rope(&self, x: &mut [f32], pos: &[usize], cos: &[f32], sin: &[f32], n_heads: usize, hs: usize, inverse: bool);

    /// `out = silu(gate) · up` (the SwiGLU MLP).
    fn swiglu_forward(&self, out: &mut [f32], gate: &[f32], up: &[f32]);
    /// Overwrites `dgate` and `dup`.
    fn swiglu_backward(&self, dgate: &mut [f32], dup: &mut [f32], gate: &[f32], up: &[f32], dout: &[f32]);

    /// GELU, tanh approximation (GPT-2's).
    fn gelu_forward(&self, out: &mut [f32], inp: &[f32]);
    /// Overwrites `dinp`.
    fn gelu_backward(&self, dinp: &mut [f32], inp: &[f32], dout: &[f32]);

    /// `out = a + b`.
    fn residual_forward(&self, out: &mut [f32], a: &[f32], b: &[f32]);

    /// Softmax cross-entropy over the first `v` of `vp` columns of each row of `logits`; the
    /// padded columns are masked out. Writes the per-row loss; when `dloss` is given, overwrites
    /// `logits` with `dloss · (softmax − onehot(target))` (zero in padded columns).
    fn crossentropy_forward_backward(
        &self,
        logits: &mut [f32],
        losses: &mut [f32],
        targets: &[u32],
        v: usize,
        vp: usize,
        dloss: Option<f32>,
    );

    /// Σ x², accumulated in f64 in a fixed order (gradient-norm clipping).
    fn sum_of_squares(&self, x: &[f32]) -> f64;

    /// One AdamW step on a parameter tensor, exactly as `torch.optim.AdamW` (non-fused) does it,
    /// with the gradient multiplied by `step.grad_scale` first (the clipping coefficient).
    fn adamw_update(&self, params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], step: &AdamWStep);
}

/// The scalar references: single-threaded, obvious, f64 accumulation.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReferenceKernels;

/// The fast CPU kernels: rayon across cores, SIMD chosen at run time.
#[derive(Clone, Copy, Debug)]
pub struct CpuKernels {
    pub isa: Isa,
}

impl Default for CpuKernels {
    fn default() -> Self {
        CpuKernels { isa: Isa::detect() }
    }
}

impl CpuKernels {
    pub fn with_isa(isa: Isa) -> CpuKernels {
        CpuKernels { isa }
    }
}

impl Kernels for ReferenceKernels {
    fn name(&self) -> String {
        "reference".into()
    }
    fn encoder_forward(&self, out: &mut [f32], tokens: &[u32], wte: &[f32], wpe: &[f32], t: usize, c: usize) {
        encoder::encoder_forward_reference(out, tokens, wte, wpe, t, c)
    }
    fn encoder_backward(&self, dwte: &mut [f32], dwpe: &mut [f32], dout: &[f32], tokens: &[u32], t: usize, c: usize) {
        encoder::encoder_backward_reference(dwte, dwpe, dout, tokens, t, c)
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
        layernorm::layernorm_forward_reference(out, mean, rstd, inp, weight, bias, c)
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
        layernorm::layernorm_backward_reference(dinp, dweight, dbias, dout, inp, weight, mean, rstd, c)
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
        matmul::matmul_forward_reference(out, inp, weight, bias, c_in, c_out)
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
        matmul::matmul_backward_reference(dinp, dweight, dbias, dout, inp, weight, c_in, c_out)
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
        attention::attention_forward_reference(out, lse, qkv, b, t, nh, hs)
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
        attention::attention_backward_reference(dqkv, dout, qkv, out, lse, b, t, nh, hs)
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
        attention_decode::attention_decode_reference(out, q, k_cache, v_cache, lens, cap, nh, nkv, hs)
    }
    fn rmsnorm_forward(&self, out: &mut [f32], rstd: &mut [f32], inp: &[f32], weight: &[f32], c: usize, eps: f32) {
        rmsnorm::rmsnorm_forward_reference(out, rstd, inp, weight, c, eps)
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
        rmsnorm::rmsnorm_backward_reference(dinp, dweight, dout, inp, weight, rstd, c)
    }
    fn rope(&self, x: &mut [f32], pos: &[usize], cos: &[f32], sin: &[f32], n_heads: usize, hs: usize, inverse: bool) {
        rope::rope_reference(x, pos, cos, sin, n_heads, hs, inverse)
    }
    fn swiglu_forward(&self, out: &mut [f32], gate: &[f32], up: &[f32]) {
        swiglu::swiglu_forward_reference(out, gate, up)
    }
    fn swiglu_backward(&self, dgate: &mut [f32], dup: &mut [f32], gate: &[f32], up: &[f32], dout: &[f32]) {
        swiglu::swiglu_backward_reference(dgate, dup, gate, up, dout)
    }
    fn gelu_forward(&self, out: &mut [f32], inp: &[f32]) {
        gelu::gelu_forward_reference(out, inp)
    }
    fn gelu_backward(&self, dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
        gelu::gelu_backward_reference(dinp, inp, dout)
    }
    fn residual_forward(&self, out: &mut [f32], a: &[f32], b: &[f32]) {
        residual::residual_forward_reference(out, a, b)
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
        crossentropy::crossentropy_reference(logits, losses, targets, v, vp, dloss)
    }
    fn sum_of_squares(&self, x: &[f32]) -> f64 {
        adamw::sum_of_squares_reference(x)
    }
    fn adamw_update(&self, params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], step: &AdamWStep) {
        adamw::adamw_reference(params, grads, m, v, step)
    }
}

impl Kernels for CpuKernels {
    fn name(&self) -> String {
        format!("cpu-{}x{}", self.isa.name(), rayon::current_num_threads())
    }
    fn encoder_forward(&self, out: &mut [f32], tokens: &[u32], wte: &[f32], wpe: &[f32], t: usize, c: usize) {
        encoder::encoder_forward(self.isa, out, tokens, wte, wpe, t, c)
    }
    fn encoder_backward(&self, dwte: &mut [f32], dwpe: &mut [f32], dout: &[f32], tokens: &[u32], t: usize, c: usize) {
        encoder::encoder_backward(self.isa, dwte, dwpe, dout, tokens, t, c)
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
        layernorm::layernorm_forward(self.isa, out, mean, rstd, inp, weight, bias, c)
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
        layernorm::layernorm_backward(self.isa, dinp, dweight, dbias, dout, inp, weight, mean, rstd, c)
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
        matmul::matmul_forward(self.isa, out, inp, weight, bias, c_in, c_out)
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
        matmul::matmul_backward(self.isa, dinp, dweight, dbias, dout, inp, weight, c_in, c_out)
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
        attention::attention_forward(self.isa, out, lse, qkv, b, t, nh, hs)
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
        attention::attention_backward(self.isa, dqkv, dout, qkv, out, lse, b, t, nh, hs)
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
        attention_decode::attention_decode(self.isa, out, q, k_cache, v_cache, lens, cap, nh, nkv, hs)
    }
    fn rmsnorm_forward(&self, out: &mut [f32], rstd: &mut [f32], inp: &[f32], weight: &[f32], c: usize, eps: f32) {
        rmsnorm::rmsnorm_forward(self.isa, out, rstd, inp, weight, c, eps)
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
        rmsnorm::rmsnorm_backward(self.isa, dinp, dweight, dout, inp, weight, rstd, c)
    }
    fn rope(&self, x: &mut [f32], pos: &[usize], cos: &[f32], sin: &[f32], n_heads: usize, hs: usize, inverse: bool) {
        rope::rope(x, pos, cos, sin, n_heads, hs, inverse)
    }
    fn swiglu_forward(&self, out: &mut [f32], gate: &[f32], up: &[f32]) {
        swiglu::swiglu_forward(self.isa, out, gate, up)
    }
    fn swiglu_backward(&self, dgate: &mut [f32], dup: &mut [f32], gate: &[f32], up: &[f32], dout: &[f32]) {
        swiglu::swiglu_backward(self.isa, dgate, dup, gate, up, dout)
    }
    fn gelu_forward(&self, out: &mut [f32], inp: &[f32]) {
        gelu::gelu_forward(self.isa, out, inp)
    }
    fn gelu_backward(&self, dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
        gelu::gelu_backward(self.isa, dinp, inp, dout)
    }
    fn residual_forward(&self, out: &mut [f32], a: &[f32], b: &[f32]) {
        residual::residual_forward(self.isa, out, a, b)
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
        crossentropy::crossentropy_forward_backward(self.isa, logits, losses, targets, v, vp, dloss)
    }
    fn sum_of_squares(&self, x: &[f32]) -> f64 {
        adamw::sum_of_squares(self.isa, x)
    }
    fn adamw_update(&self, params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], step: &AdamWStep) {
        adamw::adamw_update(self.isa, params, grads, m, v, step)
    }
}

/// Rows per rayon task for row-wise kernels: big enough to amortise scheduling, fixed so the
/// reduction order (and so the result) does not depend on the thread count.
pub(crate) const ROW_CHUNK: usize = 16;

/// Elements per rayon task for element-wise kernels.
pub(crate) const ELEM_CHUNK: usize = 1 << 14;
