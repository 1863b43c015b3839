//! `kiln train --comm mpi` under `mpirun`: processes train the same steps as threads, bit for
//! bit (data parallel, ZeRO-1, tensor and pipeline parallel and their products), the MPI run's
//! checkpoint resumes on one rank, and a rank killed mid-run fails the job. Needs a kiln built with `--features mpi` and Open MPI's `mpirun` on PATH; without
//! mpirun the test says so and passes.
#![cfg(feature = "mpi")]

use std::path::Path;
use std::process::{Command, Output, Stdio};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn kiln(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).output().expect("run kiln")
}

fn ok(out: Output) -> Output {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}:\n{err}", out.status.code());
    out
}

fn mpirun(np: usize, args: &[String]) -> Output {
    Command::new("mpirun")
        .args(["-np", &np.to_string(), "--oversubscribe", "--allow-run-as-root", "--mca", "btl", "self,vader"])
        .arg(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output()
        .expect("mpirun starts")
}

/// (step, loss bits) of every metrics line.
fn losses(run: &Path) -> Vec<(u64, u32)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), (v["loss"].as_f64().unwrap() as f32).to_bits())
        })
        .collect()
}

#[test]
fn mpi_ranks_train_exactly_as_thread_ranks() {
    if Command::new("mpirun").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_err() {
        eprintln!("SKIPPED: mpirun is not on PATH (apt-get install openmpi-bin libopenmpi-dev)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let v = |xs: &[&str]| xs.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let (corpus, tok, data) = (root.join("corpus.txt"), root.join("tok.json"), root.join("data"));
    ok(kiln(&v(&["data", "synth", "--out", s(&corpus), "--bytes", "200000"])));
    ok(kiln(&v(&["tokenizer", "train", "--input", s(&corpus), "--vocab-size", "300", "--out", s(&tok)])));
    ok(kiln(&v(&["data", "prepare", "--input", s(&corpus), "--tokenizer", s(&tok), "--out", s(&data)])));
    let train = |out: &Path, extra: &[&str]| {
        let mut a = v(&["train", "--data", s(&data), "--preset", "gpt-tiny", "--steps", "6", "--batch", "4"]);
        a.extend(v(&["--seq", "16", "--eval-every", "3", "--sample-tokens", "0", "--threads", "1", "--out", s(out)]));
        a.extend(v(extra));
        a
    };
    for zero in ["0", "1"] {
        let (threads, mpi) = (root.join(format!("threads-z{zero}")), root.join(format!("mpi-z{zero}")));
        ok(kiln(&train(&threads, &["--dp", "2", "--zero", zero])));
        let out = ok(mpirun(2, &train(&mpi, &["--dp", "2", "--zero", zero, "--comm", "mpi"])));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("data parallel 2 ranks (mpi)"), "rank 0 should say how it runs:\n{err}");
        let want = losses(&threads);
        assert_eq!(want.len(), 6);
        assert_eq!(losses(&mpi), want, "ZeRO-{zero}: MPI ranks diverged from thread ranks");
    }
    // The MPI run's checkpoint is plan-independent: it resumes on one rank of this process.
    let mpi = root.join("mpi-z0");
    let mut a = v(&["train", "--resume", s(&mpi), "--steps", "8", "--dp", "1", "--comm", "threads"]);
    a.extend(v(&["--threads", "1"]));
    ok(kiln(&a));
    assert_eq!(losses(&mpi).len(), 8);

    // Tensor and pipeline parallel over four processes: the thread engine's steps, bit for bit.
    let plans: [&[&str]; 5] = [
        &["--tp", "2"],
        &["--pp", "2"],
        &["--tp", "2", "--pp", "2"],
        &["--dp", "2", "--tp", "2"],
        &["--dp", "2", "--pp", "2", "--zero", "1"],
    ];
    for plan in plans {
        let name = plan.join("");
        let np = plan.chunks(2).filter(|f| f[0] != "--zero").map(|f| f[1].parse::<usize>().unwrap()).product();
        let (threads, mpi) = (root.join(format!("threads{name}")), root.join(format!("mpi{name}")));
        ok(kiln(&train(&threads, plan)));
        let mut extra = plan.to_vec();
        extra.extend(["--comm", "mpi"]);
        let out = ok(mpirun(np, &train(&mpi, &extra)));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("= {np} ranks (mpi)")), "rank 0 should say how it runs:\n{err}");
        assert_eq!(losses(&mpi), losses(&threads), "{name}: MPI ranks diverged from thread ranks");
    }

    // Fewer processes than the plan's ranks: a clear error, not a hang.
    let out = mpirun(2, &train(&root.join("bad"), &["--dp", "4", "--comm", "mpi"]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs 4 process(es), but 2 were started"), "{err}");
}

/// One rank of a tp=2 × pp=2 run is killed (SIGKILL) mid-run: mpirun ends the job with a
/// non-zero exit, long before the collective timeout would, and the survivors do not hang.
#[test]
fn a_killed_rank_ends_the_mpi_run() {
    if Command::new("mpirun").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_err() {
        eprintln!("SKIPPED: mpirun is not on PATH (apt-get install openmpi-bin libopenmpi-dev)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let v = |xs: &[&str]| xs.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let (corpus, tok, data, out) =
        (root.join("corpus.txt"), root.join("tok.json"), root.join("data"), root.join("run"));
    ok(kiln(&v(&["data", "synth", "--out", s(&corpus), "--bytes", "200000"])));
    ok(kiln(&v(&["tokenizer", "train", "--input", s(&corpus), "--vocab-size", "300", "--out", s(&tok)])));
    ok(kiln(&v(&["data", "prepare", "--input", s(&corpus), "--tokenizer", s(&tok), "--out", s(&data)])));
    let mut a = v(&["train", "--data", s(&data), "--preset", "gpt-tiny", "--steps", "100000", "--batch", "4"]);
    a.extend(v(&["--seq", "16", "--sample-tokens", "0", "--threads", "1", "--out", s(&out), "--comm-timeout", "60"]));
    a.extend(v(&["--tp", "2", "--pp", "2", "--comm", "mpi"]));
    let mut job = Command::new("mpirun")
        .args(["-np", "4", "--oversubscribe", "--allow-run-as-root", "--mca", "btl", "self,vader"])
        .arg(env!("CARGO_BIN_EXE_kiln"))
        .args(&a)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(root.join("stderr.txt")).unwrap())
        .spawn()
        .expect("mpirun starts");
    // Wait until training is under way (metrics lines appear), then kill the last rank.
    let metrics = out.join("metrics.jsonl");
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |m| m.lines().count()) < 3 {
        assert!(t0.elapsed().as_secs() < 120, "the run never started");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let children = Command::new("pgrep").args(["-P", &job.id().to_string()]).output().expect("pgrep");
    let pids: Vec<String> = String::from_utf8_lossy(&children.stdout).split_whitespace().map(String::from).collect();
    assert_eq!(pids.len(), 4, "four rank processes under mpirun: {pids:?}");
    let killed = std::time::Instant::now();
    assert!(Command::new("kill").args(["-9", &pids[3]]).status().unwrap().success());
    let status = loop {
        if let Some(st) = job.try_wait().unwrap() {
            break st;
        }
        if killed.elapsed().as_secs() > 60 {
            job.kill().ok();
            panic!("the job was still running 60 s after a rank was killed");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let err = std::fs::read_to_string(root.join("stderr.txt")).unwrap();
    assert!(!status.success(), "a killed rank must fail the job:\n{err}");
    eprintln!("job ended {:?} after the kill, exit {:?}", killed.elapsed(), status.code());
}
