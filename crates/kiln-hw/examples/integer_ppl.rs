//! Float vs integer-only perplexity of a GPT-2 checkpoint on a text file.
//!
//!     cargo run --release -p kiln-hw --example integer_ppl -- DIR TEXTFILE [MAX_WINDOWS]
//!
//! The text is tokenized with DIR/tokenizer.json. Its first 8 × 128 tokens calibrate the
//! integer model's activation scales and are not scored (when the text is long enough to leave
//! some after them). The rest is cut into non-overlapping windows of the model's context
//! length L: window i reads tokens [iL, iL + L) and predicts [iL + 1, iL + L + 1); perplexity
//! is exp of the mean negative log-likelihood over every predicted token (a last, shorter
//! window included). Both models score the same windows.

use std::path::PathBuf;

use anyhow::{bail, Context};
use kiln_hw::integer::IntegerGpt;
use kiln_hw::onnx::weights::ModelWeights;
use kiln_model::CausalLm;

const CALIB_SEQS: usize = 8;
const CALIB_LEN: usize = 128;

fn mean_nll(model: &mut dyn CausalLm, ids: &[u32], windows: usize) -> anyhow::Result<(f64, usize)> {
    let k = kiln_tensor::CpuKernels::default();
    let l = model.context_len();
    let (mut sum, mut n) = (0.0f64, 0usize);
    for start in (0..ids.len().saturating_sub(1)).step_by(l).take(windows) {
        let end = (start + l).min(ids.len() - 1);
        let losses = model.sequence_losses(&k, &ids[start..end], &ids[start + 1..end + 1])?;
        sum += losses.iter().map(|&x| x as f64).sum::<f64>();
        n += losses.len();
    }
    Ok((sum / n.max(1) as f64, n))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        bail!("usage: integer_ppl DIR TEXTFILE [MAX_WINDOWS]");
    }
    let dir = kiln_model::resolve_model_dir(&PathBuf::from(&args[0]));
    let windows: usize = args.get(2).map(|s| s.parse()).transpose().context("MAX_WINDOWS")?.unwrap_or(usize::MAX);
    let tok = kiln_data::Tokenizer::from_file(&dir.join("tokenizer.json"))?;
    let text = std::fs::read_to_string(&args[1]).with_context(|| format!("reading {}", args[1]))?;
    let ids = tok.encode(&text)?;
    let weights = ModelWeights::load(&dir)?;
    let calib_len = CALIB_LEN.min(weights.context);
    let calib_n = CALIB_SEQS * calib_len;
    let calib: Vec<Vec<u32>> = ids[..calib_n.min(ids.len())].chunks(calib_len).map(|c| c.to_vec()).collect();
    let eval = if ids.len() > calib_n + 1 { &ids[calib_n..] } else { &ids[..] };
    if eval.len() < 2 {
        bail!("{}: too few tokens to score", args[1]);
    }
    let t0 = std::time::Instant::now();
    let mut int = IntegerGpt::from_weights(&weights, &calib)?;
    let convert_s = t0.elapsed().as_secs_f64();
    let mut float = kiln_model::load_causal_lm(&dir)?;
    let t0 = std::time::Instant::now();
    let (nll_f, n) = mean_nll(float.as_mut(), eval, windows)?;
    let float_s = t0.elapsed().as_secs_f64();
    let t0 = std::time::Instant::now();
    let (nll_i, _) = mean_nll(&mut int, eval, windows)?;
    let int_s = t0.elapsed().as_secs_f64();
    println!(
        "model {} (context {}), {} tokens scored, calibration on {} tokens",
        dir.display(),
        weights.context,
        n,
        calib.iter().map(|c| c.len()).sum::<usize>()
    );
    println!("float f32     : mean NLL {nll_f:.4}  perplexity {:.3}  ({float_s:.1} s)", nll_f.exp());
    println!(
        "integer-only  : mean NLL {nll_i:.4}  perplexity {:.3}  ({int_s:.1} s, conversion {convert_s:.1} s)",
        nll_i.exp()
    );
    println!("ratio         : {:.4}", (nll_i - nll_f).exp());
    Ok(())
}
