//! `kiln export`: a checkpoint to another runtime's format (GGUF for llama.cpp).

use std::path::PathBuf;

use clap::Args;
use kiln_model::GgmlType;

use crate::usage;

#[derive(Args)]
pub struct ExportArgs {
    /// Checkpoint directory (a kiln run, its checkpoint/, or a Hugging Face GPT-2 / Llama /
    /// Qwen2 directory) with its tokenizer.json.
    #[arg(long)]
    ckpt: PathBuf,
    /// Output format; `gguf` is what llama.cpp (and ollama, LM Studio) load.
    #[arg(long, default_value = "gguf")]
    format: String,
    /// Weight type of the matrices: f32, f16, q8_0 (8-bit, one f16 scale per 32 weights) or
    /// q4_0 (4-bit, likewise). Norms and biases stay f32.
    #[arg(long = "type", default_value = "f32")]
    ty: String,
    /// The file to write (written to a temporary name, then renamed).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(a: &ExportArgs) -> anyhow::Result<()> {
    if a.format != "gguf" {
        return Err(usage(format!("--format {}: only gguf is supported", a.format)));
    }
    let ty = GgmlType::parse(&a.ty).ok_or_else(|| usage(format!("--type {}: use f32, f16, q8_0 or q4_0", a.ty)))?;
    let bytes = kiln_model::export_gguf(&a.ckpt, ty, &a.out)?;
    println!("wrote {} ({:.1} MB, {})", a.out.display(), bytes as f64 / 1e6, a.ty);
    Ok(())
}
