//! A built-in synthetic corpus, so the demo trains without downloading anything.
//!
//! [`generate`] returns `'\n'`-separated lines of two kinds, interleaved at random (about one
//! line in three is a translation):
//!
//! 1. number-to-words "translation" pairs, numbers of 1 to 6 digits, US English words
//!    without "and", tens and ones hyphenated:
//!    ```text
//!    translate 4127 to words: four thousand one hundred twenty-seven.
//!    translate 90000 to words: ninety thousand.
//!    ```
//! 2. sentences from a small English grammar (a few hundred words: determiners, adjectives,
//!    nouns, transitive and intransitive verbs, adverbs, prepositional phrases), e.g.
//!    ```text
//!    the old fox watches a small bird near the river.
//!    a tired farmer sleeps quietly under the tall tree.
//!    when the young child sings, my dog follows an orange kite.
//!    ```
//!
//! The text is a pure function of the seed (ChaCha8, with our own range sampling so it does not
//! depend on `rand`'s algorithms). Translation lines give a model something exact to learn,
//! which makes the demo's loss curve and generations easy to judge.
//!
//! ```
//! use kiln_data::synthetic::{generate, number_to_words};
//! assert_eq!(number_to_words(4127), "four thousand one hundred twenty-seven");
//! let text = generate(7, 1000);
//! assert_eq!(text, generate(7, 1000));
//! assert!(text.ends_with('\n'));
//! ```

use crate::atomic::TempFile;
use crate::sampler::uniform;
use crate::DataError;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::io::{BufWriter, Write};
use std::path::Path;

const DETERMINERS: &str = "\
    the a the a this that my your our her his their every one";

const ADJECTIVES: &str = "\
    old young small big tall short quiet loud happy sad tired clever brave shy gentle angry \
    hungry sleepy busy lazy red blue green yellow orange white black brown golden silver \
    bright dark warm cold wet dry soft hard heavy light new ancient strange famous kind wild \
    curious proud little huge tiny wooden broken shiny dusty empty noisy calm eager honest";

const NOUNS: &str = "\
    fox dog cat bird horse cow sheep goat rabbit mouse owl wolf bear deer duck frog fish \
    lion tiger monkey child girl boy woman man farmer teacher doctor baker sailor king queen \
    soldier student artist singer driver painter poet hunter cook neighbor friend stranger \
    traveler merchant gardener fisherman nurse pilot robot kite ball book letter lamp key \
    box basket boat train car bicycle cup hat coat apple bread cake flower stone shell drum \
    bell map clock chair table rope ladder candle mirror window door feather leaf egg song \
    story picture";

const PLACES: &str = "\
    river tree hill forest house bridge road garden lake mountain village city market school \
    castle tower field farm barn wall fence gate well harbor beach island cave station \
    library church kitchen window table fire moon sea valley meadow pond path";

const PREPOSITIONS: &str = "\
    near under behind beside above across along inside around past over below by toward \
    beyond outside at in on through";

const TRANSITIVE: &str = "\
    watches follows sees finds carries holds likes loves helps calls chases visits paints \
    reads builds opens closes pushes pulls throws catches drops wants keeps hides fixes \
    cleans brings remembers forgets feeds greets meets answers teaches draws hears touches \
    lifts counts buys sells guards admires ignores wakes washes measures trusts";

const INTRANSITIVE: &str = "\
    sleeps runs sings waits dances laughs cries walks swims jumps sits stands rests smiles \
    listens works plays hides wanders shivers whistles dreams falls climbs stays returns \
    speaks shouts hums waves";

const ADVERBS: &str = "\
    quickly slowly quietly loudly happily sadly carefully gently bravely calmly often rarely \
    always never softly proudly eagerly politely suddenly patiently";

const CONJUNCTIONS: &str = "\
    when while because after before although";

const ONES: [&str; 20] = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
];

const TENS: [&str; 10] = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"];

/// Scale words for each group of three digits, from the right.
const SCALES: [&str; 7] = ["", "thousand", "million", "billion", "trillion", "quadrillion", "quintillion"];

/// English words for `n`: `4127` → "four thousand one hundred twenty-seven".
///
/// US style: no "and", tens and ones joined by a hyphen, zero groups skipped
/// (`1000001` → "one million one").
pub fn number_to_words(n: u64) -> String {
    if n == 0 {
        return ONES[0].to_string();
    }
    let mut groups = Vec::new();
    let mut rest = n;
    let mut scale = 0;
    while rest > 0 {
        let g = (rest % 1000) as usize;
        if g > 0 {
            let mut words = below_thousand(g);
            if scale > 0 {
                words.push(' ');
                words.push_str(SCALES[scale]);
            }
            groups.push(words);
        }
        rest /= 1000;
        scale += 1;
    }
    groups.reverse();
    groups.join(" ")
}

/// Words for 1..=999.
fn below_thousand(n: usize) -> String {
    let mut parts = Vec::new();
    if n >= 100 {
        parts.push(format!("{} hundred", ONES[n / 100]));
    }
    let r = n % 100;
    if r >= 20 {
        let t = TENS[r / 10];
        parts.push(match r % 10 {
            0 => t.to_string(),
            ones => format!("{t}-{}", ONES[ones]),
        });
    } else if r > 0 {
        parts.push(ONES[r].to_string());
    }
    parts.join(" ")
}

/// The word lists, split once.
struct Lexicon {
    determiners: Vec<&'static str>,
    adjectives: Vec<&'static str>,
    nouns: Vec<&'static str>,
    places: Vec<&'static str>,
    prepositions: Vec<&'static str>,
    transitive: Vec<&'static str>,
    intransitive: Vec<&'static str>,
    adverbs: Vec<&'static str>,
    conjunctions: Vec<&'static str>,
}

impl Lexicon {
    fn new() -> Lexicon {
        let w = |list: &'static str| list.split_whitespace().collect();
        Lexicon {
            determiners: w(DETERMINERS),
            adjectives: w(ADJECTIVES),
            nouns: w(NOUNS),
            places: w(PLACES),
            prepositions: w(PREPOSITIONS),
            transitive: w(TRANSITIVE),
            intransitive: w(INTRANSITIVE),
            adverbs: w(ADVERBS),
            conjunctions: w(CONJUNCTIONS),
        }
    }
}

/// Makes the lines; `generate` and `write_corpus` both draw from it, so they agree.
struct LineGen {
    rng: ChaCha8Rng,
    lex: Lexicon,
}

impl LineGen {
    fn new(seed: u64) -> LineGen {
        LineGen { rng: ChaCha8Rng::seed_from_u64(seed), lex: Lexicon::new() }
    }

    fn below(&mut self, n: usize) -> usize {
        uniform(&mut self.rng, n as u64) as usize
    }

    /// A random word of `words` (a field of `self.lex`, hence a free-standing rng argument).
    fn pick(rng: &mut ChaCha8Rng, words: &[&'static str]) -> &'static str {
        words[uniform(rng, words.len() as u64) as usize]
    }

    /// True with probability `num / den`.
    fn chance(&mut self, num: usize, den: usize) -> bool {
        self.below(den) < num
    }

    /// One line, without its '\n'.
    fn line(&mut self) -> String {
        if self.chance(1, 3) {
            self.translation()
        } else {
            self.sentence()
        }
    }

    fn translation(&mut self) -> String {
        // Uniform digit count, so small and large numbers are equally common.
        let digits = 1 + self.below(6) as u32;
        let lo = if digits == 1 { 0 } else { 10u64.pow(digits - 1) };
        let hi = 10u64.pow(digits);
        let n = lo + uniform(&mut self.rng, hi - lo);
        format!("translate {n} to words: {}.", number_to_words(n))
    }

    /// "the old fox": determiner, maybe an adjective, a noun (or a place noun).
    fn noun_phrase(&mut self, places: bool) -> String {
        let det = Self::pick(&mut self.rng, &self.lex.determiners);
        let mut rest = String::new();
        if self.chance(1, 2) {
            rest.push_str(Self::pick(&mut self.rng, &self.lex.adjectives));
            rest.push(' ');
        }
        let nouns = if places { &self.lex.places } else { &self.lex.nouns };
        rest.push_str(Self::pick(&mut self.rng, nouns));
        // "a" before a vowel sound is "an"; first-letter rule is right for this word list.
        let det = if det == "a" && rest.starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { det };
        format!("{det} {rest}")
    }

    fn clause(&mut self) -> String {
        let subject = self.noun_phrase(false);
        if self.chance(3, 5) {
            let verb = Self::pick(&mut self.rng, &self.lex.transitive);
            let object = self.noun_phrase(false);
            format!("{subject} {verb} {object}")
        } else {
            let verb = Self::pick(&mut self.rng, &self.lex.intransitive);
            if self.chance(1, 2) {
                let adv = Self::pick(&mut self.rng, &self.lex.adverbs);
                format!("{subject} {verb} {adv}")
            } else {
                format!("{subject} {verb}")
            }
        }
    }

    fn sentence(&mut self) -> String {
        let mut s = if self.chance(1, 5) {
            let conj = Self::pick(&mut self.rng, &self.lex.conjunctions);
            let first = self.clause();
            let second = self.clause();
            format!("{conj} {first}, {second}")
        } else {
            self.clause()
        };
        if self.chance(1, 2) {
            let prep = Self::pick(&mut self.rng, &self.lex.prepositions);
            let place = self.noun_phrase(true);
            s.push(' ');
            s.push_str(prep);
            s.push(' ');
            s.push_str(&place);
        }
        s.push('.');
        s
    }
}

/// About `target_bytes` of corpus text (lines are added until the total reaches it, so it may
/// run over by one line; 0 gives ""). Every line ends with '\n'. Same seed, same text.
pub fn generate(seed: u64, target_bytes: usize) -> String {
    let mut gen = LineGen::new(seed);
    let mut out = String::with_capacity(target_bytes + 128);
    while out.len() < target_bytes {
        out.push_str(&gen.line());
        out.push('\n');
    }
    out
}

/// Writes `generate(seed, target_bytes)` to `path` atomically, streaming (no whole-corpus
/// string in memory).
pub fn write_corpus(seed: u64, target_bytes: usize, path: &Path) -> Result<(), DataError> {
    let mut tmp = TempFile::create(path)?;
    let tmp_path = tmp.tmp_path().to_path_buf();
    let io = |e: std::io::Error| DataError::io("writing corpus", tmp_path.clone(), e);
    let file = tmp.file().try_clone().map_err(io)?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let mut gen = LineGen::new(seed);
    let mut written = 0usize;
    while written < target_bytes {
        let line = gen.line();
        w.write_all(line.as_bytes()).map_err(io)?;
        w.write_all(b"\n").map_err(io)?;
        written += line.len() + 1;
    }
    w.flush().map_err(io)?;
    drop(w);
    tmp.commit()
}
