//! kiln-model: the GPT-2 and Llama-family architectures with an explicit forward and backward
//! per layer (llm.c style), their presets, KV-cached generation, sampling, and Hugging
//! Face-compatible weight I/O.

mod checkpoint;
mod config;
mod gguf;
mod gpt;
mod llama;
mod lm;
mod quant;
mod sample;
mod shard;
mod trainable;

pub use checkpoint::{
    load_causal_lm, load_hf_dir, read_eos_token_ids, read_hf_config, read_model_type, read_safetensors_f32,
    resolve_model_dir, safetensors_bytes, save_hf_files, write_atomic, HfTensorNames,
};
pub use config::{GptConfig, PRESETS};
pub use gguf::{dequantize, export_gguf, quantize_q4_0, quantize_q8_0, GgmlType};
pub use gpt::{Gpt, ParamInfo};
pub use llama::{load_llama_dir, read_hf_tensors, save_llama_hf_files, Llama, LlamaConfig, LlamaPreset, LLAMA_PRESETS};
pub use lm::{preset_model, CausalLm, KvCache};
pub use quant::{read_quant_info, LinearObserver, Linears, QuantInfo, QuantScheme, QuantWeight};
pub use sample::{apply_penalties, generate, sample_next, SamplingParams};
pub use shard::{cut_tensors, place_tensors, Shard, Slice};
pub use trainable::{
    install_quantized, load_trainable, new_trainable, save_quantized, GradsReady, ShapeOverrides, TrainableLm,
};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("unknown preset '{0}' (known: gpt-tiny, gpt-s, gpt2-124m, llama-tiny, llama-s)")]
    UnknownPreset(String),
    #[error("invalid model configuration: {0}")]
    BadConfig(String),
    #[error("token id {id} at position {pos} is outside the model's vocabulary of {vocab}")]
    TokenOutOfRange { id: u32, pos: usize, vocab: usize },
    #[error("sequence of {t} tokens is longer than the model's context of {context}")]
    SequenceTooLong { t: usize, context: usize },
    #[error("batch shape mismatch: {0}")]
    Shape(String),
    #[error("backward() needs a forward() with targets first")]
    NoForward,
    #[error("a quantized model runs forward only: train the float checkpoint, then quantize it")]
    Quantized,
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: String, msg: String },
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("tensor parallel: {0}")]
    Comm(#[from] kiln_comm::CommError),
}
