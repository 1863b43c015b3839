//! All-reduce bandwidth of the thread engine:
//! `cargo run --release -p kiln-comm --example allreduce_bw -- [ranks=2] [megabytes=100] [iters=10]`.

use std::time::Duration;

use kiln_comm::{bench::all_reduce_bandwidth, ThreadComm};

fn main() {
    let arg = |i: usize, default: usize| std::env::args().nth(i).and_then(|s| s.parse().ok()).unwrap_or(default);
    let (ranks, mb, iters) = (arg(1, 2), arg(2, 100), arg(3, 10));
    let results =
        ThreadComm::launch(ranks, Duration::from_secs(120), |c| all_reduce_bandwidth(&c, mb * 1_000_000, 2, iters));
    match results.into_iter().next() {
        Some(Ok(Ok(r))) => println!(
            "all_reduce {} ranks ({}), {:.0} MB f32: {:.2} ms median of {}, algorithm {:.2} GB/s, bus {:.2} GB/s",
            r.ranks,
            r.engine,
            r.bytes as f64 / 1e6,
            r.seconds * 1e3,
            r.iters,
            r.algo_gb_s,
            r.bus_gb_s
        ),
        Some(Ok(Err(e))) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
        _ => {
            eprintln!("error: a rank panicked");
            std::process::exit(1);
        }
    }
}
