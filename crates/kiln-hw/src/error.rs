//! Errors of the hardware mapper: every one names what was wrong and where.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum HwError {
    /// A target description that cannot be parsed (bad TOML, unknown field, wrong type).
    #[error("target '{name}': {msg}")]
    Parse { name: String, msg: String },
    /// A target description that parses but describes impossible hardware.
    #[error("target '{name}': {msg}")]
    Invalid { name: String, msg: String },
    #[error("unknown target '{0}' (built-ins: {1}; or pass a path to a .toml file)")]
    UnknownTarget(String, String),
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// A model shape or workload that cannot be mapped (zero sizes, heads that do not divide).
    #[error("model shape: {0}")]
    Shape(String),
    /// A request the target cannot serve (a precision it does not support, a dataflow it lacks).
    #[error("target '{target}': {msg}")]
    Unsupported { target: String, msg: String },
}

pub type Result<T> = std::result::Result<T, HwError>;
