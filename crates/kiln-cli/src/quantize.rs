//! `kiln quantize`: a float checkpoint to an int8, w8a8 or int4 one, with a size report and,
//! given text, perplexity before and after plus the KL divergence and top-1 agreement against
//! the float model.

use std::path::{Path, PathBuf};

use clap::Args;
use kiln_compress::{AwqOptions, GptqOptions, Method, QuantizeOptions};
use kiln_data::Tokenizer;
use kiln_model::{QuantInfo, QuantScheme, TrainableLm};
use kiln_tensor::CpuKernels;

use crate::{ui, usage};

#[derive(Args)]
pub struct QuantizeArgs {
    /// Float checkpoint directory (a kiln run, its checkpoint/, or a Hugging Face GPT-2 / Llama /
    /// Qwen2 directory) with its tokenizer.json.
    #[arg(long)]
    ckpt: PathBuf,
    /// int8 (weight-only, per output channel), w8a8 (int8 weights and per-token int8
    /// activations) or int4 (weight-only, groupwise, asymmetric, f16 scales and zeros).
    #[arg(long)]
    scheme: String,
    /// rtn (round to nearest), gptq (int8, int4), awq (int4) or smoothquant (w8a8).
    /// Default: smoothquant for w8a8, rtn otherwise.
    #[arg(long)]
    method: Option<String>,
    /// int4 group size: 32, 64 or 128.
    #[arg(long, default_value_t = 128)]
    group_size: usize,
    /// SmoothQuant migration strength α (0 = all on the activations, 1 = all on the weights).
    #[arg(long, default_value_t = 0.5)]
    alpha: f32,
    /// GPTQ: quantize columns by descending Hessian diagonal (with static groups).
    #[arg(long)]
    act_order: bool,
    /// Calibrate block by block on the partly quantized model, each block seeing the error of
    /// the blocks before it (GPTQ's "true sequential"); one calibration pass per block.
    #[arg(long)]
    sequential: bool,
    /// GPTQ damping, a fraction of the Hessian's mean diagonal.
    #[arg(long, default_value_t = 0.01)]
    damp: f64,
    /// Calibration text (needed by gptq, awq and smoothquant).
    #[arg(long)]
    calib: Option<PathBuf>,
    /// Calibration sequences, spread evenly over the calibration text.
    #[arg(long, default_value_t = 32)]
    calib_samples: usize,
    /// Tokens per calibration sequence (default: the model's context, at most 256).
    #[arg(long)]
    calib_len: Option<usize>,
    /// Tensors left in f32, comma separated: `head`, `embeddings`, or any part of a parameter
    /// name (`h.0.` keeps GPT-2 layer 0; `mlp` keeps every MLP).
    #[arg(long, value_delimiter = ',')]
    keep: Vec<String>,
    /// Text to measure perplexity before and after on, with the KL divergence and top-1
    /// agreement of the quantized model against the float one.
    #[arg(long)]
    eval: Option<PathBuf>,
    /// Window for --eval (default: the model's context).
    #[arg(long)]
    eval_ctx: Option<usize>,
    /// The quantized checkpoint directory to write (must not exist yet).
    #[arg(long)]
    out: PathBuf,
    /// One JSON object on stdout instead of the table.
    #[arg(long)]
    json: bool,
}

fn read_text(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).map_err(|e| usage(format!("cannot read {}: {e}", path.display())))
}

/// `n` windows of `len` tokens spread evenly over `ids` (all of it when it is shorter).
fn calibration_windows(ids: &[u32], n: usize, len: usize) -> Vec<Vec<u32>> {
    if ids.len() <= len {
        return vec![ids.to_vec()];
    }
    let span = ids.len() - len;
    (0..n).map(|i| ids[span * i / n.max(1)..][..len].to_vec()).collect()
}

/// Parameter indices the `--keep` list names.
fn kept(model: &dyn TrainableLm, keep: &[String]) -> anyhow::Result<Vec<usize>> {
    let linears = model.linear_params();
    let mut out = Vec::new();
    for item in keep.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        let hits: Vec<usize> = match item {
            "head" => linears.last().copied().into_iter().collect(),
            "embeddings" => model.embedding_params().into_iter().filter(|i| linears.contains(i)).collect(),
            part => linears.iter().copied().filter(|&i| model.param_info()[i].name.contains(part)).collect(),
        };
        if hits.is_empty() && item != "embeddings" {
            return Err(usage(format!("--keep {item}: no linear weight matches it")));
        }
        out.extend(hits);
    }
    Ok(out)
}

fn dir_bytes(files: &[PathBuf]) -> u64 {
    files.iter().filter_map(|f| std::fs::metadata(f).ok()).map(|m| m.len()).sum()
}

pub fn run(a: &QuantizeArgs) -> anyhow::Result<()> {
    let scheme = QuantScheme::parse(&a.scheme).ok_or_else(|| usage("--scheme: use int8, w8a8 or int4"))?;
    let method = match a.method.as_deref() {
        Some(m) => Method::parse(m).ok_or_else(|| usage("--method: use rtn, gptq, awq or smoothquant"))?,
        None if scheme == QuantScheme::W8a8 => Method::SmoothQuant,
        None => Method::Rtn,
    };
    if a.out.exists() {
        return Err(usage(format!("{} exists: choose a new --out directory", a.out.display())));
    }
    let src = kiln_model::resolve_model_dir(&a.ckpt);
    let mut model = kiln_model::load_trainable(&src)?;
    if model.linears().is_quantized() {
        return Err(usage(format!("{} is already quantized: start from the float checkpoint", a.ckpt.display())));
    }
    let tok_path = src.join("tokenizer.json");
    if !tok_path.is_file() {
        return Err(usage(format!("{} has no tokenizer.json", a.ckpt.display())));
    }
    let tok = Tokenizer::from_file(&tok_path)?;
    let mut opts = QuantizeOptions {
        scheme,
        method,
        group: a.group_size,
        alpha: a.alpha,
        gptq: GptqOptions { damp: a.damp, act_order: a.act_order, static_groups: a.act_order, ..Default::default() },
        awq: AwqOptions::default(),
        keep: Vec::new(),
    };
    kiln_compress::check_options(&opts).map_err(|e| usage(e.to_string()))?;
    opts.keep = kept(model.as_ref(), &a.keep)?;
    let k = CpuKernels::default();
    let float_bytes: usize = 4 * model.num_params();

    let windows = if method.needs_calibration() {
        let path = a.calib.as_ref().ok_or_else(|| usage(format!("--method {} needs --calib FILE", method.name())))?;
        let ids = tok.encode(&read_text(path)?)?;
        let len = a.calib_len.unwrap_or(model.context_len().min(256)).min(model.context_len());
        if ids.len() < 2 || len == 0 || a.calib_samples == 0 {
            return Err(usage("the calibration text is too short (or --calib-samples / --calib-len is 0)"));
        }
        calibration_windows(&ids, a.calib_samples, len)
    } else if a.sequential {
        return Err(usage("--sequential needs a calibrated method (gptq, awq or smoothquant)"));
    } else {
        Vec::new()
    };
    let calib = if method.needs_calibration() && !a.sequential {
        let pb = if a.json { indicatif::ProgressBar::hidden() } else { ui::bar(windows.len() as u64, "calibrate") };
        let c = kiln_compress::calibrate(model.as_mut(), &k, &windows, method == Method::Gptq, &mut |d, _| {
            pb.set_position(d as u64)
        })?;
        pb.finish_and_clear();
        c
    } else {
        Default::default()
    };

    let total = model.linear_params().len().saturating_sub(opts.keep.len());
    let pb = if a.json { indicatif::ProgressBar::hidden() } else { ui::bar(total as u64, "quantize") };
    let mut on_layer = |j: usize, _: usize, name: &str| {
        pb.set_position(j as u64);
        pb.set_message(name.to_string());
    };
    let layers = if a.sequential {
        kiln_compress::quantize_model_sequential(model.as_mut(), &k, &windows, &opts, &mut on_layer)?
    } else {
        kiln_compress::quantize_model(model.as_mut(), &opts, &calib, &mut on_layer)?
    };
    pb.finish_and_clear();

    // Write into a temporary directory beside --out, then rename it into place.
    let parent = a.out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let name = a.out.file_name().and_then(|n| n.to_str()).unwrap_or("quantized");
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    let info = QuantInfo {
        scheme,
        method: method.name().into(),
        group_size: (scheme == QuantScheme::Int4).then_some(a.group_size),
        tensors: layers.iter().map(|l| (l.name.clone(), l.scheme)).collect(),
        settings: serde_json::json!({
            "alpha": (method == Method::SmoothQuant).then_some(a.alpha),
            "damp": (method == Method::Gptq).then_some(a.damp),
            "act_order": (method == Method::Gptq).then_some(a.act_order),
            "calib_samples": method.needs_calibration().then_some(a.calib_samples),
            "sequential": a.sequential,
            "kept_in_f32": opts.keep.iter().map(|&i| model.param_info()[i].name.clone()).collect::<Vec<_>>(),
        }),
    };
    let eos = kiln_model::read_eos_token_ids(&src).first().copied();
    let write = || -> anyhow::Result<()> {
        std::fs::create_dir_all(&tmp)?;
        kiln_model::save_quantized(model.as_ref(), &tmp, eos, &info)?;
        // The source's config.json, tokenizer and chat template carry over unchanged.
        for f in [
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "generation_config.json",
        ] {
            if src.join(f).is_file() {
                std::fs::copy(src.join(f), tmp.join(f))?;
            }
        }
        let kiln_json = serde_json::json!({
            "format": "kiln-checkpoint",
            "version": 1,
            "kiln_version": env!("CARGO_PKG_VERSION"),
            "architecture": model.model_type(),
            "precision": "fp32",
            "quantization": info,
            "quantized_from": src.display().to_string(),
            "pruning": null,
        });
        kiln_model::write_atomic(&tmp.join("kiln.json"), serde_json::to_string_pretty(&kiln_json)?.as_bytes())?;
        std::fs::rename(&tmp, &a.out)?;
        Ok(())
    };
    if let Err(e) = write() {
        // Nothing half-written stays behind: --out was never touched, the temporary goes.
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let files = [a.out.join("model.safetensors"), a.out.join("model.quant.safetensors")];
    let after_bytes = dir_bytes(&files);

    // Before and after on --eval: the quantized model is read back from disk, as a user runs it.
    let eval = match &a.eval {
        None => None,
        Some(path) => {
            let text = read_text(path)?;
            let ids = tok.encode(&text)?;
            let mut float = kiln_model::load_trainable(&src)?;
            let mut quant = kiln_model::load_trainable(&a.out)?;
            let ctx = a.eval_ctx.unwrap_or(float.context_len()).min(float.context_len());
            let pb = if a.json { indicatif::ProgressBar::hidden() } else { ui::bar(3 * ids.len() as u64, "evaluate") };
            let n = ids.len() as u64;
            let err = |e: kiln_eval::EvalError| usage(e.to_string());
            let before = kiln_eval::perplexity(float.as_mut(), &k, &ids, text.len(), ctx, ctx, &mut |d, _| {
                pb.set_position(d as u64)
            })
            .map_err(err)?;
            let after = kiln_eval::perplexity(quant.as_mut(), &k, &ids, text.len(), ctx, ctx, &mut |d, _| {
                pb.set_position(n + d as u64)
            })
            .map_err(err)?;
            let agree = kiln_eval::logit_agreement(float.as_mut(), quant.as_mut(), &k, &ids, ctx, &mut |d, _| {
                pb.set_position(2 * n + d as u64)
            })
            .map_err(err)?;
            pb.finish_and_clear();
            Some((before, after, agree))
        }
    };

    let worst = layers.iter().filter_map(|l| l.output_error.map(|e| (e, &l.name))).fold(None, |m, (e, n)| match m {
        Some((b, _)) if b >= e => m,
        _ => Some((e, n)),
    });
    if a.json {
        let mut v = serde_json::json!({
            "out": a.out.display().to_string(),
            "scheme": scheme.name(),
            "method": method.name(),
            "group_size": info.group_size,
            "quantized_tensors": layers.len(),
            "float_bytes": float_bytes,
            "quantized_bytes": after_bytes,
            "layers": layers,
        });
        if let Some((b, q, g)) = &eval {
            v["ppl_before"] = b.ppl.into();
            v["ppl_after"] = q.ppl.into();
            v["ppl_change"] = (q.ppl / b.ppl - 1.0).into();
            v["kl_mean"] = g.kl_mean.into();
            v["kl_max"] = g.kl_max.into();
            v["top1_agreement"] = g.top1_agreement.into();
            v["eval_tokens"] = b.tokens.into();
        }
        println!("{v}");
        return Ok(());
    }
    println!(
        "quantized {} tensors to {} by {}{} -> {}",
        layers.len(),
        scheme.name(),
        method.name(),
        info.group_size.map(|g| format!(" (group {g})")).unwrap_or_default(),
        a.out.display()
    );
    println!(
        "  size          {:>8.1} MB f32 -> {:.1} MB on disk ({:.2}x smaller)",
        float_bytes as f64 / 1e6,
        after_bytes as f64 / 1e6,
        float_bytes as f64 / after_bytes.max(1) as f64
    );
    if let Some((e, name)) = worst {
        println!("  worst layer   {name}: relative output error {e:.4} on the calibration sample");
    }
    if let Some((b, q, g)) = &eval {
        println!(
            "  perplexity    {:.4} -> {:.4} ({:+.2}%) over {} tokens, window {}",
            b.ppl,
            q.ppl,
            100.0 * (q.ppl / b.ppl - 1.0),
            b.tokens,
            b.ctx
        );
        println!(
            "  vs float      KL divergence {:.6} mean, {:.4} max; top-1 agreement {:.2}%",
            g.kl_mean,
            g.kl_max,
            100.0 * g.top1_agreement
        );
    }
    Ok(())
}
