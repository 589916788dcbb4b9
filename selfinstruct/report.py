"""The report: what a run or filter output holds, measured, and drawn as one self-contained HTML page or as PNG figures."""

from __future__ import annotations

import collections
import datetime as dt
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from selfinstruct.errors import InputError, OutputError
from selfinstruct.rows import infer_lang, load_run, Build
from selfinstruct.rundir import FILTER_REPORT, LEDGER, MANIFEST, REJECTED, read_jsonl
from selfinstruct.similarity import CJK_RE, Vocabulary, tokenize

FIELDS = ("instruction", "input", "output")
# Exact nearest-kept similarity is all-pairs; past this many records a seeded sample of queries is measured against all.
NEAREST_SAMPLE = 2_000
SAMPLE_ROWS = 400  # kept and rejected records shown in the page's table, each
TOP_VERBS = 20
TOP_OBJECTS = 4
TIME_BINS = 40
DISTINCT_OUTPUTS = 20_000  # distinct-n of outputs on the first this many (long texts; ~2 s on 2 cores at this size)
HIST_BINS = 30
# Chinese instructions often open with a politeness word before the verb.
_ZH_LEAD = {"请", "请你", "帮", "帮我", "帮忙", "麻烦", "能否", "可以", "能", "你", "我", "我们", "试", "尝试"}
_ZH_NOT_VERBS = {"是", "有", "为", "在", "要", "会", "能", "可以", "需要", "应该", "让", "使"}
_EN_NOT_VERBS = {"what", "how", "why", "who", "whom", "whose", "which", "when", "where", "is", "are", "was", "were", "do", "does",
                 "did", "can", "could", "would", "should", "will", "shall", "may", "might", "i", "you", "we", "it", "this", "that",
                 "the", "a", "an", "if", "in", "for", "to", "of", "on", "my", "your", "there", "here", "please", "and", "or"}
_EN_SKIP = {"a", "an", "the", "me", "us", "him", "her", "them", "it", "this", "that", "these", "those", "some", "any", "all",
            "following", "given", "each", "every", "your", "my", "our", "their", "its", "one", "two", "three", "four", "five",
            "few", "several", "short", "brief", "new", "simple", "list", "up", "out", "down", "to", "of", "about", "with",
            "and", "whether", "if", "how", "what", "why", "which"}
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")
_TIME_KEYS = ("at", "finished", "finished_at", "time", "ts")  # the ledger's `at` (Unix seconds) first
FINISHED = ("ok", "failed")  # ledger statuses of a request that came back; `dispatched` and `cancelled` lines are not


@dataclass
class Source:
    """Everything a report reads from one folder: kept and rejected records, the ledger, the manifest or filter report."""

    path: Path
    kind: str  # generate, evolve or filter
    manifest: dict
    kept: list[dict]
    rejected: list[dict]
    ledger: list[dict]
    lang: str
    seeds: list[str] = field(default_factory=list)
    seeds_note: str = ""


def _records_lang(manifest: dict, kept: list[dict], path: Path) -> str:
    return infer_lang(Build(path, "alpaca", {"train": [{"instruction": r.get("instruction", "")} for r in kept[:200]]}, manifest))


def _seed_candidates(path: Path, manifest: dict, seeds: Path | None) -> list[Path]:
    if seeds is not None:
        return [Path(seeds)]
    cfg = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
    # config.seeds is the path as given on the command line; seeds.path only its file name (cards must not show paths).
    named = [p for p in (cfg.get("seeds"), cfg.get("seeds_path"), (manifest.get("seeds") or {}).get("path")) if isinstance(p, str) and p]
    for against in (manifest.get("filter") or {}).get("against") or []:
        named.append(str(against))
    out: list[Path] = []
    for name in named:
        p = Path(name)
        out += [p] if p.is_absolute() else [p, path / p, path.parent / p, path / p.name]
    return out


def _read_seeds(candidates: Sequence[Path]) -> tuple[list[str], str]:
    from selfinstruct.corpus import read_records

    for p in candidates:
        if p.is_file():
            try:
                df = read_records([p])
            except Exception as exc:  # a seed file we cannot read only costs the report one chart
                return [], f"could not read the seed file {p.name}: {str(exc).splitlines()[0]}"
            return [s for s in df["instruction"].to_list() if isinstance(s, str)], p.name
    if candidates:
        return [], f"seed file not found ({candidates[0]}); pass --seeds FILE"
    return [], "no seed file recorded; pass --seeds FILE"


def load_source(path: Path, seeds: Path | None = None) -> Source:
    """Read a run directory (generate or evolve) or a filter --out directory."""
    path = Path(path)
    manifest, kept = load_run(path, allow_empty=True)
    if manifest.get("kind") == "filter":
        report = json.loads((path / FILTER_REPORT).read_text(encoding="utf-8"))
        manifest["filter"]["against"] = report.get("against") or []
        kind = "filter"
    else:
        kind = "evolve" if (manifest.get("evol") and not (manifest.get("stages") or {}).get("generate")) else "generate"
    rejected = read_jsonl(path / REJECTED)
    ledger = read_jsonl(path / LEDGER)
    lang = _records_lang(manifest, kept, path)
    seed_texts, note = _read_seeds(_seed_candidates(path, manifest, seeds))
    return Source(path, kind, manifest, kept, rejected, ledger, lang, seed_texts, note)


# ---- measures ---------------------------------------------------------------------------------


def _meta(rec: dict) -> dict:
    meta = rec.get("meta")
    return meta if isinstance(meta, dict) else {}


def _stage(rec: dict) -> str:
    meta = _meta(rec)
    if isinstance(meta.get("stage"), str):
        return "evolve" if meta["stage"] in ("judge", "respond") else meta["stage"]
    return "evolve" if meta.get("evol") else "generate"


def is_chinese(lang: str) -> bool:
    return lang.split("-")[0] in ("zh", "ja", "ko")


def text_length(text: Any, chinese: bool) -> int:
    """Characters (spaces aside) for Chinese, words for Latin scripts."""
    if not isinstance(text, str):
        return 0
    return len(text) - text.count(" ") if chinese else len(text.split())


def funnel(src: Source) -> list[dict]:
    """Per stage: requests, failed requests, items read, each rule's rejections, kept."""
    reasons_by_stage: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for rec in src.rejected:
        reasons_by_stage[_stage(rec) if src.kind != "filter" else "filter"][str(rec.get("reason") or "unknown")] += 1
    kept_by_stage = collections.Counter(_stage(r) if src.kind != "filter" else "filter" for r in src.kept)
    if src.kind == "filter":
        counts = (src.manifest.get("counts") or {})
        by_rule = {str(k): int(v) for k, v in (counts.get("rejected") or {}).items() if isinstance(v, (int, float))}
        total = (src.manifest.get("filter") or {}).get("total")
        steps = [{"label": "records in", "count": int(total) if isinstance(total, int) else len(src.kept) + sum(by_rule.values()), "kind": "in"}]
        steps += [{"label": rule, "count": n, "kind": "drop"} for rule, n in sorted(by_rule.items(), key=lambda kv: -kv[1])]
        steps.append({"label": "kept", "count": int(counts.get("kept") or len(src.kept)), "kind": "out"})
        return [{"stage": "filter", "steps": steps}]
    requests = collections.Counter()
    failed = collections.Counter()
    for entry in src.ledger:
        if entry.get("status") not in FINISHED:
            continue  # a dispatched or cancelled line: not a finished request
        stage = entry.get("stage") or "generate"
        stage = "evolve" if stage in ("judge", "respond") else stage
        requests[stage] += 1
        failed[stage] += entry.get("status") != "ok"
    out = []
    for stage in [s for s in ("generate", "evolve") if requests[s] or reasons_by_stage[s] or kept_by_stage[s]]:
        reasons = reasons_by_stage[stage]
        # Failed requests are counted as requests, not as items: they produced none.
        items = kept_by_stage[stage] + sum(n for r, n in reasons.items() if r != "request-failed")
        # A run without a ledger (or an old one) has no request counts: show none rather than zero.
        steps = [{"label": "requests", "count": requests[stage], "kind": "in"}] if requests[stage] else []
        if failed[stage]:
            steps.append({"label": "failed requests", "count": failed[stage], "kind": "drop"})
        steps.append({"label": "items read" if stage == "generate" else "evolutions", "count": items, "kind": "in"})
        steps += [{"label": r, "count": n, "kind": "drop"} for r, n in reasons.most_common() if r != "request-failed"]
        steps.append({"label": "kept", "count": kept_by_stage[stage], "kind": "out"})
        out.append({"stage": stage, "steps": steps})
    return out


def histogram(values: Sequence[float], bins: int = HIST_BINS, lo: float | None = None, hi: float | None = None) -> dict:
    """Counts in equal bins from lo to hi (hi defaults to the 99th percentile; longer values land in the last bin)."""
    arr = np.asarray(values, dtype=np.float64)
    if not len(arr):
        return {"edges": [], "counts": [], "n": 0, "median": None, "p90": None, "max": None}
    lo = float(arr.min()) if lo is None else lo
    hi = float(np.percentile(arr, 99)) if hi is None else hi
    if hi <= lo:
        hi = lo + 1
    counts, edges = np.histogram(np.clip(arr, lo, hi), bins=bins, range=(lo, hi))
    return {"edges": [round(float(e), 4) for e in edges], "counts": counts.tolist(), "n": int(len(arr)),
            "median": round(float(np.median(arr)), 3), "p90": round(float(np.percentile(arr, 90)), 3), "max": round(float(arr.max()), 3)}


def lengths(src: Source) -> dict:
    chinese = is_chinese(src.lang)
    out = {}
    for name in FIELDS:
        kept = [text_length(r.get(name), chinese) for r in src.kept]
        if name == "input" and not any(kept):
            continue
        hi = float(np.percentile(kept, 99)) if kept else None
        rejected = [text_length(r.get(name), chinese) for r in src.rejected if r.get("reason") != "request-failed"]
        out[name] = {"kept": histogram(kept, hi=hi, lo=0), "rejected": histogram(rejected, hi=hi, lo=0) if kept else histogram(rejected),
                     "empty": sum(1 for n in kept if n == 0)}
    return {"unit": "characters" if chinese else "words", "fields": out}


def max_similarity(queries: list[str], reference: list[str], skip_self: np.ndarray | None = None, workers: int = -1) -> np.ndarray:
    """Each query's highest ROUGE-L F1 against the reference texts, on the tokens the filter compares."""
    from rapidfuzz import process
    from rapidfuzz.distance import Indel

    best = np.zeros(len(queries), dtype=np.float32)
    if not queries or not reference:
        return best
    step = max(1, 4_000_000 // max(1, len(reference)))  # keep each score block near 16 MB
    for start in range(0, len(queries), step):
        block = process.cdist(queries[start:start + step], reference, scorer=Indel.normalized_similarity, dtype=np.float32, workers=workers)
        if skip_self is not None:
            rows = np.arange(block.shape[0])
            block[rows, skip_self[start:start + step]] = -1.0
        best[start:start + step] = block.max(axis=1)
    return best


def similarity(src: Source, *, sample: int = NEAREST_SAMPLE, seed: int = 0) -> dict:
    """ROUGE-L F1 of each kept instruction to its nearest seed and (for a sample when large) its nearest other kept record."""
    vocab = Vocabulary()
    codes = [vocab.encode(r.get("instruction") or "") for r in src.kept]
    threshold = (src.manifest.get("filters") or {}).get("similarity", (src.manifest.get("config") or {}).get("similarity"))
    out: dict[str, Any] = {"threshold": threshold if isinstance(threshold, (int, float)) else None, "seeds_note": src.seeds_note}
    if src.seeds:
        seed_codes = [vocab.encode(s) for s in src.seeds]
        scores = max_similarity(codes, seed_codes)
        out["seed"] = histogram(scores.tolist(), bins=20, lo=0.0, hi=1.0) | {"seeds": len(src.seeds)}
    if len(codes) > 1:
        idx = np.arange(len(codes))
        if len(codes) > sample:
            idx = np.sort(np.random.default_rng(seed).choice(len(codes), size=sample, replace=False))
        scores = max_similarity([codes[i] for i in idx], codes, skip_self=idx)
        out["kept"] = histogram(scores.tolist(), bins=20, lo=0.0, hi=1.0) | {"sampled": len(idx) < len(codes)}
    return out


def _zh_tagger():
    import logging

    import jieba
    import jieba.posseg

    jieba.setLogLevel(logging.WARNING)
    return jieba.posseg.dt


def verb_object(instructions: Sequence[str], lang: str) -> list[tuple[str, str] | None]:
    """The leading verb and its first noun object of each instruction (None when it opens with no verb)."""
    out: list[tuple[str, str] | None] = []
    if is_chinese(lang):
        tagger = _zh_tagger()
        for text in instructions:
            # The verb and its object sit at the start; 40 characters keep tagging 52K records fast.
            words = [(p.word, p.flag) for p in tagger.cut(text.strip()[:40], HMM=False) if p.word.strip()]
            out.append(_zh_pair(words))
        return out
    for text in instructions:
        out.append(_en_pair(_WORD.findall(text[:200].lower())))
    return out


def _zh_pair(words: list[tuple[str, str]]) -> tuple[str, str] | None:
    i = 0
    while i < len(words) and words[i][0] in _ZH_LEAD:
        i += 1
    if i >= len(words) or not words[i][1].startswith("v") or words[i][0] in _ZH_NOT_VERBS:
        return None
    verb = words[i][0]
    # The first noun of the clause: it may sit after a modifier with its own verb (给出保持健康的三个建议 → 建议).
    for word, flag in words[i + 1:i + 10]:
        if flag.startswith("n") or flag in ("vn", "l", "eng"):
            return verb, word
        if flag == "x" and word in "，。？！,.?!；;：:":
            break  # the end of the clause: this verb has no object
    return None


def _en_pair(words: list[str]) -> tuple[str, str] | None:
    if words and words[0] == "please":
        words = words[1:]
    if not words or words[0] in _EN_NOT_VERBS or len(words[0]) < 2:
        return None
    for word in words[1:8]:
        if word not in _EN_SKIP and len(word) > 1:
            return words[0], word
    return None


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams over all n-grams, on the filter's tokens (one per Chinese character, one per Latin word)."""
    grams: set = set()
    total = 0
    for text in texts:
        tokens = tokenize(text)
        total += max(0, len(tokens) - n + 1)
        grams.update(zip(*(tokens[k:] for k in range(n))))
    return round(len(grams) / total, 4) if total else 0.0


def diversity(src: Source) -> dict:
    instructions = [r.get("instruction") or "" for r in src.kept]
    pairs = verb_object(instructions, src.lang)
    verbs = collections.Counter(p[0] for p in pairs if p)
    objects: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for p in pairs:
        if p:
            objects[p[0]][p[1]] += 1
    tree = [{"verb": v, "count": n, "objects": [{"noun": o, "count": c} for o, c in objects[v].most_common(TOP_OBJECTS)]}
            for v, n in verbs.most_common(TOP_VERBS)]
    families = collections.Counter()
    for rec in src.kept:
        meta = _meta(rec)
        family = meta.get("family") or meta.get("category") or rec.get("category") or rec.get("task_type")
        if isinstance(family, str) and family:
            families[family] += 1
    return {
        "verbs": tree, "parsed": sum(1 for p in pairs if p), "total": len(pairs), "distinct_verbs": len(verbs),
        "tagger": "jieba.posseg" if is_chinese(src.lang) else "first word (no POS tagger for Latin scripts)",
        "distinct": {f"distinct-{n}": {"instruction": distinct_n(instructions, n),
                                       "output": distinct_n([r.get("output") or "" for r in src.kept[:DISTINCT_OUTPUTS]], n)} for n in (1, 2, 3)},
        "distinct_outputs": min(DISTINCT_OUTPUTS, len(src.kept)),
        "families": [{"name": k, "count": v} for k, v in families.most_common(20)],
    }


def evolution(src: Source) -> dict:
    """Evol ops and rounds of kept records, judge verdicts, and what each op lost to which check."""
    ops = collections.Counter()
    rounds = collections.Counter()
    judge = collections.Counter()
    for rec in src.kept:
        meta = _meta(rec)
        steps = [s for s in meta.get("evol") or [] if isinstance(s, dict)]
        for s in steps:
            if s.get("op"):
                ops[str(s["op"])] += 1
        rounds[len(steps)] += 1
        if isinstance(meta.get("judge"), str):
            judge[meta["judge"]] += 1
    eliminated = collections.Counter()
    for rec in src.rejected:
        meta = _meta(rec)
        if meta.get("stage") in ("evolve", "judge", "respond") and meta.get("op"):
            eliminated[f"{meta['op']}: {rec.get('reason', 'unknown')}"] += 1
        if isinstance(meta.get("judge"), str):
            judge[meta["judge"]] += 1
    if not ops and not judge and not eliminated:
        return {}
    return {"ops": dict(ops.most_common()), "rounds": {str(k): v for k, v in sorted(rounds.items())},
            "judge": dict(judge.most_common()), "eliminated": dict(eliminated.most_common())}


def costs(src: Source) -> dict:
    m = src.manifest
    stages = m.get("stages") if isinstance(m.get("stages"), dict) else {}
    priced = bool((m.get("cost") or {}).get("priced"))
    rows = []
    for name, s in stages.items():
        if isinstance(s, dict):
            rows.append({"stage": name, "requests": s.get("requests", 0), "prompt_tokens": s.get("prompt_tokens", 0),
                         "completion_tokens": s.get("completion_tokens", 0), "usd": s.get("usd") if priced else None})
    return {"stages": rows, "priced": priced, "usd": (m.get("cost") or {}).get("usd") if priced else None}


def _entry_time(entry: dict) -> float | None:
    for key in _TIME_KEYS:
        value = entry.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None


def finished_requests(ledger: Sequence[dict]) -> list[dict]:
    """The ledger's answered or failed requests (not its dispatched or cancelled lines)."""
    return [e for e in ledger if e.get("status") in FINISHED]


def requests_over_time(src: Source) -> dict:
    """Requests sent, finished, failed and retried, and in flight, per time bin (per finishing order when the ledger has no times)."""
    finished = finished_requests(src.ledger)
    if not finished:
        return {}
    times = [_entry_time(e) for e in finished]
    timed = all(t is not None for t in times)
    sent = [t for t in (_entry_time(e) for e in src.ledger if e.get("status") == "dispatched") if t is not None] if timed else []
    closed = [t for t in (_entry_time(e) for e in src.ledger if e.get("status") == "cancelled") if t is not None] if timed else []
    if timed:
        t0 = min([*times, *sent])  # type: ignore[type-var]
        xs = np.array([t - t0 for t in times], dtype=np.float64)  # type: ignore[operator]
    else:
        t0 = 0.0
        xs = np.arange(len(finished), dtype=np.float64)
    nbins = min(TIME_BINS, max(1, len(finished)))
    span = max([float(xs.max()), *(t - t0 for t in sent)])
    span = span if span > 0 else 1.0
    width = span / nbins

    def bin_of(x: np.ndarray) -> np.ndarray:
        return np.minimum((x / width).astype(int), nbins - 1)

    which = bin_of(xs)
    ok = np.zeros(nbins, dtype=int)
    failed = np.zeros(nbins, dtype=int)
    retries = np.zeros(nbins, dtype=int)
    errors = collections.Counter()
    latencies = []
    for b, e in zip(which, finished):
        if e.get("status") == "ok":
            ok[b] += 1
        else:
            failed[b] += 1
        attempts = e.get("attempts")
        retries[b] += max(0, int(attempts) - 1) if isinstance(attempts, (int, float)) else 0
        for kind in e.get("errors") or []:
            errors[str(kind)] += 1
        if isinstance(e.get("latency"), (int, float)):
            latencies.append(float(e["latency"]))
    out = {
        "axis": "seconds since the first request was sent" if timed else "requests in the order they finished",
        "timed": timed, "bin_width": round(width, 3),
        "x": [round(i * width, 3) for i in range(nbins)], "ok": ok.tolist(), "failed": failed.tolist(), "retries": retries.tolist(),
        "errors": {k: v for k, v in errors.most_common() if v}, "latency": histogram(latencies) if latencies else None,
        "requests": len(finished), "cancelled": sum(1 for e in src.ledger if e.get("status") == "cancelled"),
    }
    if timed:
        out["per_second"] = round(len(finished) / span, 3)
    if sent:
        # Sent per bin, and how many were out at each bin's end: a dispatched line opens a request, its answer or cancel closes it.
        opened = np.bincount(bin_of(np.array(sent) - t0), minlength=nbins)
        shut = np.bincount(which, minlength=nbins)
        if closed:
            shut = shut + np.bincount(bin_of(np.array(closed) - t0), minlength=nbins)
        out["sent"] = opened.tolist()
        out["in_flight"] = np.maximum(np.cumsum(opened) - np.cumsum(shut), 0).tolist()
    return out


def _clip(text: Any, limit: int = 600) -> str:
    text = text if isinstance(text, str) else ""
    return text if len(text) <= limit else text[:limit] + "…"


def samples(src: Source, rows: int = SAMPLE_ROWS, seed: int = 0) -> dict:
    """A seeded sample of kept records and a sample of rejected ones spread over every reason."""
    rng = random.Random(seed)
    kept = rng.sample(src.kept, min(rows, len(src.kept)))
    by_reason: dict[str, list[dict]] = collections.defaultdict(list)
    for rec in src.rejected:
        by_reason[str(rec.get("reason") or "unknown")].append(rec)
    per = max(1, rows // max(1, len(by_reason)))
    rejected = [r for recs in by_reason.values() for r in rng.sample(recs, min(per, len(recs)))]

    def row(rec: dict, status: str) -> dict:
        return {"id": str(rec.get("id", "")), "status": status, "stage": _stage(rec), "reason": str(rec.get("reason") or ""),
                "detail": _clip(rec.get("detail"), 200), "instruction": _clip(rec.get("instruction")),
                "input": _clip(rec.get("input"), 300), "output": _clip(rec.get("output"))}

    return {"rows": [row(r, "kept") for r in kept] + [row(r, "rejected") for r in rejected],
            "kept_total": len(src.kept), "rejected_total": len(src.rejected)}


def measure(src: Source) -> dict:
    """Every figure the report shows, as plain JSON-able data."""
    notes = []
    if src.kind != "filter" and src.ledger and not any(_entry_time(e) is not None for e in finished_requests(src.ledger)):
        notes.append("The request ledger has no timestamps: request charts run in the order requests finished, not over time.")
    if src.seeds_note and not src.seeds:
        notes.append(f"Similarity to seeds is not shown: {src.seeds_note}.")
    m = src.manifest
    return {
        "title": src.path.resolve().name, "kind": src.kind, "lang": src.lang, "status": m.get("status"),
        "version": m.get("selfinstruct_version"), "model": (m.get("teacher") or {}).get("model"),
        "counts": {"kept": len(src.kept), "rejected": len(src.rejected), "requests": len(finished_requests(src.ledger))},
        "notes": notes, "funnel": funnel(src), "lengths": lengths(src), "similarity": similarity(src), "diversity": diversity(src),
        "evolution": evolution(src), "costs": costs(src), "requests": requests_over_time(src), "samples": samples(src),
    }


# ---- the page ---------------------------------------------------------------------------------


def _json_for_script(data: dict) -> str:
    """JSON that cannot close its <script> element or open a comment."""
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_html(stats: dict) -> str:
    import jinja2

    from selfinstruct.prompts import prompts_dir

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=True)
    template = env.from_string((prompts_dir() / "report.html.jinja").read_text(encoding="utf-8"))
    return template.render(title=stats["title"], data=jinja2.utils.markupsafe.Markup(_json_for_script(stats)))


def write_report(path: Path, out: Path | None = None, *, seeds: Path | None = None) -> tuple[Path, dict]:
    """Measure a run or filter output and write its HTML report (default: report.html inside it)."""
    src = load_source(path, seeds)
    stats = measure(src)
    out = Path(out) if out is not None else Path(path) / "report.html"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render_html(stats), encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"{out}: cannot write the report ({exc.strerror or exc})", "pass another --out") from None
    return out, stats


def check_source(path: Path) -> None:
    """A one-line error for a folder that is neither a run nor a filter output."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: no such directory", "pass the --out directory of a generate, evolve or filter run")
    if not any((path / name).exists() for name in (MANIFEST, FILTER_REPORT, "records.jsonl")):
        raise InputError(f"{path}: neither a run directory nor a filter output", "pass the --out directory of a generate, evolve or filter run")


# ---- PNG figures for the dataset card ----------------------------------------------------------

FIGURES = {"funnel": "How many candidates each filter removed", "lengths": "Lengths of the kept records",
           "similarity": "ROUGE-L to the nearest seed and to the nearest other kept instruction"}
FIGURES_DIR = "figures"
# Families that hold CJK glyphs, by platform: Debian/Ubuntu (fonts-noto-cjk, fonts-wqy-*), macOS, Windows.
CJK_FAMILIES = ("Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "Noto Sans CJK TC", "Noto Sans CJK JP", "WenQuanYi Zen Hei",
                "WenQuanYi Micro Hei", "Droid Sans Fallback", "PingFang SC", "Hiragino Sans GB", "Heiti SC", "STHeiti",
                "Microsoft YaHei", "SimHei", "Arial Unicode MS")


_CJK_FILE = re.compile(r"(cjk|wqy|wenquanyi|droidsansfallback|msyh|simhei|pingfang|hiragino|sourcehansans)", re.IGNORECASE)


def cjk_font() -> str | None:
    """The first installed font family matplotlib can use for Chinese, or None (nothing is downloaded)."""
    from matplotlib import font_manager

    installed = {f.name for f in font_manager.fontManager.ttflist}
    found = next((name for name in CJK_FAMILIES if name in installed), None)
    if found is None:
        # matplotlib's font cache predates a font installed later: look for CJK font files on the system once.
        for path in font_manager.findSystemFonts():
            if _CJK_FILE.search(Path(path).name):
                try:
                    font_manager.fontManager.addfont(path)
                except (OSError, RuntimeError, ValueError):
                    continue
        installed = {f.name for f in font_manager.fontManager.ttflist}
        found = next((name for name in CJK_FAMILIES if name in installed), None)
    return found


def _figure(width: float, height: float, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _label(text: str, font: str | None) -> str:
    """A label a font can draw: with no CJK font, Chinese is written as code points rather than drawn as empty boxes."""
    if font or not CJK_RE.search(text):
        return text
    return CJK_RE.sub(lambda m: f"U+{ord(m.group(0)):04X}", text)


def draw_funnel(stats: dict, font: str | None):
    stages = stats["funnel"]
    rows = [(f"{st['stage']}: {s['label']}" if len(stages) > 1 else s["label"], s["count"], s["kind"]) for st in stages for s in st["steps"]]
    fig, (ax,) = _figure(7.5, 0.9 + 0.32 * len(rows))
    colors = {"in": "#3b6fb6", "drop": "#c8553d", "out": "#2e8b57"}
    ys = list(range(len(rows)))[::-1]
    ax.barh(ys, [r[1] for r in rows], color=[colors[r[2]] for r in rows])
    ax.set_yticks(ys, [_label(r[0], font) for r in rows])
    top = max([r[1] for r in rows] + [1])
    for y, (_, n, _) in zip(ys, rows):
        ax.text(n + top * 0.01, y, f"{n:,}", va="center", fontsize=8)
    ax.set_xlim(0, top * 1.15)
    ax.set_title("Funnel: requests → items → rejections by filter → kept", fontsize=10)
    ax.spines[["top", "right"]].set_visible(False)
    return fig


def _bars(ax, hist: dict, color: str, share: bool = True, **kw) -> None:
    edges, counts = hist["edges"], hist["counts"]
    if not counts:
        ax.text(0.5, 0.5, "no data", ha="center", transform=ax.transAxes)
        return
    total = sum(counts) or 1
    widths = [b - a for a, b in zip(edges, edges[1:])]
    ax.bar(edges[:-1], [c / total if share else c for c in counts], width=widths, align="edge", color=color, **kw)


def draw_lengths(stats: dict, font: str | None):
    fields = stats["lengths"]["fields"]
    unit = stats["lengths"]["unit"]
    fig, axes = _figure(3.2 * max(1, len(fields)), 2.8, max(1, len(fields)))
    for ax, (name, f) in zip(axes, fields.items()):
        _bars(ax, f["kept"], "#3b6fb6", alpha=0.9)
        ax.set_title(f"{name} (median {f['kept']['median']:g} {unit})" if f["kept"]["n"] else name, fontsize=9)
        ax.set_xlabel(f"{unit} (last bin: longest 1%)", fontsize=8)
        ax.yaxis.set_major_formatter(_percent())
        ax.spines[["top", "right"]].set_visible(False)
    return fig


def _percent():
    from matplotlib.ticker import PercentFormatter

    return PercentFormatter(1.0, decimals=0)


def draw_similarity(stats: dict, font: str | None):
    sim = stats["similarity"]
    parts = [(k, t) for k, t in (("seed", "seed"), ("kept", "other kept instruction")) if sim.get(k)]
    fig, axes = _figure(3.6 * max(1, len(parts)), 2.8, max(1, len(parts)))
    if not parts:
        axes[0].text(0.5, 0.5, "fewer than two kept records and no seed file", ha="center", transform=axes[0].transAxes)
        axes[0].set_axis_off()
    for ax, (key, title) in zip(axes, parts):
        h = sim[key]
        _bars(ax, h, "#8e6cc0" if key == "seed" else "#2a9d8f")
        if sim.get("threshold") is not None:
            ax.axvline(sim["threshold"], color="#111827", linestyle="--", linewidth=1)
        sampled = f", {h['n']:,} sampled" if h.get("sampled") else ""
        ax.set_title(f"Nearest {title}\nmedian {h['median']:g}{sampled}", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_xlabel("ROUGE-L F1", fontsize=8)
        ax.yaxis.set_major_formatter(_percent())
        ax.spines[["top", "right"]].set_visible(False)
    return fig


def render_figures(stats: dict) -> dict[str, bytes]:
    """The card's figures as PNG bytes, by file name under figures/."""
    import io

    import matplotlib

    font = cjk_font()
    # Chinese rule names or labels need a CJK face; DejaVu stays first for Latin text and numbers.
    families = ["DejaVu Sans", *([font] if font else [])]
    out = {}
    with matplotlib.rc_context({"font.family": families, "axes.unicode_minus": False}):
        for name, draw in (("funnel", draw_funnel), ("lengths", draw_lengths), ("similarity", draw_similarity)):
            fig = draw(stats, font)
            buf = io.BytesIO()
            # No timestamp or software tag: the same data gives the same bytes, so a repeated push uploads nothing new.
            fig.savefig(buf, format="png", metadata={"Software": None})
            out[f"{FIGURES_DIR}/{name}.png"] = buf.getvalue()
    return out


def card_figures(path: Path) -> dict[str, bytes]:
    """Measure what the card's figures need (funnel, lengths, similarity) and draw them."""
    src = load_source(path)
    stats = {"funnel": funnel(src), "lengths": lengths(src), "similarity": similarity(src)}
    return render_figures(stats)
