//! The Llama family's shape (Llama, TinyLlama, SmolLM, Qwen2, Mistral without a sliding
//! window): read from and written to Hugging Face `config.json`.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::ModelError;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// `llama`, `qwen2` or `mistral`: decides the names and defaults config.json uses.
    pub model_type: String,
    pub n_layer: usize,
    pub n_head: usize,
    /// Key/value heads (grouped-query attention when fewer than `n_head`).
    pub n_kv_head: usize,
    pub n_embd: usize,
    pub head_dim: usize,
    /// SwiGLU hidden width (`intermediate_size`).
    pub ffn_hidden: usize,
    /// Positions the model was trained for (`max_position_embeddings`).
    pub block_size: usize,
    pub vocab_size: usize,
    pub rope_theta: f64,
    /// Linear RoPE scaling: positions divided by this factor (1 = none).
    pub rope_linear_factor: f64,
    pub rms_eps: f32,
    pub tie_embeddings: bool,
    /// Biases on the q, k and v projections (Qwen2; Llama's `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama's `attention_bias`).
    pub o_bias: bool,
    /// Biases on gate, up and down (Llama's `mlp_bias`).
    pub mlp_bias: bool,
}

/// A named Llama shape (DESIGN.md's `llama-s`, and a tiny one for tests).
pub struct LlamaPreset {
    pub name: &'static str,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub ffn_hidden: usize,
    pub context: usize,
    pub vocab: usize,
}

pub const LLAMA_PRESETS: &[LlamaPreset] = &[
    LlamaPreset {
        name: "llama-tiny",
        n_layer: 2,
        n_embd: 64,
        n_head: 4,
        n_kv_head: 2,
        ffn_hidden: 176,
        context: 64,
        vocab: 512,
    },
    LlamaPreset {
        name: "llama-s",
        n_layer: 6,
        n_embd: 384,
        n_head: 6,
        n_kv_head: 2,
        ffn_hidden: 1024,
        context: 256,
        vocab: 8192,
    },
];

fn bad(msg: impl Into<String>) -> ModelError {
    ModelError::BadConfig(msg.into())
}

impl LlamaConfig {
    pub fn preset(name: &str, vocab_size: Option<usize>) -> Result<LlamaConfig, ModelError> {
        let p =
            LLAMA_PRESETS.iter().find(|p| p.name == name).ok_or_else(|| ModelError::UnknownPreset(name.to_string()))?;
        let (n_layer, n_embd, n_head, n_kv_head, ffn_hidden, block_size, vocab) =
            (p.n_layer, p.n_embd, p.n_head, p.n_kv_head, p.ffn_hidden, p.context, p.vocab);
        let cfg = LlamaConfig {
            model_type: "llama".into(),
            n_layer,
            n_head,
            n_kv_head,
            n_embd,
            head_dim: n_embd / n_head,
            ffn_hidden,
            block_size,
            vocab_size: vocab_size.unwrap_or(vocab),
            rope_theta: 10000.0,
            rope_linear_factor: 1.0,
            rms_eps: 1e-5,
            tie_embeddings: false,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        let dims = [self.n_layer, self.n_head, self.n_kv_head, self.n_embd, self.head_dim, self.ffn_hidden];
        if dims.contains(&0) || self.block_size == 0 || self.vocab_size == 0 {
            return Err(bad(format!("every dimension must be positive: {self:?}")));
        }
        if !self.n_head.is_multiple_of(self.n_kv_head) {
            return Err(bad(format!(
                "{} query heads are not a multiple of {} key/value heads",
                self.n_head, self.n_kv_head
            )));
        }
        if !self.head_dim.is_multiple_of(2) || self.head_dim > 256 {
            return Err(bad(format!("head_dim {} must be even and at most 256", self.head_dim)));
        }
        if !(self.rope_theta > 0.0 && self.rope_linear_factor > 0.0 && self.rms_eps >= 0.0) {
            return Err(bad("rope_theta and the RoPE scaling factor must be positive"));
        }
        Ok(())
    }

    /// Width of the queries (all heads), and of the keys or values.
    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.n_kv_head * self.head_dim
    }

    /// Parameters as a user counts them (a tied head counted once).
    pub fn num_params(&self) -> usize {
        let (c, q, kv, f) = (self.n_embd, self.q_dim(), self.kv_dim(), self.ffn_hidden);
        let mut per_layer = 2 * c + c * q + 2 * c * kv + q * c + 3 * c * f;
        if self.qkv_bias {
            per_layer += q + 2 * kv;
        }
        if self.o_bias {
            per_layer += c;
        }
        if self.mlp_bias {
            per_layer += 2 * f + c;
        }
        let head = if self.tie_embeddings { 0 } else { self.vocab_size * c };
        self.vocab_size * c + head + self.n_layer * per_layer + c
    }

    /// Reads a Hugging Face config.json value (`model_type` llama, qwen2 or mistral).
    pub fn from_hf_json(v: &Value) -> Result<LlamaConfig, ModelError> {
        let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("llama").to_string();
        if !matches!(model_type.as_str(), "llama" | "qwen2" | "mistral") {
            return Err(bad(format!("model_type '{model_type}' is not a Llama-family model")));
        }
        let num = |k: &str| v.get(k).and_then(Value::as_u64).map(|x| x as usize);
        let req = |k: &str| num(k).ok_or_else(|| bad(format!("config.json lacks {k}")));
        if let Some(act) = v.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                return Err(bad(format!("hidden_act '{act}' is not supported (only silu, SwiGLU)")));
            }
        }
        let sliding = v.get("sliding_window").and_then(Value::as_u64);
        let uses_sliding = v.get("use_sliding_window").and_then(Value::as_bool).unwrap_or(model_type == "mistral");
        let n_head = req("num_attention_heads")?;
        let n_embd = req("hidden_size")?;
        let block_size = req("max_position_embeddings")?;
        if let (true, Some(w)) = (uses_sliding, sliding) {
            if (w as usize) < block_size {
                return Err(bad(format!("sliding-window attention ({w} of {block_size} positions) is not supported")));
            }
        }
        // transformers 5 nests RoPE settings in rope_parameters; 4.x has rope_theta and rope_scaling.
        let rope = v.get("rope_parameters").or_else(|| v.get("rope_scaling")).filter(|r| r.is_object());
        let rope_theta = rope
            .and_then(|r| r.get("rope_theta"))
            .or_else(|| v.get("rope_theta"))
            .and_then(Value::as_f64)
            .unwrap_or(10000.0);
        let mut rope_linear_factor = 1.0;
        if let Some(r) = rope {
            let kind = r.get("rope_type").or_else(|| r.get("type")).and_then(Value::as_str).unwrap_or("default");
            match kind {
                "default" => {}
                "linear" => rope_linear_factor = r.get("factor").and_then(Value::as_f64).unwrap_or(1.0),
                other => return Err(bad(format!("RoPE scaling '{other}' is not supported (default and linear are)"))),
            }
        }
        let attention_bias = v.get("attention_bias").and_then(Value::as_bool).unwrap_or(false);
        let cfg = LlamaConfig {
            n_layer: req("num_hidden_layers")?,
            n_head,
            n_kv_head: num("num_key_value_heads").unwrap_or(n_head),
            n_embd,
            head_dim: num("head_dim").unwrap_or(n_embd / n_head.max(1)),
            ffn_hidden: req("intermediate_size")?,
            block_size,
            vocab_size: req("vocab_size")?,
            rope_theta,
            rope_linear_factor,
            rms_eps: v.get("rms_norm_eps").and_then(Value::as_f64).unwrap_or(1e-6) as f32,
            tie_embeddings: v.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(model_type == "qwen2"),
            qkv_bias: model_type == "qwen2" || attention_bias,
            o_bias: model_type != "qwen2" && attention_bias,
            mlp_bias: v.get("mlp_bias").and_then(Value::as_bool).unwrap_or(false),
            model_type,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The config.json `transformers` reads back into the same model.
    pub fn to_hf_json(&self, eos: Option<u32>, bos: Option<u32>) -> Value {
        let arch = match self.model_type.as_str() {
            "qwen2" => "Qwen2ForCausalLM",
            "mistral" => "MistralForCausalLM",
            _ => "LlamaForCausalLM",
        };
        let rope_type = if self.rope_linear_factor != 1.0 { "linear" } else { "default" };
        let mut rope = json!({"rope_theta": self.rope_theta, "rope_type": rope_type});
        if self.rope_linear_factor != 1.0 {
            rope["factor"] = json!(self.rope_linear_factor);
        }
        let mut v = json!({
            "architectures": [arch],
            "model_type": self.model_type,
            "hidden_size": self.n_embd,
            "intermediate_size": self.ffn_hidden,
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.n_head,
            "num_key_value_heads": self.n_kv_head,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.block_size,
            "vocab_size": self.vocab_size,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope.clone(),
            "tie_word_embeddings": self.tie_embeddings,
            "mlp_bias": self.mlp_bias,
            "initializer_range": 0.02,
            "attention_dropout": 0.0,
            "use_cache": true,
            "torch_dtype": "float32",
        });
        if self.rope_linear_factor != 1.0 {
            v["rope_scaling"] = rope;
        }
        if self.model_type != "qwen2" {
            v["attention_bias"] = json!(self.qkv_bias);
        }
        if let Some(e) = eos {
            v["eos_token_id"] = json!(e);
        }
        if let Some(b) = bos {
            v["bos_token_id"] = json!(b);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_json_round_trip_and_rejections() {
        let mut c = LlamaConfig::preset("llama-s", None).unwrap();
        assert_eq!((c.q_dim(), c.kv_dim()), (384, 128));
        c.rope_linear_factor = 2.0;
        let back = LlamaConfig::from_hf_json(&c.to_hf_json(Some(2), None)).unwrap();
        assert_eq!(back, c);
        let mut v = c.to_hf_json(None, None);
        v["rope_parameters"] = json!({"rope_type": "yarn", "factor": 4.0});
        assert!(LlamaConfig::from_hf_json(&v).unwrap_err().to_string().contains("yarn"));
        let mut v = c.to_hf_json(None, None);
        v["num_key_value_heads"] = json!(4);
        assert!(LlamaConfig::from_hf_json(&v).is_err(), "6 heads over 4 kv heads");
        // A 4.x-style config: rope_theta at the top, rope_scaling with "type".
        let v = json!({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
            "num_attention_heads": 4, "max_position_embeddings": 32, "vocab_size": 50, "rope_theta": 500000.0,
            "rope_scaling": {"type": "linear", "factor": 8.0}});
        let c = LlamaConfig::from_hf_json(&v).unwrap();
        assert_eq!((c.n_kv_head, c.rope_theta, c.rope_linear_factor, c.tie_embeddings), (4, 500000.0, 8.0, false));
    }
}
