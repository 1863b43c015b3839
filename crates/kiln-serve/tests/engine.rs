//! The engine without HTTP: equality with kiln_model::generate, continuous batching, context
//! shift, stop sequences, streaming detokenization.

mod common;

use std::sync::mpsc;

use common::*;
use kiln_data::Tokenizer;
use kiln_model::SamplingParams;
use kiln_serve::text::Detokenizer;
use kiln_serve::{EngineConfig, FinishReason, GenEvent, GenRequest, ServeError};
use rand::SeedableRng;

/// Greedy tokens from kiln_model::generate, up to (not including) EOS.
fn reference(dir: &std::path::Path, prompt: &[u32], max_new: usize) -> (Vec<u32>, bool) {
    let mut model = kiln_model::load_causal_lm(dir).unwrap();
    let eos = kiln_model::read_eos_token_ids(dir);
    let k = kiln_tensor::CpuKernels::default();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut hit_eos = false;
    let ids = kiln_model::generate(&mut *model, &k, prompt, max_new, &SamplingParams::greedy(), &mut rng, &mut |id| {
        hit_eos = eos.contains(&id);
        !hit_eos
    })
    .unwrap();
    let mut out = ids[prompt.len()..].to_vec();
    if hit_eos {
        out.pop();
    }
    (out, hit_eos)
}

#[test]
fn greedy_matches_generate_and_batching_does_not_change_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_checkpoint(tmp.path());
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    // Two slots for five requests: sequences join and leave the batch while others run.
    let engine = start_engine(&dir, EngineConfig { max_batch: 2, max_queue: 16 });
    let prompts = ["the cat", "one two three", "a bird", "the quick brown fox jumps", "dog"];
    let lens = [30, 12, 25, 7, 40];
    let mut rxs = Vec::new();
    for (p, &n) in prompts.iter().zip(&lens) {
        let (tx, rx) = mpsc::channel();
        let req = GenRequest::new(tok.encode(p).unwrap(), n, SamplingParams::greedy());
        engine.submit(req, Box::new(move |ev| tx.send(ev).is_ok())).unwrap();
        rxs.push(rx);
    }
    for ((p, &n), rx) in prompts.iter().zip(&lens).zip(rxs) {
        let events: Vec<GenEvent> = rx.iter().collect();
        let text: String =
            events.iter().filter_map(|e| if let GenEvent::Text(t) = e { Some(t.as_str()) } else { None }).collect();
        let prompt = tok.encode(p).unwrap();
        let (want, hit_eos) = reference(&dir, &prompt, n);
        assert_eq!(text, tok.decode(&want).unwrap(), "prompt {p:?}");
        let Some(GenEvent::Done { reason, usage }) = events.last() else { panic!("no Done: {events:?}") };
        assert_eq!(*reason, if hit_eos { FinishReason::Stop } else { FinishReason::Length });
        assert_eq!(usage.prompt_tokens, prompt.len());
        assert_eq!(usage.completion_tokens, want.len() + hit_eos as usize);
    }
}

#[test]
fn context_shift_matches_generate_and_overflow_is_refused_without_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_checkpoint(tmp.path());
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let engine = start_engine(&dir, EngineConfig::default());
    let prompt = tok.encode("the cat sat on the mat").unwrap();
    let mut req = GenRequest::new(prompt.clone(), 150, SamplingParams::greedy());
    let err = engine.generate(req.clone()).unwrap_err();
    assert!(matches!(err, ServeError::ContextOverflow { context: 64, .. }), "{err}");
    assert!(err.to_string().contains("maximum context length is 64"), "{err}");
    req.context_shift = true;
    let out = engine.generate(req).unwrap();
    let (want, _) = reference(&dir, &prompt, 150);
    assert_eq!(out.text, tok.decode(&want).unwrap());
}

#[test]
fn bad_requests_are_refused_before_queueing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_checkpoint(tmp.path());
    let engine = start_engine(&dir, EngineConfig { max_batch: 1, max_queue: 0 });
    let g = SamplingParams::greedy();
    let cases = [
        (GenRequest::new(vec![], 5, g.clone()), "empty"),
        (GenRequest::new(vec![1, 100_000], 5, g.clone()), "vocabulary"),
        (GenRequest::new(vec![1], 0, g.clone()), "max_tokens"),
        (GenRequest::new(vec![1], 5, SamplingParams { top_p: 2.0, ..g.clone() }), "top_p"),
    ];
    for (req, want) in cases {
        let e = engine.generate(req).unwrap_err();
        assert!(matches!(e, ServeError::Invalid(_)) && e.to_string().contains(want), "{e}");
    }
    // No room in the queue at all.
    assert!(matches!(engine.generate(GenRequest::new(vec![1], 5, g)), Err(ServeError::QueueFull(0))));
}

#[test]
fn stop_sequences_cut_the_text_and_end_generation() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_checkpoint(tmp.path());
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let engine = start_engine(&dir, EngineConfig::default());
    let prompt = tok.encode("the dog").unwrap();
    let full = engine.generate(GenRequest::new(prompt.clone(), 40, SamplingParams::greedy())).unwrap();
    let chars: Vec<char> = full.text.chars().collect();
    assert!(chars.len() >= 12, "need some text to cut: {:?}", full.text);
    // A stop string taken from the middle of the output, likely spanning a token boundary.
    let stop: String = chars[6..9].iter().collect();
    let at = full.text.find(&stop).unwrap();
    let mut req = GenRequest::new(prompt, 40, SamplingParams::greedy());
    req.stop = vec!["never appears \u{1F600}".into(), stop.clone()];
    let cut = engine.generate(req).unwrap();
    assert_eq!(cut.text, full.text[..at], "stop {stop:?}");
    assert_eq!(cut.reason, FinishReason::Stop);
    assert!(cut.usage.completion_tokens < full.usage.completion_tokens);
}

#[test]
fn streaming_detokenization_never_splits_a_character() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_checkpoint(tmp.path());
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    // The corpus has no accents or CJK: these characters are split into byte tokens.
    let text = "the café 日本語 and naïve 🙂 cat";
    let ids = tok.encode(text).unwrap();
    assert!(ids.len() > text.split(' ').count() + 8, "multi-byte characters should take several tokens");
    let mut d = Detokenizer::new();
    let mut out = String::new();
    for &id in &ids {
        let delta = d.push(&tok, id);
        assert!(!delta.contains('\u{FFFD}'), "half a character emitted: {delta:?}");
        out += &delta;
    }
    out += &d.flush(&tok);
    assert_eq!(out, text);
}

#[test]
fn tokenizer_config_bos_and_eos_are_honoured() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_checkpoint(tmp.path());
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let eot = tok.eot_id().unwrap();
    // Llama-style: a BOS token first in every prompt, given by its text.
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"bos_token": {"content": "<|endoftext|>"}, "eos_token": "<|endoftext|>", "add_bos_token": true}"#,
    )
    .unwrap();
    let (_, info) = kiln_serve::load_model(&dir).unwrap();
    let ids = info.encode_prompt("the cat").unwrap();
    assert_eq!(ids[0], eot);
    assert_eq!(&ids[1..], tok.encode("the cat").unwrap().as_slice());
    // Already there: not doubled.
    assert_eq!(info.encode_prompt("<|endoftext|>the cat").unwrap(), ids);
    assert!(info.eos_ids.contains(&eot));
    // No chat_template: the plain one, with its turn labels as stops.
    let chat = info.encode_chat(&[kiln_serve::ChatMessage { role: "user".into(), content: "hi".into() }]).unwrap();
    assert_eq!(tok.decode(&chat).unwrap(), "<|endoftext|>User: hi\nAssistant:");
    assert_eq!(info.chat_stops(), vec!["\nUser:".to_string(), "\nSystem:".to_string()]);
}

#[test]
fn a_client_that_goes_away_frees_its_slot() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_checkpoint(tmp.path());
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let engine = start_engine(&dir, EngineConfig { max_batch: 1, max_queue: 4 });
    let mut prompt_ids = tok.encode("the cat").unwrap();
    prompt_ids.truncate(2);
    // The sink refuses its first event, as a dropped connection does.
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = calls.clone();
    let req = GenRequest::new(prompt_ids.clone(), 50, SamplingParams::greedy());
    engine.submit(req, Box::new(move |_| c.fetch_add(1, std::sync::atomic::Ordering::SeqCst) > 100)).unwrap();
    // The next request gets the only slot and finishes normally.
    let out = engine.generate(GenRequest::new(prompt_ids, 5, SamplingParams::greedy())).unwrap();
    assert!(out.usage.completion_tokens >= 1);
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1, "no events after the sink said stop");
}
