//! `kiln train`: flags over an optional TOML config, a progress bar, samples at each eval.

use std::path::PathBuf;

use clap::Args;
use kiln_data::{Dataset, Tokenizer};
use kiln_tensor::CpuKernels;
use kiln_train::{load_checkpoint, Event, TrainConfig, Trainer};

use crate::{ui, usage};

#[derive(Args, Default)]
pub struct TrainArgs {
    /// TOML file with any of the settings below (flags given here win).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Continue a run from its checkpoint (the run directory or its checkpoint/).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Directory from `kiln data prepare`.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// tokenizer.json (default: the one inside --data).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Model preset: gpt-tiny, gpt-s, gpt2-124m (GPT-2), llama-tiny, llama-s (Llama: RMSNorm,
    /// RoPE, SwiGLU, grouped-query attention).
    #[arg(long)]
    pub preset: Option<String>,
    /// Custom size: layers (overrides the preset).
    #[arg(long)]
    pub n_layer: Option<usize>,
    #[arg(long)]
    pub n_head: Option<usize>,
    #[arg(long)]
    pub n_embd: Option<usize>,
    /// Context length of the model.
    #[arg(long)]
    pub context: Option<usize>,
    #[arg(long)]
    pub steps: Option<u64>,
    /// Sequences per micro-batch.
    #[arg(long)]
    pub batch: Option<usize>,
    /// Tokens per sequence.
    #[arg(long)]
    pub seq: Option<usize>,
    /// Micro-batches per optimizer step: the effective batch is grad-accum × batch.
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// fp32, bf16 or fp16: what the linear layers multiply in (with f32 accumulation); master
    /// weights, AdamW, norms, softmax and the loss stay f32. fp16 adds dynamic loss scaling.
    #[arg(long)]
    pub precision: Option<String>,
    /// bf16: round the f32 weights to bf16 stochastically each step (llm.c) instead of to nearest.
    #[arg(long)]
    pub stochastic_rounding: bool,
    /// fp16: initial loss scale (default 65536, as PyTorch's GradScaler).
    #[arg(long)]
    pub loss_scale: Option<f32>,
    /// Peak learning rate.
    #[arg(long, allow_hyphen_values = true)]
    pub lr: Option<f32>,
    #[arg(long, allow_hyphen_values = true)]
    pub min_lr: Option<f32>,
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    #[arg(long, allow_hyphen_values = true)]
    pub weight_decay: Option<f32>,
    /// Global gradient-norm clip (0 disables).
    #[arg(long, allow_hyphen_values = true)]
    pub grad_clip: Option<f32>,
    #[arg(long)]
    pub eval_every: Option<u64>,
    #[arg(long)]
    pub eval_batches: Option<usize>,
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Tokens to sample at each evaluation (0: none).
    #[arg(long)]
    pub sample_tokens: Option<usize>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Run directory: checkpoint/, metrics.jsonl, loss.png.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Metrics JSONL (default: OUT/metrics.jsonl).
    #[arg(long)]
    pub metrics: Option<PathBuf>,
    /// Stop (and checkpoint) after this step without finishing the schedule; resume later.
    #[arg(long)]
    pub stop_at: Option<u64>,
    /// Data-parallel ranks (threads sharing the cores); --batch must be divisible by it.
    #[arg(long)]
    pub dp: Option<usize>,
    /// Tensor-parallel ranks (Megatron-style): each block's attention heads and MLP units
    /// split over them, one all-reduce after each row-parallel layer. GPT-2 models only; it
    /// must divide the head count.
    #[arg(long)]
    pub tp: Option<usize>,
    /// Pipeline stages: the blocks split into consecutive groups, run with the 1F1B schedule.
    /// GPT-2 models only; at most the number of blocks.
    #[arg(long)]
    pub pp: Option<usize>,
    /// Micro-batches each batch is cut into for the pipeline (default: --pp); more of them
    /// leave the stages idle less (bubble (pp-1)/(M+pp-1)) at the cost of smaller GEMMs.
    #[arg(long)]
    pub micro_batches: Option<usize>,
    /// ZeRO stage with --dp: 1 shards the AdamW moments over the ranks.
    #[arg(long)]
    pub zero: Option<u8>,
    /// Seconds a rank waits for a stalled peer before the run fails.
    #[arg(long)]
    pub comm_timeout: Option<u64>,
    /// How the ranks (dp × tp × pp of them) talk: `threads` (ranks are threads of this
    /// process) or `mpi` (one process per rank, started by Open MPI:
    /// `mpirun -np 4 kiln train --comm mpi --dp 2 --tp 2 ...`; needs a kiln built with
    /// `--features mpi`).
    #[arg(long, default_value = "threads", value_parser = ["threads", "mpi"])]
    pub comm: String,
}

impl TrainArgs {
    /// Applies every flag that was given on top of `cfg`.
    fn apply(&self, cfg: &mut TrainConfig) -> anyhow::Result<()> {
        if let Some(p) = &self.precision {
            cfg.precision = p.parse().map_err(usage)?;
        }
        if self.stochastic_rounding {
            cfg.stochastic_rounding = true;
        }
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = &self.$f { cfg.$f = v.clone().into(); } )* };
        }
        set!(
            preset,
            steps,
            batch,
            seq,
            grad_accum,
            lr,
            warmup_steps,
            weight_decay,
            grad_clip,
            eval_every,
            eval_batches,
            checkpoint_every,
            sample_tokens,
            seed,
            out,
            dp,
            tp,
            pp,
            zero,
            loss_scale
        );
        if let Some(s) = self.comm_timeout {
            cfg.comm_timeout_s = s;
        }
        macro_rules! set_opt {
            ($($f:ident),*) => { $( if self.$f.is_some() { cfg.$f = self.$f.clone(); } )* };
        }
        set_opt!(data, tokenizer, n_layer, n_head, n_embd, context, metrics, min_lr, micro_batches);
        Ok(())
    }
}

pub fn run(a: &TrainArgs) -> anyhow::Result<()> {
    let mut cfg = match (&a.resume, &a.config) {
        (Some(dir), _) => {
            let ck_dir = kiln_train::resolve_checkpoint_dir(dir);
            let ck = load_checkpoint(&ck_dir)?;
            let state = ck
                .state
                .clone()
                .ok_or_else(|| usage(format!("{} has no training state to resume from", ck_dir.display())))?;
            let mut cfg = state.config.clone();
            if let Some(path) = &a.config {
                cfg = TrainConfig::from_toml(
                    &std::fs::read_to_string(path).map_err(|e| usage(format!("{}: {e}", path.display())))?,
                )?;
            }
            // A run continues where its checkpoint is now, even if the directory was moved.
            if let Some(run_dir) = ck_dir.parent().filter(|_| ck_dir.ends_with("checkpoint")) {
                if cfg.out != run_dir {
                    cfg.out = run_dir.to_path_buf();
                    cfg.metrics = None;
                }
            }
            a.apply(&mut cfg)?;
            return train(cfg, Some(ck), a);
        }
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| usage(format!("cannot read config {}: {e}", path.display())))?;
            TrainConfig::from_toml(&text)?
        }
        (None, None) => TrainConfig::default(),
    };
    a.apply(&mut cfg)?;
    train(cfg, None, a)
}

/// This process's place in an MPI job (`mpirun`), as a `Comm` over all its processes.
#[cfg(feature = "mpi")]
fn mpi_world(cfg: &TrainConfig) -> anyhow::Result<Box<dyn kiln_comm::Comm>> {
    let timeout = std::time::Duration::from_secs(cfg.comm_timeout_s);
    Ok(Box::new(kiln_comm::MpiComm::world(timeout)?))
}

#[cfg(not(feature = "mpi"))]
fn mpi_world(_: &TrainConfig) -> anyhow::Result<Box<dyn kiln_comm::Comm>> {
    Err(usage(
        "--comm mpi: this kiln was built without MPI; rebuild with `cargo build --release -p kiln-cli --features mpi` \
         (Debian: apt-get install libopenmpi-dev openmpi-bin clang libclang-dev)",
    ))
}

fn train(cfg: TrainConfig, resume: Option<kiln_train::Checkpoint>, a: &TrainArgs) -> anyhow::Result<()> {
    cfg.validate()?;
    let comm = if a.comm == "mpi" { Some(mpi_world(&cfg)?) } else { None };
    let rank = comm.as_ref().map_or(0, |c| c.rank());
    let data_dir =
        cfg.data.clone().ok_or_else(|| usage("--data DIR is required (make one with `kiln data prepare`)"))?;
    let data = Dataset::open(&data_dir)?;
    if resume.is_none() && cfg.out.join("checkpoint").exists() {
        return Err(usage(format!(
            "{} already holds a checkpoint: continue it with --resume {0}, or choose another --out",
            cfg.out.display()
        )));
    }
    let mut trainer = match resume {
        Some(ck) => Trainer::resume(ck, cfg.clone(), data, Box::new(CpuKernels::default()))?,
        None => {
            let tok_path = cfg.tokenizer.clone().unwrap_or_else(|| data_dir.join("tokenizer.json"));
            let tok = Tokenizer::from_file(&tok_path)?;
            Trainer::new(cfg.clone(), tok, data, Box::new(CpuKernels::default()))?
        }
    };
    let stop = a.stop_at.unwrap_or(cfg.steps).min(cfg.steps);
    if rank != 0 {
        // Ranks other than 0 train their share silently; rank 0 reports and writes the files.
        trainer.run_as_rank(comm.expect("an MPI rank"), stop, &mut |_| {})?;
        return Ok(());
    }
    std::fs::create_dir_all(&cfg.out)?;
    let pb = ui::bar(stop, "step");
    let interactive = !pb.is_hidden();
    // A hidden bar (stderr not a terminal) swallows println; write those lines to stderr instead.
    let say = |msg: String| if interactive { pb.println(msg) } else { eprintln!("{msg}") };
    let kernels = trainer.kernels().name();
    let engine = comm.as_ref().map_or("threads", |c| c.engine());
    let mut on_event = |e: Event| match e {
        Event::Started { start_step, total_steps, params } => {
            pb.set_position(start_step);
            pb.reset_eta();
            let plan = if cfg.is_model_parallel() {
                format!(
                    ", parallel dp {} × tp {} × pp {} = {} ranks ({engine}), {} pipeline micro-batches, ZeRO-{}",
                    cfg.dp,
                    cfg.tp,
                    cfg.pp,
                    cfg.world_size(),
                    cfg.pipeline_micro_batches(),
                    cfg.zero
                )
            } else if cfg.dp > 1 {
                format!(", data parallel {} ranks ({engine}), ZeRO-{}", cfg.dp, cfg.zero)
            } else {
                String::new()
            };
            say(format!(
                "training {:.2}M parameters, steps {start_step}..{total_steps}, {} threads, kernels {kernels}{plan}",
                params as f64 / 1e6,
                rayon::current_num_threads(),
            ));
        }
        Event::Step(m) => {
            pb.set_position(m.step);
            if m.skipped {
                say(format!(
                    "step {}: fp16 gradients overflowed, update skipped; loss scale now {}",
                    m.step,
                    m.loss_scale.unwrap_or(f32::NAN) / 2.0
                ));
            }
            pb.set_message(format!("loss {:.4} lr {:.2e} {:.0} tok/s", m.loss, m.lr, m.tokens_per_s));
            if !interactive && (m.step.is_multiple_of(10) || m.step == stop) {
                eprintln!("step {}/{} loss {:.4} lr {:.2e} {:.0} tok/s", m.step, stop, m.loss, m.lr, m.tokens_per_s);
            }
        }
        Event::Eval { step, val_loss, samples } => {
            say(format!("step {step}: val loss {val_loss:.4}"));
            for s in samples {
                say(format!("  sample: {}", s.replace('\n', " ⏎ ").chars().take(160).collect::<String>()));
            }
        }
        Event::Checkpoint { step, path } => say(format!("step {step}: checkpoint {}", path.display())),
    };
    match comm {
        Some(c) => trainer.run_as_rank(c, stop, &mut on_event)?,
        None => trainer.run_until(stop, &mut on_event)?,
    }
    pb.finish_and_clear();
    let metrics = cfg.metrics_path();
    let plot = cfg.out.join("loss");
    let curves = kiln_eval::LossCurves {
        title: format!("kiln {} training loss", cfg.preset),
        series: kiln_eval::read_metrics(&metrics, "run")?,
    };
    kiln_eval::write_png(&curves, &plot.with_extension("png"))?;
    kiln_eval::write_svg(&curves, &plot.with_extension("svg"))?;
    println!("checkpoint: {}", trainer.checkpoint_dir().display());
    println!("metrics:    {}", metrics.display());
    println!("loss plot:  {}", plot.with_extension("png").display());
    Ok(())
}
