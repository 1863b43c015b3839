//! Training configuration: a TOML file, overridden by command-line flags.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{Precision, TrainError};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Directory with train.bin / val.bin from `kiln data prepare`.
    pub data: Option<PathBuf>,
    /// Tokenizer JSON; defaults to the one `kiln data prepare` copied next to the shards.
    pub tokenizer: Option<PathBuf>,
    pub preset: String,
    /// Custom sizes override the preset's.
    pub n_layer: Option<usize>,
    pub n_head: Option<usize>,
    pub n_embd: Option<usize>,
    pub context: Option<usize>,
    pub steps: u64,
    pub batch: usize,
    pub seq: usize,
    pub grad_accum: usize,
    /// fp32, bf16 or fp16 linear layers (master weights and optimizer stay f32).
    pub precision: Precision,
    /// bf16: round the f32 weights to bf16 stochastically each step (llm.c) instead of to nearest.
    pub stochastic_rounding: bool,
    /// fp16: the initial dynamic loss scale (PyTorch's GradScaler: 2^16).
    pub loss_scale: f32,
    /// fp16: clean steps after which the loss scale doubles (GradScaler: 2000).
    pub loss_scale_growth_interval: u64,
    pub lr: f32,
    /// Floor of the cosine decay; defaults to lr / 10.
    pub min_lr: Option<f32>,
    pub warmup_steps: u64,
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Global gradient-norm clip; 0 disables it.
    pub grad_clip: f32,
    pub eval_every: u64,
    pub eval_batches: usize,
    /// Steps between checkpoints (0: only at the end).
    pub checkpoint_every: u64,
    /// Tokens sampled per line at each evaluation (0: no samples).
    pub sample_tokens: usize,
    pub seed: u64,
    pub out: PathBuf,
    /// Metrics JSONL; defaults to `<out>/metrics.jsonl`.
    pub metrics: Option<PathBuf>,
    /// Data-parallel ranks; `batch` is split over them.
    pub dp: usize,
    /// Tensor-parallel ranks: each layer's heads and MLP units split over them (Megatron).
    pub tp: usize,
    /// Pipeline stages: the layers split into `pp` consecutive groups.
    pub pp: usize,
    /// Pipeline micro-batches per (accumulation) micro-batch, run 1F1B; defaults to `pp`.
    pub micro_batches: Option<usize>,
    /// ZeRO stage: 0 (every rank holds all AdamW moments) or 1 (moments sharded over dp).
    pub zero: u8,
    /// Seconds a rank waits at a collective before giving up on a stalled peer.
    pub comm_timeout_s: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            data: None,
            tokenizer: None,
            preset: "gpt-s".into(),
            n_layer: None,
            n_head: None,
            n_embd: None,
            context: None,
            steps: 1000,
            batch: 8,
            seq: 256,
            grad_accum: 1,
            precision: Precision::Fp32,
            stochastic_rounding: false,
            loss_scale: 65536.0,
            loss_scale_growth_interval: 2000,
            lr: 1e-3,
            min_lr: None,
            warmup_steps: 100,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
            eval_every: 100,
            eval_batches: 20,
            checkpoint_every: 0,
            sample_tokens: 64,
            seed: 1337,
            out: PathBuf::from("runs/kiln"),
            metrics: None,
            dp: 1,
            tp: 1,
            pp: 1,
            micro_batches: None,
            zero: 0,
            comm_timeout_s: 300,
        }
    }
}

impl TrainConfig {
    pub fn from_toml(text: &str) -> Result<TrainConfig, TrainError> {
        toml::from_str(text).map_err(|e| TrainError::Config(format!("config file: {e}")))
    }

    pub fn metrics_path(&self) -> PathBuf {
        self.metrics.clone().unwrap_or_else(|| self.out.join("metrics.jsonl"))
    }

    /// Pipeline micro-batches each accumulation micro-batch is cut into.
    pub fn pipeline_micro_batches(&self) -> usize {
        self.micro_batches.unwrap_or(self.pp)
    }

    /// Ranks the plan needs: dp · tp · pp.
    pub fn world_size(&self) -> usize {
        self.dp * self.tp * self.pp
    }

    /// Whether the model is cut into shards (tensor or pipeline parallel).
    pub fn is_model_parallel(&self) -> bool {
        self.tp * self.pp > 1
    }

    pub fn min_lr(&self) -> f32 {
        self.min_lr.unwrap_or(self.lr / 10.0)
    }

    /// Rejects nonsensical values with a message that names the flag.
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |m: &str| Err(TrainError::Config(m.to_string()));
        if self.steps == 0 {
            return bad("--steps must be at least 1");
        }
        if self.batch == 0 {
            return bad("--batch must be at least 1");
        }
        if self.seq == 0 {
            return bad("--seq must be at least 1");
        }
        if self.grad_accum == 0 {
            return bad("--grad-accum must be at least 1");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("--lr must be a positive number");
        }
        if self.min_lr().is_nan() || self.min_lr() < 0.0 || self.min_lr() > self.lr {
            return bad("--min-lr must lie in [0, lr]");
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return bad("betas must lie in [0, 1)");
        }
        if self.weight_decay.is_nan()
            || self.weight_decay < 0.0
            || self.grad_clip.is_nan()
            || self.grad_clip < 0.0
            || self.eps.is_nan()
            || self.eps <= 0.0
        {
            return bad("--weight-decay and --grad-clip must be >= 0, eps > 0");
        }
        if self.eval_every == 0 {
            return bad("--eval-every must be at least 1");
        }
        if self.dp == 0 || self.tp == 0 || self.pp == 0 || self.micro_batches == Some(0) {
            return bad("--dp, --tp, --pp and --micro-batches must be at least 1");
        }
        if !self.batch.is_multiple_of(self.dp) {
            return Err(TrainError::Config(format!(
                "--batch {} must be divisible by --dp {}: each rank takes an equal share of every micro-batch",
                self.batch, self.dp
            )));
        }
        let m = self.pipeline_micro_batches();
        if !(self.batch / self.dp).is_multiple_of(m) {
            return Err(TrainError::Config(format!(
                "--batch {} over --dp {} leaves {} rows per rank, which --micro-batches {m} must divide",
                self.batch,
                self.dp,
                self.batch / self.dp
            )));
        }
        if self.zero > 1 {
            return bad("--zero must be 0 or 1 (ZeRO-2 and 3 are not implemented)");
        }
        if !(self.loss_scale.is_finite() && self.loss_scale > 0.0) || self.loss_scale_growth_interval == 0 {
            return bad("--loss-scale must be a positive number and its growth interval at least 1");
        }
        if self.stochastic_rounding && self.precision != Precision::Bf16 {
            return bad("--stochastic-rounding applies to --precision bf16 only");
        }
        if self.comm_timeout_s == 0 {
            return bad("--comm-timeout must be at least 1 second");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_config_sets_fields_and_rejects_unknown_keys() {
        let c = TrainConfig::from_toml("preset = \"gpt-tiny\"\nsteps = 42\nlr = 0.002\nout = \"runs/x\"\n").unwrap();
        assert_eq!((c.preset.as_str(), c.steps, c.lr), ("gpt-tiny", 42, 0.002));
        assert_eq!(c.batch, TrainConfig::default().batch);
        assert!(TrainConfig::from_toml("stpes = 3").is_err());
        assert!(TrainConfig::from_toml("steps = -3").is_err());
        let bad = TrainConfig { lr: -1e-3, ..Default::default() };
        assert!(bad.validate().is_err());
        let odd = TrainConfig { batch: 6, dp: 4, ..Default::default() };
        assert!(odd.validate().unwrap_err().to_string().contains("divisible by --dp 4"));
        assert!(TrainConfig { zero: 2, dp: 2, ..Default::default() }.validate().is_err());
        // Configs saved before data parallelism existed still load, as dp = 1.
        assert_eq!(TrainConfig::from_toml("steps = 3").unwrap().dp, 1);
        let c = TrainConfig::from_toml("precision = \"bf16\"\nstochastic_rounding = true").unwrap();
        assert_eq!((c.precision, c.stochastic_rounding), (Precision::Bf16, true));
        assert!(TrainConfig::from_toml("precision = \"int8\"").is_err());
        assert!(TrainConfig { stochastic_rounding: true, ..Default::default() }.validate().is_err());
    }
}
