//! kiln-eval: evaluation, benchmarks, plots and reports.
//!
//! - Training-loss plots ([`plot`]): read metrics JSONL files written by the trainer and draw loss
//!   curves as SVG and PNG, with no system libraries or system fonts needed.
//! - Text-generation metrics that reproduce the reference tools exactly: corpus BLEU ([`bleu`])
//!   and chrF / chrF++ ([`chrf`]) as sacrebleu computes them, and ROUGE-1/2/L/Lsum ([`rouge`]) as
//!   Google's rouge-score computes them. `tools/metrics/compare_metrics.py` checks them against
//!   the Python packages on random corpora.

use std::path::PathBuf;

pub mod bleu;
pub mod chrf;
pub mod perplexity;
pub mod plot;
mod porter;
mod pytext;
pub mod report;
pub mod rouge;
pub mod task;
mod unicode_tables;

/// Reads a hypothesis or reference file as sacrebleu's command line does: UTF-8, one segment per
/// `\n`-terminated line; with `rstrip`, trailing whitespace is removed as Python's `str.rstrip()`.
pub fn read_segments(path: &std::path::Path, rstrip: bool) -> Result<Vec<String>, EvalError> {
    let bytes = std::fs::read(path).map_err(|e| EvalError::Io {
        action: "cannot read",
        path: path.to_path_buf(),
        source: e,
    })?;
    let text =
        String::from_utf8(bytes).map_err(|e| EvalError::MetricInput(format!("{}: not UTF-8: {e}", path.display())))?;
    let mut lines: Vec<&str> = text.split('\n').collect();
    if lines.last() == Some(&"") {
        lines.pop();
    }
    // Python's str.rstrip(): Unicode whitespace plus U+001C..U+001F.
    let strip =
        |s: &str| s.trim_end_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)).to_string();
    Ok(lines.into_iter().map(|l| if rstrip { strip(l) } else { l.to_string() }).collect())
}

pub use bleu::{corpus_bleu, BleuOptions, BleuScore, BleuTokenize, Smoothing, SACREBLEU_VERSION};
pub use chrf::{corpus_chrf, ChrfScore};
pub use perplexity::{logit_agreement, perplexity, LogitAgreement, PplReport};
pub use plot::{read_metrics, render_svg, write_png, write_svg, LossCurves, Series};
pub use report::{render_report, ReportInputs};
pub use rouge::{corpus_rouge, RougeAggregate, RougeReport, RougeScores, RougeType, ROUGE_SCORE_VERSION};
pub use task::{generate_answers, read_task, score_task, TaskExample, TaskReport};

/// Errors from kiln-eval.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EvalError {
    /// Reading or writing a file failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done, e.g. "cannot read metrics file".
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A line of a metrics JSONL file could not be understood.
    #[error("{}: line {line}: {message}", path.display())]
    MetricsLine {
        path: PathBuf,
        /// 1-based line number in the file.
        line: usize,
        message: String,
    },

    /// A metrics file has no line with both `step` and `loss`.
    #[error(
        "{}: no loss values found (expected JSON lines with numeric \"step\" and \"loss\")",
        path.display()
    )]
    NoLoss { path: PathBuf },

    /// The plot could not be drawn or encoded.
    #[error("cannot render plot: {0}")]
    Render(String),

    /// The inputs of a metric do not fit together, e.g. a reference stream with a different
    /// number of segments than the hypotheses, or no reference at all.
    #[error("{0}")]
    MetricInput(String),

    /// A metric option has an invalid value.
    #[error("invalid option: {0}")]
    InvalidOption(String),

    /// Perplexity could not be computed (bad window, too little text, model error).
    #[error("perplexity: {0}")]
    Perplexity(String),

    /// A named option (tokenizer, smoothing method, ROUGE type, ...) is not known.
    #[error("unknown {kind} '{value}' (expected one of: {expected})")]
    UnknownOption { kind: &'static str, value: String, expected: &'static str },
}
