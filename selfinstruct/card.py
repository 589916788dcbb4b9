"""The dataset card: YAML front matter and a body rendered from the run's manifest, merged into any existing card."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

import jinja2

from selfinstruct.errors import PublishError
# Re-exported: evolution and older callers import them from here.
from selfinstruct.redaction import file_name, local_paths_to_names, mask_secrets, redact  # noqa: F401
from selfinstruct.rows import DATA_DIR, infer_lang
from selfinstruct.similarity import FIELD_NAMES, FIELDS

BEGIN = "<!-- selfinstruct:begin (generated from manifest.json; replaced on every push) -->"
END = "<!-- selfinstruct:end -->"
_BLOCK = re.compile(r"<!-- selfinstruct:begin\b.*?-->.*?<!-- selfinstruct:end -->\n?", re.DOTALL)
_FRONT = re.compile(r"^(\s*---(?:\r\n|\r|\n))([\S\s]*?)((?:\r\n|\r|\n)---[ \t]*(\r\n|\n|$))")  # the Hub's own regex

LANGUAGES = {"zh": ("zh", "Simplified Chinese"), "zh-Hans": ("zh", "Simplified Chinese"), "zh-Hant": ("zh", "Traditional Chinese"), "en": ("en", "English")}
ENDPOINTS = {"openai": "the OpenAI API", "hosted": "a hosted OpenAI-compatible API", "local": "a self-hosted OpenAI-compatible server"}
FILTERS = {
    "empty": "instruction or output is empty",
    "too-short": "instruction under the minimum length",
    "too-long": "instruction over the maximum length",
    "starts-with-punctuation": "instruction starts with punctuation",
    "wrong-language": "instruction is not mainly in the run's language",
    "wrong-script": "written in the other Chinese script (Traditional in a Simplified set, or the reverse)",
    "blacklist": "the task asks to make an image, video or file, or to see one it does not describe",
    "needs-url": "the task works on a web page it would have to fetch, or asks to search the web",
    "refusal": "the answer is a refusal or a model's self-reference",
    "placeholder": "the answer is a placeholder (<nooutput>, 无输出, [插入图片]) or an image link",
    "output-equals-input": "output repeats the input",
    "output-language": "the answer is prose in another language than the task asks for",
    "output-too-short": "a few words where the task asks for an essay, a story or a letter",
    "code-translated": "code whose keywords or identifiers were translated into Chinese",
    "pii": "holds personal data: e-mail, phone, resident ID, bank card or IP address",
    "near-duplicate": "too similar to a seed or an already kept record",
    "exact-duplicate": "the same text as an earlier record after normalisation (Unicode form, case, spacing)",
    "contaminated": "too similar to a record of an --against file (seeds or a test set)",
    "request-failed": "the teacher request failed after retries",
    "oversized": "the teacher's reply ran far past --max-tokens (kept only as its size and a short prefix)",
    "unparseable": "a reply item that could not be read as instruction, input and output",
    "truncated": "the last item of a reply cut by the token limit",
    "surplus": "valid, but beyond --n (the last wave of requests over-delivered)",
    "prompt-leak": "Evol-Instruct: the rewrite still contains the rewriting prompt's markers",
    "no-gain": "Evol-Instruct: the rewrite is identical or nearly (ROUGE-L ≥ 0.9) to its parent, or judged equal",
    "refusal-response": "Evol-Instruct: the answer to the rewrite is a short refusal",
    "stopword-response": "Evol-Instruct: the answer to the rewrite is only punctuation and stop words",
    "low-score": "the quality judge scored it below the threshold (its reason is kept in rejected.jsonl)",
    "judge-failed": "no score could be read from the judge, twice, or the judge request failed",
    "moderation": "flagged by the endpoint's moderation (or, without one, unsafe by the judge's verdict)",
}
STAGES = ("generate", "evolve", "respond")
SIZES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M"),
         (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")]
TAGS = ["synthetic", "self-instruct"]


def is_generated(text: str) -> bool:
    """Whether a card holds a selfinstruct-generated block."""
    return bool(_BLOCK.search(text))


def size_category(n: int) -> str:
    for limit, name in SIZES:
        if n < limit:
            return name
    return "n>1B"


def license_metadata(declared: str | None) -> dict[str, str]:
    """Front-matter licence keys: a Hub licence id as-is, anything else as `other` with a name."""
    if not declared or not declared.strip():
        return {"license": "unknown"}
    value = declared.strip().lower()
    if re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", value):
        return {"license": value}
    return {"license": "other", "license_name": re.sub(r"[^a-z0-9]+", "-", value).strip("-") or "custom"}


def _num(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "—"
    return f"{round(value):,}"


def _usd(value: Any, priced: bool) -> str:
    if not priced or isinstance(value, bool) or not isinstance(value, (int, float)):
        return "unknown"
    return f"${value:,.4f}"


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _cell(text: Any) -> str:
    """A value safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _truncate(value: Any, limit: int = 240) -> Any:
    if isinstance(value, str):
        return value if len(value) <= limit else value[:limit] + "…"
    if isinstance(value, list):
        return [_truncate(v, limit) for v in value]
    if isinstance(value, dict):
        return {k: _truncate(v, limit) for k, v in value.items()}
    return value


def _example(row: dict) -> str:
    """A row as JSON with one key per line and one chat turn per line: short enough to read on a card."""
    def value(v: Any) -> str:
        if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            return "[\n" + ",\n".join("    " + json.dumps(x, ensure_ascii=False) for x in v) + "\n  ]"
        return json.dumps(v, ensure_ascii=False)

    return "{\n" + ",\n".join(f"  {json.dumps(k, ensure_ascii=False)}: {value(v)}" for k, v in row.items()) + "\n}"


def _evol_ops(build) -> dict[str, int | None]:
    """Kept evolutions per op: the manifest holds {op: {round: {kept, eliminated}}}."""
    evol = _dict(build.manifest.get("evol"))
    ops = evol.get("ops")
    if isinstance(ops, dict) and ops:
        return {str(k): _kept_of(v) for k, v in ops.items()}
    if isinstance(ops, list) and ops:
        return {str(op): None for op in ops}
    return dict(build.evol_ops)


def _kept_of(per_op: Any) -> int | None:
    if isinstance(per_op, int) and not isinstance(per_op, bool):
        return per_op
    if isinstance(per_op, dict):
        kept = [r.get("kept") for r in per_op.values() if isinstance(r, dict)]
        if kept and all(isinstance(k, int) for k in kept):
            return sum(kept)
    return None


def _evol_rounds(build) -> int:
    evol = _dict(build.manifest.get("evol"))
    rounds = evol.get("rounds", _dict(build.manifest.get("config")).get("evol_rounds"))
    return rounds if isinstance(rounds, int) and not isinstance(rounds, bool) else 0


def uses_evol(build) -> bool:
    return _evol_rounds(build) > 0 or bool(build.evol_ops)


def is_filtered(build) -> bool:
    """Whether the rows come from `selfinstruct filter` output rather than a generate or evolve run."""
    return build.manifest.get("kind") == "filter"


def metadata(build, *, license: str | None = None, existing: dict | None = None, repo_id: str | None = None) -> dict:
    """The front-matter keys selfinstruct owns; `configs`/`dataset_info` are left to `datasets`."""
    existing = existing or {}
    declared = license or _dict(build.manifest.get("seeds")).get("license")
    lic = license_metadata(declared)
    if lic["license"] == "unknown" and existing.get("license") not in (None, "unknown"):
        lic = {k: existing[k] for k in ("license", "license_name", "license_link") if k in existing}
    code, _ = LANGUAGES.get(_lang(build), (_lang(build).split("-")[0], ""))
    # Filtered data is whatever the inputs were: no claim that it is synthetic.
    tags = [] if is_filtered(build) else TAGS + (["evol-instruct"] if uses_evol(build) else [])
    if build.fmt in ("dpo", "dpo-messages"):
        tags.append("dpo")  # the Hub's tag for preference data TRL's DPOTrainer reads
    old_tags = existing.get("tags") if isinstance(existing.get("tags"), list) else []
    out: dict[str, Any] = {
        "language": [code],
        **lic,
        "task_categories": ["text-generation"],
        "tags": list(dict.fromkeys([*old_tags, *tags])),
        "size_categories": [size_category(build.rows)],
    }
    if repo_id and not existing.get("pretty_name"):
        out["pretty_name"] = repo_id.split("/")[-1]
    return out


def _lang(build) -> str:
    return infer_lang(build)


def _columns(build) -> list[dict[str, str]]:
    filtered = is_filtered(build)
    if build.fmt == "alpaca":
        cols = [
            {"name": "instruction", "type": "string", "meaning": "the task"},
            {"name": "input", "type": "string", "meaning": "optional context for the task (empty when none)"},
            {"name": "output", "type": "string", "meaning": "the answer" if filtered else "the teacher's answer"},
        ]
    elif build.fmt in ("dpo", "dpo-messages"):
        kind = "string" if build.fmt == "dpo" else "list of {role, content}"
        cols = [{"name": "prompt", "type": kind, "meaning": "the task (instruction, blank line, input), after the system prompt when one was used"},
                {"name": "chosen", "type": kind, "meaning": "the answer the pair judge preferred in both orders"},
                {"name": "rejected", "type": kind, "meaning": "the other answer of the pair"}]
    elif build.fmt == "sharegpt":
        cols = [{"name": "conversations", "type": "list of {from, value}",
                 "meaning": ("a `system` turn, then " if build.system else "") + "`human` (instruction, blank line, input) then `gpt` (answer)"}]
    else:
        cols = [{"name": "messages", "type": "list of {role, content}",
                 "meaning": ("a `system` message, then " if build.system else "") + "`user` (instruction, blank line, input) then `assistant` (answer)"}]
    if not build.slim and filtered:
        # Filtered data was not generated here: the lineage columns hold what its inputs recorded.
        cols += [
            {"name": "id", "type": "string", "meaning": "the record's id in its input"},
            {"name": "seed_ids", "type": "list of string", "meaning": "seed ids, where the input recorded them (else empty)"},
            {"name": "evol_ops", "type": "list of string", "meaning": "Evol-Instruct operations, where the input recorded them (else empty)"},
            {"name": "model", "type": "string", "meaning": "the model that wrote the row, where the input recorded it (else empty)"},
        ]
    elif not build.slim:
        cols += [
            {"name": "id", "type": "string", "meaning": "record id in the run (`r<request>.<item>`)"},
            {"name": "seed_ids", "type": "list of string", "meaning": "seed tasks shown to the teacher in the prompt"},
            {"name": "evol_ops", "type": "list of string", "meaning": "Evol-Instruct operations applied, in order (empty if none)"},
            {"name": "model", "type": "string", "meaning": "teacher model that wrote the row" + (" (the chosen answer)" if build.fmt in ("dpo", "dpo-messages") else "")},
        ]
        if build.fmt in ("dpo", "dpo-messages"):
            cols.append({"name": "rejected_model", "type": "string", "meaning": "model that wrote the rejected answer"})
    return cols


def _filters(m: dict) -> tuple[list[dict[str, str]], int, int]:
    """The filter table rows, the total rejected, and how many of those were failed requests (not candidates)."""
    filters = _dict(m.get("filters"))
    rejected = {str(k): v for k, v in _dict(_dict(m.get("counts")).get("rejected")).items() if isinstance(v, (int, float))}
    names = [str(r) for r in filters.get("rules") or [] if isinstance(r, str)]
    if "similarity" in filters and "near-duplicate" not in names:
        names.append("near-duplicate")
    # Evol checks that never fired have no count, but a reader must still see they ran.
    for check in filters.get("evol_checks") or []:
        if isinstance(check, str) and check not in names:
            names.append(check)
    names += [r for r in rejected if r not in names]
    rows = []
    for name in names:
        what = FILTERS.get(name, "")
        if name == "near-duplicate" and isinstance(filters.get("similarity"), (int, float)):
            field = filters.get("field") if filters.get("field") in FIELDS else "instruction"
            what = f"ROUGE-L F1 above {filters['similarity']:g} on the {FIELD_NAMES[field]} with a seed or an already kept record"
        rows.append({"name": name, "what": _cell(what), "count": _num(rejected.get(name, 0))})
    # Failed and oversized requests never produced a candidate record: listed, not counted as candidates.
    return rows, int(sum(rejected.values())), int(rejected.get("request-failed", 0)) + int(rejected.get("oversized", 0))


def _stages(m: dict) -> tuple[list[dict[str, str]], dict[str, str]]:
    priced = bool(_dict(m.get("cost")).get("priced", False))
    stages = _dict(m.get("stages"))
    names = [s for s in STAGES if s in stages] + [s for s in stages if s not in STAGES]
    rows = []
    for name in names:
        s = _dict(stages[name])
        rows.append({"name": name, "requests": _num(s.get("requests")), "prompt_tokens": _num(s.get("prompt_tokens")),
                     "completion_tokens": _num(s.get("completion_tokens")), "usd": _usd(s.get("usd"), priced)})
    usage = _dict(m.get("usage"))
    total = {
        "requests": _num(_dict(m.get("counts")).get("requests", sum(_dict(stages[n]).get("requests", 0) or 0 for n in names))),
        "prompt_tokens": _num(usage.get("prompt_tokens")),
        "completion_tokens": _num(usage.get("completion_tokens")),
        "usd": _usd(_dict(m.get("cost")).get("usd"), priced),
    }
    return rows, total


def _respond_line(r: dict) -> str:
    """What a respond run did: which models answered, how pairs were judged and kept, which system prompts were drawn."""
    if not r:
        return ""
    models = [str(x) for x in r.get("models") or []]
    bits = [f"the input's instructions answered by {', '.join(f'`{_cell(x)}`' for x in models) or 'an unrecorded model'}"
            " (an earlier output is kept in meta.previous_output)"]
    pairs = _dict(r.get("pairs"))
    if r.get("pair_judge_model"):
        dropped = ", ".join(f"{k} {_num(v)}" for k, v in _dict(pairs.get("dropped")).items()) or "none"
        bits.append(f"each pair judged by `{_cell(r['pair_judge_model'])}` in both orders; {_num(pairs.get('judged'))} pairs judged, "
                    f"{_num(pairs.get('kept'))} kept (both orders agree), dropped: {dropped}")
    system = _dict(r.get("system_prompts"))
    if system:
        bits.append(f"a system prompt drawn per record from `{_cell(system.get('set'))}` ({_num(system.get('count'))} prompts, "
                    "seeded by record id), kept as the system turn")
    return _cell("; ".join(bits))


def _recipe_line(m: dict) -> str:
    """What a textbook or chat run made: its units and how they came out, so a reader knows the rows' shape."""
    t, c = _dict(m.get("textbook")), _dict(m.get("chat"))
    if t:
        topics, sections = _dict(t.get("topics")), _dict(t.get("sections"))
        rejected = ", ".join(f"{k} {_num(v)}" for k, v in _dict(sections.get("rejected")).items()) or "none"
        return _cell(f"phi-style textbook: {_num(t.get('units'))} sections, each a topic from `{topics.get('name')}` "
                     f"({_num(topics.get('count'))} topics) × one of {_num(_dict(t.get('audiences')).get('count'))} audiences × "
                     f"one of {_num(_dict(t.get('styles')).get('count'))} styles, drawn per unit id; {_num(sections.get('kept'))} "
                     f"sections kept (rejected: {rejected}), each asked for {_num(t.get('exercises_per_section'))} exercises; "
                     f"every row is an exercise with its solution (meta.section_id names its section)")
    if c:
        ended = ", ".join(f"{k} {_num(v)}" for k, v in _dict(c.get("ended")).items()) or "none"
        turns = ", ".join(f"{k} turn{'s' if k != '1' else ''}: {_num(v)}" for k, v in _dict(c.get("turns")).items()) or "none"
        return _cell(f"multi-turn conversations: the teacher played a user who follows up and the assistant who answers, up to "
                     f"{_num(c.get('max_turns'))} assistant turns; ended: {ended}; {turns}; the rules ran on every assistant turn, "
                     f"and a conversation is cut before the first turn that fails them")
    return ""


def _judge(j: dict) -> dict | None:
    """The quality gate of a run (selfinstruct/judging.py): judge model, rubric and its hash, threshold, moderation, score histogram."""
    if not j:
        return None
    template = _dict(j.get("template"))
    moderation = {"endpoint": "kept records were sent to the endpoint's moderation (`/v1/moderations`)",
                  "judge-safety": "the endpoint had no moderation, so the judge's safety verdict screened kept records instead"
                  }.get(str(j.get("moderation")), "")
    histogram = _dict(j.get("histogram"))
    judged = sum(v for v in histogram.values() if isinstance(v, int))
    rows = [{"score": s, "count": _num(histogram.get(s, 0)),
             "share": f"{histogram.get(s, 0) / judged:.1%}" if judged and isinstance(histogram.get(s), int) else "–"}
            for s in ("5", "4", "3", "2", "1")]
    min_score = j.get("min_score")
    return {"model": _cell(str(j.get("model") or "unknown")), "template": _cell(str(template.get("name") or "not recorded")),
            "sha256": template.get("sha256") or "not recorded",
            "min_score": f"{min_score:g}" if isinstance(min_score, (int, float)) else "not recorded",
            "moderation": moderation, "rows": rows, "judged": f"{judged:,}", "scored": bool(j.get("judge", True))}


def _figures(names: Iterable[str]) -> list[dict[str, str]]:
    """Image links for the figures beside the card (figures/<name>.png), in the order the report draws them."""
    from selfinstruct.report import FIGURES

    shown = {Path(n).stem: n for n in names}
    return [{"path": shown[key], "alt": what} for key, what in FIGURES.items() if key in shown]


def _context(build, *, repo_id: str | None, local_dir: Path | None, license: str | None, secrets: Iterable[str], private: bool | None,
             figures: Iterable[str] = ()) -> dict:
    m = build.manifest
    cfg, seeds, teacher, counts = (_dict(m.get(k)) for k in ("config", "seeds", "teacher", "counts"))
    lang = _lang(build)
    language_name = LANGUAGES.get(lang, (lang, lang))[1]
    model = teacher.get("model") or cfg.get("model") or "unknown"
    kind = teacher.get("endpoint_kind")
    declared = license or seeds.get("license")

    seed_parts = [f"`{file_name(str(seeds['path']))}`" if seeds.get("path") else "seed file not recorded"]
    if isinstance(seeds.get("count"), int):
        seed_parts.append(f"{seeds['count']:,} tasks")
    if seeds.get("sha256"):
        seed_parts.append(f"sha256 `{seeds['sha256']}`")
    templates = [{"stage": _cell(stage), "name": _cell(_dict(t).get("name", "?")), "sha256": _dict(t).get("sha256", "not recorded")}
                 for stage, t in _dict(m.get("templates")).items()]

    decoding = []
    for key, label in (("temperature", "temperature"), ("top_p", "top_p"), ("max_tokens", "max_tokens"),
                       ("per_request", "tasks per request"), ("num_examples", "seed examples per prompt"),
                       ("json_mode", "JSON mode"), ("seed", "random seed")):
        if key in cfg:
            value = cfg[key]
            shown = "default" if value is None else ("on" if value is True else "off" if value is False else value)
            decoding.append(f"{label} {shown}")

    ops = _evol_ops(build)
    rounds = _evol_rounds(build)
    if rounds or ops:
        op_text = ", ".join(f"{op} ×{n:,} kept" if isinstance(n, int) else op for op, n in ops.items()) or "ops not recorded"
        evol = f"{rounds} round{'s' if rounds != 1 else ''}; {op_text}" if rounds else op_text
    else:
        evol = "not used"

    respond = _respond_line(_dict(m.get("respond")))

    sim = _dict(m.get("filters")).get("similarity", cfg.get("similarity"))
    field = _dict(m.get("filters")).get("field")
    on = f" on the {FIELD_NAMES[field]}" if field in FIELDS else ""
    near = f"ROUGE-L F1 above {sim:g}{on} (CJK-aware tokens)" if isinstance(sim, (int, float)) else "not recorded"
    filters, rejected_total, failed = _filters(m)
    kept = counts.get("kept", build.rows)
    candidates = (kept if isinstance(kept, int) else 0) + rejected_total - failed
    yield_line = (f"{_num(kept)} of {candidates:,} candidates kept ({kept / candidates:.1%})."
                  if isinstance(kept, int) and candidates else "")
    stages, total = _stages(m)
    usage = _dict(m.get("usage"))
    cost = _dict(m.get("cost"))
    notes = []
    if usage.get("estimated"):
        notes.append("Some token counts are estimates: the endpoint did not report usage for every request.")
    if not cost.get("priced", False):
        notes.append("Cost is unknown: no price was known for this model.")
    elif cost.get("price_in_per_1m") is not None:
        notes.append(f"Priced at ${cost['price_in_per_1m']:g} / ${cost.get('price_out_per_1m', 0):g} per 1M prompt / completion tokens"
                     + (f" ({cost['price_source']})." if cost.get("price_source") else "."))
    batches = _dict(m.get("batch")).get("batches") or []
    if batches:
        notes.append(f"Requests went through the OpenAI Batch API ({len(batches):,} batches), charged at the batch price.")

    split_sizes = ", ".join(f"{name} {len(rows):,}" for name, rows in build.splits.items())
    rows_line = f"{build.rows:,} rows ({split_sizes}), `{build.fmt}` format" + (", lineage columns included." if not build.slim else ".")
    run_bits = [f"status {m.get('status', 'unknown')}"]
    if m.get("stop_reason"):
        run_bits.append(f"stop reason {m['stop_reason']}")
    if m.get("created"):
        run_bits.append(f"started {m['created']}")
    if m.get("updated"):
        run_bits.append(f"last updated {m['updated']}")
    export_bits = [f"format {build.fmt}", f"shuffle seed {build.seed}"]
    if build.test_size:
        export_bits.append(f"test split {build.test_size:g} (grouped by lineage, so evolved variants of one task share a split)")
    if build.system:
        export_bits.append("with a system prompt")
    if build.slim:
        export_bits.append("lineage columns dropped")

    first = next(iter(build.splits.values()), [])
    examples = [_example(_truncate(row)) for row in first[:3]]
    if repo_id:
        load_code = f'from datasets import load_dataset\n\nds = load_dataset("{repo_id}")\nprint(ds)'
        load_note = "The repository is private: log in first (`hf auth login`) or set `HF_TOKEN`." if private is not False else ""
    else:
        # A relative folder reads the same for anyone; an absolute one would publish the maker's disk layout.
        target = (local_dir.name if local_dir.is_absolute() else local_dir.as_posix()) if local_dir else "."
        load_code = f'from datasets import load_dataset\n\nds = load_dataset("{target}")  # this folder\nprint(ds)'
        load_note = "After `selfinstruct push`, load it by repository id instead."
    if build.fmt == "messages":
        load_note = (load_note + " The `messages` column feeds TRL's `SFTTrainer` and `tokenizer.apply_chat_template` directly.").strip()

    if declared:
        license_line = f"The seed tasks are declared as `{_cell(declared)}`; the card's `license` field follows it."
    else:
        license_line = "The seed file declared no licence (pass `--license` or `--seeds-license` to record one); check the seeds' source before reuse."

    command = redact(local_paths_to_names(str(m.get("command") or "not recorded")), secrets)
    title = repo_id.split("/")[-1] if repo_id else (Path(build.run_dir).resolve().name or "selfinstruct dataset")
    filtered = None
    if is_filtered(build):
        f = _dict(m.get("filter"))
        filtered = {"inputs": _cell(", ".join(f"`{n}`" for n in f.get("inputs") or []) or "not recorded"),
                    "total": _num(f.get("total")), "field": _cell(str(f.get("field") or "instruction")),
                    "dedup": _cell(str(f.get("dedup") or "exact"))}
    return {
        "begin": BEGIN, "end": END, "title": title, "version": m.get("selfinstruct_version", "unknown"),
        "language_name": language_name or lang, "rows_line": rows_line,
        "teacher": {"model": _cell(model), "endpoint": ENDPOINTS.get(kind, "an endpoint of unrecorded kind")},
        "seeds": {"count": f"{seeds['count']:,}" if isinstance(seeds.get("count"), int) else "an unrecorded number of",
                  "line": _cell(", ".join(seed_parts)), "license": f"`{_cell(declared)}`" if declared else "not declared"},
        "templates": templates or [{"stage": "generate", "name": "not recorded", "sha256": "not recorded"}],
        "decoding": _cell(", ".join(decoding) or "not recorded"), "evol": _cell(evol), "near_duplicate": near,
        "requests": f"{_num(counts.get('requests'))} ({_num(counts.get('failed_requests'))} failed)",
        "run_line": _cell(", ".join(run_bits)), "export_line": _cell(", ".join(export_bits)),
        "command": command, "filters": filters, "rejected_total": f"{rejected_total:,}", "yield_line": yield_line,
        "stages": stages, "total": total, "cost_note": " ".join(notes),
        "format_line": {"alpaca": "Alpaca style: one task per row.", "sharegpt": "ShareGPT style: one conversation per row.",
                        "messages": "OpenAI chat style: one conversation per row.",
                        "dpo": "Preference pairs as TRL's DPOTrainer reads them (plain text): one judged pair per row.",
                        "dpo-messages": "Preference pairs as TRL's DPOTrainer reads them (chat messages): one judged pair per row."}[build.fmt],
        "columns": _columns(build), "examples": examples, "load_code": load_code, "load_note": load_note,
        "license_line": license_line, "filtered": filtered, "figures": _figures(figures),
        "respond": respond, "judge": _judge(_dict(m.get("judge"))), "recipe": _recipe_line(m),
    }


def _template() -> jinja2.Template:
    from selfinstruct.prompts import prompts_dir

    path = prompts_dir() / "card.md.jinja"
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)
    return env.from_string(path.read_text(encoding="utf-8"))


def body(build, *, repo_id: str | None = None, local_dir: Path | None = None, license: str | None = None,
         secrets: Iterable[str] = (), private: bool | None = None, figures: Iterable[str] = ()) -> str:
    """The generated Markdown block, between the selfinstruct markers; `figures` are PNG paths beside the card."""
    secrets = [s for s in secrets if s]
    text = _template().render(**_context(build, repo_id=repo_id, local_dir=local_dir, license=license, secrets=secrets, private=private,
                                         figures=figures))
    for secret in secrets:  # belt and braces: the data itself is left as it is otherwise
        if secret:
            text = text.replace(secret, "***")
    return text


def split_card(text: str | None) -> tuple[dict, str]:
    """Front matter (as a dict) and the Markdown body of a card."""
    import yaml

    if not text:
        return {}, ""
    match = _FRONT.search(text)
    if not match:
        return {}, text
    try:
        data = yaml.safe_load(match.group(2)) or {}
    except yaml.YAMLError as exc:
        raise PublishError(f"the existing README.md has invalid YAML front matter ({str(exc).splitlines()[0]})",
                           "fix the card's YAML on the Hub (or delete the README.md), then push again") from None
    if not isinstance(data, dict):
        raise PublishError("the existing README.md front matter is not a YAML mapping", "fix the card's YAML, then push again")
    return data, text[match.end():]


def merge(existing: str | None, meta: dict, block: str) -> str:
    """Our keys over the existing front matter; our block replaced in place, user text kept around it."""
    from huggingface_hub import DatasetCardData

    data, text = split_card(existing)
    merged = {**data, **meta}
    # Our keys first, then the user's own, then what `datasets` maintains (it appends those anyway).
    tail = [k for k in ("configs", "dataset_info") if k in merged]
    order = [k for k in meta if k not in tail] + [k for k in data if k not in meta and k not in tail] + tail
    yaml_text = DatasetCardData(**{k: merged[k] for k in order}, ignore_metadata_errors=True).to_yaml(original_order=order)
    block = block.rstrip("\n") + "\n"
    if _BLOCK.search(text):
        text = _BLOCK.sub(lambda _: block, text, count=1)
    elif text.strip():
        text = text.rstrip("\n") + "\n\n" + block
    else:
        text = block
    return f"---\n{yaml_text}\n---\n\n{text.lstrip(chr(10))}"


def datasets_yaml(build, dd, sizes: dict[str, int]) -> dict:
    """`configs` and `dataset_info` exactly as `datasets.push_to_hub` writes them, for a local export."""
    from datasets import DatasetInfo, SplitDict, SplitInfo
    from datasets.info import DatasetInfosDict
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCardData


    info = DatasetInfo(config_name="default", features=build.features(), splits=SplitDict(), download_size=0, dataset_size=0)
    for name, ds in dd.items():
        nbytes = ds._estimate_nbytes()
        info.splits.add(SplitInfo(name=name, num_bytes=nbytes, num_examples=len(ds)))
        info.download_size += sizes.get(name, 0)
        info.dataset_size += nbytes
    info.size_in_bytes = info.download_size + info.dataset_size
    card_data = DatasetCardData()
    DatasetInfosDict({"default": info}).to_dataset_card_data(card_data)
    MetadataConfigs({"default": {"data_files": [{"split": name, "path": f"{DATA_DIR}/{name}-*"} for name in dd]}}).to_dataset_card_data(card_data)
    return card_data.to_dict()


def local_card(build, dd, sizes: dict[str, int], to: Path, *, existing: str | None = None, license: str | None = None,
               figures: Iterable[str] = ()) -> str:
    """The README.md of an export folder."""
    data, _ = split_card(existing)
    meta = metadata(build, license=license, existing=data) | datasets_yaml(build, dd, sizes)
    return merge(existing, meta, body(build, local_dir=Path(to), license=license, figures=figures))


def hub_card(build, existing: str | None, repo_id: str, *, license: str | None = None, secrets: Iterable[str] = (), private: bool | None = None,
             figures: Iterable[str] = ()) -> str:
    """The README.md of a Hub repo, merged into the card `datasets` just wrote (which holds configs/dataset_info)."""
    data, _ = split_card(existing)
    meta = metadata(build, license=license, existing=data, repo_id=repo_id)
    return merge(existing, meta, body(build, repo_id=repo_id, license=license, secrets=secrets, private=private, figures=figures))
