//! The shape of a decoder-only model: all the mapper needs, independent of how kiln-model
//! stores the weights (so Llama shapes map before kiln-model runs them).

use serde::{Deserialize, Serialize};

use crate::error::{HwError, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FfnKind {
    /// GPT-2: up (C→F), GELU, down (F→C).
    Gelu,
    /// Llama: gate and up (C→F each), SiLU(gate)·up, down (F→C).
    Swiglu,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NormKind {
    LayerNorm,
    RmsNorm,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelShape {
    pub name: String,
    pub layers: u64,
    pub d_model: u64,
    pub heads: u64,
    /// Key / value heads (fewer than `heads` under grouped-query attention).
    pub kv_heads: u64,
    pub ffn_hidden: u64,
    pub ffn: FfnKind,
    pub norm: NormKind,
    pub vocab: u64,
    pub context: u64,
    /// Learned position embeddings (GPT-2) rather than rotary (Llama).
    pub learned_positions: bool,
    /// The output head shares the token embedding (stored once).
    pub tied_head: bool,
}

impl ModelShape {
    /// GPT-2 shapes from kiln-model's config: 4·C GELU MLP, LayerNorm, tied head.
    pub fn from_gpt(name: &str, c: &kiln_model::GptConfig) -> ModelShape {
        let d = c.n_embd as u64;
        ModelShape {
            name: name.to_string(),
            layers: c.n_layer as u64,
            d_model: d,
            heads: c.n_head as u64,
            kv_heads: c.n_head as u64,
            ffn_hidden: 4 * d,
            ffn: FfnKind::Gelu,
            norm: NormKind::LayerNorm,
            vocab: c.vocab_size as u64,
            context: c.block_size as u64,
            learned_positions: true,
            tied_head: true,
        }
    }

    /// The Llama preset of DESIGN.md (6×384, 6 heads / 2 KV heads, SwiGLU 1024, context 256).
    pub fn llama_s() -> ModelShape {
        ModelShape {
            name: "llama-s".into(),
            layers: 6,
            d_model: 384,
            heads: 6,
            kv_heads: 2,
            ffn_hidden: 1024,
            ffn: FfnKind::Swiglu,
            norm: NormKind::RmsNorm,
            vocab: 8192,
            context: 256,
            learned_positions: false,
            tied_head: false,
        }
    }

    /// kiln-model's GPT presets, plus the Llama presets of DESIGN.md (kept here so that they
    /// map whether or not kiln-model runs them yet).
    pub fn preset(name: &str) -> Result<ModelShape> {
        match name {
            "llama-s" => return Ok(ModelShape::llama_s()),
            "llama-tiny" => {
                let s = ModelShape::llama_s();
                return Ok(ModelShape {
                    name: name.into(),
                    layers: 2,
                    d_model: 64,
                    heads: 4,
                    kv_heads: 2,
                    ffn_hidden: 176,
                    vocab: 512,
                    context: 64,
                    ..s
                });
            }
            _ => {}
        }
        let c = kiln_model::GptConfig::preset(name, None).map_err(|_| {
            let names: Vec<&str> = kiln_model::PRESETS.iter().map(|p| p.0).collect();
            HwError::Shape(format!("unknown preset '{name}' (presets: {}, llama-tiny, llama-s)", names.join(", ")))
        })?;
        Ok(ModelShape::from_gpt(name, &c))
    }

    /// The shape in a checkpoint's Hugging Face config.json: GPT-2 through kiln-model's reader,
    /// Llama (`model_type` "llama") read here so it maps before kiln-model runs it.
    pub fn from_hf_config(path: &std::path::Path, name: &str) -> Result<ModelShape> {
        let text = std::fs::read_to_string(path).map_err(|e| HwError::Io { path: path.to_path_buf(), source: e })?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| HwError::Shape(format!("{}: invalid JSON: {e}", path.display())))?;
        if v.get("model_type").and_then(|m| m.as_str()) != Some("llama") {
            let c = kiln_model::read_hf_config(path).map_err(|e| HwError::Shape(e.to_string()))?;
            return Ok(ModelShape::from_gpt(name, &c));
        }
        let get = |k: &str| -> Result<u64> {
            v.get(k).and_then(|x| x.as_u64()).ok_or_else(|| HwError::Shape(format!("{}: missing {k}", path.display())))
        };
        let heads = get("num_attention_heads")?;
        let s = ModelShape {
            name: name.to_string(),
            layers: get("num_hidden_layers")?,
            d_model: get("hidden_size")?,
            heads,
            kv_heads: v.get("num_key_value_heads").and_then(|x| x.as_u64()).unwrap_or(heads),
            ffn_hidden: get("intermediate_size")?,
            ffn: FfnKind::Swiglu,
            norm: NormKind::RmsNorm,
            vocab: get("vocab_size")?,
            context: get("max_position_embeddings")?,
            learned_positions: false,
            tied_head: v.get("tie_word_embeddings").and_then(|x| x.as_bool()).unwrap_or(false),
        };
        s.validate()?;
        Ok(s)
    }

    pub fn head_dim(&self) -> u64 {
        self.d_model / self.heads
    }

    pub fn kv_dim(&self) -> u64 {
        self.kv_heads * self.head_dim()
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(HwError::Shape(m));
        if [self.layers, self.d_model, self.heads, self.kv_heads, self.ffn_hidden, self.vocab, self.context]
            .contains(&0)
        {
            return bad(format!("every dimension must be positive: {self:?}"));
        }
        let caps = [
            ("layers", self.layers, 1 << 12),
            ("d_model", self.d_model, 1 << 18),
            ("heads", self.heads, 1 << 12),
            ("ffn_hidden", self.ffn_hidden, 1 << 20),
            ("vocab", self.vocab, 1 << 24),
            ("context", self.context, 1 << 30),
        ];
        for (n, v, cap) in caps {
            if v > cap {
                return bad(format!("{n} {v} is larger than kiln models ({cap})"));
            }
        }
        if !self.d_model.is_multiple_of(self.heads) {
            return bad(format!("d_model {} is not divisible by heads {}", self.d_model, self.heads));
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return bad(format!("heads {} is not a multiple of kv_heads {}", self.heads, self.kv_heads));
        }
        Ok(())
    }

    /// Weight elements of one block (norm gains and biases included).
    pub fn block_params(&self) -> u64 {
        let (c, f, kv) = (self.d_model, self.ffn_hidden, self.kv_dim());
        let attn = c * (c + 2 * kv) + c * c;
        let mlp = match self.ffn {
            FfnKind::Gelu => 2 * c * f,
            FfnKind::Swiglu => 3 * c * f,
        };
        let small = match self.norm {
            NormKind::LayerNorm => 4 * c + (c + 2 * kv) + c + f + c, // two LN (gain, bias) and the biases
            NormKind::RmsNorm => 2 * c,
        };
        attn + mlp + small
    }

    /// Every weight element the model stores.
    pub fn params(&self) -> u64 {
        let emb = self.vocab * self.d_model;
        let pos = if self.learned_positions { self.context * self.d_model } else { 0 };
        let head = if self.tied_head { 0 } else { self.vocab * self.d_model };
        emb + pos + head + self.layers * self.block_params() + 2 * self.d_model
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_small_counts_match_kiln_model() {
        let s = ModelShape::preset("gpt2-124m").unwrap();
        let c = kiln_model::GptConfig::preset("gpt2-124m", None).unwrap();
        assert_eq!(s.params(), c.num_params() as u64);
        let l = ModelShape::preset("llama-s").unwrap();
        assert_eq!((l.kv_dim(), l.head_dim()), (128, 64));
        l.validate().unwrap();
        assert!(ModelShape::preset("gpt-huge").unwrap_err().to_string().contains("llama-s"));
        let bad = ModelShape { kv_heads: 4, ..ModelShape::llama_s() };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn reads_llama_and_gpt2_configs() {
        let dir = std::env::temp_dir().join(format!("kiln-hw-shape-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("config.json");
        std::fs::write(
            &p,
            r#"{"model_type":"llama","num_hidden_layers":6,"hidden_size":384,"num_attention_heads":6,
               "num_key_value_heads":2,"intermediate_size":1024,"vocab_size":8192,"max_position_embeddings":256}"#,
        )
        .unwrap();
        let s = ModelShape::from_hf_config(&p, "llama-s").unwrap();
        assert_eq!(s, ModelShape::llama_s());
        std::fs::write(
            &p,
            r#"{"model_type":"gpt2","n_layer":2,"n_head":4,"n_embd":64,"n_positions":64,"vocab_size":512}"#,
        )
        .unwrap();
        assert_eq!(ModelShape::from_hf_config(&p, "gpt-tiny").unwrap(), ModelShape::preset("gpt-tiny").unwrap());
        std::fs::write(&p, "{").unwrap();
        assert!(ModelShape::from_hf_config(&p, "x").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
