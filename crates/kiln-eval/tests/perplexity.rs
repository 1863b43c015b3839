//! Perplexity's window bookkeeping: every token after the first is scored exactly once, and a
//! text that fits one window gives exactly the model's mean cross-entropy (the quantity the
//! PyTorch-fixture tests pin down).

use kiln_eval::perplexity;
use kiln_model::{Gpt, GptConfig};
use kiln_tensor::CpuKernels;

fn model() -> Gpt {
    let cfg = GptConfig { n_layer: 2, n_head: 2, n_embd: 32, block_size: 16, vocab_size: 50 };
    Gpt::new(cfg, 3).unwrap()
}

#[test]
fn one_window_equals_the_mean_loss() {
    let mut m = model();
    let k = CpuKernels::default();
    let toks: Vec<u32> = (0..13).map(|i| (i * 17 % 50) as u32).collect();
    let loss = m.forward(&k, &toks[..12], Some(&toks[1..]), 1, 12).unwrap().unwrap() as f64;
    let r = perplexity(&mut m, &k, &toks, 100, 16, 16, &mut |_, _| {}).unwrap();
    assert_eq!(r.tokens, 12);
    assert!((r.nll - loss).abs() < 1e-6, "{} vs {loss}", r.nll);
    assert!((r.ppl - loss.exp()).abs() < 1e-4);
    // `loss` is rounded to f32: compare at f32 resolution.
    assert!((r.bpb - 12.0 * r.nll / std::f64::consts::LN_2 / 100.0).abs() < 1e-12);
    assert!((r.bpb - 12.0 * loss / std::f64::consts::LN_2 / 100.0).abs() < 1e-6);
}

#[test]
fn every_token_is_scored_once_and_bad_windows_are_errors() {
    let mut m = model();
    let k = CpuKernels::default();
    let toks: Vec<u32> = (0..101).map(|i| (i * 7 % 50) as u32).collect();
    for (ctx, stride) in [(16, 16), (16, 5), (7, 3), (16, 1)] {
        let r = perplexity(&mut m, &k, &toks, 400, ctx, stride, &mut |_, _| {}).unwrap();
        assert_eq!(r.tokens, 100, "ctx {ctx} stride {stride}");
        assert!(r.ppl.is_finite() && r.ppl > 1.0);
    }
    assert!(perplexity(&mut m, &k, &toks, 400, 17, 4, &mut |_, _| {}).is_err(), "window longer than the context");
    assert!(perplexity(&mut m, &k, &toks, 400, 8, 9, &mut |_, _| {}).is_err(), "stride longer than the window");
    assert!(perplexity(&mut m, &k, &toks[..1], 4, 8, 4, &mut |_, _| {}).is_err(), "one token");
}
