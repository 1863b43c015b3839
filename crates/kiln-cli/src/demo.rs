//! `kiln demo`: the whole path on a built-in corpus in a few minutes, no download needed.

use std::path::PathBuf;

use clap::Args;
use kiln_data::{synthetic, PrepareOptions, Tokenizer};

use crate::train::TrainArgs;

#[derive(Args)]
pub struct DemoArgs {
    /// Where everything goes.
    #[arg(long, default_value = "kiln-demo")]
    out: PathBuf,
    /// Training steps (about 0.2 s each on two cores).
    #[arg(long, default_value_t = 500)]
    steps: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

pub fn run(a: &DemoArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&a.out)?;
    let corpus = a.out.join("corpus.txt");
    println!("1/4 writing the synthetic corpus (number-to-words pairs and grammar sentences) to {}", corpus.display());
    synthetic::write_corpus(a.seed, 3_000_000, &corpus)?;
    let preview: Vec<String> = synthetic::generate(a.seed, 400).lines().take(3).map(String::from).collect();
    for l in preview {
        println!("      | {l}");
    }
    println!("2/4 training a 1024-token byte-level BPE tokenizer");
    let tok_path = a.out.join("tokenizer.json");
    let tok = Tokenizer::train_bpe(std::slice::from_ref(&corpus), 1024)?;
    tok.save(&tok_path)?;
    println!("3/4 tokenizing into memory-mapped shards");
    let data = a.out.join("data");
    let s =
        kiln_data::prepare(&[corpus.display().to_string()], &tok, &data, &PrepareOptions::default(), &mut |_, _| {})?;
    println!("      {} train / {} val tokens", s.train_tokens, s.val_tokens);
    println!("4/4 training a 4-layer, 128-wide GPT for {} steps (watch the loss fall)", a.steps);
    let run = a.out.join("run");
    if run.exists() {
        // The demo owns this directory: start each demo from a clean run.
        std::fs::remove_dir_all(&run)?;
    }
    let args = TrainArgs {
        data: Some(data),
        tokenizer: Some(tok_path),
        preset: Some("gpt-tiny".into()),
        n_layer: Some(4),
        n_embd: Some(128),
        n_head: Some(4),
        context: Some(128),
        steps: Some(a.steps),
        batch: Some(16),
        seq: Some(128),
        lr: Some(3e-3),
        warmup_steps: Some(30),
        eval_every: Some(100),
        eval_batches: Some(8),
        sample_tokens: Some(48),
        seed: Some(a.seed),
        out: Some(run.clone()),
        ..Default::default()
    };
    crate::train::run(&args)?;
    println!();
    println!("Done. Everything is in {}:", a.out.display());
    println!("  corpus        {}", corpus.display());
    println!("  tokenizer     {}", a.out.join("tokenizer.json").display());
    println!(
        "  checkpoint    {}  (loads in Hugging Face transformers as GPT2LMHeadModel)",
        run.join("checkpoint").display()
    );
    println!("  loss plot     {} and .svg", run.join("loss.png").display());
    println!("Try:  kiln generate --ckpt {} --prompt 'translate 512 to words:' --temperature 0", run.display());
    Ok(())
}
