//! kiln-eval: evaluation, benchmarks, plots and reports.
//!
//! Currently provides training-loss plots ([`plot`]): read metrics JSONL files written by the
//! trainer and draw loss curves as SVG and PNG, with no system libraries or system fonts needed.

use std::path::PathBuf;

pub mod plot;

pub use plot::{read_metrics, render_svg, write_png, write_svg, LossCurves, Series};

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
}
