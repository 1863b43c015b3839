mod common;

use common::trained;
use kiln_data::{prepare, synthetic, DataError, Dataset, PrepareOptions, TokenShard, Tokenizer};
use std::path::Path;

fn opts(val_fraction: f64, chunk_bytes: usize) -> PrepareOptions {
    PrepareOptions { val_fraction, chunk_bytes, append_eot_per_file: true }
}

fn run(patterns: &[String], out: &Path, o: &PrepareOptions) -> Result<kiln_data::PrepareSummary, DataError> {
    prepare(patterns, trained(), out, o, &mut |_, _| {})
}

fn tokens(shard: &TokenShard) -> Vec<u32> {
    let mut v = vec![0; shard.len()];
    shard.copy_range(0, &mut v);
    v
}

/// Text whose whitespace makes naive chunking change tokens: blank lines, trailing and
/// leading spaces, CRLF, lines longer than a tiny chunk.
fn tricky_text(seed: u64) -> String {
    let mut s = String::new();
    for (i, line) in synthetic::generate(seed, 20_000).lines().enumerate() {
        match i % 7 {
            0 => s.push_str(&format!("{line}  \n")),
            1 => s.push_str(&format!("\n\n{line}\n")),
            2 => s.push_str(&format!("   {line}\r\n")),
            3 => s.push_str(&format!("{line} {line} {line}\n")),
            4 => s.push_str(&format!("{line}\t\n \n")),
            5 => s.push_str(&format!("🦊 {line} — ünïcödé\n")),
            _ => s.push_str(&format!("{line}\n")),
        }
    }
    s
}

#[test]
fn two_files_via_glob_split_matches_encoding_each_part() {
    let dir = tempfile::tempdir().unwrap();
    let a = synthetic::generate(10, 30_000);
    let b = synthetic::generate(11, 20_000);
    std::fs::write(dir.path().join("a.txt"), &a).unwrap();
    std::fs::write(dir.path().join("b.txt"), &b).unwrap();
    std::fs::write(dir.path().join("ignored.md"), "not matched").unwrap();
    let out = dir.path().join("out");
    let pattern = format!("{}/*.txt", dir.path().display());
    let mut calls = Vec::new();
    let summary = prepare(std::slice::from_ref(&pattern), trained(), &out, &opts(0.3, 4096), &mut |done, total| {
        calls.push((done, total))
    })
    .unwrap();

    let total = (a.len() + b.len()) as u64;
    assert_eq!(summary.files, 2);
    assert_eq!(summary.bytes, total);
    assert_eq!(summary.vocab_size, 600);
    // Progress runs from 0 to total without going back.
    assert_eq!(calls.first(), Some(&(0, total)));
    assert_eq!(calls.last(), Some(&(total, total)));
    assert!(calls.windows(2).all(|w| w[0].0 <= w[1].0));

    // 70% of 50000 bytes = 35000 lies inside b.txt; the split is the next line start there.
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["split"]["file_index"], 1);
    let off = meta["split"]["offset"].as_u64().unwrap() as usize;
    assert!(off >= 35_000 - a.len() && off < 35_000 - a.len() + 200, "{off}");
    assert_eq!(&b[off - 1..off], "\n");
    assert_eq!(meta["train_bytes"].as_u64().unwrap(), (a.len() + off) as u64);

    let tk = trained();
    let eot = tk.eot_id().unwrap();
    let mut want_train = tk.encode(&a).unwrap();
    want_train.push(eot);
    want_train.extend(tk.encode(&b[..off]).unwrap());
    let mut want_val = tk.encode(&b[off..]).unwrap();
    want_val.push(eot);

    let ds = Dataset::open(&out).unwrap();
    assert_eq!(ds.vocab_size, 600);
    assert_eq!(summary.train_tokens, want_train.len() as u64);
    assert_eq!(summary.val_tokens, want_val.len() as u64);
    assert_eq!(tokens(&ds.train), want_train);
    assert_eq!(tokens(&ds.val), want_val);
    // The tokenizer travels with the shards, and no temp files are left.
    assert_eq!(common::listing(&out), vec!["meta.json", "tokenizer.json", "train.bin", "val.bin"]);
}

#[test]
fn tiny_chunks_give_the_same_shards_as_one_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let a = tricky_text(20);
    let b = synthetic::generate(21, 15_000);
    std::fs::write(dir.path().join("a.txt"), &a).unwrap();
    std::fs::write(dir.path().join("b.txt"), &b).unwrap();
    // Trained on the tricky text so it has merges like "  \n", "\t\n" and "\r\n" that a careless
    // cut would split.
    let tk = Tokenizer::train_bpe(&[dir.path().join("a.txt")], 600).unwrap();
    for ws in ["  \n", "\r\n", "\t\n"] {
        assert_eq!(tk.encode(ws).unwrap().len(), 1, "no merge for {ws:?}");
    }
    let patterns = vec![dir.path().join("a.txt").display().to_string(), dir.path().join("b.txt").display().to_string()];
    let small = dir.path().join("small");
    let big = dir.path().join("big");
    prepare(&patterns, &tk, &small, &opts(0.1, 64), &mut |_, _| {}).unwrap();
    prepare(&patterns, &tk, &big, &opts(0.1, 1 << 20), &mut |_, _| {}).unwrap();
    for name in ["train.bin", "val.bin", "meta.json"] {
        let x = std::fs::read(small.join(name)).unwrap();
        let y = std::fs::read(big.join(name)).unwrap();
        assert!(x == y, "{name} differs between chunk sizes");
    }
    // And both equal encoding the whole (tricky) file in one piece.
    let mut want = tk.encode(&a).unwrap();
    want.push(tk.eot_id().unwrap());
    let ds = Dataset::open(&small).unwrap();
    assert_eq!(&tokens(&ds.train)[..want.len()], &want[..]);
}

#[test]
fn val_fraction_zero_puts_everything_in_train() {
    let dir = tempfile::tempdir().unwrap();
    let a = synthetic::generate(30, 5_000);
    std::fs::write(dir.path().join("a.txt"), &a).unwrap();
    let out = dir.path().join("out");
    let o = PrepareOptions { val_fraction: 0.0, chunk_bytes: 1000, append_eot_per_file: false };
    let s = run(&[dir.path().join("a.txt").display().to_string()], &out, &o).unwrap();
    let ds = Dataset::open(&out).unwrap();
    assert_eq!(s.val_tokens, 0);
    assert!(ds.val.is_empty());
    assert_eq!(tokens(&ds.train), trained().encode(&a).unwrap());
}

#[test]
fn errors_are_clear_and_leave_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "hello\n").unwrap();
    let text_pat = vec![text.display().to_string()];

    let e = run(&[], &out, &opts(0.1, 64)).unwrap_err();
    assert!(matches!(e, DataError::NoInput(_)), "{e}");
    let nothing = format!("{}/*.nothing", dir.path().display());
    let e = run(std::slice::from_ref(&nothing), &out, &opts(0.1, 64)).unwrap_err();
    assert!(matches!(e, DataError::NoInput(_)) && e.to_string().contains("*.nothing"), "{e}");

    for vf in [1.0, -0.1, f64::NAN, 2.0] {
        let e = run(&text_pat, &out, &opts(vf, 64)).unwrap_err();
        assert!(e.to_string().contains("val_fraction"), "{e}");
    }
    let e = run(&text_pat, &out, &opts(0.1, 0)).unwrap_err();
    assert!(matches!(e, DataError::InvalidArgument(_)), "{e}");

    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let e = run(&[empty.display().to_string()], &out, &opts(0.1, 64)).unwrap_err();
    assert!(matches!(e, DataError::EmptyCorpus(_)), "{e}");

    let latin1 = dir.path().join("latin1.txt");
    std::fs::write(&latin1, b"caf\xe9\n").unwrap();
    let e = run(&[latin1.display().to_string()], &out, &opts(0.1, 64)).unwrap_err();
    assert!(matches!(e, DataError::InvalidUtf8 { offset: 3, .. }), "{e}");

    // Failed runs leave no shard or temp file behind.
    assert!(!out.exists() || common::listing(&out).is_empty(), "{:?}", common::listing(&out));

    let e = Dataset::open(&dir.path().join("nowhere")).unwrap_err();
    assert!(e.to_string().contains("train.bin"), "{e}");
}
