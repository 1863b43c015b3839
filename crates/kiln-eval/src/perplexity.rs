//! Perplexity with a strided sliding window, and bits per byte.
//!
//! Convention (Hugging Face's "perplexity of fixed-length models" guide, token-weighted): the
//! text's N tokens are visited by windows of at most `ctx` inputs starting every `stride`
//! tokens; every token after the first is scored exactly once, by the first window that
//! predicts it, with all the context that window holds. `stride == ctx` gives disjoint windows
//! (llama.cpp's `perplexity` scores only each chunk's second half instead; we do not).
//! ppl = exp(Σ nll / scored tokens); bits per byte = Σ nll / ln 2 / bytes of text.

use kiln_model::CausalLm;
use kiln_tensor::Kernels;
use serde::Serialize;

use crate::EvalError;

#[derive(Clone, Debug, Serialize)]
pub struct PplReport {
    pub ppl: f64,
    /// Mean negative log-likelihood per scored token, in nats.
    pub nll: f64,
    pub bpb: f64,
    /// Tokens scored (all but the first).
    pub tokens: usize,
    pub bytes: usize,
    pub ctx: usize,
    pub stride: usize,
}

/// Scores `tokens` (the encoding of a text of `bytes` bytes); `progress(done, total)` in tokens.
pub fn perplexity(
    model: &mut dyn CausalLm,
    k: &dyn Kernels,
    tokens: &[u32],
    bytes: usize,
    ctx: usize,
    stride: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<PplReport, EvalError> {
    let n = tokens.len();
    if n < 2 {
        return Err(EvalError::Perplexity(format!("the text holds {n} token(s); perplexity needs at least 2")));
    }
    if ctx == 0 || ctx > model.context_len() {
        return Err(EvalError::Perplexity(format!(
            "--ctx must lie in 1..={} (the model's context)",
            model.context_len()
        )));
    }
    if stride == 0 || stride > ctx {
        return Err(EvalError::Perplexity(format!("--stride must lie in 1..={ctx} (the window)")));
    }
    let (mut nll, mut scored) = (0.0f64, 0usize);
    let (mut begin, mut next) = (0usize, 1usize);
    while next < n {
        let len = ctx.min(n - 1 - begin);
        let (x, y) = (&tokens[begin..begin + len], &tokens[begin + 1..begin + len + 1]);
        let losses = model.sequence_losses(k, x, y).map_err(|e| EvalError::Perplexity(e.to_string()))?;
        for (i, &l) in losses.iter().enumerate() {
            if begin + 1 + i >= next {
                nll += l as f64;
                scored += 1;
            }
        }
        next = begin + len + 1;
        begin += stride;
        progress(next.min(n), n);
    }
    let mean = nll / scored as f64;
    Ok(PplReport {
        ppl: mean.exp(),
        nll: mean,
        bpb: nll / std::f64::consts::LN_2 / bytes.max(1) as f64,
        tokens: scored,
        bytes,
        ctx,
        stride,
    })
}

/// How closely a model (a quantized one, say) follows a reference model token by token: the
/// figures llama.cpp's `perplexity --kl-divergence` reports.
#[derive(Clone, Debug, Serialize)]
pub struct LogitAgreement {
    /// Mean over positions of KL(P_ref ‖ P_test), in nats.
    pub kl_mean: f64,
    /// Largest per-position KL.
    pub kl_max: f64,
    /// Fraction of positions whose most likely next token is the same for both models.
    pub top1_agreement: f64,
    pub positions: usize,
}

/// Compares the next-token distributions of `test` against `reference` over `tokens` cut into
/// disjoint windows of `ctx`; `progress(done, total)` in tokens.
pub fn logit_agreement(
    reference: &mut dyn CausalLm,
    test: &mut dyn CausalLm,
    k: &dyn Kernels,
    tokens: &[u32],
    ctx: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<LogitAgreement, EvalError> {
    let v = reference.vocab_size();
    if test.vocab_size() != v {
        return Err(EvalError::Perplexity(format!("vocabularies differ: {v} vs {}", test.vocab_size())));
    }
    if ctx == 0 || ctx > reference.context_len().min(test.context_len()) {
        return Err(EvalError::Perplexity("the window must fit both models' context".into()));
    }
    if tokens.is_empty() {
        return Err(EvalError::Perplexity("no tokens to compare on".into()));
    }
    let (mut kl_sum, mut kl_max, mut same, mut positions) = (0.0f64, 0.0f64, 0usize, 0usize);
    for (w, window) in tokens.chunks(ctx).enumerate() {
        let err = |e: kiln_model::ModelError| EvalError::Perplexity(e.to_string());
        let p = reference.sequence_logits(k, window).map_err(err)?;
        let q = test.sequence_logits(k, window).map_err(err)?;
        for (pr, qr) in p.chunks_exact(v).zip(q.chunks_exact(v)) {
            let (lp, lq) = (log_softmax(pr), log_softmax(qr));
            let kl: f64 = lp.iter().zip(&lq).map(|(a, b)| a.exp() * (a - b)).sum();
            kl_sum += kl;
            kl_max = kl_max.max(kl);
            same += (argmax(pr) == argmax(qr)) as usize;
            positions += 1;
        }
        progress(((w + 1) * ctx).min(tokens.len()), tokens.len());
    }
    Ok(LogitAgreement {
        kl_mean: kl_sum / positions as f64,
        kl_max,
        top1_agreement: same as f64 / positions as f64,
        positions,
    })
}

fn log_softmax(x: &[f32]) -> Vec<f64> {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let lse = x.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max;
    x.iter().map(|&v| v as f64 - lse).collect()
}

fn argmax(x: &[f32]) -> usize {
    x.iter().enumerate().fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) }).0
}

#[cfg(test)]
mod agreement_tests {
    use super::*;
    use kiln_tensor::CpuKernels;

    /// A model against itself: KL exactly 0 and full agreement; against another: KL > 0.
    #[test]
    fn agreement_of_a_model_with_itself_and_another() {
        let mut a = kiln_model::preset_model("gpt-tiny", Some(101), 1).unwrap();
        let mut b = kiln_model::preset_model("gpt-tiny", Some(101), 1).unwrap();
        let mut c = kiln_model::preset_model("gpt-tiny", Some(101), 2).unwrap();
        let tokens: Vec<u32> = (0..150).map(|i| (i * 7 % 101) as u32).collect();
        let k = CpuKernels::default();
        let same = logit_agreement(a.as_mut(), b.as_mut(), &k, &tokens, 64, &mut |_, _| {}).unwrap();
        assert_eq!(same.positions, 150);
        assert!(same.kl_mean.abs() < 1e-12 && same.top1_agreement == 1.0, "{same:?}");
        let diff = logit_agreement(a.as_mut(), c.as_mut(), &k, &tokens, 64, &mut |_, _| {}).unwrap();
        assert!(diff.kl_mean > 1e-4 && diff.top1_agreement < 1.0, "{diff:?}");
        assert!(logit_agreement(a.as_mut(), c.as_mut(), &k, &tokens, 0, &mut |_, _| {}).is_err());
    }
}
