//! Opening a checkpoint directory (a kiln run, its checkpoint/, or a Hugging Face model
//! directory) for inference: the model, of whatever supported architecture, and its tokenizer.

use std::path::Path;

use kiln_data::Tokenizer;
use kiln_model::CausalLm;

use crate::usage;

pub fn model(path: &Path) -> anyhow::Result<Box<dyn CausalLm>> {
    Ok(kiln_model::load_causal_lm(path)?)
}

/// The integer-only (I-BERT-style w8a8 fixed-point) executor of kiln-hw, calibrated on `calib`
/// text (seeded random tokens when absent), or the ordinary model.
pub fn model_maybe_integer(path: &Path, integer_only: bool, calib: Option<&Path>) -> anyhow::Result<Box<dyn CausalLm>> {
    if integer_only {
        Ok(kiln_hw::load_integer_only(&kiln_model::resolve_model_dir(path), calib)?)
    } else {
        model(path)
    }
}

pub fn model_and_tokenizer(path: &Path) -> anyhow::Result<(Box<dyn CausalLm>, Tokenizer)> {
    let m = model(path)?;
    let tok_path = kiln_model::resolve_model_dir(path).join("tokenizer.json");
    if !tok_path.is_file() {
        return Err(usage(format!("{} has no tokenizer.json", path.display())));
    }
    Ok((m, Tokenizer::from_file(&tok_path)?))
}
