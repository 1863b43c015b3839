//! Batches for training (seeded random windows) and evaluation (consecutive windows).

use crate::{DataError, TokenShard};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Everything needed to resume a `BatchSampler`: store it in a checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SamplerState {
    pub seed: u64,
    /// Index of the batch the next call to `next_batch` draws.
    pub next_batch: u64,
}

/// nanoGPT-style sampler: each batch is `batch` windows at uniformly random offsets.
///
/// Batch `k` uses a ChaCha8 RNG keyed by `(seed, k)` alone, so batch `k` is the same whatever
/// came before it, and resuming is just `from_state(SamplerState { seed, next_batch: k })`.
#[derive(Clone, Debug)]
pub struct BatchSampler {
    state: SamplerState,
    batch: usize,
    seq: usize,
}

impl BatchSampler {
    /// A sampler at batch 0.
    pub fn new(seed: u64, batch: usize, seq: usize) -> BatchSampler {
        Self::from_state(SamplerState { seed, next_batch: 0 }, batch, seq)
    }

    /// A sampler that continues from a saved state.
    pub fn from_state(state: SamplerState, batch: usize, seq: usize) -> BatchSampler {
        BatchSampler { state, batch, seq }
    }

    /// The state to save; `from_state` with it draws the batches this sampler would draw next.
    pub fn state(&self) -> SamplerState {
        self.state.clone()
    }

    /// Fills `inputs` with `batch` windows of `seq` tokens and `targets` with the same windows
    /// shifted one token right; both must hold `batch * seq` values (row-major `[batch, seq]`).
    pub fn next_batch(&mut self, shard: &TokenShard, inputs: &mut [u32], targets: &mut [u32]) -> Result<(), DataError> {
        let (b, t) = (self.batch, self.seq);
        check_shape(b, t)?;
        let n = b * t;
        if inputs.len() != n || targets.len() != n {
            return Err(DataError::InvalidArgument(format!(
                "inputs and targets must each hold batch*seq = {b}*{t} = {n} tokens, \
                 got {} and {}",
                inputs.len(),
                targets.len()
            )));
        }
        check_fits(shard, t)?;
        // Offsets 0..=len-t-1: the window plus its one-token-shifted target must fit.
        let choices = (shard.len() - t) as u64;
        let mut rng = batch_rng(self.state.seed, self.state.next_batch);
        for (row_in, row_tg) in inputs.chunks_exact_mut(t).zip(targets.chunks_exact_mut(t)) {
            let o = uniform(&mut rng, choices) as usize;
            shard.copy_range(o, row_in);
            shard.copy_range(o + 1, row_tg);
        }
        self.state.next_batch += 1;
        Ok(())
    }
}

/// One evaluation batch: (inputs, targets), each `batch * seq` tokens, row-major.
pub type EvalBatch = (Vec<u32>, Vec<u32>);

/// Evaluation batches: the shard cut into windows of `seq + 1` tokens at stride `seq`
/// (consecutive, non-overlapping targets), grouped `batch` at a time, at most `max_batches`.
///
/// Only full batches are returned, so every batch has shape `[batch, seq]`; windows left over
/// at the end are dropped. Errors if not even one full batch fits.
pub fn eval_batches(
    shard: &TokenShard,
    batch: usize,
    seq: usize,
    max_batches: usize,
) -> Result<Vec<EvalBatch>, DataError> {
    check_shape(batch, seq)?;
    check_fits(shard, seq)?;
    // Windows start at 0, seq, 2*seq, ... while start + seq + 1 <= len.
    let windows = (shard.len() - 1) / seq;
    if windows < batch {
        return Err(DataError::InvalidArgument(format!(
            "eval shard of {} tokens holds only {windows} window(s) of {} tokens; \
             one eval batch needs {batch}",
            shard.len(),
            seq + 1
        )));
    }
    let count = (windows / batch).min(max_batches);
    let mut out = Vec::with_capacity(count);
    let mut window = vec![0u32; seq + 1];
    for k in 0..count {
        let mut inputs = Vec::with_capacity(batch * seq);
        let mut targets = Vec::with_capacity(batch * seq);
        for r in 0..batch {
            shard.copy_range((k * batch + r) * seq, &mut window);
            inputs.extend_from_slice(&window[..seq]);
            targets.extend_from_slice(&window[1..]);
        }
        out.push((inputs, targets));
    }
    Ok(out)
}

fn check_shape(batch: usize, seq: usize) -> Result<(), DataError> {
    if batch == 0 || seq == 0 {
        return Err(DataError::InvalidArgument(format!(
            "batch size and sequence length must be at least 1 (got batch {batch}, seq {seq})"
        )));
    }
    batch
        .checked_mul(seq)
        .map(|_| ())
        .ok_or_else(|| DataError::InvalidArgument(format!("batch {batch} × seq {seq} overflows")))
}

fn check_fits(shard: &TokenShard, seq: usize) -> Result<(), DataError> {
    if shard.len() <= seq {
        return Err(DataError::CorpusTooSmall { tokens: shard.len(), needed: seq + 1, seq });
    }
    Ok(())
}

/// The RNG for batch `k`: a 256-bit ChaCha key of (seed, k), so batches are independent.
fn batch_rng(seed: u64, k: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&k.to_le_bytes());
    ChaCha8Rng::from_seed(key)
}

/// Uniform in `0..n` by widening multiply; spelled out (not `rand`'s range sampling) so the
/// stream depends only on ChaCha's output, which `rand_chacha` keeps stable. Bias ≤ n/2^64.
pub(crate) fn uniform(rng: &mut impl RngCore, n: u64) -> u64 {
    ((rng.next_u64() as u128 * n as u128) >> 64) as u64
}
