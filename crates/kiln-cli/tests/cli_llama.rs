//! The command line on Llama-family checkpoints made by `transformers` (kiln-model's fixtures):
//! perplexity, logits, generation benchmark and GGUF export, and their bad-input errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).output().expect("run kiln")
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../kiln-model/tests/fixtures").join(name)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn ok(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}:\n{err}", out.status.code());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn perplexity_logits_and_bench_on_llama_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(&text, "The quick brown fox jumps over the lazy dog. ".repeat(8)).unwrap();
    for m in ["hf_llama_tiny", "hf_qwen2_tiny"] {
        let ck = fixture(m);
        let v: serde_json::Value =
            serde_json::from_str(&ok(&kiln(&["eval", "ppl", "--ckpt", s(&ck), "--data", s(&text), "--json"]))).unwrap();
        let ppl = v["ppl"].as_f64().unwrap();
        // A random 300-token model: perplexity near the vocabulary size, finite and positive.
        assert!(ppl > 10.0 && ppl < 10_000.0, "{m}: ppl {ppl}");
        let out = dir.path().join(format!("{m}.safetensors"));
        ok(&kiln(&["eval", "logits", "--ckpt", s(&ck), "--ids", "1,2,3,4", "--out", s(&out)]));
        assert!(out.is_file());
        let v: serde_json::Value = serde_json::from_str(&ok(&kiln(&[
            "bench",
            "generate",
            "--ckpt",
            s(&ck),
            "--prompt-len",
            "8",
            "--gen",
            "8",
            "--reps",
            "1",
            "--json",
        ])))
        .unwrap();
        assert!(v["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    }
    let v: serde_json::Value = serde_json::from_str(&ok(&kiln(&[
        "bench",
        "generate",
        "--preset",
        "llama-tiny",
        "--prompt-len",
        "8",
        "--gen",
        "8",
        "--reps",
        "1",
        "--json",
    ])))
    .unwrap();
    assert_eq!(v["model_type"], "llama");
}

#[test]
fn gguf_export_and_its_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.gguf");
    ok(&kiln(&["export", "--ckpt", s(&fixture("hf_llama_tiny")), "--type", "q8_0", "--out", s(&out)]));
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(&bytes[..4], b"GGUF");
    assert_eq!(u32::from_le_bytes(bytes[4..8].try_into().unwrap()), 3);

    let bad = kiln(&["export", "--ckpt", s(&fixture("hf_llama_tiny")), "--type", "q3_k", "--out", s(&out)]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("q8_0"));
    // A directory without a vocabulary cannot become a runnable GGUF: a clear failure, no file.
    let no_tok = dir.path().join("no_tok");
    std::fs::create_dir(&no_tok).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("hf_qwen2_tiny").join(f), no_tok.join(f)).unwrap();
    }
    let out2 = dir.path().join("none.gguf");
    let bad = kiln(&["export", "--ckpt", s(&no_tok), "--out", s(&out2)]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("tokenizer.json"));
    assert!(!out2.exists());
}
