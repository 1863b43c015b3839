//! ONNX export: a kiln checkpoint (GPT-2 or Llama family) as one ONNX model, input `input_ids`
//! int64 `[batch, seq]`, output `logits` f32 `[batch, seq, vocab]`, the whole forward with
//! causal attention written out in standard operators (opset 17 to 21).
//!
//! With `qdq`, the form Vitis AI, TensorRT and onnxruntime quantize from: every linear weight is
//! an int8 initializer (symmetric, one scale per output channel) behind `DequantizeLinear`,
//! and every activation entering a linear passes a `QuantizeLinear`/`DequantizeLinear` pair
//! with a static per-tensor scale, max|x|/127 over a calibration run of the f32 model.
//! Weights are transposed once at export so each `MatMul` takes `[in, out]`.

pub mod graph;
pub mod proto;
pub mod weights;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kiln_model::ModelError;
use prost::Message;

use crate::integer::quant::quantize_rows;
use graph::{attr_f, attr_i, attr_s, Graph};
use proto::{
    data_type, tensor_shape_proto, type_proto, GraphProto, ModelProto, OperatorSetIdProto, StringStringEntryProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};
use weights::{calibrate_absmax, calibration_tokens, Linear, Mlp, ModelWeights, Norm, Point};

/// Protobuf's hard limit on one message; larger models would need ONNX external data.
const PROTOBUF_LIMIT: usize = (2 << 30) - 1;

#[derive(Clone, Debug)]
pub struct OnnxOptions {
    /// Weight-quantized QDQ form instead of f32.
    pub qdq: bool,
    /// ONNX opset, 17 (LayerNormalization) to 21. From 20 GELU is the `Gelu(approximate="tanh")`
    /// operator, before it is written out in primitives.
    pub opset: i64,
    /// Text to calibrate activation scales on (tokenized with the checkpoint's tokenizer.json);
    /// without it, seeded uniform random token ids.
    pub calib_text: Option<PathBuf>,
    /// Calibration sequences and their length (capped at the model's context).
    pub calib_seqs: usize,
    pub calib_len: usize,
}

impl Default for OnnxOptions {
    fn default() -> Self {
        OnnxOptions { qdq: false, opset: 17, calib_text: None, calib_seqs: 8, calib_len: 128 }
    }
}

fn bad(msg: impl Into<String>) -> ModelError {
    ModelError::BadConfig(msg.into())
}

/// Exports the checkpoint directory `ckpt` to an ONNX file at `out` (written to a temporary
/// name, then renamed); returns the file's size in bytes.
pub fn export_onnx(ckpt: &Path, opts: &OnnxOptions, out: &Path) -> Result<usize, ModelError> {
    if !(17..=21).contains(&opts.opset) {
        return Err(bad(format!("ONNX opset {} is not supported (17 to 21 are)", opts.opset)));
    }
    let m = ModelWeights::load(ckpt)?;
    let calib = if opts.qdq {
        let len = opts.calib_len.min(m.context).max(1);
        let seqs = calibration_tokens(ckpt, opts.calib_text.as_deref(), m.vocab, opts.calib_seqs.max(1), len)?;
        Some(calibrate_absmax(&m, &seqs)?)
    } else {
        None
    };
    let model = build_model(&m, opts, calib.as_ref())?;
    let bytes = model.encode_to_vec();
    if bytes.len() > PROTOBUF_LIMIT {
        return Err(bad(format!(
            "the ONNX model would take {:.2} GB, over protobuf's 2 GB limit (external data is not supported)",
            bytes.len() as f64 / 1e9
        )));
    }
    kiln_model::write_atomic(out, &bytes)?;
    Ok(bytes.len())
}

fn value_info(name: &str, elem: i32, dims: &[Result<i64, &str>]) -> ValueInfoProto {
    use tensor_shape_proto::dimension::Value;
    let dim = dims
        .iter()
        .map(|d| tensor_shape_proto::Dimension {
            value: Some(match d {
                Ok(v) => Value::DimValue(*v),
                Err(p) => Value::DimParam(p.to_string()),
            }),
        })
        .collect();
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(elem),
                shape: Some(TensorShapeProto { dim }),
            })),
        }),
    }
}

/// IR version that goes with an opset (onnx/helper.py's table).
fn ir_version(opset: i64) -> i64 {
    match opset {
        ..=18 => 8,
        19 | 20 => 9,
        _ => 10,
    }
}

/// Builds the ONNX model; `calib` (max |x| at each [`Point`]) is required when `opts.qdq`.
pub fn build_model(
    m: &ModelWeights,
    opts: &OnnxOptions,
    calib: Option<&BTreeMap<Point, f32>>,
) -> Result<ModelProto, ModelError> {
    if opts.qdq && calib.is_none() {
        return Err(bad("QDQ export needs calibration ranges"));
    }
    let mut b = Builder { g: Graph::new(opts.opset), m, calib: if opts.qdq { calib } else { None } };
    b.forward();
    let Builder { g, .. } = b;
    let graph = GraphProto {
        node: g.nodes,
        name: Some(format!("kiln_{}", m.model_type)),
        initializer: g.inits,
        doc_string: None,
        input: vec![value_info("input_ids", data_type::INT64, &[Err("batch"), Err("seq")])],
        output: vec![value_info("logits", data_type::FLOAT, &[Err("batch"), Err("seq"), Ok(m.vocab as i64)])],
    };
    let meta = |k: &str, v: String| StringStringEntryProto { key: Some(k.into()), value: Some(v) };
    let calib_note = match (&opts.calib_text, opts.qdq) {
        (_, false) => "none (f32 model)".to_string(),
        (Some(p), true) => {
            format!("max|x| over {} windows of {} tokens of {}", opts.calib_seqs, opts.calib_len, p.display())
        }
        (None, true) => {
            format!("max|x| over {} sequences of {} uniform random token ids", opts.calib_seqs, opts.calib_len)
        }
    };
    Ok(ModelProto {
        ir_version: Some(ir_version(opts.opset)),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(opts.opset) }],
        producer_name: Some("kiln".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        doc_string: Some(format!(
            "{} decoder exported by kiln ({})",
            m.model_type,
            if opts.qdq { "QDQ: int8 weights per output channel, int8 activations per tensor" } else { "f32" }
        )),
        graph: Some(graph),
        metadata_props: vec![
            meta("model_type", m.model_type.clone()),
            meta("quantization", if opts.qdq { "qdq-w8a8".into() } else { "none".into() }),
            meta("calibration", calib_note),
        ],
    })
}

struct Builder<'a> {
    g: Graph,
    m: &'a ModelWeights,
    calib: Option<&'a BTreeMap<Point, f32>>,
}

fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; w.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = w[r * cols + c];
        }
    }
    out
}

impl Builder<'_> {
    /// In QDQ mode, `x` through QuantizeLinear → DequantizeLinear at the calibrated scale of `p`.
    fn act(&mut self, x: &str, p: Point, name: &str) -> String {
        let Some(cal) = self.calib else { return x.to_string() };
        let amax = cal.get(&p).copied().unwrap_or(0.0);
        let scale = crate::integer::quant::scale_for(amax, 127.0) as f32;
        let s = self.g.init_f32(&format!("{name}.act_scale"), &[], &[scale]);
        let zp = self.g.init_i8(&format!("{name}.act_zero_point"), &[], &[0]);
        let q = self.g.op("QuantizeLinear", &[x, &s, &zp], vec![], &format!("{name}_q"));
        self.g.op("DequantizeLinear", &[&q, &s, &zp], vec![], &format!("{name}_dq"))
    }

    /// `x · Wᵀ + b` with W stored `[in, out]` (int8 + DequantizeLinear(axis=1) in QDQ mode).
    fn linear(&mut self, x: &str, l: &Linear, name: &str) -> String {
        let w = if self.calib.is_some() {
            let (codes, scales) = quantize_rows(&l.w, l.out, l.inp);
            let codes_t: Vec<i8> = {
                let mut t = vec![0i8; codes.len()];
                for o in 0..l.out {
                    for i in 0..l.inp {
                        t[i * l.out + o] = codes[o * l.inp + i];
                    }
                }
                t
            };
            let q = self.g.init_i8(&format!("{name}.weight_int8"), &[l.inp, l.out], &codes_t);
            let s = self.g.init_f32(&format!("{name}.weight_scale"), &[l.out], &scales);
            let zp = self.g.init_i8(&format!("{name}.weight_zero_point"), &[l.out], &vec![0; l.out]);
            self.g.op("DequantizeLinear", &[&q, &s, &zp], vec![attr_i("axis", 1)], &format!("{name}_w"))
        } else {
            self.g.init_f32(&format!("{name}.weight"), &[l.inp, l.out], &transpose(&l.w, l.out, l.inp))
        };
        let y = self.g.op("MatMul", &[x, &w], vec![], name);
        match &l.b {
            Some(bias) => {
                let bn = self.g.init_f32(&format!("{name}.bias"), &[l.out], bias);
                self.g.add(&y, &bn, name)
            }
            None => y,
        }
    }

    fn norm(&mut self, x: &str, n: &Norm, name: &str) -> String {
        let w = self.g.init_f32(&format!("{name}.weight"), &[n.w.len()], &n.w);
        match &n.b {
            Some(bias) => {
                let b = self.g.init_f32(&format!("{name}.bias"), &[bias.len()], bias);
                self.g.op(
                    "LayerNormalization",
                    &[x, &w, &b],
                    vec![attr_i("axis", -1), attr_f("epsilon", self.m.eps)],
                    name,
                )
            }
            None => {
                // RMSNorm as transformers computes it: x · rsqrt(mean(x²) + eps) · w.
                let x2 = self.g.mul(x, x, name);
                let ms = self.g.reduce_mean_last(&x2, name);
                let eps = self.g.scalar_f32(self.m.eps);
                let var = self.g.add(&ms, &eps, name);
                let sd = self.g.op("Sqrt", &[&var], vec![], name);
                let r = self.g.op("Reciprocal", &[&sd], vec![], name);
                let xn = self.g.mul(x, &r, name);
                self.g.mul(&xn, &w, name)
            }
        }
    }

    fn gelu_tanh(&mut self, x: &str, name: &str) -> String {
        if self.g.opset >= 20 {
            return self.g.op("Gelu", &[x], vec![attr_s("approximate", "tanh")], name);
        }
        // 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), GPT-2's gelu_new.
        let (c1, k) = (self.g.scalar_f32(0.044715), self.g.scalar_f32((2.0f32 / std::f32::consts::PI).sqrt()));
        let (half, one) = (self.g.scalar_f32(0.5), self.g.scalar_f32(1.0));
        let x2 = self.g.mul(x, x, name);
        let x3 = self.g.mul(&x2, x, name);
        let cx3 = self.g.mul(&x3, &c1, name);
        let inner = self.g.add(x, &cx3, name);
        let arg = self.g.mul(&inner, &k, name);
        let t = self.g.op("Tanh", &[&arg], vec![], name);
        let t1 = self.g.add(&t, &one, name);
        let hx = self.g.mul(x, &half, name);
        self.g.mul(&hx, &t1, name)
    }

    /// `[B, T, heads·hd]` → `[B, heads, T, hd]`.
    fn heads(&mut self, x: &str, heads: usize, name: &str) -> String {
        let r = self.g.reshape(x, &[0, 0, heads as i64, self.m.head_dim as i64], name);
        self.g.transpose(&r, &[0, 2, 1, 3], name)
    }

    /// RoPE, rotate-half pairing (i with i + hd/2): x·cos + rotate_half(x)·sin.
    fn rope(&mut self, x: &str, cos: &str, sin: &str, name: &str) -> String {
        let hd = self.m.head_dim as i64;
        let lo = self.g.slice(x, 0, hd / 2, -1, name);
        let hi = self.g.slice(x, hd / 2, hd, -1, name);
        let neg = self.g.op("Neg", &[&hi], vec![], name);
        let rot = self.g.op("Concat", &[&neg, &lo], vec![attr_i("axis", -1)], name);
        let a = self.g.mul(x, cos, name);
        let b = self.g.mul(&rot, sin, name);
        self.g.add(&a, &b, name)
    }

    /// Key/value heads `[B, nkv, T, hd]` repeated to `[B, nh, T, hd]`, each kv head serving
    /// `group` consecutive query heads (transformers' repeat_kv).
    fn repeat_kv(&mut self, x: &str, name: &str) -> String {
        let group = self.m.n_head / self.m.n_kv_head;
        if group == 1 {
            return x.to_string();
        }
        let u = self.g.unsqueeze(x, &[2], name);
        let copies: Vec<&str> = vec![u.as_str(); group];
        let cat = self.g.op("Concat", &copies, vec![attr_i("axis", 2)], name);
        self.g.reshape(&cat, &[0, self.m.n_head as i64, -1, self.m.head_dim as i64], name)
    }

    fn forward(&mut self) {
        let m = self.m;
        let (c, hd) = (m.n_embd, m.head_dim);
        // Sequence length as a scalar and as a 1-D tensor, for positions, masks and tables.
        let shape = self.g.op("Shape", &["input_ids"], vec![], "shape");
        let one_idx = self.g.ints(&[1], true);
        let t_scalar = self.g.op("Gather", &[&shape, &one_idx], vec![attr_i("axis", 0)], "seq_len");
        let t_1d = self.g.unsqueeze(&t_scalar, &[0], "seq_len_1d");
        let (zero, one) = (self.g.ints(&[0], true), self.g.ints(&[1], true));
        let pos = self.g.op("Range", &[&zero, &t_scalar, &one], vec![], "positions");
        // Causal mask [T, T]: −inf above the diagonal.
        let rows = self.g.unsqueeze(&pos, &[1], "mask_rows");
        let cols = self.g.unsqueeze(&pos, &[0], "mask_cols");
        let future = self.g.op("Greater", &[&cols, &rows], vec![], "mask_future");
        let (ninf, fzero) = (self.g.scalar_f32(f32::NEG_INFINITY), self.g.scalar_f32(0.0));
        let mask = self.g.op("Where", &[&future, &ninf, &fzero], vec![], "causal_mask");

        let wte = self.g.init_f32("embed.weight", &[m.vocab, c], &m.wte);
        let mut x = self.g.op("Gather", &[&wte, "input_ids"], vec![attr_i("axis", 0)], "tok_emb");
        if let Some(wpe) = &m.wpe {
            let wpe = self.g.init_f32("pos_embed.weight", &[m.context, c], wpe);
            let pe = self.g.op("Gather", &[&wpe, &pos], vec![attr_i("axis", 0)], "pos_emb");
            x = self.g.add(&x, &pe, "embed");
        }
        let rope = m.rope.as_ref().map(|(cos, sin)| {
            // Tables widened to the whole head (each half's angle repeated), then cut to T rows.
            let widen = |t: &[f32]| -> Vec<f32> {
                t.chunks(hd / 2).flat_map(|r| r.iter().chain(r.iter()).copied().collect::<Vec<f32>>()).collect()
            };
            let cn = self.g.init_f32("rope.cos", &[m.context, hd], &widen(cos));
            let sn = self.g.init_f32("rope.sin", &[m.context, hd], &widen(sin));
            (self.g.slice_to(&cn, &t_1d, 0, "rope_cos"), self.g.slice_to(&sn, &t_1d, 0, "rope_sin"))
        });
        let scale = self.g.scalar_f32(1.0 / (hd as f32).sqrt());

        for (l, blk) in m.blocks.iter().enumerate() {
            let p = format!("layers.{l}");
            let h = self.norm(&x, &blk.norm1, &format!("{p}.norm1"));
            let h = self.act(&h, Point::AttnIn(l), &format!("{p}.attn_in"));
            let q = self.linear(&h, &blk.q, &format!("{p}.q"));
            let k = self.linear(&h, &blk.k, &format!("{p}.k"));
            let v = self.linear(&h, &blk.v, &format!("{p}.v"));
            let mut q = self.heads(&q, m.n_head, &format!("{p}_qh"));
            let mut k = self.heads(&k, m.n_kv_head, &format!("{p}_kh"));
            let v = self.heads(&v, m.n_kv_head, &format!("{p}_vh"));
            if let Some((cos, sin)) = &rope {
                q = self.rope(&q, cos, sin, &format!("{p}_qrope"));
                k = self.rope(&k, cos, sin, &format!("{p}_krope"));
            }
            let k = self.repeat_kv(&k, &format!("{p}_krep"));
            let v = self.repeat_kv(&v, &format!("{p}_vrep"));
            let kt = self.g.transpose(&k, &[0, 1, 3, 2], &format!("{p}_kt"));
            let s = self.g.op("MatMul", &[&q, &kt], vec![], &format!("{p}_scores"));
            let s = self.g.mul(&s, &scale, &format!("{p}_scaled"));
            let s = self.g.add(&s, &mask, &format!("{p}_masked"));
            let pr = self.g.op("Softmax", &[&s], vec![attr_i("axis", -1)], &format!("{p}_probs"));
            let y = self.g.op("MatMul", &[&pr, &v], vec![], &format!("{p}_att"));
            let y = self.g.transpose(&y, &[0, 2, 1, 3], &format!("{p}_att_t"));
            let y = self.g.reshape(&y, &[0, 0, m.q_dim() as i64], &format!("{p}_att_flat"));
            let y = self.act(&y, Point::OIn(l), &format!("{p}.o_in"));
            let o = self.linear(&y, &blk.o, &format!("{p}.o"));
            x = self.g.add(&x, &o, &format!("{p}_res1"));
            let h = self.norm(&x, &blk.norm2, &format!("{p}.norm2"));
            let h = self.act(&h, Point::MlpIn(l), &format!("{p}.mlp_in"));
            let (mid, down) = match &blk.mlp {
                Mlp::Gelu { fc, proj } => {
                    let f = self.linear(&h, fc, &format!("{p}.fc"));
                    (self.gelu_tanh(&f, &format!("{p}_gelu")), proj)
                }
                Mlp::SwiGlu { gate, up, down } => {
                    let g = self.linear(&h, gate, &format!("{p}.gate"));
                    let u = self.linear(&h, up, &format!("{p}.up"));
                    let sg = self.g.op("Sigmoid", &[&g], vec![], &format!("{p}_sig"));
                    let silu = self.g.mul(&g, &sg, &format!("{p}_silu"));
                    (self.g.mul(&silu, &u, &format!("{p}_swiglu")), down)
                }
            };
            let mid = self.act(&mid, Point::DownIn(l), &format!("{p}.down_in"));
            let d = self.linear(&mid, down, &format!("{p}.down"));
            x = self.g.add(&x, &d, &format!("{p}_res2"));
        }
        let h = self.norm(&x, &m.norm_f, "norm_f");
        let h = self.act(&h, Point::HeadIn, "head_in");
        let logits = self.linear(&h, &m.head, "lm_head");
        // The graph's output gets its public name through an Identity.
        self.g.nodes.push(proto::NodeProto {
            input: vec![logits],
            output: vec!["logits".into()],
            name: Some("output".into()),
            op_type: Some("Identity".into()),
            ..Default::default()
        });
    }
}
