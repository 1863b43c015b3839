//! kiln-train: the training loop around a model: AdamW with warmup and cosine decay,
//! global-norm clipping, gradient accumulation, periodic evaluation and samples, and
//! checkpoints that resume bit-identically; bf16/fp16 mixed precision with dynamic loss
//! scaling; data parallelism and ZeRO-1 over `kiln-comm`.

pub mod bench;
mod checkpoint;
mod config;
mod optim;
mod parallel;
mod precision;
mod trainer;

pub use checkpoint::{load_checkpoint, resolve_checkpoint_dir, save_checkpoint, Checkpoint, TrainingState};
pub use config::TrainConfig;
pub use optim::{lr_at, AdamW};
pub use parallel::{bench_data_parallel, BenchPlan, DpBench};
pub use precision::{kernels_for, LossScaler, Precision};
pub use trainer::{evaluate, Event, StepMetrics, Trainer};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("invalid training configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Model(#[from] kiln_model::ModelError),
    #[error(transparent)]
    Data(#[from] kiln_data::DataError),
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: String, msg: String },
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("training diverged: loss is {loss} at step {step}")]
    Diverged { step: u64, loss: f32 },
    #[error("data parallel: {0}")]
    Comm(#[from] kiln_comm::CommError),
    #[error("data parallel: rank {rank} panicked: {msg}")]
    RankPanicked { rank: usize, msg: String },
    #[error("data parallel: {0}")]
    Parallel(String),
}
