#!/usr/bin/env python3
"""Write crates/kiln-eval/tests/fixtures/metrics_golden.json: golden values from sacrebleu and
rouge-score for kiln-eval's tests (tests/metrics.rs).

Usage: /work/venv/bin/python tools/metrics/make_fixtures.py
Requires: pip install sacrebleu rouge-score   (the fixture records the versions used)
"""
import json
import os
from importlib.metadata import version

import sacrebleu
from nltk.stem import porter
from rouge_score import rouge_scorer, tokenize
from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.metrics.bleu import _get_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "crates", "kiln-eval", "tests", "fixtures", "metrics_golden.json")

# The example of sacrebleu's README.
README_HYPS = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
README_REFS = [
    ["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
    ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."],
]

UNICODE_HYPS = [
    "Ünïcödé « quoted » text — 3.5% of €100, AT&amp;T's (deal).",
    "我爱北京天安门，天安门上太阳升。",
    "ΟΔΟΣ İstanbul ＡＢＣ１２３ 😀★ x\u200by\u3000end ",
    "",
]
UNICODE_REFS = [
    ["Unicode «quoted» text — 3.5 % of € 100, AT&T's deal.", "我爱北京天安门。", "οδος istanbul ABC123 ★", "nothing"],
    ["Ünïcödé “quoted” text: 3,5% of 100€ (AT&T)", "我 爱 北京 天安门 ， 太阳 升 。", "ΟΔΟΣ İstanbul", ""],
]

# Closest reference length: hypothesis of 4 tokens, references of 3 and 5 tokens -> 3 (shorter).
TIE_HYPS = ["a b c d", "one two three four five six"]
TIE_REFS = [["a b c", "one two three"], ["a b c d e", "one two three four five six seven eight nine"]]

# Short hypotheses: no 3- and 4-gram matches, exercising the smoothing methods.
SHORT_HYPS = ["the cat", "a dog sat on mat", "hello"]
SHORT_REFS = [["the cat sat", "the dog sat on the mat", "hello world"]]


def bleu_case(hyps, refs, tokenize="13a", lowercase=False, smooth="exp", smooth_value=None):
    bleu = BLEU(tokenize=tokenize, lowercase=lowercase, smooth_method=smooth, smooth_value=smooth_value, force=True)
    s = bleu.corpus_score(hyps, refs)
    return {
        "hyps": hyps,
        "refs": refs,
        "tokenize": tokenize,
        "lowercase": lowercase,
        "smooth": smooth,
        "smooth_value": smooth_value,
        "expected": {
            "score": s.score,
            # sacrebleu adds k to the add-k counts/totals of orders 2..4; kiln reports raw counts.
            "counts": [int(c) for c in s.counts],
            "totals": [int(c) for c in s.totals],
            "precisions": list(s.precisions),
            "bp": s.bp,
            "sys_len": s.sys_len,
            "ref_len": s.ref_len,
            "signature": str(bleu.get_signature()),
        },
    }


def chrf_case(hyps, refs, word_order):
    chrf = CHRF(word_order=word_order)
    s = chrf.corpus_score(hyps, refs)
    return {
        "hyps": hyps,
        "refs": refs,
        "word_order": word_order,
        "expected": {"name": s.name, "score": s.score, "signature": str(chrf.get_signature())},
    }


def rouge_case(targets, prediction, use_stemmer):
    types = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    scorer = rouge_scorer.RougeScorer(types, use_stemmer=use_stemmer)
    s = scorer.score_multi(targets, prediction)
    return {
        "targets": targets,
        "prediction": prediction,
        "use_stemmer": use_stemmer,
        "expected": {t: {"precision": s[t].precision, "recall": s[t].recall, "fmeasure": s[t].fmeasure} for t in types},
    }


def main():
    bleu = []
    for tok in ["13a", "none", "intl", "char", "zh"]:
        bleu.append(bleu_case(README_HYPS, README_REFS, tokenize=tok))
        bleu.append(bleu_case(UNICODE_HYPS, UNICODE_REFS, tokenize=tok))
    bleu.append(bleu_case(README_HYPS, README_REFS[:1]))
    bleu.append(bleu_case(README_HYPS, README_REFS, lowercase=True))
    bleu.append(bleu_case(UNICODE_HYPS, UNICODE_REFS, tokenize="intl", lowercase=True))
    bleu.append(bleu_case(TIE_HYPS, TIE_REFS))
    for smooth, value in [("exp", None), ("floor", None), ("floor", 0.5), ("add-k", None), ("add-k", 2), ("none", None)]:
        bleu.append(bleu_case(SHORT_HYPS, SHORT_REFS, smooth=smooth, smooth_value=value))
    bleu.append(bleu_case(["", "x"], [["a b", ""]]))

    chrf = []
    for wo in [0, 2]:
        chrf.append(chrf_case(README_HYPS, README_REFS, wo))
        chrf.append(chrf_case(README_HYPS, README_REFS[:1], wo))
        chrf.append(chrf_case(UNICODE_HYPS, UNICODE_REFS, wo))
        chrf.append(chrf_case(["(hi) there, you!", ""], [["hi (there) you !", "x"]], wo))

    quick = "The quick brown fox jumps over the lazy dog"
    rouge = []
    for stem in [False, True]:
        rouge.append(rouge_case([quick], "The quick brown dog jumps on the log.", stem))
        rouge.append(
            rouge_case(
                ["The cats were running.\nThey jumped over dogs happily.\nNothing else happened."],
                "Cats ran and jumped.\nThe dogs were happy, nothing happened.",
                stem,
            )
        )
        rouge.append(rouge_case(["a b c", "the generalizations were controlling", "b c a"], "b a c d", stem))
        rouge.append(rouge_case(["", "..."], "nothing here", stem))
        # ROUGE-Lsum depends on which LCS the back-tracking picks: here rouge-score's rule (move up
        # in the target on ties) gives F = 0.364; moving left on ties would give 0.182.
        rouge.append(rouge_case(["c c a"], "d d d c b\nd c\nb", stem))
        rouge.append(rouge_case(["Ünïcödé 3.5% 我爱 ΟΔΟΣ KELVIN\u212a"], "unicode 3 5 ΟΔΟΣ kelvink", stem))

    words = (
        "caresses ponies ties caress cats feed agreed plastered bled motoring sing conflated troubled "
        "sized hopping tanned falling hissing fizzed failing filing happy sky relational conditional "
        "rational valenci hesitanci digitizer conformabli radicalli differentli vileli analogousli "
        "vietnamization predication operator feudalism decisiveness hopefulness callousness formaliti "
        "sensitiviti sensibiliti triplicate formative formalize electriciti electrical hopeful goodness "
        "revival allowance inference airliner gyroscopic adjustable defensible irritant replacement "
        "adjustment dependent adoption homologou communism activate angulariti homologous effective "
        "bowdlerize probate rate cease controll roll dying lying tying news innings outings cannings "
        "howe proceed exceed succeed skies spied flies enjoy generously analogies fulli yyyy yays "
        "abated 1990s ies eed ying"
    ).split()
    stemmer = porter.PorterStemmer()
    stems = {w: stemmer.stem(w) for w in words}

    tok_lines = [
        "Hello, world! It's 3.5-4 o'clock... (Really?) \"quoted\" &amp; &lt;b&gt; 1,000.00 e-mail",
        "x<skipped>y -- a/b [c]{d} @home #tag $5 100% ~tilde^ `tick` under_score",
        "Ünïcödé « quoted » — 3.5% of €100, AT&T's 2020. end.",
        "我爱北京天安门，天安门上太阳升。ABC 1,2 x.y ★☃ ∑",
        "  \u3000leading and trailing\u00a0 ",
    ]
    tokenizers = []
    for tok in ["13a", "none", "intl", "char", "zh"]:
        t = _get_tokenizer(tok)()
        for line in tok_lines:
            tokenizers.append({"tokenize": tok, "line": line.rstrip(), "expected": t(line.rstrip())})

    rouge_tokens = []
    for text in tok_lines + ["The generalizations were controlling, running & jumping 1990s!"]:
        for stem in [False, True]:
            rouge_tokens.append(
                {"text": text, "use_stemmer": stem, "expected": tokenize.tokenize(text, stemmer if stem else None)}
            )

    fixture = {
        "generated_by": "tools/metrics/make_fixtures.py",
        "versions": {
            "sacrebleu": sacrebleu.__version__,
            "rouge-score": version("rouge-score"),
            "nltk": version("nltk"),
        },
        "bleu": bleu,
        "chrf": chrf,
        "rouge": rouge,
        "bleu_tokenizers": tokenizers,
        "rouge_tokenize": rouge_tokens,
        "porter": stems,
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(fixture, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
