//! Task evaluation: the file format, scoring, and cached batched generation against a plain
//! one-sequence-at-a-time recompute.

use kiln_data::Tokenizer;
use kiln_eval::{generate_answers, read_task, score_task, TaskExample};
use kiln_model::{Gpt, GptConfig};
use kiln_tensor::CpuKernels;

fn tokenizer(dir: &std::path::Path) -> Tokenizer {
    let corpus = dir.join("c.txt");
    kiln_data::synthetic::write_corpus(1, 40_000, &corpus).unwrap();
    Tokenizer::train_bpe(&[corpus], 300).unwrap()
}

#[test]
fn task_files_are_checked_line_by_line() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("t.jsonl");
    std::fs::write(
        &p,
        "{\"prompt\": \"a\", \"references\": [\"b\", \"c\"]}\n\n{\"prompt\": \"x\", \"reference\": \"y\"}\n",
    )
    .unwrap();
    let t = read_task(&p).unwrap();
    assert_eq!(t.len(), 2);
    assert_eq!(t[1].references, vec!["y".to_string()]);
    std::fs::write(&p, "{\"prompt\": \"a\", \"references\": [\"b\"]}\n{\"prompt\": \"x\"}\n").unwrap();
    assert!(read_task(&p).unwrap_err().to_string().contains("line 2"));
    std::fs::write(&p, "not json\n").unwrap();
    assert!(read_task(&p).unwrap_err().to_string().contains("line 1"));
}

#[test]
fn exact_match_counts_any_reference() {
    let ex = |r: &[&str]| TaskExample {
        prompt: "p".into(),
        references: r.iter().map(|s| s.to_string()).collect(),
        reference: None,
    };
    let examples = vec![ex(&["a cat", "one cat"]), ex(&["a dog"]), ex(&["a bird"])];
    let preds = vec!["one cat".to_string(), " a dog ".to_string(), "a fish".to_string()];
    let r = score_task(&preds, &examples).unwrap();
    assert!((r.exact_match - 2.0 / 3.0).abs() < 1e-12);
    assert!(r.bleu.score.is_finite() && r.examples == 3);
    assert!(score_task(&preds[..2], &examples).is_err());
}

#[test]
fn cached_batched_generation_equals_recompute() {
    let d = tempfile::tempdir().unwrap();
    let tok = tokenizer(d.path());
    let cfg = GptConfig { n_layer: 2, n_head: 2, n_embd: 32, block_size: 48, vocab_size: tok.vocab_size() };
    let mut m = Gpt::new(cfg, 9).unwrap();
    let k = CpuKernels::default();
    let prompts = ["translate 12 to words:", "the old fox", "a", "translate 4127 to words: four thousand"];
    let examples: Vec<TaskExample> = prompts
        .iter()
        .map(|p| TaskExample { prompt: p.to_string(), references: vec!["x".into()], reference: None })
        .collect();
    let got = generate_answers(&mut m, &k, &tok, &examples, 12, 3, &mut |_, _| {}).unwrap();
    for (p, g) in prompts.iter().zip(&got) {
        // The plain way: recompute the whole sequence for every token, greedy.
        let mut ids = tok.encode(p).unwrap();
        let start = ids.len();
        let mut text = String::new();
        for _ in 0..12 {
            let l = m.last_logits(&k, &ids).unwrap();
            let next = l.iter().enumerate().fold(0, |b, (j, &x)| if x > l[b] { j } else { b }) as u32;
            if Some(next) == tok.eot_id() {
                break;
            }
            ids.push(next);
            text = tok.decode(&ids[start..]).unwrap();
            if let Some(i) = text.find('\n') {
                text.truncate(i);
                break;
            }
        }
        assert_eq!(g, text.trim(), "prompt {p:?}");
    }
}
