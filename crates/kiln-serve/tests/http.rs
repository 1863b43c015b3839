//! The server over real HTTP on an ephemeral port, with a hand-written HTTP/1.1 client.

mod common;

use common::*;
use kiln_data::Tokenizer;
use kiln_serve::{EngineConfig, ServerConfig};
use serde_json::json;

fn greedy_completion(addr: std::net::SocketAddr, prompt: &str, n: usize) -> serde_json::Value {
    let r = post(addr, "/v1/completions", &json!({"prompt": prompt, "max_tokens": n, "temperature": 0}));
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

/// Text deltas of a streamed response, checking the chunk format and the [DONE] end.
fn stream_text(r: &Resp, object: &str) -> (String, String) {
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.header("content-type").unwrap().starts_with("text/event-stream"));
    let data = r.sse_data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{}", r.body);
    let mut text = String::new();
    let mut finish = String::new();
    for d in &data[..data.len() - 1] {
        let v: serde_json::Value = serde_json::from_str(d).unwrap();
        assert_eq!(v["object"], object, "{d}");
        let c = &v["choices"][0];
        text += c["text"].as_str().or(c["delta"]["content"].as_str()).unwrap_or("");
        if let Some(f) = c["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    (text, finish)
}

#[test]
fn completions_chat_streaming_and_concurrency() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_checkpoint(tmp.path());
    // A Zephyr-style chat template, as a Hugging Face checkpoint ships it.
    let template = "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'].strip() + eos_token + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}";
    std::fs::write(
        dir.join("tokenizer_config.json"),
        json!({"eos_token": "<|endoftext|>", "chat_template": template}).to_string(),
    )
    .unwrap();
    let server = start_server(&dir, EngineConfig { max_batch: 4, max_queue: 16 }, ServerConfig::default());
    let addr = server.addr();
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();

    // Greedy completion equals kiln_model::generate on the same prompt.
    let v = greedy_completion(addr, "the cat sat", 20);
    let prompt = tok.encode("the cat sat").unwrap();
    let mut model = kiln_model::load_causal_lm(&dir).unwrap();
    let k = kiln_tensor::CpuKernels::default();
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
    let eot = tok.eot_id().unwrap();
    let ids = kiln_model::generate(
        &mut *model,
        &k,
        &prompt,
        20,
        &kiln_model::SamplingParams::greedy(),
        &mut rng,
        &mut |id| id != eot,
    )
    .unwrap();
    let gen: Vec<u32> = ids[prompt.len()..].iter().copied().filter(|&t| t != eot).collect();
    assert_eq!(v["choices"][0]["text"], tok.decode(&gen).unwrap());
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["usage"]["prompt_tokens"], prompt.len());
    assert_eq!(v["usage"]["total_tokens"], prompt.len() + ids.len() - prompt.len());
    let finish = v["choices"][0]["finish_reason"].as_str().unwrap();
    assert_eq!(finish, if ids.len() - prompt.len() == 20 && ids.last() != Some(&eot) { "length" } else { "stop" });

    // Streaming: the chunks add up to the whole text.
    let r = post(
        addr,
        "/v1/completions",
        &json!({"prompt": "the cat sat", "max_tokens": 20, "temperature": 0, "stream": true}),
    );
    assert_eq!(
        stream_text(&r, "text_completion"),
        (v["choices"][0]["text"].as_str().unwrap().to_string(), finish.to_string())
    );

    // Chat: the template rendered, then the same as a completion of the rendered prompt.
    let messages = json!([{"role": "system", "content": "be kind"}, {"role": "user", "content": " the dog "}]);
    let r = post(addr, "/v1/chat/completions", &json!({"messages": messages, "max_tokens": 15, "temperature": 0}));
    assert_eq!(r.status, 200, "{}", r.body);
    let chat = r.json();
    assert_eq!(chat["object"], "chat.completion");
    assert_eq!(chat["choices"][0]["message"]["role"], "assistant");
    let rendered = "<|system|>\nbe kind<|endoftext|>\n<|user|>\nthe dog<|endoftext|>\n<|assistant|>\n";
    let same = greedy_completion(addr, rendered, 15);
    assert_eq!(chat["choices"][0]["message"]["content"], same["choices"][0]["text"]);
    assert_eq!(chat["usage"], same["usage"]);
    let r = post(
        addr,
        "/v1/chat/completions",
        &json!({"messages": messages, "max_tokens": 15, "temperature": 0, "stream": true,
                "stream_options": {"include_usage": true}}),
    );
    let (text, _) = stream_text(&r, "chat.completion.chunk");
    assert_eq!(text, chat["choices"][0]["message"]["content"].as_str().unwrap());
    let data = r.sse_data();
    let first: serde_json::Value = serde_json::from_str(&data[0]).unwrap();
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let usage: serde_json::Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(usage["usage"], chat["usage"]);

    // Four clients at once (batched decode) each get their solo answer.
    let prompts = ["one two", "the quick brown", "a bird sang", "the mat"];
    let solo: Vec<serde_json::Value> =
        prompts.iter().map(|p| greedy_completion(addr, p, 24)["choices"][0]["text"].clone()).collect();
    let together: Vec<serde_json::Value> = std::thread::scope(|s| {
        let hs: Vec<_> = prompts
            .iter()
            .map(|p| s.spawn(move || greedy_completion(addr, p, 24)["choices"][0]["text"].clone()))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(solo, together);

    // Stop sequences through the API: the text ends just before the first stop.
    let full = solo[0].as_str().unwrap();
    let stop: String = full.chars().skip(4).take(3).collect();
    let r = post(
        addr,
        "/v1/completions",
        &json!({"prompt": "one two", "max_tokens": 24, "temperature": 0, "stop": [stop]}),
    );
    let v = r.json();
    assert_eq!(v["choices"][0]["text"].as_str().unwrap(), &full[..full.find(&stop).unwrap()]);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    // Seeded sampling is reproducible.
    let body = json!({"prompt": "the", "max_tokens": 10, "temperature": 1.0, "top_k": 50, "seed": 42});
    assert_eq!(
        post(addr, "/v1/completions", &body).json()["choices"],
        post(addr, "/v1/completions", &body).json()["choices"]
    );

    let m = get(addr, "/v1/models").json();
    assert_eq!(m["data"][0]["id"], tmp.path().file_name().unwrap().to_str().unwrap());
    assert_eq!(get(addr, "/health").status, 200);
    server.shutdown().unwrap();
}

#[test]
fn bad_requests_get_clear_4xx_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_checkpoint(tmp.path());
    let cfg = ServerConfig { max_body_bytes: 4096, max_tokens_limit: 50, ..Default::default() };
    let server = start_server(&dir, EngineConfig::default(), cfg);
    let addr = server.addr();
    let cases: Vec<(Resp, u16, &str)> = vec![
        (request(addr, "POST", "/v1/completions", &[], Some(b"{not json")), 400, "invalid JSON"),
        (post(addr, "/v1/completions", &json!({"max_tokens": 5})), 400, "'prompt' is required"),
        (post(addr, "/v1/completions", &json!({"prompt": "x".repeat(5000)})), 413, "larger than 4096 bytes"),
        (post(addr, "/v1/completions", &json!({"prompt": "the", "max_tokens": 51})), 400, "at most 50"),
        (post(addr, "/v1/completions", &json!({"prompt": "the", "max_tokens": -1})), 400, "invalid JSON"),
        (
            post(addr, "/v1/completions", &json!({"prompt": "the cat ".repeat(20), "max_tokens": 40})),
            400,
            "maximum context length is 64",
        ),
        (post(addr, "/v1/completions", &json!({"prompt": "the cat ".repeat(40)})), 400, "the limit is 64"),
        (post(addr, "/v1/completions", &json!({"prompt": "the", "temperature": 3})), 400, "temperature"),
        (post(addr, "/v1/completions", &json!({"prompt": "the", "top_p": 0})), 400, "top_p"),
        (post(addr, "/v1/completions", &json!({"prompt": "the", "temperature": "hot"})), 400, "invalid JSON"),
        (post(addr, "/v1/completions", &json!({"prompt": "the", "n": 2})), 400, "n = 1"),
        (post(addr, "/v1/completions", &json!({"prompt": "the", "logprobs": 3})), 400, "logprobs"),
        (
            post(addr, "/v1/completions", &json!({"prompt": "the", "stop": ["a", "b", "c", "d", "e"]})),
            400,
            "at most 4 stop",
        ),
        (post(addr, "/v1/completions", &json!({"prompt": [5, 100000]})), 400, "vocabulary"),
        (post(addr, "/v1/completions", &json!({"prompt": "", "max_tokens": 5})), 400, "empty"),
        (post(addr, "/v1/completions", &json!({"prompt": "the", "model": "gpt-4"})), 404, "does not exist"),
        (post(addr, "/v1/chat/completions", &json!({"messages": []})), 400, "messages must not be empty"),
        (
            post(
                addr,
                "/v1/chat/completions",
                &json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
            ),
            400,
            "text only",
        ),
        (post(addr, "/v1/nope", &json!({})), 404, "no such endpoint"),
    ];
    for (i, (r, status, msg)) in cases.iter().enumerate() {
        assert_eq!(r.status, *status, "case {i}: {}", r.body);
        let v = r.json();
        let m = v["error"]["message"].as_str().unwrap_or_else(|| panic!("case {i}: no error.message: {}", r.body));
        assert!(m.contains(msg), "case {i}: {m:?} should mention {msg:?}");
        assert!(v["error"]["type"].is_string());
    }
    server.shutdown().unwrap();

    // No queue room at all: 429.
    let server = start_server(&dir, EngineConfig { max_batch: 1, max_queue: 0 }, ServerConfig::default());
    let r = post(server.addr(), "/v1/completions", &json!({"prompt": "the"}));
    assert_eq!(r.status, 429, "{}", r.body);
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("queue is full"));
}

#[test]
fn api_key_and_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_checkpoint(tmp.path());
    let cfg = ServerConfig { api_key: Some("sekrit".into()), ..Default::default() };
    let server = start_server(&dir, EngineConfig::default(), cfg);
    let addr = server.addr();
    let body = json!({"prompt": "the cat", "max_tokens": 5, "temperature": 0}).to_string();
    let r = request(addr, "POST", "/v1/completions", &[], Some(body.as_bytes()));
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    let r = request(addr, "POST", "/v1/completions", &[("Authorization", "Bearer wrong")], Some(body.as_bytes()));
    assert_eq!(r.status, 401);
    assert_eq!(request(addr, "GET", "/v1/models", &[], None).status, 401);
    let auth = [("Authorization", "Bearer sekrit")];
    let ok = request(addr, "POST", "/v1/completions", &auth, Some(body.as_bytes()));
    assert_eq!(ok.status, 200, "{}", ok.body);
    let usage = ok.json()["usage"].clone();
    let bad = json!({"prompt": "the", "temperature": -1}).to_string();
    assert_eq!(request(addr, "POST", "/v1/completions", &auth, Some(bad.as_bytes())).status, 400);
    // Health and metrics need no key.
    assert_eq!(get(addr, "/health").status, 200);
    let m = get(addr, "/metrics");
    assert_eq!(m.status, 200);
    assert!(m.header("content-type").unwrap().starts_with("text/plain"));
    let has = |line: &str| m.body.lines().any(|l| l == line);
    for line in [
        "kiln_requests_total{endpoint=\"/v1/completions\",status=\"401\"} 2".to_string(),
        "kiln_requests_total{endpoint=\"/v1/completions\",status=\"200\"} 1".to_string(),
        "kiln_requests_total{endpoint=\"/v1/completions\",status=\"400\"} 1".to_string(),
        "kiln_requests_total{endpoint=\"/v1/models\",status=\"401\"} 1".to_string(),
        "kiln_requests_total{endpoint=\"/health\",status=\"200\"} 1".to_string(),
        format!("kiln_prompt_tokens_total {}", usage["prompt_tokens"]),
        format!("kiln_generation_tokens_total {}", usage["completion_tokens"]),
        "kiln_request_duration_seconds_count 1".to_string(),
        "kiln_request_duration_seconds_bucket{le=\"+Inf\"} 1".to_string(),
        "kiln_queue_depth 0".to_string(),
    ] {
        assert!(has(&line), "missing {line:?} in\n{}", m.body);
    }
    server.shutdown().unwrap();
}
