//! The `kiln` binary: argument parsing, config files, progress bars and exit codes. The work
//! itself lives in the library crates.

mod bench;
mod demo;
mod eval;
mod export;
mod generate;
mod load;
mod map;
mod prep;
mod quantize;
mod serve;
mod train;
mod ui;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Exit codes: 0 success, 1 the work failed (I/O, data, a diverged run), 2 bad usage or input
/// that was rejected before any work started.
pub const EXIT_FAILURE: u8 = 1;
pub const EXIT_USAGE: u8 = 2;

/// An error that means "the user asked for something that cannot work" (exit code 2).
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for UsageError {}

pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    UsageError(msg.into()).into()
}

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Train, run, serve, export and map GPT-2 and Llama-family language models, fast on your CPU.",
    long_about = "kiln trains GPT-2-architecture language models on the CPU with hand-written SIMD \
kernels, checked against PyTorch; runs GPT-2, Llama, Qwen2 and Mistral checkpoints from Hugging Face; \
serves them over an OpenAI-compatible API; exports GGUF; and predicts their speed on accelerators.\n\n\
Start here:\n  \
kiln demo                      train a small model on a built-in corpus (1-3 minutes)\n  \
kiln tokenizer train ...       learn a byte-level BPE vocabulary from your text\n  \
kiln data prepare ...          turn text files into token shards\n  \
kiln train ...                 train (or --resume) a model; --dp N for data parallel\n  \
kiln generate ...              sample text from a checkpoint (kiln's or Hugging Face's)\n  \
kiln serve ...                 OpenAI-compatible HTTP server with continuous batching\n  \
kiln export ...                GGUF (f32, f16, q8_0, q4_0) for llama.cpp\n  \
kiln quantize ...              int8 / w8a8 / int4 by RTN, GPTQ, AWQ or SmoothQuant\n  \
kiln map ...                   predict latency, fit, energy and cost on FPGA / ASIC / GPU / CPU\n  \
kiln plot ...                  draw loss curves\n  \
kiln eval ppl|bleu|chrf|rouge|task ...  measure a model or a system's output\n  \
kiln bench train|generate ...  measure training and generation speed\n  \
kiln report ...                one HTML page with curves, scores, speed",
    propagate_version = true
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
pub struct Global {
    /// Worker threads (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
}

#[derive(Subcommand)]
enum Command {
    /// Train a small model on the built-in synthetic corpus, sample it, plot the loss.
    Demo(demo::DemoArgs),
    /// Tokenizers: train a byte-level BPE vocabulary.
    #[command(subcommand)]
    Tokenizer(prep::TokenizerCmd),
    /// Datasets: tokenize text into memory-mapped shards, or write the synthetic corpus.
    #[command(subcommand)]
    Data(prep::DataCmd),
    /// Train a model (from scratch, or continue with --resume).
    Train(Box<train::TrainArgs>),
    /// Generate text from a checkpoint, streamed to the terminal.
    Generate(generate::GenerateArgs),
    /// Draw loss curves from metrics JSONL files to PNG and SVG.
    Plot(PlotArgs),
    /// Benchmarks (machine-readable with --json).
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// Evaluation: perplexity, BLEU / chrF / ROUGE, task scores, logits.
    #[command(subcommand)]
    Eval(eval::EvalCmd),
    /// One HTML page with loss curves, model, perplexity, task scores, speed and memory.
    Report(ReportArgs),
    /// Write a checkpoint in another runtime's format: GGUF (f32, f16, q8_0, q4_0) for llama.cpp.
    Export(export::ExportArgs),
    /// Quantize a checkpoint to int8, w8a8 or int4 (RTN, GPTQ, AWQ, SmoothQuant), with a
    /// size, perplexity and KL-divergence report.
    Quantize(Box<quantize::QuantizeArgs>),
    /// Map a model onto accelerators (FPGA / ASIC / GPU / CPU): latency, tokens/s, fit, energy, cost.
    Map(map::MapArgs),
    /// Serve a checkpoint over an OpenAI-compatible HTTP API (completions, chat, streaming).
    Serve(serve::ServeArgs),
}

#[derive(Args)]
struct ReportArgs {
    /// A run directory (uses its checkpoint/ and metrics.jsonl) or a checkpoint directory.
    #[arg(long)]
    ckpt: Option<PathBuf>,
    /// Extra metrics JSONL files to plot (repeatable).
    #[arg(long)]
    metrics: Vec<PathBuf>,
    /// JSON written by `kiln eval ppl|task --json` or `kiln bench train --json` (repeatable).
    #[arg(long = "add")]
    measurements: Vec<PathBuf>,
    #[arg(long, default_value = "kiln report")]
    title: String,
    #[arg(long, default_value = "report.html")]
    out: PathBuf,
}

fn run_report(a: &ReportArgs) -> anyhow::Result<()> {
    let read_json = |p: &std::path::Path| -> anyhow::Result<serde_json::Value> {
        let text = std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))?;
        // A whole JSON document, or the last JSON line of a command's output.
        serde_json::from_str(&text)
            .or_else(|e| text.lines().rev().find_map(|l| serde_json::from_str(l).ok()).ok_or(e))
            .map_err(|e| usage(format!("{}: not JSON: {e}", p.display())))
    };
    let (mut config, mut kiln, mut metrics) = (None, None, a.metrics.clone());
    if let Some(dir) = &a.ckpt {
        let ck = kiln_train::resolve_checkpoint_dir(dir);
        if !ck.join("config.json").exists() {
            return Err(usage(format!("{}: no checkpoint here (config.json missing)", dir.display())));
        }
        config = Some(read_json(&ck.join("config.json"))?);
        if ck.join("kiln.json").exists() {
            kiln = Some(read_json(&ck.join("kiln.json"))?);
        }
        let m = dir.join("metrics.jsonl");
        if m.exists() && !metrics.contains(&m) {
            metrics.insert(0, m);
        }
    }
    let labels: Vec<(String, PathBuf)> = metrics
        .iter()
        .map(|m| {
            (
                m.parent().and_then(|p| p.file_name()).map_or("run".into(), |s| s.to_string_lossy().to_string()),
                m.clone(),
            )
        })
        .collect();
    let measurements = a
        .measurements
        .iter()
        .map(|p| Ok((p.file_stem().map_or("input".into(), |s| s.to_string_lossy().to_string()), read_json(p)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let inputs = kiln_eval::ReportInputs {
        title: a.title.clone(),
        config,
        kiln,
        metrics: labels.iter().map(|(l, p)| (l.clone(), p.as_path())).collect(),
        measurements,
    };
    let html = kiln_eval::render_report(&inputs)?;
    kiln_model::write_atomic(&a.out, html.as_bytes())?;
    println!("wrote {}", a.out.display());
    Ok(())
}

#[derive(Args)]
struct PlotArgs {
    /// Metrics file(s) written by `kiln train` (repeat to overlay runs).
    #[arg(long, required = true)]
    metrics: Vec<PathBuf>,
    /// Output path without extension: writes OUT.png and OUT.svg.
    #[arg(long, default_value = "loss")]
    out: PathBuf,
    #[arg(long, default_value = "kiln training loss")]
    title: String,
}

fn run_plot(a: &PlotArgs) -> anyhow::Result<()> {
    let mut series = Vec::new();
    for m in &a.metrics {
        let label = m.parent().and_then(|p| p.file_name()).map_or("run".into(), |s| s.to_string_lossy().to_string());
        series.extend(kiln_eval::read_metrics(m, &label)?);
    }
    let curves = kiln_eval::LossCurves { title: a.title.clone(), series };
    let (png, svg) = (a.out.with_extension("png"), a.out.with_extension("svg"));
    kiln_eval::write_png(&curves, &png)?;
    kiln_eval::write_svg(&curves, &svg)?;
    println!("wrote {} and {}", png.display(), svg.display());
    Ok(())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    if let Some(n) = cli.global.threads {
        if n == 0 {
            eprintln!("error: --threads must be at least 1");
            return ExitCode::from(EXIT_USAGE);
        }
        // The global pool is built once, before any kernel runs.
        let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
    }
    let result = match &cli.command {
        Command::Demo(a) => demo::run(a),
        Command::Tokenizer(c) => prep::run_tokenizer(c),
        Command::Data(c) => prep::run_data(c),
        Command::Train(a) => train::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Plot(a) => run_plot(a),
        Command::Bench(c) => bench::run(c),
        Command::Eval(c) => eval::run(c),
        Command::Report(a) => run_report(a),
        Command::Export(a) => export::run(a),
        Command::Quantize(a) => quantize::run(a),
        Command::Map(a) => map::run(a),
        Command::Serve(a) => serve::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            // The reader went away (`kiln generate | head`): not a failure.
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            let is_usage = e.downcast_ref::<UsageError>().is_some()
                || matches!(e.downcast_ref::<kiln_train::TrainError>(), Some(kiln_train::TrainError::Config(_)))
                || matches!(
                    e.downcast_ref::<kiln_model::ModelError>(),
                    Some(
                        kiln_model::ModelError::TokenOutOfRange { .. } | kiln_model::ModelError::SequenceTooLong { .. }
                    )
                );
            ExitCode::from(if is_usage { EXIT_USAGE } else { EXIT_FAILURE })
        }
    }
}
