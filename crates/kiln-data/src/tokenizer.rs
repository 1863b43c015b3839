//! Tokenizers: load any Hugging Face `tokenizer.json`, or train a GPT-2 style byte-level BPE.

use crate::atomic::write_atomic;
use crate::DataError;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, ProgressFormat, TokenizerBuilder, TokenizerImpl};

/// The end-of-text token, as GPT-2 spells it.
pub const EOT_TOKEN: &str = "<|endoftext|>";

/// Smallest vocabulary `train_bpe` accepts: 256 byte tokens, at least 8 merges, and `<|endoftext|>`.
pub const MIN_TRAIN_VOCAB: usize = 256 + 8 + 1;

/// A text tokenizer: a thin wrapper over `tokenizers::Tokenizer`.
#[derive(Clone, Debug)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json` (GPT-2's, Llama's, or one saved by `save`).
    pub fn from_file(path: &Path) -> Result<Tokenizer, DataError> {
        let json = std::fs::read_to_string(path).map_err(|e| DataError::io("reading tokenizer", path, e))?;
        Self::parse(&json, &path.display().to_string())
    }

    /// Parses the contents of a `tokenizer.json`.
    pub fn from_json_str(json: &str) -> Result<Tokenizer, DataError> {
        Self::parse(json, "(from JSON string)")
    }

    fn parse(json: &str, origin: &str) -> Result<Tokenizer, DataError> {
        let inner = tokenizers::Tokenizer::from_str(json)
            .map_err(|e| DataError::InvalidTokenizer { origin: origin.to_string(), message: e.to_string() })?;
        Ok(Tokenizer { inner })
    }

    /// Trains a GPT-2 style byte-level BPE on the text files.
    ///
    /// ByteLevel pre-tokenizer (GPT-2 regex, `add_prefix_space = false`), ByteLevel decoder, and
    /// all 256 byte symbols in the initial alphabet, so any UTF-8 text encodes and decodes back
    /// exactly. `<|endoftext|>` is added after training, so its id is the **last** one
    /// (`vocab_size() - 1`), as in GPT-2 (50256).
    ///
    /// `vocab_size` counts `<|endoftext|>`. On a small corpus BPE runs out of pairs to merge and
    /// the vocabulary comes out smaller than asked; it is never larger.
    pub fn train_bpe(files: &[PathBuf], vocab_size: usize) -> Result<Tokenizer, DataError> {
        if files.is_empty() {
            return Err(DataError::NoInput("no files given to train the tokenizer on".into()));
        }
        if vocab_size < MIN_TRAIN_VOCAB {
            return Err(DataError::InvalidArgument(format!(
                "vocab_size {vocab_size} is too small for byte-level BPE: need at least \
                 {MIN_TRAIN_VOCAB} (256 byte tokens + 8 merges + <|endoftext|>)"
            )));
        }
        let mut total = 0u64;
        let mut names = Vec::with_capacity(files.len());
        for f in files {
            let meta = std::fs::metadata(f).map_err(|e| DataError::io("reading", f, e))?;
            if !meta.is_file() {
                return Err(DataError::NoInput(format!("{} is not a file", f.display())));
            }
            total += meta.len();
            // The trainer API takes String paths; refuse names it cannot represent.
            let name = f
                .to_str()
                .ok_or_else(|| DataError::InvalidArgument(format!("path {} is not valid UTF-8", f.display())))?;
            names.push(name.to_string());
        }
        if total == 0 {
            return Err(DataError::EmptyCorpus(format!(
                "the {} tokenizer training file(s) are all empty",
                files.len()
            )));
        }

        let alphabet: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
        let mut trainer = BpeTrainerBuilder::new()
            .show_progress(false)
            .progress_format(ProgressFormat::Silent)
            // One slot is kept for <|endoftext|>, added after training so it lands last.
            .vocab_size(vocab_size - 1)
            .initial_alphabet(alphabet)
            .build();
        let mut tk: TokenizerImpl<BPE, NormalizerWrapper, ByteLevel, ByteLevel, ByteLevel> = TokenizerBuilder::new()
            .with_model(BPE::default())
            .with_normalizer(None)
            .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
            .with_post_processor(Some(ByteLevel::new(false, true, true)))
            .with_decoder(Some(ByteLevel::new(false, true, true)))
            .build()
            .map_err(|e| tk_err("building the tokenizer", e))?;
        tk.train_from_files(&mut trainer, names).map_err(|e| tk_err("training BPE", e))?;
        tk.add_special_tokens([AddedToken::from(EOT_TOKEN, true)]).map_err(|e| tk_err("adding <|endoftext|>", e))?;

        // The generic TokenizerImpl converts into the type-erased wrapper loaded files use.
        let inner: tokenizers::Tokenizer = tk.into();
        Ok(Tokenizer { inner })
    }

    /// Writes `tokenizer.json` atomically (pretty-printed, loadable by Hugging Face).
    pub fn save(&self, path: &Path) -> Result<(), DataError> {
        write_atomic(path, self.to_json_string()?.as_bytes())
    }

    /// The `tokenizer.json` text.
    pub fn to_json_string(&self) -> Result<String, DataError> {
        self.inner.to_string(true).map_err(|e| tk_err("serializing", e))
    }

    /// Number of token ids, counting added tokens such as `<|endoftext|>`.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids for `text`, without any BOS/EOS a post-processor would add.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, DataError> {
        // encode_fast skips char-offset bookkeeping we never read.
        let enc = self.inner.encode_fast(text, false).map_err(|e| tk_err("encoding", e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text for `ids`; special tokens are kept so encode→decode is exact.
    pub fn decode(&self, ids: &[u32]) -> Result<String, DataError> {
        // The library silently drops unknown ids; an id the model lacks is a caller bug worth naming.
        if let Some(&bad) = ids.iter().find(|&&id| self.inner.id_to_token(id).is_none()) {
            return Err(DataError::InvalidArgument(format!(
                "token id {bad} is not in this tokenizer's vocabulary of {}",
                self.vocab_size()
            )));
        }
        self.inner.decode(ids, false).map_err(|e| tk_err("decoding", e))
    }

    /// The id of `<|endoftext|>`, if this tokenizer has it.
    pub fn eot_id(&self) -> Option<u32> {
        self.inner.token_to_id(EOT_TOKEN)
    }
}

fn tk_err(action: &'static str, e: impl std::fmt::Display) -> DataError {
    DataError::Tokenizer { action, message: e.to_string() }
}
