//! GGUF export (version 3), the file llama.cpp runs: GPT-2 and Llama-family models in f32,
//! f16, Q8_0 or Q4_0, with the model's byte-level BPE vocabulary.
//!
//! Layout: magic, version, counts, key/value metadata, tensor infos (name, dims innermost
//! first, type, offset), padding to 32 bytes, then each tensor's data 32-byte aligned.

use std::path::Path;

use half::f16;
use serde_json::Value;

use crate::checkpoint::write_atomic;
use crate::{Gpt, Llama, ModelError};

/// Block size of the Q8_0 and Q4_0 formats: one f16 scale per 32 weights.
pub const QK: usize = 32;
const ALIGN: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q8_0,
}

impl GgmlType {
    pub fn parse(s: &str) -> Option<GgmlType> {
        match s {
            "f32" => Some(GgmlType::F32),
            "f16" => Some(GgmlType::F16),
            "q4_0" => Some(GgmlType::Q4_0),
            "q8_0" => Some(GgmlType::Q8_0),
            _ => None,
        }
    }
    fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q8_0 => 8,
        }
    }
    /// `general.file_type` (llama_ftype) of a file whose matrices are mostly this type.
    fn file_type(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q8_0 => 7,
        }
    }
}

/// A metadata value.
pub enum Meta {
    U32(u32),
    F32(f32),
    Str(String),
    StrArray(Vec<String>),
    I32Array(Vec<i32>),
}

/// Q8_0: per block of 32, d = max|x|/127 and q = round(x/d), as llama.cpp's reference quantizer.
pub fn quantize_q8_0(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / QK * 34);
    for block in x.chunks(QK) {
        let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend(block.iter().map(|&v| (v * id).round() as i8 as u8));
    }
    out
}

/// Q4_0: per block of 32, d = (the signed value of largest magnitude)/−8, q = clamp(x/d + 8.5)
/// as unsigned nibbles, element j with j + 16 in one byte, as llama.cpp's reference quantizer.
pub fn quantize_q4_0(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / QK * 18);
    for block in x.chunks(QK) {
        let max = block.iter().fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        for j in 0..QK / 2 {
            let q = |v: f32| ((v * id + 8.5) as i8).clamp(0, 15) as u8;
            out.push(q(block[j]) | (q(block[j + QK / 2]) << 4));
        }
    }
    out
}

/// The inverse of [`quantize_q8_0`] / [`quantize_q4_0`] (what llama.cpp computes with).
pub fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    match ty {
        GgmlType::F32 => out.extend(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
        GgmlType::F16 => out.extend(bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())),
        GgmlType::Q8_0 => {
            for blk in bytes.chunks_exact(34) {
                let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                out.extend(blk[2..].iter().map(|&q| q as i8 as f32 * d));
            }
        }
        GgmlType::Q4_0 => {
            for blk in bytes.chunks_exact(18) {
                let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                let qs = &blk[2..];
                out.extend(qs.iter().map(|&q| ((q & 15) as i32 - 8) as f32 * d));
                out.extend(qs.iter().map(|&q| ((q >> 4) as i32 - 8) as f32 * d));
            }
        }
    }
    out.truncate(n);
    out
}

struct Tensor {
    name: String,
    /// Dimensions innermost first (GGUF's `ne`): `[in, out]` for a `[out, in]` matrix.
    ne: Vec<usize>,
    ty: GgmlType,
    data: Vec<u8>,
}

/// Encodes `values` (row-major, `shape` outermost first) as `want` where the rows allow it:
/// quantized types need rows that are whole blocks; 1-D tensors (norms, biases) stay f32.
fn tensor(name: &str, shape: &[usize], values: &[f32], want: GgmlType) -> Tensor {
    let ne: Vec<usize> = shape.iter().rev().copied().collect();
    let ty = match want {
        _ if shape.len() < 2 => GgmlType::F32,
        GgmlType::Q4_0 | GgmlType::Q8_0 if !ne[0].is_multiple_of(QK) => GgmlType::F16,
        t => t,
    };
    let data = match ty {
        GgmlType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => values.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect(),
        GgmlType::Q8_0 => quantize_q8_0(values),
        GgmlType::Q4_0 => quantize_q4_0(values),
    };
    Tensor { name: name.to_string(), ne, ty, data }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_meta(out: &mut Vec<u8>, key: &str, v: &Meta) {
    put_str(out, key);
    match v {
        Meta::U32(x) => {
            out.extend_from_slice(&4u32.to_le_bytes());
            out.extend_from_slice(&x.to_le_bytes());
        }
        Meta::F32(x) => {
            out.extend_from_slice(&6u32.to_le_bytes());
            out.extend_from_slice(&x.to_le_bytes());
        }
        Meta::Str(s) => {
            out.extend_from_slice(&8u32.to_le_bytes());
            put_str(out, s);
        }
        Meta::StrArray(a) => {
            out.extend_from_slice(&9u32.to_le_bytes());
            out.extend_from_slice(&8u32.to_le_bytes());
            out.extend_from_slice(&(a.len() as u64).to_le_bytes());
            a.iter().for_each(|s| put_str(out, s));
        }
        Meta::I32Array(a) => {
            out.extend_from_slice(&9u32.to_le_bytes());
            out.extend_from_slice(&5u32.to_le_bytes());
            out.extend_from_slice(&(a.len() as u64).to_le_bytes());
            a.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
        }
    }
}

fn gguf_bytes(meta: &[(String, Meta)], tensors: &[Tensor]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(b"GGUF");
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        put_meta(&mut out, k, v);
    }
    let mut offset = 0usize;
    for t in tensors {
        put_str(&mut out, &t.name);
        out.extend_from_slice(&(t.ne.len() as u32).to_le_bytes());
        t.ne.iter().for_each(|&d| out.extend_from_slice(&(d as u64).to_le_bytes()));
        out.extend_from_slice(&t.ty.id().to_le_bytes());
        out.extend_from_slice(&(offset as u64).to_le_bytes());
        offset += t.data.len().next_multiple_of(ALIGN);
    }
    out.resize(out.len().next_multiple_of(ALIGN), 0);
    for t in tensors {
        out.extend_from_slice(&t.data);
        out.resize(out.len().next_multiple_of(ALIGN), 0);
    }
    out
}

/// The vocabulary metadata llama.cpp needs, from a byte-level BPE tokenizer.json (GPT-2's
/// scheme: kiln's own tokenizers, Qwen2, SmolLM, Llama 3). `vocab_size` rows are written;
/// ids the tokenizer lacks become unused padding tokens.
pub fn tokenizer_meta(tokenizer_json: &str, vocab_size: usize, pre: &str) -> Result<Vec<(String, Meta)>, ModelError> {
    let bad = |m: &str| ModelError::BadConfig(format!("tokenizer.json: {m}"));
    let v: Value = serde_json::from_str(tokenizer_json).map_err(|e| bad(&format!("invalid JSON: {e}")))?;
    let model = v.get("model").ok_or_else(|| bad("no model"))?;
    if model.get("type").and_then(Value::as_str) != Some("BPE") {
        return Err(bad("only byte-level BPE vocabularies can be exported to GGUF"));
    }
    let byte_level = serde_json::to_string(v.get("pre_tokenizer").unwrap_or(&Value::Null))
        .map(|s| s.contains("ByteLevel"))
        .unwrap_or(false);
    if !byte_level {
        return Err(bad("the pre-tokenizer is not byte-level (SentencePiece vocabularies are not supported)"));
    }
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    let mut types = vec![1i32; vocab_size];
    for (tok, id) in model.get("vocab").and_then(Value::as_object).ok_or_else(|| bad("no vocab"))? {
        if let Some(slot) = id.as_u64().and_then(|i| tokens.get_mut(i as usize)) {
            *slot = Some(tok.clone());
        }
    }
    for t in v.get("added_tokens").and_then(Value::as_array).into_iter().flatten() {
        let (Some(id), Some(content)) = (t.get("id").and_then(Value::as_u64), t.get("content").and_then(Value::as_str))
        else {
            continue;
        };
        if let Some(slot) = tokens.get_mut(id as usize) {
            *slot = Some(content.to_string());
            types[id as usize] = if t.get("special").and_then(Value::as_bool).unwrap_or(false) { 3 } else { 4 };
        }
    }
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            t.unwrap_or_else(|| {
                types[i] = 5;
                format!("[PAD{i}]")
            })
        })
        .collect();
    let merges: Vec<String> = model
        .get("merges")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("no merges"))?
        .iter()
        .filter_map(|m| match m {
            Value::String(s) => Some(s.clone()),
            Value::Array(p) => Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?)),
            _ => None,
        })
        .collect();
    Ok(vec![
        ("tokenizer.ggml.model".into(), Meta::Str("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Meta::Str(pre.into())),
        ("tokenizer.ggml.tokens".into(), Meta::StrArray(tokens)),
        ("tokenizer.ggml.token_type".into(), Meta::I32Array(types)),
        ("tokenizer.ggml.merges".into(), Meta::StrArray(merges)),
    ])
}

fn header(arch: &str, name: &str, ty: GgmlType) -> Vec<(String, Meta)> {
    vec![
        ("general.architecture".into(), Meta::Str(arch.into())),
        ("general.name".into(), Meta::Str(name.into())),
        ("general.file_type".into(), Meta::U32(ty.file_type())),
        ("general.quantization_version".into(), Meta::U32(2)),
    ]
}

/// A GPT-2 model as llama.cpp's `gpt2` architecture (the tied head written out as `output`).
pub fn gpt2_gguf(model: &Gpt, ty: GgmlType, tokenizer: Vec<(String, Meta)>, eos: Option<u32>) -> Vec<u8> {
    let cfg = &model.config;
    let mut meta = header("gpt2", "kiln gpt2", ty);
    let u = |x: usize| Meta::U32(x as u32);
    meta.extend([
        ("gpt2.context_length".into(), u(cfg.block_size)),
        ("gpt2.embedding_length".into(), u(cfg.n_embd)),
        ("gpt2.feed_forward_length".into(), u(4 * cfg.n_embd)),
        ("gpt2.block_count".into(), u(cfg.n_layer)),
        ("gpt2.attention.head_count".into(), u(cfg.n_head)),
        ("gpt2.attention.layer_norm_epsilon".into(), Meta::F32(1e-5)),
    ]);
    meta.extend(tokenizer);
    if let Some(e) = eos {
        meta.push(("tokenizer.ggml.eos_token_id".into(), Meta::U32(e)));
        meta.push(("tokenizer.ggml.bos_token_id".into(), Meta::U32(e)));
    }
    let mut tensors = Vec::new();
    for (i, info) in model.param_info().iter().enumerate() {
        let name = gpt2_name(&info.name);
        tensors.push(tensor(&name, &info.shape, model.param_values(i), ty));
        if info.name == "wte.weight" {
            tensors.push(tensor("output.weight", &info.shape, model.param_values(i), ty));
        }
    }
    gguf_bytes(&meta, &tensors)
}

fn gpt2_name(name: &str) -> String {
    let map = [
        ("ln_1.", "attn_norm."),
        ("attn.c_attn.", "attn_qkv."),
        ("attn.c_proj.", "attn_output."),
        ("ln_2.", "ffn_norm."),
        ("mlp.c_fc.", "ffn_up."),
        ("mlp.c_proj.", "ffn_down."),
    ];
    match name {
        "wte.weight" => "token_embd.weight".into(),
        "wpe.weight" => "position_embd.weight".into(),
        n if n.starts_with("ln_f.") => n.replacen("ln_f.", "output_norm.", 1),
        n => {
            let rest = n.strip_prefix("h.").unwrap_or(n);
            let (layer, tail) = rest.split_once('.').unwrap_or((rest, ""));
            let tail =
                map.iter().find(|(a, _)| tail.starts_with(a)).map_or(tail.to_string(), |(a, b)| tail.replacen(a, b, 1));
            format!("blk.{layer}.{tail}")
        }
    }
}

/// HF's rotate-half RoPE pairs element i with i + d/2; llama.cpp's `llama` architecture pairs
/// neighbours, so q and k rows are reordered per head (as convert_hf_to_gguf.py does).
fn permute_rows(w: &[f32], heads: usize, row_len: usize) -> Vec<f32> {
    let rows = w.len() / row_len;
    let hd = rows / heads;
    let mut out = vec![0.0; w.len()];
    for h in 0..heads {
        for half in 0..2 {
            for i in 0..hd / 2 {
                let src = h * hd + half * hd / 2 + i;
                let dst = h * hd + 2 * i + half;
                out[dst * row_len..(dst + 1) * row_len].copy_from_slice(&w[src * row_len..(src + 1) * row_len]);
            }
        }
    }
    out
}

/// A Llama-family model as llama.cpp's `llama` or `qwen2` architecture.
pub fn llama_gguf(model: &Llama, ty: GgmlType, tokenizer: Vec<(String, Meta)>, eos: Option<u32>) -> Vec<u8> {
    let cfg = &model.config;
    let arch = if cfg.model_type == "qwen2" { "qwen2" } else { "llama" };
    let mut meta = header(arch, &format!("kiln {}", cfg.model_type), ty);
    let u = |x: usize| Meta::U32(x as u32);
    let k = |s: &str| format!("{arch}.{s}");
    meta.extend([
        (k("context_length"), u(cfg.block_size)),
        (k("embedding_length"), u(cfg.n_embd)),
        (k("feed_forward_length"), u(cfg.ffn_hidden)),
        (k("block_count"), u(cfg.n_layer)),
        (k("attention.head_count"), u(cfg.n_head)),
        (k("attention.head_count_kv"), u(cfg.n_kv_head)),
        (k("attention.key_length"), u(cfg.head_dim)),
        (k("attention.value_length"), u(cfg.head_dim)),
        (k("rope.dimension_count"), u(cfg.head_dim)),
        (k("rope.freq_base"), Meta::F32(cfg.rope_theta as f32)),
        (k("attention.layer_norm_rms_epsilon"), Meta::F32(cfg.rms_eps)),
        (k("vocab_size"), u(cfg.vocab_size)),
    ]);
    if cfg.rope_linear_factor != 1.0 {
        meta.push((k("rope.scaling.type"), Meta::Str("linear".into())));
        meta.push((k("rope.scaling.factor"), Meta::F32(cfg.rope_linear_factor as f32)));
    }
    meta.extend(tokenizer);
    if let Some(e) = eos {
        meta.push(("tokenizer.ggml.eos_token_id".into(), Meta::U32(e)));
    }
    let mut tensors = Vec::new();
    for (info, values) in model.param_info().iter().zip(&model.params) {
        let name = llama_name(&info.name);
        let row = if info.shape.len() == 2 { info.shape[1] } else { 1 };
        let values = match (arch, &name) {
            ("llama", n) if n.contains("attn_q.") => permute_rows(values, cfg.n_head, row),
            ("llama", n) if n.contains("attn_k.") => permute_rows(values, cfg.n_kv_head, row),
            _ => values.clone(),
        };
        tensors.push(tensor(&name, &info.shape, &values, ty));
    }
    gguf_bytes(&meta, &tensors)
}

fn llama_name(name: &str) -> String {
    let map = [
        ("input_layernorm.", "attn_norm."),
        ("self_attn.q_proj.", "attn_q."),
        ("self_attn.k_proj.", "attn_k."),
        ("self_attn.v_proj.", "attn_v."),
        ("self_attn.o_proj.", "attn_output."),
        ("post_attention_layernorm.", "ffn_norm."),
        ("mlp.gate_proj.", "ffn_gate."),
        ("mlp.up_proj.", "ffn_up."),
        ("mlp.down_proj.", "ffn_down."),
    ];
    match name {
        "model.embed_tokens.weight" => "token_embd.weight".into(),
        "model.norm.weight" => "output_norm.weight".into(),
        "lm_head.weight" => "output.weight".into(),
        n => {
            let rest = n.strip_prefix("model.layers.").unwrap_or(n);
            let (layer, tail) = rest.split_once('.').unwrap_or((rest, ""));
            let tail =
                map.iter().find(|(a, _)| tail.starts_with(a)).map_or(tail.to_string(), |(a, b)| tail.replacen(a, b, 1));
            format!("blk.{layer}.{tail}")
        }
    }
}

/// Exports the checkpoint directory `dir` (model + tokenizer.json) to a GGUF file at `out`.
pub fn export_gguf(dir: &Path, ty: GgmlType, out: &Path) -> Result<usize, ModelError> {
    let dir = crate::resolve_model_dir(dir);
    let tok_path = dir.join("tokenizer.json");
    let tok = std::fs::read_to_string(&tok_path).map_err(|e| ModelError::Checkpoint {
        path: tok_path.display().to_string(),
        msg: format!("GGUF needs the vocabulary: {e}"),
    })?;
    let eos = crate::read_eos_token_ids(&dir).first().copied();
    let bytes = match crate::read_model_type(&dir)?.as_str() {
        "gpt2" => {
            let m = crate::load_hf_dir(&dir)?;
            gpt2_gguf(&m, ty, tokenizer_meta(&tok, m.config.vocab_size, "gpt-2")?, eos)
        }
        "llama" | "qwen2" | "mistral" => {
            let m = crate::load_llama_dir(&dir)?;
            let pre = if m.config.model_type == "qwen2" { "qwen2" } else { "gpt-2" };
            llama_gguf(&m, ty, tokenizer_meta(&tok, m.config.vocab_size, pre)?, eos)
        }
        other => return Err(ModelError::BadConfig(format!("model_type '{other}' cannot be exported to GGUF"))),
    };
    write_atomic(out, &bytes)?;
    Ok(bytes.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_and_q4_0_round_trip_within_their_step() {
        let x: Vec<f32> = (0..96).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
        // Q8_0 rounds to the nearest of ±127 steps: half a step. Q4_0's levels run from −8 to +7
        // steps of the largest magnitude's sign, so the far end is clamped by up to a whole step.
        for (ty, bytes, levels, bound) in
            [(GgmlType::Q8_0, quantize_q8_0(&x), 127.0, 0.5), (GgmlType::Q4_0, quantize_q4_0(&x), 8.0, 1.0)]
        {
            assert_eq!(bytes.len(), 3 * if ty == GgmlType::Q8_0 { 34 } else { 18 });
            let y = dequantize(ty, &bytes, x.len());
            for (b, (xs, ys)) in x.chunks(QK).zip(y.chunks(QK)).enumerate() {
                let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let step = amax / levels;
                for (a, c) in xs.iter().zip(ys) {
                    // Plus the f16 rounding of the scale.
                    assert!((a - c).abs() <= bound * step * 1.01 + 1e-3 * a.abs(), "{ty:?} block {b}: {a} vs {c}");
                }
            }
        }
        // The largest-magnitude value of a Q4_0 block is exact (it defines the scale as −8·d).
        let y = dequantize(GgmlType::Q4_0, &quantize_q4_0(&x[..32]), 32);
        let i = (0..32).fold(0, |m, j| if x[j].abs() > x[m].abs() { j } else { m });
        assert!((y[i] - x[i]).abs() < 1e-2 * x[i].abs());
    }

    #[test]
    fn rope_permutation_pairs_neighbours() {
        // One head of 4 rows: HF order [a0, a1, b0, b1] (pairs (a0,b0), (a1,b1)) → [a0, b0, a1, b1].
        let w: Vec<f32> = vec![0.0, 1.0, 2.0, 3.0];
        assert_eq!(permute_rows(&w, 1, 1), vec![0.0, 2.0, 1.0, 3.0]);
    }

    #[test]
    fn names_follow_llama_cpp() {
        assert_eq!(gpt2_name("h.3.attn.c_attn.weight"), "blk.3.attn_qkv.weight");
        assert_eq!(gpt2_name("ln_f.bias"), "output_norm.bias");
        assert_eq!(llama_name("model.layers.1.mlp.gate_proj.weight"), "blk.1.ffn_gate.weight");
        assert_eq!(llama_name("model.layers.0.self_attn.q_proj.bias"), "blk.0.attn_q.bias");
    }
}
