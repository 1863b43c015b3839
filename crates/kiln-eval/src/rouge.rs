//! ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum, computed exactly as Google's `rouge-score` package
//! (`rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=...)`).
//!
//! What is reproduced (rouge-score 0.1.2):
//! - tokenizer: lowercase, every run of characters other than `[a-z0-9]` is a separator; with
//!   the stemmer, tokens longer than 3 characters are stemmed with NLTK's Porter stemmer (its
//!   default `NLTK_EXTENSIONS` mode, which is what rouge-score uses);
//! - ROUGE-N: clipped n-gram overlap; precision = overlap / max(prediction n-grams, 1), recall =
//!   overlap / max(target n-grams, 1); F = 2PR / (P + R), or 0;
//! - ROUGE-L: longest common subsequence over the whole text;
//! - ROUGE-Lsum: the texts are split on `"\n"` into sentences (empty ones dropped) and scored with
//!   the summary-level union LCS of the ROUGE paper, using the same LCS back-tracking as
//!   rouge-score so that ties pick the same tokens;
//! - several targets: like `RougeScorer.score_multi`, each type keeps the target with the best
//!   F-measure (the first one on a tie).
//!
//! Aggregation over a corpus ([`corpus_rouge`]) reports the mean of each value over the examples
//! (what users compute from rouge-score's per-example scores), and optionally bootstrap
//! confidence intervals like rouge-score's `scoring.BootstrapAggregator`: `n_samples` resamples of
//! the examples with replacement, the mean of each, and the 2.5th, 50th and 97.5th percentiles
//! (linear interpolation, as `np.percentile`) of those means as `low`, `mid` and `high`. The
//! resampling uses kiln's own seeded generator (SplitMix64), not NumPy's global RNG, so
//! intervals are reproducible for a given seed but are not the numbers Python would print; and
//! like rouge-score's, `mid` is the median of the bootstrap means, close to but not exactly the
//! mean.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::porter;
use crate::pytext::py_lower;
use crate::EvalError;

/// The rouge-score release whose behaviour this module reproduces (checked with
/// `tools/metrics/compare_metrics.py`, with nltk 3.10's Porter stemmer).
pub const ROUGE_SCORE_VERSION: &str = "0.1.2";

/// Precision, recall and F-measure (rouge-score's `Score`), each in 0..=1.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Score {
    pub precision: f64,
    pub recall: f64,
    pub fmeasure: f64,
}

impl Score {
    const ZERO: Score = Score { precision: 0.0, recall: 0.0, fmeasure: 0.0 };

    fn new(precision: f64, recall: f64) -> Score {
        Score { precision, recall, fmeasure: fmeasure(precision, recall) }
    }
}

/// rouge-score's `scoring.fmeasure`.
fn fmeasure(precision: f64, recall: f64) -> f64 {
    if precision + recall > 0.0 {
        2.0 * precision * recall / (precision + recall)
    } else {
        0.0
    }
}

/// The ROUGE variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RougeType {
    #[serde(rename = "rouge1")]
    Rouge1,
    #[serde(rename = "rouge2")]
    Rouge2,
    #[serde(rename = "rougeL")]
    RougeL,
    #[serde(rename = "rougeLsum")]
    RougeLsum,
}

impl RougeType {
    /// All four types.
    pub const ALL: [RougeType; 4] = [RougeType::Rouge1, RougeType::Rouge2, RougeType::RougeL, RougeType::RougeLsum];

    /// rouge-score's name: `rouge1`, `rouge2`, `rougeL`, `rougeLsum`.
    pub fn name(self) -> &'static str {
        match self {
            RougeType::Rouge1 => "rouge1",
            RougeType::Rouge2 => "rouge2",
            RougeType::RougeL => "rougeL",
            RougeType::RougeLsum => "rougeLsum",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl std::str::FromStr for RougeType {
    type Err = EvalError;

    fn from_str(s: &str) -> Result<Self, EvalError> {
        RougeType::ALL.into_iter().find(|t| t.name() == s).ok_or_else(|| EvalError::UnknownOption {
            kind: "ROUGE type",
            value: s.to_string(),
            expected: "rouge1, rouge2, rougeL, rougeLsum",
        })
    }
}

/// Per-example scores; a type that was not asked for is `None`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct RougeScores {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rouge1: Option<Score>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rouge2: Option<Score>,
    #[serde(rename = "rougeL", skip_serializing_if = "Option::is_none")]
    pub rouge_l: Option<Score>,
    #[serde(rename = "rougeLsum", skip_serializing_if = "Option::is_none")]
    pub rouge_lsum: Option<Score>,
}

impl RougeScores {
    /// The score of one type, if it was computed.
    pub fn get(&self, t: RougeType) -> Option<Score> {
        match t {
            RougeType::Rouge1 => self.rouge1,
            RougeType::Rouge2 => self.rouge2,
            RougeType::RougeL => self.rouge_l,
            RougeType::RougeLsum => self.rouge_lsum,
        }
    }

    fn set(&mut self, t: RougeType, s: Score) {
        match t {
            RougeType::Rouge1 => self.rouge1 = Some(s),
            RougeType::Rouge2 => self.rouge2 = Some(s),
            RougeType::RougeL => self.rouge_l = Some(s),
            RougeType::RougeLsum => self.rouge_lsum = Some(s),
        }
    }
}

/// rouge-score's default tokenizer: lowercase, split on everything but `[a-z0-9]`, and
/// optionally Porter-stem tokens longer than 3 characters.
pub fn tokenize(text: &str, use_stemmer: bool) -> Vec<String> {
    let lower = py_lower(text);
    lower
        .split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit()))
        .filter(|t| !t.is_empty())
        .map(|t| if use_stemmer && t.len() > 3 { porter::stem(t) } else { t.to_string() })
        .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()))
        .collect()
}

/// A text tokenized once for every ROUGE type: whole-text tokens and, for ROUGE-Lsum, the tokens
/// of each non-empty `"\n"`-separated sentence.
struct Tokenized {
    tokens: Vec<String>,
    sentences: Vec<Vec<String>>,
}

impl Tokenized {
    fn new(text: &str, use_stemmer: bool, need_sentences: bool) -> Self {
        let sentences = if need_sentences {
            text.split('\n').filter(|s| !s.is_empty()).map(|s| tokenize(s, use_stemmer)).collect()
        } else {
            Vec::new()
        };
        Tokenized { tokens: tokenize(text, use_stemmer), sentences }
    }
}

/// ROUGE scores of `prediction` against one `target`, as `RougeScorer(types, use_stemmer)
/// .score(target, prediction)`.
pub fn score(target: &str, prediction: &str, types: &[RougeType], use_stemmer: bool) -> RougeScores {
    score_multi(&[target], prediction, types, use_stemmer)
}

/// ROUGE scores of `prediction` against several targets, as `RougeScorer.score_multi`: for each
/// type, the target with the highest F-measure (the first on a tie). With no target, every
/// requested type scores 0.
pub fn score_multi(targets: &[&str], prediction: &str, types: &[RougeType], use_stemmer: bool) -> RougeScores {
    let lsum = types.contains(&RougeType::RougeLsum);
    let pred = Tokenized::new(prediction, use_stemmer, lsum);
    let targets: Vec<Tokenized> = targets.iter().map(|t| Tokenized::new(t, use_stemmer, lsum)).collect();
    score_tokenized(&targets, &pred, types)
}

fn score_tokenized(targets: &[Tokenized], pred: &Tokenized, types: &[RougeType]) -> RougeScores {
    let mut out = RougeScores::default();
    for &t in types {
        let mut best: Option<Score> = None;
        for target in targets {
            let s = match t {
                RougeType::Rouge1 => score_ngrams(&target.tokens, &pred.tokens, 1),
                RougeType::Rouge2 => score_ngrams(&target.tokens, &pred.tokens, 2),
                RougeType::RougeL => score_lcs(&target.tokens, &pred.tokens),
                RougeType::RougeLsum => summary_level_lcs(&target.sentences, &pred.sentences),
            };
            // np.argmax: the first maximum wins.
            if best.is_none_or(|b| s.fmeasure > b.fmeasure) {
                best = Some(s);
            }
        }
        out.set(t, best.unwrap_or(Score::ZERO));
    }
    out
}

fn ngram_counts(tokens: &[String], n: usize) -> HashMap<&[String], u64> {
    let mut map = HashMap::new();
    for g in tokens.windows(n) {
        *map.entry(g).or_insert(0) += 1;
    }
    map
}

/// rouge-score's `_score_ngrams`.
fn score_ngrams(target: &[String], prediction: &[String], n: usize) -> Score {
    let t = ngram_counts(target, n);
    let p = ngram_counts(prediction, n);
    let overlap: u64 = t.iter().map(|(g, &c)| c.min(p.get(g).copied().unwrap_or(0))).sum();
    let t_count: u64 = t.values().sum();
    let p_count: u64 = p.values().sum();
    Score::new(overlap as f64 / p_count.max(1) as f64, overlap as f64 / t_count.max(1) as f64)
}

/// The `(len(a) + 1) x (len(b) + 1)` LCS table, row-major.
fn lcs_table(a: &[String], b: &[String]) -> Vec<u32> {
    let cols = b.len() + 1;
    let mut t = vec![0u32; (a.len() + 1) * cols];
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            t[i * cols + j] = if a[i - 1] == b[j - 1] {
                t[(i - 1) * cols + j - 1] + 1
            } else {
                t[(i - 1) * cols + j].max(t[i * cols + j - 1])
            };
        }
    }
    t
}

/// rouge-score's `_score_lcs` (ROUGE-L).
fn score_lcs(target: &[String], prediction: &[String]) -> Score {
    if target.is_empty() || prediction.is_empty() {
        return Score::ZERO;
    }
    let lcs = f64::from(lcs_length(target, prediction));
    Score::new(lcs / prediction.len() as f64, lcs / target.len() as f64)
}

/// The LCS length with two rows of the table (same recurrence as [`lcs_table`], O(len(b)) memory).
fn lcs_length(a: &[String], b: &[String]) -> u32 {
    let mut prev = vec![0u32; b.len() + 1];
    let mut cur = vec![0u32; b.len() + 1];
    for x in a {
        for j in 1..=b.len() {
            cur[j] = if *x == b[j - 1] { prev[j - 1] + 1 } else { prev[j].max(cur[j - 1]) };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// rouge-score's `lcs_ind` + `_backtrack_norec`: the indices into `r` of one LCS of `r` and `c`,
/// chosen by the same back-tracking rule.
fn lcs_indices(r: &[String], c: &[String]) -> Vec<usize> {
    let t = lcs_table(r, c);
    let cols = c.len() + 1;
    let (mut i, mut j) = (r.len(), c.len());
    let mut out = Vec::new();
    while i > 0 && j > 0 {
        if r[i - 1] == c[j - 1] {
            out.push(i - 1);
            i -= 1;
            j -= 1;
        } else if t[i * cols + j - 1] > t[(i - 1) * cols + j] {
            j -= 1;
        } else {
            i -= 1;
        }
    }
    out.reverse();
    out
}

/// rouge-score's `_summary_level_lcs` (ROUGE-Lsum): union LCS of each target sentence with all
/// prediction sentences, with hits clipped by token counts.
fn summary_level_lcs(ref_sents: &[Vec<String>], can_sents: &[Vec<String>]) -> Score {
    if ref_sents.is_empty() || can_sents.is_empty() {
        return Score::ZERO;
    }
    let m: usize = ref_sents.iter().map(Vec::len).sum();
    let n: usize = can_sents.iter().map(Vec::len).sum();
    if m == 0 || n == 0 {
        return Score::ZERO;
    }
    let mut cnt_r: HashMap<&str, u64> = HashMap::new();
    let mut cnt_c: HashMap<&str, u64> = HashMap::new();
    for tok in ref_sents.iter().flatten() {
        *cnt_r.entry(tok).or_insert(0) += 1;
    }
    for tok in can_sents.iter().flatten() {
        *cnt_c.entry(tok).or_insert(0) += 1;
    }
    let mut hits = 0u64;
    for r in ref_sents {
        let mut union: Vec<usize> = can_sents.iter().flat_map(|c| lcs_indices(r, c)).collect();
        union.sort_unstable();
        union.dedup();
        for idx in union {
            let tok = r[idx].as_str();
            let (Some(cc), Some(rc)) = (cnt_c.get(tok).copied(), cnt_r.get(tok).copied()) else { continue };
            if cc > 0 && rc > 0 {
                hits += 1;
                cnt_c.insert(tok, cc - 1);
                cnt_r.insert(tok, rc - 1);
            }
        }
    }
    Score::new(hits as f64 / n as f64, hits as f64 / m as f64)
}

/// One ROUGE type aggregated over a corpus.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct RougeAggregate {
    /// Mean precision over the examples.
    pub precision: f64,
    /// Mean recall over the examples.
    pub recall: f64,
    /// Mean F-measure over the examples.
    pub fmeasure: f64,
    /// Bootstrap 2.5th percentile of the resampled means (with bootstrap only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub low: Option<Score>,
    /// Bootstrap median of the resampled means: rouge-score's `mid` (with bootstrap only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mid: Option<Score>,
    /// Bootstrap 97.5th percentile of the resampled means (with bootstrap only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub high: Option<Score>,
}

/// Bootstrap settings, echoed in the report.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BootstrapInfo {
    pub n_samples: usize,
    pub seed: u64,
    /// Confidence level of `low`..`high` (0.95).
    pub confidence: f64,
}

/// ROUGE over a corpus: per type, means over the examples and optional bootstrap intervals.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RougeReport {
    pub rouge1: RougeAggregate,
    pub rouge2: RougeAggregate,
    #[serde(rename = "rougeL")]
    pub rouge_l: RougeAggregate,
    #[serde(rename = "rougeLsum")]
    pub rouge_lsum: RougeAggregate,
    /// Number of examples (predictions).
    pub n_examples: usize,
    pub use_stemmer: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bootstrap: Option<BootstrapInfo>,
}

impl RougeReport {
    /// The aggregate of one type.
    pub fn get(&self, t: RougeType) -> &RougeAggregate {
        match t {
            RougeType::Rouge1 => &self.rouge1,
            RougeType::Rouge2 => &self.rouge2,
            RougeType::RougeL => &self.rouge_l,
            RougeType::RougeLsum => &self.rouge_lsum,
        }
    }
}

/// Confidence level of the bootstrap intervals (rouge-score's default).
pub const BOOTSTRAP_CONFIDENCE: f64 = 0.95;

/// ROUGE-1/2/L/Lsum over a corpus.
///
/// `refs[k][i]` is the `k`-th reference (target) of the `i`-th prediction: one inner vector per
/// reference stream, the same layout as [`crate::corpus_bleu`]. With several streams, each example
/// is scored like `score_multi` (best F-measure per type). `bootstrap = Some((n_samples, seed))`
/// adds bootstrap confidence intervals (see the module documentation).
pub fn corpus_rouge(
    preds: &[String],
    refs: &[Vec<String>],
    use_stemmer: bool,
    bootstrap: Option<(usize, u64)>,
) -> Result<RougeReport, EvalError> {
    let n = crate::bleu::check_corpus("ROUGE", preds, refs)?;
    if let Some((0, _)) = bootstrap {
        return Err(EvalError::InvalidOption("the number of bootstrap samples must be positive".into()));
    }
    // per_type[t][i]: the score of example i for type t.
    let mut per_type: Vec<Vec<Score>> = vec![Vec::with_capacity(n); RougeType::ALL.len()];
    for i in 0..n {
        let pred = Tokenized::new(&preds[i], use_stemmer, true);
        let targets: Vec<Tokenized> = refs.iter().map(|s| Tokenized::new(&s[i], use_stemmer, true)).collect();
        let scores = score_tokenized(&targets, &pred, &RougeType::ALL);
        for t in RougeType::ALL {
            per_type[t.index()].push(scores.get(t).unwrap_or_default());
        }
    }

    let mut rng = bootstrap.map(|(_, seed)| SplitMix64(seed));
    let mut aggs = [RougeAggregate::default(); 4];
    for t in RougeType::ALL {
        let scores = &per_type[t.index()];
        let mean = mean_score(scores.iter());
        let mut agg = RougeAggregate {
            precision: mean.precision,
            recall: mean.recall,
            fmeasure: mean.fmeasure,
            ..Default::default()
        };
        if let (Some((n_samples, _)), Some(rng)) = (bootstrap, rng.as_mut()) {
            let [low, mid, high] = bootstrap_percentiles(scores, n_samples, rng);
            agg.low = Some(low);
            agg.mid = Some(mid);
            agg.high = Some(high);
        }
        aggs[t.index()] = agg;
    }
    Ok(RougeReport {
        rouge1: aggs[0],
        rouge2: aggs[1],
        rouge_l: aggs[2],
        rouge_lsum: aggs[3],
        n_examples: n,
        use_stemmer,
        bootstrap: bootstrap.map(|(n_samples, seed)| BootstrapInfo {
            n_samples,
            seed,
            confidence: BOOTSTRAP_CONFIDENCE,
        }),
    })
}

fn mean_score<'a>(scores: impl ExactSizeIterator<Item = &'a Score>) -> Score {
    let n = scores.len().max(1) as f64;
    let mut sum = Score::ZERO;
    for s in scores {
        sum.precision += s.precision;
        sum.recall += s.recall;
        sum.fmeasure += s.fmeasure;
    }
    Score { precision: sum.precision / n, recall: sum.recall / n, fmeasure: sum.fmeasure / n }
}

/// The low / mid / high percentiles of `n_samples` bootstrap means of `scores`, per field.
fn bootstrap_percentiles(scores: &[Score], n_samples: usize, rng: &mut SplitMix64) -> [Score; 3] {
    let n = scores.len();
    let mut means: Vec<Score> = Vec::with_capacity(n_samples);
    for _ in 0..n_samples {
        let sample: Vec<&Score> = (0..n).map(|_| &scores[rng.below(n)]).collect();
        means.push(mean_score(sample.into_iter()));
    }
    let delta = (1.0 - BOOTSTRAP_CONFIDENCE) / 2.0;
    let qs = [delta, 0.5, 1.0 - delta];
    let field = |f: fn(&Score) -> f64| -> [f64; 3] {
        let mut v: Vec<f64> = means.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        qs.map(|q| percentile(&v, q))
    };
    let p = field(|s| s.precision);
    let r = field(|s| s.recall);
    let f = field(|s| s.fmeasure);
    [0, 1, 2].map(|k| Score { precision: p[k], recall: r[k], fmeasure: f[k] })
}

/// `np.percentile(sorted, 100 * q)` with the default linear interpolation.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let n = sorted.len();
    if n == 0 {
        return 0.0;
    }
    let h = (n - 1) as f64 * q;
    let lo = (h.floor() as usize).min(n - 1);
    let hi = (lo + 1).min(n - 1);
    let t = h - lo as f64;
    sorted[lo] + (sorted[hi] - sorted[lo]) * t
}

/// SplitMix64: a small, fast, seedable generator; good enough for bootstrap resampling and stable
/// across platforms and releases.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform index in `0..n` (`n > 0`), by widening multiplication (bias below 2^-40 for any
    /// corpus that fits in memory).
    fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn tokenizer() {
        assert_eq!(tokenize("The quick-brown FOX, 2x!", false), ["the", "quick", "brown", "fox", "2x"]);
        assert_eq!(tokenize("Jumps running ran", true), ["jump", "run", "ran"]);
        assert!(tokenize("  ... ¿¡ ", false).is_empty());
    }

    #[test]
    fn backtrack_prefers_moving_up_on_ties() {
        // rouge-score's _backtrack_norec moves i (the reference) on ties.
        assert_eq!(lcs_indices(&toks("a b"), &toks("b a")), vec![0]);
    }

    #[test]
    fn percentile_is_numpy_linear() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 0.5), 2.5);
        assert!((percentile(&v, 0.025) - 1.075).abs() < 1e-12);
        assert_eq!(percentile(&v, 1.0), 4.0);
    }
}
