//! `kiln generate`: the serving engine (kiln-serve) driven from the terminal, streamed.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use kiln_model::SamplingParams;
use kiln_serve::{ChatMessage, Engine, EngineConfig, GenEvent, GenRequest, ServeError};

use crate::usage;

#[derive(Args)]
pub struct GenerateArgs {
    /// Checkpoint directory (a run directory, its checkpoint/, or a Hugging Face model directory).
    #[arg(long)]
    ckpt: PathBuf,
    #[arg(long, default_value = "\n")]
    prompt: String,
    #[arg(long, default_value_t = 200)]
    max_new_tokens: usize,
    /// 0 means greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Keep only the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Divide the scores of tokens already in the text by this (1: off; 1.1-1.3 is typical).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Stop when this text appears; it is not printed (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Send --prompt as a user message through the model's chat template and print the reply.
    #[arg(long)]
    chat: bool,
    /// A system message before the user's (with --chat).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Run the w8a8 model as a fixed-point accelerator would: int8 × int8 → int32, integer
    /// requantisation, integer GELU / softmax / LayerNorm (I-BERT); bit-exact and deterministic.
    #[arg(long)]
    integer_only: bool,
    /// Calibration text for --integer-only's activation scales (default: random tokens).
    #[arg(long, requires = "integer_only")]
    calib: Option<PathBuf>,
}

pub fn run(a: &GenerateArgs) -> anyhow::Result<()> {
    let params = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        repetition_penalty: a.repetition_penalty,
        ..Default::default()
    };
    params
        .validate()
        .map_err(|e| usage(format!("{e} (--temperature >= 0, --top-p in (0, 1], --repetition-penalty > 0)")))?;
    let (mut model, info) = kiln_serve::load_model(&a.ckpt)?;
    if a.integer_only {
        model = crate::load::model_maybe_integer(&a.ckpt, true, a.calib.as_deref())?;
    }
    let mut stop = a.stop.clone();
    let prompt = if a.chat {
        let mut messages = Vec::new();
        if let Some(s) = &a.system {
            messages.push(ChatMessage { role: "system".into(), content: s.clone() });
        }
        messages.push(ChatMessage { role: "user".into(), content: a.prompt.clone() });
        stop.extend(info.chat_stops());
        info.encode_chat(&messages).map_err(|e| usage(e.to_string()))?
    } else {
        info.encode_prompt(&a.prompt)?
    };
    if prompt.is_empty() {
        return Err(usage("the prompt encodes to no tokens"));
    }
    let mut out = std::io::stdout().lock();
    if !a.chat {
        write!(out, "{}", a.prompt)?;
    }
    if a.max_new_tokens > 0 {
        // One slot: the terminal is a single client. Past the context the engine keeps the
        // last half and goes on, as generation always did here.
        let engine = Engine::start(model, info, EngineConfig { max_batch: 1, max_queue: 1 })?;
        let req = GenRequest { prompt, max_tokens: a.max_new_tokens, params, seed: a.seed, stop, context_shift: true };
        let (tx, rx) = std::sync::mpsc::channel();
        engine.submit(req, Box::new(move |ev| tx.send(ev).is_ok())).map_err(|e| match e {
            ServeError::Invalid(m) => usage(m),
            e => e.into(),
        })?;
        // Printing here, not on the scheduler thread, so a closed pipe ends generation cleanly:
        // returning drops the receiver and the engine cancels the sequence.
        for ev in rx {
            match ev {
                GenEvent::Text(t) => {
                    out.write_all(t.as_bytes())?;
                    out.flush()?;
                }
                GenEvent::Done { .. } => break,
                GenEvent::Error(e) => anyhow::bail!("generation failed: {e}"),
            }
        }
    }
    writeln!(out)?;
    Ok(())
}
