//! Training precision: the kernels each choice runs on, and fp16's dynamic loss scaling.

use std::fmt;
use std::str::FromStr;

use kiln_tensor::{Kernels, LowPrecision, MixedPrecisionKernels};
use serde::{Deserialize, Serialize};

/// What the linear layers multiply in. Master weights, AdamW moments, norms, softmax,
/// cross-entropy and reductions stay f32 in every mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Fp32,
    Bf16,
    Fp16,
}

impl FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Precision, String> {
        match s.to_ascii_lowercase().as_str() {
            "fp32" | "f32" | "float32" => Ok(Precision::Fp32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            "fp16" | "f16" | "float16" | "half" => Ok(Precision::Fp16),
            _ => Err(format!("unknown precision '{s}': use fp32, bf16 or fp16")),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
        })
    }
}

/// `inner` as is for fp32, or wrapped so that its linear layers run in bf16 / fp16.
pub fn kernels_for(precision: Precision, stochastic_rounding: bool, inner: Box<dyn Kernels>) -> Box<dyn Kernels> {
    match precision {
        Precision::Fp32 => inner,
        Precision::Bf16 => Box::new(MixedPrecisionKernels::new(inner, LowPrecision::Bf16, stochastic_rounding)),
        Precision::Fp16 => Box::new(MixedPrecisionKernels::new(inner, LowPrecision::Fp16, false)),
    }
}

/// Dynamic loss scaling exactly as `torch.amp.GradScaler` with its defaults: the loss is
/// multiplied by `scale` before backward so small fp16 gradients do not flush to zero; a step
/// whose gradients hold an inf or NaN is skipped and the scale halves; after `growth_interval`
/// clean steps in a row the scale doubles. Saved in checkpoints, so a resumed run goes on with
/// the scale it had.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    pub scale: f32,
    /// Clean steps since the last change of scale.
    pub growth_tracker: u64,
    pub growth_interval: u64,
    /// Steps skipped for overflow over the whole run.
    pub skipped_steps: u64,
}

impl LossScaler {
    pub fn new(init_scale: f32, growth_interval: u64) -> LossScaler {
        LossScaler { scale: init_scale, growth_tracker: 0, growth_interval, skipped_steps: 0 }
    }

    /// Records one step's outcome; returns whether its update is to be applied.
    pub fn update(&mut self, grads_finite: bool) -> bool {
        if !grads_finite {
            self.scale *= 0.5;
            self.growth_tracker = 0;
            self.skipped_steps += 1;
            return false;
        }
        self.growth_tracker += 1;
        if self.growth_tracker == self.growth_interval {
            self.scale *= 2.0;
            self.growth_tracker = 0;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaler_halves_on_overflow_and_doubles_after_the_interval() {
        let mut s = LossScaler::new(65536.0, 3);
        assert!(!s.update(false));
        assert_eq!((s.scale, s.skipped_steps), (32768.0, 1));
        assert!(s.update(true) && s.update(true));
        assert_eq!(s.scale, 32768.0);
        assert!(s.update(true));
        assert_eq!((s.scale, s.growth_tracker), (65536.0, 0));
        // An overflow resets the run of clean steps.
        s.update(true);
        s.update(true);
        s.update(false);
        s.update(true);
        s.update(true);
        assert_eq!((s.scale, s.skipped_steps), (32768.0, 2));
    }

    #[test]
    fn precision_parses_and_prints() {
        for p in [Precision::Fp32, Precision::Bf16, Precision::Fp16] {
            assert_eq!(p.to_string().parse::<Precision>().unwrap(), p);
        }
        assert!("int8".parse::<Precision>().unwrap_err().contains("fp32, bf16 or fp16"));
    }
}
