"""How well a judge separates kept records from junk: its scores against the hand labels of benchmarks/audit.

The labels (benchmarks/audit/records.jsonl, from the filter-quality issue) name records of the 52K
Chinese Alpaca fixture by index, with a hash of their text and a verdict read by a person: `ok`, or
what is wrong (a rule's name, or `flawed` for a wrong answer no rule can see). Here `ok` is good and
every other label is junk. The script runs `selfinstruct judge --min-score 1` on those records with
the teacher given by the flags (so every verdict is kept with its score; the run directory resumes,
and a second run pays nothing), then prints, per threshold, how many good records the judge keeps and
how much junk it lets through, for all labelled records and for the ones the rules kept.

    python benchmarks/judge_calibration.py --model gpt-4o-mini --price-in 0.15 --price-out 0.6
    python benchmarks/judge_calibration.py --base-url http://localhost:8000/v1 --model qwen2.5-7b-instruct
    python benchmarks/judge_calibration.py --fake      # the fake teacher: proves the plumbing, its scores are a hash

Another labelled sample: --labels FILE with one JSON object a line, either {"index", "sha", "label"}
into the fixture (as benchmarks/audit), or {"instruction", "input", "output", "label"} directly;
--good-labels names the labels that count as good (default: ok).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO.parent / "shared" / "fixtures" / "alpaca-chinese-dataset__alpaca_chinese_part_0-52.json.gz"
LABELS = REPO / "benchmarks" / "audit" / "records.jsonl"
THRESHOLDS = (2, 3, 4, 5)


def sha(r: dict) -> str:
    return hashlib.sha256((r["instruction"] + "\x1f" + r["input"] + "\x1f" + r["output"]).encode()).hexdigest()[:12]


def load_sample(path: Path, split: str) -> list[dict]:
    """Labelled records with their text: {id, instruction, input, output, label, rules_kept}."""
    labels = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    labels = [r for r in labels if split == "all" or r.get("split", split) == split]
    data = None
    sample = []
    for i, lab in enumerate(labels):
        if "index" in lab:
            if data is None:
                if not FIXTURE.exists():
                    sys.exit(f"fixture {FIXTURE} not found: check out ../shared beside the repo")
                data = json.loads(gzip.decompress(FIXTURE.read_bytes()))
            rec = data[lab["index"]]
            if lab.get("sha") and sha(rec) != lab["sha"]:
                sys.exit(f"labels do not match the fixture at index {lab['index']}: another version of the data?")
            rid = f"a{lab['index']}"
        else:
            rec, rid = lab, str(lab.get("id", f"l{i}"))
        sample.append({"id": rid, "instruction": rec["instruction"], "input": rec.get("input", ""), "output": rec["output"],
                       "label": lab["label"], "rules_kept": lab.get("sampled_as", "kept") == "kept"})
    return sample


def judge(sample: list[dict], out: Path, passthrough: list[str], env: dict | None = None) -> dict[str, int | None]:
    """Scores by record id from `selfinstruct judge --min-score 1` (None: the judge gave no readable score)."""
    out.mkdir(parents=True, exist_ok=True)
    inputs = out.parent / f"{out.name}-input.jsonl"
    inputs.write_text("".join(json.dumps({k: r[k] for k in ("id", "instruction", "input", "output")}, ensure_ascii=False) + "\n"
                              for r in sample), encoding="utf-8")
    cmd = [sys.executable, "-m", "selfinstruct", "judge", str(inputs), "--out", str(out), "--min-score", "1", *passthrough]
    print("$", " ".join(cmd[2:]), file=sys.stderr)
    done = subprocess.run(cmd, cwd=REPO, env={**os.environ, **(env or {})})
    if done.returncode:
        sys.exit(f"selfinstruct judge exited {done.returncode}; re-run the same command to resume")
    scores: dict[str, int | None] = {}
    for name in ("records.jsonl", "rejected.jsonl"):
        path = out / name
        for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
            rec = json.loads(line)
            verdict = (rec.get("meta") or {}).get("judge")
            scores[rec["id"]] = verdict.get("score") if isinstance(verdict, dict) else None
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    stage = manifest.get("stages", {}).get("judge", {})
    print(f"judge {manifest.get('judge', {}).get('model')}: {stage.get('requests', 0):,} requests, "
          f"{stage.get('prompt_tokens', 0):,}+{stage.get('completion_tokens', 0):,} tokens, ${stage.get('usd', 0):.4f}", file=sys.stderr)
    return scores


def table(title: str, rows: list[dict], scores: dict[str, int | None], good_labels: set[str], min_score: int) -> None:
    good = [r for r in rows if r["label"] in good_labels]
    junk = [r for r in rows if r["label"] not in good_labels]
    failed = sum(scores.get(r["id"]) is None for r in rows)
    print(f"\n== {title}: {len(rows)} records, {len(good)} good, {len(junk)} junk ({len(junk) / max(len(rows), 1):.1%}); "
          f"no readable score: {failed}")
    hist = collections.Counter(scores.get(r["id"]) for r in rows)
    by = {lab: collections.Counter(scores.get(r["id"]) for r in rows if (r["label"] in good_labels) == lab) for lab in (True, False)}
    print("score   good   junk")
    for s in (5, 4, 3, 2, 1, None):
        if hist.get(s):
            print(f"{str(s) if s else '-':>5} {by[True].get(s, 0):>6} {by[False].get(s, 0):>6}")
    print("\nmin-score  good kept  junk removed  junk in kept  agreement")
    for t in THRESHOLDS:
        keep = {r["id"] for r in rows if (scores.get(r["id"]) or 0) >= t}
        good_kept = sum(r["id"] in keep for r in good)
        junk_kept = sum(r["id"] in keep for r in junk)
        agree = good_kept + (len(junk) - junk_kept)
        mark = "  <- --min-score" if t == min_score else ""
        print(f"{t:>9}  {good_kept / max(len(good), 1):>9.1%}  {1 - junk_kept / max(len(junk), 1):>12.1%}  "
              f"{junk_kept / max(len(keep), 1):>12.1%}  {agree / max(len(rows), 1):>9.1%}{mark}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="Other flags go to `selfinstruct judge` as they are "
                                 "(--model, --base-url, --api-key-env, --price-in, --price-out, --judge-model, --concurrency, --max-cost...).")
    ap.add_argument("--labels", type=Path, default=LABELS, help="labelled sample (default benchmarks/audit/records.jsonl)")
    ap.add_argument("--split", choices=("held", "tune", "all"), default="all")
    ap.add_argument("--good-labels", default="ok", help="comma-separated labels that count as good (default ok)")
    ap.add_argument("--min-score", type=int, default=4, help="the threshold to mark in the table (default 4)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N labelled records")
    ap.add_argument("--out", type=Path, default=None, help="judge run directory (default: a temporary one; give one to resume)")
    ap.add_argument("--fake", action="store_true", help="judge with the fake teacher (tests/fakes): shows the plumbing works; "
                                                        "its scores are a hash of the instruction, so the figures mean nothing")
    args, passthrough = ap.parse_known_args()
    sample = load_sample(args.labels, args.split)[: args.limit]
    if not sample:
        sys.exit("no labelled records")
    good_labels = {x.strip() for x in args.good_labels.split(",") if x.strip()}
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "judged"
        if args.fake:
            sys.path.insert(0, str(REPO / "tests"))
            from fakes.judge_replies import JudgeReplies
            from fakes.openai_server import FakeTeacher

            with FakeTeacher(reply=JudgeReplies()) as fake:
                scores = judge(sample, out, ["--base-url", fake.base_url, "--model", "fake-judge", "--quiet", *passthrough])
            print("\nFAKE TEACHER: the scores below are a hash of each instruction, not a judgement; "
                  "they show the script runs end to end, nothing about any judge.")
        else:
            scores = judge(sample, out, passthrough)
        table("all labelled records", sample, scores, good_labels, args.min_score)
        table("records the rules kept (sampled_as kept)", [r for r in sample if r["rules_kept"]], scores, good_labels, args.min_score)


if __name__ == "__main__":
    main()
