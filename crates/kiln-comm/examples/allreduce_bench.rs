//! All-reduce bandwidth of each engine beside the MPI library's own `MPI_Allreduce`:
//!
//! ```text
//! cargo run --release -p kiln-comm --features mpi --example allreduce_bench -- [--ranks 2] [--mb 100] [--iters 10] [--warmup 2] [--json]
//! ```
//!
//! Run plainly, it times the thread engine (ranks are threads), then re-launches itself under
//! `mpirun -np RANKS --oversubscribe` to time [`MpiComm`] and a plain `MPI_Allreduce` loop (sum,
//! f32) on the same buffer size, and prints one line (or one JSON object) per engine. Under
//! `mpirun` it runs only the MPI part (rank 0 prints JSON lines), so it also works across
//! machines: `mpirun -H host1,host2 -np 2 target/release/examples/allreduce_bench`.
//!
//! Times are the median over `iters` calls (after `warmup`) of the slowest rank's time for each
//! call; bus bandwidth is NCCL's: bytes / time · 2(n−1)/n.

use std::process::Command;
use std::time::{Duration, Instant};

use kiln_comm::bench::{all_reduce_bandwidth, AllReduceBench};
use kiln_comm::{Comm, MpiComm, ThreadComm};
use mpi::collective::SystemOperation;
use mpi::traits::*;

struct Args {
    ranks: usize,
    mb: usize,
    iters: usize,
    warmup: usize,
    json: bool,
}

fn parse() -> Args {
    let mut a = Args { ranks: 2, mb: 100, iters: 10, warmup: 2, json: false };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let val = |i: usize| -> usize {
            argv.get(i + 1).and_then(|s| s.parse().ok()).unwrap_or_else(|| {
                eprintln!("{} needs a number", argv[i]);
                std::process::exit(2)
            })
        };
        match argv[i].as_str() {
            "--ranks" => a.ranks = val(i),
            "--mb" => a.mb = val(i),
            "--iters" => a.iters = val(i),
            "--warmup" => a.warmup = val(i),
            "--json" => {
                a.json = true;
                i -= 1
            }
            "--bench" => i -= 1, // cargo bench passes this
            other => {
                eprintln!("unknown argument {other}");
                std::process::exit(2)
            }
        }
        i += 2;
    }
    a
}

fn json(r: &AllReduceBench) -> String {
    format!(
        "{{\"engine\":\"{}\",\"ranks\":{},\"bytes\":{},\"iters\":{},\"seconds\":{:.6},\"algo_gb_s\":{:.3},\"bus_gb_s\":{:.3}}}",
        r.engine, r.ranks, r.bytes, r.iters, r.seconds, r.algo_gb_s, r.bus_gb_s
    )
}

fn line(r: &AllReduceBench) -> String {
    format!(
        "{:<16} {} ranks, {:.0} MB f32: {:8.2} ms/call (median of {}), algorithm {:6.2} GB/s, bus {:6.2} GB/s",
        r.engine,
        r.ranks,
        r.bytes as f64 / 1e6,
        r.seconds * 1e3,
        r.iters,
        r.algo_gb_s,
        r.bus_gb_s
    )
}

/// A plain `MPI_Allreduce` (sum, f32, out of place) loop on the same communicator.
fn raw_mpi(c: &MpiComm, bytes: usize, warmup: usize, iters: usize) -> AllReduceBench {
    let world = c.raw();
    let n = (bytes / 4).max(1);
    let send: Vec<f32> = (0..n).map(|i| (i % 251) as f32 * 0.25 + c.rank() as f32).collect();
    let mut recv = vec![0.0f32; n];
    let mut times = Vec::new();
    for i in 0..warmup + iters.max(1) {
        world.barrier();
        let t0 = Instant::now();
        world.all_reduce_into(&send[..], &mut recv[..], SystemOperation::sum());
        let dt = t0.elapsed().as_secs_f64();
        let mut slowest = 0.0f64;
        world.all_reduce_into(&dt, &mut slowest, SystemOperation::max());
        if i >= warmup {
            times.push(slowest);
        }
    }
    times.sort_by(f64::total_cmp);
    let seconds = times[times.len() / 2];
    let size = c.size();
    let algo = (n * 4) as f64 / seconds / 1e9;
    AllReduceBench {
        engine: "MPI_Allreduce",
        ranks: size,
        bytes: n * 4,
        iters: times.len(),
        seconds,
        algo_gb_s: algo,
        bus_gb_s: algo * 2.0 * (size as f64 - 1.0) / size as f64,
    }
}

fn fail(e: impl std::fmt::Display) -> ! {
    eprintln!("error: {e}");
    std::process::exit(1)
}

fn main() {
    let a = parse();
    let bytes = a.mb * 1_000_000;
    if std::env::var_os("OMPI_COMM_WORLD_SIZE").is_some() {
        // Under mpirun: the MPI engines; rank 0 reports JSON lines for the launcher.
        let c = MpiComm::world(Duration::from_secs(600)).unwrap_or_else(|e| fail(e));
        let ours = all_reduce_bandwidth(&c, bytes, a.warmup, a.iters).unwrap_or_else(|e| fail(e));
        let raw = raw_mpi(&c, bytes, a.warmup, a.iters);
        if c.rank() == 0 {
            println!("{}", json(&ours));
            println!("{}", json(&raw));
        }
        return;
    }

    let mut results = Vec::new();
    let threads =
        ThreadComm::launch(a.ranks, Duration::from_secs(600), |c| all_reduce_bandwidth(&c, bytes, a.warmup, a.iters));
    match threads.into_iter().next() {
        Some(Ok(Ok(r))) => results.push(r),
        Some(Ok(Err(e))) => fail(e),
        _ => fail("a thread rank panicked"),
    }
    if !a.json {
        println!("{}", line(&results[0]));
    }

    let exe = std::env::current_exe().unwrap_or_else(|e| fail(e));
    let out = Command::new("mpirun")
        .args(["-np", &a.ranks.to_string(), "--oversubscribe", "--allow-run-as-root"])
        .args(["--mca", "btl", "self,vader"])
        .arg(exe)
        .args(["--mb", &a.mb.to_string(), "--iters", &a.iters.to_string(), "--warmup", &a.warmup.to_string()])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output();
    let mut mpi_lines = Vec::new();
    match out {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout);
            mpi_lines.extend(text.lines().filter(|l| l.starts_with('{')).map(str::to_owned));
        }
        Ok(o) => eprintln!(
            "mpirun failed ({}): {}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => eprintln!("mpirun did not start ({e}): only the thread engine was measured"),
    }
    if a.json {
        let all: Vec<String> = std::iter::once(json(&results[0])).chain(mpi_lines).collect();
        println!("[{}]", all.join(","));
    } else {
        for l in &mpi_lines {
            // Minimal reading of our own JSON line, to print it like the others.
            let field = |k: &str| -> String {
                let at = l.find(&format!("\"{k}\":")).map(|i| i + k.len() + 3).unwrap_or(0);
                l[at..].split([',', '}']).next().unwrap_or("").trim_matches('"').to_owned()
            };
            let num = |k: &str| field(k).parse::<f64>().unwrap_or(f64::NAN);
            let r = AllReduceBench {
                engine: if field("engine") == "mpi" { "mpi" } else { "MPI_Allreduce" },
                ranks: num("ranks") as usize,
                bytes: num("bytes") as usize,
                iters: num("iters") as usize,
                seconds: num("seconds"),
                algo_gb_s: num("algo_gb_s"),
                bus_gb_s: num("bus_gb_s"),
            };
            println!("{}", line(&r));
        }
    }
}
