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
