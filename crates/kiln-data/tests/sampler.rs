use kiln_data::{eval_batches, BatchSampler, DataError, SamplerState, ShardWriter, TokenShard};
use std::path::Path;

/// A shard holding 0, 1, 2, ..., n-1: a window's first token is its offset.
fn counting_shard(dir: &Path, n: u32) -> TokenShard {
    let path = dir.join(format!("count{n}.bin"));
    let mut w = ShardWriter::create(&path, 70_000).unwrap();
    w.write(&(0..n).collect::<Vec<_>>()).unwrap();
    w.finish().unwrap();
    TokenShard::open(&path).unwrap()
}

fn draw(s: &mut BatchSampler, shard: &TokenShard, b: usize, t: usize) -> (Vec<u32>, Vec<u32>) {
    let mut x = vec![0; b * t];
    let mut y = vec![0; b * t];
    s.next_batch(shard, &mut x, &mut y).unwrap();
    (x, y)
}

#[test]
fn windows_are_contiguous_and_targets_shifted() {
    let dir = tempfile::tempdir().unwrap();
    let shard = counting_shard(dir.path(), 1000);
    let (b, t) = (4, 16);
    let mut s = BatchSampler::new(7, b, t);
    for _ in 0..50 {
        let (x, y) = draw(&mut s, &shard, b, t);
        for r in 0..b {
            let o = x[r * t];
            assert!(o as usize + t < 1000);
            for j in 0..t {
                assert_eq!(x[r * t + j], o + j as u32);
                assert_eq!(y[r * t + j], x[r * t + j] + 1);
            }
        }
    }
    assert_eq!(s.state(), SamplerState { seed: 7, next_batch: 50 });
}

#[test]
fn same_seed_same_batches_other_seed_other_batches() {
    let dir = tempfile::tempdir().unwrap();
    let shard = counting_shard(dir.path(), 5000);
    let mut a = BatchSampler::new(1, 8, 32);
    let mut b = BatchSampler::new(1, 8, 32);
    let mut c = BatchSampler::new(2, 8, 32);
    let mut differs = false;
    for _ in 0..10 {
        let xa = draw(&mut a, &shard, 8, 32);
        assert_eq!(xa, draw(&mut b, &shard, 8, 32));
        differs |= xa != draw(&mut c, &shard, 8, 32);
    }
    assert!(differs);
}

#[test]
fn resuming_from_state_continues_identically() {
    let dir = tempfile::tempdir().unwrap();
    let shard = counting_shard(dir.path(), 3000);
    let mut straight = BatchSampler::new(42, 3, 10);
    let all: Vec<_> = (0..12).map(|_| draw(&mut straight, &shard, 3, 10)).collect();

    let mut first = BatchSampler::new(42, 3, 10);
    for want in &all[..5] {
        assert_eq!(&draw(&mut first, &shard, 3, 10), want);
    }
    // The state survives a checkpoint as JSON.
    let json = serde_json::to_string(&first.state()).unwrap();
    let state: SamplerState = serde_json::from_str(&json).unwrap();
    assert_eq!(state.next_batch, 5);
    let mut resumed = BatchSampler::from_state(state, 3, 10);
    for want in &all[5..] {
        assert_eq!(&draw(&mut resumed, &shard, 3, 10), want);
    }
}

#[test]
fn offsets_cover_the_whole_range() {
    let dir = tempfile::tempdir().unwrap();
    // len = T + 3: offsets 0, 1, 2 are all possible, 3 is not.
    let shard = counting_shard(dir.path(), 11);
    let mut s = BatchSampler::new(3, 1, 8);
    let mut seen = [false; 3];
    for _ in 0..200 {
        let (x, y) = draw(&mut s, &shard, 1, 8);
        seen[x[0] as usize] = true;
        assert!(*y.last().unwrap() <= 10);
    }
    assert_eq!(seen, [true; 3]);
    // Exactly T + 1 tokens is enough for one window.
    let exact = counting_shard(dir.path(), 9);
    assert_eq!(draw(&mut s, &exact, 1, 8).0, (0..8).collect::<Vec<_>>());
}

#[test]
fn too_small_corpus_and_bad_shapes_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let shard = counting_shard(dir.path(), 8);
    let mut x = vec![0; 8];
    let mut y = vec![0; 8];
    let e = BatchSampler::new(0, 1, 8).next_batch(&shard, &mut x, &mut y).unwrap_err();
    assert!(matches!(e, DataError::CorpusTooSmall { .. }));
    assert!(e.to_string().contains("corpus of 8 tokens is smaller than one sequence of 9"), "{e}");
    assert!(BatchSampler::new(0, 0, 8).next_batch(&shard, &mut [], &mut []).is_err());
    assert!(BatchSampler::new(0, 1, 0).next_batch(&shard, &mut [], &mut []).is_err());
    let big = counting_shard(dir.path(), 100);
    let mut s = BatchSampler::new(0, 2, 8);
    let e = s.next_batch(&big, &mut x, &mut y).unwrap_err();
    assert!(e.to_string().contains("batch*seq"), "{e}");
    // A failed call does not advance the sampler.
    assert_eq!(s.state().next_batch, 0);
}

#[test]
fn eval_batches_are_consecutive_windows() {
    let dir = tempfile::tempdir().unwrap();
    // 101 tokens, T = 10: windows start at 0, 10, ..., 90 (10 windows).
    let shard = counting_shard(dir.path(), 101);
    let batches = eval_batches(&shard, 3, 10, 100).unwrap();
    assert_eq!(batches.len(), 3); // 10 windows / 3 per batch, remainder dropped
    for (k, (x, y)) in batches.iter().enumerate() {
        assert_eq!(x.len(), 30);
        let base = (k * 30) as u32;
        assert_eq!(x, &(base..base + 30).collect::<Vec<_>>());
        assert_eq!(y, &(base + 1..base + 31).collect::<Vec<_>>());
    }
    assert_eq!(eval_batches(&shard, 3, 10, 2).unwrap().len(), 2);
    assert_eq!(eval_batches(&shard, 3, 10, 100).unwrap(), batches);

    let e = eval_batches(&shard, 1, 101, 10).unwrap_err();
    assert!(matches!(e, DataError::CorpusTooSmall { .. }), "{e}");
    assert!(eval_batches(&shard, 11, 10, 10).is_err());
    assert!(eval_batches(&shard, 0, 10, 10).is_err());
}
