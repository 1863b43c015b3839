//! Task evaluation: greedy, batched generation for each prompt of a JSONL file, scored against
//! its references with BLEU, chrF, ROUGE and exact match.

use std::path::Path;

use kiln_data::Tokenizer;
use kiln_model::Gpt;
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

/// Greedy continuation of each prompt, `batch` prompts per forward, until a newline, the end-of-text
/// token or `max_new` tokens. Returns the trimmed continuations. `progress(done, total)`.
pub fn generate_answers(
    model: &mut Gpt,
    k: &dyn Kernels,
    tok: &Tokenizer,
    examples: &[TaskExample],
    max_new: usize,
    batch: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<String>, EvalError> {
    let err = |e: &dyn std::fmt::Display| EvalError::MetricInput(e.to_string());
    let ctx = model.config.block_size;
    let eot = tok.eot_id();
    let mut answers = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(batch.max(1)) {
        let mut rows: Vec<Vec<u32>> = Vec::new();
        for ex in chunk {
            let ids = tok.encode(&ex.prompt).map_err(|e| err(&e))?;
            if ids.is_empty() {
                return Err(EvalError::MetricInput(format!("prompt {:?} encodes to no tokens", ex.prompt)));
            }
            rows.push(ids);
        }
        let starts: Vec<usize> = rows.iter().map(|r| r.len()).collect();
        let mut done = vec![false; rows.len()];
        let mut texts = vec![String::new(); rows.len()];
        for _ in 0..max_new {
            // Right-pad to one length; each row is read at its own last position.
            let windows: Vec<&[u32]> = rows.iter().map(|r| &r[r.len().saturating_sub(ctx)..]).collect();
            let t = windows.iter().map(|w| w.len()).max().expect("non-empty batch");
            let mut flat = vec![0u32; windows.len() * t];
            let mut last = Vec::with_capacity(windows.len());
            for (i, w) in windows.iter().enumerate() {
                flat[i * t..i * t + w.len()].copy_from_slice(w);
                last.push(i * t + w.len() - 1);
            }
            let logits = model.logits_at(k, &flat, windows.len(), t, &last).map_err(|e| err(&e))?;
            let v = model.config.vocab_size;
            for (i, row) in rows.iter_mut().enumerate() {
                if done[i] {
                    continue;
                }
                let l = &logits[i * v..(i + 1) * v];
                let next = l.iter().enumerate().fold(0, |b, (j, &x)| if x > l[b] { j } else { b }) as u32;
                if Some(next) == eot {
                    done[i] = true;
                    continue;
                }
                row.push(next);
                texts[i] = tok.decode(&row[starts[i]..]).map_err(|e| err(&e))?;
                if let Some(p) = texts[i].find('\n') {
                    texts[i].truncate(p);
                    done[i] = true;
                }
            }
            if done.iter().all(|&d| d) {
                break;
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
