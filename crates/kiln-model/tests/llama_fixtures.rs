//! kiln's Llama family against Hugging Face `transformers` (tools/llama_reference.py, f32,
//! eager attention): logits, loss, every parameter gradient and 20 greedy tokens, for a Llama
//! with grouped-query attention (sharded checkpoint), a Qwen2 (q/k/v biases, tied head) and a
//! Llama with linear RoPE scaling and attention biases. Bound: 1e-4 relative error.

use std::path::PathBuf;

use kiln_model::{generate, load_causal_lm, load_llama_dir, read_safetensors_f32, save_llama_hf_files, SamplingParams};
use kiln_tensor::{CpuKernels, Isa, Kernels, ReferenceKernels};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn check(kind: &str, kernels: &dyn Kernels) {
    let (r, _) = read_safetensors_f32(&fixture(&format!("{kind}_ref.safetensors"))).unwrap();
    let mut model = load_llama_dir(&fixture(&format!("hf_{kind}_tiny"))).unwrap();
    let ids = |k: &str| -> Vec<u32> { r[k].1.iter().map(|&v| v as u32).collect() };
    let (x, y) = (ids("tokens"), ids("targets"));
    let (b, t) = (r["tokens"].0[0], r["tokens"].0[1]);
    let loss = model.forward(kernels, &x, Some(&y), b, t).unwrap().unwrap();
    let want = r["loss"].1[0];
    assert!(((loss - want) / want).abs() < 1e-5, "{kind} loss {loss} vs transformers {want}");
    let e_logits = rel_err(model.logits().unwrap(), &r["logits"].1);
    assert!(e_logits < 1e-4, "{kind} logits relative error {e_logits:e}");

    model.zero_grad();
    model.backward(kernels, 1.0).unwrap();
    let mut worst = (0.0, String::new());
    let mut checked = 0;
    for (i, info) in model.param_info().iter().enumerate() {
        let want = &r.get(&format!("grad.{}", info.name)).unwrap_or_else(|| panic!("no grad for {}", info.name)).1;
        let e = rel_err(&model.grads[i], want);
        assert!(e < 1e-4, "{kind} [{}] grad {} relative error {e:e}", kernels.name(), info.name);
        if e > worst.0 {
            worst = (e, info.name.clone());
        }
        checked += 1;
    }
    let n_ref = r.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(checked, n_ref, "{kind}: every transformers parameter has a kiln twin");
    eprintln!(
        "{kind} [{}]: loss {loss} (transformers {want}), logits err {e_logits:.2e}, worst grad err {:.2e} ({})",
        kernels.name(),
        worst.0,
        worst.1
    );
}

#[test]
fn llama_matches_transformers() {
    for kind in ["llama", "qwen2", "llama_scaled"] {
        check(kind, &CpuKernels::default());
        check(kind, &ReferenceKernels);
        if Isa::detect() != Isa::Scalar {
            check(kind, &CpuKernels::with_isa(Isa::Scalar));
        }
    }
}

/// 20 greedy tokens through the KV cache equal transformers' greedy recompute.
#[test]
fn greedy_generation_matches_transformers() {
    for kind in ["llama", "qwen2", "llama_scaled"] {
        let (r, _) = read_safetensors_f32(&fixture(&format!("{kind}_ref.safetensors"))).unwrap();
        let want: Vec<u32> = r["greedy"].1.iter().map(|&v| v as u32).collect();
        let mut model = load_causal_lm(&fixture(&format!("hf_{kind}_tiny"))).unwrap();
        assert_eq!(model.model_type(), if kind == "qwen2" { "qwen2" } else { "llama" });
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
        let got = generate(
            model.as_mut(),
            &CpuKernels::default(),
            &want[..8],
            20,
            &SamplingParams::greedy(),
            &mut rng,
            &mut |_| true,
        )
        .unwrap();
        assert_eq!(got, want, "{kind}");
    }
}

/// Cached decode of several sequences at different positions equals a full recompute.
#[test]
fn decode_matches_full_recompute() {
    let mut m = load_llama_dir(&fixture("hf_llama_tiny")).unwrap();
    let k = CpuKernels::default();
    let mut seqs: Vec<Vec<u32>> = vec![vec![3, 14, 15, 9], (0..11).map(|i| (i * 7 % 300) as u32).collect(), vec![42]];
    let mut cache = kiln_model::CausalLm::new_cache(&m, 3);
    let last = |m: &mut kiln_model::Llama, ids: &[u32]| -> Vec<f32> {
        m.forward(&k, ids, None, 1, ids.len()).unwrap();
        let v = m.config.vocab_size;
        m.logits().unwrap()[(ids.len() - 1) * v..].to_vec()
    };
    for (s, ids) in seqs.iter().enumerate() {
        let got = kiln_model::CausalLm::prefill(&mut m, &k, &mut cache, s, ids).unwrap();
        assert!(rel_err(&got, &last(&mut m, ids)) < 1e-5);
    }
    // A cache shaped for another model, or a prompt longer than the cache, is an error.
    let mut gpt_cache =
        kiln_model::Gpt::new(kiln_model::GptConfig::preset("gpt-tiny", None).unwrap(), 1).unwrap().new_cache(1);
    assert!(kiln_model::CausalLm::prefill(&mut m, &k, &mut gpt_cache, 0, &[1, 2]).is_err());
    assert!(kiln_model::CausalLm::decode(&mut m, &k, &mut gpt_cache, &[0], &[1]).is_err());
    let mut small = kiln_model::KvCache::new(m.config.n_layer, 1, 4, m.config.kv_dim());
    assert!(kiln_model::CausalLm::prefill(&mut m, &k, &mut small, 0, &[1, 2, 3, 4, 5]).is_err());
    for step in 0..10 {
        let active: Vec<usize> = (0..3).filter(|&s| s != 1 || step % 2 == 0).collect();
        let toks: Vec<u32> = active.iter().map(|&s| ((step * 13 + s * 5) % 300) as u32).collect();
        let got = kiln_model::CausalLm::decode(&mut m, &k, &mut cache, &active, &toks).unwrap();
        for (i, &s) in active.iter().enumerate() {
            seqs[s].push(toks[i]);
            let e = rel_err(&got[i * 300..(i + 1) * 300], &last(&mut m, &seqs[s]));
            assert!(e < 1e-5, "step {step} seq {s}: {e:e}");
        }
    }
}

/// Saved and loaded again, the model is the same tensor for tensor; bad files are errors.
#[test]
fn save_load_round_trip_and_bad_input() {
    let m = load_llama_dir(&fixture("hf_qwen2_tiny")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    save_llama_hf_files(&m, dir.path(), Some(2), Some(0)).unwrap();
    let back = load_llama_dir(dir.path()).unwrap();
    assert_eq!(back.config, m.config);
    assert_eq!(back.params, m.params);
    // A missing tensor, a wrong shape and an unknown architecture are named, not panics.
    let cfg = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        cfg.replace("\"intermediate_size\": 176", "\"intermediate_size\": 177"),
    )
    .unwrap();
    let e = load_llama_dir(dir.path()).err().unwrap().to_string();
    assert!(e.contains("shape"), "{e}");
    std::fs::write(dir.path().join("config.json"), cfg.replace("\"qwen2\"", "\"falcon\"")).unwrap();
    let e = load_causal_lm(dir.path()).err().unwrap().to_string();
    assert!(e.contains("falcon"), "{e}");
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    std::fs::write(dir.path().join("config.json"), &cfg).unwrap();
    assert!(load_llama_dir(dir.path()).is_err());
}
