//! Shared test helpers.
#![allow(dead_code)]

use kiln_data::{synthetic, Tokenizer};
use std::path::Path;
use std::sync::OnceLock;

/// A BPE tokenizer trained once per test binary on 200 KB of synthetic text.
pub fn trained() -> &'static Tokenizer {
    static TK: OnceLock<Tokenizer> = OnceLock::new();
    TK.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("corpus.txt");
        synthetic::write_corpus(1, 200_000, &path).unwrap();
        Tokenizer::train_bpe(&[path], 600).unwrap()
    })
}

/// Names of the files in `dir`, sorted.
pub fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}
