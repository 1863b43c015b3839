//! AdamW over every parameter tensor, global-norm clipping, and the learning-rate schedule.

use kiln_model::TrainableLm;
use kiln_tensor::kernels::AdamWStep;
use kiln_tensor::Kernels;

use crate::{LossScaler, TrainConfig};

/// nanoGPT's schedule: linear warmup to `lr` over `warmup` steps, then cosine decay to
/// `min_lr` at `total`. `step` is 0-based.
pub fn lr_at(step: u64, cfg: &TrainConfig) -> f32 {
    let (lr, min_lr) = (cfg.lr as f64, cfg.min_lr() as f64);
    if step < cfg.warmup_steps {
        return (lr * (step + 1) as f64 / (cfg.warmup_steps + 1) as f64) as f32;
    }
    let span = cfg.steps.saturating_sub(cfg.warmup_steps).max(1) as f64;
    let ratio = ((step - cfg.warmup_steps) as f64 / span).min(1.0);
    let coeff = 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos());
    (min_lr + coeff * (lr - min_lr)) as f32
}

/// AdamW moments, one pair of buffers per parameter tensor, and the step count.
#[derive(Clone, Debug)]
pub struct AdamW {
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
    pub t: u64,
}

impl AdamW {
    pub fn new(model: &dyn TrainableLm) -> AdamW {
        AdamW {
            m: model.params().iter().map(|p| vec![0.0; p.len()]).collect(),
            v: model.params().iter().map(|p| vec![0.0; p.len()]).collect(),
            t: 0,
        }
    }

    /// Global L2 norm of all gradients.
    pub fn grad_norm(model: &dyn TrainableLm, k: &dyn Kernels) -> f32 {
        model.grads().iter().map(|g| k.sum_of_squares(g)).sum::<f64>().sqrt() as f32
    }

    /// Clips the gradients to `clip` total norm (as `torch.nn.utils.clip_grad_norm_`: scale by
    /// clip / (norm + 1e-6) when that is below 1) and takes one AdamW step. Returns the norm
    /// before clipping.
    pub fn step(&mut self, model: &mut dyn TrainableLm, k: &dyn Kernels, lr: f32, cfg: &TrainConfig) -> f32 {
        let norm = Self::grad_norm(model, k);
        self.apply(model, k, lr, cfg, norm, 1.0);
        norm
    }

    /// [`AdamW::step`] on gradients multiplied by the scaler's loss scale (fp16; no scaler means
    /// a scale of 1): the true norm is theirs over the scale, and a non-finite one skips the
    /// update and tells the scaler. Returns (true norm, skipped).
    pub fn step_scaled(
        &mut self,
        model: &mut dyn TrainableLm,
        k: &dyn Kernels,
        lr: f32,
        cfg: &TrainConfig,
        scaler: Option<&mut LossScaler>,
    ) -> (f32, bool) {
        let loss_scale = scaler.as_ref().map_or(1.0, |s| s.scale);
        let norm = Self::grad_norm(model, k) / loss_scale;
        let apply = scaler.is_none_or(|s| s.update(norm.is_finite()));
        if apply {
            self.apply(model, k, lr, cfg, norm, 1.0 / loss_scale);
        }
        (norm, !apply)
    }

    /// The AdamW step on gradients that are `1 / inv_scale` times their true value (fp16 loss
    /// scaling multiplied them up) and whose true global norm is `norm`: unscaling and clipping
    /// fold into one factor, as GradScaler's `unscale_` then `clip_grad_norm_` would give.
    pub fn apply(
        &mut self,
        model: &mut dyn TrainableLm,
        k: &dyn Kernels,
        lr: f32,
        cfg: &TrainConfig,
        norm: f32,
        inv_scale: f32,
    ) {
        let grad_scale = clip_scale(cfg, norm) * inv_scale;
        self.t += 1;
        let info = model.param_info().to_vec();
        let (params, grads) = model.params_and_grads();
        for (i, p) in params.iter_mut().enumerate() {
            let s = step_params(cfg, lr, info[i].decay, self.t, grad_scale);
            k.adamw_update(p, &grads[i], &mut self.m[i], &mut self.v[i], &s);
        }
    }

    /// Bytes held by the moments.
    pub fn memory_bytes(&self) -> usize {
        self.m.iter().chain(&self.v).map(|x| x.len() * 4).sum()
    }
}

/// The factor `clip_grad_norm_` multiplies the gradients by.
pub(crate) fn clip_scale(cfg: &TrainConfig, norm: f32) -> f32 {
    if cfg.grad_clip > 0.0 {
        (cfg.grad_clip / (norm + 1e-6)).min(1.0)
    } else {
        1.0
    }
}

/// The AdamW step for one tensor (or a shard of one): decay applies to 2-D tensors only.
pub(crate) fn step_params(cfg: &TrainConfig, lr: f32, decay: bool, t: u64, grad_scale: f32) -> AdamWStep {
    AdamWStep {
        lr,
        beta1: cfg.beta1,
        beta2: cfg.beta2,
        eps: cfg.eps,
        weight_decay: if decay { cfg.weight_decay } else { 0.0 },
        t,
        grad_scale,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_min() {
        let cfg = TrainConfig { lr: 1e-3, warmup_steps: 10, steps: 110, ..Default::default() };
        assert!((lr_at(0, &cfg) - 1e-3 / 11.0).abs() < 1e-9);
        assert!(lr_at(5, &cfg) < lr_at(9, &cfg));
        assert!((lr_at(10, &cfg) - 1e-3).abs() < 1e-9);
        assert!(lr_at(60, &cfg) < 1e-3 && lr_at(60, &cfg) > 1e-4);
        assert!((lr_at(110, &cfg) - 1e-4).abs() < 1e-9);
        assert!((lr_at(500, &cfg) - 1e-4).abs() < 1e-9);
    }
}
