//! GPT-2: pre-LayerNorm blocks, learned positions, tied embeddings, GELU-tanh. Forward and
//! backward are written out layer by layer (llm.c style) over one [`Kernels`] backend.
//!
//! Parameters live one `Vec<f32>` per tensor, in PyTorch `Linear` layout `[out, in]`; the token
//! embedding is stored with the vocabulary padded to a multiple of 64 (padded rows stay zero).

use kiln_tensor::Kernels;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::quant::Linears;
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
    encoded: Vec<f32>,
    layers: Vec<LayerActs>,
    lnf: Vec<f32>,
    lnf_mean: Vec<f32>,
    lnf_rstd: Vec<f32>,
    /// `[b·t, vocab_padded]`; backward overwrites it with the logits' gradient.
    logits: Vec<f32>,
    losses: Vec<f32>,
    scratch_c: Vec<f32>,
    scratch_4c: Vec<f32>,
    // Backward-only scratch, allocated on the first backward.
    dres: Vec<f32>,
    dx: Vec<f32>,
    dqkv: Vec<f32>,
    d4c: Vec<f32>,
}

impl Acts {
    fn new(cfg: &GptConfig, b: usize, t: usize) -> Acts {
        let (n, c, nh) = (b * t, cfg.n_embd, cfg.n_head);
        let z = |k: usize| vec![0.0f32; k];
        let layers = (0..cfg.n_layer)
            .map(|_| LayerActs {
                ln1: z(n * c),
                ln1_mean: z(n),
                ln1_rstd: z(n),
                qkv: z(n * 3 * c),
                atty: z(n * c),
                lse: z(b * nh * t),
                res2: z(n * c),
                ln2: z(n * c),
                ln2_mean: z(n),
                ln2_rstd: z(n),
                fch: z(n * 4 * c),
                res3: z(n * c),
            })
            .collect();
        Acts {
            b,
            t,
            tokens: vec![0; n],
            targets: None,
            encoded: z(n * c),
            layers,
            lnf: z(n * c),
            lnf_mean: z(n),
            lnf_rstd: z(n),
            logits: z(n * cfg.padded_vocab()),
            losses: z(n),
            scratch_c: z(n * c),
            scratch_4c: z(n * 4 * c),
            dres: Vec::new(),
            dx: Vec::new(),
            dqkv: Vec::new(),
            d4c: Vec::new(),
        }
    }
}

pub struct Gpt {
    pub config: GptConfig,
    /// One buffer per tensor, in [`Gpt::param_info`] order.
    pub params: Vec<Vec<f32>>,
    /// Same layout as `params`; empty until the first backward. Backward accumulates into it.
    pub grads: Vec<Vec<f32>>,
    info: Vec<ParamInfo>,
    acts: Option<Acts>,
    /// Quantized copies of the linear weights (none for a float model) and the calibration hook.
    pub(crate) lin: Linears,
}

/// Two distinct elements of a slice, mutably (a weight and its bias).
fn pair_mut(v: &mut [Vec<f32>], i: usize) -> (&mut [f32], &mut [f32]) {
    let (a, b) = v.split_at_mut(i + 1);
    (&mut a[i], &mut b[0])
}

impl Gpt {
    /// A model with all parameters zero (to be filled by a checkpoint).
    pub fn zeros(config: GptConfig) -> Result<Gpt, ModelError> {
        config.validate()?;
        let info = Self::param_info_for(&config);
        let c = config.n_embd;
        let params = info
            .iter()
            .enumerate()
            .map(
                |(i, p)| {
                    if i == WTE {
                        vec![0.0; config.padded_vocab() * c]
                    } else {
                        vec![0.0; p.shape.iter().product()]
                    }
                },
            )
            .collect();
        Ok(Gpt { config, params, grads: Vec::new(), info, acts: None, lin: Linears::default() })
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

    fn param_info_for(cfg: &GptConfig) -> Vec<ParamInfo> {
        let c = cfg.n_embd;
        let mut v = vec![
            ParamInfo { name: "wte.weight".into(), shape: vec![cfg.vocab_size, c], decay: true },
            ParamInfo { name: "wpe.weight".into(), shape: vec![cfg.block_size, c], decay: true },
        ];
        for l in 0..cfg.n_layer {
            let shapes: [Vec<usize>; PER_LAYER] = [
                vec![c],
                vec![c],
                vec![3 * c, c],
                vec![3 * c],
                vec![c, c],
                vec![c],
                vec![c],
                vec![c],
                vec![4 * c, c],
                vec![4 * c],
                vec![c, 4 * c],
                vec![c],
            ];
            for (name, shape) in LAYER_TENSORS.iter().zip(shapes) {
                let decay = shape.len() >= 2;
                v.push(ParamInfo { name: format!("h.{l}.{name}"), shape, decay });
            }
        }
        v.push(ParamInfo { name: "ln_f.weight".into(), shape: vec![c], decay: false });
        v.push(ParamInfo { name: "ln_f.bias".into(), shape: vec![c], decay: false });
        v
    }

    /// Indices of every matmul weight `[out, in]`, the tied head (the token table) included.
    pub(crate) fn linear_params(&self) -> Vec<usize> {
        let mut v: Vec<usize> = (0..self.config.n_layer)
            .flat_map(|l| [QKV_W, PROJ_W, FC_W, FCPROJ_W].map(|j| 2 + l * PER_LAYER + j))
            .collect();
        v.push(WTE);
        v
    }

    pub fn param_info(&self) -> &[ParamInfo] {
        &self.info
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

    /// Runs the transformer blocks and the final LayerNorm over `tokens [b, t]`.
    fn forward_blocks(
        &mut self,
        k: &dyn Kernels,
        tokens: &[u32],
        targets: Option<&[u32]>,
        b: usize,
        t: usize,
    ) -> Result<(), ModelError> {
        self.check_batch(tokens, targets, b, t)?;
        let cfg = &self.config;
        if self.acts.as_ref().is_none_or(|a| a.b != b || a.t != t) {
            self.acts = None; // free the old shape before allocating the new one
            self.acts = Some(Acts::new(cfg, b, t));
        }
        let a = self.acts.as_mut().expect("allocated above");
        let (p, lin) = (&self.params, &self.lin);
        let (c, nh, hs) = (cfg.n_embd, cfg.n_head, cfg.head_size());
        a.tokens.copy_from_slice(tokens);
        a.targets = targets.map(|x| x.to_vec());

        k.encoder_forward(&mut a.encoded, tokens, &p[WTE], &p[WPE], t, c);
        for l in 0..cfg.n_layer {
            let base = 2 + l * PER_LAYER;
            let w = |j: usize| p[base + j].as_slice();
            let (prev, cur) = a.layers.split_at_mut(l);
            let res_in = if l == 0 { &a.encoded } else { &prev[l - 1].res3 };
            let la = &mut cur[0];
            k.layernorm_forward(&mut la.ln1, &mut la.ln1_mean, &mut la.ln1_rstd, res_in, w(LN1_W), w(LN1_W + 1), c);
            lin.matmul(k, &mut la.qkv, &la.ln1, p, base + QKV_W, Some(w(QKV_W + 1)), c, 3 * c);
            k.attention_forward(&mut la.atty, &mut la.lse, &la.qkv, b, t, nh, hs);
            lin.matmul(k, &mut a.scratch_c, &la.atty, p, base + PROJ_W, Some(w(PROJ_W + 1)), c, c);
            k.residual_forward(&mut la.res2, res_in, &a.scratch_c);
            k.layernorm_forward(&mut la.ln2, &mut la.ln2_mean, &mut la.ln2_rstd, &la.res2, w(LN2_W), w(LN2_W + 1), c);
            lin.matmul(k, &mut la.fch, &la.ln2, p, base + FC_W, Some(w(FC_W + 1)), c, 4 * c);
            k.gelu_forward(&mut a.scratch_4c, &la.fch);
            lin.matmul(k, &mut a.scratch_c, &a.scratch_4c, p, base + FCPROJ_W, Some(w(FCPROJ_W + 1)), 4 * c, c);
            k.residual_forward(&mut la.res3, &la.res2, &a.scratch_c);
        }
        let last = a.layers.last().map_or(&a.encoded, |la| &la.res3);
        let nf = p.len() - 2;
        k.layernorm_forward(&mut a.lnf, &mut a.lnf_mean, &mut a.lnf_rstd, last, &p[nf], &p[nf + 1], c);
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
        self.forward_blocks(k, tokens, targets, b, t)?;
        let (c, v, vp) = (self.config.n_embd, self.config.vocab_size, self.config.padded_vocab());
        let a = self.acts.as_mut().expect("forward_blocks allocates");
        self.lin.matmul(k, &mut a.logits, &a.lnf, &self.params, WTE, None, c, vp);
        let Some(tg) = &a.targets else { return Ok(None) };
        k.crossentropy_forward_backward(&mut a.logits, &mut a.losses, tg, v, vp, None);
        let mean = a.losses.iter().map(|&x| x as f64).sum::<f64>() / a.losses.len() as f64;
        Ok(Some(mean as f32))
    }

    /// Per-position cross-entropy of the last forward with targets, `[b·t]`.
    pub fn losses(&self) -> Option<&[f32]> {
        self.acts.as_ref().filter(|a| a.targets.is_some()).map(|a| a.losses.as_slice())
    }

    /// Logits `[b·t, vocab_padded]` of the last forward (before backward overwrites them).
    pub fn logits(&self) -> Option<&[f32]> {
        self.acts.as_ref().map(|a| a.logits.as_slice())
    }

    /// Logits of the last position only, `[vocab]` (unpadded): what generation needs, without
    /// the output GEMM over every position.
    pub fn last_logits(&mut self, k: &dyn Kernels, tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
        let t = tokens.len();
        self.forward_blocks(k, tokens, None, 1, t)?;
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
        self.forward_blocks(k, tokens, None, b, t)?;
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
        if self.lin.is_quantized() {
            return Err(ModelError::Quantized);
        }
        if self.grads.is_empty() {
            self.zero_grad();
        }
        let cfg = &self.config;
        let a = self.acts.as_mut().ok_or(ModelError::NoForward)?;
        let targets = a.targets.as_ref().ok_or(ModelError::NoForward)?;
        let (b, t) = (a.b, a.t);
        let (n, c, nh, hs, v, vp) =
            (b * t, cfg.n_embd, cfg.n_head, cfg.head_size(), cfg.vocab_size, cfg.padded_vocab());
        if a.dres.is_empty() {
            a.dres = vec![0.0; n * c];
            a.dx = vec![0.0; n * c];
            a.dqkv = vec![0.0; n * 3 * c];
            a.d4c = vec![0.0; n * 4 * c];
        }
        let (p, g) = (&self.params, &mut self.grads);

        // d(mean loss)/d(logits), written over the logits.
        k.crossentropy_forward_backward(&mut a.logits, &mut a.losses, targets, v, vp, Some(loss_scale / n as f32));
        k.matmul_backward(&mut a.dx, &mut g[WTE], None, &a.logits, &a.lnf, &p[WTE], c, vp);
        a.dres.fill(0.0);
        let nf = p.len() - 2;
        let last = a.layers.last().map_or(&a.encoded, |la| &la.res3);
        let (gw, gb) = pair_mut(g, nf);
        k.layernorm_backward(&mut a.dres, gw, gb, &a.dx, last, &p[nf], &a.lnf_mean, &a.lnf_rstd, c);
        ready(&[nf, nf + 1], g);

        for l in (0..cfg.n_layer).rev() {
            let base = 2 + l * PER_LAYER;
            let w = |j: usize| p[base + j].as_slice();
            let res_in = if l == 0 { &a.encoded } else { &a.layers[l - 1].res3 };
            let la = &a.layers[l];
            // MLP branch: dres is the gradient of res3 = res2 + proj(gelu(fc(ln2(res2)))).
            k.gelu_forward(&mut a.scratch_4c, &la.fch);
            let (gw, gb) = pair_mut(g, base + FCPROJ_W);
            k.matmul_backward(&mut a.d4c, gw, Some(gb), &a.dres, &a.scratch_4c, w(FCPROJ_W), 4 * c, c);
            k.gelu_backward(&mut a.scratch_4c, &la.fch, &a.d4c);
            let (gw, gb) = pair_mut(g, base + FC_W);
            k.matmul_backward(&mut a.dx, gw, Some(gb), &a.scratch_4c, &la.ln2, w(FC_W), c, 4 * c);
            let (gw, gb) = pair_mut(g, base + LN2_W);
            k.layernorm_backward(&mut a.dres, gw, gb, &a.dx, &la.res2, w(LN2_W), &la.ln2_mean, &la.ln2_rstd, c);
            // Attention branch: res2 = res_in + proj(attn(qkv(ln1(res_in)))).
            let (gw, gb) = pair_mut(g, base + PROJ_W);
            k.matmul_backward(&mut a.dx, gw, Some(gb), &a.dres, &la.atty, w(PROJ_W), c, c);
            k.attention_backward(&mut a.dqkv, &a.dx, &la.qkv, &la.atty, &la.lse, b, t, nh, hs);
            let (gw, gb) = pair_mut(g, base + QKV_W);
            k.matmul_backward(&mut a.dx, gw, Some(gb), &a.dqkv, &la.ln1, w(QKV_W), c, 3 * c);
            let (gw, gb) = pair_mut(g, base + LN1_W);
            k.layernorm_backward(&mut a.dres, gw, gb, &a.dx, res_in, w(LN1_W), &la.ln1_mean, &la.ln1_rstd, c);
            ready(&(base..base + PER_LAYER).collect::<Vec<_>>(), g);
        }
        let (gwte, gwpe) = pair_mut(g, WTE);
        k.encoder_backward(gwte, gwpe, &a.dres, &a.tokens, t, c);
        ready(&[WTE, WTE + 1], g);
        a.targets = None; // the logits are gradients now: a second backward would be wrong
        Ok(())
    }

    /// Bytes held by parameters, gradients and activations (the model's share of peak memory).
    pub fn memory_bytes(&self) -> usize {
        let p: usize = self.params.iter().map(|x| x.len()).sum();
        let g: usize = self.grads.iter().map(|x| x.len()).sum();
        let a = self.acts.as_ref().map_or(0, |a| {
            let per: usize = a
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
            per + a.encoded.len()
                + a.lnf.len()
                + a.logits.len()
                + a.scratch_c.len()
                + a.scratch_4c.len()
                + a.dres.len()
                + a.dx.len()
                + a.dqkv.len()
                + a.d4c.len()
        });
        4 * (p + g + a)
    }
}

/// Standard normal by Box–Muller.
pub(crate) fn normal(rng: &mut ChaCha8Rng) -> f32 {
    let u1: f64 = rng.random::<f64>().max(1e-300);
    let u2: f64 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}
