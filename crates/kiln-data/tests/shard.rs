mod common;

use kiln_data::{DataError, ShardWriter, TokenShard};
use std::path::Path;

fn write_shard(path: &Path, vocab: usize, tokens: &[u32]) {
    let mut w = ShardWriter::create(path, vocab).unwrap();
    // Several writes, to exercise streaming.
    for part in tokens.chunks(7) {
        w.write(part).unwrap();
    }
    assert_eq!(w.finish().unwrap(), tokens.len() as u64);
}

fn check_round_trip(vocab: usize, tokens: &[u32], bytes_per_token: usize) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.bin");
    write_shard(&path, vocab, tokens);
    assert_eq!(common::listing(dir.path()), vec!["s.bin"]);

    let raw = std::fs::read(&path).unwrap();
    assert_eq!(&raw[..8], b"KILNTOK1");
    assert_eq!(u32::from_le_bytes(raw[8..12].try_into().unwrap()), 1);
    assert_eq!(u32::from_le_bytes(raw[12..16].try_into().unwrap()) as usize, bytes_per_token);
    assert_eq!(u64::from_le_bytes(raw[16..24].try_into().unwrap()), tokens.len() as u64);
    assert_eq!(raw.len(), 24 + bytes_per_token * tokens.len());

    let shard = TokenShard::open(&path).unwrap();
    assert_eq!(shard.len(), tokens.len());
    assert_eq!(shard.bytes_per_token(), bytes_per_token);
    for (i, &t) in tokens.iter().enumerate() {
        assert_eq!(shard.get(i), t);
    }
    let mut all = vec![0u32; tokens.len()];
    shard.copy_range(0, &mut all);
    assert_eq!(all, tokens);
    if tokens.len() >= 8 {
        let mut mid = vec![0u32; 5];
        shard.copy_range(3, &mut mid);
        assert_eq!(mid, &tokens[3..8]);
    }
    assert_eq!(shard.max_token(), *tokens.iter().max().unwrap());
}

#[test]
fn u16_round_trip() {
    let tokens: Vec<u32> = (0..1000u32).map(|i| (i * 7919) % 65536).chain([65535, 0]).collect();
    check_round_trip(65536, &tokens, 2);
}

#[test]
fn u32_round_trip() {
    let tokens: Vec<u32> = (0..1000u32).map(|i| (i * 7919) % 70000).chain([69_999, 65_536]).collect();
    check_round_trip(70000, &tokens, 4);
    // A 4-byte shard holds any u32.
    check_round_trip(usize::MAX, &[u32::MAX, 0, 12345678], 4);
}

#[test]
fn empty_shard() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("e.bin");
    write_shard(&path, 50257, &[]);
    let shard = TokenShard::open(&path).unwrap();
    assert!(shard.is_empty());
    assert_eq!(shard.max_token(), 0);
}

#[test]
fn u16_writer_rejects_wide_token_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.bin");
    let mut w = ShardWriter::create(&path, 50257).unwrap();
    w.write(&[1, 2, 3]).unwrap();
    let e = w.write(&[70000]).unwrap_err();
    assert!(e.to_string().contains("70000"), "{e}");
    drop(w);
    // An unfinished writer removes its temp file and never creates the target.
    assert!(common::listing(dir.path()).is_empty());
}

#[test]
fn truncated_and_corrupt_shards_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.bin");
    write_shard(&path, 50257, &(0..100).collect::<Vec<_>>());
    let good = std::fs::read(&path).unwrap();

    let cases: Vec<(Vec<u8>, &str)> = vec![
        (good[..good.len() - 1].to_vec(), "truncated"),
        (good[..24 + 100].to_vec(), "truncated"),
        (good[..10].to_vec(), "header"),
        ([&good[..], &[0, 0]].concat(), "bytes follow"),
        ([b"KILNTOK2", &good[8..]].concat(), "magic"),
        ([&good[..8], &7u32.to_le_bytes(), &good[12..]].concat(), "version 7"),
        ([&good[..12], &3u32.to_le_bytes(), &good[16..]].concat(), "bytes per token"),
        ([&good[..16], &u64::MAX.to_le_bytes(), &good[24..]].concat(), "large"),
    ];
    for (bytes, needle) in cases {
        let bad = dir.path().join("bad.bin");
        std::fs::write(&bad, &bytes).unwrap();
        let e = TokenShard::open(&bad).unwrap_err();
        assert!(matches!(e, DataError::BadShard { .. }), "{e}");
        assert!(e.to_string().contains(needle), "'{e}' lacks '{needle}'");
    }
    let e = TokenShard::open(&dir.path().join("missing.bin")).unwrap_err();
    assert!(e.to_string().contains("missing.bin"), "{e}");
}
