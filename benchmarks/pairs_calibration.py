"""How well a teacher's "same task?" verdict (`selfinstruct pairs`) finds true near-duplicates: against the hand-labelled pairs.

The labels (benchmarks/audit/pairs.jsonl, issue 13) name two records of the 52K Chinese Alpaca
fixture by index, with hashes of their text (checked here) and a person's verdict: the same task or
not. The script runs the real CLI, `selfinstruct pairs`, on those records with the teacher the flags
give, and reads every verdict back from each run's verdicts.jsonl. So that every labelled pair is
asked and no unlabelled one is paid for, the pairs are packed into groups in which each record is
in one labelled pair and no other pair scores above the group's --candidates (just under its
weakest labelled pair), one run a group. Then it prints precision and recall of the teacher's "same" against the labels, alone and
combined with the surface score filter uses (--field topic, ROUGE-L F1), beside the surface score alone.

    python benchmarks/pairs_calibration.py --model gpt-4o-mini --price-in 0.15 --price-out 0.6   # any `selfinstruct pairs` flags
    python benchmarks/pairs_calibration.py --base-url http://localhost:8000/v1 --model qwen2.5-7b-instruct --out /tmp/pc
    python benchmarks/pairs_calibration.py --fake      # the fake teacher: proves the plumbing, its verdicts are a rule of thumb

`--out DIR` resumes: the groups are the same for the same --split and --field, and each run resumes.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from selfinstruct.similarity import compared_text, over, rouge_l, topic_text

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from audit_bench import FIXTURE, STRATA, load, sha  # noqa: E402 - the labels' loader, hash and strata sizes, as the audit reads them

# Surface thresholds the teacher's verdict is combined with (topic ROUGE-L F1 above t).
SURFACE = (0.3, 0.5, 0.6, 0.7, 0.8)


def labelled_pairs(split: str) -> tuple[list[dict], list[dict]]:
    """The labelled pairs of a split and the fixture's records, the labels' hashes checked."""
    if not FIXTURE.exists():
        sys.exit(f"fixture {FIXTURE} not found: check out ../shared beside the repo")
    data = json.loads(gzip.decompress(FIXTURE.read_bytes()))
    pairs = [p for p in load("pairs.jsonl") if split in ("all", p["split"])]
    stale = [p for p in pairs if sha(data[p["a"]]) != p["sha_a"] or sha(data[p["b"]]) != p["sha_b"]]
    if stale:
        sys.exit(f"labels do not match the fixture at pairs {[(p['a'], p['b']) for p in stale[:5]]}: another version of the data?")
    return pairs, data


def under(x: float) -> float:
    """A --candidates just under x (four decimals): a pair is asked when it scores above --candidates, so one scoring x is."""
    return max(0.0001, (round(x * 10_000) - 1) / 10_000)


def groups(pairs: list[dict], data: list[dict], field: str) -> list[dict]:
    """Labelled pairs packed into runs: within a run, each record is in one pair and no other pair scores above the run's --candidates.

    First fit, strongest pairs first. So every pair of a run is asked, and nothing else: a run asks no pair whose
    earlier record is gone, so two labelled pairs sharing a record go to different runs.
    """
    index = sorted({p["a"] for p in pairs} | {p["b"] for p in pairs})
    pos = {k: i for i, k in enumerate(index)}
    texts = [compared_text(data[k]["instruction"], data[k]["input"], field) for k in index]
    score = np.zeros((len(index), len(index)))
    for i in range(len(index)):
        for j in range(i + 1, len(index)):
            score[i, j] = score[j, i] = rouge_l(texts[i], texts[j])
    labelled = {(min(pos[p["a"]], pos[p["b"]]), max(pos[p["a"]], pos[p["b"]])) for p in pairs}
    runs: list[dict] = []
    unaskable = []
    for p in sorted(pairs, key=lambda p: -score[pos[p["a"]], pos[p["b"]]]):
        i, j = pos[p["a"]], pos[p["b"]]
        s = score[i, j]
        if s <= 0:
            unaskable.append(p)  # nothing in common on this field: no --candidates reaches it
            continue
        for run in runs:
            if i in run["members"] or j in run["members"]:
                continue  # one pair a record: a pair whose record another verdict took out would not be asked (it is moot)
            members = sorted(run["members"] | {i, j})
            t = under(min(run["floor"], s))
            sub = score[np.ix_(members, members)]
            hits = {(members[x], members[y]) for x, y in zip(*np.nonzero(np.triu(over(sub, t), 1)))}
            if hits <= labelled:
                run["members"].update((i, j))
                run["floor"] = min(run["floor"], s)
                run["pairs"].append(p)
                break
        else:
            runs.append({"members": {i, j}, "floor": s, "pairs": [p]})
    for run in runs:
        run["records"] = [index[m] for m in sorted(run["members"])]
        run["candidates"] = under(run["floor"])
    if unaskable:
        print(f"{len(unaskable)} labelled pairs share nothing on --field {field} and cannot be asked; try --field instruction+input",
              file=sys.stderr)
    return runs


def run_pairs(run: dict, k: int, data: list[dict], out: Path, field: str, passthrough: list[str], env: dict | None) -> dict[tuple[str, str], str]:
    """One `selfinstruct pairs` run on a group's records; the verdict of every pair it asked, by (earlier id, later id)."""
    target = out / f"g{k:03d}"
    inputs = out / f"g{k:03d}-input.jsonl"
    inputs.write_text("".join(json.dumps({"id": f"a{i}", "instruction": data[i]["instruction"], "input": data[i]["input"],
                                          "output": data[i]["output"]}, ensure_ascii=False) + "\n" for i in run["records"]), encoding="utf-8")
    cmd = [sys.executable, "-m", "selfinstruct", "pairs", str(inputs), "--out", str(target), "--candidates", str(run["candidates"]),
           "--field", field, "--quiet", *passthrough]
    done = subprocess.run(cmd, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"selfinstruct pairs exited {done.returncode} on group {k}: {done.stderr.strip()[-500:]}\n"
                 "re-run with the same --out to resume")
    rows = [json.loads(line) for line in (target / "verdicts.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    return {(r["a"], r["b"]): r["verdict"] for r in rows}


def usage(out: Path) -> tuple[int, int, int, float]:
    """Requests, prompt and completion tokens and dollars of every group's run."""
    total = [0, 0, 0, 0.0]
    for manifest in out.glob("g*/manifest.json"):
        stage = json.loads(manifest.read_text(encoding="utf-8")).get("stages", {}).get("pairs", {})
        for n, key in enumerate(("requests", "prompt_tokens", "completion_tokens", "usd")):
            total[n] += stage.get(key, 0)
    return total[0], total[1], total[2], total[3]


def row(name: str, flagged: list[bool], pairs: list[dict]) -> str:
    """Precision and recall of a flagging, plain and weighted by the strata the labelled pairs stand for."""
    weight = {s: STRATA[s] / n for s, n in collections.Counter(p["stratum"] for p in pairs).items()}
    tp = sum(f and p["duplicate"] for f, p in zip(flagged, pairs))
    true = sum(p["duplicate"] for p in pairs)
    w_tp = sum(weight[p["stratum"]] for f, p in zip(flagged, pairs) if f and p["duplicate"])
    w_flagged = sum(weight[p["stratum"]] for f, p in zip(flagged, pairs) if f)
    w_true = sum(weight[p["stratum"]] for p in pairs if p["duplicate"])
    cell = lambda a, b: f"{a / b:.2f}" if b else "-"
    return f"{name:<40}{sum(flagged):>8}{cell(tp, sum(flagged)):>11}{cell(tp, true):>8}{cell(w_tp, w_flagged):>8}{cell(w_tp, w_true):>10}"


def table(pairs: list[dict], data: list[dict], verdicts: list[str]) -> None:
    true = sum(p["duplicate"] for p in pairs)
    counts = collections.Counter(verdicts)
    print(f"\n== {len(pairs)} labelled pairs, {true} the same task; the teacher said: "
          + ", ".join(f"{v} {counts.get(v, 0)}" for v in ("same", "different", "unclear", "not asked")))
    print("(w.: each labelled pair stands for its stratum's pairs in the whole fixture, as in audit_bench.py)")
    print(f"{'flagged as the same task when':<40}{'flagged':>8}{'precision':>11}{'recall':>8}{'w.prec':>8}{'w.recall':>10}")
    topic = [rouge_l(topic_text(data[p["a"]]["instruction"], data[p["a"]]["input"]),
                     topic_text(data[p["b"]]["instruction"], data[p["b"]]["input"])) for p in pairs]
    same = [v == "same" for v in verdicts]
    print(row("the teacher says same", same, pairs))
    for t in SURFACE:
        print(row(f"topic ROUGE-L > {t} (surface alone)", [over(s, t) for s in topic], pairs))
        print(row(f"topic ROUGE-L > {t} and the teacher: same", [over(s, t) and v for s, v in zip(topic, same)], pairs))


_ASKED = re.compile(r"(?:第一条指令：|The first instruction:)\n(.*?)\n.*?(?:第二条指令：|The second instruction:)\n(.*?)\n", re.DOTALL)


def fake_reply(body, rng) -> str:
    """The fake teacher's rule of thumb: the same task when the two topics score 0.6 or more. Plumbing, not judgement."""
    match = _ASKED.search(body["messages"][-1]["content"])
    if not match:
        return "?"
    return "相同" if rouge_l(topic_text(match.group(1)), topic_text(match.group(2))) >= 0.6 else "不同"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="Other flags go to `selfinstruct pairs` as they are "
                                 "(--model, --base-url, --api-key-env, --price-in, --price-out, --concurrency, --max-cost...).")
    ap.add_argument("--split", choices=("held", "tune", "all"), default="held", help="labelled pairs to use (default held)")
    ap.add_argument("--field", default="instruction+input",
                    help="what the candidate search compares (default instruction+input: every labelled pair has something in common there; "
                         "on topic some share nothing and could not be asked)")
    ap.add_argument("--out", type=Path, default=None, help="where the runs go (default: a temporary directory; give one to resume)")
    ap.add_argument("--fake", action="store_true", help="the fake teacher (tests/fakes): shows the plumbing works; "
                                                        "its verdicts are topic ROUGE-L >= 0.6, so the figures mean nothing")
    args, passthrough = ap.parse_known_args()
    pairs, data = labelled_pairs(args.split)
    runs = groups(pairs, data, args.field)
    print(f"{len(pairs)} labelled pairs ({args.split}) in {len(runs)} runs of `selfinstruct pairs`", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        found: dict[tuple[str, str], str] = {}

        def ask_all(flags: list[str], env: dict | None = None) -> None:
            for k, run in enumerate(runs):
                found.update(run_pairs(run, k, data, out, args.field, flags, env))

        if args.fake:
            sys.path.insert(0, str(REPO / "tests"))
            from fakes.openai_server import FakeTeacher

            with FakeTeacher(reply=fake_reply) as fake:
                ask_all(["--base-url", fake.base_url, "--model", "fake-m", "--price-in", "0.15", "--price-out", "0.6", *passthrough],
                        {"OPENAI_API_KEY": os.environ.get("OPENAI_API_KEY") or "sk-fake"})
            print("\nFAKE TEACHER: its verdicts are topic ROUGE-L >= 0.6, not a judgement; the figures below show the script runs "
                  "end to end, nothing about any teacher.")
        else:
            ask_all(passthrough)
        requests, prompt, completion, usd = usage(out)
        print(f"{requests:,} requests, {prompt:,}+{completion:,} tokens, ${usd:.4f}", file=sys.stderr)
        verdicts = [found.get((f"a{min(p['a'], p['b'])}", f"a{max(p['a'], p['b'])}"), "not asked") for p in pairs]
        table(pairs, data, verdicts)


if __name__ == "__main__":
    main()
