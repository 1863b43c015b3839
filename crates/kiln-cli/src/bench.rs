//! `kiln bench train`: the speed of one training step, with the machine's peak beside it.

use clap::{Args, Subcommand};
use kiln_model::GptConfig;
use kiln_tensor::CpuKernels;

use crate::{ui, usage};

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Time training steps on random tokens: tokens/s, ms per phase, GFLOP/s, fraction of peak.
    Train(BenchTrainArgs),
}

#[derive(Args)]
pub struct BenchTrainArgs {
    #[arg(long, default_value = "gpt-s")]
    preset: String,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 256)]
    seq: usize,
    /// Vocabulary size (default: the preset's).
    #[arg(long)]
    vocab: Option<usize>,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 10)]
    steps: usize,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Only f32 exists today; bf16/fp16 arrive with mixed precision.
    #[arg(long, default_value = "fp32")]
    precision: String,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(c: &BenchCmd) -> anyhow::Result<()> {
    let BenchCmd::Train(a) = c;
    if a.precision != "fp32" {
        return Err(usage(format!("--precision {} is not implemented yet (fp32 only)", a.precision)));
    }
    if a.batch == 0 || a.seq == 0 {
        return Err(usage("--batch and --seq must be at least 1"));
    }
    let mc = GptConfig::preset(&a.preset, a.vocab)?;
    let peak = kiln_tensor::probe::f32_peak_gflops();
    let k = CpuKernels::default();
    let pb = if a.json { indicatif::ProgressBar::hidden() } else { ui::bar((a.warmup + a.steps) as u64, "bench step") };
    let r = kiln_train::bench::bench_train(&a.preset, mc, a.batch, a.seq, a.warmup, a.steps, peak, &k, &mut |i, _| {
        pb.set_position(i as u64)
    })?;
    pb.finish_and_clear();
    let rss = ui::peak_rss_mb().unwrap_or(f64::NAN);
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        v["peak_rss_mb"] = rss.into();
        v["precision"] = "fp32".into();
        println!("{v}");
    } else {
        println!(
            "kiln bench train: {} (B={}, T={}, vocab {}, {:.2}M params), {} threads, kernels {}",
            r.preset,
            r.batch,
            r.seq,
            r.vocab,
            r.params as f64 / 1e6,
            r.threads,
            r.kernels
        );
        println!("  tokens/s      {:>10.0}", r.tokens_per_s);
        println!(
            "  step          {:>10.1} ms  (forward {:.1}, backward {:.1}, optimizer {:.1})",
            r.step_ms, r.forward_ms, r.backward_ms, r.optimizer_ms
        );
        println!(
            "  achieved      {:>10.1} GFLOP/s ({:.0}% of the measured f32 peak of {:.1} GFLOP/s)",
            r.gflops,
            100.0 * r.peak_fraction,
            r.peak_gflops
        );
        println!(
            "  peak memory   {:>10.0} MB RSS (model, grads, optimizer, activations: {:.0} MB)",
            rss, r.model_memory_mb
        );
    }
    Ok(())
}
