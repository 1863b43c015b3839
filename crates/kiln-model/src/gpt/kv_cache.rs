//! Generation with a key/value cache: a prompt is run once (prefill) and its keys and values
//! kept per layer, so each new token costs one row through the model instead of the whole
//! sequence again.

use kiln_tensor::Kernels;

use super::{Gpt, FCPROJ_W, FC_W, LN1_W, LN2_W, PER_LAYER, PROJ_W, QKV_W, WPE, WTE};
use crate::{CausalLm, KvCache, ModelError};

impl CausalLm for Gpt {
    fn model_type(&self) -> &str {
        "gpt2"
    }
    fn context_len(&self) -> usize {
        self.config.block_size
    }
    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }
    fn num_params(&self) -> usize {
        self.config.num_params()
    }
    fn weight_bytes_per_token(&self) -> usize {
        // Every weight but the position table (one row of it is read), the tied head once; a
        // quantized matrix counts its codes and scales.
        let c = self.config.n_embd;
        let float: usize = (0..self.params.len())
            .filter(|&i| self.lin.get(i).is_none())
            .map(|i| if i == WPE { c } else { self.param_info()[i].shape.iter().product() })
            .sum();
        4 * float + self.lin.weight_bytes()
    }
    fn new_cache(&self, batch: usize) -> KvCache {
        Gpt::new_cache(self, batch)
    }
    fn sequence_logits(&mut self, k: &dyn Kernels, tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
        self.forward(k, tokens, None, 1, tokens.len())?;
        let (v, vp) = (self.config.vocab_size, self.config.padded_vocab());
        Ok(self.logits().expect("forward ran").chunks(vp).flat_map(|r| r[..v].to_vec()).collect())
    }
    fn sequence_losses(&mut self, k: &dyn Kernels, tokens: &[u32], targets: &[u32]) -> Result<Vec<f32>, ModelError> {
        self.forward(k, tokens, Some(targets), 1, tokens.len())?;
        Ok(self.losses().expect("forward with targets keeps the losses").to_vec())
    }
    fn prefill(
        &mut self,
        k: &dyn Kernels,
        cache: &mut KvCache,
        seq: usize,
        prompt: &[u32],
    ) -> Result<Vec<f32>, ModelError> {
        Gpt::prefill(self, k, cache, seq, prompt)
    }
    fn decode(
        &mut self,
        k: &dyn Kernels,
        cache: &mut KvCache,
        seqs: &[usize],
        tokens: &[u32],
    ) -> Result<Vec<f32>, ModelError> {
        Gpt::decode(self, k, cache, seqs, tokens)
    }
}

impl Gpt {
    /// An empty cache for `batch` sequences, as long as the model's context.
    pub fn new_cache(&self, batch: usize) -> KvCache {
        KvCache::new(self.config.n_layer, batch, self.config.block_size, self.config.n_embd)
    }

    /// Runs `prompt` as sequence `seq` of the cache (replacing what it held) and returns the
    /// logits `[vocab]` for the next token.
    pub fn prefill(
        &mut self,
        k: &dyn Kernels,
        cache: &mut KvCache,
        seq: usize,
        prompt: &[u32],
    ) -> Result<Vec<f32>, ModelError> {
        cache.check_model(self.config.n_layer, self.config.n_embd)?;
        cache.check_prefill(seq, prompt.len())?;
        let logits = self.last_logits(k, prompt)?;
        let (t, c) = (prompt.len(), self.config.n_embd);
        let a = self.acts.as_ref().expect("last_logits ran the blocks");
        for (l, la) in a.layers.iter().enumerate() {
            for i in 0..t {
                let row = &la.qkv[i * 3 * c..(i + 1) * 3 * c];
                cache.store(l, seq, i, &row[c..2 * c], &row[2 * c..]);
            }
        }
        cache.lens[seq] = t;
        Ok(logits)
    }

    /// Appends `tokens[i]` to sequence `seqs[i]` and returns the next-token logits
    /// `[seqs.len(), vocab]`. Each sequence must have room (`lens < cap`).
    pub fn decode(
        &mut self,
        k: &dyn Kernels,
        cache: &mut KvCache,
        seqs: &[usize],
        tokens: &[u32],
    ) -> Result<Vec<f32>, ModelError> {
        kiln_tensor::on_workers(|| self.decode_step(k, cache, seqs, tokens))
    }

    fn decode_step(
        &mut self,
        k: &dyn Kernels,
        cache: &mut KvCache,
        seqs: &[usize],
        tokens: &[u32],
    ) -> Result<Vec<f32>, ModelError> {
        self.require_full("run for generation")?;
        let cfg = &self.config;
        let (m, c, nh, hs, v, vp) =
            (seqs.len(), cfg.n_embd, cfg.n_head, cfg.head_size(), cfg.vocab_size, cfg.padded_vocab());
        cache.check_model(cfg.n_layer, c)?;
        cache.check_decode(seqs, tokens, v)?;
        let (p, lin) = (&self.params, &self.lin);
        let z = |n: usize| vec![0.0f32; n];
        let (mut x, mut ln, mut qkv, mut att, mut tmp, mut res2) =
            (z(m * c), z(m * c), z(m * 3 * c), z(m * c), z(m * c), z(m * c));
        let (mut fc, mut fcg, mut mean, mut rstd) = (z(m * 4 * c), z(m * 4 * c), z(m), z(m));
        for (i, (&s, &tok)) in seqs.iter().zip(tokens).enumerate() {
            let (tok, pos) = (tok as usize, cache.lens[s]);
            for j in 0..c {
                x[i * c + j] = p[WTE][tok * c + j] + p[WPE][pos * c + j];
            }
        }
        let lens: Vec<usize> = seqs.iter().map(|&s| cache.lens[s] + 1).collect();
        for l in 0..cfg.n_layer {
            let base = 2 + l * PER_LAYER;
            let w = |j: usize| p[base + j].as_slice();
            k.layernorm_forward(&mut ln, &mut mean, &mut rstd, &x, w(LN1_W), w(LN1_W + 1), c);
            lin.matmul(k, &mut qkv, &ln, p, base + QKV_W, Some(w(QKV_W + 1)), c, 3 * c);
            for (i, &s) in seqs.iter().enumerate() {
                let row = &qkv[i * 3 * c..(i + 1) * 3 * c];
                cache.store(l, s, cache.lens[s], &row[c..2 * c], &row[2 * c..]);
                let (kc, vc) = cache.seq(l, s);
                k.attention_decode(
                    &mut att[i * c..(i + 1) * c],
                    &row[..c],
                    kc,
                    vc,
                    &lens[i..=i],
                    cache.cap,
                    nh,
                    nh,
                    hs,
                );
            }
            lin.matmul(k, &mut tmp, &att, p, base + PROJ_W, Some(w(PROJ_W + 1)), c, c);
            k.residual_forward(&mut res2, &x, &tmp);
            k.layernorm_forward(&mut ln, &mut mean, &mut rstd, &res2, w(LN2_W), w(LN2_W + 1), c);
            lin.matmul(k, &mut fc, &ln, p, base + FC_W, Some(w(FC_W + 1)), c, 4 * c);
            k.gelu_forward(&mut fcg, &fc);
            lin.matmul(k, &mut tmp, &fcg, p, base + FCPROJ_W, Some(w(FCPROJ_W + 1)), 4 * c, c);
            k.residual_forward(&mut x, &res2, &tmp);
        }
        let nf = p.len() - 2;
        k.layernorm_forward(&mut ln, &mut mean, &mut rstd, &x, &p[nf], &p[nf + 1], c);
        let mut logits = z(m * vp);
        lin.matmul(k, &mut logits, &ln, p, WTE, None, c, vp);
        for &s in seqs {
            cache.lens[s] += 1;
        }
        Ok(logits.chunks(vp).flat_map(|r| r[..v].to_vec()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GptConfig;
    use kiln_tensor::CpuKernels;

    fn rel_err(a: &[f32], b: &[f32]) -> f64 {
        let num: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
        let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
        (num / den).sqrt()
    }

    /// Cached decoding gives the logits of recomputing the whole sequence, step after step.
    #[test]
    fn decode_matches_full_recompute() {
        let cfg = GptConfig { n_layer: 2, n_head: 3, n_embd: 48, block_size: 24, vocab_size: 61 };
        let mut m = Gpt::new(cfg, 5).unwrap();
        let k = CpuKernels::default();
        let mut seqs: Vec<Vec<u32>> =
            vec![vec![3, 14, 15, 9], (0..11).map(|i| (i * 7 % 61) as u32).collect(), vec![42]];
        let mut cache = m.new_cache(3);
        for (s, ids) in seqs.iter().enumerate() {
            let got = m.prefill(&k, &mut cache, s, ids).unwrap();
            let want = m.last_logits(&k, ids).unwrap();
            assert!(rel_err(&got, &want) < 1e-6);
        }
        for step in 0..12 {
            // Sequence 1 sits out every other step: decoding a subset must work too.
            let active: Vec<usize> = (0..3).filter(|&s| s != 1 || step % 2 == 0).collect();
            let toks: Vec<u32> = active.iter().map(|&s| ((step * 13 + s * 5) % 61) as u32).collect();
            let got = m.decode(&k, &mut cache, &active, &toks).unwrap();
            for (i, &s) in active.iter().enumerate() {
                seqs[s].push(toks[i]);
                let want = m.last_logits(&k, &seqs[s]).unwrap();
                let e = rel_err(&got[i * 61..(i + 1) * 61], &want);
                assert!(e < 1e-5, "step {step} seq {s}: {e:e}");
            }
        }
        assert!(m.decode(&k, &mut cache, &[0], &[99]).is_err(), "token outside the vocabulary");
    }
}
