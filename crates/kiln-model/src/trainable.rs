//! What a trainer needs of a model, for every architecture: the parameter tensors by name, a
//! forward with a loss, a backward that accumulates gradients, and a Hugging Face save. The
//! trainer, the optimizer and the data-parallel engine see only this trait, so GPT-2 and the
//! Llama family train, resume and run data parallel through one code path.

use std::path::Path;

use kiln_comm::Comm;
use kiln_tensor::Kernels;

use crate::checkpoint::{ck_err, load_hf_dir_skipping, read_model_type, resolve_model_dir, save_hf_files_keeping};
use crate::llama::{load_llama_dir_skipping, save_llama_hf_files_keeping};
use crate::quant::{read_quant_info, read_quant_tensors, write_quant_tensors, Linears, QuantInfo, QuantWeight};
use crate::{CausalLm, Gpt, GptConfig, Llama, LlamaConfig, ModelError, ParamInfo, Shard, Slice};

/// The callback of [`TrainableLm::backward_with`]: parameter indices whose gradients are final,
/// and all the gradients.
pub type GradsReady<'a> = dyn FnMut(&[usize], &[Vec<f32>]) + Send + 'a;

pub trait TrainableLm: CausalLm {
    /// Name, logical shape and weight-decay flag of every tensor, in storage order.
    fn param_info(&self) -> &[ParamInfo];
    /// One buffer per tensor (a buffer may be padded past its logical shape).
    fn params(&self) -> &[Vec<f32>];
    fn params_mut(&mut self) -> &mut [Vec<f32>];
    /// Same layout as `params`; empty until the first `zero_grad` or backward.
    fn grads(&self) -> &[Vec<f32>];
    fn grads_mut(&mut self) -> &mut [Vec<f32>];
    /// The parameters beside their gradients, for an optimizer that writes one and reads the other.
    fn params_and_grads(&mut self) -> (&mut [Vec<f32>], &[Vec<f32>]);
    fn zero_grad(&mut self);
    /// Forward over `tokens [b, t]`; with targets, the mean cross-entropy (kept for backward).
    fn forward(
        &mut self,
        k: &dyn Kernels,
        tokens: &[u32],
        targets: Option<&[u32]>,
        b: usize,
        t: usize,
    ) -> Result<Option<f32>, ModelError>;
    /// Backward of the last forward's mean loss times `loss_scale`, accumulated into the gradients.
    fn backward(&mut self, k: &dyn Kernels, loss_scale: f32) -> Result<(), ModelError> {
        self.backward_with(k, loss_scale, &mut |_, _| {})
    }
    /// `backward`, calling `ready(params, grads)` as soon as the gradients of the parameters
    /// `params` (indices into `param_info`) are final, layer by layer from the output down,
    /// every parameter exactly once: data parallelism starts reducing them while the layers
    /// below are still being differentiated.
    fn backward_with(&mut self, k: &dyn Kernels, loss_scale: f32, ready: &mut GradsReady) -> Result<(), ModelError>;
    /// A model of the same shape with every parameter zero (a data-parallel replica).
    fn zeros_like(&self) -> Result<Box<dyn TrainableLm>, ModelError>;
    /// Bytes of parameters, gradients and activations held now.
    fn memory_bytes(&self) -> usize;
    /// config.json and model.safetensors with Hugging Face names, into `dir`.
    fn save_hf(&self, dir: &Path, eos: Option<u32>) -> Result<(), ModelError> {
        self.save_hf_keeping(dir, eos, &|_| true)
    }
    /// [`TrainableLm::save_hf`] with only the tensors `keep` accepts (by kiln name).
    fn save_hf_keeping(&self, dir: &Path, eos: Option<u32>, keep: &dyn Fn(&str) -> bool) -> Result<(), ModelError>;
    /// Indices of every matmul weight `[out, in]`, the output head included.
    fn linear_params(&self) -> Vec<usize>;
    /// Indices of tables read by row (token embeddings).
    fn embedding_params(&self) -> Vec<usize>;
    fn linears(&self) -> &Linears;
    fn linears_mut(&mut self) -> &mut Linears;
    /// Training FLOPs per token at sequence length `t` (nanoGPT / PaLM convention: 6 per
    /// parameter that takes part in a matmul, plus 12·L·T·(attention width) for attention).
    fn train_flops_per_token(&self, t: usize) -> f64;

    // Tensor and pipeline parallelism. An architecture that does not implement them is always
    // whole ([`Shard::FULL`]) and refuses to be cut.

    /// The part of the model this is: [`Shard::FULL`] unless tensor or pipeline parallel.
    fn shard(&self) -> Shard {
        Shard::FULL
    }
    /// Where each tensor lies in the full model's tensor of the same name.
    fn param_slices(&self) -> Vec<Slice> {
        vec![Slice::Whole; self.param_info().len()]
    }
    /// Shard `shard` of this whole model, its tensors copied out.
    fn to_shard(&self, shard: Shard) -> Result<Box<dyn TrainableLm>, ModelError> {
        if !shard.is_full() {
            return Err(ModelError::BadConfig(format!(
                "tensor and pipeline parallelism are built for GPT-2 models, not {}: use --dp",
                self.model_type()
            )));
        }
        let mut m = self.zeros_like()?;
        m.params_mut().iter_mut().zip(self.params()).for_each(|(d, s)| d.copy_from_slice(s));
        Ok(m)
    }
    /// The tensor-parallel group of a shard with `tp > 1` (its stage's ranks, in tp order).
    fn set_tp_group(&mut self, tp: Box<dyn Comm>) -> Result<(), ModelError> {
        if tp.size() == 1 {
            Ok(())
        } else {
            Err(ModelError::BadConfig(format!("{} has no tensor-parallel implementation", self.model_type())))
        }
    }
    /// Width of the hidden state one pipeline stage hands the next, per position.
    fn hidden_width(&self) -> usize;
    /// This pipeline stage's forward: the first stage embeds `tokens`, the others start from
    /// `hidden` (the previous stage's [`TrainableLm::stage_output`]); the last stage returns
    /// the mean loss when given targets.
    fn forward_stage(
        &mut self,
        k: &dyn Kernels,
        tokens: &[u32],
        targets: Option<&[u32]>,
        hidden: Option<&[f32]>,
        b: usize,
        t: usize,
    ) -> Result<Option<f32>, ModelError> {
        if hidden.is_some() {
            return Err(ModelError::BadConfig("a whole model takes no hidden input".into()));
        }
        self.forward(k, tokens, targets, b, t)
    }
    /// A stage's output after `forward_stage`, `[b·t, hidden_width]` (not on the last stage).
    fn stage_output(&self) -> Option<&[f32]> {
        None
    }
    /// This stage's backward: the last stage from its loss times `loss_scale`, the others
    /// from `d_out`, the gradient of their output.
    fn backward_stage(
        &mut self,
        k: &dyn Kernels,
        loss_scale: f32,
        d_out: Option<&[f32]>,
        ready: &mut GradsReady,
    ) -> Result<(), ModelError> {
        if d_out.is_some() {
            return Err(ModelError::BadConfig("a whole model takes no output gradient".into()));
        }
        self.backward_with(k, loss_scale, ready)
    }
    /// The gradient of a stage's input after `backward_stage` (not on the first stage).
    fn stage_input_grad(&self) -> Option<&[f32]> {
        None
    }
    /// Makes activation set `slot` current: a pipeline stage keeps one per micro-batch in flight.
    fn select_activations(&mut self, slot: usize) {
        let _ = slot;
    }
    /// The tensor this pipeline stage shares with another (GPT-2's token table, on the first
    /// and the last stage): the two copies' gradients are summed every step.
    fn tied_param(&self) -> Option<usize> {
        None
    }
}

/// The trait methods both architectures answer from their inherent methods and fields.
macro_rules! shared_trainable_methods {
    () => {
        fn param_info(&self) -> &[ParamInfo] {
            Self::param_info(self)
        }
        fn params(&self) -> &[Vec<f32>] {
            &self.params
        }
        fn params_mut(&mut self) -> &mut [Vec<f32>] {
            &mut self.params
        }
        fn grads(&self) -> &[Vec<f32>] {
            &self.grads
        }
        fn grads_mut(&mut self) -> &mut [Vec<f32>] {
            &mut self.grads
        }
        fn params_and_grads(&mut self) -> (&mut [Vec<f32>], &[Vec<f32>]) {
            (&mut self.params, &self.grads)
        }
        fn zero_grad(&mut self) {
            Self::zero_grad(self)
        }
        fn forward(
            &mut self,
            k: &dyn Kernels,
            tokens: &[u32],
            targets: Option<&[u32]>,
            b: usize,
            t: usize,
        ) -> Result<Option<f32>, ModelError> {
            Self::forward(self, k, tokens, targets, b, t)
        }
        fn backward_with(
            &mut self,
            k: &dyn Kernels,
            loss_scale: f32,
            ready: &mut GradsReady,
        ) -> Result<(), ModelError> {
            Self::backward_with(self, k, loss_scale, ready)
        }
        fn zeros_like(&self) -> Result<Box<dyn TrainableLm>, ModelError> {
            Ok(Box::new(Self::zeros(self.config.clone())?))
        }
        fn memory_bytes(&self) -> usize {
            Self::memory_bytes(self)
        }
        fn linear_params(&self) -> Vec<usize> {
            Self::linear_params(self)
        }
        fn linears(&self) -> &Linears {
            &self.lin
        }
        fn linears_mut(&mut self) -> &mut Linears {
            &mut self.lin
        }
    };
}

impl TrainableLm for Gpt {
    shared_trainable_methods!();
    fn save_hf_keeping(&self, dir: &Path, eos: Option<u32>, keep: &dyn Fn(&str) -> bool) -> Result<(), ModelError> {
        save_hf_files_keeping(self, dir, eos, keep)
    }
    fn embedding_params(&self) -> Vec<usize> {
        Self::embedding_params(self) // wte; the position table wpe is added, never multiplied
    }
    fn train_flops_per_token(&self, t: usize) -> f64 {
        self.config.train_flops_per_token(t)
    }
    fn shard(&self) -> Shard {
        Self::shard(self)
    }
    fn param_slices(&self) -> Vec<Slice> {
        Self::param_slices(self).to_vec()
    }
    fn to_shard(&self, shard: Shard) -> Result<Box<dyn TrainableLm>, ModelError> {
        Ok(Box::new(Self::to_shard(self, shard)?))
    }
    fn set_tp_group(&mut self, tp: Box<dyn Comm>) -> Result<(), ModelError> {
        Self::set_tp_group(self, tp)
    }
    fn hidden_width(&self) -> usize {
        self.config.n_embd
    }
    fn forward_stage(
        &mut self,
        k: &dyn Kernels,
        tokens: &[u32],
        targets: Option<&[u32]>,
        hidden: Option<&[f32]>,
        b: usize,
        t: usize,
    ) -> Result<Option<f32>, ModelError> {
        Self::forward_stage(self, k, tokens, targets, hidden, b, t)
    }
    fn stage_output(&self) -> Option<&[f32]> {
        Self::stage_output(self)
    }
    fn backward_stage(
        &mut self,
        k: &dyn Kernels,
        loss_scale: f32,
        d_out: Option<&[f32]>,
        ready: &mut GradsReady,
    ) -> Result<(), ModelError> {
        Self::backward_stage(self, k, loss_scale, d_out, ready)
    }
    fn stage_input_grad(&self) -> Option<&[f32]> {
        Self::stage_input_grad(self)
    }
    fn select_activations(&mut self, slot: usize) {
        Self::select_activations(self, slot)
    }
    fn tied_param(&self) -> Option<usize> {
        Self::tied_param(self)
    }
}

impl TrainableLm for Llama {
    shared_trainable_methods!();
    fn save_hf_keeping(&self, dir: &Path, eos: Option<u32>, keep: &dyn Fn(&str) -> bool) -> Result<(), ModelError> {
        save_llama_hf_files_keeping(self, dir, eos, None, keep)
    }
    fn embedding_params(&self) -> Vec<usize> {
        vec![self.embed_index()]
    }
    fn hidden_width(&self) -> usize {
        self.config.n_embd
    }
    fn train_flops_per_token(&self, t: usize) -> f64 {
        let c = &self.config;
        // The embedding lookup is not a matmul unless the table is also the (tied) head.
        let lookup = if c.tie_embeddings { 0 } else { c.vocab_size * c.n_embd };
        6.0 * (c.num_params() - lookup) as f64 + 12.0 * (c.n_layer * t * c.q_dim()) as f64
    }
}

/// Shape overrides a training run may put on a preset (`--layers`, `--heads`, `--embd`, `--context`).
#[derive(Clone, Copy, Debug, Default)]
pub struct ShapeOverrides {
    pub n_layer: Option<usize>,
    pub n_head: Option<usize>,
    pub n_embd: Option<usize>,
    pub context: Option<usize>,
}

/// A freshly initialised model of preset `name` (GPT-2 or Llama family), sized to `vocab`
/// (the preset's own vocabulary when `None`).
pub fn new_trainable(
    name: &str,
    vocab: Option<usize>,
    o: ShapeOverrides,
    seed: u64,
) -> Result<Box<dyn TrainableLm>, ModelError> {
    if name.starts_with("llama") {
        let mut mc = LlamaConfig::preset(name, vocab)?;
        mc.n_layer = o.n_layer.unwrap_or(mc.n_layer);
        mc.n_embd = o.n_embd.unwrap_or(mc.n_embd);
        mc.block_size = o.context.unwrap_or(mc.block_size);
        if let Some(h) = o.n_head {
            // Keep the preset's grouping where it divides the new head count, else plain MHA.
            mc.n_kv_head = if h % mc.n_kv_head == 0 { mc.n_kv_head } else { h };
            mc.n_head = h;
        }
        if mc.n_head == 0 || !mc.n_embd.is_multiple_of(mc.n_head) {
            return Err(ModelError::BadConfig(format!(
                "embedding width {} is not a multiple of the {} heads",
                mc.n_embd, mc.n_head
            )));
        }
        mc.head_dim = mc.n_embd / mc.n_head;
        mc.validate()?;
        return Ok(Box::new(Llama::new(mc, seed)?));
    }
    let mut mc = GptConfig::preset(name, vocab)?;
    mc.n_layer = o.n_layer.unwrap_or(mc.n_layer);
    mc.n_head = o.n_head.unwrap_or(mc.n_head);
    mc.n_embd = o.n_embd.unwrap_or(mc.n_embd);
    mc.block_size = o.context.unwrap_or(mc.block_size);
    mc.validate()?;
    Ok(Box::new(Gpt::new(mc, seed)?))
}

/// Loads a checkpoint directory (kiln or Hugging Face; GPT-2 or Llama family), quantized or not.
pub fn load_trainable(dir: &Path) -> Result<Box<dyn TrainableLm>, ModelError> {
    let dir = &resolve_model_dir(dir);
    if !dir.join("config.json").is_file() {
        return Err(ck_err(dir, "no config.json (is this a checkpoint directory?)"));
    }
    let quant = read_quant_info(dir)?;
    let skip = |name: &str| quant.as_ref().is_some_and(|q| q.tensors.contains_key(name));
    let mut model: Box<dyn TrainableLm> = match read_model_type(dir)?.as_str() {
        "gpt2" => Box::new(load_hf_dir_skipping(dir, &skip)?),
        "llama" | "qwen2" | "mistral" => Box::new(load_llama_dir_skipping(dir, &skip)?),
        other => {
            return Err(ck_err(dir, format!("model_type '{other}' is not supported (gpt2, llama, qwen2, mistral are)")))
        }
    };
    if let Some(info) = quant {
        let path = dir.join("model.quant.safetensors");
        for (name, q) in read_quant_tensors(&path, &info)? {
            let i =
                model.param_info().iter().position(|p| p.name == name).ok_or_else(|| {
                    ck_err(&path, format!("kiln.json quantizes {name}, which the model does not have"))
                })?;
            install_quantized(model.as_mut(), i, q).map_err(|e| ck_err(&path, e.to_string()))?;
        }
    }
    Ok(model)
}

/// Makes `q` parameter `i`'s weight in every forward: a linear's f32 copy is freed; a token
/// table keeps an f32 copy, dequantized from `q`, for the row lookup.
pub fn install_quantized(model: &mut dyn TrainableLm, i: usize, q: QuantWeight) -> Result<(), ModelError> {
    let info = model.param_info().get(i).cloned().ok_or_else(|| ModelError::Shape(format!("no parameter {i}")))?;
    if !model.linear_params().contains(&i) {
        return Err(ModelError::Shape(format!("{} is not a linear weight: it cannot be quantized", info.name)));
    }
    let (n, k) = q.shape();
    let buffer = model.params()[i].len().max(info.shape.iter().product());
    if info.shape.len() != 2 || k != info.shape[1] || n * k != buffer {
        return Err(ModelError::Shape(format!(
            "{}: quantized as [{n}, {k}], the model's tensor is {:?}",
            info.name, info.shape
        )));
    }
    let count = model.params().len();
    if model.embedding_params().contains(&i) {
        model.params_mut()[i] = q.dequantize();
    } else {
        model.params_mut()[i] = Vec::new();
    }
    model.linears_mut().set(count, i, q);
    Ok(())
}

/// Writes a quantized model's config.json, model.safetensors (the float tensors) and
/// model.quant.safetensors (the quantized ones) into `dir`; kiln.json is the caller's (it
/// records `info` under "quantization").
pub fn save_quantized(
    model: &dyn TrainableLm,
    dir: &Path,
    eos: Option<u32>,
    info: &QuantInfo,
) -> Result<(), ModelError> {
    let names: Vec<String> = model.param_info().iter().map(|p| p.name.clone()).collect();
    model.save_hf_keeping(dir, eos, &|name| !info.tensors.contains_key(name))?;
    write_quant_tensors(&dir.join("model.quant.safetensors"), model.linears(), &names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_tensor::CpuKernels;

    /// `backward_with` names every parameter exactly once, and only when its gradient is final:
    /// what it reports equals what the whole backward ends with, bit for bit.
    #[test]
    fn gradients_are_reported_once_and_final() {
        let k = CpuKernels::default();
        for preset in ["gpt-tiny", "llama-tiny"] {
            let mut m = new_trainable(preset, Some(97), ShapeOverrides::default(), 3).unwrap();
            let (b, t) = (2, 9);
            let x: Vec<u32> = (0..b * t).map(|i| (i * 7 % 97) as u32).collect();
            let y: Vec<u32> = (0..b * t).map(|i| (i * 5 % 97) as u32).collect();
            m.zero_grad();
            m.forward(&k, &x, Some(&y), b, t).unwrap();
            let mut seen: Vec<(usize, Vec<f32>)> = Vec::new();
            m.backward_with(&k, 1.0, &mut |ids, grads| seen.extend(ids.iter().map(|&i| (i, grads[i].clone()))))
                .unwrap();
            let n = m.param_info().len();
            let mut ids: Vec<usize> = seen.iter().map(|s| s.0).collect();
            ids.sort();
            assert_eq!(ids, (0..n).collect::<Vec<_>>(), "{preset}: every parameter once");
            for (i, g) in &seen {
                assert!(g == &m.grads()[*i], "{preset}: {} changed after it was reported", m.param_info()[*i].name);
            }
        }
    }
}
