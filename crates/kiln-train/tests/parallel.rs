//! Data parallelism and ZeRO-1 against the single-rank run with the same global batch, and
//! checkpoints that move between plans.
//!
//! Bound: 1e-5 relative on every loss. The ranks sum the same products in a different order
//! (each GEMM reduces over half the rows, then the halves are added; the loss is a mean of
//! per-rank means), which changes gradients by a few f32 ulps (~1e-7 relative); ten AdamW steps
//! keep that far below 1e-5 because the update is normalised by the second moment.

use std::path::{Path, PathBuf};

use kiln_data::{synthetic, Dataset, PrepareOptions, Tokenizer};
use kiln_tensor::{CpuKernels, Kernels};
use kiln_train::{load_checkpoint, TrainConfig, Trainer};

const BOUND: f64 = 1e-5;

fn prepare(dir: &Path) -> (Tokenizer, PathBuf) {
    let corpus = dir.join("corpus.txt");
    synthetic::write_corpus(5, 60_000, &corpus).unwrap();
    let tok = Tokenizer::train_bpe(std::slice::from_ref(&corpus), 300).unwrap();
    let data = dir.join("data");
    let opts = PrepareOptions { val_fraction: 0.1, ..Default::default() };
    kiln_data::prepare(&[corpus.display().to_string()], &tok, &data, &opts, &mut |_, _| {}).unwrap();
    (tok, data)
}

fn base_cfg(dir: &Path, name: &str) -> TrainConfig {
    TrainConfig {
        preset: "gpt-tiny".into(),
        steps: 10,
        batch: 4,
        seq: 32,
        lr: 3e-3,
        warmup_steps: 2,
        eval_every: 5,
        eval_batches: 2,
        sample_tokens: 0,
        seed: 21,
        out: dir.join(name),
        comm_timeout_s: 60,
        ..Default::default()
    }
}

fn kern() -> Box<dyn Kernels> {
    Box::new(CpuKernels::default())
}

/// (step, loss, val_loss) of every line of a run's metrics.
fn curve(cfg: &TrainConfig) -> Vec<(u64, f32, Option<f32>)> {
    std::fs::read_to_string(cfg.metrics_path())
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap() as f32, v["val_loss"].as_f64().map(|x| x as f32))
        })
        .collect()
}

fn run(cfg: &TrainConfig, tok: &Tokenizer, data: &Path) -> Vec<(u64, f32, Option<f32>)> {
    let mut t = Trainer::new(cfg.clone(), tok.clone(), Dataset::open(data).unwrap(), kern()).unwrap();
    t.run(&mut |_| {}).unwrap();
    curve(cfg)
}

fn assert_close(what: &str, got: &[(u64, f32, Option<f32>)], want: &[(u64, f32, Option<f32>)]) {
    assert_within(what, got, want, BOUND)
}

fn assert_within(what: &str, got: &[(u64, f32, Option<f32>)], want: &[(u64, f32, Option<f32>)], bound: f64) {
    assert_eq!(got.len(), want.len(), "{what}: {got:?} vs {want:?}");
    let mut worst = 0.0f64;
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.0, w.0);
        let rel = ((g.1 as f64 - w.1 as f64) / w.1 as f64).abs();
        worst = worst.max(rel);
        assert!(rel < bound, "{what}: step {} loss {} vs single rank {} (rel {rel:e})", g.0, g.1, w.1);
        match (g.2, w.2) {
            (Some(a), Some(b)) => assert!(((a - b) / b).abs() < bound as f32, "{what}: val loss {a} vs {b}"),
            (None, None) => {}
            other => panic!("{what}: val loss presence differs at step {}: {other:?}", g.0),
        }
    }
    eprintln!("{what}: 10 losses within {worst:.2e} relative of the single-rank run");
}

#[test]
fn data_parallel_and_zero1_match_the_single_rank_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (tok, data) = prepare(tmp.path());
    let single = run(&base_cfg(tmp.path(), "single"), &tok, &data);
    assert!(single[9].1 < single[0].1, "loss did not fall: {single:?}");

    let dp2 = TrainConfig { dp: 2, ..base_cfg(tmp.path(), "dp2") };
    assert_close("dp=2", &run(&dp2, &tok, &data), &single);
    let zero = TrainConfig { dp: 2, zero: 1, ..base_cfg(tmp.path(), "zero") };
    assert_close("dp=2 ZeRO-1", &run(&zero, &tok, &data), &single);
    let dp4 = TrainConfig { dp: 4, zero: 1, ..base_cfg(tmp.path(), "dp4") };
    assert_close("dp=4 ZeRO-1", &run(&dp4, &tok, &data), &single);

    let accum = |name: &str, dp| TrainConfig { grad_accum: 2, dp, ..base_cfg(tmp.path(), name) };
    let single_acc = run(&accum("single-acc", 1), &tok, &data);
    assert_close("dp=2 grad-accum 2", &run(&accum("dp2-acc", 2), &tok, &data), &single_acc);
}

/// Tensor parallelism (heads and MLP units split over 2 ranks), pipeline parallelism (2
/// stages, 1F1B) and their products with data parallelism and ZeRO-1 train the same 10 steps
/// as one rank; evaluation and the final checkpoint see the gathered whole model.
#[test]
fn tensor_and_pipeline_parallel_match_the_single_rank_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (tok, data) = prepare(tmp.path());
    let single = run(&base_cfg(tmp.path(), "single"), &tok, &data);
    let plan = |name: &str, dp, tp, pp, zero| TrainConfig { dp, tp, pp, zero, ..base_cfg(tmp.path(), name) };
    for (name, dp, tp, pp, zero) in [
        ("tp2", 1, 2, 1, 0),
        ("pp2", 1, 1, 2, 0),
        ("dp2xtp2", 2, 2, 1, 0),
        ("dp2xpp2", 2, 1, 2, 0),
        ("tp2xpp2", 1, 2, 2, 1),
    ] {
        let cfg = plan(name, dp, tp, pp, zero);
        let got = run(&cfg, &tok, &data);
        assert_close(&format!("dp={dp} tp={tp} pp={pp} zero={zero}"), &got, &single);
        // The checkpoint is the whole model, by name, as a single rank writes it.
        let ck = load_checkpoint(&cfg.out).unwrap();
        assert_eq!(ck.model.param_info().len(), 2 + 2 * 12 + 2, "{name}: every tensor of gpt-tiny");
    }
    // More micro-batches than stages, with gradient accumulation on top.
    let accum =
        |name: &str, pp, micro| TrainConfig { grad_accum: 2, pp, micro_batches: micro, ..base_cfg(tmp.path(), name) };
    let single_acc = run(&accum("single-acc", 1, None), &tok, &data);
    assert_close("pp=2 M=4 grad-accum 2", &run(&accum("pp2-m4", 2, Some(4)), &tok, &data), &single_acc);
}

/// bf16 composes with data parallelism. The bound is wider than f32's: after the first step
/// the ranks' weights differ from the single rank's by f32 ulps (reordered gradient sums), and a
/// weight that sits on a bf16 rounding boundary can then round the other way (one bf16 ulp,
/// 2^-8 relative), so the runs drift apart by more than the f32 bound: measured 4.2e-5 (dp=2)
/// and 1.8e-5 (ZeRO-1) over 10 steps; the bound is 2e-4.
#[test]
fn bf16_data_parallel_matches_the_single_rank_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (tok, data) = prepare(tmp.path());
    let bf16 = |name: &str, dp, zero| TrainConfig {
        precision: kiln_train::Precision::Bf16,
        dp,
        zero,
        ..base_cfg(tmp.path(), name)
    };
    let single = run(&bf16("single", 1, 0), &tok, &data);
    assert!(single[9].1 < single[0].1, "loss did not fall: {single:?}");
    assert_within("bf16 dp=2", &run(&bf16("dp2", 2, 0), &tok, &data), &single, 2e-4);
    assert_within("bf16 dp=2 ZeRO-1", &run(&bf16("zero", 2, 1), &tok, &data), &single, 2e-4);
    // Stochastic rounding keys on the weights, which the replicas hold bit-identically.
    let sr = |name: &str, dp| TrainConfig { stochastic_rounding: true, ..bf16(name, dp, 0) };
    let single_sr = run(&sr("single-sr", 1), &tok, &data);
    assert_within("bf16 stochastic dp=2", &run(&sr("dp2-sr", 2), &tok, &data), &single_sr, 2e-4);
}

/// fp16 loss scaling under data parallelism: an initial scale of 2^24 overflows. Each rank's
/// loss gradient is pre-divided by the rank count, so its rows overflow exactly where one
/// rank's would; every rank decides on the same all-reduced norm, so all skip the same steps
/// as the single rank, and the losses match: measured 3.7e-6 (dp=2) and 2.5e-6 (ZeRO-1) over
/// 10 steps, bound 5e-5 (fp16 roundings flip less often than bf16's, see above).
#[test]
fn fp16_loss_scaling_under_data_parallel_skips_like_one_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let (tok, data) = prepare(tmp.path());
    let fp16 = |name: &str, dp, zero| TrainConfig {
        precision: kiln_train::Precision::Fp16,
        loss_scale: 2f32.powi(24),
        dp,
        zero,
        ..base_cfg(tmp.path(), name)
    };
    let skipped = |cfg: &TrainConfig| -> Vec<bool> {
        std::fs::read_to_string(cfg.metrics_path())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["skipped"].as_bool().unwrap_or(false))
            .collect()
    };
    let one = fp16("single", 1, 0);
    let single = run(&one, &tok, &data);
    let want = skipped(&one);
    assert!(want[0] && want.iter().any(|s| !s), "2^24 should overflow first, then fit: {want:?}");
    for (name, zero) in [("dp2", 0), ("zero", 1)] {
        let cfg = fp16(name, 2, zero);
        assert_within(&format!("fp16 {name}"), &run(&cfg, &tok, &data), &single, 5e-5);
        assert_eq!(skipped(&cfg), want, "fp16 {name}: skipped steps differ from one rank's");
    }
}

/// Mixed precision composes with tensor and pipeline parallelism: bf16 and fp16 (with a
/// 2^24 loss scale that overflows first) under tp=2, pp=2 and tp=2 × pp=2 follow the single
/// rank in the same precision within the bounds above (bf16 2e-4, fp16 5e-5), and fp16 skips
/// the same steps.
#[test]
fn mixed_precision_under_tensor_and_pipeline_parallel_matches_one_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let (tok, data) = prepare(tmp.path());
    let skipped = |cfg: &TrainConfig| -> Vec<bool> {
        std::fs::read_to_string(cfg.metrics_path())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["skipped"].as_bool().unwrap_or(false))
            .collect()
    };
    for (precision, bound) in [(kiln_train::Precision::Bf16, 2e-4), (kiln_train::Precision::Fp16, 5e-5)] {
        let cfg = |name: &str, tp, pp| TrainConfig {
            precision,
            loss_scale: 2f32.powi(24),
            tp,
            pp,
            ..base_cfg(tmp.path(), &format!("{precision:?}-{name}"))
        };
        let one = cfg("single", 1, 1);
        let single = run(&one, &tok, &data);
        let want = skipped(&one);
        let fp16 = precision == kiln_train::Precision::Fp16;
        assert!(!fp16 || (want[0] && want.iter().any(|s| !s)), "2^24 should overflow first, then fit: {want:?}");
        for (name, tp, pp) in [("tp2", 2, 1), ("pp2", 1, 2), ("tp2xpp2", 2, 2)] {
            let c = cfg(name, tp, pp);
            assert_within(&format!("{precision:?} {name}"), &run(&c, &tok, &data), &single, bound);
            assert_eq!(skipped(&c), want, "{precision:?} {name}: skipped steps differ from one rank's");
        }
    }
}

/// The same plans train a Llama (RMSNorm, RoPE, SwiGLU, grouped-query attention).
#[test]
fn data_parallel_and_zero1_train_llama_like_one_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let (tok, data) = prepare(tmp.path());
    let llama =
        |name: &str, dp, zero| TrainConfig { preset: "llama-tiny".into(), dp, zero, ..base_cfg(tmp.path(), name) };
    let single = run(&llama("single", 1, 0), &tok, &data);
    assert!(single[9].1 < single[0].1, "loss did not fall: {single:?}");
    assert_close("llama dp=2", &run(&llama("dp2", 2, 0), &tok, &data), &single);
    assert_close("llama dp=2 ZeRO-1", &run(&llama("zero", 2, 1), &tok, &data), &single);
}

/// The same on a small gpt-s-shaped model (more layers and a wider residual stream), with the
/// moments compared after the run as well.
#[test]
fn zero1_matches_on_a_small_gpt_s_shape() {
    let tmp = tempfile::tempdir().unwrap();
    let (tok, data) = prepare(tmp.path());
    let shape = |name: &str, dp, zero| TrainConfig {
        preset: "gpt-s".into(),
        n_layer: Some(3),
        n_embd: Some(96),
        n_head: Some(6),
        context: Some(64),
        batch: 4,
        seq: 48,
        dp,
        zero,
        ..base_cfg(tmp.path(), name)
    };
    let mut one = Trainer::new(shape("one", 1, 0), tok.clone(), Dataset::open(&data).unwrap(), kern()).unwrap();
    one.run(&mut |_| {}).unwrap();
    let mut two = Trainer::new(shape("two", 2, 1), tok.clone(), Dataset::open(&data).unwrap(), kern()).unwrap();
    two.run(&mut |_| {}).unwrap();
    assert_close("gpt-s shape dp=2 ZeRO-1", &curve(&two.cfg), &curve(&one.cfg));
    // The gathered moments are whole again and agree with the single rank's.
    assert_eq!(two.opt.t, one.opt.t);
    for (i, info) in one.model.param_info().iter().enumerate() {
        let n: usize = info.shape.iter().product();
        let (a, b) = (&two.opt.v[i][..n], &one.opt.v[i][..n]);
        let num: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
        let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().max(1e-30);
        assert!((num / den).sqrt() < 1e-4, "{}: second moment differs by {:e}", info.name, (num / den).sqrt());
    }
}

/// The gpt-s shape (3 blocks, 6 heads of 16) under tensor and pipeline parallelism: 3 heads
/// per tp rank, and 2 + 1 blocks over two stages.
#[test]
fn tensor_and_pipeline_parallel_match_on_a_small_gpt_s_shape() {
    let tmp = tempfile::tempdir().unwrap();
    let (tok, data) = prepare(tmp.path());
    let shape = |name: &str, dp, tp, pp| TrainConfig {
        preset: "gpt-s".into(),
        n_layer: Some(3),
        n_embd: Some(96),
        n_head: Some(6),
        context: Some(64),
        batch: 4,
        seq: 48,
        dp,
        tp,
        pp,
        // Three stages take four micro-batches of one row (the batch does not split in three).
        micro_batches: (pp == 3).then_some(4),
        ..base_cfg(tmp.path(), name)
    };
    let single = run(&shape("one", 1, 1, 1), &tok, &data);
    for (name, dp, tp, pp) in
        [("tp2", 1, 2, 1), ("pp2", 1, 1, 2), ("pp3", 1, 1, 3), ("dp2xtp2", 2, 2, 1), ("dp2xpp2", 2, 1, 2)]
    {
        let got = run(&shape(name, dp, tp, pp), &tok, &data);
        assert_close(&format!("gpt-s shape dp={dp} tp={tp} pp={pp}"), &got, &single);
    }
}

/// Checkpoints written under tensor or pipeline parallelism are whole: they resume under
/// another plan (and a single rank's under a sharded one), continuing the single-rank curve.
#[test]
fn checkpoints_move_between_model_parallel_plans() {
    let tmp = tempfile::tempdir().unwrap();
    let (tok, data) = prepare(tmp.path());
    let single = run(&base_cfg(tmp.path(), "single"), &tok, &data);
    let plans =
        [("tp2to1", (1, 2, 1), (1, 1, 1)), ("pp2todp2", (1, 1, 2), (2, 1, 1)), ("1totp2pp2", (1, 1, 1), (1, 2, 2))];
    for (name, (dp, tp, pp), then) in plans {
        let cfg = TrainConfig { dp, tp, pp, ..base_cfg(tmp.path(), name) };
        let mut part = Trainer::new(cfg.clone(), tok.clone(), Dataset::open(&data).unwrap(), kern()).unwrap();
        part.run_until(5, &mut |_| {}).unwrap();
        drop(part);
        let ck = load_checkpoint(&cfg.out).unwrap();
        let resumed_cfg = TrainConfig { dp: then.0, tp: then.1, pp: then.2, ..cfg.clone() };
        let mut resumed = Trainer::resume(ck, resumed_cfg, Dataset::open(&data).unwrap(), kern()).unwrap();
        assert_eq!(resumed.step, 5);
        resumed.run(&mut |_| {}).unwrap();
        assert_close(&format!("resume {name}"), &curve(&cfg), &single);
    }
}

/// A checkpoint written under dp=2 with ZeRO-1 resumes under dp=1 (and one written under dp=1
/// resumes under dp=2), continuing the uninterrupted single-rank curve.
#[test]
fn checkpoints_move_between_plans() {
    let tmp = tempfile::tempdir().unwrap();
    let (tok, data) = prepare(tmp.path());
    let single = run(&base_cfg(tmp.path(), "single"), &tok, &data);

    for (name, first, then) in [("2to1", (2, 1), (1, 0)), ("1to2", (1, 0), (2, 1))] {
        let cfg = TrainConfig { dp: first.0, zero: first.1, ..base_cfg(tmp.path(), name) };
        let mut part = Trainer::new(cfg.clone(), tok.clone(), Dataset::open(&data).unwrap(), kern()).unwrap();
        part.run_until(5, &mut |_| {}).unwrap();
        drop(part);
        let ck = load_checkpoint(&cfg.out).unwrap();
        let resumed_cfg = TrainConfig { dp: then.0, zero: then.1, ..cfg.clone() };
        let mut resumed = Trainer::resume(ck, resumed_cfg, Dataset::open(&data).unwrap(), kern()).unwrap();
        assert_eq!(resumed.step, 5);
        resumed.run(&mut |_| {}).unwrap();
        assert_close(&format!("resume {name}"), &curve(&cfg), &single);
    }
}

#[test]
fn a_batch_that_does_not_split_is_a_configuration_error() {
    let tmp = tempfile::tempdir().unwrap();
    let (tok, data) = prepare(tmp.path());
    let cfg = TrainConfig { dp: 3, ..base_cfg(tmp.path(), "bad") };
    let err = Trainer::new(cfg, tok, Dataset::open(&data).unwrap(), kern()).err().expect("batch 4 over 3 ranks");
    assert!(matches!(err, kiln_train::TrainError::Config(_)), "{err}");
    assert!(err.to_string().contains("divisible by --dp 3"), "{err}");
}

/// Rank 0 fails (its metrics file cannot be opened): the run ends with that error, promptly,
/// instead of the other rank waiting out its timeout.
#[test]
fn a_failing_rank_ends_the_run_with_its_own_error() {
    let tmp = tempfile::tempdir().unwrap();
    let (tok, data) = prepare(tmp.path());
    let cfg = TrainConfig { dp: 2, zero: 1, metrics: Some(tmp.path().to_path_buf()), ..base_cfg(tmp.path(), "fail") };
    let mut t = Trainer::new(cfg, tok, Dataset::open(&data).unwrap(), kern()).unwrap();
    let start = std::time::Instant::now();
    let err = t.run(&mut |_| {}).unwrap_err();
    assert!(matches!(err, kiln_train::TrainError::Io { .. }), "{err}");
    assert!(start.elapsed() < std::time::Duration::from_secs(30), "took {:?}", start.elapsed());
    assert!(t.save().is_err(), "the moments are gone: save must refuse, not panic");
}
