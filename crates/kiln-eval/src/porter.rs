//! The Porter stemmer exactly as NLTK's `PorterStemmer()` in its default `NLTK_EXTENSIONS` mode,
//! which is what rouge-score (0.1.2) uses for `use_stemmer=True`
//! (`rouge_score/tokenizers.py`: `nltk.stem.porter.PorterStemmer()`).
//!
//! The input is a lowercase ASCII token (`[a-z0-9]+`, as produced by the ROUGE tokenizer);
//! any other input is returned unchanged.

/// Irregular forms looked up before stemming (NLTK_EXTENSIONS mode).
const POOL: &[(&str, &str)] = &[
    ("sky", "sky"),
    ("skies", "sky"),
    ("dying", "die"),
    ("lying", "lie"),
    ("tying", "tie"),
    ("news", "news"),
    ("innings", "inning"),
    ("inning", "inning"),
    ("outings", "outing"),
    ("outing", "outing"),
    ("cannings", "canning"),
    ("canning", "canning"),
    ("howe", "howe"),
    ("proceed", "proceed"),
    ("exceed", "exceed"),
    ("succeed", "succeed"),
];

/// Stems one lowercase ASCII word.
pub(crate) fn stem(word: &str) -> String {
    if !word.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()) {
        return word.to_string();
    }
    if let Some(&(_, s)) = POOL.iter().find(|(w, _)| *w == word) {
        return s.to_string();
    }
    if word.len() <= 2 {
        return word.to_string();
    }
    let w = step1a(word);
    let w = step1b(&w);
    let w = step1c(&w);
    let w = step2(&w);
    let w = step3(&w);
    let w = step4(&w);
    let w = step5a(&w);
    step5b(&w)
}

/// Consonant flags for every position: a letter other than a, e, i, o, u is a consonant, except
/// a `y` that follows a consonant.
fn consonant_flags(w: &str) -> Vec<bool> {
    let b = w.as_bytes();
    let mut flags: Vec<bool> = Vec::with_capacity(b.len());
    for (i, &c) in b.iter().enumerate() {
        let f = match c {
            b'a' | b'e' | b'i' | b'o' | b'u' => false,
            b'y' => i == 0 || !flags[i - 1],
            _ => true,
        };
        flags.push(f);
    }
    flags
}

fn is_consonant(w: &str, i: usize) -> bool {
    consonant_flags(&w[..=i])[i]
}

/// The measure m of `[C](VC){m}[V]`.
fn measure(stem: &str) -> usize {
    consonant_flags(stem).windows(2).filter(|p| !p[0] && p[1]).count()
}

fn positive_measure(stem: &str) -> bool {
    measure(stem) > 0
}

fn measure_gt_1(stem: &str) -> bool {
    measure(stem) > 1
}

fn contains_vowel(stem: &str) -> bool {
    !consonant_flags(stem).iter().all(|&c| c)
}

/// Condition *d: ends with a double consonant.
fn ends_double_consonant(w: &str) -> bool {
    let b = w.as_bytes();
    b.len() >= 2 && b[b.len() - 1] == b[b.len() - 2] && is_consonant(w, b.len() - 1)
}

/// Condition *o: ends consonant-vowel-consonant, the last not w, x or y (NLTK also accepts a
/// two-letter vowel-consonant word).
fn ends_cvc(w: &str) -> bool {
    let b = w.as_bytes();
    let n = b.len();
    (n >= 3
        && is_consonant(w, n - 3)
        && !is_consonant(w, n - 2)
        && is_consonant(w, n - 1)
        && !matches!(b[n - 1], b'w' | b'x' | b'y'))
        || (n == 2 && !is_consonant(w, 0) && is_consonant(w, 1))
}

type Cond<'a> = Option<&'a dyn Fn(&str) -> bool>;

/// Applies the first rule whose suffix matches (`*d` means "ends in a double consonant"); if its
/// condition fails, the word is returned unchanged.
fn apply_rules(word: &str, rules: &[(&str, &str, Cond<'_>)]) -> String {
    for &(suffix, replacement, cond) in rules {
        if suffix == "*d" && ends_double_consonant(word) {
            let stem = &word[..word.len() - 2];
            return if cond.is_none_or(|c| c(stem)) { format!("{stem}{replacement}") } else { word.to_string() };
        }
        if let Some(stem) = word.strip_suffix(suffix) {
            return if cond.is_none_or(|c| c(stem)) { format!("{stem}{replacement}") } else { word.to_string() };
        }
    }
    word.to_string()
}

fn step1a(word: &str) -> String {
    if word.len() == 4 {
        if let Some(stem) = word.strip_suffix("ies") {
            return format!("{stem}ie");
        }
    }
    apply_rules(word, &[("sses", "ss", None), ("ies", "i", None), ("ss", "ss", None), ("s", "", None)])
}

fn step1b(word: &str) -> String {
    if let Some(stem) = word.strip_suffix("ied") {
        return if word.len() == 4 { format!("{stem}ie") } else { format!("{stem}i") };
    }
    if let Some(stem) = word.strip_suffix("eed") {
        return if measure(stem) > 0 { format!("{stem}ee") } else { word.to_string() };
    }
    let mut intermediate = None;
    for suffix in ["ed", "ing"] {
        if let Some(stem) = word.strip_suffix(suffix) {
            if contains_vowel(stem) {
                intermediate = Some(stem);
                break;
            }
        }
    }
    let Some(stem) = intermediate else { return word.to_string() };
    let last = stem.as_bytes()[stem.len() - 1];
    let last_str = &stem[stem.len() - 1..];
    let not_lsz = move |_: &str| !matches!(last, b'l' | b's' | b'z');
    let add_e = |s: &str| measure(s) == 1 && ends_cvc(s);
    apply_rules(
        stem,
        &[
            ("at", "ate", None),
            ("bl", "ble", None),
            ("iz", "ize", None),
            ("*d", last_str, Some(&not_lsz)),
            ("", "e", Some(&add_e)),
        ],
    )
}

fn step1c(word: &str) -> String {
    let cond = |stem: &str| stem.len() > 1 && is_consonant(stem, stem.len() - 1);
    apply_rules(word, &[("y", "i", Some(&cond))])
}

fn step2(word: &str) -> String {
    if let Some(stem) = word.strip_suffix("alli") {
        if positive_measure(stem) {
            return step2(&format!("{stem}al"));
        }
    }
    let pm: Cond<'_> = Some(&positive_measure);
    let logi = |_: &str| positive_measure(&word[..word.len() - 3]);
    apply_rules(
        word,
        &[
            ("ational", "ate", pm),
            ("tional", "tion", pm),
            ("enci", "ence", pm),
            ("anci", "ance", pm),
            ("izer", "ize", pm),
            ("bli", "ble", pm),
            ("alli", "al", pm),
            ("entli", "ent", pm),
            ("eli", "e", pm),
            ("ousli", "ous", pm),
            ("ization", "ize", pm),
            ("ation", "ate", pm),
            ("ator", "ate", pm),
            ("alism", "al", pm),
            ("iveness", "ive", pm),
            ("fulness", "ful", pm),
            ("ousness", "ous", pm),
            ("aliti", "al", pm),
            ("iviti", "ive", pm),
            ("biliti", "ble", pm),
            ("fulli", "ful", pm),
            ("logi", "log", Some(&logi)),
        ],
    )
}

fn step3(word: &str) -> String {
    let pm: Cond<'_> = Some(&positive_measure);
    apply_rules(
        word,
        &[
            ("icate", "ic", pm),
            ("ative", "", pm),
            ("alize", "al", pm),
            ("iciti", "ic", pm),
            ("ical", "ic", pm),
            ("ful", "", pm),
            ("ness", "", pm),
        ],
    )
}

fn step4(word: &str) -> String {
    let m1: Cond<'_> = Some(&measure_gt_1);
    let ion = |stem: &str| measure(stem) > 1 && matches!(stem.as_bytes().last(), Some(b's' | b't'));
    apply_rules(
        word,
        &[
            ("al", "", m1),
            ("ance", "", m1),
            ("ence", "", m1),
            ("er", "", m1),
            ("ic", "", m1),
            ("able", "", m1),
            ("ible", "", m1),
            ("ant", "", m1),
            ("ement", "", m1),
            ("ment", "", m1),
            ("ent", "", m1),
            ("ion", "", Some(&ion)),
            ("ou", "", m1),
            ("ism", "", m1),
            ("ate", "", m1),
            ("iti", "", m1),
            ("ous", "", m1),
            ("ive", "", m1),
            ("ize", "", m1),
        ],
    )
}

fn step5a(word: &str) -> String {
    if let Some(stem) = word.strip_suffix('e') {
        let m = measure(stem);
        if m > 1 || (m == 1 && !ends_cvc(stem)) {
            return stem.to_string();
        }
    }
    word.to_string()
}

fn step5b(word: &str) -> String {
    let cond = |_: &str| measure(&word[..word.len() - 1]) > 1;
    apply_rules(word, &[("ll", "l", Some(&cond))])
}

#[cfg(test)]
mod tests {
    use super::stem;

    #[test]
    fn nltk_examples() {
        // Values from nltk 3.10 `PorterStemmer().stem(w)`.
        let cases = [
            ("caresses", "caress"),
            ("ponies", "poni"),
            ("ties", "tie"),
            ("cats", "cat"),
            ("agreed", "agre"),
            ("plastered", "plaster"),
            ("motoring", "motor"),
            ("conflated", "conflat"),
            ("hopping", "hop"),
            ("falling", "fall"),
            ("filing", "file"),
            ("happy", "happi"),
            ("relational", "relat"),
            ("generalization", "gener"),
            ("dying", "die"),
            ("skies", "sky"),
            ("analogi", "analog"),
            ("controlling", "control"),
            ("yyyy", "yyyi"),
            ("1990s", "1990"),
        ];
        for (w, s) in cases {
            assert_eq!(stem(w), s, "stem({w})");
        }
    }
}
