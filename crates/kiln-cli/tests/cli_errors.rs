//! Bad input gets a clear message and a non-zero exit, never a panic or a half-written file.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).env("KILN_TEST", "1").output().expect("run kiln")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Asserts a failure with `code` whose stderr mentions `needle` and shows no panic.
fn assert_fails(out: &Output, code: i32, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "exit code; stderr:\n{err}");
    assert!(err.contains(needle), "stderr should mention {needle:?}:\n{err}");
    assert!(!err.contains("panicked"), "panic:\n{err}");
}

/// A corpus, a 300-token tokenizer and prepared shards, made once for all tests.
struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let corpus = root.join("corpus.txt");
        assert!(kiln(&["data", "synth", "--out", s(&corpus), "--bytes", "200000"]).status.success());
        let tok = root.join("tok.json");
        assert!(kiln(&["tokenizer", "train", "--input", s(&corpus), "--vocab-size", "300", "--out", s(&tok)])
            .status
            .success());
        let data = root.join("data");
        let out = kiln(&["data", "prepare", "--input", s(&corpus), "--tokenizer", s(&tok), "--out", s(&data)]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        Fixture { _dir: dir, root }
    })
}

/// `kiln train` on the fixture data with small defaults; a flag in `extra` replaces the default.
fn train_args(f: &Fixture, out: &str, extra: &[&str]) -> Vec<String> {
    let data = f.root.join("data");
    let defaults = [
        ("--data", s(&data)),
        ("--preset", "gpt-tiny"),
        ("--steps", "2"),
        ("--batch", "2"),
        ("--seq", "16"),
        ("--eval-every", "1"),
        ("--sample-tokens", "0"),
        ("--out", out),
    ];
    let mut v = vec!["train".to_string()];
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            v.push(flag.to_string());
            v.push(value.to_string());
        }
    }
    v.extend(extra.iter().map(|x| x.to_string()));
    v
}

fn run_train(f: &Fixture, out: &Path, extra: &[&str]) -> Output {
    let args = train_args(f, s(out), extra);
    kiln(&args.iter().map(|x| x.as_str()).collect::<Vec<_>>())
}

#[test]
fn missing_checkpoint() {
    let out = kiln(&["generate", "--ckpt", "/nonexistent/kiln-run", "--prompt", "hi"]);
    assert_fails(&out, 1, "no config.json");
}

#[test]
fn truncated_checkpoint() {
    let f = fixture();
    let run = f.root.join("run-trunc");
    let ok = run_train(f, &run, &[]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let st = run.join("checkpoint/model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    let out = kiln(&["generate", "--ckpt", s(&run), "--prompt", "the"]);
    assert_fails(&out, 1, "truncated or corrupt");
}

#[test]
fn tokenizer_vocabulary_does_not_fit_the_data() {
    let f = fixture();
    // A smaller tokenizer than the one the shards were made with: its model would be too small.
    let small = f.root.join("small-tok.json");
    assert!(kiln(&[
        "tokenizer",
        "train",
        "--input",
        s(&f.root.join("corpus.txt")),
        "--vocab-size",
        "280",
        "--out",
        s(&small)
    ])
    .status
    .success());
    let run = f.root.join("run-vocab");
    let out = run_train(f, &run, &["--tokenizer", s(&small)]);
    assert_fails(&out, 2, "does not fit");
    assert!(!run.join("checkpoint").exists(), "no checkpoint may be written");
}

#[test]
fn empty_corpus() {
    let f = fixture();
    let empty = f.root.join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let out_dir = f.root.join("data-empty");
    let out = kiln(&[
        "data",
        "prepare",
        "--input",
        s(&empty),
        "--tokenizer",
        s(&f.root.join("tok.json")),
        "--out",
        s(&out_dir),
    ]);
    assert_fails(&out, 1, "empty");
    assert!(!out_dir.join("train.bin").exists());
}

#[test]
fn corpus_smaller_than_one_batch() {
    let f = fixture();
    let tiny = f.root.join("tiny.txt");
    std::fs::write(&tiny, "one two three\n").unwrap();
    let data = f.root.join("data-tiny");
    let prep = kiln(&[
        "data",
        "prepare",
        "--input",
        s(&tiny),
        "--tokenizer",
        s(&f.root.join("tok.json")),
        "--out",
        s(&data),
        "--val-fraction",
        "0",
    ]);
    assert!(prep.status.success(), "{}", String::from_utf8_lossy(&prep.stderr));
    let run = f.root.join("run-tiny");
    let out = kiln(&[
        "train",
        "--data",
        s(&data),
        "--preset",
        "gpt-tiny",
        "--steps",
        "2",
        "--batch",
        "2",
        "--seq",
        "32",
        "--out",
        s(&run),
    ]);
    assert_fails(&out, 2, "fewer than one sequence");
}

#[test]
fn sequence_longer_than_context() {
    let f = fixture();
    let out = run_train(f, &f.root.join("run-ctx"), &["--seq", "100"]);
    assert_fails(&out, 2, "longer than the model's context of 64");
}

#[test]
fn nonsensical_flags() {
    let f = fixture();
    assert_fails(&run_train(f, &f.root.join("run-b0"), &["--batch", "0"]), 2, "--batch must be at least 1");
    assert_fails(&run_train(f, &f.root.join("run-lr"), &["--lr", "-0.1"]), 2, "--lr must be a positive number");
    assert_fails(&kiln(&["train", "--steps", "many"]), 2, "invalid value");
    assert_fails(&kiln(&["bench", "train", "--batch", "0"]), 2, "--batch and --seq must be at least 1");
    // A batch that does not split evenly over data-parallel ranks is refused before any work.
    let dp = f.root.join("run-dp");
    assert_fails(&run_train(f, &dp, &["--batch", "5", "--dp", "2"]), 2, "divisible by --dp 2");
    assert!(!dp.join("checkpoint").exists());
    // Precision flags: unknown names, and options that do not go together.
    assert_fails(&run_train(f, &f.root.join("run-p"), &["--precision", "int8"]), 2, "use fp32, bf16 or fp16");
    assert_fails(
        &run_train(f, &f.root.join("run-sr"), &["--stochastic-rounding"]),
        2,
        "--stochastic-rounding applies to --precision bf16 only",
    );
    assert_fails(&kiln(&["bench", "train", "--precision", "fp8"]), 2, "use fp32, bf16 or fp16");
    if !cfg!(feature = "mpi") {
        assert_fails(&kiln(&["train", "--comm", "mpi", "--data", "x"]), 2, "built without MPI");
    }
}

/// A short fp16 run from the command line: the loss scale reaches the metrics and the checkpoint
/// says which precision trained it.
#[test]
fn fp16_and_bf16_train_from_the_command_line() {
    let f = fixture();
    for p in ["bf16", "fp16"] {
        let run = f.root.join(format!("run-{p}"));
        let out = run_train(f, &run, &["--precision", p, "--steps", "3"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let kiln_json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run.join("checkpoint/kiln.json")).unwrap()).unwrap();
        assert_eq!(kiln_json["precision"], p);
        let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
        assert_eq!(metrics.contains("\"loss_scale\":65536.0"), p == "fp16", "{metrics}");
    }
}

#[test]
fn token_ids_outside_the_vocabulary() {
    let f = fixture();
    let run = f.root.join("run-ids");
    assert!(run_train(f, &run, &[]).status.success());
    let out =
        kiln(&["eval", "logits", "--ckpt", s(&run), "--ids", "1,99999", "--out", s(&f.root.join("l.safetensors"))]);
    assert_fails(&out, 2, "outside the model's vocabulary");
}

/// `--stop-at` then `--resume` on the command line, with the run directory moved in between:
/// the metrics continue in the moved directory and the checkpoint reaches the last step.
#[test]
fn stop_move_and_resume() {
    let f = fixture();
    let run = f.root.join("run-stop");
    let out = run_train(f, &run, &["--steps", "4", "--stop-at", "2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let moved = f.root.join("run-moved");
    std::fs::rename(&run, &moved).unwrap();
    let out = kiln(&["train", "--resume", s(&moved)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let steps: Vec<u64> = std::fs::read_to_string(moved.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4]);
    let kiln_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(moved.join("checkpoint/kiln.json")).unwrap()).unwrap();
    assert_eq!(kiln_json["step"], 4);
    assert!(!run.exists(), "the resumed run must not write to the old location");
    // Training again into a directory that holds a checkpoint is refused.
    assert_fails(&run_train(f, &moved, &[]), 2, "already holds a checkpoint");
}

/// `kiln train --preset llama-s` trains a Llama (shrunk to one layer here), its checkpoint is a
/// Hugging Face Llama directory, and `generate` and `eval ppl` run it.
#[test]
fn llama_preset_trains_and_its_checkpoint_generates() {
    let f = fixture();
    let out = f.root.join("llama-run");
    let r = run_train(f, &out, &["--preset", "llama-s", "--n-layer", "1", "--seq", "32"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("checkpoint/config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "llama");
    assert_eq!(config["num_key_value_heads"], 2);
    let g = kiln(&["generate", "--ckpt", s(&out), "--prompt", "1", "--max-new-tokens", "5", "--temperature", "0"]);
    assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));
    let corpus = std::fs::read_to_string(f.root.join("corpus.txt")).unwrap();
    let text = f.root.join("llama-eval.txt");
    std::fs::write(&text, &corpus[..corpus.len().min(4000)]).unwrap();
    let p = kiln(&["eval", "ppl", "--ckpt", s(&out), "--data", s(&text), "--ctx", "32", "--json"]);
    assert!(p.status.success(), "{}", String::from_utf8_lossy(&p.stderr));
    let v: serde_json::Value = serde_json::from_slice(&p.stdout).unwrap();
    // Two steps from random init: finite, and below the uniform 300-token guess at most a little.
    let ppl = v["ppl"].as_f64().unwrap();
    assert!(ppl.is_finite() && ppl > 1.0 && ppl < 400.0, "perplexity {ppl}");
}
