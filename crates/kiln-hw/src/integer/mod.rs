//! The integer-only executor: a GPT-2 or Llama-family model run the way a fixed-point
//! accelerator runs it, in the manner of I-BERT (Kim et al. 2021).
//!
//! - Weights int8, symmetric, one scale per output channel; activations entering a GEMM int8,
//!   symmetric, one static scale per tensor from calibration (max|x|/127 over a float run).
//! - int8 × int8 → int32 accumulation; biases int32 at scale s_x·s_w; every change of scale is
//!   a requantisation by a 32-bit multiplier and shift (TFLite's MultiplyByQuantizedMultiplier,
//!   [`quant`]).
//! - The residual stream is int32 codes at one scale for the whole model (2·max|x|/2^20 from
//!   calibration), so residual adds are plain integer adds.
//! - LayerNorm, softmax (i-exp) and GELU (i-GELU) are I-BERT's integer kernels ([`kernels`]).
//!   Attention probabilities are 15-bit fractions (u16 range), multiplied with int8 values.
//! - Llama family: RMSNorm is the LayerNorm kernel without centring; RoPE rotates 16-bit query
//!   and key codes by Q14 cos/sin tables before they are requantised to int8; SiLU is x·σ(x)
//!   with σ from i-exp (Q15); the SwiGLU product and grouped-query attention stay integer.
//! - Floats appear only at conversion (scales, multipliers and integer constants are computed
//!   once) and in turning the final int32 logits into f32 for sampling and losses.
//!
//! Everything in the forward is integer arithmetic, so results are bit-identical across runs,
//! thread counts and machines, and cached decode equals full recompute exactly.

pub mod kernels;
pub mod quant;

use std::path::Path;

use kiln_model::{CausalLm, Gpt, KvCache, ModelError};
use kiln_tensor::Kernels;
use rayon::prelude::*;

use crate::onnx::weights::{calibrate_absmax, calibration_tokens, Linear, Mlp, ModelWeights, Point};
use kernels::{softmax_row, IExp, IGelu, ILayerNorm, ISigmoid};
use quant::{multiply_by_quantized_multiplier, requantize_i64, sat_i8, scale_for, QuantMultiplier};

/// Residual-stream codes span ±2^20 at the calibrated maximum ×2; they saturate at ±2^23.
const RES_LEVELS: f32 = (1 << 20) as f32;
const RES_CLAMP: i32 = 1 << 23;
/// Attention scores enter i-exp at scale 2^-12; below −24 exp is under one output step.
const SCORE_SCALE: f64 = 1.0 / 4096.0;
const SCORE_RANGE: f64 = 24.0;
/// Attention probabilities in fixed point with 15 fractional bits.
const PROB_BITS: u32 = 15;
/// GELU / SiLU inputs as codes of at most 2^15, covering ±max(2·max|x|, 4).
const GELU_LEVELS: i64 = 1 << 15;
/// Queries and keys before RoPE: 16-bit codes at 2·max|x| (a rotation can grow an element √2).
const ROPE_LEVELS: f32 = (1 << 15) as f32;
/// Fractional bits of the integer cos and sin tables.
const ROPE_BITS: u32 = 14;

/// A linear layer in integers: int8 `w [out, in]`, int32 bias at s_in·s_w[o], and the
/// multiplier from the accumulator's scale to the output's.
#[derive(Clone, Debug)]
struct ILinear {
    w: Vec<i8>,
    bias: Vec<i32>,
    mult: Vec<QuantMultiplier>,
    out: usize,
    inp: usize,
}

impl ILinear {
    fn new(l: &Linear, s_in: f64, s_out: f64) -> ILinear {
        let (w, sw) = quant::quantize_rows(&l.w, l.out, l.inp);
        let bias = (0..l.out)
            .map(|o| {
                let b = l.b.as_ref().map_or(0.0, |b| b[o] as f64);
                (b / (s_in * sw[o] as f64)).round().clamp(i32::MIN as f64, i32::MAX as f64) as i32
            })
            .collect();
        let mult = sw.iter().map(|&s| QuantMultiplier::from_f64(s_in * s as f64 / s_out)).collect();
        ILinear { w, bias, mult, out: l.out, inp: l.inp }
    }

    /// Requantised outputs `[rows, out]` (before saturation) for int8 inputs `[rows, in]`.
    fn forward(&self, x: &[i8]) -> Vec<i32> {
        let rows = x.len() / self.inp;
        let mut y = vec![0i32; rows * self.out];
        y.par_chunks_mut(64).enumerate().for_each(|(chunk, ys)| {
            for (k, yv) in ys.iter_mut().enumerate() {
                let idx = chunk * 64 + k;
                let (r, o) = (idx / self.out, idx % self.out);
                let acc = dot_i8(&x[r * self.inp..(r + 1) * self.inp], &self.w[o * self.inp..(o + 1) * self.inp]);
                *yv = multiply_by_quantized_multiplier(acc.saturating_add(self.bias[o]), self.mult[o]);
            }
        });
        y
    }
}

fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    a.iter().zip(b).map(|(&x, &y)| x as i32 * y as i32).sum()
}

#[derive(Clone, Debug)]
enum IMlp {
    /// GPT-2: proj(i-GELU(fc(x))).
    Gelu { fc: ILinear, gelu: IGelu, pre: u32, mult: QuantMultiplier, proj: ILinear },
    /// Llama: down(silu(gate(x)) · up(x)); silu·up lands at s_g·2^-15·s_u before requantisation.
    SwiGlu { gate: ILinear, up: ILinear, sigmoid: ISigmoid, pre: u32, mult: QuantMultiplier, down: ILinear },
}

#[derive(Clone, Debug)]
struct ILayer {
    norm1: ILayerNorm,
    q: ILinear,
    k: ILinear,
    v: ILinear,
    /// Llama: the rotated q and k (16-bit codes × Q14 tables) → int8.
    rope: Option<(QuantMultiplier, QuantMultiplier)>,
    /// q·k accumulator (s_q·s_k) → scores at SCORE_SCALE, with 1/√d folded in.
    score_mult: QuantMultiplier,
    /// Σ p·v (2^-15·s_v) → int8 input of o.
    att_mult: QuantMultiplier,
    o: ILinear,
    norm2: ILayerNorm,
    mlp: IMlp,
}

/// Bits above 31 of a value bounded by `max`: the rounding pre-shift before a multiplier.
fn pre_shift(max: i64) -> u32 {
    (64 - max.leading_zeros()).saturating_sub(31)
}

/// The scales calibration chose, for reports and tests.
#[derive(Clone, Debug, PartialEq)]
pub struct IntegerScales {
    /// The residual stream's scale.
    pub residual: f64,
    /// Per layer: norm-1 output, q, k, v, attention output, norm-2 output, GELU / gate input
    /// codes, down-projection input.
    pub layers: Vec<[f64; 8]>,
    pub head_in: f64,
}

/// A GPT-2 or Llama-family model converted to integer-only inference. Implements [`CausalLm`].
pub struct IntegerGpt {
    model_type: String,
    n_layer: usize,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    n_embd: usize,
    context: usize,
    vocab: usize,
    num_params: usize,
    tok_emb: Vec<i32>,
    /// GPT-2's learned positions, at the residual scale.
    pos_emb: Option<Vec<i32>>,
    /// Llama's RoPE cos and sin `[context, head_dim/2]` in Q14.
    rope: Option<(Vec<i32>, Vec<i32>)>,
    layers: Vec<ILayer>,
    iexp: IExp,
    lnf: ILayerNorm,
    head: Vec<i8>,
    /// s_f·s_w[v]: turns the head's int32 accumulators into f32 logits.
    head_scale: Vec<f32>,
    pub scales: IntegerScales,
    kv: IntKv,
}

/// The integer keys and values of every layer, `[batch, cap, kv_dim]` int8 codes, beside the
/// f32 [`KvCache`] whose lengths the callers track (kiln-model keeps that cache's storage
/// private to its own models).
#[derive(Default)]
struct IntKv {
    batch: usize,
    cap: usize,
    lens: Vec<usize>,
    k: Vec<Vec<i8>>,
    v: Vec<Vec<i8>>,
}

fn shape_err(msg: impl Into<String>) -> ModelError {
    ModelError::Shape(msg.into())
}

impl IntegerGpt {
    /// Converts a float GPT-2 model, calibrating activation scales on `calib` (token sequences).
    pub fn from_float(gpt: &Gpt, calib: &[Vec<u32>]) -> Result<IntegerGpt, ModelError> {
        Self::from_weights(&ModelWeights::from_gpt(gpt), calib)
    }

    /// Loads a checkpoint directory (GPT-2, Llama, Qwen2, Mistral) and converts it; calibration on `calib_text`
    /// (tokenized with the checkpoint's tokenizer.json, 8 windows of up to 128 tokens) or,
    /// without it, on 8 seeded random sequences of up to 128 tokens.
    pub fn load(dir: &Path, calib_text: Option<&Path>) -> Result<IntegerGpt, ModelError> {
        let m = ModelWeights::load(dir)?;
        let seqs = calibration_tokens(dir, calib_text, m.vocab, 8, m.context.min(128))?;
        Self::from_weights(&m, &seqs)
    }

    /// Converts model weights with calibration on `calib` (token sequences).
    pub fn from_weights(m: &ModelWeights, calib: &[Vec<u32>]) -> Result<IntegerGpt, ModelError> {
        if calib.is_empty() {
            return Err(shape_err("integer conversion needs at least one calibration sequence"));
        }
        let amax = calibrate_absmax(m, calib)?;
        let get = |p: Point| amax.get(&p).copied().unwrap_or(0.0);
        let (c, hd) = (m.n_embd, m.head_dim);
        let res_max = (0..=m.blocks.len()).map(|l| get(Point::Resid(l))).fold(0.0f32, f32::max);
        let s_h = scale_for(2.0 * res_max, RES_LEVELS);
        let emb = |t: &[f32]| -> Vec<i32> {
            t.iter()
                .map(|&x| ((x as f64 / s_h).round() as i64).clamp(-(RES_CLAMP as i64), RES_CLAMP as i64) as i32)
                .collect()
        };
        let norm = |n: &crate::onnx::weights::Norm, s_out: f64| match &n.b {
            Some(b) => ILayerNorm::new(&n.w, Some(b), m.eps, s_h, s_out),
            None => ILayerNorm::new_rms(&n.w, m.eps, s_h, s_out),
        };
        let mut layers = Vec::new();
        let mut layer_scales = Vec::new();
        for (l, blk) in m.blocks.iter().enumerate() {
            let s8 = |p: Point| scale_for(get(p), 127.0);
            let (s_n1, s_q, s_k, s_v, s_o, s_n2, s_d) = (
                s8(Point::AttnIn(l)),
                s8(Point::Q(l)),
                s8(Point::K(l)),
                s8(Point::V(l)),
                s8(Point::OIn(l)),
                s8(Point::MlpIn(l)),
                s8(Point::DownIn(l)),
            );
            let s_g = (2.0 * get(Point::Hidden(l)) as f64).max(4.0) / GELU_LEVELS as f64;
            // Llama: q and k leave their linears as 16-bit codes, RoPE, then int8.
            let (q_out, k_out, rope) = if m.rope.is_some() {
                let (sq16, sk16) =
                    (scale_for(2.0 * get(Point::Q(l)), ROPE_LEVELS), scale_for(2.0 * get(Point::K(l)), ROPE_LEVELS));
                let tab = (1u64 << ROPE_BITS) as f64;
                let mults = (QuantMultiplier::from_f64(sq16 / tab / s_q), QuantMultiplier::from_f64(sk16 / tab / s_k));
                (sq16, sk16, Some(mults))
            } else {
                (s_q, s_k, None)
            };
            let mlp = match &blk.mlp {
                Mlp::Gelu { fc, proj } => {
                    let gelu = IGelu::new(s_g);
                    let pre = pre_shift(gelu.max_out(GELU_LEVELS));
                    IMlp::Gelu {
                        fc: ILinear::new(fc, s_n2, s_g),
                        mult: QuantMultiplier::from_f64(IGelu::out_scale(s_g) * (1u64 << pre) as f64 / s_d),
                        gelu,
                        pre,
                        proj: ILinear::new(proj, s_d, s_h),
                    }
                }
                Mlp::SwiGlu { gate, up, down } => {
                    let s_u = scale_for(get(Point::Up(l)), 127.0);
                    // |silu(x)·2^15 · u| ≤ 2^15 · 2^15 · 127.
                    let pre = pre_shift(GELU_LEVELS * (1 << 15) * 127);
                    IMlp::SwiGlu {
                        gate: ILinear::new(gate, s_n2, s_g),
                        up: ILinear::new(up, s_n2, s_u),
                        sigmoid: ISigmoid::new(s_g),
                        pre,
                        mult: QuantMultiplier::from_f64(s_g / 32768.0 * s_u * (1u64 << pre) as f64 / s_d),
                        down: ILinear::new(down, s_d, s_h),
                    }
                }
            };
            layers.push(ILayer {
                norm1: norm(&blk.norm1, s_n1),
                q: ILinear::new(&blk.q, s_n1, q_out),
                k: ILinear::new(&blk.k, s_n1, k_out),
                v: ILinear::new(&blk.v, s_n1, s_v),
                rope,
                score_mult: QuantMultiplier::from_f64(s_q * s_k / (hd as f64).sqrt() / SCORE_SCALE),
                att_mult: QuantMultiplier::from_f64(s_v / (1u64 << PROB_BITS) as f64 / s_o),
                o: ILinear::new(&blk.o, s_o, s_h),
                norm2: norm(&blk.norm2, s_n2),
                mlp,
            });
            layer_scales.push([s_n1, s_q, s_k, s_v, s_o, s_n2, s_g, s_d]);
        }
        let s_f = scale_for(get(Point::HeadIn), 127.0);
        let (head, sw) = quant::quantize_rows(&m.head.w, m.vocab, c);
        let tab = |t: &[f32]| -> Vec<i32> {
            t.iter().map(|&x| (x as f64 * (1u64 << ROPE_BITS) as f64).round() as i32).collect()
        };
        Ok(IntegerGpt {
            model_type: m.model_type.clone(),
            n_layer: m.blocks.len(),
            n_head: m.n_head,
            n_kv_head: m.n_kv_head,
            head_dim: hd,
            n_embd: c,
            context: m.context,
            vocab: m.vocab,
            num_params: m.num_params(),
            tok_emb: emb(&m.wte),
            pos_emb: m.wpe.as_deref().map(emb),
            rope: m.rope.as_ref().map(|(cos, sin)| (tab(cos), tab(sin))),
            layers,
            iexp: IExp::new(SCORE_SCALE, SCORE_RANGE),
            lnf: norm(&m.norm_f, s_f),
            head,
            head_scale: sw.iter().map(|&s| (s_f * s as f64) as f32).collect(),
            scales: IntegerScales { residual: s_h, layers: layer_scales, head_in: s_f },
            kv: IntKv::default(),
        })
    }

    fn kv_dim(&self) -> usize {
        self.n_kv_head * self.head_dim
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<(), ModelError> {
        if tokens.is_empty() {
            return Err(shape_err("an empty sequence"));
        }
        if tokens.len() > self.context {
            return Err(ModelError::SequenceTooLong { t: tokens.len(), context: self.context });
        }
        match tokens.iter().position(|&x| x as usize >= self.vocab) {
            Some(pos) => Err(ModelError::TokenOutOfRange { id: tokens[pos], pos, vocab: self.vocab }),
            None => Ok(()),
        }
    }

    /// The transformer blocks over `tokens` at positions `start..`, reading earlier keys and
    /// values from, and writing the new ones to, `ks[l]`/`vs[l]` (`[positions, kv_dim]` each).
    /// Returns the residual stream `[t, n_embd]`. Integer arithmetic only.
    fn blocks(&self, tokens: &[u32], start: usize, ks: &mut [&mut [i8]], vs: &mut [&mut [i8]]) -> Vec<i32> {
        let (t, c, nh, hd, kvd) = (tokens.len(), self.n_embd, self.n_head, self.head_dim, self.kv_dim());
        let (qd, group) = (nh * hd, self.n_head / self.n_kv_head);
        let mut x = vec![0i32; t * c];
        for (i, &tok) in tokens.iter().enumerate() {
            let row = &mut x[i * c..(i + 1) * c];
            row.copy_from_slice(&self.tok_emb[tok as usize * c..][..c]);
            if let Some(pe) = &self.pos_emb {
                for (xv, &pv) in row.iter_mut().zip(&pe[(start + i) * c..][..c]) {
                    *xv = (*xv + pv).clamp(-RES_CLAMP, RES_CLAMP);
                }
            }
        }
        let mut h = vec![0i8; t * c];
        for (l, ly) in self.layers.iter().enumerate() {
            for (xr, hr) in x.chunks(c).zip(h.chunks_mut(c)) {
                ly.norm1.apply(xr, hr);
            }
            let (mut q32, mut k32) = (ly.q.forward(&h), ly.k.forward(&h));
            let (q, kn): (Vec<i8>, Vec<i8>) = match (ly.rope, &self.rope) {
                (Some((mq, mk)), Some((cos, sin))) => {
                    self.rotate(&mut q32, nh, start, cos, sin, mq);
                    self.rotate(&mut k32, self.n_kv_head, start, cos, sin, mk);
                    (q32.into_iter().map(sat_i8).collect(), k32.into_iter().map(sat_i8).collect())
                }
                _ => (q32.into_iter().map(sat_i8).collect(), k32.into_iter().map(sat_i8).collect()),
            };
            let vn: Vec<i8> = ly.v.forward(&h).into_iter().map(sat_i8).collect();
            ks[l][start * kvd..(start + t) * kvd].copy_from_slice(&kn);
            vs[l][start * kvd..(start + t) * kvd].copy_from_slice(&vn);
            let (kl, vl) = (&*ks[l], &*vs[l]);
            let mut att = vec![0i8; t * qd];
            att.par_chunks_mut(hd).enumerate().for_each(|(idx, out)| {
                let (i, hh) = (idx / nh, idx % nh);
                let kh = (hh / group) * hd;
                let n = start + i + 1; // causal: keys 0..=position
                let qh = &q[i * qd + hh * hd..][..hd];
                let scores: Vec<i32> = (0..n)
                    .map(|j| multiply_by_quantized_multiplier(dot_i8(qh, &kl[j * kvd + kh..][..hd]), ly.score_mult))
                    .collect();
                let mut p = vec![0i32; n];
                softmax_row(&self.iexp, &scores, PROB_BITS, &mut p);
                for (d, o) in out.iter_mut().enumerate() {
                    let acc: i32 = (0..n).map(|j| p[j] * vl[j * kvd + kh + d] as i32).sum();
                    *o = sat_i8(multiply_by_quantized_multiplier(acc, ly.att_mult));
                }
            });
            for (xv, ov) in x.iter_mut().zip(ly.o.forward(&att)) {
                *xv = xv.saturating_add(ov).clamp(-RES_CLAMP, RES_CLAMP);
            }
            for (xr, hr) in x.chunks(c).zip(h.chunks_mut(c)) {
                ly.norm2.apply(xr, hr);
            }
            let clamp = |f: i32| (f as i64).clamp(-GELU_LEVELS, GELU_LEVELS);
            let down_out = match &ly.mlp {
                IMlp::Gelu { fc, gelu, pre, mult, proj } => {
                    let g: Vec<i8> = fc
                        .forward(&h)
                        .into_par_iter()
                        .map(|f| sat_i8(requantize_i64(gelu.apply(clamp(f)), *pre, *mult)))
                        .collect();
                    proj.forward(&g)
                }
                IMlp::SwiGlu { gate, up, sigmoid, pre, mult, down } => {
                    let u: Vec<i8> = up.forward(&h).into_iter().map(sat_i8).collect();
                    let g: Vec<i8> = gate
                        .forward(&h)
                        .into_par_iter()
                        .zip(u.into_par_iter())
                        .map(|(f, uv)| {
                            let f = clamp(f);
                            sat_i8(requantize_i64(f * sigmoid.apply(f) * uv as i64, *pre, *mult))
                        })
                        .collect();
                    down.forward(&g)
                }
            };
            for (xv, dv) in x.iter_mut().zip(down_out) {
                *xv = xv.saturating_add(dv).clamp(-RES_CLAMP, RES_CLAMP);
            }
        }
        x
    }

    /// RoPE on 16-bit codes `[t, heads·head_dim]` at positions `start..` (rotate-half pairing,
    /// i with i + d/2), by the Q14 tables, requantised with `m` (to int8 range, unsaturated).
    fn rotate(&self, x: &mut [i32], heads: usize, start: usize, cos: &[i32], sin: &[i32], m: QuantMultiplier) {
        let (hd, half) = (self.head_dim, self.head_dim / 2);
        for (i, row) in x.chunks_mut(heads * hd).enumerate() {
            let (c, s) = (&cos[(start + i) * half..][..half], &sin[(start + i) * half..][..half]);
            for v in row.chunks_mut(hd) {
                for j in 0..half {
                    let (a, b) = (v[j].clamp(-(1 << 16), 1 << 16), v[j + half].clamp(-(1 << 16), 1 << 16));
                    let ra = a * c[j] - b * s[j];
                    let rb = b * c[j] + a * s[j];
                    v[j] = multiply_by_quantized_multiplier(ra, m);
                    v[j + half] = multiply_by_quantized_multiplier(rb, m);
                }
            }
        }
    }

    /// Final LayerNorm and the head over residual rows: the int32 logits `[rows, vocab]`.
    pub fn head_i32(&self, x: &[i32]) -> Vec<i32> {
        let c = self.n_embd;
        let rows = x.len() / c;
        let mut h = vec![0i8; rows * c];
        for (xr, hr) in x.chunks(c).zip(h.chunks_mut(c)) {
            self.lnf.apply(xr, hr);
        }
        let mut y = vec![0i32; rows * self.vocab];
        y.par_chunks_mut(self.vocab).enumerate().for_each(|(r, yr)| {
            for (v, yv) in yr.iter_mut().enumerate() {
                *yv = dot_i8(&h[r * c..(r + 1) * c], &self.head[v * c..(v + 1) * c]);
            }
        });
        y
    }

    /// The int32 logits into f32 (the one float step of inference, for sampling and losses).
    fn to_f32(&self, acc: &[i32]) -> Vec<f32> {
        acc.chunks(self.vocab).flat_map(|r| r.iter().zip(&self.head_scale).map(|(&a, &s)| a as f32 * s)).collect()
    }

    /// Integer logits `[t, vocab]` of one sequence, recomputed in full (no cache).
    pub fn logits_i32(&self, tokens: &[u32]) -> Result<Vec<i32>, ModelError> {
        self.check_tokens(tokens)?;
        let t = tokens.len();
        let mut kb: Vec<Vec<i8>> = (0..self.n_layer).map(|_| vec![0; t * self.kv_dim()]).collect();
        let mut vb = kb.clone();
        let mut ks: Vec<&mut [i8]> = kb.iter_mut().map(|x| x.as_mut_slice()).collect();
        let mut vs: Vec<&mut [i8]> = vb.iter_mut().map(|x| x.as_mut_slice()).collect();
        let x = self.blocks(tokens, 0, &mut ks, &mut vs);
        Ok(self.head_i32(&x))
    }

    /// f32 logits `[t, vocab]` of one sequence.
    pub fn logits(&self, tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
        Ok(self.to_f32(&self.logits_i32(tokens)?))
    }

    /// Makes the integer KV store match `cache`'s shape (emptying it when it changes).
    fn fit_kv(&mut self, cache: &KvCache) -> Result<(), ModelError> {
        if cache.kv_dim != self.kv_dim() || cache.cap > self.context {
            return Err(shape_err(format!(
                "a KV cache of width {} × {} positions for a model of key/value width {} and context {}",
                cache.kv_dim,
                cache.cap,
                self.kv_dim(),
                self.context
            )));
        }
        if self.kv.batch != cache.batch || self.kv.cap != cache.cap {
            let n = cache.batch * cache.cap * self.kv_dim();
            self.kv = IntKv {
                batch: cache.batch,
                cap: cache.cap,
                lens: vec![0; cache.batch],
                k: (0..self.n_layer).map(|_| vec![0; n]).collect(),
                v: (0..self.n_layer).map(|_| vec![0; n]).collect(),
            };
        }
        Ok(())
    }

    /// Runs `tokens` at positions `start..` of cached sequence `seq`; returns the residual rows.
    fn run_cached(&mut self, seq: usize, tokens: &[u32], start: usize) -> Vec<i32> {
        let w = self.kv.cap * self.kv_dim();
        let span = seq * w..(seq + 1) * w;
        let mut kv = std::mem::take(&mut self.kv);
        let mut ks: Vec<&mut [i8]> = kv.k.iter_mut().map(|x| &mut x[span.clone()]).collect();
        let mut vs: Vec<&mut [i8]> = kv.v.iter_mut().map(|x| &mut x[span.clone()]).collect();
        let x = self.blocks(tokens, start, &mut ks, &mut vs);
        kv.lens[seq] = start + tokens.len();
        self.kv = kv;
        x
    }
}

/// Loads a checkpoint (GPT-2 or Llama family) as an integer-only model (see [`IntegerGpt::load`] for the
/// calibration), boxed for `kiln generate`, `kiln eval ppl` and `kiln serve`.
pub fn load_integer_only(dir: &Path, calib_text: Option<&Path>) -> Result<Box<dyn CausalLm>, ModelError> {
    Ok(Box::new(IntegerGpt::load(dir, calib_text)?))
}

impl CausalLm for IntegerGpt {
    fn model_type(&self) -> &str {
        &self.model_type
    }
    fn context_len(&self) -> usize {
        self.context
    }
    fn vocab_size(&self) -> usize {
        self.vocab
    }
    fn num_params(&self) -> usize {
        self.num_params
    }
    fn weight_bytes_per_token(&self) -> usize {
        // int8 matrices and int32 biases, the head once; one embedding row is negligible.
        let bytes = |x: &ILinear| x.w.len() + 4 * x.bias.len();
        let per_layer: usize = self
            .layers
            .iter()
            .map(|l| {
                let mlp = match &l.mlp {
                    IMlp::Gelu { fc, proj, .. } => bytes(fc) + bytes(proj),
                    IMlp::SwiGlu { gate, up, down, .. } => bytes(gate) + bytes(up) + bytes(down),
                };
                bytes(&l.q) + bytes(&l.k) + bytes(&l.v) + bytes(&l.o) + mlp
            })
            .sum();
        per_layer + self.head.len()
    }
    fn new_cache(&self, batch: usize) -> KvCache {
        KvCache::new(self.n_layer, batch, self.context, self.kv_dim())
    }
    fn prefill(
        &mut self,
        _k: &dyn Kernels,
        cache: &mut KvCache,
        seq: usize,
        prompt: &[u32],
    ) -> Result<Vec<f32>, ModelError> {
        self.check_tokens(prompt)?;
        if seq >= cache.batch {
            return Err(shape_err(format!("sequence {seq} outside a cache of {}", cache.batch)));
        }
        if prompt.len() > cache.cap {
            return Err(ModelError::SequenceTooLong { t: prompt.len(), context: cache.cap });
        }
        self.fit_kv(cache)?;
        let x = self.run_cached(seq, prompt, 0);
        cache.lens[seq] = prompt.len();
        let c = self.n_embd;
        Ok(self.to_f32(&self.head_i32(&x[(prompt.len() - 1) * c..])))
    }
    fn sequence_logits(&mut self, _k: &dyn Kernels, tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
        self.logits(tokens)
    }
    fn sequence_losses(&mut self, _k: &dyn Kernels, tokens: &[u32], targets: &[u32]) -> Result<Vec<f32>, ModelError> {
        if targets.len() != tokens.len() {
            return Err(shape_err(format!("{} targets for {} tokens", targets.len(), tokens.len())));
        }
        if let Some(pos) = targets.iter().position(|&x| x as usize >= self.vocab) {
            return Err(ModelError::TokenOutOfRange { id: targets[pos], pos, vocab: self.vocab });
        }
        let logits = self.logits(tokens)?;
        Ok(logits.chunks(self.vocab).zip(targets).map(|(row, &y)| cross_entropy(row, y as usize)).collect())
    }
    fn decode(
        &mut self,
        _k: &dyn Kernels,
        cache: &mut KvCache,
        seqs: &[usize],
        tokens: &[u32],
    ) -> Result<Vec<f32>, ModelError> {
        if tokens.len() != seqs.len() || seqs.is_empty() {
            return Err(shape_err(format!("{} tokens for {} sequences", tokens.len(), seqs.len())));
        }
        self.fit_kv(cache)?;
        for (i, (&s, &tok)) in seqs.iter().zip(tokens).enumerate() {
            if s >= cache.batch || cache.lens[s] == 0 {
                return Err(shape_err(format!("sequence {s} has no prefilled prompt")));
            }
            if seqs[..i].contains(&s) {
                return Err(shape_err(format!("sequence {s} appears twice in one decode step")));
            }
            if cache.lens[s] >= cache.cap {
                return Err(ModelError::SequenceTooLong { t: cache.lens[s] + 1, context: cache.cap });
            }
            if self.kv.lens[s] != cache.lens[s] {
                return Err(shape_err(format!(
                    "sequence {s}: this KV cache was not filled by this integer model ({} positions here, {} stored)",
                    cache.lens[s], self.kv.lens[s]
                )));
            }
            if tok as usize >= self.vocab {
                return Err(ModelError::TokenOutOfRange { id: tok, pos: cache.lens[s], vocab: self.vocab });
            }
        }
        let mut out = Vec::with_capacity(seqs.len() * self.vocab);
        for (&s, &tok) in seqs.iter().zip(tokens) {
            let x = self.run_cached(s, &[tok], cache.lens[s]);
            out.extend(self.to_f32(&self.head_i32(&x)));
            cache.lens[s] += 1;
        }
        Ok(out)
    }
}

/// −log softmax(row)[y], in f64.
fn cross_entropy(row: &[f32], y: usize) -> f32 {
    let mx = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let z: f64 = row.iter().map(|&v| (v as f64 - mx).exp()).sum();
    (z.ln() + mx - row[y] as f64) as f32
}
