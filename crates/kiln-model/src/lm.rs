//! What every generating architecture offers: a KV cache, prefill and cached decode. The
//! sampler, `kiln generate` and the server drive any model through [`CausalLm`].

use kiln_tensor::Kernels;

use crate::ModelError;

/// Keys and values of every layer for `batch` sequences of up to `cap` positions, each
/// position `kv_dim` wide (all key/value heads side by side).
pub struct KvCache {
    pub batch: usize,
    pub cap: usize,
    pub kv_dim: usize,
    /// Positions cached per sequence.
    pub lens: Vec<usize>,
    /// Per layer, `[batch, cap, kv_dim]`.
    pub(crate) k: Vec<Vec<f32>>,
    pub(crate) v: Vec<Vec<f32>>,
}

impl KvCache {
    pub fn new(layers: usize, batch: usize, cap: usize, kv_dim: usize) -> KvCache {
        KvCache {
            batch,
            cap,
            kv_dim,
            lens: vec![0; batch],
            k: (0..layers).map(|_| vec![0.0; batch * cap * kv_dim]).collect(),
            v: (0..layers).map(|_| vec![0.0; batch * cap * kv_dim]).collect(),
        }
    }

    /// Bytes one cached position takes over all layers (keys and values).
    pub fn bytes_per_position(&self) -> usize {
        2 * 4 * self.k.len() * self.kv_dim
    }

    /// Bytes the cache holds.
    pub fn bytes(&self) -> usize {
        4 * self.k.iter().chain(&self.v).map(|x| x.len()).sum::<usize>()
    }

    /// Writes position `pos` of sequence `seq` in `layer`.
    pub(crate) fn store(&mut self, layer: usize, seq: usize, pos: usize, key: &[f32], value: &[f32]) {
        let d = self.kv_dim;
        let at = (seq * self.cap + pos) * d;
        self.k[layer][at..at + d].copy_from_slice(key);
        self.v[layer][at..at + d].copy_from_slice(value);
    }

    /// Sequence `seq`'s keys and values in `layer`, `[cap, kv_dim]` each.
    pub(crate) fn seq(&self, layer: usize, seq: usize) -> (&[f32], &[f32]) {
        let span = seq * self.cap * self.kv_dim..(seq + 1) * self.cap * self.kv_dim;
        (&self.k[layer][span.clone()], &self.v[layer][span])
    }

    /// Checks that this cache was made for a model of `layers` layers and key/value width `kv_dim`.
    pub(crate) fn check_model(&self, layers: usize, kv_dim: usize) -> Result<(), ModelError> {
        if self.k.len() != layers || self.kv_dim != kv_dim {
            return Err(ModelError::Shape(format!(
                "a KV cache of {} layers × width {} for a model of {layers} layers × width {kv_dim}",
                self.k.len(),
                self.kv_dim
            )));
        }
        Ok(())
    }

    /// Checks that a prompt of `t` tokens may be prefilled into sequence `seq`.
    pub(crate) fn check_prefill(&self, seq: usize, t: usize) -> Result<(), ModelError> {
        if seq >= self.batch {
            return Err(ModelError::Shape(format!("sequence {seq} outside a cache of {}", self.batch)));
        }
        if t > self.cap {
            return Err(ModelError::SequenceTooLong { t, context: self.cap });
        }
        Ok(())
    }

    /// Checks that `seqs` may each take one more token.
    pub(crate) fn check_decode(&self, seqs: &[usize], tokens: &[u32], vocab: usize) -> Result<(), ModelError> {
        if tokens.len() != seqs.len() || seqs.is_empty() {
            return Err(ModelError::Shape(format!("{} tokens for {} sequences", tokens.len(), seqs.len())));
        }
        for (i, (&s, &tok)) in seqs.iter().zip(tokens).enumerate() {
            if s >= self.batch || self.lens[s] == 0 {
                return Err(ModelError::Shape(format!("sequence {s} has no prefilled prompt")));
            }
            if seqs[..i].contains(&s) {
                return Err(ModelError::Shape(format!("sequence {s} appears twice in one decode step")));
            }
            if self.lens[s] >= self.cap {
                return Err(ModelError::SequenceTooLong { t: self.lens[s] + 1, context: self.cap });
            }
            if tok as usize >= vocab {
                return Err(ModelError::TokenOutOfRange { id: tok, pos: self.lens[s], vocab });
            }
        }
        Ok(())
    }
}

/// A decoder-only language model that generates with a KV cache.
pub trait CausalLm: Send {
    /// The architecture, as config.json's `model_type` names it (`gpt2`, `llama`, `qwen2`).
    fn model_type(&self) -> &str;
    /// The longest sequence the model attends over.
    fn context_len(&self) -> usize;
    /// Tokens the model can read and predict (unpadded).
    fn vocab_size(&self) -> usize;
    /// Parameters as a user counts them.
    fn num_params(&self) -> usize;
    /// Bytes of weights one decode step reads (each weight once).
    fn weight_bytes_per_token(&self) -> usize;
    /// An empty cache for `batch` sequences of up to [`CausalLm::context_len`] positions.
    fn new_cache(&self, batch: usize) -> KvCache;
    /// Runs `prompt` as sequence `seq` of the cache (replacing what it held) and returns the
    /// logits `[vocab]` for the next token.
    fn prefill(
        &mut self,
        k: &dyn Kernels,
        cache: &mut KvCache,
        seq: usize,
        prompt: &[u32],
    ) -> Result<Vec<f32>, ModelError>;
    /// Logits `[t, vocab]` at every position of one sequence (no cache involved).
    fn sequence_logits(&mut self, k: &dyn Kernels, tokens: &[u32]) -> Result<Vec<f32>, ModelError>;
    /// Cross-entropy `[t]` of `targets[i]` after `tokens[..=i]`, for each position of one sequence.
    fn sequence_losses(&mut self, k: &dyn Kernels, tokens: &[u32], targets: &[u32]) -> Result<Vec<f32>, ModelError>;
    /// Appends `tokens[i]` to sequence `seqs[i]` and returns the next-token logits
    /// `[seqs.len(), vocab]`. Each sequence must have room (`lens < cap`).
    fn decode(
        &mut self,
        k: &dyn Kernels,
        cache: &mut KvCache,
        seqs: &[usize],
        tokens: &[u32],
    ) -> Result<Vec<f32>, ModelError>;
}

/// A model of a named preset (GPT-2 or Llama family) with random weights, seeded.
pub fn preset_model(name: &str, vocab_size: Option<usize>, seed: u64) -> Result<Box<dyn CausalLm>, ModelError> {
    if crate::LLAMA_PRESETS.iter().any(|p| p.name == name) {
        Ok(Box::new(crate::Llama::new(crate::LlamaConfig::preset(name, vocab_size)?, seed)?))
    } else {
        Ok(Box::new(crate::Gpt::new(crate::GptConfig::preset(name, vocab_size)?, seed)?))
    }
}
