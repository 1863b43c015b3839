//! Task evaluation: greedy, batched generation for each prompt of a JSONL file, scored against
//! its references with BLEU, chrF, ROUGE and exact match.

use std::path::Path;

use kiln_data::Tokenizer;
use kiln_model::CausalLm;
use kiln_tensor::Kernels;
use serde::{Deserialize, Serialize};

use crate::{corpus_bleu, corpus_chrf, corpus_rouge, BleuOptions, BleuScore, ChrfScore, EvalError, RougeReport};

/// One line of a task file: `{"prompt": "...", "references": ["...", ...]}` (or `"reference"`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TaskExample {
    pub prompt: String,
    #[serde(default)]
    pub references: Vec<String>,
    #[serde(default, skip_serializing)]
    pub reference: Option<String>,
}

pub fn read_task(path: &Path) -> Result<Vec<TaskExample>, EvalError> {
    let text = std::fs::read_to_string(path).map_err(|e| EvalError::Io {
        action: "cannot read task file",
        path: path.to_path_buf(),
        source: e,
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad = |m: String| EvalError::MetricsLine { path: path.to_path_buf(), line: i + 1, message: m };
        let mut ex: TaskExample = serde_json::from_str(line).map_err(|e| bad(format!("invalid task line: {e}")))?;
        if let Some(r) = ex.reference.take() {
            ex.references.push(r);
        }
        if ex.references.is_empty() {
            return Err(bad("no \"references\" (or \"reference\") given".into()));
        }
        out.push(ex);
    }
    if out.is_empty() {
        return Err(EvalError::MetricInput(format!("{}: the task file holds no examples", path.display())));
    }
    Ok(out)
}

/// Greedy continuation of each prompt, `batch` prompts decoded together with a KV cache, until
/// a newline, the end-of-text token, `max_new` tokens or the model's context. Returns the trimmed
/// continuations. `progress(done, total)`.
pub fn generate_answers(
    model: &mut dyn CausalLm,
    k: &dyn Kernels,
    tok: &Tokenizer,
    examples: &[TaskExample],
    max_new: usize,
    batch: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<String>, EvalError> {
    let err = |e: &dyn std::fmt::Display| EvalError::MetricInput(e.to_string());
    let (cap, v) = (model.context_len(), model.vocab_size());
    let eot = tok.eot_id();
    let argmax = |l: &[f32]| l.iter().enumerate().fold(0, |b, (j, &x)| if x > l[b] { j } else { b }) as u32;
    let mut answers = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(batch.max(1)) {
        let mut cache = model.new_cache(chunk.len());
        let mut next = Vec::with_capacity(chunk.len());
        for (s, ex) in chunk.iter().enumerate() {
            let ids = tok.encode(&ex.prompt).map_err(|e| err(&e))?;
            if ids.is_empty() {
                return Err(EvalError::MetricInput(format!("prompt {:?} encodes to no tokens", ex.prompt)));
            }
            // Keep room for the answer: at most cap − max_new prompt tokens (at least half the context).
            let keep = cap.saturating_sub(max_new).max(cap / 2);
            let logits =
                model.prefill(k, &mut cache, s, &ids[ids.len().saturating_sub(keep)..]).map_err(|e| err(&e))?;
            next.push(argmax(&logits));
        }
        let mut gen: Vec<Vec<u32>> = vec![Vec::new(); chunk.len()];
        let mut texts = vec![String::new(); chunk.len()];
        let mut done = vec![false; chunk.len()];
        for _ in 0..max_new {
            let mut active = Vec::new();
            for s in 0..chunk.len() {
                if done[s] {
                    continue;
                }
                if Some(next[s]) == eot {
                    done[s] = true;
                    continue;
                }
                gen[s].push(next[s]);
                texts[s] = tok.decode(&gen[s]).map_err(|e| err(&e))?;
                if let Some(p) = texts[s].find('\n') {
                    texts[s].truncate(p);
                    done[s] = true;
                } else if cache.lens[s] >= cap {
                    done[s] = true;
                } else {
                    active.push(s);
                }
            }
            if active.is_empty() {
                break;
            }
            let toks: Vec<u32> = active.iter().map(|&s| next[s]).collect();
            let logits = model.decode(k, &mut cache, &active, &toks).map_err(|e| err(&e))?;
            for (i, &s) in active.iter().enumerate() {
                next[s] = argmax(&logits[i * v..(i + 1) * v]);
            }
        }
        answers.extend(texts.into_iter().map(|s| s.trim().to_string()));
        progress(answers.len(), examples.len());
    }
    Ok(answers)
}

#[derive(Clone, Debug, Serialize)]
pub struct TaskReport {
    pub examples: usize,
    pub bleu: BleuScore,
    pub chrf: ChrfScore,
    pub rouge: RougeReport,
    /// Fraction of predictions equal to one of their references (after trimming).
    pub exact_match: f64,
}

/// Scores predictions against the examples' references (as many reference streams as the
/// example with the most references; shorter lists repeat their first reference).
pub fn score_task(preds: &[String], examples: &[TaskExample]) -> Result<TaskReport, EvalError> {
    if preds.len() != examples.len() {
        return Err(EvalError::MetricInput(format!("{} predictions for {} examples", preds.len(), examples.len())));
    }
    let streams = examples.iter().map(|e| e.references.len()).max().unwrap_or(1);
    let refs: Vec<Vec<String>> = (0..streams)
        .map(|s| examples.iter().map(|e| e.references.get(s).unwrap_or(&e.references[0]).clone()).collect())
        .collect();
    let exact = preds.iter().zip(examples).filter(|(p, e)| e.references.iter().any(|r| r.trim() == p.trim())).count();
    Ok(TaskReport {
        examples: preds.len(),
        bleu: corpus_bleu(preds, &refs, &BleuOptions::default())?,
        chrf: corpus_chrf(preds, &refs, 0)?,
        rouge: corpus_rouge(preds, &refs, false, None)?,
        exact_match: exact as f64 / preds.len().max(1) as f64,
    })
}
