//! Lowering: the ops of a prefill and of one decode step, with their shapes.

use serde::Serialize;

use crate::error::{HwError, Result};
use crate::shape::{FfnKind, ModelShape, NormKind};
use crate::systolic::Gemm;

/// The transcendental a vector op needs besides plain arithmetic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Special {
    None,
    Exp,
    Rsqrt,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum OpKind {
    /// `count` independent GEMMs of one shape (one per head for attention).
    Gemm {
        gemm: Gemm,
        count: u64,
        /// B is a weight matrix (otherwise the K / V cache or a just-made activation).
        b_is_weight: bool,
        /// B comes from the KV cache in DRAM (decode attention).
        b_from_kv_cache: bool,
    },
    /// Elementwise / row-wise work on the vector unit.
    Vector {
        elems: u64,
        ops_per_elem: f64,
        special: Special,
        /// How many of the elements need the special function (rows for rsqrt).
        special_count: u64,
    },
    /// Pure data movement to or from DRAM.
    Memory { read_bytes: f64, write_bytes: f64 },
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Op {
    /// "embed", "block 3", "head".
    pub layer: String,
    pub name: String,
    pub kind: OpKind,
}

/// What is run: a prefill of `prompt_len` tokens per sequence, then `gen` decode steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Workload {
    pub batch: u64,
    pub prompt_len: u64,
    pub gen: u64,
    /// Compute logits for every prompt position in prefill (kiln's CPU forward does; a server
    /// needs only the last).
    pub logits_all_positions: bool,
}

impl Workload {
    pub fn validate(&self, s: &ModelShape) -> Result<()> {
        if self.batch == 0 || self.prompt_len == 0 {
            return Err(HwError::Shape("batch and prompt length must be at least 1".into()));
        }
        if self.prompt_len.saturating_add(self.gen) > s.context {
            return Err(HwError::Shape(format!(
                "prompt {} + generated {} exceeds the model's context of {}",
                self.prompt_len, self.gen, s.context
            )));
        }
        // Keep every element count far inside u64 (no overflow on absurd requests).
        let biggest = self.batch as f64 * s.heads as f64 * ((self.prompt_len + self.gen) as f64).powi(2);
        let width = s.ffn_hidden.max(s.vocab).max(3 * s.d_model) as f64;
        let widest = self.batch as f64 * (self.prompt_len as f64) * width;
        if biggest > 1e15 || widest > 1e15 {
            return Err(HwError::Shape(format!(
                "batch {} x prompt {} x generate {} is too large to model",
                self.batch, self.prompt_len, self.gen
            )));
        }
        Ok(())
    }

    /// KV length at which the decode step is costed: half-way through the generation.
    pub fn decode_kv_len(&self) -> u64 {
        self.prompt_len + self.gen / 2
    }
}

/// Which phase: prefill of `tokens` per sequence, or one decode step against `kv_len` cached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Prefill { tokens: u64 },
    Decode { kv_len: u64 },
}

fn gemm(layer: &str, name: &str, m: u64, n: u64, k: u64, count: u64, weight: bool, kv: bool) -> Op {
    Op {
        layer: layer.into(),
        name: name.into(),
        kind: OpKind::Gemm { gemm: Gemm { m, n, k }, count, b_is_weight: weight, b_from_kv_cache: kv },
    }
}

fn vector(layer: &str, name: &str, elems: u64, ops: f64, special: Special, special_count: u64) -> Op {
    Op {
        layer: layer.into(),
        name: name.into(),
        kind: OpKind::Vector { elems, ops_per_elem: ops, special, special_count },
    }
}

/// Every op of one phase, in execution order. `wb` / `ab` are bytes per weight / activation.
pub fn lower(s: &ModelShape, batch: u64, phase: Phase, logits_all: bool, wb: f64, ab: f64) -> Vec<Op> {
    let (c, f, hd, kvd) = (s.d_model, s.ffn_hidden, s.head_dim(), s.kv_dim());
    let (h, kvh) = (s.heads, s.kv_heads);
    let (q_len, kv_len) = match phase {
        Phase::Prefill { tokens } => (tokens, tokens),
        Phase::Decode { kv_len } => (1, kv_len + 1),
    };
    let decode = matches!(phase, Phase::Decode { .. });
    let t = batch * q_len; // rows through every projection
    let mut ops = Vec::new();
    let emb_read = t as f64 * c as f64 * wb * if s.learned_positions { 2.0 } else { 1.0 };
    ops.push(Op {
        layer: "embed".into(),
        name: "token + position lookup".into(),
        kind: OpKind::Memory { read_bytes: emb_read, write_bytes: 0.0 },
    });
    let (norm_ops, norm_name) = match s.norm {
        NormKind::LayerNorm => (7.0, "layernorm"),
        NormKind::RmsNorm => (4.0, "rmsnorm"),
    };
    for l in 0..s.layers {
        let ly = format!("block {l}");
        ops.push(vector(&ly, &format!("{norm_name} 1"), t * c, norm_ops, Special::Rsqrt, t));
        ops.push(gemm(&ly, "qkv projection", t, c + 2 * kvd, c, 1, true, false));
        if !s.learned_positions {
            ops.push(vector(&ly, "rope", t * (c + kvd), 4.0, Special::None, 0));
        }
        ops.push(Op {
            layer: ly.clone(),
            name: "kv-cache write".into(),
            kind: OpKind::Memory { read_bytes: 0.0, write_bytes: (t * 2 * kvd) as f64 * ab },
        });
        if decode {
            // GQA: the query heads of a group share one K / V head, so they form the GEMM's rows.
            let g = h / kvh;
            ops.push(gemm(&ly, "attention scores q·k", g, kv_len, hd, batch * kvh, false, true));
            ops.push(vector(&ly, "softmax", batch * h * kv_len, 4.0, Special::Exp, batch * h * kv_len));
            ops.push(gemm(&ly, "attention values p·v", g, hd, kv_len, batch * kvh, false, true));
        } else {
            ops.push(gemm(&ly, "attention scores q·k", q_len, kv_len, hd, batch * h, false, false));
            let e = batch * h * q_len * kv_len;
            ops.push(vector(&ly, "softmax", e, 4.0, Special::Exp, e));
            ops.push(gemm(&ly, "attention values p·v", q_len, hd, kv_len, batch * h, false, false));
        }
        ops.push(gemm(&ly, "attention output", t, c, c, 1, true, false));
        ops.push(vector(&ly, "residual add 1", t * c, 1.0, Special::None, 0));
        ops.push(vector(&ly, &format!("{norm_name} 2"), t * c, norm_ops, Special::Rsqrt, t));
        match s.ffn {
            FfnKind::Gelu => {
                ops.push(gemm(&ly, "mlp up", t, f, c, 1, true, false));
                ops.push(vector(&ly, "gelu", t * f, 6.0, Special::Exp, t * f));
            }
            FfnKind::Swiglu => {
                ops.push(gemm(&ly, "mlp gate+up", t, 2 * f, c, 1, true, false));
                ops.push(vector(&ly, "swiglu", t * f, 3.0, Special::Exp, t * f));
            }
        }
        ops.push(gemm(&ly, "mlp down", t, c, f, 1, true, false));
        ops.push(vector(&ly, "residual add 2", t * c, 1.0, Special::None, 0));
    }
    let head_rows = if decode || !logits_all { batch } else { t };
    ops.push(vector("head", &format!("final {norm_name}"), head_rows * c, norm_ops, Special::Rsqrt, head_rows));
    ops.push(gemm("head", "output head (logits)", head_rows, s.vocab, c, 1, true, false));
    ops
}

#[cfg(test)]
mod tests {
    use super::*;

    fn macs(ops: &[Op]) -> u64 {
        ops.iter()
            .map(|o| match &o.kind {
                OpKind::Gemm { gemm: g, count, .. } => g.m * g.n * g.k * count,
                _ => 0,
            })
            .sum()
    }

    #[test]
    fn decode_macs_are_the_weights_plus_attention() {
        let s = ModelShape::preset("gpt-s").unwrap();
        let kv = 100;
        let ops = lower(&s, 1, Phase::Decode { kv_len: kv }, false, 1.0, 1.0);
        let (c, l) = (s.d_model, s.layers);
        // One MAC per weight of every GEMM (12·C² per block, V·C for the head) plus 2·C·(kv+1) for attention.
        let want = l * 12 * c * c + s.vocab * c + l * 2 * c * (kv + 1);
        assert_eq!(macs(&ops), want);
        // GQA: llama-s decode groups 3 query heads per KV head into one GEMM of 3 rows.
        let ll = lower(&ModelShape::llama_s(), 2, Phase::Decode { kv_len: 9 }, false, 1.0, 1.0);
        let qk = ll.iter().find(|o| o.name == "attention scores q·k").unwrap();
        assert!(matches!(qk.kind, OpKind::Gemm { gemm: Gemm { m: 3, n: 10, k: 64 }, count: 4, .. }));
    }

    #[test]
    fn prefill_head_rows() {
        let s = ModelShape::preset("gpt-tiny").unwrap();
        let last = lower(&s, 2, Phase::Prefill { tokens: 8 }, false, 1.0, 1.0);
        let all = lower(&s, 2, Phase::Prefill { tokens: 8 }, true, 1.0, 1.0);
        let head = |o: &[Op]| match &o.last().unwrap().kind {
            OpKind::Gemm { gemm, .. } => gemm.m,
            _ => 0,
        };
        assert_eq!((head(&last), head(&all)), (2, 16));
    }

    #[test]
    fn absurd_workloads_are_refused() {
        let s = ModelShape { context: 1 << 30, ..ModelShape::preset("gpt-s").unwrap() };
        let w = Workload { batch: 1 << 20, prompt_len: 1 << 20, gen: 0, logits_all_positions: false };
        assert!(w.validate(&s).unwrap_err().to_string().contains("too large"));
        let w = Workload { batch: 1, prompt_len: 8, gen: u64::MAX, logits_all_positions: false };
        assert!(w.validate(&s).is_err());
    }
}
