//! Load test over real HTTP: aggregate generated tokens/s with 1 client, then with N concurrent
//! clients, against an in-process server on an ephemeral port.
//!
//!     cargo run --release -p kiln-serve --example load_test -- [CKPT_DIR] [--clients 8] [--requests 2] [--max-tokens 64] [--max-batch 8]
//!
//! Without CKPT_DIR it builds a gpt-s-shaped model (6 layers, 384 wide, context 256) with random
//! weights and a BPE tokenizer trained on kiln's synthetic corpus, in a temporary directory.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use kiln_serve::{Engine, EngineConfig, ServerConfig};

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// One completion request; returns the completion tokens.
fn complete(addr: SocketAddr, prompt: &str, max_tokens: usize) -> usize {
    let body =
        serde_json::json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "seed": 1}).to_string();
    let mut s = TcpStream::connect(addr).expect("connect");
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).and_then(|_| s.write_all(body.as_bytes())).expect("write");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read");
    let json = raw.split("\r\n\r\n").nth(1).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_else(|_| panic!("bad answer: {raw}"));
    v["usage"]["completion_tokens"].as_u64().unwrap_or_else(|| panic!("no usage: {raw}")) as usize
}

fn run(addr: SocketAddr, clients: usize, requests: usize, max_tokens: usize) -> (usize, f64) {
    let t = Instant::now();
    let tokens: usize = std::thread::scope(|s| {
        let hs: Vec<_> = (0..clients)
            .map(|c| {
                s.spawn(move || {
                    (0..requests).map(|r| complete(addr, &format!("the number {c} {r} is"), max_tokens)).sum::<usize>()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("client")).sum()
    });
    (tokens, t.elapsed().as_secs_f64())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let clients = arg(&args, "--clients", 8);
    let requests = arg(&args, "--requests", 2);
    let max_tokens = arg(&args, "--max-tokens", 64);
    let max_batch = arg(&args, "--max-batch", 8);
    let tmp = std::env::temp_dir().join(format!("kiln-load-test-{}", std::process::id()));
    let dir = match args.first().filter(|a| !a.starts_with("--")) {
        Some(d) => PathBuf::from(d),
        None => {
            std::fs::create_dir_all(&tmp)?;
            let corpus = tmp.join("corpus.txt");
            kiln_data::synthetic::write_corpus(0, 2_000_000, &corpus)?;
            let tok = kiln_data::Tokenizer::train_bpe(&[corpus], 2048)?;
            tok.save(&tmp.join("tokenizer.json"))?;
            let cfg = kiln_model::GptConfig {
                n_layer: 6,
                n_head: 6,
                n_embd: 384,
                block_size: 256,
                vocab_size: tok.vocab_size(),
            };
            kiln_model::save_hf_files(&kiln_model::Gpt::new(cfg, 0)?, &tmp, tok.eot_id())?;
            tmp.clone()
        }
    };
    let (model, mut info) = kiln_serve::load_model(&dir)?;
    // Never end early at EOS: every request generates max_tokens, so runs compare like for like.
    info.eos_ids.clear();
    let engine = Arc::new(Engine::start(model, info, EngineConfig { max_batch, max_queue: 1024 })?);
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let server = kiln_serve::serve(engine, ServerConfig::default(), listener, 2)?;
    let addr = server.addr();
    complete(addr, "warm up", 8);
    let (t1, s1) = run(addr, 1, requests, max_tokens);
    let (tn, sn) = run(addr, clients, requests, max_tokens);
    let (r1, rn) = (t1 as f64 / s1, tn as f64 / sn);
    println!("1 client:  {t1} tokens in {s1:.2} s = {r1:.1} tokens/s");
    println!("{clients} clients: {tn} tokens in {sn:.2} s = {rn:.1} tokens/s ({:.2}x)", rn / r1);
    println!(
        "{}",
        serde_json::json!({"clients": clients, "requests_per_client": requests, "max_tokens": max_tokens,
            "max_batch": max_batch, "one_client_tokens_per_s": r1, "n_clients_tokens_per_s": rn, "speedup": rn / r1})
    );
    server.shutdown()?;
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}
