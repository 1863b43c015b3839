//! `kiln generate` (streamed to the terminal) and `kiln eval logits`.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use kiln_model::{generate, SamplingParams};
use kiln_tensor::CpuKernels;
use kiln_train::load_checkpoint;
use rand::SeedableRng;

use crate::usage;

#[derive(Args)]
pub struct GenerateArgs {
    /// Checkpoint directory (a run directory or its checkpoint/).
    #[arg(long)]
    ckpt: PathBuf,
    #[arg(long, default_value = "\n")]
    prompt: String,
    #[arg(long, default_value_t = 200)]
    max_new_tokens: usize,
    /// 0 means greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Keep only the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(a: &GenerateArgs) -> anyhow::Result<()> {
    if a.temperature.is_nan() || a.temperature < 0.0 || a.top_p.is_nan() || a.top_p <= 0.0 || a.top_p > 1.0 {
        return Err(usage("--temperature must be >= 0 and --top-p in (0, 1]"));
    }
    let ck = load_checkpoint(&a.ckpt)?;
    let tok = ck.tokenizer.ok_or_else(|| usage(format!("{} has no tokenizer.json", a.ckpt.display())))?;
    let mut model = ck.model;
    let prompt = tok.encode(&a.prompt)?;
    if prompt.is_empty() {
        return Err(usage("the prompt encodes to no tokens"));
    }
    let params = SamplingParams { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p, ..Default::default() };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(a.seed);
    let mut out = std::io::stdout().lock();
    write!(out, "{}", a.prompt)?;
    // Decode the growing suffix and print only what is new, so multi-byte characters split
    // across tokens come out whole.
    let mut generated: Vec<u32> = Vec::new();
    let mut printed = 0usize;
    let k = CpuKernels::default();
    let eot = tok.eot_id();
    generate(&mut model, &k, &prompt, a.max_new_tokens, &params, &mut rng, &mut |id| {
        if Some(id) == eot {
            return false;
        }
        generated.push(id);
        if let Ok(text) = tok.decode(&generated) {
            if text.len() > printed && text.is_char_boundary(printed) && !text.ends_with('\u{FFFD}') {
                let _ = write!(out, "{}", &text[printed..]);
                let _ = out.flush();
                printed = text.len();
            }
        }
        true
    })?;
    writeln!(out)?;
    Ok(())
}
