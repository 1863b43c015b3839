//! BLEU / chrF / ROUGE against the reference tools.
//!
//! Golden values come from the packages' documented examples and from
//! `tests/fixtures/metrics_golden.json`, written by `tools/metrics/make_fixtures.py` with
//! sacrebleu 2.6.0 and rouge-score 0.1.2 (nltk 3.10.4). Larger random comparisons:
//! `tools/metrics/compare_metrics.py`.

use kiln_eval::rouge::{score, score_multi, tokenize};
use kiln_eval::{
    corpus_bleu, corpus_chrf, corpus_rouge, BleuOptions, BleuTokenize, EvalError, RougeType, Smoothing,
    SACREBLEU_VERSION,
};
use serde_json::Value;

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The example of sacrebleu's README.
fn readme() -> (Vec<String>, Vec<Vec<String>>) {
    let hyps = strings(&["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]);
    let refs = vec![
        strings(&["The dog bit the man.", "It was not unexpected.", "The man bit him first."]),
        strings(&["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."]),
    ];
    (hyps, refs)
}

fn fixture() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/metrics_golden.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("read fixture")).expect("parse fixture")
}

fn str_list(v: &Value) -> Vec<String> {
    v.as_array().expect("array").iter().map(|s| s.as_str().expect("string").to_string()).collect()
}

fn assert_close(what: &str, ours: f64, expected: f64, tol: f64) {
    assert!((ours - expected).abs() <= tol, "{what}: kiln {ours} vs reference {expected}");
}

#[test]
fn sacrebleu_readme_bleu() {
    let (hyps, refs) = readme();
    let s = corpus_bleu(&hyps, &refs, &BleuOptions::default()).unwrap();
    assert_eq!(format!("{:.2}", s.score), "48.53");
    assert_close("score", s.score, 48.530827009929865, 1e-12);
    assert_eq!(s.counts, [14, 7, 5, 3]);
    assert_eq!(s.totals, [17, 14, 11, 8]);
    assert_eq!((s.sys_len, s.ref_len), (17, 18));
    assert_close("bp", s.bp, 0.9428731438548749, 1e-15);
    assert_eq!(s.signature, "nrefs:2|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0");
    assert_eq!(SACREBLEU_VERSION, "2.6.0");
}

#[test]
fn sacrebleu_readme_chrf() {
    let (hyps, refs) = readme();
    let s = corpus_chrf(&hyps, &refs, 0).unwrap();
    assert_eq!(format!("{:.2}", s.score), "59.73");
    assert_close("chrF", s.score, 59.72751782684763, 1e-12);
    assert_eq!(s.name, "chrF2");
    assert_eq!(s.signature, "nrefs:2|case:mixed|eff:yes|nc:6|nw:0|space:no|version:2.6.0");
    let s = corpus_chrf(&hyps, &refs, 2).unwrap();
    assert_close("chrF++", s.score, 59.15310444399262, 1e-12);
    assert_eq!(s.name, "chrF2++");
    assert_eq!(s.signature, "nrefs:2|case:mixed|eff:yes|nc:6|nw:2|space:no|version:2.6.0");
}

#[test]
fn rouge_score_readme_example() {
    // rouge-score README: RougeScorer(['rouge1', 'rougeL'], use_stemmer=True)
    //   .score('The quick brown fox jumps over the lazy dog', 'The quick brown dog jumps on the log.')
    let s = score(
        "The quick brown fox jumps over the lazy dog",
        "The quick brown dog jumps on the log.",
        &[RougeType::Rouge1, RougeType::RougeL],
        true,
    );
    let r1 = s.rouge1.unwrap();
    assert_close("rouge1 p", r1.precision, 0.75, 1e-15);
    assert_close("rouge1 r", r1.recall, 0.6666666666666666, 1e-15);
    assert_close("rouge1 f", r1.fmeasure, 0.7058823529411765, 1e-15);
    let rl = s.rouge_l.unwrap();
    assert_close("rougeL p", rl.precision, 0.625, 1e-15);
    assert_close("rougeL r", rl.recall, 0.5555555555555556, 1e-15);
    assert_close("rougeL f", rl.fmeasure, 0.5882352941176471, 1e-15);
    assert!(s.rouge2.is_none() && s.rouge_lsum.is_none(), "only the requested types are computed");
}

#[test]
fn golden_bleu() {
    let f = fixture();
    let cases = f["bleu"].as_array().unwrap();
    assert!(cases.len() >= 20);
    for (n, case) in cases.iter().enumerate() {
        let hyps = str_list(&case["hyps"]);
        let refs: Vec<Vec<String>> = case["refs"].as_array().unwrap().iter().map(str_list).collect();
        let smooth = Smoothing::parse(case["smooth"].as_str().unwrap(), case["smooth_value"].as_f64()).unwrap();
        let opts = BleuOptions {
            tokenize: case["tokenize"].as_str().unwrap().parse().unwrap(),
            lowercase: case["lowercase"].as_bool().unwrap(),
            smooth,
            effective_order: false,
        };
        let s = corpus_bleu(&hyps, &refs, &opts).unwrap();
        let e = &case["expected"];
        let what = format!("case {n} ({})", e["signature"]);
        assert_close(&format!("{what} score"), s.score, e["score"].as_f64().unwrap(), 1e-9);
        assert_close(&format!("{what} bp"), s.bp, e["bp"].as_f64().unwrap(), 1e-12);
        assert_eq!(s.signature, e["signature"].as_str().unwrap(), "{what}");
        assert_eq!(s.sys_len, e["sys_len"].as_u64().unwrap(), "{what} sys_len");
        assert_eq!(s.ref_len, e["ref_len"].as_u64().unwrap(), "{what} ref_len");
        // sacrebleu reports add-k counts and totals with k added to orders 2..=4.
        let k = match smooth {
            Smoothing::AddK(k) if s.counts.iter().any(|&c| c > 0) => k as u64,
            _ => 0,
        };
        for i in 0..4 {
            let add = if i > 0 { k } else { 0 };
            assert_eq!(s.counts[i] + add, e["counts"][i].as_u64().unwrap(), "{what} counts[{i}]");
            assert_eq!(s.totals[i] + add, e["totals"][i].as_u64().unwrap(), "{what} totals[{i}]");
            assert_close(&format!("{what} precision {i}"), s.precisions[i], e["precisions"][i].as_f64().unwrap(), 1e-9);
        }
    }
}

#[test]
fn golden_bleu_tokenizers() {
    let f = fixture();
    let cases = f["bleu_tokenizers"].as_array().unwrap();
    assert_eq!(cases.len(), 25);
    for case in cases {
        let tok: BleuTokenize = case["tokenize"].as_str().unwrap().parse().unwrap();
        let line = case["line"].as_str().unwrap();
        assert_eq!(tok.tokenize(line), case["expected"].as_str().unwrap(), "tokenizer {tok} on {line:?}");
    }
}

#[test]
fn golden_chrf() {
    let f = fixture();
    let cases = f["chrf"].as_array().unwrap();
    assert_eq!(cases.len(), 8);
    for case in cases {
        let hyps = str_list(&case["hyps"]);
        let refs: Vec<Vec<String>> = case["refs"].as_array().unwrap().iter().map(str_list).collect();
        let s = corpus_chrf(&hyps, &refs, case["word_order"].as_u64().unwrap() as usize).unwrap();
        let e = &case["expected"];
        assert_close(&format!("{} {hyps:?}", e["name"]), s.score, e["score"].as_f64().unwrap(), 1e-9);
        assert_eq!(s.name, e["name"].as_str().unwrap());
        assert_eq!(s.signature, e["signature"].as_str().unwrap());
    }
}

#[test]
fn golden_rouge() {
    let f = fixture();
    let cases = f["rouge"].as_array().unwrap();
    assert_eq!(cases.len(), 12);
    for case in cases {
        let targets = str_list(&case["targets"]);
        let targets: Vec<&str> = targets.iter().map(String::as_str).collect();
        let pred = case["prediction"].as_str().unwrap();
        let stem = case["use_stemmer"].as_bool().unwrap();
        let s = score_multi(&targets, pred, &RougeType::ALL, stem);
        for t in RougeType::ALL {
            let got = s.get(t).unwrap();
            let e = &case["expected"][t.name()];
            let what = format!("{} stem={stem} {pred:?}", t.name());
            assert_close(&format!("{what} precision"), got.precision, e["precision"].as_f64().unwrap(), 1e-12);
            assert_close(&format!("{what} recall"), got.recall, e["recall"].as_f64().unwrap(), 1e-12);
            assert_close(&format!("{what} fmeasure"), got.fmeasure, e["fmeasure"].as_f64().unwrap(), 1e-12);
        }
    }
}

#[test]
fn golden_rouge_tokenizer_and_stemmer() {
    let f = fixture();
    for case in f["rouge_tokenize"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let stem = case["use_stemmer"].as_bool().unwrap();
        assert_eq!(tokenize(text, stem), str_list(&case["expected"]), "tokenize({text:?}, {stem})");
    }
    let stems = f["porter"].as_object().unwrap();
    assert!(stems.len() > 90);
    for (word, stemmed) in stems {
        // The ROUGE tokenizer stems only tokens longer than 3 characters.
        let expected = if word.len() > 3 { stemmed.as_str().unwrap() } else { word.as_str() };
        assert_eq!(tokenize(word, true), [expected], "stem({word})");
    }
}

#[test]
fn corpus_rouge_means_and_bootstrap() {
    let preds = strings(&["the cat sat on the mat", "a dog ran\nit barked", "", "hello world"]);
    let refs = vec![
        strings(&["the cat is on the mat", "the dog ran away\nand barked", "nothing", "hello there world"]),
        strings(&["a cat sat", "", "", "goodbye"]),
    ];
    let report = corpus_rouge(&preds, &refs, false, None).unwrap();
    assert_eq!(report.n_examples, 4);
    for t in RougeType::ALL {
        let per: Vec<_> = (0..4)
            .map(|i| score_multi(&[refs[0][i].as_str(), refs[1][i].as_str()], &preds[i], &[t], false).get(t).unwrap())
            .collect();
        let mean = per.iter().map(|s| s.fmeasure).sum::<f64>() / 4.0;
        assert_close(t.name(), report.get(t).fmeasure, mean, 1e-15);
        assert!(report.get(t).low.is_none());
    }
    // The multi-reference maximum is per type: example 0's best rouge2 target is the first stream.
    assert!(report.rouge1.fmeasure > 0.3);

    let a = corpus_rouge(&preds, &refs, false, Some((200, 42))).unwrap();
    let b = corpus_rouge(&preds, &refs, false, Some((200, 42))).unwrap();
    let c = corpus_rouge(&preds, &refs, false, Some((200, 43))).unwrap();
    assert_eq!(a, b, "the same seed gives the same intervals");
    assert_ne!(a.rouge1.low, c.rouge1.low, "another seed gives other intervals");
    for t in RougeType::ALL {
        let g = a.get(t);
        let (low, mid, high) = (g.low.unwrap(), g.mid.unwrap(), g.high.unwrap());
        assert!(low.fmeasure <= mid.fmeasure && mid.fmeasure <= high.fmeasure, "{}", t.name());
        assert!(low.fmeasure < high.fmeasure, "{}: a non-trivial interval", t.name());
        assert_close("mean is unchanged by bootstrapping", g.fmeasure, report.get(t).fmeasure, 0.0);
    }

    let json = serde_json::to_value(&a).unwrap();
    for key in ["rouge1", "rouge2", "rougeL", "rougeLsum"] {
        for field in ["precision", "recall", "fmeasure"] {
            assert!(json[key][field].is_f64(), "{key}.{field} in {json}");
        }
        assert!(json[key]["low"]["fmeasure"].is_f64() && json[key]["high"]["fmeasure"].is_f64());
    }
    assert_eq!(json["bootstrap"]["n_samples"], 200);
}

#[test]
fn rouge_lsum_uses_sentences() {
    // With the sentences in a different order, whole-text LCS drops tokens but summary-level
    // union LCS finds them all.
    let target = "a b c\nd e f";
    let pred = "d e f\na b c";
    let s = score(target, pred, &RougeType::ALL, false);
    assert_close("rougeLsum", s.rouge_lsum.unwrap().fmeasure, 1.0, 0.0);
    assert_close("rougeL", s.rouge_l.unwrap().fmeasure, 0.5, 0.0);
}

#[test]
fn invalid_inputs_are_errors() {
    let (hyps, refs) = readme();
    let opts = BleuOptions::default();
    let short = vec![refs[0][..2].to_vec()];
    assert!(matches!(corpus_bleu(&hyps, &short, &opts), Err(EvalError::MetricInput(_))));
    assert!(matches!(corpus_bleu(&hyps, &[], &opts), Err(EvalError::MetricInput(_))));
    assert!(matches!(corpus_bleu(&[], &[vec![]], &opts), Err(EvalError::MetricInput(_))));
    assert!(matches!(corpus_chrf(&hyps, &short, 2), Err(EvalError::MetricInput(_))));
    assert!(matches!(corpus_chrf(&hyps, &refs, 1000), Err(EvalError::InvalidOption(_))));
    assert!(matches!(corpus_rouge(&hyps, &short, false, None), Err(EvalError::MetricInput(_))));
    assert!(matches!(corpus_rouge(&hyps, &refs, false, Some((0, 1))), Err(EvalError::InvalidOption(_))));
    let err = "13b".parse::<BleuTokenize>().unwrap_err();
    assert_eq!(err.to_string(), "unknown BLEU tokenizer '13b' (expected one of: none, 13a, intl, char, zh)");
    assert!(Smoothing::parse("exp", Some(0.1)).is_err());
    assert!(Smoothing::parse("floor", Some(f64::NAN)).is_err());
    assert!(Smoothing::parse("laplace", None).is_err());
    let msg = corpus_bleu(&hyps, &short, &opts).unwrap_err().to_string();
    assert!(msg.contains("reference stream 1 has 2 segments but there are 3 hypotheses"), "{msg}");
}

#[test]
fn lowercase_and_effective_order() {
    let hyps = strings(&["THE DOG"]);
    let refs = vec![strings(&["the dog barked"])];
    let mixed = corpus_bleu(&hyps, &refs, &BleuOptions::default()).unwrap();
    assert_eq!(mixed.score, 0.0);
    let opts = BleuOptions { lowercase: true, effective_order: true, ..Default::default() };
    let lc = corpus_bleu(&hyps, &refs, &opts).unwrap();
    // sacrebleu: BLEU(lowercase=True, effective_order=True) -> 60.653065971263366: precisions
    // [100, 100, 0, 0], only the 2 orders with hypothesis n-grams count, bp = exp(1 - 3/2).
    assert_close("score", lc.score, 60.653065971263366, 1e-12);
    assert_eq!(lc.precisions, [100.0, 100.0, 0.0, 0.0]);
    assert_close("bp", lc.bp, 0.6065306597126334, 1e-15);
    assert_eq!(lc.signature, "nrefs:1|case:lc|eff:yes|tok:13a|smooth:exp|version:2.6.0");
}
