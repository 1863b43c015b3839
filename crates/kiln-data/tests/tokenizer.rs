mod common;

use common::trained;
use kiln_data::{synthetic, DataError, Tokenizer};
use std::collections::HashSet;
use std::path::PathBuf;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, TokenizerBuilder, TokenizerImpl};

const AWKWARD: &[&str] = &[
    "",
    "hello world",
    "the old fox watches a small bird near the river.\n",
    "  leading and trailing spaces  ",
    "tabs\tand\r\nwindows line ends\r\n\n\n",
    "emoji 🦊🐦🔥 and ZWJ 👩‍👩‍👧 family",
    "日本語のテキスト, Ελληνικά, русский, עברית, العربية",
    "numbers 1234567890 and symbols !@#$%^&*()_+{}|:\"<>?~`",
    "literal <|endoftext|> in the middle<|endoftext|>",
    "\u{0}\u{1}\u{7f} control chars and \u{feff} BOM and \u{10ffff}",
    "combining e\u{301} vs é",
];

#[test]
fn trained_bpe_round_trips_arbitrary_utf8() {
    let tk = trained();
    for text in AWKWARD {
        let ids = tk.encode(text).unwrap();
        assert_eq!(&tk.decode(&ids).unwrap(), text, "ids {ids:?}");
    }
    // Merges must actually compress corpus-like text, or training did nothing.
    let line = "the old fox watches a small bird near the river.";
    assert!(tk.encode(line).unwrap().len() < line.len() / 2);
}

#[test]
fn vocab_size_is_requested_size_with_eot_last() {
    let tk = trained();
    assert_eq!(tk.vocab_size(), 600);
    assert_eq!(tk.eot_id(), Some(599));
    assert_eq!(tk.encode("<|endoftext|>").unwrap(), vec![599]);
}

#[test]
fn tiny_corpus_stops_early_but_stays_sane() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.txt");
    std::fs::write(&path, "ab ab ab abc\n").unwrap();
    let tk = Tokenizer::train_bpe(&[path], 5000).unwrap();
    let n = tk.vocab_size();
    assert!(n > 257 && n < 300, "vocab {n}");
    assert_eq!(tk.eot_id(), Some(n as u32 - 1));
    let text = "a completely different text 🙂\n";
    assert_eq!(tk.decode(&tk.encode(text).unwrap()).unwrap(), text);
}

#[test]
fn save_and_load_give_identical_ids() {
    let tk = trained();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    tk.save(&path).unwrap();
    // Atomic save leaves no temp file behind.
    assert_eq!(common::listing(dir.path()), vec!["tokenizer.json"]);
    let loaded = Tokenizer::from_file(&path).unwrap();
    let from_str = Tokenizer::from_json_str(&tk.to_json_string().unwrap()).unwrap();
    let text = synthetic::generate(99, 5000) + "🦊 <|endoftext|> x";
    let ids = tk.encode(&text).unwrap();
    assert_eq!(loaded.encode(&text).unwrap(), ids);
    assert_eq!(from_str.encode(&text).unwrap(), ids);
    assert_eq!(loaded.vocab_size(), tk.vocab_size());
    assert_eq!(loaded.eot_id(), tk.eot_id());
}

#[test]
fn loads_tokenizer_saved_by_the_tokenizers_crate() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("c.txt");
    std::fs::write(&corpus, "hello world, hello there, world of hello\n".repeat(20)).unwrap();
    let alphabet: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(280)
        .initial_alphabet(alphabet)
        .special_tokens(vec![AddedToken::from("<|endoftext|>", true)])
        .build();
    let mut reference: TokenizerImpl<BPE, NormalizerWrapper, ByteLevel, ByteLevel, ByteLevel> = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None)
        .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
        .with_post_processor(Some(ByteLevel::default()))
        .with_decoder(Some(ByteLevel::default()))
        .build()
        .unwrap();
    reference.train_from_files(&mut trainer, vec![corpus.to_str().unwrap().to_string()]).unwrap();
    let path = dir.path().join("tokenizer.json");
    reference.save(&path, false).unwrap();

    let tk = Tokenizer::from_file(&path).unwrap();
    // Special tokens given to the trainer come first: here the eot id is 0.
    assert_eq!(tk.eot_id(), Some(0));
    assert_eq!(tk.vocab_size(), reference.get_vocab_size(true));
    for text in ["hello world", "hello<|endoftext|>world 🌍\n"] {
        let want = reference.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(tk.encode(text).unwrap(), want);
        assert_eq!(tk.decode(&want).unwrap(), text);
    }
}

/// GPT-2's byte → printable-char table (the `bytes_to_unicode` of openai/gpt-2).
fn bytes_to_unicode() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec!['\0'; 256];
    for (b, c) in bs.iter().zip(cs) {
        table[*b as usize] = char::from_u32(c).unwrap();
    }
    table
}

#[test]
fn loads_handwritten_gpt2_format_json() {
    // Same layout as GPT-2's tokenizer.json: byte vocab, string merges, eot as the last id.
    let table = bytes_to_unicode();
    let mut vocab: Vec<String> = table.iter().map(|c| c.to_string()).collect();
    let merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d"];
    for m in merges {
        vocab.push(m.replace(' ', ""));
    }
    let vocab_json: serde_json::Map<String, serde_json::Value> =
        vocab.iter().enumerate().map(|(i, t)| (t.clone(), serde_json::Value::from(i))).collect();
    let eot = vocab.len();
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{"id": eot, "content": "<|endoftext|>", "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": true, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
            "use_regex": true},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false,
            "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
            "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": false,
            "byte_fallback": false, "vocab": vocab_json, "merges": merges}
    });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, serde_json::to_string(&json).unwrap()).unwrap();
    let tk = Tokenizer::from_file(&path).unwrap();
    assert_eq!(tk.vocab_size(), eot + 1);
    assert_eq!(tk.eot_id(), Some(eot as u32));
    let hello = vocab.iter().position(|t| t == "hello").unwrap() as u32;
    let world = vocab.iter().position(|t| t == "Ġworld").unwrap() as u32;
    let bang = vocab.iter().position(|t| t == "!").unwrap() as u32;
    assert_eq!(tk.encode("hello world!<|endoftext|>").unwrap(), vec![hello, world, bang, eot as u32]);
    assert_eq!(tk.decode(&[hello, world, bang]).unwrap(), "hello world!");
}

#[test]
fn clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.json");
    let e = Tokenizer::from_file(&missing).unwrap_err();
    assert!(matches!(e, DataError::Io { .. }), "{e}");
    assert!(e.to_string().contains("nope.json"), "{e}");

    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{\"model\": 3}").unwrap();
    let e = Tokenizer::from_file(&bad).unwrap_err();
    assert!(matches!(e, DataError::InvalidTokenizer { .. }), "{e}");
    assert!(e.to_string().contains("bad.json"), "{e}");
    assert!(Tokenizer::from_json_str("not json").is_err());

    let e = Tokenizer::train_bpe(&[], 1000).unwrap_err();
    assert!(matches!(e, DataError::NoInput(_)), "{e}");
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let e = Tokenizer::train_bpe(std::slice::from_ref(&empty), 1000).unwrap_err();
    assert!(matches!(e, DataError::EmptyCorpus(_)), "{e}");
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "some text\n").unwrap();
    let e = Tokenizer::train_bpe(std::slice::from_ref(&text), 257).unwrap_err();
    assert!(matches!(e, DataError::InvalidArgument(_)), "{e}");
    let e = Tokenizer::train_bpe(&[PathBuf::from("/definitely/not/here.txt")], 1000).unwrap_err();
    assert!(e.to_string().contains("/definitely/not/here.txt"), "{e}");

    let e = trained().decode(&[1_000_000]).unwrap_err();
    assert!(e.to_string().contains("1000000"), "{e}");
}
