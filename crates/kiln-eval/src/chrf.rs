//! Corpus chrF and chrF++, computed exactly as sacrebleu's `CHRF()` / `CHRF(word_order=2)`.
//!
//! What is reproduced (see `sacrebleu/metrics/chrf.py`, defaults of sacrebleu 2.x):
//! - character n-grams of order 1..=6 over the segment with all whitespace removed;
//! - for chrF++, word n-grams of order 1..=`word_order` over the whitespace-split words, where a
//!   word of two or more characters that ends (else starts) with an ASCII punctuation mark is
//!   split into the word and the mark (so `(hi)` becomes `(hi` and `)`, as sacrebleu does);
//! - with several references, each segment keeps the statistics of the reference with the best
//!   segment-level chrF (the first one on a tie);
//! - statistics are summed over the corpus; the score is the F-beta (beta = 2) of the precision
//!   and recall averaged over the orders that have both hypothesis and reference n-grams
//!   (sacrebleu's default "effective order" mode, `eff:yes`), on a 0..100 scale.

use std::collections::HashMap;
use std::hash::Hash;

use serde::{Deserialize, Serialize};

use crate::bleu::{check_corpus, SACREBLEU_VERSION};
use crate::pytext::py_split;
use crate::EvalError;

/// Character n-gram order (sacrebleu's `CHRF.CHAR_ORDER`).
pub const CHRF_CHAR_ORDER: usize = 6;
/// Recall weight (sacrebleu's `CHRF.BETA`).
pub const CHRF_BETA: u32 = 2;
/// The largest word n-gram order [`corpus_chrf`] accepts (chrF++ uses 2).
pub const CHRF_MAX_WORD_ORDER: usize = 16;

/// A corpus chrF / chrF++ score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChrfScore {
    /// sacrebleu's name for the metric: `chrF2` or `chrF2++` (one `+` per word order).
    pub name: String,
    /// The score on a 0..100 scale.
    pub score: f64,
    /// sacrebleu's reproducibility signature, e.g.
    /// `nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:2.6.0`.
    pub signature: String,
}

/// Corpus chrF (`word_order` = 0) or chrF++ (`word_order` = 2), exactly as sacrebleu's
/// `CHRF(word_order=word_order).corpus_score(hyps, refs)`.
///
/// `refs[k][i]` is the `k`-th reference of the `i`-th segment (one inner vector per reference
/// stream, as in sacrebleu).
pub fn corpus_chrf(hyps: &[String], refs: &[Vec<String>], word_order: usize) -> Result<ChrfScore, EvalError> {
    let n = check_corpus("chrF", hyps, refs)?;
    if word_order > CHRF_MAX_WORD_ORDER {
        return Err(EvalError::InvalidOption(format!(
            "chrF word n-gram order must be at most {CHRF_MAX_WORD_ORDER}, got {word_order}"
        )));
    }
    let order = CHRF_CHAR_ORDER + word_order;
    let mut corpus = vec![0u64; 3 * order];
    for i in 0..n {
        let hyp = SegmentNgrams::new(&hyps[i], word_order);
        let mut best_f = -1.0;
        let mut best_stats = Vec::new();
        for stream in refs {
            let r = SegmentNgrams::new(&stream[i], word_order);
            let stats = hyp.match_statistics(&r);
            let f = f_score(&stats, order);
            if f > best_f {
                best_f = f;
                best_stats = stats;
            }
        }
        for (acc, s) in corpus.iter_mut().zip(&best_stats) {
            *acc += s;
        }
    }
    let score = f_score(&corpus, order);
    Ok(ChrfScore {
        name: format!("chrF{CHRF_BETA}{}", "+".repeat(word_order)),
        score,
        signature: format!(
            "nrefs:{}|case:mixed|eff:yes|nc:{CHRF_CHAR_ORDER}|nw:{word_order}|space:no|version:{SACREBLEU_VERSION}",
            refs.len()
        ),
    })
}

/// The character and word n-gram counts of one segment.
struct SegmentNgrams {
    /// `chars[n - 1]`: counts of character n-grams, keyed by the n-gram's characters.
    chars: Vec<HashMap<Vec<char>, u64>>,
    /// `words[n - 1]`: counts of word n-grams.
    words: Vec<HashMap<Vec<String>, u64>>,
}

impl SegmentNgrams {
    fn new(segment: &str, word_order: usize) -> Self {
        let stripped: Vec<char> = py_split(segment).flat_map(str::chars).collect();
        let chars = (1..=CHRF_CHAR_ORDER).map(|n| count(stripped.windows(n).map(<[char]>::to_vec))).collect();
        let words = if word_order > 0 {
            let toks = split_punctuation(segment);
            (1..=word_order)
                .map(|n| count(toks.windows(n).map(|w| w.iter().map(|s| s.to_string()).collect())))
                .collect()
        } else {
            Vec::new()
        };
        SegmentNgrams { chars, words }
    }

    /// The `[hyp, ref, match]` counts per order (characters first, then words), for `self` as the
    /// hypothesis against `reference`.
    fn match_statistics(&self, reference: &SegmentNgrams) -> Vec<u64> {
        let mut stats = Vec::with_capacity(3 * (self.chars.len() + self.words.len()));
        for (h, r) in self.chars.iter().zip(&reference.chars) {
            stats.extend(match_stats(h, r));
        }
        for (h, r) in self.words.iter().zip(&reference.words) {
            stats.extend(match_stats(h, r));
        }
        stats
    }
}

fn count<K: Hash + Eq>(items: impl Iterator<Item = K>) -> HashMap<K, u64> {
    let mut map = HashMap::new();
    for k in items {
        *map.entry(k).or_insert(0) += 1;
    }
    map
}

/// sacrebleu's `_get_match_statistics`: hypothesis n-grams (0 when the reference has none),
/// reference n-grams and clipped matches.
fn match_stats<K: Hash + Eq>(hyp: &HashMap<K, u64>, reference: &HashMap<K, u64>) -> [u64; 3] {
    let mut matches = 0;
    let mut hyp_count = 0;
    for (g, &c) in hyp {
        hyp_count += c;
        if let Some(&rc) = reference.get(g) {
            matches += c.min(rc);
        }
    }
    [if reference.is_empty() { 0 } else { hyp_count }, reference.values().sum(), matches]
}

/// ASCII punctuation (Python's `string.punctuation`).
fn is_punct(c: char) -> bool {
    c.is_ascii_punctuation()
}

/// sacrebleu's `CHRF._remove_punctuation`: whitespace-split words, with one trailing (else
/// leading) punctuation mark split off words of two or more characters.
fn split_punctuation(segment: &str) -> Vec<&str> {
    let mut out = Vec::new();
    for w in py_split(segment) {
        let mut chars = w.char_indices();
        let Some((_, first)) = chars.next() else { continue };
        let Some((last_at, last)) = chars.next_back() else {
            out.push(w); // a single character
            continue;
        };
        if is_punct(last) {
            out.push(&w[..last_at]);
            out.push(&w[last_at..]);
        } else if is_punct(first) {
            let split = first.len_utf8();
            out.push(&w[..split]);
            out.push(&w[split..]);
        } else {
            out.push(w);
        }
    }
    out
}

/// sacrebleu's `CHRF._compute_f_score` in its default mode (effective order, no epsilon
/// smoothing), with the same floating-point operations in the same order.
fn f_score(stats: &[u64], order: usize) -> f64 {
    let factor = f64::from(CHRF_BETA * CHRF_BETA);
    let mut avg_prec = 0.0f64;
    let mut avg_rec = 0.0f64;
    let mut effective_order = 0u32;
    for i in 0..order {
        let (n_hyp, n_ref, n_match) = (stats[3 * i], stats[3 * i + 1], stats[3 * i + 2]);
        if n_hyp > 0 && n_ref > 0 {
            avg_prec += n_match as f64 / n_hyp as f64;
            avg_rec += n_match as f64 / n_ref as f64;
            effective_order += 1;
        }
    }
    if effective_order == 0 {
        avg_prec = 0.0;
        avg_rec = 0.0;
    } else {
        avg_prec /= f64::from(effective_order);
        avg_rec /= f64::from(effective_order);
    }
    if avg_prec + avg_rec != 0.0 {
        let mut score = (1.0 + factor) * avg_prec * avg_rec;
        score /= factor * avg_prec + avg_rec;
        100.0 * score
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn punctuation_split_matches_sacrebleu() {
        assert_eq!(
            split_punctuation("(hi) x, ,y . \"ok\" é."),
            ["(hi", ")", "x", ",", ",", "y", ".", "\"ok", "\"", "é", "."]
        );
    }
}
