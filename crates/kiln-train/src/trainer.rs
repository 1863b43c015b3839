//! The training loop. It reports through a callback (the CLI draws bars from it) and appends
//! one JSON line per step to the metrics file; it never prints.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use kiln_data::{eval_batches, BatchSampler, Dataset, SamplerState, Tokenizer};
use kiln_model::{generate, new_trainable, SamplingParams, ShapeOverrides, TrainableLm};
use kiln_tensor::Kernels;
use rand::SeedableRng;
use serde::Serialize;

use crate::parallel::{run_as_rank, run_data_parallel, DpRank};
use crate::{
    kernels_for, lr_at, save_checkpoint, AdamW, Checkpoint, LossScaler, Precision, TrainConfig, TrainError,
    TrainingState,
};

#[derive(Clone, Debug, Serialize)]
pub struct StepMetrics {
    pub step: u64,
    pub loss: f32,
    pub lr: f32,
    pub tokens_per_s: f64,
    pub grad_norm: f32,
    pub step_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f32>,
    /// fp16: the loss scale this step ran with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f32>,
    /// fp16: the gradients overflowed, so the update was skipped (and the scale halved).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
}

/// What one optimizer step did.
struct StepOutcome {
    loss: f32,
    grad_norm: f32,
    skipped: bool,
}

pub enum Event<'a> {
    Started { start_step: u64, total_steps: u64, params: usize },
    Step(&'a StepMetrics),
    Eval { step: u64, val_loss: f32, samples: &'a [String] },
    Checkpoint { step: u64, path: &'a std::path::Path },
}

/// Mean loss over the given `(inputs, targets)` batches of shape `[b, t]`.
pub fn evaluate(
    model: &mut dyn TrainableLm,
    k: &dyn Kernels,
    batches: &[(Vec<u32>, Vec<u32>)],
    b: usize,
    t: usize,
) -> Result<f32, TrainError> {
    let mut total = 0.0f64;
    for (x, y) in batches {
        total += model.forward(k, x, Some(y), b, t)?.unwrap_or(f32::NAN) as f64;
    }
    Ok((total / batches.len().max(1) as f64) as f32)
}

pub struct Trainer {
    pub cfg: TrainConfig,
    pub model: Box<dyn TrainableLm>,
    pub opt: AdamW,
    pub tokenizer: Tokenizer,
    pub step: u64,
    pub(crate) data: Arc<Dataset>,
    sampler: BatchSampler,
    pub(crate) kernels: Arc<dyn Kernels>,
    /// Rank 0's side of a data-parallel run, while one is in progress.
    pub(crate) dp: Option<DpRank>,
    /// fp16's dynamic loss scaling (None in fp32 and bf16).
    pub scaler: Option<LossScaler>,
}

/// Whether a checkpoint is written after step `step` of a run that stops at `stop`; every
/// data-parallel rank asks, because ZeRO-1 gathers the moments for it.
pub(crate) fn checkpoint_due(step: u64, stop: u64, cfg: &TrainConfig) -> bool {
    step == stop || (cfg.checkpoint_every > 0 && step.is_multiple_of(cfg.checkpoint_every))
}

/// Whether rank 0 evaluates after step `step` (when it has validation data).
pub(crate) fn eval_due(step: u64, cfg: &TrainConfig) -> bool {
    step.is_multiple_of(cfg.eval_every) || step == cfg.steps
}

impl Trainer {
    /// The freshly initialised model a training config asks for (GPT-2 or Llama family by
    /// preset), sized to the tokenizer.
    pub fn new_model(cfg: &TrainConfig, vocab_size: usize) -> Result<Box<dyn TrainableLm>, TrainError> {
        let o = ShapeOverrides { n_layer: cfg.n_layer, n_head: cfg.n_head, n_embd: cfg.n_embd, context: cfg.context };
        Ok(new_trainable(&cfg.preset, Some(vocab_size), o, cfg.seed)?)
    }

    /// A fresh run: a new model sized to the tokenizer, seeded by `cfg.seed`.
    pub fn new(
        cfg: TrainConfig,
        tokenizer: Tokenizer,
        data: Dataset,
        kernels: Box<dyn Kernels>,
    ) -> Result<Trainer, TrainError> {
        cfg.validate()?;
        let model = Self::new_model(&cfg, tokenizer.vocab_size())?;
        let opt = AdamW::new(model.as_ref());
        let sampler = BatchSampler::new(cfg.seed, cfg.batch, cfg.seq);
        let kernels = Arc::from(kernels_for(cfg.precision, cfg.stochastic_rounding, kernels));
        let scaler = Self::new_scaler(&cfg);
        let t =
            Trainer { cfg, model, opt, tokenizer, step: 0, data: Arc::new(data), sampler, kernels, dp: None, scaler };
        t.check_fit()?;
        Ok(t)
    }

    /// Continues a run from a checkpoint with its saved optimizer state and data cursor.
    pub fn resume(
        ck: Checkpoint,
        cfg: TrainConfig,
        data: Dataset,
        kernels: Box<dyn Kernels>,
    ) -> Result<Trainer, TrainError> {
        cfg.validate()?;
        let (Some(opt), Some(state)) = (ck.optimizer, ck.state) else {
            return Err(TrainError::Config(
                "the checkpoint has no training_state.safetensors: it can be fine-tuned, not resumed".into(),
            ));
        };
        let tokenizer =
            ck.tokenizer.ok_or_else(|| TrainError::Config("the checkpoint has no tokenizer.json".into()))?;
        let sampler = BatchSampler::from_state(state.sampler, cfg.batch, cfg.seq);
        let kernels = Arc::from(kernels_for(cfg.precision, cfg.stochastic_rounding, kernels));
        // An fp16 run goes on with the scale it had; one switching to fp16 starts afresh.
        let scaler = match (Self::new_scaler(&cfg), state.loss_scaler) {
            (Some(_), Some(saved)) => Some(saved),
            (fresh, _) => fresh,
        };
        let t = Trainer {
            cfg,
            model: ck.model,
            opt,
            tokenizer,
            step: state.step,
            data: Arc::new(data),
            sampler,
            kernels,
            dp: None,
            scaler,
        };
        t.check_fit()?;
        Ok(t)
    }

    fn new_scaler(cfg: &TrainConfig) -> Option<LossScaler> {
        (cfg.precision == Precision::Fp16).then(|| LossScaler::new(cfg.loss_scale, cfg.loss_scale_growth_interval))
    }

    /// Errors that are cheaper to report before the first step than after an hour.
    fn check_fit(&self) -> Result<(), TrainError> {
        let (context, vocab) = (self.model.context_len(), self.model.vocab_size());
        if self.cfg.seq > context {
            return Err(TrainError::Config(format!(
                "--seq {} is longer than the model's context of {context}",
                self.cfg.seq
            )));
        }
        if self.data.vocab_size > vocab || self.tokenizer.vocab_size() > vocab {
            return Err(TrainError::Config(format!(
                "the data/tokenizer vocabulary ({} / {}) does not fit the model's {vocab}",
                self.data.vocab_size,
                self.tokenizer.vocab_size(),
            )));
        }
        let need = self.cfg.seq + 1;
        if self.data.train.len() < need {
            return Err(TrainError::Config(format!(
                "the training split has {} tokens, fewer than one sequence of {need}: use more text or a smaller --seq",
                self.data.train.len()
            )));
        }
        Ok(())
    }

    pub fn kernels(&self) -> &dyn Kernels {
        self.kernels.as_ref()
    }

    fn state(&self) -> TrainingState {
        TrainingState {
            step: self.step,
            sampler: self.sampler.state(),
            config: self.cfg.clone(),
            loss_scaler: self.scaler.clone(),
        }
    }

    pub(crate) fn sampler_state(&self) -> SamplerState {
        self.sampler.state()
    }

    pub fn checkpoint_dir(&self) -> PathBuf {
        self.cfg.out.join("checkpoint")
    }

    pub fn save(&self) -> Result<(), TrainError> {
        if self.opt.m.len() != self.model.params().len() {
            return Err(TrainError::Parallel(
                "the model or its AdamW moments were sharded over the ranks of a parallel run that failed: nothing to save".into(),
            ));
        }
        save_checkpoint(&self.checkpoint_dir(), self.model.as_ref(), &self.opt, &self.state(), &self.tokenizer)
    }

    /// Whether rank 0 evaluates: it has validation data (the other ranks join the gathers).
    pub(crate) fn evaluates(&self) -> bool {
        self.data.val.len() > self.cfg.seq && self.cfg.eval_batches > 0
    }

    /// Tensor or pipeline parallel: brings `model` and `opt` up to date from the ranks' shards
    /// (a collective: every rank joins after the same steps).
    fn gather_shards(&mut self) -> Result<(), TrainError> {
        match self.dp.as_mut() {
            Some(rank) if rank.is_model_parallel() => rank.gather_whole_model(self.model.as_mut(), &mut self.opt),
            _ => Ok(()),
        }
    }

    /// Leaves a parallel run (a failed one leaves nothing that could be saved as if whole).
    pub(crate) fn leave_parallel(&mut self, ok: bool) {
        // Leaving now (not at the join) lets waiting ranks fail at once if rank 0 failed.
        if self.dp.take().is_some_and(|r| r.is_model_parallel()) && !ok {
            // The whole model is older than the step count: refuse to checkpoint it.
            self.opt.m = Vec::new();
            self.opt.v = Vec::new();
        }
    }

    /// `save`, gathering the moments first when ZeRO-1 holds them sharded (a collective).
    fn save_now(&mut self) -> Result<(), TrainError> {
        let state = self.state();
        match self.dp.as_mut() {
            Some(rank) if rank.is_zero() && !rank.is_model_parallel() => {
                let full = rank.gather_moments(self.model.as_ref(), true)?.expect("kept");
                save_checkpoint(&self.checkpoint_dir(), self.model.as_ref(), &full, &state, &self.tokenizer)
            }
            _ => self.save(),
        }
    }

    /// Ends a data-parallel run: under ZeRO-1 the moments come back to `self.opt`.
    pub(crate) fn finish_data_parallel(&mut self) -> Result<(), TrainError> {
        let rank = self.dp.as_mut().filter(|r| !r.is_model_parallel());
        if let Some(full) = rank.map(|r| r.gather_moments(self.model.as_ref(), true)).transpose()?.flatten() {
            self.opt = full;
        }
        Ok(())
    }

    /// One optimizer step over `grad_accum` micro-batches.
    fn train_step(&mut self, lr: f32) -> Result<StepOutcome, TrainError> {
        let cfg = &self.cfg;
        if let Some(rank) = self.dp.as_mut() {
            let (data, sampler) = (&self.data, &mut self.sampler);
            let mut next =
                |x: &mut [u32], y: &mut [u32]| sampler.next_batch(&data.train, x, y).map_err(TrainError::from);
            let scaler = self.scaler.as_mut();
            let (loss, grad_norm, skipped) =
                rank.step(self.model.as_mut(), &mut self.opt, self.kernels.as_ref(), cfg, lr, &mut next, scaler)?;
            return Ok(StepOutcome { loss, grad_norm, skipped });
        }
        let (b, t) = (cfg.batch, cfg.seq);
        let (mut x, mut y) = (vec![0u32; b * t], vec![0u32; b * t]);
        // fp16: backward runs on the loss times the scale, so gradients come out scaled too.
        let loss_scale = self.scaler.as_ref().map_or(1.0, |s| s.scale);
        self.model.zero_grad();
        let mut loss = 0.0f64;
        for _ in 0..cfg.grad_accum {
            self.sampler.next_batch(&self.data.train, &mut x, &mut y)?;
            let l = self.model.forward(self.kernels.as_ref(), &x, Some(&y), b, t)?.expect("targets given");
            self.model.backward(self.kernels.as_ref(), loss_scale / cfg.grad_accum as f32)?;
            loss += l as f64 / cfg.grad_accum as f64;
        }
        let (grad_norm, skipped) =
            self.opt.step_scaled(self.model.as_mut(), self.kernels.as_ref(), lr, cfg, self.scaler.as_mut());
        Ok(StepOutcome { loss: loss as f32, grad_norm, skipped })
    }

    /// A few lines of text from the model, seeded by the step so they never disturb training.
    fn samples(&mut self) -> Result<Vec<String>, TrainError> {
        if self.cfg.sample_tokens == 0 {
            return Ok(Vec::new());
        }
        let prompt = self.tokenizer.encode("\n")?;
        let prompt = if prompt.is_empty() { vec![0] } else { prompt };
        let params = SamplingParams { temperature: 0.8, top_k: 40, ..Default::default() };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.cfg.seed ^ self.step.wrapping_mul(0x9E37_79B9));
        let ids = generate(
            self.model.as_mut(),
            self.kernels.as_ref(),
            &prompt,
            self.cfg.sample_tokens,
            &params,
            &mut rng,
            &mut |_| true,
        )?;
        Ok(vec![self.tokenizer.decode(&ids[prompt.len()..])?])
    }

    /// Runs until `cfg.steps`, evaluating every `eval_every` steps and at the end.
    pub fn run(&mut self, on_event: &mut dyn FnMut(Event)) -> Result<(), TrainError> {
        self.run_until(self.cfg.steps, on_event)
    }

    /// Runs until step `stop` (at most `cfg.steps`) and checkpoints there: a run stopped at k
    /// and resumed continues exactly as if it had never stopped.
    pub fn run_until(&mut self, stop: u64, on_event: &mut dyn FnMut(Event)) -> Result<(), TrainError> {
        self.cfg.validate()?;
        if self.cfg.world_size() > 1 {
            return run_data_parallel(self, stop, on_event);
        }
        self.run_loop(stop, on_event)
    }

    /// `run_until` as one rank of a multi-process group (MPI): this process trains rank
    /// `comm.rank()`'s share of every batch; only rank 0 reports events and writes files.
    pub fn run_as_rank(
        &mut self,
        comm: Box<dyn kiln_comm::Comm>,
        stop: u64,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<(), TrainError> {
        self.cfg.validate()?;
        run_as_rank(self, comm, stop, on_event)
    }

    /// The loop of rank 0 (or of the only rank): steps, metrics, evaluation, checkpoints.
    pub(crate) fn run_loop(&mut self, stop: u64, on_event: &mut dyn FnMut(Event)) -> Result<(), TrainError> {
        let stop = stop.min(self.cfg.steps);
        let cfg = self.cfg.clone();
        let (b, t) = (cfg.batch, cfg.seq);
        let metrics_path = cfg.metrics_path();
        if let Some(dir) = metrics_path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| TrainError::Io { path: dir.display().to_string(), source: e })?;
        }
        let mut metrics = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics_path)
            .map_err(|e| TrainError::Io { path: metrics_path.display().to_string(), source: e })?;
        let val =
            if self.data.val.len() > t { eval_batches(&self.data.val, b, t, cfg.eval_batches)? } else { Vec::new() };
        on_event(Event::Started { start_step: self.step, total_steps: cfg.steps, params: self.model.num_params() });

        while self.step < stop {
            let start = Instant::now();
            let lr = lr_at(self.step, &cfg);
            let loss_scale = self.scaler.as_ref().map(|s| s.scale);
            let StepOutcome { loss, grad_norm, skipped } = self.train_step(lr)?;
            self.step += 1;
            let secs = start.elapsed().as_secs_f64();
            if !loss.is_finite() {
                return Err(TrainError::Diverged { step: self.step, loss });
            }
            let mut m = StepMetrics {
                step: self.step,
                loss,
                lr,
                tokens_per_s: (b * t * cfg.grad_accum) as f64 / secs,
                grad_norm,
                step_ms: secs * 1e3,
                val_loss: None,
                loss_scale,
                skipped,
            };
            let mut samples = Vec::new();
            let evaluate_now = !val.is_empty() && eval_due(self.step, &cfg);
            if evaluate_now || checkpoint_due(self.step, stop, &cfg) {
                self.gather_shards()?;
            }
            if evaluate_now {
                m.val_loss = Some(evaluate(self.model.as_mut(), self.kernels.as_ref(), &val, b, t)?);
                samples = self.samples()?;
            }
            let line = serde_json::to_string(&m).expect("metrics serialise");
            writeln!(metrics, "{line}")
                .map_err(|e| TrainError::Io { path: metrics_path.display().to_string(), source: e })?;
            on_event(Event::Step(&m));
            if let Some(v) = m.val_loss {
                on_event(Event::Eval { step: self.step, val_loss: v, samples: &samples });
            }
            if checkpoint_due(self.step, stop, &cfg) {
                self.save_now()?;
                on_event(Event::Checkpoint { step: self.step, path: &self.checkpoint_dir() });
            }
        }
        Ok(())
    }
}
