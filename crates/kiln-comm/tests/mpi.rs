//! The MPI engine under `mpirun`: every collective against a reference computed locally (each
//! rank can compute every other rank's input), bit for bit, and the failure modes.
//!
//! The `launch_*` tests run under plain `cargo test`: each re-launches this test binary under
//! `mpirun -np N --oversubscribe` for one `inner_*` test and checks how the job ends. The
//! `inner_*` tests do the work when they find themselves under mpirun (`OMPI_COMM_WORLD_SIZE` is
//! set) and return at once otherwise. Without `mpirun` on PATH the launchers say so and pass.
#![cfg(feature = "mpi")]

use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kiln_comm::{shard_range, Comm, CommError, MpiComm, Plan, ReduceOp, ThreadComm};

const T: Duration = Duration::from_secs(60);
const LENS: [usize; 9] = [0, 1, 2, 3, 5, 7, 13, 100, 1031];

/// Prints one line with a single write, so lines of different ranks never interleave mid-line
/// in mpirun's output.
fn say(line: String) {
    use std::io::Write;
    std::io::stderr().write_all(format!("{line}\n").as_bytes()).ok();
}

/// The marker a launcher looks for: this rank ran the inner test to its end.
fn done(inner: &str, rank: usize) {
    say(format!("KILN-MPI-DONE {inner} rank {rank}"));
}

fn under_mpirun() -> bool {
    std::env::var_os("OMPI_COMM_WORLD_SIZE").is_some()
}

/// Rank `r`'s test input: values with many mantissa bits, so order changes would show (the
/// same as the thread engine's tests).
fn input(r: usize, len: usize) -> Vec<f32> {
    (0..len).map(|i| ((r * 31 + i * 7) % 17) as f32 * 0.1373 - 0.8 + (i as f32).sqrt() * 1e-3).collect()
}

/// Element i reduced over `ranks` in the order given.
fn reference(ranks: &[usize], len: usize, op: ReduceOp) -> Vec<f32> {
    let mut acc = input(ranks[0], len);
    for &r in &ranks[1..] {
        for (a, x) in acc.iter_mut().zip(input(r, len)) {
            match op {
                ReduceOp::Max => *a = a.max(x),
                _ => *a += x,
            }
        }
    }
    if op == ReduceOp::Mean {
        acc.iter_mut().for_each(|a| *a /= ranks.len() as f32);
    }
    acc
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The collectives of one group against the reference; `members[i]` is the world rank of
/// group rank `i` (inputs are keyed by world rank).
fn check_collectives(c: &dyn Comm, members: &[usize]) {
    let (n, me) = (c.size(), c.rank());
    let world_me = members[me];
    for &len in &LENS {
        for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max] {
            let want = reference(members, len, op);
            let mut buf = input(world_me, len);
            c.all_reduce(&mut buf, op).unwrap();
            assert_eq!(bits(&buf), bits(&want), "all_reduce n={n} len={len} {op:?} rank {me}");

            let mine = shard_range(len, n, me);
            let mut out = vec![f32::NAN; mine.len()];
            c.reduce_scatter(&input(world_me, len), &mut out, op).unwrap();
            assert_eq!(bits(&out), bits(&want[mine]), "reduce_scatter n={n} len={len} {op:?} rank {me}");
        }

        // f64: the same sums, in f64, in rank order.
        let mut want64: Vec<f64> = input(members[0], len).iter().map(|&x| x as f64 * 1.1).collect();
        for &r in &members[1..] {
            want64.iter_mut().zip(input(r, len)).for_each(|(a, x)| *a += x as f64 * 1.1);
        }
        let mut buf64: Vec<f64> = input(world_me, len).iter().map(|&x| x as f64 * 1.1).collect();
        c.all_reduce_f64(&mut buf64, ReduceOp::Sum).unwrap();
        assert_eq!(
            buf64.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            want64.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            "all_reduce_f64 n={n} len={len}"
        );

        // all_gather: rank k contributes its shard of input(k + 100).
        let mut want = vec![0.0; len];
        for k in 0..n {
            let s = shard_range(len, n, k);
            want[s.clone()].copy_from_slice(&input(k + 100, len)[s]);
        }
        let mut out = vec![f32::NAN; len];
        c.all_gather(&input(me + 100, len)[shard_range(len, n, me)], &mut out).unwrap();
        assert_eq!(bits(&out), bits(&want), "all_gather n={n} len={len}");

        for root in 0..n {
            let mut buf = if me == root { input(root + 7, len) } else { vec![f32::NAN; len] };
            c.broadcast(&mut buf, root).unwrap();
            assert_eq!(bits(&buf), bits(&input(root + 7, len)), "broadcast n={n} len={len} root {root}");
        }
        c.barrier().unwrap();
    }
}

/// The thread engine gives the same bits as MPI: run it here, in-process, on the same inputs.
fn thread_engine_all_reduce(n: usize, len: usize) -> Vec<f32> {
    let r = ThreadComm::launch(n, T, |c| {
        let mut b = input(c.rank(), len);
        c.all_reduce(&mut b, ReduceOp::Sum).unwrap();
        b
    });
    r.into_iter().next().unwrap().unwrap()
}

#[test]
fn inner_collectives() {
    if !under_mpirun() {
        return;
    }
    let c = MpiComm::world(T).unwrap();
    let (n, me) = (c.size(), c.rank());
    assert_eq!(c.engine(), "mpi");
    let members: Vec<usize> = (0..n).collect();
    check_collectives(&c, &members);

    // Bit-identical to the thread engine with as many ranks.
    for len in [1031, 100_003] {
        let mut b = input(me, len);
        c.all_reduce(&mut b, ReduceOp::Sum).unwrap();
        assert_eq!(bits(&b), bits(&thread_engine_all_reduce(n, len)), "MPI vs threads len={len}");
    }

    // send/recv around a ring, two tags, sizes that differ per tag.
    let (next, prev) = ((me + 1) % n, (me + n - 1) % n);
    c.send(&input(me, 10), next, 1).unwrap();
    c.send(&input(me + 50, 3), next, 2).unwrap();
    let mut a = vec![0.0; 3];
    let mut b = vec![0.0; 10];
    c.recv(&mut a, prev, 2).unwrap();
    c.recv(&mut b, prev, 1).unwrap();
    assert_eq!(bits(&a), bits(&input(prev + 50, 3)));
    assert_eq!(bits(&b), bits(&input(prev, 10)));

    // Ranks that disagree get Mismatch, on a handle of their own (it breaks).
    let m = MpiComm::world(T).unwrap();
    let mut buf = vec![1.0; 5 + me];
    match m.all_reduce(&mut buf, ReduceOp::Sum) {
        Err(CommError::Mismatch { op: "all_reduce", msg }) => say(format!("rank {me}: mismatch as expected: {msg}")),
        other => panic!("rank {me}: expected Mismatch, got {other:?}"),
    }
    assert!(matches!(m.barrier(), Err(CommError::Broken(_))));
    // The first handle is unaffected.
    c.barrier().unwrap();
    // Misuse is an error (and, as on the thread engine, breaks the handle).
    assert!(matches!(c.send(&a, me, 0), Err(CommError::Invalid { .. })));
    assert!(matches!(c.barrier(), Err(CommError::Broken(_))));
    say(format!("rank {me} of {n}: collectives ok"));
    done("inner_collectives", me);
}

#[test]
fn inner_split() {
    if !under_mpirun() {
        return;
    }
    let world = MpiComm::world(T).unwrap();
    let (n, me) = (world.size(), world.rank());
    // Even and odd ranks, ordered by descending world rank within each group.
    let color = me % 2;
    let sub = world.split(color, n - me).unwrap();
    let mut members: Vec<usize> = (0..n).filter(|r| r % 2 == color).collect();
    members.reverse();
    assert_eq!(sub.size(), members.len());
    assert_eq!(members[sub.rank()], me);
    check_collectives(sub.as_ref(), &members);

    // A split into singletons works and is a no-op group.
    let alone = world.split(me, 0).unwrap();
    assert_eq!((alone.size(), alone.rank()), (1, 0));
    let mut b = input(me, 7);
    alone.all_reduce(&mut b, ReduceOp::Sum).unwrap();
    assert_eq!(bits(&b), bits(&input(me, 7)));

    // The data-parallel plan over the whole world.
    let g = Plan::data_parallel(n).groups(&world).unwrap();
    assert_eq!(g.dp.size(), n);
    let mut b = input(me, 13);
    g.dp.all_reduce(&mut b, ReduceOp::Sum).unwrap();
    assert_eq!(bits(&b), bits(&reference(&(0..n).collect::<Vec<_>>(), 13, ReduceOp::Sum)));
    world.barrier().unwrap();
    say(format!("rank {me} of {n}: split ok"));
    done("inner_split", me);
}

/// The last rank skips a collective: the others must time out naming it, within the timeout,
/// and every process must still end cleanly.
#[test]
fn inner_timeout() {
    if !under_mpirun() {
        return;
    }
    let short = Duration::from_secs(2);
    let c = MpiComm::world(short).unwrap();
    let p2p = MpiComm::world(short).unwrap();
    let (n, me) = (c.size(), c.rank());
    let last = n - 1;
    let mut b = input(me, 1000);
    c.all_reduce(&mut b, ReduceOp::Sum).unwrap();
    if me == last {
        // Stall past the others' timeout, then leave without joining.
        std::thread::sleep(Duration::from_secs(3));
        say(format!("rank {me}: skipped the collective"));
        done("inner_timeout", me);
        return;
    }
    let t0 = Instant::now();
    let r = c.all_reduce(&mut b, ReduceOp::Sum);
    let dt = t0.elapsed();
    match r {
        Err(CommError::Timeout { op: "all_reduce", waiting_for, timeout }) => {
            assert_eq!(waiting_for, last, "rank {me} named the wrong rank");
            assert_eq!(timeout, short);
        }
        other => panic!("rank {me}: expected a timeout naming rank {last}, got {other:?}"),
    }
    assert!(dt >= short && dt < short + Duration::from_secs(2), "rank {me}: gave up after {dt:?}");
    say(format!("rank {me}: {} (after {dt:?})", r.unwrap_err()));
    assert!(matches!(c.all_reduce(&mut b, ReduceOp::Sum), Err(CommError::Broken(_))));
    // Point to point: a receive nobody sends names its source.
    if me == 0 {
        let mut x = [0.0f32; 4];
        let src = last;
        match p2p.recv(&mut x, src, 9) {
            Err(CommError::Timeout { op: "recv", waiting_for, .. }) => assert_eq!(waiting_for, src),
            other => panic!("expected a recv timeout, got {other:?}"),
        }
    }
    done("inner_timeout", me);
}

/// The last rank dies after the first collective. Open MPI's mpirun notices the process exit
/// without MPI_Finalize and aborts the whole job (killing the others, which are waiting in a
/// collective with a long timeout): the launcher checks that happens well within that timeout.
#[test]
fn inner_fault() {
    if !under_mpirun() {
        return;
    }
    let c = MpiComm::world(Duration::from_secs(120)).unwrap();
    let me = c.rank();
    let mut b = input(me, 1000);
    c.all_reduce(&mut b, ReduceOp::Sum).unwrap();
    if me == c.size() - 1 {
        say(format!("rank {me}: exiting with status 3"));
        std::process::exit(3);
    }
    let r = c.all_reduce(&mut b, ReduceOp::Sum);
    // Not reached in practice: mpirun kills this process first.
    say(format!("rank {me}: {r:?}"));
}

/// Without mpirun, MPI starts as a "singleton": a world of one rank, where every collective is
/// the identity and the handle still behaves (the trainer's `--comm mpi` on one process).
#[test]
fn singleton_world_outside_mpirun() {
    if under_mpirun() || mpirun_missing() {
        return;
    }
    let c = MpiComm::world(T).unwrap();
    assert_eq!((c.rank(), c.size(), c.world_rank()), (0, 1, 0));
    let mut b = input(0, 100);
    c.all_reduce(&mut b, ReduceOp::Mean).unwrap();
    assert_eq!(bits(&b), bits(&input(0, 100)));
    c.barrier().unwrap();
    let sub = c.split(5, 0).unwrap();
    assert_eq!(sub.size(), 1);
    eprintln!("{}", MpiComm::library_version().lines().next().unwrap_or(""));
}

fn mpirun_missing() -> bool {
    Command::new("mpirun").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_err()
}

/// Serialises the launchers: each mpirun already oversubscribes the machine.
static LAUNCH: Mutex<()> = Mutex::new(());

struct Run {
    ok: bool,
    code: Option<i32>,
    output: String,
    elapsed: Duration,
}

/// Runs `inner` of this binary under `mpirun -np`, or None when there is no mpirun.
fn mpirun(np: usize, inner: &str, limit: Duration) -> Option<Run> {
    if under_mpirun() {
        return None;
    }
    if mpirun_missing() {
        eprintln!("SKIPPED: mpirun is not on PATH (install openmpi-bin and libopenmpi-dev to run the MPI tests)");
        return None;
    }
    let _g = LAUNCH.lock().unwrap_or_else(|e| e.into_inner());
    let exe = std::env::current_exe().unwrap();
    let t0 = Instant::now();
    let mut child = Command::new("mpirun")
        .args(["-np", &np.to_string(), "--oversubscribe", "--allow-run-as-root"])
        // Shared memory and self only: no network probing on the CI machine.
        .args(["--mca", "btl", "self,vader"])
        .arg(&exe)
        .args(["--exact", inner, "--nocapture", "--test-threads=1"])
        // Open MPI refuses root without these (the flag above covers mpirun itself).
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mpirun starts");
    // Read both pipes on threads, so a chatty job cannot block on a full pipe.
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let ho = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut out, &mut s).ok();
        s
    });
    let he = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut err, &mut s).ok();
        s
    });
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > limit {
            child.kill().ok();
            let st = child.wait().unwrap();
            let output = ho.join().unwrap() + &he.join().unwrap();
            panic!("mpirun -np {np} {inner} ran past {limit:?} ({st}); output:\n{output}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let elapsed = t0.elapsed();
    let output = ho.join().unwrap() + &he.join().unwrap();
    eprintln!("mpirun -np {np} {inner}: {status} in {elapsed:.1?}\n{output}");
    Some(Run { ok: status.success(), code: status.code(), output, elapsed })
}

fn assert_ran(r: &Run, inner: &str, np: usize) {
    assert!(r.ok, "mpirun -np {np} {inner} failed ({:?}):\n{}", r.code, r.output);
    // A rank that ran nothing (or returned early) would exit 0 too: each must say it finished.
    for rank in 0..np {
        let marker = format!("KILN-MPI-DONE {inner} rank {rank}");
        assert!(r.output.contains(&marker), "rank {rank} did not finish {inner}:\n{}", r.output);
    }
}

#[test]
fn launch_collectives() {
    for np in [2, 3] {
        if let Some(r) = mpirun(np, "inner_collectives", Duration::from_secs(300)) {
            assert_ran(&r, "inner_collectives", np);
        }
    }
}

#[test]
fn launch_split() {
    for np in [2, 3, 4] {
        if let Some(r) = mpirun(np, "inner_split", Duration::from_secs(300)) {
            assert_ran(&r, "inner_split", np);
        }
    }
}

#[test]
fn launch_timeout() {
    for np in [2, 3] {
        if let Some(r) = mpirun(np, "inner_timeout", Duration::from_secs(120)) {
            assert_ran(&r, "inner_timeout", np);
            assert!(r.output.contains(&format!("waiting for rank {}", np - 1)), "{}", r.output);
        }
    }
}

#[test]
fn launch_fault() {
    for np in [2, 3] {
        if let Some(r) = mpirun(np, "inner_fault", Duration::from_secs(100)) {
            assert!(!r.ok, "a job whose rank died must fail:\n{}", r.output);
            // The survivors wait with a 120 s timeout: ending well before it is mpirun's doing.
            assert!(r.elapsed < Duration::from_secs(60), "took {:?}", r.elapsed);
            // Open MPI 4.1: "mpirun detected that one or more processes exited with non-zero
            // status ... Process name: [[…],N] Exit code: 3".
            assert!(r.output.contains("Exit code:") || r.output.contains("exited"), "{}", r.output);
        }
    }
}
