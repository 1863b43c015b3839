//! Model shapes: the named presets and custom sizes.

use serde::{Deserialize, Serialize};

use crate::ModelError;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GptConfig {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    /// Context length: the number of learned positions.
    pub block_size: usize,
    /// Tokens the tokenizer can produce (the unpadded vocabulary).
    pub vocab_size: usize,
}

/// (name, n_layer, n_embd, n_head, context, default vocabulary), as in DESIGN.md.
pub const PRESETS: &[(&str, usize, usize, usize, usize, usize)] =
    &[("gpt-tiny", 2, 64, 4, 64, 512), ("gpt-s", 6, 384, 6, 256, 8192), ("gpt2-124m", 12, 768, 12, 1024, 50257)];

impl GptConfig {
    /// A preset's shape; `vocab_size` replaces the preset's default when given (from the tokenizer).
    pub fn preset(name: &str, vocab_size: Option<usize>) -> Result<GptConfig, ModelError> {
        let &(_, n_layer, n_embd, n_head, block_size, vocab) =
            PRESETS.iter().find(|p| p.0 == name).ok_or_else(|| ModelError::UnknownPreset(name.to_string()))?;
        let cfg = GptConfig { n_layer, n_head, n_embd, block_size, vocab_size: vocab_size.unwrap_or(vocab) };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::BadConfig(m));
        if self.n_layer == 0 || self.n_head == 0 || self.n_embd == 0 || self.block_size == 0 || self.vocab_size == 0 {
            return bad(format!("every dimension must be positive: {self:?}"));
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return bad(format!("n_embd {} is not divisible by n_head {}", self.n_embd, self.n_head));
        }
        if self.n_embd / self.n_head > 256 {
            return bad(format!("head size {} exceeds 256", self.n_embd / self.n_head));
        }
        Ok(())
    }

    /// The vocabulary rounded up to a multiple of 64: the output GEMM runs on whole tiles and
    /// the padded logits are masked out of the softmax.
    pub fn padded_vocab(&self) -> usize {
        self.vocab_size.div_ceil(64) * 64
    }

    pub fn head_size(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// Parameters as a user counts them (unpadded vocabulary, tied head counted once).
    pub fn num_params(&self) -> usize {
        let c = self.n_embd;
        self.vocab_size * c + self.block_size * c + self.n_layer * (12 * c * c + 13 * c) + 2 * c
    }

    /// Training FLOPs per token, the nanoGPT / PaLM convention the peers report: 6 per
    /// parameter (position embeddings excluded) plus 12·L·T·C for attention (counted dense).
    pub fn train_flops_per_token(&self, t: usize) -> f64 {
        let n = (self.num_params() - self.block_size * self.n_embd) as f64;
        6.0 * n + 12.0 * (self.n_layer * t * self.n_embd) as f64
    }

    /// The output head's matmul work in blocks' worth (a block's linears are 12·C² per
    /// token, the head V·C), for balancing pipeline stages.
    pub fn head_cost_in_blocks(&self) -> f64 {
        self.padded_vocab() as f64 / (12.0 * self.n_embd as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_and_padding() {
        let g = GptConfig::preset("gpt2-124m", None).unwrap();
        assert_eq!(g.padded_vocab(), 50304);
        // GPT-2 small: 124,439,808 parameters with the tied head counted once.
        assert_eq!(g.num_params(), 124_439_808);
        assert!(GptConfig::preset("gpt-huge", None).is_err());
        let bad = GptConfig { n_layer: 1, n_head: 5, n_embd: 64, block_size: 8, vocab_size: 10 };
        assert!(bad.validate().is_err());
    }
}
