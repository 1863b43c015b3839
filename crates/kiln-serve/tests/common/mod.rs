//! A tiny checkpoint, a server on an ephemeral port, and a minimal HTTP/1.1 client over a
//! TcpStream (no HTTP client crate needed).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_data::Tokenizer;
use kiln_model::{Gpt, GptConfig};
use kiln_serve::{Engine, EngineConfig, ServerConfig, ServerHandle};

pub const CORPUS: &str = "the cat sat on the mat. the dog ate the bone. a bird sang in the tree.\n\
one two three four five six seven eight nine ten.\nthe quick brown fox jumps over the lazy dog.\n";

/// Writes a 2-layer GPT (random weights, context 64) with a trained BPE tokenizer to `dir`.
pub fn tiny_checkpoint(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let corpus = dir.join("corpus.txt");
    std::fs::write(&corpus, CORPUS.repeat(20)).unwrap();
    let tok = Tokenizer::train_bpe(&[corpus], 300).unwrap();
    tok.save(&dir.join("tokenizer.json")).unwrap();
    let cfg = GptConfig { n_layer: 2, n_head: 4, n_embd: 64, block_size: 64, vocab_size: tok.vocab_size() };
    let model = Gpt::new(cfg, 7).unwrap();
    kiln_model::save_hf_files(&model, dir, tok.eot_id()).unwrap();
    dir.to_path_buf()
}

pub fn start_engine(dir: &Path, cfg: EngineConfig) -> Arc<Engine> {
    let (model, info) = kiln_serve::load_model(dir).unwrap();
    Arc::new(Engine::start(model, info, cfg).unwrap())
}

pub fn start_server(dir: &Path, ecfg: EngineConfig, scfg: ServerConfig) -> ServerHandle {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    kiln_serve::serve(start_engine(dir, ecfg), scfg, listener, 2).unwrap()
}

pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The `data:` payloads of a server-sent-events body.
    pub fn sse_data(&self) -> Vec<String> {
        self.body.lines().filter_map(|l| l.strip_prefix("data:")).map(|d| d.trim_start().to_string()).collect()
    }
}

/// One request on a fresh connection (`Connection: close`), read to the end.
pub fn request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> Resp {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head += &format!("{k}: {v}\r\n");
    }
    if let Some(b) = body {
        head += &format!("Content-Type: application/json\r\nContent-Length: {}\r\n", b.len());
    }
    head += "\r\n";
    s.write_all(head.as_bytes()).unwrap();
    if let Some(b) = body {
        // The server may answer (413) and close before reading a large body.
        let _ = s.write_all(b);
    }
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("no end of headers");
    let head = String::from_utf8(raw[..split].to_vec()).unwrap();
    let mut lines = head.lines();
    let status: u16 = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    Resp { status, headers, body: String::from_utf8(body).unwrap() }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&b[..eol]).to_string();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap();
        if size == 0 {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[eol + 2 + size + 2..];
    }
    out
}

pub fn post(addr: SocketAddr, path: &str, body: &serde_json::Value) -> Resp {
    request(addr, "POST", path, &[], Some(body.to_string().as_bytes()))
}

pub fn get(addr: SocketAddr, path: &str) -> Resp {
    request(addr, "GET", path, &[], None)
}
