//! `kiln tokenizer train`, `kiln data prepare`, `kiln data synth`.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use kiln_data::{synthetic, PrepareOptions, Tokenizer};

use crate::{ui, usage};

#[derive(Subcommand)]
pub enum TokenizerCmd {
    /// Learn a byte-level BPE vocabulary (GPT-2 style; `<|endoftext|>` is the last id).
    Train(TokTrainArgs),
}

#[derive(Args)]
pub struct TokTrainArgs {
    /// Text files to learn from.
    #[arg(long, required = true, num_args = 1..)]
    input: Vec<PathBuf>,
    /// Vocabulary size, special token included (at least 265).
    #[arg(long, default_value_t = 8192)]
    vocab_size: usize,
    /// Where to write tokenizer.json (Hugging Face format).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Subcommand)]
pub enum DataCmd {
    /// Tokenize text files (globs allowed; streamed, any size) into train.bin / val.bin.
    Prepare(PrepareArgs),
    /// Write the built-in synthetic corpus (number-to-words pairs and grammar sentences).
    Synth(SynthArgs),
    /// Turn a line-aligned parallel corpus (.gz allowed) into "German: … English: …" training
    /// text, or with --task into a `kiln eval task` file.
    Pairs(PairsArgs),
}

#[derive(Args)]
pub struct PairsArgs {
    /// Source-language file, one sentence a line.
    #[arg(long)]
    src: PathBuf,
    /// Target-language file, aligned line by line with --src.
    #[arg(long)]
    tgt: PathBuf,
    #[arg(long, default_value = "German")]
    src_name: String,
    #[arg(long, default_value = "English")]
    tgt_name: String,
    /// Write task JSONL ({"prompt", "references"}) instead of training text.
    #[arg(long)]
    task: bool,
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
pub struct PrepareArgs {
    /// Text files or glob patterns, e.g. 'corpus/*.txt'.
    #[arg(long, required = true, num_args = 1..)]
    input: Vec<String>,
    /// tokenizer.json to encode with (copied next to the shards).
    #[arg(long)]
    tokenizer: PathBuf,
    /// Output directory for train.bin, val.bin, meta.json, tokenizer.json.
    #[arg(long)]
    out: PathBuf,
    /// Fraction of the text (by bytes, from the end) held out for validation.
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
}

#[derive(Args)]
pub struct SynthArgs {
    #[arg(long)]
    out: PathBuf,
    /// Approximate size in bytes.
    #[arg(long, default_value_t = 2_000_000)]
    bytes: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

pub fn run_tokenizer(c: &TokenizerCmd) -> anyhow::Result<()> {
    let TokenizerCmd::Train(a) = c;
    if a.vocab_size < kiln_data::MIN_TRAIN_VOCAB {
        return Err(usage(format!("--vocab-size must be at least {}", kiln_data::MIN_TRAIN_VOCAB)));
    }
    let spinner =
        indicatif::ProgressBar::new_spinner().with_message(format!("training a {}-token BPE vocabulary", a.vocab_size));
    spinner.enable_steady_tick(std::time::Duration::from_millis(150));
    let tok = Tokenizer::train_bpe(&a.input, a.vocab_size)?;
    spinner.finish_and_clear();
    tok.save(&a.out)?;
    println!("wrote {} ({} tokens)", a.out.display(), tok.vocab_size());
    Ok(())
}

pub fn run_data(c: &DataCmd) -> anyhow::Result<()> {
    match c {
        DataCmd::Prepare(a) => {
            let tok = Tokenizer::from_file(&a.tokenizer)?;
            let opts = PrepareOptions { val_fraction: a.val_fraction, ..Default::default() };
            let bar = ui::bytes_bar(0, "tokenizing");
            let s = kiln_data::prepare(&a.input, &tok, &a.out, &opts, &mut |done, total| {
                bar.set_length(total);
                bar.set_position(done);
            })?;
            bar.finish_and_clear();
            println!(
                "{} files, {} bytes -> {} train + {} val tokens ({:.2} bytes/token) in {}",
                s.files,
                s.bytes,
                s.train_tokens,
                s.val_tokens,
                s.bytes as f64 / (s.train_tokens + s.val_tokens).max(1) as f64,
                a.out.display()
            );
            Ok(())
        }
        DataCmd::Pairs(a) => {
            let (src, tgt) = (kiln_data::read_lines(&a.src)?, kiln_data::read_lines(&a.tgt)?);
            let fmt = kiln_data::PairFormat { src_name: a.src_name.clone(), tgt_name: a.tgt_name.clone() };
            let n = if a.task {
                kiln_data::write_pairs_task(&src, &tgt, &fmt, &a.out)?
            } else {
                kiln_data::write_pairs_text(&src, &tgt, &fmt, &a.out)?
            };
            println!("wrote {} ({n} pairs{})", a.out.display(), if a.task { ", task JSONL" } else { "" });
            Ok(())
        }
        DataCmd::Synth(a) => {
            synthetic::write_corpus(a.seed, a.bytes, &a.out)?;
            println!("wrote {} (~{} bytes, seed {})", a.out.display(), a.bytes, a.seed);
            Ok(())
        }
    }
}
