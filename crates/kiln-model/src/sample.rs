//! Choosing the next token from logits: repetition penalties, then greedy, temperature,
//! top-k, top-p (nucleus).

use std::collections::HashMap;

use rand::Rng;

use crate::CausalLm;

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no top-k cut.
    pub top_k: usize,
    /// 1 means no nucleus cut.
    pub top_p: f32,
    /// Hugging Face's (CTRL's) penalty on every token already in the sequence: positive
    /// logits divided by it, negative ones multiplied. 1 means none.
    pub repetition_penalty: f32,
    /// OpenAI's penalties: subtract `frequency · count + presence · [count > 0]` per token
    /// seen among the generated tokens. 0 means none.
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> SamplingParams {
        SamplingParams { temperature: 0.0, ..Default::default() }
    }

    /// Rejects values no sampler can use.
    pub fn validate(&self) -> Result<(), String> {
        let finite =
            [self.temperature, self.top_p, self.repetition_penalty, self.frequency_penalty, self.presence_penalty]
                .iter()
                .all(|x| x.is_finite());
        if !finite {
            return Err("sampling parameters must be finite numbers".into());
        }
        if self.temperature < 0.0 {
            return Err(format!("temperature must be >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if self.repetition_penalty <= 0.0 {
            return Err(format!("repetition_penalty must be > 0, got {}", self.repetition_penalty));
        }
        Ok(())
    }

    fn has_penalties(&self) -> bool {
        self.repetition_penalty != 1.0 || self.frequency_penalty != 0.0 || self.presence_penalty != 0.0
    }
}

/// Applies the penalties of `p` to `logits`: the repetition penalty over `context` (prompt
/// and generated tokens, as Hugging Face does), frequency and presence over `generated`
/// (as OpenAI does).
pub fn apply_penalties(logits: &mut [f32], context: &[u32], generated: &[u32], p: &SamplingParams) {
    if p.repetition_penalty != 1.0 {
        let mut seen = vec![false; logits.len()];
        for &t in context {
            let t = t as usize;
            if t < logits.len() && !seen[t] {
                seen[t] = true;
                let x = logits[t];
                logits[t] = if x > 0.0 { x / p.repetition_penalty } else { x * p.repetition_penalty };
            }
        }
    }
    if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
        let mut counts: HashMap<u32, usize> = HashMap::new();
        for &t in generated {
            *counts.entry(t).or_default() += 1;
        }
        for (t, n) in counts {
            if let Some(x) = logits.get_mut(t as usize) {
                *x -= p.frequency_penalty * n as f32 + p.presence_penalty;
            }
        }
    }
}

/// Picks a token id from `logits`; ties in greedy mode go to the lowest id, like `argmax`.
pub fn sample_next(logits: &[f32], p: &SamplingParams, rng: &mut impl Rng) -> u32 {
    let argmax = || logits.iter().enumerate().fold(0, |best, (i, &x)| if x > logits[best] { i } else { best }) as u32;
    if p.temperature <= 0.0 {
        return argmax();
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if p.top_k > 0 {
        order.truncate(p.top_k);
    }
    let max = logits[order[0]];
    let mut probs: Vec<f64> = order.iter().map(|&i| (((logits[i] - max) / p.temperature) as f64).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|x| *x /= total);
    if p.top_p < 1.0 {
        // Keep the smallest prefix whose mass reaches top_p (at least one token).
        let mut cum = 0.0;
        let keep = probs.iter().position(|&x| {
            cum += x;
            cum >= p.top_p as f64
        });
        let keep = keep.map_or(probs.len(), |k| k + 1);
        order.truncate(keep);
        probs.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
    }
    let mut u: f64 = rng.random();
    for (i, &pr) in probs.iter().enumerate() {
        u -= pr;
        if u <= 0.0 {
            return order[i] as u32;
        }
    }
    *order.last().expect("at least one candidate") as u32
}

/// Autoregressive generation with a KV cache: the prompt (its last `block_size` tokens) is
/// prefilled once, then each new token costs one cached decode step. When the context fills,
/// the last half is kept and prefilled again (a context shift, as llama.cpp does). `on_token`
/// sees each new token and may stop early by returning false.
pub fn generate(
    model: &mut dyn CausalLm,
    k: &dyn kiln_tensor::Kernels,
    prompt: &[u32],
    max_new: usize,
    params: &SamplingParams,
    rng: &mut impl Rng,
    on_token: &mut dyn FnMut(u32) -> bool,
) -> Result<Vec<u32>, crate::ModelError> {
    if prompt.is_empty() {
        return Err(crate::ModelError::Shape("the prompt is empty".into()));
    }
    let cap = model.context_len();
    let mut ids = prompt.to_vec();
    let mut cache = model.new_cache(1);
    let mut logits = model.prefill(k, &mut cache, 0, &ids[ids.len().saturating_sub(cap)..])?;
    for i in 0..max_new {
        if params.has_penalties() {
            apply_penalties(&mut logits, &ids, &ids[prompt.len()..], params);
        }
        let next = sample_next(&logits, params, rng);
        ids.push(next);
        if !on_token(next) || i + 1 == max_new {
            break;
        }
        logits = if cache.lens[0] == cap {
            model.prefill(k, &mut cache, 0, &ids[ids.len() - cap / 2..])?
        } else {
            model.decode(k, &mut cache, &[0], &[next])?
        };
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn greedy_top_k_and_top_p() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let logits = [0.1, 3.0, 2.9, -1.0];
        let greedy = SamplingParams { temperature: 0.0, ..Default::default() };
        assert_eq!(sample_next(&logits, &greedy, &mut rng), 1);
        let k1 = SamplingParams { top_k: 1, ..Default::default() };
        assert!((0..50).all(|_| sample_next(&logits, &k1, &mut rng) == 1));
        let k2 = SamplingParams { top_k: 2, ..Default::default() };
        let picks: Vec<u32> = (0..200).map(|_| sample_next(&logits, &k2, &mut rng)).collect();
        assert!(picks.iter().all(|&x| x == 1 || x == 2) && picks.contains(&1) && picks.contains(&2));
        let p_small = SamplingParams { top_p: 0.3, ..Default::default() };
        assert!((0..50).all(|_| sample_next(&logits, &p_small, &mut rng) == 1));
    }

    #[test]
    fn penalties_as_hugging_face_and_openai_define_them() {
        let p = SamplingParams { repetition_penalty: 2.0, ..Default::default() };
        let mut l = vec![4.0, -1.0, 3.0, 1.0];
        apply_penalties(&mut l, &[0, 1, 1], &[], &p);
        assert_eq!(l, vec![2.0, -2.0, 3.0, 1.0], "each seen token penalised once, by sign");
        let p = SamplingParams { frequency_penalty: 0.5, presence_penalty: 1.0, ..Default::default() };
        let mut l = vec![4.0, -1.0, 3.0, 1.0];
        apply_penalties(&mut l, &[0, 1, 3, 3, 3], &[3, 3, 3], &p);
        assert_eq!(l, vec![4.0, -1.0, 3.0, -1.5]);
        assert!(SamplingParams { top_p: 0.0, ..Default::default() }.validate().is_err());
        assert!(SamplingParams { temperature: f32::NAN, ..Default::default() }.validate().is_err());
        assert!(SamplingParams::greedy().validate().is_ok());
    }
}
