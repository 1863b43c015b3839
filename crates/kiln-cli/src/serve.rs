//! `kiln serve`: the OpenAI-compatible HTTP server (kiln-serve) on a checkpoint.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use kiln_serve::{Engine, EngineConfig, ServerConfig};

use crate::usage;

#[derive(Args)]
pub struct ServeArgs {
    /// Checkpoint directory (a kiln run directory, its checkpoint/, or a Hugging Face model
    /// directory with config.json, model.safetensors and tokenizer.json).
    #[arg(long)]
    ckpt: PathBuf,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Sequences decoded together in one step (continuous batching).
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
    /// Requests that may wait for a batch slot; beyond that the server answers 429.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Require `Authorization: Bearer KEY` on /v1/* (/health and /metrics stay open).
    #[arg(long)]
    api_key: Option<String>,
    /// The model name clients pass as "model" (default: the checkpoint directory's name).
    #[arg(long)]
    model_name: Option<String>,
    /// Largest max_tokens a request may ask for.
    #[arg(long, default_value_t = 4096)]
    max_tokens_limit: usize,
    /// Longest prompt in tokens (default: the model's context).
    #[arg(long)]
    max_prompt_tokens: Option<usize>,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    max_body_bytes: usize,
}

pub fn run(a: &ServeArgs) -> anyhow::Result<()> {
    if a.max_batch == 0 || a.max_tokens_limit == 0 || a.max_body_bytes == 0 {
        return Err(usage("--max-batch, --max-tokens-limit and --max-body-bytes must be at least 1"));
    }
    if a.api_key.as_deref().is_some_and(|k| k.trim().is_empty()) {
        return Err(usage("--api-key must not be empty"));
    }
    let (model, mut info) = kiln_serve::load_model(&a.ckpt)?;
    if let Some(name) = &a.model_name {
        info.name = name.clone();
    }
    let listener = std::net::TcpListener::bind((a.host.as_str(), a.port))
        .map_err(|e| anyhow::anyhow!("cannot listen on {}:{}: {e}", a.host, a.port))?;
    let summary = format!(
        "{} ({}, {:.1}M parameters, context {})",
        info.name,
        info.model_type,
        model.num_params() as f64 / 1e6,
        info.context_len
    );
    let engine = Arc::new(Engine::start(model, info, EngineConfig { max_batch: a.max_batch, max_queue: a.max_queue })?);
    let cfg = ServerConfig {
        api_key: a.api_key.clone(),
        max_body_bytes: a.max_body_bytes,
        max_tokens_limit: a.max_tokens_limit,
        max_prompt_tokens: a.max_prompt_tokens,
    };
    // Two HTTP threads are plenty: they only parse, tokenize and forward.
    let server = kiln_serve::serve(engine, cfg, listener, 2)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "kiln serve: {summary}, max batch {}", a.max_batch)?;
    writeln!(
        out,
        "listening on http://{}  (POST /v1/completions, /v1/chat/completions; GET /v1/models, /health, /metrics)",
        server.addr()
    )?;
    out.flush()?;
    drop(out);
    server.wait()?;
    Ok(())
}
