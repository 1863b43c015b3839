//! kiln-comm: the collectives that parallel training is built on.
//!
//! [`Comm`] is one rank's handle on a group of ranks: all-reduce, reduce-scatter, all-gather,
//! broadcast, send/recv, barrier, and `split` into sub-groups (the dp, tp and pp dimensions of a
//! [`Plan`]). Engines: [`ThreadComm`] (ranks are threads of one process, shared memory, always
//! built) and, with the cargo feature `mpi`, `MpiComm` (ranks are processes under `mpirun`,
//! Open MPI). Every blocking call has a timeout and names the rank it was waiting for, so a dead
//! or stalled rank turns into a [`CommError`] on every other rank instead of a hang.
//!
//! Reductions are deterministic: element `i` is always summed in rank order 0, 1, …, n−1, so
//! every rank gets the same bits, run after run.

pub mod bench;
#[cfg(feature = "mpi")]
mod mpi;
mod plan;
mod thread;

use std::ops::Range;
use std::time::Duration;

pub use plan::{Coords, Plan, PlanGroups};
pub use thread::ThreadComm;

#[cfg(feature = "mpi")]
pub use crate::mpi::MpiComm;

/// How an all-reduce or reduce-scatter combines the ranks' values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    /// The sum (in rank order) divided by the group size.
    Mean,
    Max,
}

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum CommError {
    #[error("{op}: timed out after {timeout:?} waiting for rank {waiting_for} (it stalled or is stuck elsewhere)")]
    Timeout { op: &'static str, waiting_for: usize, timeout: Duration },
    #[error("{op}: rank {rank} failed or left the group before joining this collective")]
    /// `rank` is the root cause: a rank that gave up because of another names that one.
    PeerFailed { op: &'static str, rank: usize },
    #[error("{op}: ranks called different collectives or sizes: {msg}")]
    Mismatch { op: &'static str, msg: String },
    #[error("{op}: {msg}")]
    Invalid { op: &'static str, msg: String },
    #[error("the communicator is unusable after an earlier error: {0}")]
    Broken(String),
    #[error("MPI: {0}")]
    Mpi(String),
}

/// One rank's handle on a group. Collectives must be called by every rank of the group in the
/// same order with matching sizes (checked: a mismatch is an error, not corruption).
///
/// Buffer partitions follow [`shard_range`]: rank `r` owns `shard_range(len, size, r)`.
pub trait Comm: Send {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// The engine's name, for logs and benchmarks.
    fn engine(&self) -> &'static str;

    /// Every rank ends with the element-wise reduction of all ranks' `buf`.
    fn all_reduce(&self, buf: &mut [f32], op: ReduceOp) -> Result<(), CommError>;
    /// `all_reduce` in f64, for scalars that must not lose precision (norms, loss sums).
    fn all_reduce_f64(&self, buf: &mut [f64], op: ReduceOp) -> Result<(), CommError>;
    /// Reduces `input` (the same length on every rank) and leaves this rank's shard,
    /// `shard_range(input.len(), size, rank)`, in `output`.
    fn reduce_scatter(&self, input: &[f32], output: &mut [f32], op: ReduceOp) -> Result<(), CommError>;
    /// Concatenates every rank's shard: `input` is this rank's `shard_range(output.len(), ..)`.
    fn all_gather(&self, input: &[f32], output: &mut [f32]) -> Result<(), CommError>;
    /// Copies `root`'s `buf` into every rank's `buf`.
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), CommError>;
    /// Sends `buf` to rank `dest` (buffered: returns once the data is copied).
    fn send(&self, buf: &[f32], dest: usize, tag: u32) -> Result<(), CommError>;
    /// Receives exactly `buf.len()` values sent by `src` with `tag`.
    fn recv(&self, buf: &mut [f32], src: usize, tag: u32) -> Result<(), CommError>;
    fn barrier(&self) -> Result<(), CommError>;
    /// Collective: ranks with equal `color` form a new group, ordered by `(key, rank)`.
    fn split(&self, color: usize, key: usize) -> Result<Box<dyn Comm>, CommError>;
}

/// The part of a `len`-long buffer that rank `rank` of `size` owns: contiguous, in rank order,
/// the first `len % size` ranks holding one element more.
pub fn shard_range(len: usize, size: usize, rank: usize) -> Range<usize> {
    let (base, extra) = (len / size, len % size);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

/// The default collective timeout: generous, because rank 0 evaluates and checkpoints while the
/// others wait for it at the next collective.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_buffer_in_order() {
        for len in 0..20 {
            for size in 1..6 {
                let mut next = 0;
                for r in 0..size {
                    let s = shard_range(len, size, r);
                    assert_eq!(s.start, next);
                    assert!(s.len() == len / size || s.len() == len / size + 1);
                    next = s.end;
                }
                assert_eq!(next, len);
            }
        }
    }
}
