use kiln_data::synthetic::{generate, number_to_words, write_corpus};

#[test]
fn same_seed_same_text_other_seed_other_text() {
    let a = generate(5, 20_000);
    assert_eq!(a, generate(5, 20_000));
    assert_ne!(a, generate(6, 20_000));
    assert!(a.len() >= 20_000 && a.len() < 20_200, "{}", a.len());
    assert!(a.ends_with('\n'));
    assert_eq!(generate(5, 0), "");
    // A shorter request is a prefix of a longer one: the line stream does not depend on size.
    assert!(a.starts_with(&generate(5, 1000)));
}

#[test]
fn number_words() {
    let cases = [
        (0, "zero"),
        (7, "seven"),
        (13, "thirteen"),
        (19, "nineteen"),
        (20, "twenty"),
        (40, "forty"),
        (99, "ninety-nine"),
        (100, "one hundred"),
        (105, "one hundred five"),
        (999, "nine hundred ninety-nine"),
        (4127, "four thousand one hundred twenty-seven"),
        (90000, "ninety thousand"),
        (100_010, "one hundred thousand ten"),
        (999_999, "nine hundred ninety-nine thousand nine hundred ninety-nine"),
        (1_000_001, "one million one"),
        (u64::MAX, "eighteen quintillion four hundred forty-six quadrillion seven hundred forty-four trillion seventy-three billion seven hundred nine million five hundred fifty-one thousand six hundred fifteen"),
    ];
    for (n, words) in cases {
        assert_eq!(number_to_words(n), words, "{n}");
    }
}

#[test]
fn both_line_kinds_appear_and_translations_are_right() {
    let text = generate(9, 50_000);
    let (mut translations, mut sentences) = (0, 0);
    for line in text.lines() {
        assert!(line.ends_with('.'), "{line}");
        if let Some(rest) = line.strip_prefix("translate ") {
            let (num, words) = rest.split_once(" to words: ").unwrap();
            let n: u64 = num.parse().unwrap();
            assert!(n < 1_000_000);
            assert_eq!(words, format!("{}.", number_to_words(n)));
            translations += 1;
        } else {
            let words: Vec<&str> = line.trim_end_matches('.').split(' ').collect();
            assert!(words.len() >= 3, "{line}");
            assert!(line.chars().all(|c| c.is_ascii_lowercase() || " ,.-".contains(c)), "{line}");
            assert!(!line.contains(" a a") && !line.contains(" a o"), "{line}");
            sentences += 1;
        }
    }
    // About one line in three is a translation.
    assert!(translations > 100 && sentences > translations, "{translations} {sentences}");
}

#[test]
fn write_corpus_matches_generate() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("corpus.txt");
    write_corpus(3, 10_000, &path).unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), generate(3, 10_000));
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(names.len(), 1);
}
