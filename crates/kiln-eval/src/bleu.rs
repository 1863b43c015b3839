//! Corpus BLEU, computed exactly as sacrebleu's `BLEU()` (sacrebleu 2.x) computes it.
//!
//! What is reproduced, step by step (see `sacrebleu/metrics/bleu.py`):
//! - each segment is optionally lowercased (Python `str.lower()`), right-stripped of whitespace
//!   and tokenized with one of sacrebleu's tokenizers (`13a` by default, `none`, `intl`, `char`,
//!   `zh`), then split on whitespace;
//! - n-grams of order 1..=4; for several references, the reference n-gram counts are the maximum
//!   over the references, and the reference length is the closest one to the hypothesis length
//!   (ties go to the shorter reference);
//! - statistics are summed over the corpus, then precisions, smoothing (`exp` by default, also
//!   `floor`, `add-k`, `none`), the brevity penalty and the geometric mean are computed with the
//!   same floating-point operations in the same order, so scores agree to the last bit or so.
//!
//! The reproducibility signature has sacrebleu's format, e.g.
//! `nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0`; the version is
//! [`SACREBLEU_VERSION`], the sacrebleu release these implementations were checked against.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::pytext::{py_lower, py_rstrip, py_split, py_strip};
use crate::unicode_tables::{NUMBER, PUNCT, SYMBOL};
use crate::EvalError;

/// The sacrebleu release whose behaviour [`corpus_bleu`] and [`crate::corpus_chrf`] reproduce,
/// and which they report in their signatures. Checked with `tools/metrics/compare_metrics.py`.
pub const SACREBLEU_VERSION: &str = "2.6.0";

/// Maximum n-gram order (sacrebleu's default `max_ngram_order`).
pub const MAX_NGRAM_ORDER: usize = 4;

/// The BLEU tokenizers, named as in sacrebleu (`--tokenize`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum BleuTokenize {
    /// `none`: no tokenization; split on whitespace only.
    #[serde(rename = "none")]
    None,
    /// `13a`: mteval-v13a.pl tokenization (sacrebleu's default).
    #[default]
    #[serde(rename = "13a")]
    Tok13a,
    /// `intl`: mteval-v14.pl international tokenization (Unicode punctuation and symbols).
    #[serde(rename = "intl")]
    Intl,
    /// `char`: every character is a token.
    #[serde(rename = "char")]
    Char,
    /// `zh`: Chinese characters split one by one, the rest tokenized as `13a`.
    #[serde(rename = "zh")]
    Zh,
}

impl BleuTokenize {
    /// All tokenizers, in the order of their names in [`BleuTokenize::NAMES`].
    pub const ALL: [BleuTokenize; 5] =
        [BleuTokenize::None, BleuTokenize::Tok13a, BleuTokenize::Intl, BleuTokenize::Char, BleuTokenize::Zh];

    /// The accepted names, for messages.
    pub const NAMES: &'static str = "none, 13a, intl, char, zh";

    /// sacrebleu's name for the tokenizer, as it appears in the signature (`tok:...`).
    pub fn name(self) -> &'static str {
        match self {
            BleuTokenize::None => "none",
            BleuTokenize::Tok13a => "13a",
            BleuTokenize::Intl => "intl",
            BleuTokenize::Char => "char",
            BleuTokenize::Zh => "zh",
        }
    }

    /// Tokenizes one (already lowercased and right-stripped) segment; the tokens are the
    /// whitespace-separated fields of the result.
    pub fn tokenize(self, line: &str) -> String {
        match self {
            BleuTokenize::None => line.to_string(),
            BleuTokenize::Tok13a => tokenize_13a(line),
            BleuTokenize::Intl => tokenize_intl(line),
            BleuTokenize::Char => tokenize_char(line),
            BleuTokenize::Zh => tokenize_zh(line),
        }
    }
}

impl fmt::Display for BleuTokenize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BleuTokenize {
    type Err = EvalError;

    fn from_str(s: &str) -> Result<Self, EvalError> {
        BleuTokenize::ALL.into_iter().find(|t| t.name() == s).ok_or_else(|| EvalError::UnknownOption {
            kind: "BLEU tokenizer",
            value: s.to_string(),
            expected: BleuTokenize::NAMES,
        })
    }
}

/// BLEU smoothing methods (sacrebleu's `smooth_method` / `smooth_value`).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub enum Smoothing {
    /// `exp`: NIST geometric smoothing, as mteval-v13a.pl (sacrebleu's default).
    #[default]
    Exp,
    /// `floor`: a zero count is replaced by this value (sacrebleu's default is 0.1).
    Floor(f64),
    /// `add-k`: this value is added to the counts and totals of orders 2..=4 (default 1).
    AddK(f64),
    /// `none`: no smoothing.
    None,
}

impl Smoothing {
    /// `floor` with sacrebleu's default value, 0.1.
    pub const FLOOR_DEFAULT: Smoothing = Smoothing::Floor(0.1);
    /// `add-k` with sacrebleu's default value, 1.
    pub const ADD_K_DEFAULT: Smoothing = Smoothing::AddK(1.0);

    /// The signature form: `exp`, `none`, `floor[0.10]`, `add-k[1.00]`.
    pub fn signature(self) -> String {
        match self {
            Smoothing::Exp => "exp".to_string(),
            Smoothing::None => "none".to_string(),
            Smoothing::Floor(v) => format!("floor[{v:.2}]"),
            Smoothing::AddK(v) => format!("add-k[{v:.2}]"),
        }
    }

    /// Parses a method name (`exp`, `floor`, `add-k`, `none`) with an optional value; the value
    /// is only allowed for `floor` and `add-k`, and must be finite and non-negative.
    pub fn parse(method: &str, value: Option<f64>) -> Result<Smoothing, EvalError> {
        if let Some(v) = value {
            if !v.is_finite() || v < 0.0 {
                return Err(EvalError::InvalidOption(format!(
                    "smoothing value must be a finite non-negative number, got {v}"
                )));
            }
        }
        match (method, value) {
            ("exp", None) => Ok(Smoothing::Exp),
            ("none", None) => Ok(Smoothing::None),
            ("floor", v) => Ok(Smoothing::Floor(v.unwrap_or(0.1))),
            ("add-k", v) => Ok(Smoothing::AddK(v.unwrap_or(1.0))),
            ("exp" | "none", Some(_)) => {
                Err(EvalError::InvalidOption(format!("smoothing method '{method}' takes no value")))
            }
            _ => Err(EvalError::UnknownOption {
                kind: "smoothing method",
                value: method.to_string(),
                expected: "exp, floor, add-k, none",
            }),
        }
    }
}

/// Options for [`corpus_bleu`]. The default is sacrebleu's default `BLEU()`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct BleuOptions {
    pub tokenize: BleuTokenize,
    /// Lowercase hypotheses and references before tokenizing (`case:lc` in the signature).
    pub lowercase: bool,
    pub smooth: Smoothing,
    /// sacrebleu's `effective_order`: ignore n-gram orders with no hypothesis n-grams. Off by
    /// default, as in sacrebleu's corpus BLEU.
    pub effective_order: bool,
}

/// A corpus BLEU score with its sufficient statistics, as sacrebleu's `BLEUScore`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BleuScore {
    /// BLEU on a 0..100 scale.
    pub score: f64,
    /// Matched n-grams per order (1..=4), before any `add-k` smoothing is added.
    pub counts: [u64; MAX_NGRAM_ORDER],
    /// Hypothesis n-grams per order (1..=4), before any `add-k` smoothing is added.
    pub totals: [u64; MAX_NGRAM_ORDER],
    /// Smoothed n-gram precisions per order, in percent.
    pub precisions: [f64; MAX_NGRAM_ORDER],
    /// Brevity penalty.
    pub bp: f64,
    /// Total hypothesis length in tokens.
    pub sys_len: u64,
    /// Total (closest) reference length in tokens.
    pub ref_len: u64,
    /// sacrebleu's reproducibility signature.
    pub signature: String,
}

impl BleuScore {
    /// `sys_len / ref_len`, or 0 when the reference is empty (as sacrebleu).
    pub fn ratio(&self) -> f64 {
        if self.ref_len == 0 {
            0.0
        } else {
            self.sys_len as f64 / self.ref_len as f64
        }
    }
}

/// Checks the shape of a corpus: one or more reference streams, each as long as `hyps`.
/// Returns the number of segments.
pub(crate) fn check_corpus(metric: &str, hyps: &[String], refs: &[Vec<String>]) -> Result<usize, EvalError> {
    if refs.is_empty() {
        return Err(EvalError::MetricInput(format!("{metric}: no reference stream given")));
    }
    if hyps.is_empty() {
        return Err(EvalError::MetricInput(format!("{metric}: the hypothesis stream is empty")));
    }
    for (k, stream) in refs.iter().enumerate() {
        if stream.len() != hyps.len() {
            return Err(EvalError::MetricInput(format!(
                "{metric}: reference stream {} has {} segments but there are {} hypotheses",
                k + 1,
                stream.len(),
                hyps.len()
            )));
        }
    }
    Ok(hyps.len())
}

/// Corpus BLEU, exactly as sacrebleu's `BLEU(tokenize=..., lowercase=..., smooth_method=...)
/// .corpus_score(hyps, refs)`.
///
/// `refs[k][i]` is the `k`-th reference of the `i`-th segment (one inner vector per reference
/// stream, as in sacrebleu). Every stream must have as many segments as `hyps`, and there must be
/// at least one stream and one segment.
pub fn corpus_bleu(hyps: &[String], refs: &[Vec<String>], opts: &BleuOptions) -> Result<BleuScore, EvalError> {
    let n = check_corpus("BLEU", hyps, refs)?;
    let preprocess = |s: &str| -> String {
        if opts.lowercase {
            opts.tokenize.tokenize(py_rstrip(&py_lower(s)))
        } else {
            opts.tokenize.tokenize(py_rstrip(s))
        }
    };

    let mut sys_len = 0u64;
    let mut ref_len = 0u64;
    let mut counts = [0u64; MAX_NGRAM_ORDER];
    let mut totals = [0u64; MAX_NGRAM_ORDER];
    for i in 0..n {
        let ref_strings: Vec<String> = refs.iter().map(|stream| preprocess(&stream[i])).collect();
        let ref_tokens: Vec<Vec<&str>> = ref_strings.iter().map(|s| py_split(s).collect()).collect();
        let mut ref_ngrams: HashMap<&[&str], u64> = HashMap::new();
        for (k, toks) in ref_tokens.iter().enumerate() {
            let this = count_ngrams(toks);
            if k == 0 {
                ref_ngrams = this;
            } else {
                for (g, c) in this {
                    let e = ref_ngrams.entry(g).or_insert(0);
                    *e = (*e).max(c);
                }
            }
        }

        let hyp_string = preprocess(&hyps[i]);
        let hyp_tokens: Vec<&str> = py_split(&hyp_string).collect();
        let hyp_len = hyp_tokens.len() as u64;
        sys_len += hyp_len;
        ref_len += closest_ref_len(hyp_len, ref_tokens.iter().map(|t| t.len() as u64));
        for (g, c) in count_ngrams(&hyp_tokens) {
            let order = g.len() - 1;
            totals[order] += c;
            if let Some(&rc) = ref_ngrams.get(g) {
                counts[order] += c.min(rc);
            }
        }
    }

    let (score, precisions, bp) = compute_bleu(&counts, &totals, sys_len, ref_len, opts.smooth, opts.effective_order);
    let signature = format!(
        "nrefs:{}|case:{}|eff:{}|tok:{}|smooth:{}|version:{}",
        refs.len(),
        if opts.lowercase { "lc" } else { "mixed" },
        if opts.effective_order { "yes" } else { "no" },
        opts.tokenize.name(),
        opts.smooth.signature(),
        SACREBLEU_VERSION
    );
    Ok(BleuScore { score, counts, totals, precisions, bp, sys_len, ref_len, signature })
}

/// All n-grams of order 1..=4 with their counts.
fn count_ngrams<'a, 'b>(tokens: &'a [&'b str]) -> HashMap<&'a [&'b str], u64> {
    let mut map = HashMap::new();
    for order in 1..=MAX_NGRAM_ORDER {
        for g in tokens.windows(order) {
            *map.entry(g).or_insert(0) += 1;
        }
    }
    map
}

/// The reference length closest to `hyp_len`; on a tie, the shorter one (sacrebleu's
/// `_get_closest_ref_len`).
fn closest_ref_len(hyp_len: u64, ref_lens: impl Iterator<Item = u64>) -> u64 {
    let mut best: Option<(u64, u64)> = None; // (diff, len)
    for len in ref_lens {
        let diff = hyp_len.abs_diff(len);
        best = match best {
            None => Some((diff, len)),
            Some((bd, _)) if diff < bd => Some((diff, len)),
            Some((bd, bl)) if diff == bd && len < bl => Some((bd, len)),
            keep => keep,
        };
    }
    best.map_or(0, |(_, len)| len)
}

/// sacrebleu's `my_log`: `log(x)`, with `log(0)` floored to -9999999999.
fn my_log(x: f64) -> f64 {
    if x == 0.0 {
        -9_999_999_999.0
    } else {
        x.ln()
    }
}

/// sacrebleu's `BLEU.compute_bleu`: (score, precisions, brevity penalty) from the summed
/// statistics, with the same operations in the same order.
fn compute_bleu(
    correct: &[u64; MAX_NGRAM_ORDER],
    total: &[u64; MAX_NGRAM_ORDER],
    sys_len: u64,
    ref_len: u64,
    smooth: Smoothing,
    effective_order: bool,
) -> (f64, [f64; MAX_NGRAM_ORDER], f64) {
    let mut bp = 1.0;
    if sys_len < ref_len {
        bp = if sys_len > 0 { (1.0 - ref_len as f64 / sys_len as f64).exp() } else { 0.0 };
    }
    let mut precisions = [0.0f64; MAX_NGRAM_ORDER];
    if correct.iter().all(|&c| c == 0) {
        return (0.0, precisions, bp);
    }
    let mut correct: [f64; MAX_NGRAM_ORDER] = correct.map(|c| c as f64);
    let mut total: [f64; MAX_NGRAM_ORDER] = total.map(|c| c as f64);
    let mut smooth_mteval = 1.0f64;
    let mut eff_order = MAX_NGRAM_ORDER;
    for n in 1..=MAX_NGRAM_ORDER {
        if let Smoothing::AddK(k) = smooth {
            if n > 1 {
                correct[n - 1] += k;
                total[n - 1] += k;
            }
        }
        if total[n - 1] == 0.0 {
            break;
        }
        if effective_order {
            eff_order = n;
        }
        if correct[n - 1] == 0.0 {
            match smooth {
                Smoothing::Exp => {
                    smooth_mteval *= 2.0;
                    precisions[n - 1] = 100.0 / (smooth_mteval * total[n - 1]);
                }
                Smoothing::Floor(v) => precisions[n - 1] = 100.0 * v / total[n - 1],
                Smoothing::AddK(_) | Smoothing::None => {}
            }
        } else {
            precisions[n - 1] = 100.0 * correct[n - 1] / total[n - 1];
        }
    }
    let log_sum: f64 = precisions[..eff_order].iter().fold(0.0, |acc, &p| acc + my_log(p));
    let score = bp * (log_sum / eff_order as f64).exp();
    (score, precisions, bp)
}

// ---------------------------------------------------------------------------------------------
// Tokenizers
// ---------------------------------------------------------------------------------------------

/// Applies a regex substitution of the form `(A)(B)` → replacement, where `A` and `B` each match
/// exactly one character, with Python `re.sub` semantics (leftmost, non-overlapping matches).
fn sub_pair(
    chars: &[char],
    first: impl Fn(char) -> bool,
    second: impl Fn(char) -> bool,
    emit: impl Fn(&mut Vec<char>, char, char),
) -> Vec<char> {
    let mut out = Vec::with_capacity(chars.len() + chars.len() / 2);
    let mut i = 0;
    while i < chars.len() {
        if i + 1 < chars.len() && first(chars[i]) && second(chars[i + 1]) {
            emit(&mut out, chars[i], chars[i + 1]);
            i += 2;
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}

/// Surrounds every character that satisfies `pred` with spaces (`(X)` → ` \1 `).
fn pad_each(chars: &[char], pred: impl Fn(char) -> bool) -> Vec<char> {
    let mut out = Vec::with_capacity(chars.len() + chars.len() / 2);
    for &c in chars {
        if pred(c) {
            out.extend([' ', c, ' ']);
        } else {
            out.push(c);
        }
    }
    out
}

/// `' '.join(s.split())`.
fn normalize_spaces(chars: &[char]) -> String {
    let s: String = chars.iter().collect();
    py_split(&s).collect::<Vec<_>>().join(" ")
}

fn is_ascii_digit(c: char) -> bool {
    c.is_ascii_digit()
}

/// sacrebleu's `TokenizerRegexp`, the language-dependent part of `13a` (and of `zh`).
fn regexp_tokenize(line: &str) -> String {
    let chars: Vec<char> = line.chars().collect();
    // [\{-\~\[-\` -\&\(-\+\:-\@\/] → ' \1 ': ASCII punctuation except ' - . , (and space).
    let chars = pad_each(&chars, |c| matches!(c, '{'..='~' | '['..='`' | ' '..='&' | '('..='+' | ':'..='@' | '/'));
    // ([^0-9])([\.,]) → '\1 \2 '
    let chars =
        sub_pair(&chars, |c| !is_ascii_digit(c), |c| c == '.' || c == ',', |o, a, b| o.extend([a, ' ', b, ' ']));
    // ([\.,])([^0-9]) → ' \1 \2'
    let chars =
        sub_pair(&chars, |c| c == '.' || c == ',', |c| !is_ascii_digit(c), |o, a, b| o.extend([' ', a, ' ', b]));
    // ([0-9])(-) → '\1 \2 '
    let chars = sub_pair(&chars, is_ascii_digit, |c| c == '-', |o, a, b| o.extend([a, ' ', b, ' ']));
    normalize_spaces(&chars)
}

/// sacrebleu's `Tokenizer13a` (mteval-v13a.pl).
fn tokenize_13a(line: &str) -> String {
    let mut line = line.replace("<skipped>", "").replace("-\n", "").replace('\n', " ");
    if line.contains('&') {
        line = line.replace("&quot;", "\"").replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">");
    }
    regexp_tokenize(&format!(" {line} "))
}

fn in_table(table: &[(u32, u32)], c: char) -> bool {
    let c = u32::from(c);
    table
        .binary_search_by(|&(lo, hi)| {
            if hi < c {
                std::cmp::Ordering::Less
            } else if lo > c {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        })
        .is_ok()
}

/// sacrebleu's `TokenizerV14International` (mteval-v14.pl `--international-tokenization`).
fn tokenize_intl(line: &str) -> String {
    let is_p = |c| in_table(PUNCT, c);
    let not_n = |c| !in_table(NUMBER, c);
    let chars: Vec<char> = line.chars().collect();
    // (\P{N})(\p{P}) → '\1 \2 '
    let chars = sub_pair(&chars, not_n, is_p, |o, a, b| o.extend([a, ' ', b, ' ']));
    // (\p{P})(\P{N}) → ' \1 \2'
    let chars = sub_pair(&chars, is_p, not_n, |o, a, b| o.extend([' ', a, ' ', b]));
    // (\p{S}) → ' \1 '
    let chars = pad_each(&chars, |c| in_table(SYMBOL, c));
    normalize_spaces(&chars)
}

/// sacrebleu's `TokenizerChar`: every character separated by a space.
fn tokenize_char(line: &str) -> String {
    let mut out = String::with_capacity(line.len() * 2);
    for (i, c) in line.chars().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

/// The code points sacrebleu's `zh` tokenizer treats as Chinese characters, as merged inclusive
/// ranges. This is what `TokenizerZh._is_chinese_char` actually computes: its table writes two
/// supplementary-plane ranges as `u'\u20000'` and `u'\u2f800'`, which Python reads as two-character
/// strings, so those entries compare as U+2001..=U+2A6D and U+2F81..=U+2FA1 instead (the first
/// swallows several other ranges of the table). Checked by brute force against sacrebleu.
const ZH_RANGES: &[(u32, u32)] = &[
    (0x2001, 0x2A6D),
    (0x2E80, 0x2FDF),
    (0x2FF0, 0x303F),
    (0x3100, 0x312F),
    (0x31A0, 0x31EF),
    (0x3200, 0x4DB5),
    (0x4E00, 0x9FBB),
    (0xF900, 0xFA2D),
    (0xFA30, 0xFA6A),
    (0xFA70, 0xFAD9),
    (0xFE10, 0xFE1F),
    (0xFE30, 0xFE4F),
    (0xFF00, 0xFFEF),
];

/// sacrebleu's `TokenizerZh`.
fn tokenize_zh(line: &str) -> String {
    let line = py_strip(line);
    let mut spaced = String::with_capacity(line.len() * 2);
    for c in line.chars() {
        if in_table(ZH_RANGES, c) {
            spaced.push(' ');
            spaced.push(c);
            spaced.push(' ');
        } else {
            spaced.push(c);
        }
    }
    regexp_tokenize(&spaced)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_13a_examples() {
        assert_eq!(tokenize_13a("Hello, world! It's 3.5-4 o'clock."), "Hello , world ! It's 3.5 - 4 o'clock .");
        assert_eq!(tokenize_13a("a &amp; b &quot;c&quot; &lt;d&gt;"), "a & b \" c \" < d >");
        assert_eq!(tokenize_13a("x<skipped>y 1,000.00 end."), "xy 1,000.00 end .");
        assert_eq!(tokenize_13a("a..b,,c"), "a . . b , , c");
    }

    #[test]
    fn tokenizer_intl_examples() {
        assert_eq!(tokenize_intl("Hello, world! 3.5 «quoted» €5 2020."), "Hello , world ! 3.5 « quoted » € 5 2020.");
    }

    #[test]
    fn tokenizer_zh_examples() {
        assert_eq!(tokenize_zh(" 我爱北京, ok. "), "我 爱 北 京 , ok .");
    }

    #[test]
    fn closest_ref_len_prefers_shorter_on_tie() {
        assert_eq!(closest_ref_len(5, [7, 3].into_iter()), 3);
        assert_eq!(closest_ref_len(5, [6, 4, 5].into_iter()), 5);
        assert_eq!(closest_ref_len(0, std::iter::empty()), 0);
    }
}
