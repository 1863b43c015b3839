//! `kiln export`: a checkpoint to another runtime's format (GGUF for llama.cpp, ONNX for
//! onnxruntime, TensorRT and Vitis AI).

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
    /// Output format: `gguf` is what llama.cpp (and ollama, LM Studio) load; `onnx` is one
    /// ONNX model (input `input_ids` [batch, seq] int64, output `logits` [batch, seq, vocab]).
    #[arg(long, default_value = "gguf")]
    format: String,
    /// GGUF weight type of the matrices: f32, f16, q8_0 (8-bit, one f16 scale per 32 weights)
    /// or q4_0 (4-bit, likewise). Norms and biases stay f32.
    #[arg(long = "type", default_value = "f32")]
    ty: String,
    /// ONNX: the QDQ form (int8 weights per output channel behind DequantizeLinear, int8
    /// activations per tensor through QuantizeLinear/DequantizeLinear, scales calibrated).
    #[arg(long)]
    qdq: bool,
    /// ONNX opset, 17 to 21 (from 20, GELU is the Gelu operator).
    #[arg(long, default_value_t = 17)]
    opset: i64,
    /// ONNX --qdq: text file to calibrate activation scales on (8 windows of up to 128 tokens);
    /// without it, 8 seeded sequences of random token ids.
    #[arg(long)]
    calib: Option<PathBuf>,
    /// The file to write (written to a temporary name, then renamed).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(a: &ExportArgs) -> anyhow::Result<()> {
    match a.format.as_str() {
        "gguf" => {
            if a.qdq || a.calib.is_some() {
                return Err(usage("--qdq and --calib apply to --format onnx"));
            }
            let ty =
                GgmlType::parse(&a.ty).ok_or_else(|| usage(format!("--type {}: use f32, f16, q8_0 or q4_0", a.ty)))?;
            let bytes = kiln_model::export_gguf(&a.ckpt, ty, &a.out)?;
            println!("wrote {} ({:.1} MB, {})", a.out.display(), bytes as f64 / 1e6, a.ty);
        }
        "onnx" => {
            if a.ty != "f32" {
                return Err(usage("--type applies to --format gguf; use --qdq for an int8 ONNX model"));
            }
            if !(17..=21).contains(&a.opset) {
                return Err(usage(format!("--opset {}: use 17 to 21", a.opset)));
            }
            if a.calib.is_some() && !a.qdq {
                return Err(usage("--calib calibrates the --qdq form; add --qdq"));
            }
            let opts =
                kiln_hw::OnnxOptions { qdq: a.qdq, opset: a.opset, calib_text: a.calib.clone(), ..Default::default() };
            let bytes = kiln_hw::export_onnx(&a.ckpt, &opts, &a.out)?;
            let form = if a.qdq { "QDQ int8" } else { "f32" };
            println!("wrote {} ({:.1} MB, ONNX opset {}, {form})", a.out.display(), bytes as f64 / 1e6, a.opset);
        }
        other => return Err(usage(format!("--format {other}: use gguf or onnx"))),
    }
    Ok(())
}
