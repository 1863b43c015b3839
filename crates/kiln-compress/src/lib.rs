//! kiln-compress: post-training quantization of linear layers — round-to-nearest (RTN), GPTQ,
//! AWQ and SmoothQuant, to int8 and grouped int4 — as a matrix-level API with no model knowledge.
//!
//! Every function takes one linear weight `w [n_out, k_in]` row-major (PyTorch `Linear`) and,
//! where the algorithm needs data, a [`LinearCalib`] accumulated from that layer's inputs; it
//! returns the formats the kernels of [`kiln_tensor::quant`] run on ([`Int8Weight`],
//! [`Int4Weight`]). `model.rs` applies them to a whole kiln model: calibrate every linear layer
//! through the model's matmul observer, quantize, install (kiln-model keeps the weight I/O).
//!
//! Rounding is half to even everywhere (as `torch.round`), so results port to and from PyTorch.

mod awq;
mod calib;
mod gptq;
mod metrics;
mod model;
mod rtn;
mod smoothquant;

pub use awq::{awq_int4, awq_int4_with, awq_scales, AwqOptions};
pub use calib::LinearCalib;
pub use gptq::{gptq_int4, gptq_int8, GptqOptions};
pub use kiln_tensor::quant::{Int4Weight, Int8Weight, QuantError};
pub use metrics::{output_error_sq, relative_output_error};
pub use model::{
    calibrate, calibrate_only, check_options, quantize_model, quantize_model_sequential, LayerReport, Method,
    QuantizeOptions,
};
pub use rtn::{dequantize_int4, dequantize_int8, rtn_int4, rtn_int8};
pub use smoothquant::{smoothquant_scales, w8a8_smoothquant};

/// Why a weight could not be quantized.
#[derive(Debug, thiserror::Error)]
pub enum CompressError {
    #[error("{what}: expected {expected} elements, got {got}")]
    Len { what: &'static str, expected: usize, got: usize },
    #[error("{what}[{index}] is not finite")]
    NonFinite { what: &'static str, index: usize },
    #[error("calibration was collected for k = {calib}, the weight has k = {weight}")]
    CalibK { calib: usize, weight: usize },
    #[error("no calibration rows were observed")]
    NoCalibration,
    #[error(
        "the damped Hessian is not positive definite (pivot {column} of {k}, damp {damp}): \
         raise the damping or calibrate on more rows"
    )]
    NotPositiveDefinite { column: usize, k: usize, damp: f64 },
    #[error("an int4 group spans {0}, too wide for an f16 scale")]
    ScaleRange(f64),
    #[error("invalid option: {0}")]
    Option(String),
    #[error("tensor {0} is missing")]
    MissingTensor(String),
    #[error("tensor {name}: {why}")]
    BadTensor { name: String, why: String },
    #[error(transparent)]
    Quant(#[from] QuantError),
}

pub type Result<T> = std::result::Result<T, CompressError>;

/// Checks a weight matrix is `n·k` long, non-empty and finite.
fn check_weight(w: &[f32], n: usize, k: usize) -> Result<()> {
    check_len("weight", n * k, w.len())?;
    if n == 0 || k == 0 {
        return Err(QuantError::Empty { n, k }.into());
    }
    check_finite("weight", w)
}

fn check_len(what: &'static str, expected: usize, got: usize) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(CompressError::Len { what, expected, got })
    }
}

fn check_finite(what: &'static str, v: &[f32]) -> Result<()> {
    match v.iter().position(|x| !x.is_finite()) {
        Some(index) => Err(CompressError::NonFinite { what, index }),
        None => Ok(()),
    }
}

/// `W·diag(s)`: column j of `w [n, k]` multiplied by `s[j]`.
fn scale_columns(w: &[f32], k: usize, s: &[f32]) -> Vec<f32> {
    w.chunks_exact(k).flat_map(|row| row.iter().zip(s).map(|(&a, &b)| a * b)).collect()
}

#[cfg(test)]
pub(crate) mod testutil;
