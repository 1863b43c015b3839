//! GPT-2: pre-LayerNorm blocks, learned positions, tied embeddings, GELU-tanh. Forward and
//! backward are written out layer by layer (llm.c style) over one [`Kernels`] backend.
//!
//! Parameters live one `Vec<f32>` per tensor, in PyTorch `Linear` layout `[out, in]`; the token
//! embedding is stored with the vocabulary padded to a multiple of 64 (padded rows stay zero).
//!
//! A model may be a [`Shard`] of the whole: a pipeline stage holds a range of blocks (the first
//! also the embeddings, the last the final LayerNorm and the tied head), and a tensor-parallel
//! rank holds its share of every block's heads (QKV by rows, the attention projection by
//! columns) and MLP units (fc by rows, its projection by columns), summing each row-parallel
//! output over its group in forward and each column-parallel input gradient in backward
//! (Megatron-LM's f and g).

use std::ops::Range;

use kiln_comm::Comm;
use kiln_tensor::Kernels;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::quant::Linears;
use crate::shard::{Shard, Slice};
use crate::trainable::GradsReady;
use crate::{GptConfig, ModelError};

mod kv_cache;

/// Tensors per transformer block, in storage order.
const PER_LAYER: usize = 12;
const LAYER_TENSORS: [&str; PER_LAYER] = [
    "ln_1.weight",
    "ln_1.bias",
    "attn.c_attn.weight",
    "attn.c_attn.bias",
    "attn.c_proj.weight",
    "attn.c_proj.bias",
    "ln_2.weight",
    "ln_2.bias",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
];
const LN1_W: usize = 0;
const QKV_W: usize = 2;
const PROJ_W: usize = 4;
const LN2_W: usize = 6;
const FC_W: usize = 8;
const FCPROJ_W: usize = 10;
const WTE: usize = 0;
const WPE: usize = 1;

/// Name (Hugging Face GPT-2 naming without the `transformer.` prefix), logical shape, and
/// whether AdamW decays it (2-D tensors only, as GPT-2 and nanoGPT do).
#[derive(Clone, Debug, PartialEq)]
pub struct ParamInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub decay: bool,
}

/// Activations of one block kept for backward.
struct LayerActs {
    ln1: Vec<f32>,
    ln1_mean: Vec<f32>,
    ln1_rstd: Vec<f32>,
    qkv: Vec<f32>,
    atty: Vec<f32>,
    lse: Vec<f32>,
    res2: Vec<f32>,
    ln2: Vec<f32>,
    ln2_mean: Vec<f32>,
    ln2_rstd: Vec<f32>,
    /// MLP pre-activation; GELU(fch) is recomputed in backward instead of stored.
    fch: Vec<f32>,
    res3: Vec<f32>,
}

/// Every buffer a forward (and backward) of a `[b, t]` batch needs, allocated once per shape.
struct Acts {
    b: usize,
    t: usize,
    tokens: Vec<u32>,
    targets: Option<Vec<u32>>,
    /// A forward ran whose backward has not: with targets on the last stage, always elsewhere.
    pending: bool,
    /// The embeddings on the first stage; the previous stage's output on the others.
    encoded: Vec<f32>,
    layers: Vec<LayerActs>,
    lnf: Vec<f32>,
    lnf_mean: Vec<f32>,
    lnf_rstd: Vec<f32>,
    /// `[b·t, vocab_padded]` (last stage only); backward overwrites it with its gradient.
    logits: Vec<f32>,
    losses: Vec<f32>,
    scratch_c: Vec<f32>,
    scratch_4c: Vec<f32>,
    // Backward-only scratch, allocated on the first backward. After a stage's backward, `dres`
    // holds the gradient of its input.
    dres: Vec<f32>,
    dx: Vec<f32>,
    dqkv: Vec<f32>,
    d4c: Vec<f32>,
}

/// The widths one tensor-parallel rank works with.
#[derive(Clone, Copy)]
struct Dims {
    c: usize,
    /// Attention width of this rank's heads, and their count.
    ca: usize,
    nh: usize,
    /// MLP hidden units of this rank.
    f: usize,
}

impl Acts {
    fn new(cfg: &GptConfig, d: Dims, layers: usize, last: bool, b: usize, t: usize) -> Acts {
        let (n, c) = (b * t, d.c);
        let z = |k: usize| vec![0.0f32; k];
        let layers = (0..layers)
            .map(|_| LayerActs {
                ln1: z(n * c),
                ln1_mean: z(n),
                ln1_rstd: z(n),
                qkv: z(n * 3 * d.ca),
                atty: z(n * d.ca),
                lse: z(b * d.nh * t),
                res2: z(n * c),
                ln2: z(n * c),
                ln2_mean: z(n),
                ln2_rstd: z(n),
                fch: z(n * d.f),
                res3: z(n * c),
            })
            .collect();
        let tail = |k: usize| if last { z(k) } else { Vec::new() };
        Acts {
            b,
            t,
            tokens: vec![0; n],
            targets: None,
            pending: false,
            encoded: z(n * c),
            layers,
            lnf: tail(n * c),
            lnf_mean: tail(n),
            lnf_rstd: tail(n),
            logits: tail(n * cfg.padded_vocab()),
            losses: z(n),
            scratch_c: z(n * c),
            scratch_4c: z(n * d.f),
            dres: Vec::new(),
            dx: Vec::new(),
            dqkv: Vec::new(),
            d4c: Vec::new(),
        }
    }

    fn output(&self) -> &[f32] {
        self.layers.last().map_or(&self.encoded, |la| &la.res3)
    }

    fn floats(&self) -> usize {
        let per: usize = self
            .layers
            .iter()
            .map(|l| {
                l.ln1.len()
                    + l.ln1_mean.len() * 2
                    + l.qkv.len()
                    + l.atty.len()
                    + l.lse.len()
                    + l.res2.len()
                    + l.ln2.len()
                    + l.ln2_mean.len() * 2
                    + l.fch.len()
                    + l.res3.len()
            })
            .sum();
        per + self.encoded.len()
            + self.lnf.len()
            + self.logits.len()
            + self.scratch_c.len()
            + self.scratch_4c.len()
            + self.dres.len()
            + self.dx.len()
            + self.dqkv.len()
            + self.d4c.len()
    }
}

pub struct Gpt {
    pub config: GptConfig,
    /// One buffer per tensor, in [`Gpt::param_info`] order.
    pub params: Vec<Vec<f32>>,
    /// Same layout as `params`; empty until the first backward. Backward accumulates into it.
    pub grads: Vec<Vec<f32>>,
    info: Vec<ParamInfo>,
    /// The part of the model this is ([`Shard::FULL`] unless tensor or pipeline parallel),
    /// where each tensor lies in the full model's, and the blocks it holds.
    shard: Shard,
    slices: Vec<Slice>,
    layers: Range<usize>,
    /// The tensor-parallel group (tp > 1): row-parallel outputs and column-parallel input
    /// gradients are summed over it.
    tp: Option<Box<dyn Comm>>,
    acts: Option<Acts>,
    /// Activations of other micro-batches in flight (pipeline 1F1B), by slot; `slot` is the
    /// one `acts` belongs to.
    parked: Vec<Option<Acts>>,
    slot: usize,
    /// Quantized copies of the linear weights (none for a float model) and the calibration hook.
    pub(crate) lin: Linears,
}

/// Two distinct elements of a slice, mutably (a weight and its bias).
fn pair_mut(v: &mut [Vec<f32>], i: usize) -> (&mut [f32], &mut [f32]) {
    let (a, b) = v.split_at_mut(i + 1);
    (&mut a[i], &mut b[0])
}

/// Sums `buf` over the tensor-parallel group (nothing to do without one).
fn tp_sum(tp: Option<&dyn Comm>, buf: &mut [f32]) -> Result<(), ModelError> {
    match tp {
        Some(c) => Ok(c.all_reduce(buf, kiln_comm::ReduceOp::Sum)?),
        None => Ok(()),
    }
}

impl Gpt {
    /// A model with all parameters zero (to be filled by a checkpoint).
    pub fn zeros(config: GptConfig) -> Result<Gpt, ModelError> {
        Self::zeros_shard(config, Shard::FULL)
    }

    /// Shard `shard` of a model, all zero: its tensors cut to the shard's shapes.
    pub fn zeros_shard(config: GptConfig, shard: Shard) -> Result<Gpt, ModelError> {
        config.validate()?;
        shard.check(config.n_layer, &[("attention heads", config.n_head)])?;
        let (info, slices) = Self::param_info_for(&config, &shard);
        let c = config.n_embd;
        let params = info
            .iter()
            .map(|p| {
                if p.name == "wte.weight" {
                    vec![0.0; config.padded_vocab() * c]
                } else {
                    vec![0.0; p.shape.iter().product()]
                }
            })
            .collect();
        let layers = shard.layers(config.n_layer, config.head_cost_in_blocks());
        Ok(Gpt {
            config,
            params,
            grads: Vec::new(),
            info,
            shard,
            slices,
            layers,
            tp: None,
            acts: None,
            parked: Vec::new(),
            slot: 0,
            lin: Linears::default(),
        })
    }

    /// GPT-2 initialisation: N(0, 0.02) weights, N(0, 0.02/√(2L)) for the projections into the
    /// residual stream, zero biases, unit LayerNorm gains. Deterministic in `seed`.
    pub fn new(config: GptConfig, seed: u64) -> Result<Gpt, ModelError> {
        let mut m = Gpt::zeros(config)?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let proj_std = 0.02 / (2.0 * m.config.n_layer as f32).sqrt();
        let v_rows = m.config.vocab_size * m.config.n_embd;
        for (i, info) in m.info.iter().enumerate() {
            let p = &mut m.params[i];
            if info.name.ends_with("ln_1.weight") || info.name.ends_with("ln_2.weight") || info.name == "ln_f.weight" {
                p.fill(1.0);
            } else if info.decay {
                let std = if info.name.ends_with("c_proj.weight") { proj_std } else { 0.02 };
                let n = if i == WTE { v_rows } else { p.len() };
                for x in p[..n].iter_mut() {
                    *x = std * normal(&mut rng);
                }
            }
        }
        Ok(m)
    }

    /// Names and shapes of a shard's tensors, in storage order: the embeddings (first stage),
    /// the blocks, then the final LayerNorm and, on a last stage that is not also the first,
    /// a copy of the tied token table for the head.
    fn param_info_for(cfg: &GptConfig, shard: &Shard) -> (Vec<ParamInfo>, Vec<Slice>) {
        let c = cfg.n_embd;
        let (heads, units) = (shard.tp_part(c), shard.tp_part(4 * c));
        let (ca, f) = (heads.len(), units.len());
        let mut v = Vec::new();
        let mut add = |name: String, shape: Vec<usize>, slice: Slice| {
            let decay = shape.len() >= 2;
            v.push((ParamInfo { name, shape, decay }, slice));
        };
        if shard.first() {
            add("wte.weight".into(), vec![cfg.vocab_size, c], Slice::Whole);
            add("wpe.weight".into(), vec![cfg.block_size, c], Slice::Whole);
        }
        let qkv_rows = Slice::Rows((0..3).map(|j| j * c + heads.start..j * c + heads.end).collect());
        for l in shard.layers(cfg.n_layer, cfg.head_cost_in_blocks()) {
            let layer: [(Vec<usize>, Slice); PER_LAYER] = [
                (vec![c], Slice::Whole),
                (vec![c], Slice::Whole),
                (vec![3 * ca, c], qkv_rows.clone()),
                (vec![3 * ca], qkv_rows.clone()),
                (vec![c, ca], Slice::Cols(heads.clone())),
                (vec![c], Slice::Whole),
                (vec![c], Slice::Whole),
                (vec![c], Slice::Whole),
                (vec![f, c], Slice::Rows(vec![units.clone()])),
                (vec![f], Slice::Rows(vec![units.clone()])),
                (vec![c, f], Slice::Cols(units.clone())),
                (vec![c], Slice::Whole),
            ];
            for (name, (shape, slice)) in LAYER_TENSORS.iter().zip(layer) {
                add(format!("h.{l}.{name}"), shape, slice);
            }
        }
        if shard.last() {
            add("ln_f.weight".into(), vec![c], Slice::Whole);
            add("ln_f.bias".into(), vec![c], Slice::Whole);
            if !shard.first() {
                add("wte.weight".into(), vec![cfg.vocab_size, c], Slice::TiedCopy);
            }
        }
        v.into_iter().unzip()
    }

    fn dims(&self) -> Dims {
        let c = self.config.n_embd;
        Dims { c, ca: c / self.shard.tp, nh: self.config.n_head / self.shard.tp, f: 4 * c / self.shard.tp }
    }

    /// Index of the first tensor of this model's `l`-th block (counted within the stage).
    fn layer_base(&self, l: usize) -> usize {
        2 * usize::from(self.shard.first()) + l * PER_LAYER
    }

    /// Index of ln_f.weight (last stage).
    fn lnf_index(&self) -> usize {
        self.layer_base(self.layers.len())
    }

    /// Index of the token table the head multiplies by (last stage).
    fn head_index(&self) -> usize {
        if self.shard.first() {
            WTE
        } else {
            self.lnf_index() + 2
        }
    }

    /// Indices of every matmul weight `[out, in]`, the tied head (the token table) included.
    pub(crate) fn linear_params(&self) -> Vec<usize> {
        let mut v: Vec<usize> = (0..self.layers.len())
            .flat_map(|l| [QKV_W, PROJ_W, FC_W, FCPROJ_W].map(|j| self.layer_base(l) + j))
            .collect();
        if self.shard.last() {
            v.push(self.head_index());
        }
        v
    }

    /// Indices of tables read by row: the token table, on the first stage.
    pub(crate) fn embedding_params(&self) -> Vec<usize> {
        if self.shard.first() {
            vec![WTE]
        } else {
            Vec::new()
        }
    }

    pub fn param_info(&self) -> &[ParamInfo] {
        &self.info
    }

    /// The token table on the first and last of several pipeline stages: the embedding and
    /// the tied head, whose gradients are summed across the two.
    pub fn tied_param(&self) -> Option<usize> {
        let (first, last) = (self.shard.first(), self.shard.last());
        (self.shard.pp > 1 && (first || last)).then(|| if first { WTE } else { self.head_index() })
    }

    pub fn shard(&self) -> Shard {
        self.shard
    }

    pub fn param_slices(&self) -> &[Slice] {
        &self.slices
    }

    /// Shard `shard` of this (whole) model, its tensors copied out. A shard with `tp > 1`
    /// runs only once [`Gpt::set_tp_group`] has given it its tensor-parallel group.
    pub fn to_shard(&self, shard: Shard) -> Result<Gpt, ModelError> {
        self.require_full("cut into shards")?;
        let mut m = Gpt::zeros_shard(self.config.clone(), shard)?;
        let lens: Vec<usize> = m.params.iter().map(|p| p.len()).collect();
        m.params = crate::shard::cut_tensors(&self.params, &self.info, &m.info, &m.slices, &lens)?;
        Ok(m)
    }

    /// The group this shard's row-parallel outputs and column-parallel input gradients are
    /// summed over: its stage's `tp` ranks.
    pub fn set_tp_group(&mut self, tp: Box<dyn Comm>) -> Result<(), ModelError> {
        if tp.size() != self.shard.tp || tp.rank() != self.shard.tp_rank {
            return Err(ModelError::BadConfig(format!(
                "shard {:?} given rank {} of a tensor-parallel group of {}",
                self.shard,
                tp.rank(),
                tp.size()
            )));
        }
        self.tp = (self.shard.tp > 1).then_some(tp);
        Ok(())
    }

    /// An error unless this is the whole model (generation and quantization need every layer).
    fn require_full(&self, what: &str) -> Result<(), ModelError> {
        if self.shard.is_full() {
            Ok(())
        } else {
            Err(ModelError::BadConfig(format!("a tensor/pipeline-parallel shard cannot be {what}: gather it first")))
        }
    }

    /// The logical (unpadded) values of parameter `i`.
    pub fn param_values(&self, i: usize) -> &[f32] {
        let n: usize = self.info[i].shape.iter().product();
        &self.params[i][..n]
    }

    /// The logical (unpadded) gradient of parameter `i`.
    pub fn grad_values(&self, i: usize) -> &[f32] {
        let n: usize = self.info[i].shape.iter().product();
        &self.grads[i][..n]
    }

    pub fn param_index(&self, name: &str) -> Option<usize> {
        self.info.iter().position(|p| p.name == name)
    }

    /// Sets parameter `name` from logical values in `[out, in]` layout.
    pub fn set_param(&mut self, name: &str, values: &[f32]) -> Result<(), ModelError> {
        let i = self.param_index(name).ok_or_else(|| ModelError::Shape(format!("no parameter named {name}")))?;
        let n: usize = self.info[i].shape.iter().product();
        if values.len() != n {
            return Err(ModelError::Shape(format!(
                "{name}: expected {n} values {:?}, got {}",
                self.info[i].shape,
                values.len()
            )));
        }
        self.params[i][..n].copy_from_slice(values);
        Ok(())
    }

    pub fn zero_grad(&mut self) {
        if self.grads.is_empty() {
            self.grads = self.params.iter().map(|p| vec![0.0; p.len()]).collect();
        } else {
            self.grads.iter_mut().for_each(|g| g.fill(0.0));
        }
    }

    /// Makes activation set `slot` the current one: a pipeline stage keeps one per micro-batch
    /// in flight, and a backward runs on the set its forward filled.
    pub fn select_activations(&mut self, slot: usize) {
        if slot == self.slot {
            return;
        }
        if self.parked.len() <= slot.max(self.slot) {
            self.parked.resize_with(slot.max(self.slot) + 1, || None);
        }
        self.parked[self.slot] = self.acts.take();
        self.acts = self.parked[slot].take();
        self.slot = slot;
    }

    fn check_batch(&self, tokens: &[u32], targets: Option<&[u32]>, b: usize, t: usize) -> Result<(), ModelError> {
        if b == 0 || t == 0 || tokens.len() != b * t {
            return Err(ModelError::Shape(format!("{} tokens for a batch of {b} × {t}", tokens.len())));
        }
        if t > self.config.block_size {
            return Err(ModelError::SequenceTooLong { t, context: self.config.block_size });
        }
        let vocab = self.config.vocab_size;
        for ids in std::iter::once(tokens).chain(targets) {
            if ids.len() != b * t {
                return Err(ModelError::Shape(format!("{} targets for a batch of {b} × {t}", ids.len())));
            }
            if let Some(pos) = ids.iter().position(|&x| x as usize >= vocab) {
                return Err(ModelError::TokenOutOfRange { id: ids[pos], pos, vocab });
            }
        }
        Ok(())
    }

    /// Runs this stage's blocks (and, on the last stage, the final LayerNorm) over `tokens
    /// [b, t]`: the first stage embeds the tokens, the others start from `hidden`, the previous
    /// stage's output `[b·t, n_embd]`.
    fn forward_blocks(
        &mut self,
        k: &dyn Kernels,
        tokens: &[u32],
        targets: Option<&[u32]>,
        hidden: Option<&[f32]>,
        b: usize,
        t: usize,
    ) -> Result<(), ModelError> {
        self.check_batch(tokens, targets, b, t)?;
        if self.shard.tp > 1 && self.tp.is_none() {
            return Err(ModelError::BadConfig(
                "a tensor-parallel shard runs only with its group (set_tp_group)".into(),
            ));
        }
        let (cfg, d, last, nf) = (&self.config, self.dims(), self.shard.last(), self.lnf_index());
        if self.acts.as_ref().is_none_or(|a| a.b != b || a.t != t) {
            self.acts = None; // free the old shape before allocating the new one
            self.acts = Some(Acts::new(cfg, d, self.layers.len(), last, b, t));
        }
        let a = self.acts.as_mut().expect("allocated above");
        let (p, lin, tp) = (&self.params, &self.lin, self.tp.as_deref());
        let (c, hs) = (d.c, cfg.head_size());
        // Row-parallel biases are added once, by tensor-parallel rank 0, before the sum.
        let rank0 = self.shard.tp_rank == 0;
        a.tokens.copy_from_slice(tokens);
        a.targets = targets.map(|x| x.to_vec());
        a.pending = targets.is_some() || !last;

        match hidden {
            _ if self.shard.first() => k.encoder_forward(&mut a.encoded, tokens, &p[WTE], &p[WPE], t, c),
            Some(h) if h.len() == a.encoded.len() => a.encoded.copy_from_slice(h),
            _ => {
                return Err(ModelError::Shape(format!(
                    "pipeline stage {} needs the previous stage's output of {} values",
                    self.shard.stage,
                    a.encoded.len()
                )))
            }
        }
        for l in 0..self.layers.len() {
            let base = 2 * usize::from(self.shard.first()) + l * PER_LAYER;
            let w = |j: usize| p[base + j].as_slice();
            let row_bias = |j: usize| rank0.then(|| w(j + 1));
            let (prev, cur) = a.layers.split_at_mut(l);
            let res_in = if l == 0 { &a.encoded } else { &prev[l - 1].res3 };
            let la = &mut cur[0];
            k.layernorm_forward(&mut la.ln1, &mut la.ln1_mean, &mut la.ln1_rstd, res_in, w(LN1_W), w(LN1_W + 1), c);
            lin.matmul(k, &mut la.qkv, &la.ln1, p, base + QKV_W, Some(w(QKV_W + 1)), c, 3 * d.ca);
            k.attention_forward(&mut la.atty, &mut la.lse, &la.qkv, b, t, d.nh, hs);
            lin.matmul(k, &mut a.scratch_c, &la.atty, p, base + PROJ_W, row_bias(PROJ_W), d.ca, c);
            tp_sum(tp, &mut a.scratch_c)?;
            k.residual_forward(&mut la.res2, res_in, &a.scratch_c);
            k.layernorm_forward(&mut la.ln2, &mut la.ln2_mean, &mut la.ln2_rstd, &la.res2, w(LN2_W), w(LN2_W + 1), c);
            lin.matmul(k, &mut la.fch, &la.ln2, p, base + FC_W, Some(w(FC_W + 1)), c, d.f);
            k.gelu_forward(&mut a.scratch_4c, &la.fch);
            lin.matmul(k, &mut a.scratch_c, &a.scratch_4c, p, base + FCPROJ_W, row_bias(FCPROJ_W), d.f, c);
            tp_sum(tp, &mut a.scratch_c)?;
            k.residual_forward(&mut la.res3, &la.res2, &a.scratch_c);
        }
        if last {
            let last_out = a.layers.last().map_or(&a.encoded, |la| &la.res3);
            k.layernorm_forward(&mut a.lnf, &mut a.lnf_mean, &mut a.lnf_rstd, last_out, &p[nf], &p[nf + 1], c);
        }
        Ok(())
    }

    /// Full forward over `tokens [b, t]`. With targets, returns the mean cross-entropy (and
    /// keeps what backward needs); logits are then available from [`Gpt::logits`].
    pub fn forward(
        &mut self,
        k: &dyn Kernels,
        tokens: &[u32],
        targets: Option<&[u32]>,
        b: usize,
        t: usize,
    ) -> Result<Option<f32>, ModelError> {
        self.forward_stage(k, tokens, targets, None, b, t)
    }

    /// The forward of this pipeline stage (of the whole model, for an unsharded one): the
    /// first stage embeds `tokens`, the others start from `hidden` (the previous stage's
    /// [`Gpt::stage_output`]); the last stage returns the mean loss when given targets.
    pub fn forward_stage(
        &mut self,
        k: &dyn Kernels,
        tokens: &[u32],
        targets: Option<&[u32]>,
        hidden: Option<&[f32]>,
        b: usize,
        t: usize,
    ) -> Result<Option<f32>, ModelError> {
        self.forward_blocks(k, tokens, targets, hidden, b, t)?;
        if !self.shard.last() {
            return Ok(None);
        }
        let (c, v, vp) = (self.config.n_embd, self.config.vocab_size, self.config.padded_vocab());
        let head = self.head_index();
        let a = self.acts.as_mut().expect("forward_blocks allocates");
        self.lin.matmul(k, &mut a.logits, &a.lnf, &self.params, head, None, c, vp);
        let Some(tg) = &a.targets else { return Ok(None) };
        k.crossentropy_forward_backward(&mut a.logits, &mut a.losses, tg, v, vp, None);
        let mean = a.losses.iter().map(|&x| x as f64).sum::<f64>() / a.losses.len() as f64;
        Ok(Some(mean as f32))
    }

    /// The output of the last [`Gpt::forward_stage`] of a stage that is not the last,
    /// `[b·t, n_embd]`: the next stage's input.
    pub fn stage_output(&self) -> Option<&[f32]> {
        self.acts.as_ref().filter(|_| !self.shard.last()).map(|a| a.output())
    }

    /// The gradient of this stage's input after [`Gpt::backward_stage`] (not on the first
    /// stage): what the previous stage's backward starts from.
    pub fn stage_input_grad(&self) -> Option<&[f32]> {
        self.acts.as_ref().filter(|a| !self.shard.first() && !a.dres.is_empty()).map(|a| a.dres.as_slice())
    }

    /// Per-position cross-entropy of the last forward with targets, `[b·t]`.
    pub fn losses(&self) -> Option<&[f32]> {
        self.acts.as_ref().filter(|a| a.targets.is_some()).map(|a| a.losses.as_slice())
    }

    /// Logits `[b·t, vocab_padded]` of the last forward (before backward overwrites them).
    pub fn logits(&self) -> Option<&[f32]> {
        self.acts.as_ref().filter(|_| self.shard.last()).map(|a| a.logits.as_slice())
    }

    /// Logits of the last position only, `[vocab]` (unpadded): what generation needs, without
    /// the output GEMM over every position.
    pub fn last_logits(&mut self, k: &dyn Kernels, tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
        self.require_full("run for generation")?;
        let t = tokens.len();
        self.forward_blocks(k, tokens, None, None, 1, t)?;
        let (c, v, vp) = (self.config.n_embd, self.config.vocab_size, self.config.padded_vocab());
        let a = self.acts.as_ref().expect("forward_blocks allocates");
        let mut out = vec![0.0; vp];
        self.lin.matmul(k, &mut out, &a.lnf[(t - 1) * c..t * c], &self.params, WTE, None, c, vp);
        out.truncate(v);
        Ok(out)
    }

    /// Logits `[rows.len(), vocab]` (unpadded) at the given flat positions of a `[b, t]` batch:
    /// batched generation reads each sequence's last real position (sequences shorter than
    /// `t` are padded on the right, which causal attention never lets earlier positions see).
    pub fn logits_at(
        &mut self,
        k: &dyn Kernels,
        tokens: &[u32],
        b: usize,
        t: usize,
        rows: &[usize],
    ) -> Result<Vec<f32>, ModelError> {
        self.require_full("run for generation")?;
        self.forward_blocks(k, tokens, None, None, b, t)?;
        let (c, v, vp) = (self.config.n_embd, self.config.vocab_size, self.config.padded_vocab());
        let a = self.acts.as_ref().expect("forward_blocks allocates");
        let mut x = Vec::with_capacity(rows.len() * c);
        for &r in rows {
            if r >= b * t {
                return Err(ModelError::Shape(format!("row {r} outside a batch of {b} × {t}")));
            }
            x.extend_from_slice(&a.lnf[r * c..(r + 1) * c]);
        }
        let mut out = vec![0.0; rows.len() * vp];
        self.lin.matmul(k, &mut out, &x, &self.params, WTE, None, c, vp);
        Ok(out.chunks(vp).flat_map(|row| row[..v].to_vec()).collect())
    }

    /// Backward of the mean loss times `loss_scale` (1/K for K accumulated micro-batches);
    /// accumulates into `grads`. Overwrites the logits with their gradient.
    pub fn backward(&mut self, k: &dyn Kernels, loss_scale: f32) -> Result<(), ModelError> {
        self.backward_with(k, loss_scale, &mut |_, _| {})
    }

    /// `backward`, reporting each parameter's gradient as final through `ready`: ln_f first,
    /// then each layer from the last down, then the embeddings (the tied head adds to wte until
    /// the very end).
    pub fn backward_with(
        &mut self,
        k: &dyn Kernels,
        loss_scale: f32,
        ready: &mut GradsReady,
    ) -> Result<(), ModelError> {
        self.backward_stage(k, loss_scale, None, ready)
    }

    /// The backward of this pipeline stage: the last stage starts from its loss (times
    /// `loss_scale`), the others from `d_out`, the gradient of their output that the next
    /// stage's backward produced. Gradients are reported through `ready` as they become final
    /// (on a last stage that is not the first, the tied head's copy with ln_f); afterwards a
    /// stage other than the first holds its input's gradient in [`Gpt::stage_input_grad`].
    pub fn backward_stage(
        &mut self,
        k: &dyn Kernels,
        loss_scale: f32,
        d_out: Option<&[f32]>,
        ready: &mut GradsReady,
    ) -> Result<(), ModelError> {
        if self.lin.is_quantized() {
            return Err(ModelError::Quantized);
        }
        if self.grads.is_empty() {
            self.zero_grad();
        }
        let (cfg, d, shard) = (&self.config, self.dims(), self.shard);
        let (nf, head) = (self.lnf_index(), self.head_index());
        let a = self.acts.as_mut().filter(|a| a.pending).ok_or(ModelError::NoForward)?;
        let (b, t) = (a.b, a.t);
        let (n, c, hs, v, vp) = (b * t, d.c, cfg.head_size(), cfg.vocab_size, cfg.padded_vocab());
        if a.dres.is_empty() {
            a.dres = vec![0.0; n * c];
            a.dx = vec![0.0; n * c];
            a.dqkv = vec![0.0; n * 3 * d.ca];
            a.d4c = vec![0.0; n * d.f];
        }
        let (p, g, tp) = (&self.params, &mut self.grads, self.tp.as_deref());

        if shard.last() {
            let targets = a.targets.as_ref().ok_or(ModelError::NoForward)?;
            // d(mean loss)/d(logits), written over the logits.
            k.crossentropy_forward_backward(&mut a.logits, &mut a.losses, targets, v, vp, Some(loss_scale / n as f32));
            k.matmul_backward(&mut a.dx, &mut g[head], None, &a.logits, &a.lnf, &p[head], c, vp);
            a.dres.fill(0.0);
            let last_out = a.layers.last().map_or(&a.encoded, |la| &la.res3);
            let (gw, gb) = pair_mut(g, nf);
            k.layernorm_backward(&mut a.dres, gw, gb, &a.dx, last_out, &p[nf], &a.lnf_mean, &a.lnf_rstd, c);
            if shard.first() {
                ready(&[nf, nf + 1], g);
            } else {
                ready(&[nf, nf + 1, head], g);
            }
        } else {
            match d_out {
                Some(dy) if dy.len() == a.dres.len() => a.dres.copy_from_slice(dy),
                _ => {
                    return Err(ModelError::Shape(format!(
                        "pipeline stage {} needs the gradient of its output, {} values",
                        shard.stage,
                        a.dres.len()
                    )))
                }
            }
        }

        for l in (0..a.layers.len()).rev() {
            let base = 2 * usize::from(shard.first()) + l * PER_LAYER;
            let w = |j: usize| p[base + j].as_slice();
            let res_in = if l == 0 { &a.encoded } else { &a.layers[l - 1].res3 };
            let la = &a.layers[l];
            // MLP branch: dres is the gradient of res3 = res2 + proj(gelu(fc(ln2(res2)))).
            k.gelu_forward(&mut a.scratch_4c, &la.fch);
            let (gw, gb) = pair_mut(g, base + FCPROJ_W);
            k.matmul_backward(&mut a.d4c, gw, Some(gb), &a.dres, &a.scratch_4c, w(FCPROJ_W), d.f, c);
            k.gelu_backward(&mut a.scratch_4c, &la.fch, &a.d4c);
            let (gw, gb) = pair_mut(g, base + FC_W);
            k.matmul_backward(&mut a.dx, gw, Some(gb), &a.scratch_4c, &la.ln2, w(FC_W), c, d.f);
            // Each rank's fc saw all of ln2 but produced only its units: sum the input gradient.
            tp_sum(tp, &mut a.dx)?;
            let (gw, gb) = pair_mut(g, base + LN2_W);
            k.layernorm_backward(&mut a.dres, gw, gb, &a.dx, &la.res2, w(LN2_W), &la.ln2_mean, &la.ln2_rstd, c);
            // Attention branch: res2 = res_in + proj(attn(qkv(ln1(res_in)))).
            let datty = &mut a.dx[..n * d.ca];
            let (gw, gb) = pair_mut(g, base + PROJ_W);
            k.matmul_backward(datty, gw, Some(gb), &a.dres, &la.atty, w(PROJ_W), d.ca, c);
            k.attention_backward(&mut a.dqkv, &a.dx[..n * d.ca], &la.qkv, &la.atty, &la.lse, b, t, d.nh, hs);
            let (gw, gb) = pair_mut(g, base + QKV_W);
            k.matmul_backward(&mut a.dx, gw, Some(gb), &a.dqkv, &la.ln1, w(QKV_W), c, 3 * d.ca);
            tp_sum(tp, &mut a.dx)?;
            let (gw, gb) = pair_mut(g, base + LN1_W);
            k.layernorm_backward(&mut a.dres, gw, gb, &a.dx, res_in, w(LN1_W), &la.ln1_mean, &la.ln1_rstd, c);
            ready(&(base..base + PER_LAYER).collect::<Vec<_>>(), g);
        }
        if shard.first() {
            let (gwte, gwpe) = pair_mut(g, WTE);
            k.encoder_backward(gwte, gwpe, &a.dres, &a.tokens, t, c);
            ready(&[WTE, WTE + 1], g);
        }
        a.pending = false;
        a.targets = None; // the logits are gradients now: a second backward would be wrong
        Ok(())
    }

    /// Bytes held by parameters, gradients and activations (the model's share of peak memory).
    pub fn memory_bytes(&self) -> usize {
        let p: usize = self.params.iter().map(|x| x.len()).sum();
        let g: usize = self.grads.iter().map(|x| x.len()).sum();
        let a: usize = self.acts.iter().chain(self.parked.iter().flatten()).map(Acts::floats).sum();
        4 * (p + g + a)
    }
}

/// Standard normal by Box–Muller.
pub(crate) fn normal(rng: &mut ChaCha8Rng) -> f32 {
    let u1: f64 = rng.random::<f64>().max(1e-300);
    let u2: f64 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}
