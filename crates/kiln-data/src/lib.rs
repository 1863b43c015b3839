//! kiln-data: tokenizers, text → token shards, deterministic batches, and a synthetic corpus.
//!
//! - [`Tokenizer`]: load any Hugging Face `tokenizer.json`, or train a GPT-2 style byte-level
//!   BPE (`<|endoftext|>` gets the last id).
//! - [`prepare`]: stream text files into `train.bin` / `val.bin` ([`TokenShard`] format) plus
//!   `meta.json`; [`Dataset`] opens the result.
//! - [`BatchSampler`] (seeded, resumable random windows) and [`eval_batches`] (fixed windows).
//! - [`synthetic`]: the built-in demo corpus.
//!
//! The crate never prints: it returns [`DataError`] and reports progress through callbacks.

mod atomic;
mod error;
mod pairs;
mod prepare;
mod sampler;
mod shard;
pub mod synthetic;
mod tokenizer;

pub use error::DataError;
pub use pairs::{read_lines, write_pairs_task, write_pairs_text, PairFormat};
pub use prepare::{prepare, Dataset, PrepareOptions, PrepareSummary};
pub use sampler::{eval_batches, BatchSampler, EvalBatch, SamplerState};
pub use shard::{ShardWriter, TokenShard};
pub use tokenizer::{Tokenizer, EOT_TOKEN, MIN_TRAIN_VOCAB};
