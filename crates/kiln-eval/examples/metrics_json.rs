//! Scores a hypothesis file against reference files and prints one JSON object.
//!
//! ```text
//! cargo run -q -p kiln-eval --example metrics_json -- --metric bleu|chrf|chrf++|rouge \
//!     --hyp HYP.txt --ref REF.txt [--ref REF2.txt ...] [--tokenize 13a|none|intl|char|zh] \
//!     [--lowercase] [--smooth exp|floor|add-k|none] [--smooth-value V] [--stem] \
//!     [--lsum-sep STR] [--bootstrap N] [--seed S] [--segments]
//! ```
//!
//! Files are read as sacrebleu's command line reads them: UTF-8, one segment per `\n`-terminated
//! line; for BLEU and chrF each line is right-stripped of whitespace. For ROUGE the lines are used
//! as they are, except that `--lsum-sep STR` turns every `STR` into a newline, so that ROUGE-Lsum
//! sees several sentences per summary (e.g. `--lsum-sep '<n>'`). `--segments` adds the score of
//! every segment on its own (BLEU and chrF: the corpus score of that one segment; ROUGE: the
//! per-example scores). This is a stand-in for `kiln eval` until the CLI is wired up.

use std::process::ExitCode;

use kiln_eval::rouge::score_multi;
use kiln_eval::{corpus_bleu, corpus_chrf, corpus_rouge, BleuOptions, BleuTokenize, RougeType, Smoothing};
use serde_json::{json, Value};

#[derive(Default)]
struct Args {
    metric: String,
    hyp: Option<String>,
    refs: Vec<String>,
    tokenize: Option<String>,
    lowercase: bool,
    smooth: Option<String>,
    smooth_value: Option<f64>,
    stem: bool,
    lsum_sep: Option<String>,
    bootstrap: Option<usize>,
    seed: u64,
    segments: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args::default();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--metric" => a.metric = value()?,
            "--hyp" => a.hyp = Some(value()?),
            "--ref" => a.refs.push(value()?),
            "--tokenize" => a.tokenize = Some(value()?),
            "--lowercase" => a.lowercase = true,
            "--smooth" => a.smooth = Some(value()?),
            "--smooth-value" => a.smooth_value = Some(value()?.parse().map_err(|e| format!("--smooth-value: {e}"))?),
            "--stem" => a.stem = true,
            "--lsum-sep" => a.lsum_sep = Some(value()?),
            "--bootstrap" => a.bootstrap = Some(value()?.parse().map_err(|e| format!("--bootstrap: {e}"))?),
            "--seed" => a.seed = value()?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--segments" => a.segments = true,
            other => return Err(format!("unknown argument '{other}'")),
        }
    }
    if a.hyp.is_none() || a.refs.is_empty() || a.metric.is_empty() {
        return Err("usage: metrics_json --metric bleu|chrf|chrf++|rouge --hyp FILE --ref FILE [--ref FILE ...]".into());
    }
    Ok(a)
}

fn read_lines(path: &str, rstrip: bool) -> Result<Vec<String>, String> {
    kiln_eval::read_segments(std::path::Path::new(path), rstrip).map_err(|e| e.to_string())
}

fn run(a: &Args) -> Result<Value, Box<dyn std::error::Error>> {
    let rouge = a.metric == "rouge";
    let hyp_path = a.hyp.as_deref().unwrap_or_default();
    let mut hyps = read_lines(hyp_path, !rouge)?;
    let mut refs = a.refs.iter().map(|r| read_lines(r, !rouge)).collect::<Result<Vec<_>, _>>()?;
    match a.metric.as_str() {
        "bleu" => {
            let tokenize = match &a.tokenize {
                Some(t) => t.parse::<BleuTokenize>()?,
                None => BleuTokenize::default(),
            };
            let smooth = Smoothing::parse(a.smooth.as_deref().unwrap_or("exp"), a.smooth_value)?;
            let opts = BleuOptions { tokenize, lowercase: a.lowercase, smooth, effective_order: false };
            let mut out = serde_json::to_value(corpus_bleu(&hyps, &refs, &opts)?)?;
            if a.segments {
                let segs = (0..hyps.len())
                    .map(|i| {
                        let r: Vec<Vec<String>> = refs.iter().map(|s| vec![s[i].clone()]).collect();
                        corpus_bleu(&hyps[i..=i], &r, &opts).map(serde_json::to_value)
                    })
                    .collect::<Result<Result<Vec<_>, _>, _>>()??;
                out["segments"] = Value::Array(segs);
            }
            Ok(out)
        }
        "chrf" | "chrf++" => {
            let word_order = if a.metric == "chrf" { 0 } else { 2 };
            let mut out = serde_json::to_value(corpus_chrf(&hyps, &refs, word_order)?)?;
            if a.segments {
                let segs = (0..hyps.len())
                    .map(|i| {
                        let r: Vec<Vec<String>> = refs.iter().map(|s| vec![s[i].clone()]).collect();
                        corpus_chrf(&hyps[i..=i], &r, word_order).map(|s| s.score)
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                out["segments"] = json!(segs);
            }
            Ok(out)
        }
        "rouge" => {
            if let Some(sep) = &a.lsum_sep {
                for line in hyps.iter_mut().chain(refs.iter_mut().flatten()) {
                    *line = line.replace(sep.as_str(), "\n");
                }
            }
            let bootstrap = a.bootstrap.map(|n| (n, a.seed));
            let mut out = serde_json::to_value(corpus_rouge(&hyps, &refs, a.stem, bootstrap)?)?;
            if a.segments {
                let segs: Vec<Value> = (0..hyps.len())
                    .map(|i| {
                        let targets: Vec<&str> = refs.iter().map(|s| s[i].as_str()).collect();
                        serde_json::to_value(score_multi(&targets, &hyps[i], &RougeType::ALL, a.stem))
                    })
                    .collect::<Result<_, _>>()?;
                out["segments"] = Value::Array(segs);
            }
            Ok(out)
        }
        other => Err(format!("unknown metric '{other}' (expected bleu, chrf, chrf++ or rouge)").into()),
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("metrics_json: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(v) => {
            use std::io::Write as _;
            // A closed pipe (e.g. `| head`) is not an error worth a panic.
            let _ = writeln!(std::io::stdout().lock(), "{v}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("metrics_json: {e}");
            ExitCode::FAILURE
        }
    }
}
