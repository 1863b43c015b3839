//! `kiln eval`: perplexity, BLEU / chrF / ROUGE on files, task evaluation, raw logits.

use std::collections::HashMap;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use kiln_eval::{BleuOptions, BleuTokenize, Smoothing};
use kiln_tensor::CpuKernels;

use crate::{ui, usage};

#[derive(Subcommand)]
pub enum EvalCmd {
    /// Perplexity and bits per byte of a text file (strided sliding window).
    Ppl(PplArgs),
    /// Corpus BLEU exactly as sacrebleu computes it (prints its signature).
    Bleu(BleuArgs),
    /// chrF (or chrF++ with --word-order 2) exactly as sacrebleu computes it.
    Chrf(ChrfArgs),
    /// ROUGE-1/2/L/Lsum exactly as Google's rouge-score computes them, averaged over examples.
    Rouge(RougeArgs),
    /// Generate an answer for each prompt of a JSONL task file and score them.
    Task(TaskArgs),
    /// Logits of a checkpoint for given token ids, written to safetensors (tensor "logits" [T, V]).
    Logits(LogitsArgs),
}

#[derive(Args)]
pub struct PplArgs {
    #[arg(long)]
    ckpt: PathBuf,
    /// UTF-8 text file to score.
    #[arg(long)]
    data: PathBuf,
    /// Window length in tokens (default: the model's context).
    #[arg(long)]
    ctx: Option<usize>,
    /// Tokens between window starts (default: half the window).
    #[arg(long)]
    stride: Option<usize>,
    /// Score the integer-only (fixed-point w8a8, I-BERT-style) executor instead of the float model.
    #[arg(long)]
    integer_only: bool,
    /// Calibration text for --integer-only's activation scales (default: random tokens).
    #[arg(long, requires = "integer_only")]
    calib: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct MetricFiles {
    /// Hypotheses, one segment a line.
    #[arg(long)]
    hyp: PathBuf,
    /// References, aligned with --hyp (repeat for several reference streams).
    #[arg(long = "ref", required = true)]
    refs: Vec<PathBuf>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct BleuArgs {
    #[command(flatten)]
    files: MetricFiles,
    /// Tokenizer: 13a (sacrebleu's default), none, intl, char, zh.
    #[arg(long, default_value = "13a")]
    tokenize: String,
    #[arg(long)]
    lowercase: bool,
    /// Smoothing: exp (default), floor, add-k, none.
    #[arg(long, default_value = "exp")]
    smooth: String,
    #[arg(long)]
    smooth_value: Option<f64>,
}

#[derive(Args)]
pub struct ChrfArgs {
    #[command(flatten)]
    files: MetricFiles,
    /// Word n-gram order: 0 for chrF, 2 for chrF++.
    #[arg(long, default_value_t = 0)]
    word_order: usize,
}

#[derive(Args)]
pub struct RougeArgs {
    #[command(flatten)]
    files: MetricFiles,
    /// Porter stemmer, as rouge-score's use_stemmer=True.
    #[arg(long)]
    stem: bool,
    /// Bootstrap samples for 95% confidence intervals (0: none).
    #[arg(long, default_value_t = 1000)]
    bootstrap: usize,
    /// Turns this marker into a newline so ROUGE-Lsum sees sentences (e.g. '<n>').
    #[arg(long)]
    lsum_sep: Option<String>,
}

#[derive(Args)]
pub struct TaskArgs {
    #[arg(long)]
    ckpt: PathBuf,
    /// JSONL: {"prompt": "...", "references": ["...", ...]} per line.
    #[arg(long)]
    task: PathBuf,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Prompts generated together.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Only the first N examples.
    #[arg(long)]
    limit: Option<usize>,
    /// Per-example outputs (JSONL: prompt, prediction, references).
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long)]
    json: bool,
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

fn read_files(f: &MetricFiles, rstrip: bool) -> anyhow::Result<(Vec<String>, Vec<Vec<String>>)> {
    let hyps = kiln_eval::read_segments(&f.hyp, rstrip)?;
    let refs = f.refs.iter().map(|r| kiln_eval::read_segments(r, rstrip)).collect::<Result<Vec<_>, _>>()?;
    Ok((hyps, refs))
}

pub fn run(c: &EvalCmd) -> anyhow::Result<()> {
    match c {
        EvalCmd::Ppl(a) => ppl(a),
        EvalCmd::Bleu(a) => {
            let (hyps, refs) = read_files(&a.files, true)?;
            let tokenize: BleuTokenize = a.tokenize.parse().map_err(|e| usage(format!("{e}")))?;
            let smooth = Smoothing::parse(&a.smooth, a.smooth_value).map_err(|e| usage(format!("{e}")))?;
            let opts = BleuOptions { tokenize, lowercase: a.lowercase, smooth, effective_order: false };
            let s = kiln_eval::corpus_bleu(&hyps, &refs, &opts)?;
            if a.files.json {
                println!("{}", serde_json::to_string(&s)?);
            } else {
                let p: Vec<String> = s.precisions.iter().map(|x| format!("{x:.1}")).collect();
                println!(
                    "BLEU = {:.2} {} (BP = {:.3} ratio = {:.3} hyp_len = {} ref_len = {})",
                    s.score,
                    p.join("/"),
                    s.bp,
                    s.sys_len as f64 / s.ref_len.max(1) as f64,
                    s.sys_len,
                    s.ref_len
                );
                println!("{}", s.signature);
            }
            Ok(())
        }
        EvalCmd::Chrf(a) => {
            let (hyps, refs) = read_files(&a.files, true)?;
            let s = kiln_eval::corpus_chrf(&hyps, &refs, a.word_order)?;
            if a.files.json {
                println!("{}", serde_json::to_string(&s)?);
            } else {
                println!("{} = {:.2}\n{}", s.name, s.score, s.signature);
            }
            Ok(())
        }
        EvalCmd::Rouge(a) => {
            let (mut hyps, mut refs) = read_files(&a.files, false)?;
            if let Some(sep) = &a.lsum_sep {
                for line in hyps.iter_mut().chain(refs.iter_mut().flatten()) {
                    *line = line.replace(sep.as_str(), "\n");
                }
            }
            let boot = (a.bootstrap > 0).then_some((a.bootstrap, 0));
            let r = kiln_eval::corpus_rouge(&hyps, &refs, a.stem, boot)?;
            if a.files.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                let v = serde_json::to_value(&r)?;
                println!("{:10} {:>9} {:>9} {:>9}", "", "precision", "recall", "fmeasure");
                for key in ["rouge1", "rouge2", "rougeL", "rougeLsum"] {
                    let s = &v[key];
                    println!(
                        "{key:10} {:9.4} {:9.4} {:9.4}",
                        s["precision"].as_f64().unwrap_or(f64::NAN),
                        s["recall"].as_f64().unwrap_or(f64::NAN),
                        s["fmeasure"].as_f64().unwrap_or(f64::NAN)
                    );
                }
                println!("({} examples; rouge-score {})", r.n_examples, kiln_eval::ROUGE_SCORE_VERSION);
            }
            Ok(())
        }
        EvalCmd::Task(a) => task(a),
        EvalCmd::Logits(a) => logits(a),
    }
}

fn ppl(a: &PplArgs) -> anyhow::Result<()> {
    let (mut model, tok) = crate::load::model_and_tokenizer(&a.ckpt)?;
    if a.integer_only {
        model = crate::load::model_maybe_integer(&a.ckpt, true, a.calib.as_deref())?;
    }
    let text =
        std::fs::read_to_string(&a.data).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", a.data.display()))?;
    let ids = tok.encode(&text)?;
    let ctx = a.ctx.unwrap_or(model.context_len());
    let stride = a.stride.unwrap_or(ctx.div_ceil(2));
    let pb = if a.json { indicatif::ProgressBar::hidden() } else { ui::bar(ids.len() as u64, "tokens") };
    let r =
        kiln_eval::perplexity(model.as_mut(), &CpuKernels::default(), &ids, text.len(), ctx, stride, &mut |d, _| {
            pb.set_position(d as u64)
        })
        .map_err(|e| usage(e.to_string()))?;
    pb.finish_and_clear();
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "perplexity {:.4}  ({:.4} nats/token, {:.4} bits/byte) over {} tokens, window {} stride {}",
            r.ppl, r.nll, r.bpb, r.tokens, r.ctx, r.stride
        );
    }
    Ok(())
}

fn task(a: &TaskArgs) -> anyhow::Result<()> {
    let (mut model, tok) = crate::load::model_and_tokenizer(&a.ckpt)?;
    let mut examples = kiln_eval::read_task(&a.task)?;
    if let Some(n) = a.limit {
        examples.truncate(n);
    }
    let start = std::time::Instant::now();
    let pb = if a.json { indicatif::ProgressBar::hidden() } else { ui::bar(examples.len() as u64, "examples") };
    let preds = kiln_eval::generate_answers(
        model.as_mut(),
        &CpuKernels::default(),
        &tok,
        &examples,
        a.max_new_tokens,
        a.batch,
        &mut |d, _| pb.set_position(d as u64),
    )?;
    pb.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    let report = kiln_eval::score_task(&preds, &examples)?;
    if let Some(out) = &a.out {
        let mut text = String::new();
        for (p, e) in preds.iter().zip(&examples) {
            let line = serde_json::json!({"prompt": e.prompt, "prediction": p, "references": e.references});
            text.push_str(&line.to_string());
            text.push('\n');
        }
        kiln_model::write_atomic(out, text.as_bytes())?;
    }
    if a.json {
        let mut v = serde_json::to_value(&report)?;
        v["seconds"] = secs.into();
        println!("{v}");
    } else {
        println!("{} examples in {:.1} s", report.examples, secs);
        println!("BLEU   {:.2}   {}", report.bleu.score, report.bleu.signature);
        println!("{:6} {:.2}   {}", report.chrf.name, report.chrf.score, report.chrf.signature);
        let r = serde_json::to_value(&report.rouge)?;
        println!(
            "ROUGE-1/2/L F {:.4} / {:.4} / {:.4}",
            r["rouge1"]["fmeasure"].as_f64().unwrap_or(f64::NAN),
            r["rouge2"]["fmeasure"].as_f64().unwrap_or(f64::NAN),
            r["rougeL"]["fmeasure"].as_f64().unwrap_or(f64::NAN)
        );
        println!("exact match {:.2}%", 100.0 * report.exact_match);
        if let Some(out) = &a.out {
            println!("per-example outputs: {}", out.display());
        }
    }
    Ok(())
}

fn logits(a: &LogitsArgs) -> anyhow::Result<()> {
    let ids: Vec<u32> = a
        .ids
        .split(',')
        .map(|s| s.trim().parse::<u32>().map_err(|_| usage(format!("--ids: '{s}' is not a token id"))))
        .collect::<Result<_, _>>()?;
    let mut model = crate::load::model(&a.ckpt)?;
    let v = model.vocab_size();
    let logits = model.sequence_logits(&CpuKernels::default(), &ids)?;
    let bytes = kiln_model::safetensors_bytes(&[("logits".into(), vec![ids.len(), v], logits)], Some(HashMap::new()))?;
    kiln_model::write_atomic(&a.out, &bytes)?;
    println!("wrote {} ([{}, {v}])", a.out.display(), ids.len());
    Ok(())
}
