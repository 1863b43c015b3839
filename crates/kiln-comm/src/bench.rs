//! All-reduce bandwidth, reported as NCCL does: algorithm bandwidth (bytes / time) and bus
//! bandwidth (algorithm bandwidth × 2(n−1)/n, the bytes each rank must move in a ring).

use std::time::Instant;

use crate::{Comm, CommError, ReduceOp};

#[derive(Clone, Debug, PartialEq)]
pub struct AllReduceBench {
    pub engine: &'static str,
    pub ranks: usize,
    pub bytes: usize,
    pub iters: usize,
    /// Median seconds per all-reduce.
    pub seconds: f64,
    pub algo_gb_s: f64,
    pub bus_gb_s: f64,
}

/// Times `iters` all-reduces (sum) of `bytes` bytes of f32 after `warmup` untimed ones.
/// Collective: every rank calls it; the median is taken over the slowest rank of each call.
pub fn all_reduce_bandwidth(
    comm: &dyn Comm,
    bytes: usize,
    warmup: usize,
    iters: usize,
) -> Result<AllReduceBench, CommError> {
    let n = (bytes / 4).max(1);
    let mut buf: Vec<f32> = (0..n).map(|i| (i % 251) as f32 * 0.25 + comm.rank() as f32).collect();
    let mut times = Vec::with_capacity(iters);
    for i in 0..warmup + iters.max(1) {
        comm.barrier()?;
        let t0 = Instant::now();
        comm.all_reduce(&mut buf, ReduceOp::Sum)?;
        let mut dt = [t0.elapsed().as_secs_f64()];
        comm.all_reduce_f64(&mut dt, ReduceOp::Max)?;
        if i >= warmup {
            times.push(dt[0]);
        }
    }
    times.sort_by(f64::total_cmp);
    let seconds = times[times.len() / 2];
    let size = comm.size();
    let algo = (n * 4) as f64 / seconds / 1e9;
    Ok(AllReduceBench {
        engine: comm.engine(),
        ranks: size,
        bytes: n * 4,
        iters: times.len(),
        seconds,
        algo_gb_s: algo,
        bus_gb_s: algo * 2.0 * (size as f64 - 1.0) / size as f64,
    })
}
