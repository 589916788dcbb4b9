"""Precision of every filter rule and of the near-duplicate check, against hand labels of the 52K Chinese set.

The labels in benchmarks/audit/ name records of the fixture by index (and a hash of their text,
checked here) with a verdict read by a person: which rule's reason truly applies, or ok. This
script reruns the rules and the near-duplicate check and prints, per split (tune: what the rules
were adjusted on; held: reported), the precision of each rule for its own reason, near-duplicate
precision and recall of three similarity measures, and the junk rate in what is kept.

    python benchmarks/audit_bench.py            # held-out half (the README figures)
    python benchmarks/audit_bench.py --split all
"""

from __future__ import annotations

import argparse
import collections
import gzip
import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np

from selfinstruct.rules import REASONS, RuleSettings, check
from selfinstruct.similarity import BatchDedup, dedup_text, over, rouge_l, tokenize, topic_text

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO.parent / "shared" / "fixtures" / "alpaca-chinese-dataset__alpaca_chinese_part_0-52.json.gz"
AUDIT = REPO / "benchmarks" / "audit"
# How many pairs of the whole fixture fall in each stratum the labelled pairs were drawn from
# (char ROUGE-L F1, pairs counted by BatchDedup.similar_pairs): recall is weighted by them.
# The fourth stratum holds pairs at or below 0.5 whose topic texts (similarity.topic_text, what --field topic compares)
# score above 0.7: the same topic in other words, which char ROUGE-L never reaches (similar_pairs on topic texts).
STRATA = {"instruction-only>0.7": 7576, "instruction+input>0.7": 5860, "instruction+input 0.5-0.7": 248033,
          "topic>0.7, char<=0.5": 17188}
GOOD = ("ok", "flawed")  # flawed: a translation artifact or a wrong answer, which no rule can see


def sha(r: dict) -> str:
    return hashlib.sha256((r["instruction"] + "\x1f" + r["input"] + "\x1f" + r["output"]).encode()).hexdigest()[:12]


def load(name: str) -> list[dict]:
    return [json.loads(line) for line in (AUDIT / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def word_rouge():
    """ROUGE-L over jieba words, or None when jieba is not installed."""
    try:
        import jieba
        from rapidfuzz.distance import Indel
    except ImportError:
        return None
    jieba.setLogLevel(60)

    def words(t: str) -> list[str]:
        return [w for w in jieba.lcut(t.lower()) if any(c.isalnum() for c in w)]

    return lambda a, b: Indel.normalized_similarity(words(a), words(b))


def rarity_rouge(texts: list[str]):
    """ROUGE-L over characters weighted by rarity (log N/df over `texts`): shared templates weigh little."""
    df = collections.Counter()
    for t in texts:
        df.update(set(tokenize(t)))
    n = len(texts)

    def score(a: str, b: str) -> float:
        ta, tb = tokenize(a), tokenize(b)
        wa = [math.log(n / (df.get(x, 0) + 1)) for x in ta]
        wb = [math.log(n / (df.get(x, 0) + 1)) for x in tb]
        prev = [0.0] * (len(tb) + 1)
        for i, x in enumerate(ta):  # the heaviest common subsequence
            cur = [0.0] * (len(tb) + 1)
            for j, y in enumerate(tb):
                cur[j + 1] = prev[j] + wa[i] if x == y else max(prev[j + 1], cur[j])
            prev = cur
        total = sum(wa) + sum(wb)
        return 2 * prev[-1] / total if total else 1.0

    return score


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", choices=("held", "tune", "all"), default="held")
    ap.add_argument("--lang", default="zh")
    args = ap.parse_args()
    if not FIXTURE.exists():
        sys.exit(f"fixture {FIXTURE} not found: check out ../shared beside the repo")
    data = json.loads(gzip.decompress(FIXTURE.read_bytes()))
    records = [r for r in load("records.jsonl") if args.split in ("all", r["split"])]
    pairs = [p for p in load("pairs.jsonl") if args.split in ("all", p["split"])]
    stale = [r["index"] for r in records if sha(data[r["index"]]) != r["sha"]]
    if stale:
        sys.exit(f"labels do not match the fixture at indices {stale[:5]}: another version of the data?")

    settings = RuleSettings(lang=args.lang, enabled=frozenset(REASONS))  # every rule, as filter runs them
    verdicts = [check(r["instruction"], r["input"], r["output"], settings) for r in data]
    fired = collections.Counter(v[0] for v in verdicts if v)
    print(f"== rules on {len(data):,} records ({args.split} labels: {len(records)} records, {len(pairs)} pairs)\n")
    print(f"{'rule':<24}{'rejected':>9}{'judged':>8}{'right':>7}{'precision':>11}")
    for rule in REASONS:
        judged = [r for r in records if verdicts[r["index"]] and verdicts[r["index"]][0] == rule]
        right = sum(r["label"] == rule for r in judged)
        prec = f"{right / len(judged):.2f}" if judged else "-"
        print(f"{rule:<24}{fired[rule]:>9,}{len(judged):>8}{right:>7}{prec:>11}")

    # Kept: what survives the rules, then near-duplicates on the topic (the default --field; exact copies included).
    standing = [i for i, v in enumerate(verdicts) if v is None]
    dedup = BatchDedup(0.7).run([topic_text(data[i]["instruction"], data[i]["input"]) for i in standing])
    kept = {standing[k] for k in np.flatnonzero(dedup.keep)}
    sample = [r for r in records if r["sampled_as"] == "kept" and r["index"] in kept]
    junk = [r for r in sample if r["label"] not in GOOD]
    flawed = [r for r in sample if r["label"] == "flawed"]
    print(f"\n== kept: {len(kept):,} of {len(data):,}; near-duplicates dropped {int((~dedup.keep).sum()):,}")
    if sample:
        print(f"judged kept records: {len(sample)}; junk a rule could see: {len(junk)} ({len(junk) / len(sample):.1%}); "
              f"flawed otherwise (translation artifacts, wrong answers): {len(flawed)} ({len(flawed) / len(sample):.1%})")
        for r in junk:
            print(f"  kept junk #{r['index']}: {r['note']}")

    measures = {
        "char ROUGE-L, instruction": lambda a, b: rouge_l(a["instruction"], b["instruction"]),
        "char ROUGE-L, instruction+input": lambda a, b: rouge_l(dedup_text(a["instruction"], a["input"]), dedup_text(b["instruction"], b["input"])),
    }
    rare = rarity_rouge([dedup_text(r["instruction"], r["input"]) for r in data])
    measures["rarity-weighted char ROUGE-L, instr.+input"] = lambda a, b: rare(dedup_text(a["instruction"], a["input"]), dedup_text(b["instruction"], b["input"]))
    measures["char ROUGE-L, topic (the default)"] = lambda a, b: rouge_l(topic_text(a["instruction"], a["input"]), topic_text(b["instruction"], b["input"]))
    words = word_rouge()
    if words is not None:
        measures["jieba word ROUGE-L, instruction+input"] = lambda a, b: words(dedup_text(a["instruction"], a["input"]), dedup_text(b["instruction"], b["input"]))
    else:
        print("\n(jieba not installed: the word-level measure is skipped; pip install jieba)")
    sampled = collections.Counter(p["stratum"] for p in pairs)
    weight = {s: STRATA[s] / n for s, n in sampled.items()}
    true = sum(p["duplicate"] for p in pairs)
    print(f"\n== near-duplicate pairs: {len(pairs)} judged, {true} the same task (recall weighted by stratum size)")
    print("(w.: each judged pair stands for its stratum's pairs in the whole fixture; a stratum one measure drew is\n"
          " found by it whole, so read that measure's recall there with care)")
    print(f"{'measure':<44}{'> t':>5}{'flagged':>9}{'precision':>11}{'recall':>8}{'w.prec':>8}{'w.recall':>10}")
    for name, score in measures.items():
        scores = [score(data[p["a"]], data[p["b"]]) for p in pairs]
        for t in (0.6, 0.7, 0.8):
            hit = [over(s, t) for s in scores]
            tp = sum(h and p["duplicate"] for h, p in zip(hit, pairs))
            flagged = sum(hit)
            w_tp = sum(weight[p["stratum"]] for h, p in zip(hit, pairs) if h and p["duplicate"])
            w_true = sum(weight[p["stratum"]] for p in pairs if p["duplicate"])
            w_flagged = sum(weight[p["stratum"]] for h, p in zip(hit, pairs) if h)
            wprec = f"{w_tp / w_flagged:.2f}" if w_flagged else "-"
            prec = f"{tp / flagged:.2f}" if flagged else "-"
            rec = f"{tp / true:.2f}" if true else "-"
            wrec = f"{w_tp / w_true:.2f}" if w_true else "-"
            print(f"{name:<44}{t:>5}{flagged:>9}{prec:>11}{rec:>8}{wprec:>8}{wrec:>10}")


if __name__ == "__main__":
    main()
