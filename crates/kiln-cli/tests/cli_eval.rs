//! `kiln eval` on the command line: sacrebleu's and rouge-score's documented examples, JSON
//! output for scripts, and clear errors.

use std::process::{Command, Output};

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).output().expect("run kiln")
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn bleu_chrf_and_rouge_match_the_reference_tools_documented_examples() {
    let d = tempfile::tempdir().unwrap();
    let hyp = write(d.path(), "hyp.txt", "The dog bit the man.\nIt wasn't surprising.\nThe man had just bitten him.\n");
    let r1 = write(d.path(), "r1.txt", "The dog bit the man.\nIt was not unexpected.\nThe man bit him first.\n");
    let r2 =
        write(d.path(), "r2.txt", "The dog had bit the man.\nNo one was surprised.\nThe man had bitten the dog.\n");
    // sacrebleu's README: BLEU 48.53, chrF 59.73 on this corpus.
    let out = kiln(&["eval", "bleu", "--hyp", &hyp, "--ref", &r1, "--ref", &r2, "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!((v["score"].as_f64().unwrap() - 48.530827009929865).abs() < 1e-9, "{v}");
    assert_eq!(v["signature"], "nrefs:2|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0");
    let out = kiln(&["eval", "chrf", "--hyp", &hyp, "--ref", &r1, "--ref", &r2, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!((v["score"].as_f64().unwrap() - 59.72751782684763).abs() < 1e-9, "{v}");
    // rouge-score's README example.
    let p = write(d.path(), "p.txt", "The quick brown dog jumps on the log.\n");
    let t = write(d.path(), "t.txt", "The quick brown fox jumps over the lazy dog\n");
    let out = kiln(&["eval", "rouge", "--hyp", &p, "--ref", &t, "--bootstrap", "0", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!((v["rouge1"]["fmeasure"].as_f64().unwrap() - 0.7058823529411765).abs() < 1e-12, "{v}");
    assert!((v["rougeL"]["fmeasure"].as_f64().unwrap() - 0.5882352941176471).abs() < 1e-12, "{v}");
}

#[test]
fn eval_errors_are_clear() {
    let d = tempfile::tempdir().unwrap();
    let hyp = write(d.path(), "hyp.txt", "a\nb\n");
    let r = write(d.path(), "r.txt", "a\n");
    let out = kiln(&["eval", "bleu", "--hyp", &hyp, "--ref", &r]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("segments") || err.contains("lines"), "{err}");
    assert!(!err.contains("panicked"));
    let out = kiln(&["eval", "bleu", "--hyp", &hyp, "--ref", &hyp, "--tokenize", "klingon"]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    let out = kiln(&["eval", "ppl", "--ckpt", "/nonexistent", "--data", &hyp]);
    assert_eq!(out.status.code(), Some(1));
    let bad_task = write(d.path(), "task.jsonl", "{\"prompt\": \"x\"}\n");
    let out = kiln(&["report", "--add", &bad_task, "--out", d.path().join("r.html").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a kiln eval"));
    assert!(!d.path().join("r.html").exists(), "no half-written report");
}
