//! `kiln generate` (streamed to the terminal) and `kiln eval logits`.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Subcommand};
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
    let params = SamplingParams { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p };
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

#[derive(Subcommand)]
pub enum EvalCmd {
    /// Logits of a checkpoint for given token ids, written to safetensors (tensor "logits" [T, V]).
    Logits(LogitsArgs),
}

#[derive(Args)]
pub struct LogitsArgs {
    #[arg(long)]
    ckpt: PathBuf,
    /// Comma-separated token ids.
    #[arg(long)]
    ids: String,
    #[arg(long)]
    out: PathBuf,
}

pub fn run_eval(c: &EvalCmd) -> anyhow::Result<()> {
    let EvalCmd::Logits(a) = c;
    let ids: Vec<u32> = a
        .ids
        .split(',')
        .map(|s| s.trim().parse::<u32>().map_err(|_| usage(format!("--ids: '{s}' is not a token id"))))
        .collect::<Result<_, _>>()?;
    let ck = load_checkpoint(&a.ckpt)?;
    let mut model = ck.model;
    let (v, vp) = (model.config.vocab_size, model.config.padded_vocab());
    model.forward(&CpuKernels::default(), &ids, None, 1, ids.len())?;
    let logits: Vec<f32> = model.logits().expect("forward ran").chunks(vp).flat_map(|r| r[..v].to_vec()).collect();
    let bytes = kiln_model::safetensors_bytes(&[("logits".into(), vec![ids.len(), v], logits)], Some(HashMap::new()))?;
    kiln_model::write_atomic(&a.out, &bytes)?;
    println!("wrote {} ([{}, {v}])", a.out.display(), ids.len());
    Ok(())
}
