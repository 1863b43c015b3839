//! The optimizer against PyTorch, gradient accumulation against one big batch, and resume
//! against the run that never stopped.

use std::path::PathBuf;

use kiln_data::{synthetic, Dataset, PrepareOptions, Tokenizer};
use kiln_model::{load_trainable, read_safetensors_f32, Gpt, GptConfig};
use kiln_tensor::{CpuKernels, Kernels, LowPrecision, MixedPrecisionKernels};
use kiln_train::{load_checkpoint, AdamW, Event, Precision, TrainConfig, Trainer};

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

/// K micro-batches of B give the gradients of one batch of K·B: within 1e-5 in f32; in bf16
/// the rows' activations are rounded identically either way, but the loss gradient's scale
/// (1/K · 1/(B·T) against 1/(K·B·T)) can differ in its last f32 bit and flip a bf16 rounding
/// of an activation gradient, so the bound there is 1e-3.
#[test]
fn gradient_accumulation_matches_one_big_batch() {
    gradient_accumulation_case(&CpuKernels::default(), 1e-5);
    let bf16 = MixedPrecisionKernels::new(Box::new(CpuKernels::default()), LowPrecision::Bf16, false);
    gradient_accumulation_case(&bf16, 1e-3);
}

fn gradient_accumulation_case(k: &dyn Kernels, tol: f64) {
    let cfg = GptConfig::preset("gpt-tiny", Some(101)).unwrap();
    let (bk, t, kk) = (3usize, 17usize, 4usize);
    let n = bk * t * kk;
    let x: Vec<u32> = (0..n).map(|i| ((i * 37 + 11) % 101) as u32).collect();
    let y: Vec<u32> = (0..n).map(|i| ((i * 53 + 5) % 101) as u32).collect();
    let mut big = Gpt::new(cfg.clone(), 7).unwrap();
    big.zero_grad();
    big.forward(k, &x, Some(&y), bk * kk, t).unwrap();
    big.backward(k, 1.0).unwrap();
    let mut acc = Gpt::new(cfg, 7).unwrap();
    acc.zero_grad();
    for m in 0..kk {
        let r = m * bk * t..(m + 1) * bk * t;
        acc.forward(k, &x[r.clone()], Some(&y[r]), bk, t).unwrap();
        acc.backward(k, 1.0 / kk as f32).unwrap();
    }
    for (i, info) in big.param_info().iter().enumerate() {
        let e = rel_err(acc.grad_values(i), big.grad_values(i));
        assert!(e < tol, "{} [{}]: accumulated gradient differs by {e:e}", k.name(), info.name);
    }
    // And 10 optimizer steps later the two runs still agree.
    let tc = TrainConfig::default();
    let (mut opt_big, mut opt_acc) = (AdamW::new(&big), AdamW::new(&acc));
    opt_big.step(&mut big, k, 1e-3, &tc);
    opt_acc.step(&mut acc, k, 1e-3, &tc);
    for step in 1..10 {
        big.zero_grad();
        let l_big = big.forward(k, &x, Some(&y), bk * kk, t).unwrap().unwrap();
        big.backward(k, 1.0).unwrap();
        opt_big.step(&mut big, k, 1e-3, &tc);
        acc.zero_grad();
        let mut l_acc = 0.0;
        for m in 0..kk {
            let r = m * bk * t..(m + 1) * bk * t;
            l_acc += acc.forward(k, &x[r.clone()], Some(&y[r]), bk, t).unwrap().unwrap() / kk as f32;
            acc.backward(k, 1.0 / kk as f32).unwrap();
        }
        opt_acc.step(&mut acc, k, 1e-3, &tc);
        let e = ((l_acc - l_big) / l_big).abs() as f64;
        assert!(e < tol, "[{}] step {step}: loss {l_acc} with accumulation vs {l_big}", k.name());
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
        resume_is_bit_identical_for(preset, &|_| {});
    }
}

/// The same in bf16 with stochastic rounding (the rounding key must survive the restart) and in
/// fp16, whose loss scale (doubling every 2 clean steps here) must come back from the checkpoint.
#[test]
fn mixed_precision_resume_is_bit_identical() {
    resume_is_bit_identical_for("gpt-tiny", &|c| {
        c.precision = Precision::Bf16;
        c.stochastic_rounding = true;
    });
    resume_is_bit_identical_for("gpt-tiny", &|c| {
        c.precision = Precision::Fp16;
        c.loss_scale_growth_interval = 2;
    });
}

fn resume_is_bit_identical_for(preset: &str, tweak: &dyn Fn(&mut TrainConfig)) {
    let tmp = tempfile::tempdir().unwrap();
    let (mut cfg, tok, data) = tiny_run(tmp.path(), preset);
    tweak(&mut cfg);
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
    let scaler_at_3 = part.scaler.clone();
    drop(part);
    let ck = load_checkpoint(&cfg.out).unwrap();
    assert_eq!(ck.state.as_ref().unwrap().loss_scaler, scaler_at_3);
    assert_eq!(ck.model.model_type(), if preset.starts_with("llama") { "llama" } else { "gpt2" });
    let mut resumed = Trainer::resume(ck, cfg.clone(), Dataset::open(&data).unwrap(), kern()).unwrap();
    assert_eq!(resumed.step, 3);
    assert_eq!(resumed.scaler, scaler_at_3);
    if cfg.precision == Precision::Fp16 {
        assert_eq!(scaler_at_3.as_ref().unwrap().scale, 131072.0, "3 clean steps with growth every 2: doubled once");
    }
    resumed.run(&mut |_| {}).unwrap();
    assert_eq!(losses_of(&cfg.metrics_path()), want, "{preset}: resumed run diverged from the uninterrupted one");
}

fn metric_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// bf16 training (nearest-even and stochastic rounding of the weights) ends within 2% of the
/// fp32 run's validation loss on the synthetic corpus.
#[test]
fn bf16_training_converges_like_fp32() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, tok, data) = tiny_run(tmp.path(), "gpt-tiny");
    let base = TrainConfig { steps: 80, batch: 4, eval_every: 80, eval_batches: 4, sample_tokens: 0, ..base };
    let val_loss = |name: &str, precision: Precision, sr: bool| -> f32 {
        let cfg = TrainConfig { precision, stochastic_rounding: sr, out: tmp.path().join(name), ..base.clone() };
        let mut tr =
            Trainer::new(cfg.clone(), tok.clone(), Dataset::open(&data).unwrap(), Box::new(CpuKernels::default()))
                .unwrap();
        tr.run(&mut |_| {}).unwrap();
        let lines = metric_lines(&cfg.metrics_path());
        lines.last().unwrap()["val_loss"].as_f64().unwrap() as f32
    };
    let f32_loss = val_loss("fp32", Precision::Fp32, false);
    let first = metric_lines(&tmp.path().join("fp32/metrics.jsonl"))[0]["loss"].as_f64().unwrap() as f32;
    assert!(f32_loss < 0.8 * first, "fp32 did not learn: {first} -> {f32_loss}");
    for (name, sr) in [("bf16", false), ("bf16-sr", true)] {
        let l = val_loss(name, Precision::Bf16, sr);
        let rel = (l - f32_loss).abs() / f32_loss;
        eprintln!("{name}: val loss {l:.6} vs fp32 {f32_loss:.6} ({:+.3}%)", 100.0 * (l - f32_loss) / f32_loss);
        assert!(rel < 0.02, "{name} val loss {l} is {:.1}% from fp32's {f32_loss}", 100.0 * rel);
    }
}

/// fp16 loss scaling with a real overflow: an initial scale of 2^30 makes the scaled loss
/// gradient overflow fp16 (beyond 65504) in the head's backward, so the first steps are skipped
/// (weights untouched), the scale halves each time, and training then goes on and learns.
#[test]
fn fp16_overflow_skips_the_step_and_halves_the_scale() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, tok, data) = tiny_run(tmp.path(), "gpt-tiny");
    let cfg = TrainConfig {
        precision: Precision::Fp16,
        loss_scale: 2f32.powi(30),
        steps: 40,
        batch: 4,
        eval_every: 40,
        sample_tokens: 0,
        ..base
    };
    let mut tr =
        Trainer::new(cfg.clone(), tok, Dataset::open(&data).unwrap(), Box::new(CpuKernels::default())).unwrap();
    let before: Vec<Vec<f32>> = tr.model.params().iter().map(|p| p.to_vec()).collect();
    tr.run_until(1, &mut |_| {}).unwrap();
    assert_eq!(tr.scaler.as_ref().unwrap().skipped_steps, 1, "2^30 must overflow fp16");
    let after: Vec<Vec<f32>> = tr.model.params().iter().map(|p| p.to_vec()).collect();
    assert!(before == after, "a skipped step changed the weights");
    assert_eq!(tr.opt.t, 0, "a skipped step advanced AdamW");
    tr.run(&mut |_| {}).unwrap();

    let lines = metric_lines(&cfg.metrics_path());
    assert_eq!(lines.len(), 40);
    let skipped: Vec<bool> = lines.iter().map(|l| l["skipped"].as_bool().unwrap_or(false)).collect();
    let n_skipped = skipped.iter().filter(|&&s| s).count();
    // The scale settles where the gradients first fit, and may overflow again later as they grow.
    let leading = skipped.iter().take_while(|&&s| s).count();
    assert!((2..20).contains(&leading), "the run should open with a few skipped steps: {skipped:?}");
    for w in lines.windows(2) {
        let scale = |l: &serde_json::Value| l["loss_scale"].as_f64().unwrap() as f32;
        let (s0, s1) = (scale(&w[0]), scale(&w[1]));
        let want = if w[0]["skipped"].as_bool().unwrap_or(false) { s0 / 2.0 } else { s0 };
        assert_eq!(s1, want, "scale after step {}", w[0]["step"]);
    }
    assert_eq!(tr.scaler.as_ref().unwrap().skipped_steps as usize, n_skipped);
    assert_eq!(tr.opt.t as usize, 40 - n_skipped);
    let (l0, l1) = (lines[leading]["loss"].as_f64().unwrap(), lines[39]["loss"].as_f64().unwrap());
    assert!(l1 < 0.8 * l0, "fp16 training after the overflow did not learn: {l0} -> {l1}");
}
