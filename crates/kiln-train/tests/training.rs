//! The optimizer against PyTorch, gradient accumulation against one big batch, and resume
//! against the run that never stopped.

use std::path::PathBuf;

use kiln_data::{synthetic, Dataset, PrepareOptions, Tokenizer};
use kiln_model::{load_trainable, read_safetensors_f32, Gpt, GptConfig};
use kiln_tensor::{CpuKernels, Kernels};
use kiln_train::{load_checkpoint, AdamW, Event, TrainConfig, Trainer};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../kiln-model/tests/fixtures").join(name)
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// tools/gpt2_reference.py: 10 steps of clip_grad_norm_(1.0) + torch.optim.AdamW on one batch.
#[test]
fn ten_adamw_steps_match_pytorch() {
    for name in ["gpt_tiny.safetensors", "gpt_s_small.safetensors"] {
        let (t, meta) = read_safetensors_f32(&fixture(name)).unwrap();
        let get = |k: &str| meta[k].parse::<f64>().unwrap();
        let cfg = GptConfig {
            n_layer: get("n_layer") as usize,
            n_head: get("n_head") as usize,
            n_embd: get("n_embd") as usize,
            block_size: get("block_size") as usize,
            vocab_size: get("vocab_size") as usize,
        };
        let (b, s) = (get("batch") as usize, get("seq") as usize);
        let mut model = Gpt::zeros(cfg).unwrap();
        for info in model.param_info().to_vec() {
            model.set_param(&info.name, &t[&info.name].1).unwrap();
        }
        let tc = TrainConfig {
            beta1: get("beta1") as f32,
            beta2: get("beta2") as f32,
            eps: get("eps") as f32,
            weight_decay: get("weight_decay") as f32,
            grad_clip: get("grad_clip") as f32,
            ..Default::default()
        };
        let lr = get("lr") as f32;
        let x: Vec<u32> = t["x"].1.iter().map(|&v| v as u32).collect();
        let y: Vec<u32> = t["y"].1.iter().map(|&v| v as u32).collect();
        let k = CpuKernels::default();
        let mut opt = AdamW::new(&model);
        let (mut losses, mut norms) = (Vec::new(), Vec::new());
        for _ in 0..10 {
            losses.push(model.forward(&k, &x, Some(&y), b, s).unwrap().unwrap());
            model.zero_grad();
            model.backward(&k, 1.0).unwrap();
            norms.push(opt.step(&mut model, &k, lr, &tc));
        }
        let want = &t["losses"].1;
        for (i, (a, w)) in losses.iter().zip(want).enumerate() {
            assert!(((a - w) / w).abs() < 1e-4, "{name} step {i}: loss {a} vs PyTorch {w}");
        }
        let e = rel_err(&norms, &t["grad_norms"].1);
        assert!(e < 1e-4, "{name} grad norms relative error {e:e}");
        eprintln!("{name}: 10 losses {losses:?}\n  PyTorch {want:?}");
    }
}

/// tools/llama_train_reference.py: 10 AdamW steps of `transformers`' Llama (GQA, untied head)
/// and Qwen2 (q/k/v biases, tied head) from the committed checkpoints, through kiln's trainer
/// path (`TrainableLm` + `AdamW`).
#[test]
fn llama_family_training_matches_pytorch() {
    for name in ["llama", "qwen2"] {
        let (t, meta) = read_safetensors_f32(&fixture(&format!("{name}_train_ref.safetensors"))).unwrap();
        let get = |k: &str| meta[k].parse::<f64>().unwrap();
        let mut model = load_trainable(&fixture(&format!("hf_{name}_tiny"))).unwrap();
        let tc = TrainConfig {
            beta1: get("beta1") as f32,
            beta2: get("beta2") as f32,
            eps: get("eps") as f32,
            weight_decay: get("weight_decay") as f32,
            grad_clip: get("grad_clip") as f32,
            ..Default::default()
        };
        let (b, s, lr) = (get("batch") as usize, get("seq") as usize, get("lr") as f32);
        let x: Vec<u32> = t["x"].1.iter().map(|&v| v as u32).collect();
        let y: Vec<u32> = t["y"].1.iter().map(|&v| v as u32).collect();
        let k = CpuKernels::default();
        let mut opt = AdamW::new(model.as_ref());
        let (mut losses, mut norms) = (Vec::new(), Vec::new());
        for _ in 0..10 {
            model.zero_grad();
            losses.push(model.forward(&k, &x, Some(&y), b, s).unwrap().unwrap());
            model.backward(&k, 1.0).unwrap();
            norms.push(opt.step(model.as_mut(), &k, lr, &tc));
        }
        let want = &t["losses"].1;
        for (i, (a, w)) in losses.iter().zip(want).enumerate() {
            assert!(((a - w) / w).abs() < 1e-4, "{name} step {i}: loss {a} vs PyTorch {w}");
        }
        let e = rel_err(&norms, &t["grad_norms"].1);
        assert!(e < 1e-4, "{name} grad norms relative error {e:e}");
        let worst = losses.iter().zip(want).map(|(a, w)| ((a - w) / w).abs()).fold(0.0f32, f32::max);
        eprintln!("{name}: 10 losses within {worst:.1e} relative of PyTorch, grad norms {e:.1e}");
    }
}

/// K micro-batches of B give the gradients of one batch of K·B.
#[test]
fn gradient_accumulation_matches_one_big_batch() {
    let cfg = GptConfig::preset("gpt-tiny", Some(101)).unwrap();
    let k = CpuKernels::default();
    let (bk, t, kk) = (3usize, 17usize, 4usize);
    let n = bk * t * kk;
    let x: Vec<u32> = (0..n).map(|i| ((i * 37 + 11) % 101) as u32).collect();
    let y: Vec<u32> = (0..n).map(|i| ((i * 53 + 5) % 101) as u32).collect();
    let mut big = Gpt::new(cfg.clone(), 7).unwrap();
    big.zero_grad();
    big.forward(&k, &x, Some(&y), bk * kk, t).unwrap();
    big.backward(&k, 1.0).unwrap();
    let mut acc = Gpt::new(cfg, 7).unwrap();
    acc.zero_grad();
    for m in 0..kk {
        let r = m * bk * t..(m + 1) * bk * t;
        acc.forward(&k, &x[r.clone()], Some(&y[r]), bk, t).unwrap();
        acc.backward(&k, 1.0 / kk as f32).unwrap();
    }
    for (i, info) in big.param_info().iter().enumerate() {
        let e = rel_err(acc.grad_values(i), big.grad_values(i));
        assert!(e < 1e-5, "{}: accumulated gradient differs by {e:e}", info.name);
    }
    // And 10 optimizer steps later the two runs still agree.
    let tc = TrainConfig::default();
    let (mut opt_big, mut opt_acc) = (AdamW::new(&big), AdamW::new(&acc));
    opt_big.step(&mut big, &k, 1e-3, &tc);
    opt_acc.step(&mut acc, &k, 1e-3, &tc);
    for step in 1..10 {
        big.zero_grad();
        let l_big = big.forward(&k, &x, Some(&y), bk * kk, t).unwrap().unwrap();
        big.backward(&k, 1.0).unwrap();
        opt_big.step(&mut big, &k, 1e-3, &tc);
        acc.zero_grad();
        let mut l_acc = 0.0;
        for m in 0..kk {
            let r = m * bk * t..(m + 1) * bk * t;
            l_acc += acc.forward(&k, &x[r.clone()], Some(&y[r]), bk, t).unwrap().unwrap() / kk as f32;
            acc.backward(&k, 1.0 / kk as f32).unwrap();
        }
        opt_acc.step(&mut acc, &k, 1e-3, &tc);
        assert!(((l_acc - l_big) / l_big).abs() < 1e-5, "step {step}: loss {l_acc} with accumulation vs {l_big}");
    }
}

fn tiny_run(dir: &std::path::Path, preset: &str) -> (TrainConfig, Tokenizer, std::path::PathBuf) {
    let corpus = dir.join("corpus.txt");
    synthetic::write_corpus(3, 60_000, &corpus).unwrap();
    let tok = Tokenizer::train_bpe(std::slice::from_ref(&corpus), 300).unwrap();
    let data = dir.join("data");
    let opts = PrepareOptions { val_fraction: 0.1, ..Default::default() };
    kiln_data::prepare(&[corpus.display().to_string()], &tok, &data, &opts, &mut |_, _| {}).unwrap();
    let cfg = TrainConfig {
        preset: preset.into(),
        steps: 6,
        batch: 2,
        seq: 32,
        lr: 3e-3,
        warmup_steps: 2,
        eval_every: 3,
        eval_batches: 2,
        sample_tokens: 8,
        seed: 11,
        out: dir.join("run"),
        ..Default::default()
    };
    (cfg, tok, data)
}

fn losses_of(metrics: &std::path::Path) -> Vec<(u64, u32)> {
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), (v["loss"].as_f64().unwrap() as f32).to_bits())
        })
        .collect()
}

/// Stop at step 3, resume, finish: the same loss bits as a run that never stopped, for GPT-2
/// and for Llama.
#[test]
fn resume_is_bit_identical() {
    for preset in ["gpt-tiny", "llama-tiny"] {
        resume_is_bit_identical_for(preset);
    }
}

fn resume_is_bit_identical_for(preset: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, tok, data) = tiny_run(tmp.path(), preset);
    let kern = || -> Box<dyn Kernels> { Box::new(CpuKernels::default()) };

    let mut full_cfg = cfg.clone();
    full_cfg.out = tmp.path().join("full");
    let mut full = Trainer::new(full_cfg.clone(), tok.clone(), Dataset::open(&data).unwrap(), kern()).unwrap();
    full.run(&mut |_| {}).unwrap();
    let want = losses_of(&full_cfg.metrics_path());
    assert_eq!(want.len(), 6);
    assert!(f32::from_bits(want[5].1) < f32::from_bits(want[0].1), "{preset}: loss did not fall: {want:?}");

    let mut part = Trainer::new(cfg.clone(), tok, Dataset::open(&data).unwrap(), kern()).unwrap();
    let mut saved = false;
    part.run_until(3, &mut |e| saved |= matches!(e, Event::Checkpoint { step: 3, .. })).unwrap();
    assert!(saved);
    drop(part);
    let ck = load_checkpoint(&cfg.out).unwrap();
    assert_eq!(ck.model.model_type(), if preset.starts_with("llama") { "llama" } else { "gpt2" });
    let mut resumed = Trainer::resume(ck, cfg.clone(), Dataset::open(&data).unwrap(), kern()).unwrap();
    assert_eq!(resumed.step, 3);
    resumed.run(&mut |_| {}).unwrap();
    assert_eq!(losses_of(&cfg.metrics_path()), want, "{preset}: resumed run diverged from the uninterrupted one");
}
