//! `kiln bench train`: the speed of one training step, with the machine's peak beside it.

use clap::{Args, Subcommand};
use kiln_tensor::{CpuKernels, Kernels};
use kiln_train::Precision;

use crate::{ui, usage};

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Time training steps on random tokens: tokens/s, ms per phase, GFLOP/s, fraction of peak.
    Train(BenchTrainArgs),
    /// Time generation: prefill and KV-cached decode, time to first token, memory roofline.
    Generate(BenchGenerateArgs),
}

#[derive(Args)]
pub struct BenchGenerateArgs {
    /// A checkpoint to time, any supported architecture (otherwise --preset with random weights:
    /// gpt-tiny, gpt-s, gpt2-124m, llama-tiny, llama-s).
    #[arg(long)]
    ckpt: Option<std::path::PathBuf>,
    #[arg(long, default_value = "gpt-s")]
    preset: String,
    #[arg(long)]
    vocab: Option<usize>,
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    #[arg(long, default_value_t = 128)]
    gen: usize,
    /// Timed repetitions (the best is reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    #[arg(long)]
    json: bool,
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
    /// fp32, bf16 (bf16 linear layers with f32 accumulation, vdpbf16ps where the CPU has
    /// AVX512-BF16) or fp16 (F16C-rounded operands). Master weights and optimizer stay f32.
    #[arg(long, default_value = "fp32")]
    precision: String,
    /// bf16: round the weights to bf16 stochastically instead of to nearest even.
    #[arg(long)]
    stochastic_rounding: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Data-parallel ranks (threads sharing the cores); --batch is the global batch.
    #[arg(long)]
    dp: Option<usize>,
    /// Tensor-parallel ranks (GPT-2 presets): reports the all-reduce time per step.
    #[arg(long)]
    tp: Option<usize>,
    /// Pipeline stages (GPT-2 presets): reports the time stages wait for each other.
    #[arg(long)]
    pp: Option<usize>,
    /// Pipeline micro-batches per batch (default: --pp).
    #[arg(long)]
    micro_batches: Option<usize>,
    /// With --dp: 1 shards the AdamW moments over the ranks (ZeRO-1).
    #[arg(long, default_value_t = 0)]
    zero: u8,
}

pub fn run(c: &BenchCmd) -> anyhow::Result<()> {
    let a = match c {
        BenchCmd::Train(a) => a,
        BenchCmd::Generate(g) => return bench_generate(g),
    };
    let precision: Precision = a.precision.parse().map_err(usage)?;
    if a.stochastic_rounding && precision != Precision::Bf16 {
        return Err(usage("--stochastic-rounding applies to --precision bf16 only"));
    }
    if a.batch == 0 || a.seq == 0 {
        return Err(usage("--batch and --seq must be at least 1"));
    }
    let k = kiln_train::kernels_for(precision, a.stochastic_rounding, Box::new(CpuKernels::default()));
    if a.dp.is_some() || a.tp.is_some() || a.pp.is_some() {
        return bench_train_parallel(a, k.as_ref());
    }
    let (peak, peak_name) = match precision {
        Precision::Bf16 => (kiln_tensor::probe::bf16_peak_gflops(), "bf16"),
        _ => (kiln_tensor::probe::f32_peak_gflops(), "f32"),
    };
    let pb = if a.json { indicatif::ProgressBar::hidden() } else { ui::bar((a.warmup + a.steps) as u64, "bench step") };
    let r = kiln_train::bench::bench_train(
        &a.preset,
        a.vocab,
        a.batch,
        a.seq,
        a.warmup,
        a.steps,
        peak,
        k.as_ref(),
        &mut |i, _| pb.set_position(i as u64),
    )?;
    pb.finish_and_clear();
    let rss = ui::peak_rss_mb().unwrap_or(f64::NAN);
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        v["peak_rss_mb"] = rss.into();
        v["precision"] = precision.to_string().into();
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
            "  achieved      {:>10.1} GFLOP/s ({:.0}% of the measured {peak_name} peak of {:.1} GFLOP/s)",
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

/// `kiln bench train --dp D --tp T --pp P [--zero 1]`: parallel steps, one thread pool per rank.
fn bench_train_parallel(a: &BenchTrainArgs, k: &dyn Kernels) -> anyhow::Result<()> {
    let plan = kiln_train::BenchPlan {
        dp: a.dp.unwrap_or(1),
        tp: a.tp.unwrap_or(1),
        pp: a.pp.unwrap_or(1),
        micro_batches: a.micro_batches,
        zero: a.zero,
    };
    let r = kiln_train::bench_data_parallel(&a.preset, a.vocab, a.batch, a.seq, a.warmup, a.steps, plan, k)?;
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        v["preset"] = a.preset.clone().into();
        v["batch"] = a.batch.into();
        v["seq"] = a.seq.into();
        println!("{v}");
    } else {
        println!(
            "kiln bench train: {} (global B={}, T={}), dp {} × tp {} × pp {} ({} micro-batches) × {} thread(s), ZeRO-{}",
            a.preset, a.batch, a.seq, r.dp, r.tp, r.pp, r.micro_batches, r.threads_per_rank, r.zero
        );
        let pct = |ms: f64| 100.0 * ms / r.step_ms;
        println!("  tokens/s      {:>10.0}", r.tokens_per_s);
        println!("  step          {:>10.1} ms", r.step_ms);
        println!("  dp collectives{:>10.1} ms ({:.1}% of the step)", r.comm_ms, pct(r.comm_ms));
        println!("  tp all-reduce {:>10.1} ms ({:.1}%)", r.tp_comm_ms, pct(r.tp_comm_ms));
        println!("  pipeline wait {:>10.1} ms ({:.1}%)", r.pipeline_wait_ms, pct(r.pipeline_wait_ms));
        println!("  optimizer     {:>10.1} MB of AdamW moments per rank", r.optimizer_mb_per_rank);
    }
    Ok(())
}

fn bench_generate(a: &BenchGenerateArgs) -> anyhow::Result<()> {
    use rand::{Rng, SeedableRng};
    let mut model = match &a.ckpt {
        Some(dir) => crate::load::model(dir)?,
        None => kiln_model::preset_model(&a.preset, a.vocab, 1)?,
    };
    let (context, vocab) = (model.context_len(), model.vocab_size());
    if a.prompt_len == 0 || a.gen == 0 || a.reps == 0 {
        return Err(usage("--prompt-len, --gen and --reps must be at least 1"));
    }
    if a.prompt_len + a.gen > context {
        return Err(usage(format!(
            "--prompt-len + --gen = {} exceeds the model's context of {context}",
            a.prompt_len + a.gen
        )));
    }
    let k = CpuKernels::default();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let prompt: Vec<u32> = (0..a.prompt_len).map(|_| rng.random_range(0..vocab as u32)).collect();
    let (mut best_prefill, mut best_decode) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..a.reps + 1 {
        let mut cache = model.new_cache(1);
        let t0 = std::time::Instant::now();
        let mut logits = model.prefill(&k, &mut cache, 0, &prompt)?;
        let prefill = t0.elapsed().as_secs_f64();
        let t1 = std::time::Instant::now();
        for _ in 0..a.gen - 1 {
            let next = logits.iter().enumerate().fold(0, |b, (j, &x)| if x > logits[b] { j } else { b }) as u32;
            logits = model.decode(&k, &mut cache, &[0], &[next])?;
        }
        let decode = t1.elapsed().as_secs_f64();
        best_prefill = best_prefill.min(prefill);
        best_decode = best_decode.min(decode);
    }
    let bw = kiln_tensor::probe::read_bandwidth_gbs();
    // Bytes one decode step must read: every weight once (the tied head included) and, on
    // average over the generation, the KV cache of half-way through it.
    let weights = model.weight_bytes_per_token() as f64;
    let avg_len = a.prompt_len as f64 + a.gen as f64 / 2.0;
    let kv = model.new_cache(0).bytes_per_position() as f64 * avg_len; // an empty cache: only its shape
    let roofline_tps = bw * 1e9 / (weights + kv);
    let decode_tps = (a.gen - 1) as f64 / best_decode;
    let v = serde_json::json!({
        "model": a.ckpt.as_ref().map_or(a.preset.clone(), |p| p.display().to_string()),
        "model_type": model.model_type(),
        "params": model.num_params(),
        "prompt_len": a.prompt_len,
        "gen": a.gen,
        "threads": rayon::current_num_threads(),
        "prefill_tokens_per_s": a.prompt_len as f64 / best_prefill,
        "decode_tokens_per_s": decode_tps,
        "ttft_ms": best_prefill * 1e3,
        "read_bandwidth_gbs": bw,
        "bytes_per_token": weights + kv,
        "roofline_tokens_per_s": roofline_tps,
        "roofline_fraction": decode_tps / roofline_tps,
        "peak_rss_mb": ui::peak_rss_mb().unwrap_or(f64::NAN),
    });
    if a.json {
        println!("{v}");
    } else {
        println!(
            "kiln bench generate: {} ({:.2}M params), prompt {} + {} generated, {} threads",
            v["model"].as_str().unwrap_or(""),
            model.num_params() as f64 / 1e6,
            a.prompt_len,
            a.gen,
            rayon::current_num_threads()
        );
        println!(
            "  prefill        {:>9.0} tokens/s (time to first token {:.1} ms)",
            a.prompt_len as f64 / best_prefill,
            best_prefill * 1e3
        );
        println!("  decode         {:>9.1} tokens/s", decode_tps);
        println!("  roofline       {:>9.1} tokens/s at the measured {:.1} GB/s read bandwidth ({:.2} MB a token): {:.0}% of it", roofline_tps, bw, (weights + kv) / 1e6, 100.0 * decode_tps / roofline_tps);
    }
    Ok(())
}
