#!/usr/bin/env python3
"""Compare kiln's BLEU / chrF / chrF++ / ROUGE with sacrebleu and rouge-score on random corpora.

For every configuration (each BLEU tokenizer, lowercasing, each smoothing method, chrF, chrF++,
ROUGE with and without stemming) the script generates seeded random corpora (varied lengths,
punctuation, HTML entities, numbers, Unicode letters / punctuation / symbols / CJK, odd
whitespace, empty lines, 1-3 reference streams), writes hypothesis and reference files, scores
them with the Python packages and with kiln, and compares every reported value, corpus-level and
segment by segment. It prints the maximum absolute difference per configuration and exits with
status 1 if any difference exceeds the tolerance (default 1e-4) or any integer statistic or
signature differs.

kiln is run as `cargo run -q -p kiln-eval --example metrics_json --` (from the repository root),
or as the command in $KILN_METRICS_CMD (e.g. `kiln eval-json` once the CLI has it); it receives
`--metric bleu|chrf|chrf++|rouge --hyp F --ref F [--ref F2 ...] [--tokenize T] [--lowercase]
[--smooth M] [--smooth-value V] [--stem] [--lsum-sep <n>] [--segments]` and prints one JSON
object.

Usage: /work/venv/bin/python tools/metrics/compare_metrics.py [--seed 1] [--corpora 4]
           [--segments 120] [--tol 1e-4] [--keep DIR]
Requires: pip install sacrebleu rouge-score
"""
import argparse
import json
import os
import random
import shlex
import subprocess
import sys
import tempfile

import numpy as np
import sacrebleu
from rouge_score import rouge_scorer, scoring
from sacrebleu.metrics import BLEU, CHRF

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CMD = "cargo run -q -p kiln-eval --example metrics_json --"
LSUM_SEP = "<n>"
ROUGE_TYPES = ["rouge1", "rouge2", "rougeL", "rougeLsum"]

# ------------------------------------------------------------------------------------------
# Random text
# ------------------------------------------------------------------------------------------

WORDS = (
    "the a an of to and in is was it that he she they we you not no one man dog cat bit bitten "
    "had just him first surprised surprising unexpected quick brown fox jumps over lazy log on "
    "running runs ran happiness happily generalization generalize controlled controlling skies "
    "dying lying agreed relational conditional hopeful goodness ponies caresses feed plastered "
    "motoring hopping falling filing happy national operator adjustment communism activate "
    "effective bowdlerize probate controll rolling innings news proceed exceed model models "
    "train training trained evaluation evaluate language languages token tokens translation"
).split()
CAPS = ["The", "It", "Dog", "NASA", "McDonald", "IBM", "Paris", "John", "O'Neil", "ΟΔΟΣ", "Σ"]
NUMBERS = ["3", "3.5", "1,000", "2020", "2020.", "10-20", "42", "0.5%", "$5", "7th", "1990s", "٣", "३"]
PUNCT = list(".,!?;:'\"()[]{}-/&@#*+=<>|~^_`") + ["...", "--", "'s", "n't"]
ENTITIES = ["&amp;", "&quot;", "&lt;", "&gt;", "&apos;", "<skipped>", "AT&T"]
UNICODE_WORDS = [
    "café", "naïve", "Straße", "über", "Ärger", "élan", "привет", "мир", "γειά", "σου",
    "我爱北京天安门", "日本語", "한국어", "中文", "ＡＢＣ１２３", "ｶﾀｶﾅ", "שלום", "مرحبا",
    "İstanbul", "ﬁle", "e\u0301", "K\u212a", "x\u200by",
]
UNICODE_PUNCT = ["«", "»", "„", "“", "”", "‘", "’", "—", "–", "…", "¿", "¡", "、", "。", "，", "！", "·", "‹", "›"]
SYMBOLS = ["€", "£", "©", "®", "™", "°", "±", "×", "÷", "→", "★", "♥", "😀", "∑", "√", "¥", "§", "¶", "☃", "⚡"]
SPACES = ["\t", "\u00a0", "\u3000", "\u2009", "\x1c", "\x1f", "\u2028", "\x85", "\r", "\x0b", "\x0c"]


def rand_token(rng):
    r = rng.random()
    if r < 0.55:
        return rng.choice(WORDS)
    if r < 0.62:
        return rng.choice(CAPS)
    if r < 0.70:
        return rng.choice(NUMBERS)
    if r < 0.80:
        return rng.choice(PUNCT)
    if r < 0.83:
        return rng.choice(ENTITIES)
    if r < 0.91:
        return rng.choice(UNICODE_WORDS)
    if r < 0.96:
        return rng.choice(UNICODE_PUNCT)
    return rng.choice(SYMBOLS)


def join_tokens(rng, toks):
    out = []
    for i, t in enumerate(toks):
        if i > 0:
            r = rng.random()
            if r < 0.80:
                out.append(" ")
            elif r < 0.90:
                pass  # glue tokens together: "word." "(word" "3.5-4"
            elif r < 0.95:
                out.append("  ")
            else:
                out.append(rng.choice(SPACES))
        out.append(t)
    s = "".join(out)
    r = rng.random()
    if r < 0.05:
        s = " " + s
    elif r < 0.10:
        s = s + rng.choice([" ", "\t", "\u00a0", " \u3000"])
    return s


def rand_sentence(rng, max_len):
    n = rng.randint(0, max_len) if rng.random() < 0.3 else rng.randint(1, max(1, max_len // 2))
    return [rand_token(rng) for _ in range(n)]


def perturb(rng, toks):
    out = []
    for t in toks:
        r = rng.random()
        if r < 0.08:
            continue
        if r < 0.16:
            out.append(rand_token(rng))
        elif r < 0.20:
            out.extend([t, rand_token(rng)])
        elif r < 0.24:
            out.append(t.upper() if rng.random() < 0.5 else t.lower())
        else:
            out.append(t)
    if len(out) > 2 and rng.random() < 0.2:
        i = rng.randrange(len(out) - 1)
        out[i], out[i + 1] = out[i + 1], out[i]
    return out


def rand_corpus(rng, n_segments, n_refs, max_len, multi_sentence=False):
    """Returns hyps (list of str) and refs (list of n_refs streams)."""
    hyps, refs = [], [[] for _ in range(n_refs)]

    def text(toks_list):
        if not multi_sentence:
            return join_tokens(rng, toks_list[0])
        return LSUM_SEP.join(join_tokens(rng, t) for t in toks_list)

    for _ in range(n_segments):
        n_sents = rng.randint(1, 4) if multi_sentence else 1
        base = [rand_sentence(rng, max_len) for _ in range(n_sents)]
        for k in range(n_refs):
            if rng.random() < 0.04:
                refs[k].append("")
            else:
                refs[k].append(text(base if k == 0 else [perturb(rng, s) for s in base]))
        r = rng.random()
        if r < 0.05:
            hyps.append("")
        elif r < 0.15:
            hyps.append(text([rand_sentence(rng, max_len) for _ in range(n_sents)]))
        else:
            hyps.append(text([perturb(rng, s) for s in base]))
    return hyps, refs


# ------------------------------------------------------------------------------------------
# Files and kiln
# ------------------------------------------------------------------------------------------


def write_lines(path, lines):
    for line in lines:
        assert "\n" not in line
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for line in lines:
            f.write(line + "\n")


def read_lines(path, rstrip):
    """As sacrebleu's command line: split on \\n only, then rstrip() (BLEU / chrF)."""
    with open(path, encoding="utf-8", newline="\n") as f:
        return [line.rstrip() if rstrip else line[:-1] if line.endswith("\n") else line for line in f]


def run_kiln(cmd, args):
    proc = subprocess.run(cmd + args, cwd=ROOT, capture_output=True, text=True, encoding="utf-8")
    if proc.returncode != 0:
        raise RuntimeError(f"kiln failed ({proc.returncode}): {' '.join(args)}\n{proc.stderr}")
    return json.loads(proc.stdout)


# ------------------------------------------------------------------------------------------
# Comparisons
# ------------------------------------------------------------------------------------------


class Tracker:
    def __init__(self, tol):
        self.tol = tol
        self.max_diff = {}
        self.values = {}
        self.failures = []

    def num(self, config, what, ours, theirs):
        d = abs(float(ours) - float(theirs))
        self.max_diff[config] = max(self.max_diff.get(config, 0.0), d)
        self.values[config] = self.values.get(config, 0) + 1
        if not d <= self.tol:
            self.failures.append(f"{config}: {what}: kiln {ours!r} vs reference {theirs!r} (diff {d:.3g})")

    def exact(self, config, what, ours, theirs):
        self.values[config] = self.values.get(config, 0) + 1
        self.max_diff.setdefault(config, 0.0)
        if ours != theirs:
            self.failures.append(f"{config}: {what}: kiln {ours!r} vs reference {theirs!r}")


def compare_bleu_score(t, config, where, ours, ref, add_k=None):
    t.num(config, f"{where} score", ours["score"], ref.score)
    t.num(config, f"{where} bp", ours["bp"], ref.bp)
    for n in range(4):
        t.num(config, f"{where} precision[{n + 1}]", ours["precisions"][n], ref.precisions[n])
        counts, totals = ours["counts"][n], ours["totals"][n]
        if add_k is not None and n > 0 and any(ours["counts"]):
            # sacrebleu reports add-k counts/totals with k already added to orders 2..4.
            counts, totals = counts + add_k, totals + add_k
        t.exact(config, f"{where} counts[{n + 1}]", counts, ref.counts[n])
        t.exact(config, f"{where} totals[{n + 1}]", totals, ref.totals[n])
    t.exact(config, f"{where} sys_len", ours["sys_len"], ref.sys_len)
    t.exact(config, f"{where} ref_len", ours["ref_len"], ref.ref_len)


def check_bleu(t, cmd, d, tok, lowercase, smooth, smooth_value):
    config = f"BLEU tok={tok}" + (" lc" if lowercase else "") + (f" smooth={smooth}" if smooth != "exp" else "")
    config += f"[{smooth_value}]" if smooth_value is not None else ""
    hyps = read_lines(os.path.join(d, "hyp.txt"), True)
    refs = [read_lines(p, True) for p in ref_paths(d)]
    bleu = BLEU(tokenize=tok, lowercase=lowercase, smooth_method=smooth, smooth_value=smooth_value, force=True)
    ref = bleu.corpus_score(hyps, refs)
    args = ["--metric", "bleu", "--tokenize", tok, "--smooth", smooth, "--segments"]
    args += ["--lowercase"] if lowercase else []
    args += ["--smooth-value", str(smooth_value)] if smooth_value is not None else []
    ours = run_kiln(cmd, args + io_args(d))
    add_k = (1 if smooth_value is None else smooth_value) if smooth == "add-k" else None
    compare_bleu_score(t, config, "corpus", ours, ref, add_k)
    t.exact(config, "signature", ours["signature"], str(bleu.get_signature()))
    for i, seg in enumerate(ours["segments"]):
        b = BLEU(tokenize=tok, lowercase=lowercase, smooth_method=smooth, smooth_value=smooth_value, force=True)
        compare_bleu_score(t, config, f"segment {i}", seg, b.corpus_score([hyps[i]], [[r[i]] for r in refs]), add_k)
    return config


def check_chrf(t, cmd, d, word_order):
    config = "chrF++" if word_order else "chrF"
    hyps = read_lines(os.path.join(d, "hyp.txt"), True)
    refs = [read_lines(p, True) for p in ref_paths(d)]
    chrf = CHRF(word_order=word_order)
    ref = chrf.corpus_score(hyps, refs)
    ours = run_kiln(cmd, ["--metric", "chrf++" if word_order else "chrf", "--segments"] + io_args(d))
    t.num(config, "corpus score", ours["score"], ref.score)
    t.exact(config, "signature", ours["signature"], str(chrf.get_signature()))
    for i, s in enumerate(ours["segments"]):
        r = CHRF(word_order=word_order).corpus_score([hyps[i]], [[x[i]] for x in refs])
        t.num(config, f"segment {i} score", s, r.score)
    return config


def check_rouge(t, cmd, d, stem, bootstrap_report):
    config = "ROUGE" + (" stem" if stem else "")
    hyps = [x.replace(LSUM_SEP, "\n") for x in read_lines(os.path.join(d, "hyp.txt"), False)]
    refs = [[x.replace(LSUM_SEP, "\n") for x in read_lines(p, False)] for p in ref_paths(d)]
    scorer = rouge_scorer.RougeScorer(ROUGE_TYPES, use_stemmer=stem)
    per = [scorer.score_multi([r[i] for r in refs], h) for i, h in enumerate(hyps)]
    args = ["--metric", "rouge", "--lsum-sep", LSUM_SEP, "--segments"] + (["--stem"] if stem else [])
    args += ["--bootstrap", "1000", "--seed", "7"] if bootstrap_report else []
    ours = run_kiln(cmd, args + io_args(d))
    for rt in ROUGE_TYPES:
        for f in ("precision", "recall", "fmeasure"):
            mean = float(np.mean([getattr(p[rt], f) for p in per]))
            t.num(config, f"mean {rt}.{f}", ours[rt][f], mean)
            for i, seg in enumerate(ours["segments"]):
                t.num(config, f"segment {i} {rt}.{f}", seg[rt][f], getattr(per[i][rt], f))
    if bootstrap_report:
        np.random.seed(7)
        agg = scoring.BootstrapAggregator()
        for p in per:
            agg.add_scores(p)
        res = agg.aggregate()
        print(f"  bootstrap ({config}, fmeasure; kiln vs rouge-score, different RNGs, informational):")
        for rt in ROUGE_TYPES:
            o = ours[rt]
            print(
                f"    {rt:9s} kiln low/mid/high {o['low']['fmeasure']:.4f}/{o['mid']['fmeasure']:.4f}/"
                f"{o['high']['fmeasure']:.4f}  rouge-score {res[rt].low.fmeasure:.4f}/"
                f"{res[rt].mid.fmeasure:.4f}/{res[rt].high.fmeasure:.4f}  mean {o['fmeasure']:.4f}"
            )
    return config


def ref_paths(d):
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.startswith("ref"))


def io_args(d):
    args = ["--hyp", os.path.join(d, "hyp.txt")]
    for p in ref_paths(d):
        args += ["--ref", p]
    return args


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--corpora", type=int, default=4, help="random corpora per configuration")
    ap.add_argument("--segments", type=int, default=120, help="segments per corpus (varies +-50%%)")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--keep", help="write the corpora under this directory and keep them")
    args = ap.parse_args()

    cmd = shlex.split(os.environ.get("KILN_METRICS_CMD", DEFAULT_CMD))
    if cmd[:2] == ["cargo", "run"]:  # build once so that every call below is quick
        subprocess.run(["cargo", "build", "-q", "-p", "kiln-eval", "--example", "metrics_json"], cwd=ROOT, check=True)
    import rouge_score  # noqa: F401
    from importlib.metadata import version

    print(f"sacrebleu {sacrebleu.__version__}, rouge-score {version('rouge-score')}, nltk {version('nltk')}")
    print(f"kiln command: {' '.join(cmd)}")

    t = Tracker(args.tol)
    rng = random.Random(args.seed)
    base = args.keep or tempfile.mkdtemp(prefix="kiln-metrics-")
    os.makedirs(base, exist_ok=True)

    configs = [("bleu", tok, False, "exp", None) for tok in ["13a", "none", "intl", "char", "zh"]]
    configs += [("bleu", "13a", True, "exp", None), ("bleu", "intl", True, "exp", None)]
    configs += [("bleu", "13a", False, "floor", None), ("bleu", "13a", False, "add-k", None)]
    configs += [("bleu", "13a", False, "none", None), ("bleu", "13a", False, "floor", 0.25)]
    configs += [("chrf", 0), ("chrf", 2), ("rouge", False), ("rouge", True)]
    segments = {}
    for ci, cfg in enumerate(configs):
        for k in range(args.corpora):
            d = os.path.join(base, f"c{ci:02d}_{k}")
            os.makedirs(d, exist_ok=True)
            n_seg = rng.randint(max(1, args.segments // 2), args.segments * 3 // 2)
            if k == 0:
                n_seg = rng.randint(1, 3)  # tiny corpora too
            n_refs = rng.choice([1, 1, 2, 3])
            max_len = rng.choice([5, 15, 40])
            hyps, refs = rand_corpus(rng, n_seg, n_refs, max_len, multi_sentence=cfg[0] == "rouge")
            write_lines(os.path.join(d, "hyp.txt"), hyps)
            for j, r in enumerate(refs):
                write_lines(os.path.join(d, f"ref{j}.txt"), r)
            if cfg[0] == "bleu":
                name = check_bleu(t, cmd, d, *cfg[1:])
            elif cfg[0] == "chrf":
                name = check_chrf(t, cmd, d, cfg[1])
            else:
                name = check_rouge(t, cmd, d, cfg[1], bootstrap_report=(k == args.corpora - 1))
            segments[name] = segments.get(name, 0) + n_seg

    print(f"\n{'configuration':28s} {'segments':>8s} {'values':>8s} {'max |diff|':>12s}")
    for name in segments:
        print(f"{name:28s} {segments[name]:8d} {t.values.get(name, 0):8d} {t.max_diff.get(name, 0.0):12.3g}")
    if not args.keep:
        import shutil

        shutil.rmtree(base, ignore_errors=True)
    if t.failures:
        print(f"\n{len(t.failures)} mismatches (tolerance {args.tol}); first 30:")
        for f in t.failures[:30]:
            print("  " + f)
        return 1
    print(f"\nall values within {args.tol}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
