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

fn fails_with(out: &Output, code: i32, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    assert!(err.contains(needle), "expected '{needle}' in: {err}");
}

/// `kiln quantize` writes a checkpoint that generate, eval and bench run, reports size,
/// perplexity and KL; bad requests exit 2 and write nothing. `--integer-only` runs the
/// fixed-point executor through the same commands.
#[test]
fn quantize_then_run_and_integer_only() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(&text, "The quick brown fox jumps over the lazy dog. A kiln fires clay. ".repeat(12)).unwrap();
    let ck = fixture("hf_llama_tiny");
    for (scheme, method) in [("int4", "awq"), ("int8", "gptq"), ("w8a8", "smoothquant"), ("int4", "rtn")] {
        let out = dir.path().join(format!("q-{scheme}-{method}"));
        let args = [
            "quantize",
            "--ckpt",
            s(&ck),
            "--scheme",
            scheme,
            "--method",
            method,
            "--group-size",
            "32",
            "--calib",
            s(&text),
            "--eval",
            s(&text),
            "--out",
            s(&out),
            "--json",
        ];
        let v: serde_json::Value = serde_json::from_str(&ok(&kiln(&args))).unwrap();
        assert!(v["quantized_bytes"].as_u64().unwrap() < v["float_bytes"].as_u64().unwrap() / 2, "{v}");
        let (before, after) = (v["ppl_before"].as_f64().unwrap(), v["ppl_after"].as_f64().unwrap());
        assert!(after.is_finite() && (after / before - 1.0).abs() < 0.5, "{scheme}/{method}: {before} -> {after}");
        assert!(v["kl_mean"].as_f64().unwrap() >= 0.0 && v["top1_agreement"].as_f64().unwrap() > 0.5, "{v}");
        ok(&kiln(&[
            "generate",
            "--ckpt",
            s(&out),
            "--prompt",
            "The quick",
            "--max-new-tokens",
            "4",
            "--temperature",
            "0",
        ]));
        let args = ["eval", "ppl", "--ckpt", s(&out), "--data", s(&text), "--ctx", "128", "--stride", "128", "--json"];
        let p: serde_json::Value = serde_json::from_str(&ok(&kiln(&args))).unwrap();
        // The same disjoint windows as the report's --eval, on the checkpoint read back: the same perplexity.
        let again = p["ppl"].as_f64().unwrap();
        assert!((again / after - 1.0).abs() < 1e-9, "{scheme}/{method}: eval ppl {again} vs quantize's {after}");
    }
    let q = dir.path().join("q-int4-awq");
    fails_with(&kiln(&["quantize", "--ckpt", s(&ck), "--scheme", "int4", "--out", s(&q)]), 2, "exists");
    let fresh = dir.path().join("fresh");
    fails_with(
        &kiln(&["quantize", "--ckpt", s(&ck), "--scheme", "int4", "--method", "awq", "--out", s(&fresh)]),
        2,
        "--calib",
    );
    fails_with(&kiln(&["quantize", "--ckpt", s(&ck), "--scheme", "int3", "--out", s(&fresh)]), 2, "--scheme");
    fails_with(
        &kiln(&["quantize", "--ckpt", s(&ck), "--scheme", "w8a8", "--method", "awq", "--out", s(&fresh)]),
        2,
        "does not go with",
    );
    fails_with(&kiln(&["quantize", "--ckpt", s(&q), "--scheme", "int8", "--out", s(&fresh)]), 2, "already quantized");
    fails_with(
        &kiln(&["quantize", "--ckpt", s(&ck), "--scheme", "int4", "--sequential", "--out", s(&fresh)]),
        2,
        "--sequential needs a calibrated method",
    );
    assert!(!fresh.exists());

    let ppl = |extra: &[&str]| -> f64 {
        let mut args = vec!["eval", "ppl", "--ckpt", s(&ck), "--data", s(&text), "--json"];
        args.extend_from_slice(extra);
        let v: serde_json::Value = serde_json::from_str(&ok(&kiln(&args))).unwrap();
        v["ppl"].as_f64().unwrap()
    };
    let (float, int) = (ppl(&[]), ppl(&["--integer-only", "--calib", s(&text)]));
    assert_eq!(int, ppl(&["--integer-only", "--calib", s(&text)]), "integer-only must be deterministic");
    assert!((int / float - 1.0).abs() < 0.5, "integer-only perplexity {int} vs float {float}");
    ok(&kiln(&["generate", "--ckpt", s(&ck), "--prompt", "The", "--max-new-tokens", "4", "--integer-only"]));
}
