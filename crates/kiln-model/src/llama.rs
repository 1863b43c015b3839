//! The Llama family: pre-RMSNorm blocks, rotary positions (RoPE), grouped-query attention,
//! a SwiGLU MLP, and a separate (or tied) output head. Forward and backward are written out
//! layer by layer over one [`Kernels`] backend, like GPT-2's.
//!
//! Parameters keep Hugging Face's names and `[out, in]` layout, one `Vec<f32>` per tensor, so
//! loading and saving `LlamaForCausalLM` / `Qwen2ForCausalLM` checkpoints is a copy.

use kiln_tensor::Kernels;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::trainable::GradsReady;
use crate::{CausalLm, KvCache, ModelError, ParamInfo};

mod checkpoint;
mod config;
pub use checkpoint::{load_llama_dir, read_hf_tensors, save_llama_hf_files};
pub(crate) use checkpoint::{load_llama_dir_skipping, save_llama_hf_files_keeping};
pub use config::{LlamaConfig, LlamaPreset, LLAMA_PRESETS};

/// Where one block's tensors sit in the parameter list (biases only when the config has them).
#[derive(Clone, Debug)]
struct LayerIdx {
    ln1: usize,
    q: (usize, Option<usize>),
    k: (usize, Option<usize>),
    v: (usize, Option<usize>),
    o: (usize, Option<usize>),
    ln2: usize,
    gate: (usize, Option<usize>),
    up: (usize, Option<usize>),
    down: (usize, Option<usize>),
}

impl LayerIdx {
    /// Every parameter index of the block.
    fn indices(&self) -> Vec<usize> {
        let mut v = vec![self.ln1, self.ln2];
        for (w, b) in [self.q, self.k, self.v, self.o, self.gate, self.up, self.down] {
            v.push(w);
            v.extend(b);
        }
        v
    }
}

/// Activations of one block kept for backward.
struct LayerActs {
    ln1: Vec<f32>,
    rstd1: Vec<f32>,
    /// Queries, keys (after RoPE) and values, `[n, q_dim]`, `[n, kv_dim]`, `[n, kv_dim]`.
    k: Vec<f32>,
    v: Vec<f32>,
    /// `[n, 3·q_dim]`: queries, then keys and values repeated to every query head.
    qkv: Vec<f32>,
    atty: Vec<f32>,
    lse: Vec<f32>,
    res2: Vec<f32>,
    ln2: Vec<f32>,
    rstd2: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    res3: Vec<f32>,
}

struct Acts {
    b: usize,
    t: usize,
    tokens: Vec<u32>,
    targets: Option<Vec<u32>>,
    encoded: Vec<f32>,
    layers: Vec<LayerActs>,
    lnf: Vec<f32>,
    rstdf: Vec<f32>,
    logits: Vec<f32>,
    losses: Vec<f32>,
}

pub struct Llama {
    pub config: LlamaConfig,
    pub params: Vec<Vec<f32>>,
    /// Same layout as `params`; empty until the first backward, which accumulates into it.
    pub grads: Vec<Vec<f32>>,
    info: Vec<ParamInfo>,
    layers: Vec<LayerIdx>,
    embed: usize,
    norm: usize,
    /// The output head's index (the embedding's when tied).
    head: usize,
    /// RoPE tables `[block_size, head_dim/2]`.
    cos: Vec<f32>,
    sin: Vec<f32>,
    acts: Option<Acts>,
    /// Quantized copies of the linear weights (none for a float model) and the calibration hook.
    pub(crate) lin: crate::quant::Linears,
}

/// Registers a linear layer's weight `[out, in]` (and bias) through `add`; returns their indices.
fn linear(
    add: &mut impl FnMut(String, Vec<usize>) -> usize,
    name: String,
    out: usize,
    inp: usize,
    bias: bool,
) -> (usize, Option<usize>) {
    let w = add(format!("{name}.weight"), vec![out, inp]);
    (w, bias.then(|| add(format!("{name}.bias"), vec![out])))
}

/// `dst += src`, the sum of two input gradients that flow into one tensor.
fn add_into(dst: &mut [f32], src: &[f32]) {
    dst.iter_mut().zip(src).for_each(|(a, b)| *a += b);
}

impl Llama {
    pub fn zeros(config: LlamaConfig) -> Result<Llama, ModelError> {
        config.validate()?;
        let (c, q, kv, f) = (config.n_embd, config.q_dim(), config.kv_dim(), config.ffn_hidden);
        let mut info = Vec::new();
        let mut add = |name: String, shape: Vec<usize>| {
            let decay = shape.len() >= 2;
            info.push(ParamInfo { name, shape, decay });
            info.len() - 1
        };
        let embed = add("model.embed_tokens.weight".into(), vec![config.vocab_size, c]);
        let mut layers = Vec::new();
        for l in 0..config.n_layer {
            let p = format!("model.layers.{l}");
            let ln1 = add(format!("{p}.input_layernorm.weight"), vec![c]);
            let qi = linear(&mut add, format!("{p}.self_attn.q_proj"), q, c, config.qkv_bias);
            let ki = linear(&mut add, format!("{p}.self_attn.k_proj"), kv, c, config.qkv_bias);
            let vi = linear(&mut add, format!("{p}.self_attn.v_proj"), kv, c, config.qkv_bias);
            let oi = linear(&mut add, format!("{p}.self_attn.o_proj"), c, q, config.o_bias);
            let ln2 = add(format!("{p}.post_attention_layernorm.weight"), vec![c]);
            let gate = linear(&mut add, format!("{p}.mlp.gate_proj"), f, c, config.mlp_bias);
            let up = linear(&mut add, format!("{p}.mlp.up_proj"), f, c, config.mlp_bias);
            let down = linear(&mut add, format!("{p}.mlp.down_proj"), c, f, config.mlp_bias);
            layers.push(LayerIdx { ln1, q: qi, k: ki, v: vi, o: oi, ln2, gate, up, down });
        }
        let norm = add("model.norm.weight".into(), vec![c]);
        let head = if config.tie_embeddings { embed } else { add("lm_head.weight".into(), vec![config.vocab_size, c]) };
        let params = info.iter().map(|p| vec![0.0; p.shape.iter().product()]).collect();
        let (cos, sin) = rope_tables(&config);
        Ok(Llama {
            config,
            params,
            grads: Vec::new(),
            info,
            layers,
            embed,
            norm,
            head,
            cos,
            sin,
            acts: None,
            lin: crate::quant::Linears::default(),
        })
    }

    /// N(0, 0.02) weights (Llama's initializer_range), zero biases, unit norms; deterministic in `seed`.
    pub fn new(config: LlamaConfig, seed: u64) -> Result<Llama, ModelError> {
        let mut m = Llama::zeros(config)?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for (i, info) in m.info.iter().enumerate() {
            if info.name.ends_with("norm.weight") {
                m.params[i].fill(1.0);
            } else if info.decay {
                m.params[i].iter_mut().for_each(|x| *x = 0.02 * crate::gpt::normal(&mut rng));
            }
        }
        Ok(m)
    }

    pub fn param_info(&self) -> &[ParamInfo] {
        &self.info
    }

    pub fn param_index(&self, name: &str) -> Option<usize> {
        self.info.iter().position(|p| p.name == name)
    }

    pub fn set_param(&mut self, name: &str, values: &[f32]) -> Result<(), ModelError> {
        let i = self.param_index(name).ok_or_else(|| ModelError::Shape(format!("no parameter named {name}")))?;
        if values.len() != self.params[i].len() {
            return Err(ModelError::Shape(format!(
                "{name}: expected {} values {:?}, got {}",
                self.params[i].len(),
                self.info[i].shape,
                values.len()
            )));
        }
        self.params[i].copy_from_slice(values);
        Ok(())
    }

    pub fn zero_grad(&mut self) {
        if self.grads.is_empty() {
            self.grads = self.params.iter().map(|p| vec![0.0; p.len()]).collect();
        } else {
            self.grads.iter_mut().for_each(|g| g.fill(0.0));
        }
    }

    fn check_tokens(&self, ids: &[u32]) -> Result<(), ModelError> {
        let vocab = self.config.vocab_size;
        match ids.iter().position(|&x| x as usize >= vocab) {
            Some(pos) => Err(ModelError::TokenOutOfRange { id: ids[pos], pos, vocab }),
            None => Ok(()),
        }
    }

    /// Indices of every matmul weight `[out, in]`, the output head included.
    pub(crate) fn linear_params(&self) -> Vec<usize> {
        let mut v: Vec<usize> =
            self.layers.iter().flat_map(|li| [li.q.0, li.k.0, li.v.0, li.o.0, li.gate.0, li.up.0, li.down.0]).collect();
        v.push(self.head);
        v
    }

    pub(crate) fn embed_index(&self) -> usize {
        self.embed
    }

    /// `out[r] = embed[tokens[r]]`.
    fn embed_rows(&self, out: &mut [f32], tokens: &[u32]) {
        let c = self.config.n_embd;
        for (row, &t) in out.chunks_mut(c).zip(tokens) {
            row.copy_from_slice(&self.params[self.embed][t as usize * c..(t as usize + 1) * c]);
        }
    }

    /// Blocks and the final norm over `tokens [b, t]`.
    fn forward_blocks(
        &mut self,
        k: &dyn Kernels,
        tokens: &[u32],
        targets: Option<&[u32]>,
        b: usize,
        t: usize,
    ) -> Result<(), ModelError> {
        let cfg = &self.config;
        if b == 0 || t == 0 || tokens.len() != b * t || targets.is_some_and(|x| x.len() != b * t) {
            return Err(ModelError::Shape(format!("{} tokens for a batch of {b} × {t}", tokens.len())));
        }
        if t > cfg.block_size {
            return Err(ModelError::SequenceTooLong { t, context: cfg.block_size });
        }
        self.check_tokens(tokens)?;
        if let Some(tg) = targets {
            self.check_tokens(tg)?;
        }
        let (n, c, q, kv, f, nh, nkv, hd) =
            (b * t, cfg.n_embd, cfg.q_dim(), cfg.kv_dim(), cfg.ffn_hidden, cfg.n_head, cfg.n_kv_head, cfg.head_dim);
        if self.acts.as_ref().is_none_or(|a| a.b != b || a.t != t) {
            self.acts = None;
            let z = |k: usize| vec![0.0f32; k];
            let layers = (0..cfg.n_layer)
                .map(|_| LayerActs {
                    ln1: z(n * c),
                    rstd1: z(n),
                    k: z(n * kv),
                    v: z(n * kv),
                    qkv: z(n * 3 * q),
                    atty: z(n * q),
                    lse: z(b * nh * t),
                    res2: z(n * c),
                    ln2: z(n * c),
                    rstd2: z(n),
                    gate: z(n * f),
                    up: z(n * f),
                    res3: z(n * c),
                })
                .collect();
            self.acts = Some(Acts {
                b,
                t,
                tokens: vec![0; n],
                targets: None,
                encoded: z(n * c),
                layers,
                lnf: z(n * c),
                rstdf: z(n),
                logits: Vec::new(),
                losses: z(n),
            });
        }
        let mut a = self.acts.take().expect("allocated above");
        a.tokens.copy_from_slice(tokens);
        a.targets = targets.map(|x| x.to_vec());
        self.embed_rows(&mut a.encoded, tokens);
        let pos: Vec<usize> = (0..n).map(|r| r % t).collect();
        let (p, lin, eps, group) = (&self.params, &self.lin, cfg.rms_eps, nh / nkv);
        let mut qbuf = vec![0.0f32; n * q];
        let mut tmp_c = vec![0.0f32; n * c];
        let mut hbuf = vec![0.0f32; n * f];
        for (l, li) in self.layers.iter().enumerate() {
            let (prev, cur) = a.layers.split_at_mut(l);
            let res_in = if l == 0 { &a.encoded } else { &prev[l - 1].res3 };
            let la = &mut cur[0];
            let bias = |x: Option<usize>| x.map(|i| p[i].as_slice());
            k.rmsnorm_forward(&mut la.ln1, &mut la.rstd1, res_in, &p[li.ln1], c, eps);
            lin.matmul(k, &mut qbuf, &la.ln1, p, li.q.0, bias(li.q.1), c, q);
            lin.matmul(k, &mut la.k, &la.ln1, p, li.k.0, bias(li.k.1), c, kv);
            lin.matmul(k, &mut la.v, &la.ln1, p, li.v.0, bias(li.v.1), c, kv);
            k.rope(&mut qbuf, &pos, &self.cos, &self.sin, nh, hd, false);
            k.rope(&mut la.k, &pos, &self.cos, &self.sin, nkv, hd, false);
            pack_qkv(&mut la.qkv, &qbuf, &la.k, &la.v, nh, group, hd);
            k.attention_forward(&mut la.atty, &mut la.lse, &la.qkv, b, t, nh, hd);
            lin.matmul(k, &mut tmp_c, &la.atty, p, li.o.0, bias(li.o.1), q, c);
            k.residual_forward(&mut la.res2, res_in, &tmp_c);
            k.rmsnorm_forward(&mut la.ln2, &mut la.rstd2, &la.res2, &p[li.ln2], c, eps);
            lin.matmul(k, &mut la.gate, &la.ln2, p, li.gate.0, bias(li.gate.1), c, f);
            lin.matmul(k, &mut la.up, &la.ln2, p, li.up.0, bias(li.up.1), c, f);
            k.swiglu_forward(&mut hbuf, &la.gate, &la.up);
            lin.matmul(k, &mut tmp_c, &hbuf, p, li.down.0, bias(li.down.1), f, c);
            k.residual_forward(&mut la.res3, &la.res2, &tmp_c);
        }
        let last = a.layers.last().map_or(&a.encoded, |la| &la.res3);
        k.rmsnorm_forward(&mut a.lnf, &mut a.rstdf, last, &p[self.norm], c, eps);
        self.acts = Some(a);
        Ok(())
    }

    /// Full forward over `tokens [b, t]`; with targets returns the mean cross-entropy and keeps
    /// what backward needs. Logits `[b·t, vocab]` are then in [`Llama::logits`].
    pub fn forward(
        &mut self,
        k: &dyn Kernels,
        tokens: &[u32],
        targets: Option<&[u32]>,
        b: usize,
        t: usize,
    ) -> Result<Option<f32>, ModelError> {
        self.forward_blocks(k, tokens, targets, b, t)?;
        let (c, v) = (self.config.n_embd, self.config.vocab_size);
        let a = self.acts.as_mut().expect("forward_blocks allocates");
        a.logits.resize(b * t * v, 0.0);
        self.lin.matmul(k, &mut a.logits, &a.lnf, &self.params, self.head, None, c, v);
        let Some(tg) = &a.targets else { return Ok(None) };
        k.crossentropy_forward_backward(&mut a.logits, &mut a.losses, tg, v, v, None);
        let mean = a.losses.iter().map(|&x| x as f64).sum::<f64>() / a.losses.len() as f64;
        Ok(Some(mean as f32))
    }

    pub fn logits(&self) -> Option<&[f32]> {
        self.acts.as_ref().map(|a| a.logits.as_slice())
    }

    /// Per-position cross-entropy of the last forward with targets, `[b·t]`.
    pub fn losses(&self) -> Option<&[f32]> {
        self.acts.as_ref().filter(|a| a.targets.is_some()).map(|a| a.losses.as_slice())
    }

    /// Backward of the mean loss times `loss_scale`; accumulates into `grads`.
    pub fn backward(&mut self, k: &dyn Kernels, loss_scale: f32) -> Result<(), ModelError> {
        self.backward_with(k, loss_scale, &mut |_, _| {})
    }

    /// `backward`, reporting each parameter's gradient as final through `ready`: the final norm
    /// (and an untied head) first, then each layer from the last down, then the embedding.
    pub fn backward_with(
        &mut self,
        k: &dyn Kernels,
        loss_scale: f32,
        ready: &mut GradsReady,
    ) -> Result<(), ModelError> {
        if self.lin.is_quantized() {
            return Err(ModelError::Quantized);
        }
        if self.grads.is_empty() {
            self.zero_grad();
        }
        let cfg = &self.config;
        let mut a = self.acts.take().ok_or(ModelError::NoForward)?;
        let Some(targets) = a.targets.take() else {
            self.acts = Some(a);
            return Err(ModelError::NoForward);
        };
        let (b, t) = (a.b, a.t);
        let (n, c, q, kv, f, v, nh, nkv, hd) = (
            b * t,
            cfg.n_embd,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.ffn_hidden,
            cfg.vocab_size,
            cfg.n_head,
            cfg.n_kv_head,
            cfg.head_dim,
        );
        let (p, g) = (&self.params, &mut self.grads);
        let pos: Vec<usize> = (0..n).map(|r| r % t).collect();
        let z = |k: usize| vec![0.0f32; k];
        let (mut dres, mut dx, mut dx2) = (z(n * c), z(n * c), z(n * c));
        let (mut dh, mut dgate, mut dup, mut hbuf) = (z(n * f), z(n * f), z(n * f), z(n * f));
        let (mut datty, mut dqkv) = (z(n * q), z(n * 3 * q));
        let (mut dk, mut dv) = (z(n * kv), z(n * kv));

        k.crossentropy_forward_backward(&mut a.logits, &mut a.losses, &targets, v, v, Some(loss_scale / n as f32));
        k.matmul_backward(&mut dx, &mut g[self.head], None, &a.logits, &a.lnf, &p[self.head], c, v);
        let last = a.layers.last().map_or(&a.encoded, |la| &la.res3);
        k.rmsnorm_backward(&mut dres, &mut g[self.norm], &dx, last, &p[self.norm], &a.rstdf, c);
        if self.head == self.embed {
            ready(&[self.norm], g);
        } else {
            ready(&[self.norm, self.head], g);
        }

        for (l, li) in self.layers.iter().enumerate().rev() {
            let res_in = if l == 0 { &a.encoded } else { &a.layers[l - 1].res3 };
            let la = &a.layers[l];
            // MLP: res3 = res2 + down(silu(gate(ln2)) · up(ln2)).
            k.swiglu_forward(&mut hbuf, &la.gate, &la.up);
            linear_backward(k, g, &mut dh, &dres, &hbuf, p, li.down, f, c);
            k.swiglu_backward(&mut dgate, &mut dup, &la.gate, &la.up, &dh);
            linear_backward(k, g, &mut dx, &dgate, &la.ln2, p, li.gate, c, f);
            linear_backward(k, g, &mut dx2, &dup, &la.ln2, p, li.up, c, f);
            add_into(&mut dx, &dx2);
            k.rmsnorm_backward(&mut dres, &mut g[li.ln2], &dx, &la.res2, &p[li.ln2], &la.rstd2, c);
            // Attention: res2 = res_in + o(attn(rope(q(ln1)), rope(k(ln1)), v(ln1))).
            linear_backward(k, g, &mut datty, &dres, &la.atty, p, li.o, q, c);
            k.attention_backward(&mut dqkv, &datty, &la.qkv, &la.atty, &la.lse, b, t, nh, hd);
            let mut dq = unpack_dqkv(&dqkv, &mut dk, &mut dv, nh, nh / nkv, hd);
            k.rope(&mut dq, &pos, &self.cos, &self.sin, nh, hd, true);
            k.rope(&mut dk, &pos, &self.cos, &self.sin, nkv, hd, true);
            linear_backward(k, g, &mut dx, &dq, &la.ln1, p, li.q, c, q);
            linear_backward(k, g, &mut dx2, &dk, &la.ln1, p, li.k, c, kv);
            add_into(&mut dx, &dx2);
            linear_backward(k, g, &mut dx2, &dv, &la.ln1, p, li.v, c, kv);
            add_into(&mut dx, &dx2);
            k.rmsnorm_backward(&mut dres, &mut g[li.ln1], &dx, res_in, &p[li.ln1], &la.rstd1, c);
            ready(&li.indices(), g);
        }
        for (row, &tok) in dres.chunks(c).zip(&a.tokens) {
            add_into(&mut g[self.embed][tok as usize * c..(tok as usize + 1) * c], row);
        }
        ready(&[self.embed], g);
        self.acts = Some(a); // targets stay taken: the logits are gradients now
        Ok(())
    }

    /// Bytes held by parameters, gradients and saved activations.
    pub fn memory_bytes(&self) -> usize {
        let p: usize = self.params.iter().chain(&self.grads).map(|x| x.len()).sum();
        let a = self.acts.as_ref().map_or(0, |a| {
            let per: usize = a
                .layers
                .iter()
                .map(|l| {
                    l.ln1.len()
                        + l.rstd1.len()
                        + l.k.len()
                        + l.v.len()
                        + l.qkv.len()
                        + l.atty.len()
                        + l.lse.len()
                        + l.res2.len()
                        + l.ln2.len()
                        + l.rstd2.len()
                        + l.gate.len()
                        + l.up.len()
                        + l.res3.len()
                })
                .sum();
            per + a.encoded.len() + a.lnf.len() + a.logits.len() + a.losses.len()
        });
        4 * (p + a)
    }

    /// One block of single-row-per-sequence decode: `x [m, c]` in, out in place.
    fn decode_layer(
        &self,
        k: &dyn Kernels,
        l: usize,
        x: &mut [f32],
        cache: &mut KvCache,
        seqs: &[usize],
        pos: &[usize],
    ) {
        let cfg = &self.config;
        let (m, c, q, kv, f, nh, nkv, hd) = (
            seqs.len(),
            cfg.n_embd,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.ffn_hidden,
            cfg.n_head,
            cfg.n_kv_head,
            cfg.head_dim,
        );
        let (li, p, lin) = (&self.layers[l], &self.params, &self.lin);
        let bias = |x: Option<usize>| x.map(|i| p[i].as_slice());
        let z = |k: usize| vec![0.0f32; k];
        let (mut ln, mut rstd, mut qb, mut kb, mut vb, mut att, mut tmp) =
            (z(m * c), z(m), z(m * q), z(m * kv), z(m * kv), z(m * q), z(m * c));
        k.rmsnorm_forward(&mut ln, &mut rstd, x, &p[li.ln1], c, cfg.rms_eps);
        lin.matmul(k, &mut qb, &ln, p, li.q.0, bias(li.q.1), c, q);
        lin.matmul(k, &mut kb, &ln, p, li.k.0, bias(li.k.1), c, kv);
        lin.matmul(k, &mut vb, &ln, p, li.v.0, bias(li.v.1), c, kv);
        k.rope(&mut qb, pos, &self.cos, &self.sin, nh, hd, false);
        k.rope(&mut kb, pos, &self.cos, &self.sin, nkv, hd, false);
        for (i, &s) in seqs.iter().enumerate() {
            cache.store(l, s, pos[i], &kb[i * kv..(i + 1) * kv], &vb[i * kv..(i + 1) * kv]);
            let (kc, vc) = cache.seq(l, s);
            let len = [pos[i] + 1];
            k.attention_decode(
                &mut att[i * q..(i + 1) * q],
                &qb[i * q..(i + 1) * q],
                kc,
                vc,
                &len,
                cache.cap,
                nh,
                nkv,
                hd,
            );
        }
        lin.matmul(k, &mut tmp, &att, p, li.o.0, bias(li.o.1), q, c);
        add_into(x, &tmp);
        k.rmsnorm_forward(&mut ln, &mut rstd, x, &p[li.ln2], c, cfg.rms_eps);
        let (mut gate, mut up, mut h) = (z(m * f), z(m * f), z(m * f));
        lin.matmul(k, &mut gate, &ln, p, li.gate.0, bias(li.gate.1), c, f);
        lin.matmul(k, &mut up, &ln, p, li.up.0, bias(li.up.1), c, f);
        k.swiglu_forward(&mut h, &gate, &up);
        lin.matmul(k, &mut tmp, &h, p, li.down.0, bias(li.down.1), f, c);
        add_into(x, &tmp);
    }

    /// Final norm and head over the rows of `x [m, c]`: logits `[m, vocab]`.
    fn head_logits(&self, k: &dyn Kernels, x: &[f32]) -> Vec<f32> {
        let (c, v) = (self.config.n_embd, self.config.vocab_size);
        let m = x.len() / c;
        let (mut ln, mut rstd, mut logits) = (vec![0.0; m * c], vec![0.0; m], vec![0.0; m * v]);
        k.rmsnorm_forward(&mut ln, &mut rstd, x, &self.params[self.norm], c, self.config.rms_eps);
        self.lin.matmul(k, &mut logits, &ln, &self.params, self.head, None, c, v);
        logits
    }
}

/// `dinp = dout · W` and `dW += doutᵀ · inp` (and the bias) for a linear layer `(weight, bias)`.
#[allow(clippy::too_many_arguments)]
fn linear_backward(
    k: &dyn Kernels,
    g: &mut [Vec<f32>],
    dinp: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    p: &[Vec<f32>],
    (w, bias): (usize, Option<usize>),
    c_in: usize,
    c_out: usize,
) {
    match bias {
        Some(bi) => {
            let (lo, hi) = if w < bi { g.split_at_mut(bi) } else { unreachable!("a bias follows its weight") };
            k.matmul_backward(dinp, &mut lo[w], Some(&mut hi[0]), dout, inp, &p[w], c_in, c_out);
        }
        None => k.matmul_backward(dinp, &mut g[w], None, dout, inp, &p[w], c_in, c_out),
    }
}

/// Lays out `[q | k | v]` per row with each key/value head repeated to the `group` query
/// heads that read it, the layout the attention kernel takes.
fn pack_qkv(qkv: &mut [f32], q: &[f32], k: &[f32], v: &[f32], nh: usize, group: usize, hd: usize) {
    let (qd, kvd) = (nh * hd, nh / group * hd);
    for (r, row) in qkv.chunks_mut(3 * qd).enumerate() {
        row[..qd].copy_from_slice(&q[r * qd..(r + 1) * qd]);
        for h in 0..nh {
            let src = r * kvd + (h / group) * hd;
            row[qd + h * hd..qd + (h + 1) * hd].copy_from_slice(&k[src..src + hd]);
            row[2 * qd + h * hd..2 * qd + (h + 1) * hd].copy_from_slice(&v[src..src + hd]);
        }
    }
}

/// The mirror of [`pack_qkv`]: returns dq and sums each repeated head's gradient into dk, dv.
fn unpack_dqkv(dqkv: &[f32], dk: &mut [f32], dv: &mut [f32], nh: usize, group: usize, hd: usize) -> Vec<f32> {
    let (qd, kvd) = (nh * hd, nh / group * hd);
    let rows = dqkv.len() / (3 * qd);
    let mut dq = vec![0.0; rows * qd];
    dk.fill(0.0);
    dv.fill(0.0);
    for (r, row) in dqkv.chunks(3 * qd).enumerate() {
        dq[r * qd..(r + 1) * qd].copy_from_slice(&row[..qd]);
        for h in 0..nh {
            let dst = r * kvd + (h / group) * hd;
            add_into(&mut dk[dst..dst + hd], &row[qd + h * hd..qd + (h + 1) * hd]);
            add_into(&mut dv[dst..dst + hd], &row[2 * qd + h * hd..2 * qd + (h + 1) * hd]);
        }
    }
    dq
}

/// cos and sin of pos·θᵢ for every position, computed as `transformers` does in f32:
/// θᵢ = 1 / base^(2i/d), divided by the linear scaling factor.
fn rope_tables(cfg: &LlamaConfig) -> (Vec<f32>, Vec<f32>) {
    let half = cfg.head_dim / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| {
            (1.0 / cfg.rope_theta.powf((2 * i) as f64 / cfg.head_dim as f64)) as f32 / cfg.rope_linear_factor as f32
        })
        .collect();
    let mut cos = Vec::with_capacity(cfg.block_size * half);
    let mut sin = Vec::with_capacity(cfg.block_size * half);
    for p in 0..cfg.block_size {
        for &f in &inv_freq {
            let angle = (p as f32 * f) as f64;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    (cos, sin)
}

impl CausalLm for Llama {
    fn model_type(&self) -> &str {
        &self.config.model_type
    }
    fn context_len(&self) -> usize {
        self.config.block_size
    }
    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }
    fn num_params(&self) -> usize {
        self.config.num_params()
    }
    fn weight_bytes_per_token(&self) -> usize {
        // One embedding row is read, not the table (unless it is also the head).
        let c = self.config.n_embd;
        let float: usize = (0..self.params.len())
            .filter(|&i| self.lin.get(i).is_none())
            .map(|i| if i == self.embed && i != self.head { c } else { self.info[i].shape.iter().product() })
            .sum();
        4 * float + self.lin.weight_bytes()
    }
    fn sequence_logits(&mut self, k: &dyn Kernels, tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
        self.forward(k, tokens, None, 1, tokens.len())?;
        Ok(self.logits().expect("forward ran").to_vec())
    }
    fn sequence_losses(&mut self, k: &dyn Kernels, tokens: &[u32], targets: &[u32]) -> Result<Vec<f32>, ModelError> {
        self.forward(k, tokens, Some(targets), 1, tokens.len())?;
        Ok(self.losses().expect("forward with targets keeps the losses").to_vec())
    }
    fn new_cache(&self, batch: usize) -> KvCache {
        KvCache::new(self.config.n_layer, batch, self.config.block_size, self.config.kv_dim())
    }

    fn prefill(
        &mut self,
        k: &dyn Kernels,
        cache: &mut KvCache,
        seq: usize,
        prompt: &[u32],
    ) -> Result<Vec<f32>, ModelError> {
        cache.check_model(self.config.n_layer, self.config.kv_dim())?;
        cache.check_prefill(seq, prompt.len())?;
        let t = prompt.len();
        self.forward_blocks(k, prompt, None, 1, t)?;
        let (c, kv) = (self.config.n_embd, self.config.kv_dim());
        let a = self.acts.as_ref().expect("forward_blocks ran");
        for (l, la) in a.layers.iter().enumerate() {
            for i in 0..t {
                cache.store(l, seq, i, &la.k[i * kv..(i + 1) * kv], &la.v[i * kv..(i + 1) * kv]);
            }
        }
        cache.lens[seq] = t;
        let last = a.layers.last().map_or(&a.encoded, |la| &la.res3);
        Ok(self.head_logits(k, &last[(t - 1) * c..t * c]))
    }

    fn decode(
        &mut self,
        k: &dyn Kernels,
        cache: &mut KvCache,
        seqs: &[usize],
        tokens: &[u32],
    ) -> Result<Vec<f32>, ModelError> {
        cache.check_model(self.config.n_layer, self.config.kv_dim())?;
        cache.check_decode(seqs, tokens, self.config.vocab_size)?;
        let c = self.config.n_embd;
        let mut x = vec![0.0f32; seqs.len() * c];
        self.embed_rows(&mut x, tokens);
        let pos: Vec<usize> = seqs.iter().map(|&s| cache.lens[s]).collect();
        let model = &*self;
        let logits = kiln_tensor::on_workers(|| {
            for l in 0..model.config.n_layer {
                model.decode_layer(k, l, &mut x, cache, seqs, &pos);
            }
            model.head_logits(k, &x)
        });
        for &s in seqs {
            cache.lens[s] += 1;
        }
        Ok(logits)
    }
}
