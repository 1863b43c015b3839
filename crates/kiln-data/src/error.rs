//! The one error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong reading, tokenizing, sharding or sampling data.
///
/// Messages name the file and say what was expected, so the CLI can print them as they are.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// An operating-system error on a file, with what we were doing to which path.
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A tokenizer.json that could not be read as a Hugging Face tokenizer.
    #[error("invalid tokenizer {origin}: {message}")]
    InvalidTokenizer { origin: String, message: String },

    /// An error reported by the `tokenizers` crate while training, encoding or decoding.
    #[error("tokenizer error while {action}: {message}")]
    Tokenizer { action: &'static str, message: String },

    /// A caller-supplied value out of its allowed range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// No input files: an empty list, or a glob pattern that matched nothing.
    #[error("no input: {0}")]
    NoInput(String),

    /// Inputs that exist but hold nothing to tokenize.
    #[error("empty corpus: {0}")]
    EmptyCorpus(String),

    /// A text file that is not UTF-8.
    #[error("{path} is not valid UTF-8 (first bad byte near offset {offset})")]
    InvalidUtf8 { path: PathBuf, offset: u64 },

    /// A token shard whose header or size is wrong.
    #[error("bad token shard {path}: {reason}")]
    BadShard { path: PathBuf, reason: String },

    /// A dataset directory that lacks a file or whose meta.json is wrong.
    #[error("bad dataset {path}: {reason}")]
    BadDataset { path: PathBuf, reason: String },

    /// A token shard too short to cut one training sequence from.
    #[error("corpus of {tokens} tokens is smaller than one sequence of {needed} (seq_len {seq} + 1)")]
    CorpusTooSmall { tokens: usize, needed: usize, seq: usize },
}

impl DataError {
    /// Wraps an io::Error with the action and path, so every io failure names its file.
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io { action, path: path.into(), source }
    }
}
