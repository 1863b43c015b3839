//! The training-step benchmark behind `kiln bench train`: forward, backward and optimizer
//! timed separately on random tokens, reported against the machine's measured f32 peak.

use std::time::Instant;

use kiln_model::{new_trainable, ShapeOverrides};
use kiln_tensor::Kernels;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::{AdamW, TrainConfig, TrainError};

#[derive(Clone, Debug, Serialize)]
pub struct TrainBench {
    pub preset: String,
    pub batch: usize,
    pub seq: usize,
    pub vocab: usize,
    pub params: usize,
    pub threads: usize,
    pub kernels: String,
    pub steps: usize,
    pub tokens_per_s: f64,
    pub step_ms: f64,
    pub forward_ms: f64,
    pub backward_ms: f64,
    pub optimizer_ms: f64,
    /// Achieved GFLOP/s by the nanoGPT convention (6N + 12·L·T·C per token).
    pub gflops: f64,
    pub peak_gflops: f64,
    pub peak_fraction: f64,
    pub model_memory_mb: f64,
}

/// Times `steps` training steps after `warmup` untimed ones; each phase is the median.
#[allow(clippy::too_many_arguments)]
pub fn bench_train(
    preset: &str,
    vocab: Option<usize>,
    batch: usize,
    seq: usize,
    warmup: usize,
    steps: usize,
    peak_gflops: f64,
    k: &dyn Kernels,
    on_step: &mut dyn FnMut(usize, usize),
) -> Result<TrainBench, TrainError> {
    if steps == 0 {
        return Err(TrainError::Config("--steps must be at least 1".into()));
    }
    let mut model = new_trainable(preset, vocab, ShapeOverrides::default(), 1)?;
    let (context, v) = (model.context_len(), model.vocab_size());
    if seq > context {
        return Err(TrainError::Config(format!("--seq {seq} is longer than the model's context of {context}")));
    }
    let mut opt = AdamW::new(model.as_ref());
    let cfg = TrainConfig::default();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let n = batch * seq;
    let (mut f, mut b, mut o) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..warmup + steps {
        let x: Vec<u32> = (0..n).map(|_| rng.random_range(0..v as u32)).collect();
        let y: Vec<u32> = (0..n).map(|_| rng.random_range(0..v as u32)).collect();
        let t0 = Instant::now();
        model.zero_grad();
        model.forward(k, &x, Some(&y), batch, seq)?;
        let t1 = Instant::now();
        model.backward(k, 1.0)?;
        let t2 = Instant::now();
        opt.step(model.as_mut(), k, 1e-4, &cfg);
        let t3 = Instant::now();
        if i >= warmup {
            f.push((t1 - t0).as_secs_f64());
            b.push((t2 - t1).as_secs_f64());
            o.push((t3 - t2).as_secs_f64());
        }
        on_step(i + 1, warmup + steps);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let step_times: Vec<f64> = (0..steps).map(|i| f[i] + b[i] + o[i]).collect();
    let step_s = median(&mut step_times.clone());
    let tokens_per_s = n as f64 / step_s;
    let gflops = model.train_flops_per_token(seq) * tokens_per_s / 1e9;
    Ok(TrainBench {
        preset: preset.to_string(),
        batch,
        seq,
        vocab: v,
        params: model.num_params(),
        threads: rayon::current_num_threads(),
        kernels: k.name(),
        steps,
        tokens_per_s,
        step_ms: step_s * 1e3,
        forward_ms: median(&mut f) * 1e3,
        backward_ms: median(&mut b) * 1e3,
        optimizer_ms: median(&mut o) * 1e3,
        gflops,
        peak_gflops,
        peak_fraction: gflops / peak_gflops,
        model_memory_mb: model.memory_bytes() as f64 / 1e6
            + opt.m.iter().chain(&opt.v).map(|x| x.len() * 4).sum::<usize>() as f64 / 1e6,
    })
}
