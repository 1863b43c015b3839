//! One plain description of a decoder's weights for both families (GPT-2 and Llama), taken from
//! kiln-model's loaded models, and a straightforward f32 forward over it that reports the
//! activations at named points: the calibration pass of the ONNX QDQ export and of the
//! integer-only executor.

use std::path::Path;

use kiln_model::{Gpt, Llama, ModelError};

/// A linear layer in PyTorch layout: `w [out, in]`, optional bias `[out]`.
#[derive(Clone, Debug)]
pub struct Linear {
    pub w: Vec<f32>,
    pub b: Option<Vec<f32>>,
    pub out: usize,
    pub inp: usize,
}

/// LayerNorm (with a bias, GPT-2) or RMSNorm (no bias, Llama).
#[derive(Clone, Debug)]
pub struct Norm {
    pub w: Vec<f32>,
    pub b: Option<Vec<f32>>,
}

#[derive(Clone, Debug)]
pub enum Mlp {
    /// GPT-2: `proj(gelu_tanh(fc(x)))`.
    Gelu { fc: Linear, proj: Linear },
    /// Llama: `down(silu(gate(x)) · up(x))`.
    SwiGlu { gate: Linear, up: Linear, down: Linear },
}

#[derive(Clone, Debug)]
pub struct Block {
    pub norm1: Norm,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub norm2: Norm,
    pub mlp: Mlp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Gpt2,
    Llama,
}

#[derive(Clone, Debug)]
pub struct ModelWeights {
    pub family: Family,
    /// config.json's `model_type`.
    pub model_type: String,
    pub vocab: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub context: usize,
    pub eps: f32,
    /// Token embedding `[vocab, n_embd]`.
    pub wte: Vec<f32>,
    /// Learned positions `[context, n_embd]` (GPT-2).
    pub wpe: Option<Vec<f32>>,
    /// RoPE cos and sin `[context, head_dim/2]` (Llama), as kiln-model computes them.
    pub rope: Option<(Vec<f32>, Vec<f32>)>,
    pub blocks: Vec<Block>,
    pub norm_f: Norm,
    /// Output head `[vocab, n_embd]` (a copy of `wte` when tied).
    pub head: Linear,
    pub tied: bool,
}

fn split_rows(w: &[f32], cols: usize, from: usize, to: usize) -> Vec<f32> {
    w[from * cols..to * cols].to_vec()
}

impl ModelWeights {
    /// Loads any checkpoint directory kiln-model reads (GPT-2, Llama, Qwen2, Mistral).
    pub fn load(dir: &Path) -> Result<ModelWeights, ModelError> {
        let dir = kiln_model::resolve_model_dir(dir);
        if !dir.join("config.json").is_file() {
            return Err(ModelError::Checkpoint {
                path: dir.display().to_string(),
                msg: "no config.json (is this a checkpoint directory?)".into(),
            });
        }
        match kiln_model::read_model_type(&dir)?.as_str() {
            "gpt2" => Ok(Self::from_gpt(&kiln_model::load_hf_dir(&dir)?)),
            "llama" | "qwen2" | "mistral" => Ok(Self::from_llama(&kiln_model::load_llama_dir(&dir)?)),
            other => Err(ModelError::Checkpoint {
                path: dir.display().to_string(),
                msg: format!("model_type '{other}' is not supported (gpt2, llama, qwen2, mistral are)"),
            }),
        }
    }

    pub fn from_gpt(m: &Gpt) -> ModelWeights {
        let cfg = &m.config;
        let c = cfg.n_embd;
        let p = |name: &str| m.param_values(m.param_index(name).expect("GPT-2 parameter names are fixed")).to_vec();
        let lin = |name: &str, out: usize, inp: usize| Linear {
            w: p(&format!("{name}.weight")),
            b: Some(p(&format!("{name}.bias"))),
            out,
            inp,
        };
        let blocks = (0..cfg.n_layer)
            .map(|l| {
                let qkv = lin(&format!("h.{l}.attn.c_attn"), 3 * c, c);
                let bias = qkv.b.as_ref().expect("GPT-2 has biases");
                let part = |i: usize| Linear {
                    w: split_rows(&qkv.w, c, i * c, (i + 1) * c),
                    b: Some(bias[i * c..(i + 1) * c].to_vec()),
                    out: c,
                    inp: c,
                };
                Block {
                    norm1: Norm { w: p(&format!("h.{l}.ln_1.weight")), b: Some(p(&format!("h.{l}.ln_1.bias"))) },
                    q: part(0),
                    k: part(1),
                    v: part(2),
                    o: lin(&format!("h.{l}.attn.c_proj"), c, c),
                    norm2: Norm { w: p(&format!("h.{l}.ln_2.weight")), b: Some(p(&format!("h.{l}.ln_2.bias"))) },
                    mlp: Mlp::Gelu {
                        fc: lin(&format!("h.{l}.mlp.c_fc"), 4 * c, c),
                        proj: lin(&format!("h.{l}.mlp.c_proj"), c, 4 * c),
                    },
                }
            })
            .collect();
        let wte = p("wte.weight");
        ModelWeights {
            family: Family::Gpt2,
            model_type: "gpt2".into(),
            vocab: cfg.vocab_size,
            n_embd: c,
            n_head: cfg.n_head,
            n_kv_head: cfg.n_head,
            head_dim: cfg.head_size(),
            context: cfg.block_size,
            eps: 1e-5,
            head: Linear { w: wte.clone(), b: None, out: cfg.vocab_size, inp: c },
            wte,
            wpe: Some(p("wpe.weight")),
            rope: None,
            blocks,
            norm_f: Norm { w: p("ln_f.weight"), b: Some(p("ln_f.bias")) },
            tied: true,
        }
    }

    pub fn from_llama(m: &Llama) -> ModelWeights {
        let cfg = &m.config;
        let (c, q, kv, f) = (cfg.n_embd, cfg.q_dim(), cfg.kv_dim(), cfg.ffn_hidden);
        let get = |name: &str| m.param_index(name).map(|i| m.params[i].clone());
        let p = |name: &str| get(name).expect("Llama parameter names follow the config");
        let lin = |name: &str, out: usize, inp: usize| Linear {
            w: p(&format!("{name}.weight")),
            b: get(&format!("{name}.bias")),
            out,
            inp,
        };
        let blocks = (0..cfg.n_layer)
            .map(|l| {
                let pre = format!("model.layers.{l}");
                Block {
                    norm1: Norm { w: p(&format!("{pre}.input_layernorm.weight")), b: None },
                    q: lin(&format!("{pre}.self_attn.q_proj"), q, c),
                    k: lin(&format!("{pre}.self_attn.k_proj"), kv, c),
                    v: lin(&format!("{pre}.self_attn.v_proj"), kv, c),
                    o: lin(&format!("{pre}.self_attn.o_proj"), c, q),
                    norm2: Norm { w: p(&format!("{pre}.post_attention_layernorm.weight")), b: None },
                    mlp: Mlp::SwiGlu {
                        gate: lin(&format!("{pre}.mlp.gate_proj"), f, c),
                        up: lin(&format!("{pre}.mlp.up_proj"), f, c),
                        down: lin(&format!("{pre}.mlp.down_proj"), c, f),
                    },
                }
            })
            .collect();
        let wte = p("model.embed_tokens.weight");
        let head = if cfg.tie_embeddings { wte.clone() } else { p("lm_head.weight") };
        ModelWeights {
            family: Family::Llama,
            model_type: cfg.model_type.clone(),
            vocab: cfg.vocab_size,
            n_embd: c,
            n_head: cfg.n_head,
            n_kv_head: cfg.n_kv_head,
            head_dim: cfg.head_dim,
            context: cfg.block_size,
            eps: cfg.rms_eps,
            wte,
            wpe: None,
            rope: Some(rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_theta, cfg.rope_linear_factor)),
            blocks,
            norm_f: Norm { w: p("model.norm.weight"), b: None },
            head: Linear { w: head, b: None, out: cfg.vocab_size, inp: c },
            tied: cfg.tie_embeddings,
        }
    }

    /// Parameters as a user counts them (a tied head counted once).
    pub fn num_params(&self) -> usize {
        let lin = |l: &Linear| l.w.len() + l.b.as_ref().map_or(0, |b| b.len());
        let norm = |n: &Norm| n.w.len() + n.b.as_ref().map_or(0, |b| b.len());
        let blocks: usize = self
            .blocks
            .iter()
            .map(|b| {
                let mlp = match &b.mlp {
                    Mlp::Gelu { fc, proj } => lin(fc) + lin(proj),
                    Mlp::SwiGlu { gate, up, down } => lin(gate) + lin(up) + lin(down),
                };
                norm(&b.norm1) + norm(&b.norm2) + lin(&b.q) + lin(&b.k) + lin(&b.v) + lin(&b.o) + mlp
            })
            .sum();
        let head = if self.tied { 0 } else { self.head.w.len() };
        self.wte.len() + self.wpe.as_ref().map_or(0, |w| w.len()) + blocks + norm(&self.norm_f) + head
    }

    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.n_kv_head * self.head_dim
    }

    /// Checks token ids and length before a forward.
    pub fn check_tokens(&self, tokens: &[u32]) -> Result<(), ModelError> {
        if tokens.is_empty() {
            return Err(ModelError::Shape("an empty sequence".into()));
        }
        if tokens.len() > self.context {
            return Err(ModelError::SequenceTooLong { t: tokens.len(), context: self.context });
        }
        match tokens.iter().position(|&x| x as usize >= self.vocab) {
            Some(pos) => Err(ModelError::TokenOutOfRange { id: tokens[pos], pos, vocab: self.vocab }),
            None => Ok(()),
        }
    }
}

/// cos and sin of pos·θᵢ, θᵢ = 1/base^(2i/d) / factor, computed in f32 as kiln-model (and
/// `transformers`) do.
pub fn rope_tables(head_dim: usize, context: usize, theta: f64, factor: f64) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let inv: Vec<f32> =
        (0..half).map(|i| (1.0 / theta.powf((2 * i) as f64 / head_dim as f64)) as f32 / factor as f32).collect();
    let (mut cos, mut sin) = (Vec::with_capacity(context * half), Vec::with_capacity(context * half));
    for p in 0..context {
        for &f in &inv {
            let a = (p as f32 * f) as f64;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    (cos, sin)
}

/// Where the reference forward reports an activation (`layer` is the block index).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Point {
    /// The residual stream entering block `layer` (`layer == n_layer`: entering the final norm).
    Resid(usize),
    /// Input of q, k, v (the first norm's output).
    AttnIn(usize),
    Q(usize),
    K(usize),
    V(usize),
    /// Attention scores q·k/√d (causal entries only).
    Scores(usize),
    /// Input of the output projection.
    OIn(usize),
    /// Output of o, added to the residual.
    OOut(usize),
    /// Input of fc / gate / up (the second norm's output).
    MlpIn(usize),
    /// fc's output before GELU (GPT-2), or gate's (Llama).
    Hidden(usize),
    /// up's output (Llama).
    Up(usize),
    /// Input of proj / down.
    DownIn(usize),
    DownOut(usize),
    /// Input of the output head (the final norm's output).
    HeadIn,
}

/// `y[t, out] = x[t, in] · wᵀ + b`, each output summed in order (rows in parallel: the same
/// bits on any thread count).
pub fn linear_f32(x: &[f32], l: &Linear) -> Vec<f32> {
    use rayon::prelude::*;
    let rows = x.len() / l.inp;
    let mut y = vec![0.0f32; rows * l.out];
    y.par_chunks_mut(l.out).enumerate().for_each(|(r, yr)| {
        let xr = &x[r * l.inp..(r + 1) * l.inp];
        for (o, yv) in yr.iter_mut().enumerate() {
            let wr = &l.w[o * l.inp..(o + 1) * l.inp];
            let s: f32 = xr.iter().zip(wr).map(|(a, b)| a * b).sum();
            *yv = s + l.b.as_ref().map_or(0.0, |b| b[o]);
        }
    });
    y
}

fn norm_f32(x: &[f32], n: &Norm, eps: f32) -> Vec<f32> {
    let c = n.w.len();
    let mut y = vec![0.0f32; x.len()];
    for (xr, yr) in x.chunks(c).zip(y.chunks_mut(c)) {
        match &n.b {
            Some(b) => {
                let mean = xr.iter().sum::<f32>() / c as f32;
                let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / c as f32;
                let r = 1.0 / (var + eps).sqrt();
                for i in 0..c {
                    yr[i] = (xr[i] - mean) * r * n.w[i] + b[i];
                }
            }
            None => {
                let ms = xr.iter().map(|v| v * v).sum::<f32>() / c as f32;
                let r = 1.0 / (ms + eps).sqrt();
                for i in 0..c {
                    yr[i] = xr[i] * r * n.w[i];
                }
            }
        }
    }
    y
}

/// GPT-2's tanh approximation of GELU.
pub fn gelu_tanh(x: f32) -> f32 {
    let k = (2.0f32 / std::f32::consts::PI).sqrt();
    0.5 * x * (1.0 + (k * (x + 0.044715 * x * x * x)).tanh())
}

fn rope_f32(x: &mut [f32], heads: usize, hd: usize, cos: &[f32], sin: &[f32]) {
    let half = hd / 2;
    for (t, row) in x.chunks_mut(heads * hd).enumerate() {
        for h in 0..heads {
            let v = &mut row[h * hd..(h + 1) * hd];
            for i in 0..half {
                let (c, s) = (cos[t * half + i], sin[t * half + i]);
                let (a, b) = (v[i], v[i + half]);
                v[i] = a * c - b * s;
                v[i + half] = b * c + a * s;
            }
        }
    }
}

/// The f32 forward of one sequence: logits `[t, vocab]`; `obs` sees every [`Point`].
pub fn reference_forward(
    m: &ModelWeights,
    tokens: &[u32],
    obs: &mut dyn FnMut(Point, &[f32]),
) -> Result<Vec<f32>, ModelError> {
    m.check_tokens(tokens)?;
    let (t, c, hd, nh) = (tokens.len(), m.n_embd, m.head_dim, m.n_head);
    let group = m.n_head / m.n_kv_head;
    let mut x = vec![0.0f32; t * c];
    for (i, &tok) in tokens.iter().enumerate() {
        let row = &mut x[i * c..(i + 1) * c];
        row.copy_from_slice(&m.wte[tok as usize * c..(tok as usize + 1) * c]);
        if let Some(wpe) = &m.wpe {
            row.iter_mut().zip(&wpe[i * c..(i + 1) * c]).for_each(|(a, b)| *a += b);
        }
    }
    let scale = 1.0 / (hd as f32).sqrt();
    for (l, blk) in m.blocks.iter().enumerate() {
        obs(Point::Resid(l), &x);
        let h = norm_f32(&x, &blk.norm1, m.eps);
        obs(Point::AttnIn(l), &h);
        let (mut q, mut k, v) = (linear_f32(&h, &blk.q), linear_f32(&h, &blk.k), linear_f32(&h, &blk.v));
        if let Some((cos, sin)) = &m.rope {
            rope_f32(&mut q, nh, hd, cos, sin);
            rope_f32(&mut k, m.n_kv_head, hd, cos, sin);
        }
        obs(Point::Q(l), &q);
        obs(Point::K(l), &k);
        obs(Point::V(l), &v);
        let (qd, kvd) = (m.q_dim(), m.kv_dim());
        let mut att = vec![0.0f32; t * qd];
        let mut scores_seen = Vec::new();
        for hh in 0..nh {
            let kh = hh / group;
            for i in 0..t {
                let qi = &q[i * qd + hh * hd..i * qd + (hh + 1) * hd];
                let s: Vec<f32> = (0..=i)
                    .map(|j| {
                        qi.iter().zip(&k[j * kvd + kh * hd..j * kvd + (kh + 1) * hd]).map(|(a, b)| a * b).sum::<f32>()
                            * scale
                    })
                    .collect();
                scores_seen.extend_from_slice(&s);
                let mx = s.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                let e: Vec<f32> = s.iter().map(|v| (v - mx).exp()).collect();
                let z: f32 = e.iter().sum();
                let out = &mut att[i * qd + hh * hd..i * qd + (hh + 1) * hd];
                for (j, ej) in e.iter().enumerate() {
                    let vj = &v[j * kvd + kh * hd..j * kvd + (kh + 1) * hd];
                    out.iter_mut().zip(vj).for_each(|(o, vv)| *o += ej / z * vv);
                }
            }
        }
        obs(Point::Scores(l), &scores_seen);
        obs(Point::OIn(l), &att);
        let o = linear_f32(&att, &blk.o);
        obs(Point::OOut(l), &o);
        x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        let h2 = norm_f32(&x, &blk.norm2, m.eps);
        obs(Point::MlpIn(l), &h2);
        let (mid, down) = match &blk.mlp {
            Mlp::Gelu { fc, proj } => {
                let f = linear_f32(&h2, fc);
                obs(Point::Hidden(l), &f);
                (f.iter().map(|&v| gelu_tanh(v)).collect::<Vec<f32>>(), proj)
            }
            Mlp::SwiGlu { gate, up, down } => {
                let g = linear_f32(&h2, gate);
                let u = linear_f32(&h2, up);
                obs(Point::Hidden(l), &g);
                obs(Point::Up(l), &u);
                (g.iter().zip(&u).map(|(&a, &b)| a / (1.0 + (-a).exp()) * b).collect(), down)
            }
        };
        obs(Point::DownIn(l), &mid);
        let d = linear_f32(&mid, down);
        obs(Point::DownOut(l), &d);
        x.iter_mut().zip(&d).for_each(|(a, b)| *a += b);
    }
    obs(Point::Resid(m.blocks.len()), &x);
    let hf = norm_f32(&x, &m.norm_f, m.eps);
    obs(Point::HeadIn, &hf);
    Ok(linear_f32(&hf, &m.head))
}

/// Largest |value| seen at each point over a set of calibration sequences.
pub fn calibrate_absmax(
    m: &ModelWeights,
    seqs: &[Vec<u32>],
) -> Result<std::collections::BTreeMap<Point, f32>, ModelError> {
    let mut amax = std::collections::BTreeMap::new();
    for s in seqs {
        reference_forward(m, s, &mut |p, x| {
            let a = x.iter().fold(0.0f32, |acc, v| acc.max(v.abs()));
            let e = amax.entry(p).or_insert(0.0f32);
            *e = e.max(a);
        })?;
    }
    Ok(amax)
}

/// Calibration sequences: `text` tokenized with the checkpoint's tokenizer.json and cut into
/// `n` windows of up to `len` tokens; or, without text, `n` sequences of `len` uniform random
/// token ids (seeded: the same every run).
pub fn calibration_tokens(
    dir: &Path,
    text: Option<&Path>,
    vocab: usize,
    n: usize,
    len: usize,
) -> Result<Vec<Vec<u32>>, ModelError> {
    let len = len.max(1);
    match text {
        Some(path) => {
            let dir = kiln_model::resolve_model_dir(dir);
            let tok_path = dir.join("tokenizer.json");
            let ck = |msg: String| ModelError::Checkpoint { path: tok_path.display().to_string(), msg };
            let tok = kiln_data::Tokenizer::from_file(&tok_path).map_err(|e| ck(e.to_string()))?;
            let body = std::fs::read_to_string(path)
                .map_err(|e| ModelError::Io { path: path.display().to_string(), source: e })?;
            let ids = tok.encode(&body).map_err(|e| ck(e.to_string()))?;
            if let Some(&bad) = ids.iter().find(|&&x| x as usize >= vocab) {
                return Err(ck(format!("tokenizer gives id {bad}, outside the model's vocabulary of {vocab}")));
            }
            let seqs: Vec<Vec<u32>> = ids.chunks(len).take(n).map(|c| c.to_vec()).collect();
            if seqs.is_empty() {
                return Err(ModelError::Shape(format!("{}: no tokens to calibrate on", path.display())));
            }
            Ok(seqs)
        }
        None => {
            use rand::{Rng, SeedableRng};
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x6b696c6e);
            Ok((0..n).map(|_| (0..len).map(|_| rng.random_range(0..vocab as u32)).collect()).collect())
        }
    }
}
