"""respond: answer any instruction dataset with a teacher (GPT-4-LLM); with several models, preference pairs a judge chose (DPO);
with a system-prompt set, Orca-style explanation answers."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, Mapping, Sequence

from selfinstruct.config import GenerateConfig
from selfinstruct.dirlock import DirectoryLock
from selfinstruct.engine import Engine, QueuedStage, Tally, public_url, teacher_capacity, teacher_mismatches
from selfinstruct.errors import ConfigError, InputError, OutputError
from selfinstruct.evolution import check_instruction, strip_think, template_suffix
from selfinstruct.inputs import infer_lang, input_seeds, read_base, records_sha256
from selfinstruct.pricing import Price, endpoint_kind, estimate_prompt_tokens, estimate_tokens, resolve_price
from selfinstruct.prompts import Template, load_template, prompts_dir
from selfinstruct.rows import prompt_text
from selfinstruct.rules import RuleSettings, check
from selfinstruct.rundir import RECORDS, REJECTED, RunDir
from selfinstruct.similarity import BatchDedup, topic_text

ANSWER = "respond"
PAIR_JUDGE = "pair-judge"
# Pair outcomes other than a choice: the pair is dropped and counted under its outcome.
DROPPED = ("tie", "disagreement", "unclear", "judge-failed")
# Rejections only respond writes (it also writes the generate rules' reasons, truncated and request-failed).
NO_PREFERENCE = "no-preference"
# A verdict is a few sentences and a bracketed word.
PAIR_JUDGE_MAX_TOKENS = 1024
SHIPPED_SETS = ("orca",)
# Meta keys that describe how an input record's old answer was made: respond writes its own, and an old system prompt
# left behind would be exported as the system turn of an answer made without it.
PREVIOUS_ANSWER_KEYS = ("raw", "usage", "request_id", "request_ids", "response_id", "finish_reason", "template", "template_sha256",
                        "respond_template", "failed_stage", "answers", "pairs", "pair_judge", "system", "system_set", "system_index")

_SPEC = re.compile(r"^(?P<name>[^@#]+?)(?:@(?P<url>[^#]*?))?(?::(?P<pin>\d+(?:\.\d+)?):(?P<pout>\d+(?:\.\d+)?))?(?:#(?P<env>[A-Za-z_][A-Za-z0-9_]*))?$")
_VERDICT = re.compile(r"\[\[\s*(A|B|tie|平局|平手|相同)\s*\]\]", re.IGNORECASE)


# ---- models, system prompts, verdicts: pure pieces -----------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """Where one answering (or judging) model lives and what it costs; None means the run's --base-url, the price table, --api-key-env."""

    name: str
    base_url: str | None = None
    price_in: float | None = None
    price_out: float | None = None
    api_key_env: str | None = None


def parse_model_spec(text: str) -> ModelSpec:
    """NAME[@BASE_URL][:PRICE_IN:PRICE_OUT][#KEY_ENV], e.g. qwen2.5-72b@http://gpu:8000/v1:0:0 or gpt-4o:2.5:10#OPENAI_API_KEY."""
    m = _SPEC.match(text.strip())
    if not m or not m.group("name").strip():
        raise ConfigError(f"--model-spec {text!r} is not NAME[@BASE_URL][:PRICE_IN:PRICE_OUT][#KEY_ENV]",
                          "e.g. --model-spec qwen-max@https://dashscope.aliyuncs.com/compatible-mode/v1:1.6:6.4#DASHSCOPE_API_KEY")
    url = m.group("url")
    if url is not None and not re.match(r"^https?://", url):
        raise ConfigError(f"--model-spec {text!r}: {url!r} is not an http(s) URL", "write the endpoint as http://host:port/v1")
    if url and re.match(r"^https?://[^/]*@", url):
        raise ConfigError(f"--model-spec {m.group('name').strip()!r}: the URL carries a user name or password",
                          "drop the user:password@ part; name the variable holding the key with #KEY_ENV")
    pin, pout = m.group("pin"), m.group("pout")
    return ModelSpec(m.group("name").strip(), url or None, float(pin) if pin else None, float(pout) if pout else None, m.group("env"))


def answer_models(cfg: GenerateConfig) -> tuple[str, ...]:
    """The models that answer: --models, else --model."""
    return tuple(dict.fromkeys(m.strip() for m in ",".join(cfg.models).split(",") if m.strip())) or (cfg.model,)


def model_specs(cfg: GenerateConfig) -> dict[str, ModelSpec]:
    """Every model the run talks to (answerers, then the pair judge) with its endpoint, price and key variable."""
    given: dict[str, ModelSpec] = {}
    for text in cfg.model_specs:
        spec = parse_model_spec(text)
        if spec.name in given:
            raise ConfigError(f"--model-spec names {spec.name!r} twice", "give one spec per model")
        given[spec.name] = spec
    names = list(answer_models(cfg))
    judge = pair_judge(cfg)
    if judge and judge not in names:
        names.append(judge)
    unused = [n for n in given if n not in names]
    if unused:
        raise ConfigError(f"--model-spec {unused[0]!r} is neither in --models nor the --pair-judge-model", "name it in --models, or drop the spec")
    specs = {}
    for i, name in enumerate(names):
        spec = given.get(name) or ModelSpec(name)
        # The run's --base-url, --price-in/--price-out and --api-key-env belong to the first model unless a spec says otherwise.
        first = i == 0
        specs[name] = ModelSpec(
            name, spec.base_url or cfg.base_url,
            spec.price_in if spec.price_in is not None else (cfg.price_in if first else None),
            spec.price_out if spec.price_out is not None else (cfg.price_out if first else None),
            spec.api_key_env or cfg.api_key_env,
        )
    return specs


def pair_judge(cfg: GenerateConfig) -> str | None:
    """The model that judges pairs (default the first answering model); None with one answering model."""
    models = answer_models(cfg)
    if len(models) < 2:
        return None
    return cfg.pair_judge_model or models[0]


def key_variables(cfg: GenerateConfig) -> list[str]:
    """The environment variables holding the keys a respond run needs (read at the CLI edge)."""
    return list(dict.fromkeys([cfg.api_key_env] + [s.api_key_env for s in model_specs(cfg).values() if s.api_key_env]))


def spec_price(spec: ModelSpec) -> Price | None:
    """A model's price: its spec's figures, else 0 for a local server, else the shipped table; None if unknown."""
    return resolve_price(spec.name, endpoint_kind(spec.base_url), spec.price_in, spec.price_out)


@dataclass(frozen=True)
class SystemPrompts:
    """A set of system prompts a run draws from, one per record."""

    name: str
    prompts: tuple[str, ...]
    sha256: str

    def draw(self, seed: int, record_id: str) -> tuple[int, str]:
        """(index, prompt) for a record, from an rng seeded by the run seed and the record id: a rerun draws the same."""
        i = random.Random(f"{seed}:system:{record_id}").randrange(len(self.prompts))
        return i, self.prompts[i]

    def manifest(self) -> dict:
        return {"set": self.name, "count": len(self.prompts), "sha256": self.sha256}


def load_system_prompts(name_or_path: str, lang: str) -> SystemPrompts:
    """A shipped set (orca, in the run's language) or a UTF-8 file of one prompt a line (# starts a comment line)."""
    if name_or_path.lower() in SHIPPED_SETS:
        path = prompts_dir() / "respond" / f"system_prompts_{template_suffix(lang)}.txt"
        name = f"{name_or_path.lower()}-{template_suffix(lang)}"
    else:
        path = Path(name_or_path)
        name = path.name
        if not path.is_file():
            raise InputError(f"--system-prompts {name_or_path}: neither a shipped set ({', '.join(SHIPPED_SETS)}) nor a file",
                             "pass orca, or a text file with one system prompt a line")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read system prompts ({exc})", "save it as UTF-8 text, one prompt a line") from None
    prompts = tuple(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")))
    if not prompts:
        raise InputError(f"{path}: no system prompts in it", "write one prompt a line (lines starting with # are comments)")
    return SystemPrompts(name, prompts, hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest())


def parse_verdict(content: str) -> str:
    """A (first answer shown), B, tie or unclear, from the judge's reply: its last [[...]] verdict."""
    found = _VERDICT.findall(strip_think(content or ""))
    if not found:
        return "unclear"
    last = found[-1]
    return last.upper() if last.upper() in ("A", "B") else "tie"


def combine(first: str, second: str, a: str, b: str) -> tuple[str, str | None]:
    """A pair's outcome from its two verdicts (a shown first, then b first): (chosen|tie|disagreement|unclear, the chosen model)."""
    pick1 = {"A": a, "B": b}.get(first, first)
    pick2 = {"A": b, "B": a}.get(second, second)
    if pick1 == pick2 and pick1 in (a, b):
        return "chosen", pick1
    if "unclear" in (pick1, pick2):
        return "unclear", None
    if "tie" in (pick1, pick2):
        return "tie", None
    return "disagreement", None  # each order picked the answer in one place: position bias, not preference


def refused_before_paying(base: Sequence[dict], rules: RuleSettings, similarity: float | None) -> dict[str, tuple[str, str]]:
    """Records refused before any request, by id: the instruction rules, then near-copies of an earlier input record.

    respond keeps the input's instructions, so the near-duplicate check (similarity None: off) looks at them (instruction +
    input, as filter compares) once, keep-first in input order: answering a near-copy twice would pay twice for one task.
    """
    refused: dict[str, tuple[str, str]] = {}
    standing = []
    for rec in base:
        verdict = check_instruction(rec["instruction"], rec["input"], rules)
        if verdict:
            refused[rec["id"]] = verdict
        else:
            standing.append(rec)
    if similarity is not None and len(standing) > 1:
        result = BatchDedup(similarity).run([topic_text(r["instruction"], r["input"]) for r in standing])
        for i, kept in enumerate(result.duplicate_of):
            if kept >= 0:
                refused[standing[i]["id"]] = ("near-duplicate", f"ROUGE-L {result.score[i]:.3f} with {standing[int(kept)]['id']}")
    return refused


def load_answer_templates(lang: str) -> tuple[Template, Template]:
    """The shipped answer and pair-judge templates for a language."""
    suffix = template_suffix(lang)
    return load_template(f"respond/answer_{suffix}.jinja"), load_template(f"respond/pair_judge_{suffix}.jinja")


# ---- the stage -----------------------------------------------------------------------------------


class Response(QueuedStage):
    """The respond stage: each input record answered by one model (or several, then judged in pairs), a job per record."""

    name = "respond"
    yield_what = "records got a usable answer"
    yield_check = "the model and rejected.jsonl"

    def __init__(self, cfg: GenerateConfig, engine: Engine, lang: str, base: list[dict], *, routes: Mapping[str, str],
                 system_prompts: SystemPrompts | None = None, source: dict | None = None, seeds: dict | None = None) -> None:
        self.cfg = cfg
        self.engine = engine
        self.run = engine.run
        self.lang = lang
        self.base = base
        self.models = answer_models(cfg)
        self.judge = pair_judge(cfg)
        self.routes = dict(routes)  # model name -> engine route
        self.system_prompts = system_prompts
        self.source = source or {}
        self.seeds = seeds
        self.template, self.judge_template = load_answer_templates(lang)
        self.ledger_stages = (ANSWER, PAIR_JUDGE) if self.judge else (ANSWER,)
        self.rules = RuleSettings(lang=lang, enabled=frozenset(r for r in RuleSettings().enabled if r not in cfg.no_rule))
        self.dedup = "near-duplicate" not in cfg.no_rule
        self.tally = Tally()
        self.pairs = collections.Counter()  # judged, kept and each dropped outcome
        self.finished: set[str] = set()
        self.total = 0
        self.done = 0
        self.sample_reply = ""
        self._queue = iter(())

    # ---- resume and the checks before paying ----------------------------------------------

    def load(self) -> None:
        """Count what earlier attempts wrote, reject (free) what the instruction checks refuse, queue the rest."""
        for rec in self.run.load(RECORDS):
            self._finish(rec, None)
        for rec in self.run.load(REJECTED):
            if (rec.get("meta") or {}).get("stage") == "judge":
                continue  # the quality gate's (--judge) rejection of an answer still in records.jsonl: the gate counts it
            self._finish(rec, rec.get("reason", "unknown"))
        refused = self._refused()
        fresh = [self._rejected(rec, *refused[rec["id"]]) for rec in self.base if rec["id"] in refused and rec["id"] not in self.finished]
        if fresh:
            self.run.append(REJECTED, fresh)
            for rec in fresh:
                self._finish(rec, rec["reason"])
        todo = [rec for rec in self.base if rec["id"] not in self.finished]
        self.total, self.done = len(self.base), len(self.base) - len(todo)
        self._queue = iter(todo)

    def _refused(self) -> dict[str, tuple[str, str]]:
        return refused_before_paying(self.base, self.rules, self.cfg.similarity if self.dedup else None)

    def _rejected(self, rec: dict, reason: str, detail: str) -> dict:
        out = self._record(rec)
        out["meta"]["model"] = None
        out["output"] = ""
        return out | {"reason": reason, "detail": detail}

    def _finish(self, rec: dict, reason: str | None) -> None:
        self.finished.add(rec["id"])
        if reason is None:
            self.tally.kept += 1
        else:
            self.tally.rejected[reason] += 1
        for pair in (rec.get("meta") or {}).get("pairs") or []:
            self.pairs["judged"] += 1
            self.pairs["kept" if pair.get("outcome") == "chosen" else str(pair.get("outcome"))] += 1

    # ---- the engine's questions -----------------------------------------------------------

    @property
    def window(self) -> int:
        """Records in flight: as many as the teacher takes requests at once (its adaptive capacity when it has one); with --batch, all."""
        if self.cfg.batch:
            from selfinstruct.batch import BATCH_WINDOW

            return BATCH_WINDOW
        return teacher_capacity(self.engine, self.cfg)

    def progress(self) -> tuple[str, int, int]:
        return "respond", self.done, self.total

    # ---- one record -------------------------------------------------------------------------

    def _record(self, rec: dict) -> dict:
        """The output record's shape: the input's id, instruction and input; its meta kept, its output moved to previous_output."""
        meta = {k: v for k, v in (rec.get("meta") or {}).items() if k not in PREVIOUS_ANSWER_KEYS}
        if rec.get("output", "").strip():
            meta["previous_output"] = rec["output"]
        previous_model = meta.pop("model", None)
        if previous_model and "previous_output" in meta:
            meta["previous_model"] = previous_model
        meta |= {"stage": ANSWER, "template": self.template.name, "template_sha256": self.template.sha256,
                 "request_ids": {}, "usage": {"prompt_tokens": 0, "completion_tokens": 0, "estimated": False}}
        if self.system_prompts is not None:
            index, text = self.system_prompts.draw(self.cfg.seed, rec["id"])
            meta |= {"system": text, "system_set": self.system_prompts.name, "system_index": index}
        return {"id": rec["id"], "instruction": rec["instruction"], "input": rec["input"], "output": "", "meta": meta}

    async def _job(self, rec: dict) -> None:
        record = await self._respond(rec)  # Halted passes through: the record is not finished
        self.done += 1
        self.engine.outcome(1 if record is not None else 0)

    async def _all(self, coroutines: list[Awaitable]) -> list:
        """Await requests side by side; every one lands (or fails) before the first error is raised, so none is left unledgered."""
        results = await asyncio.gather(*coroutines, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results

    def _note(self, meta: dict, entry: dict, key: str) -> None:
        meta["request_ids"][key] = entry["request_id"]
        usage = entry.get("usage") or {}
        for k in ("prompt_tokens", "completion_tokens"):
            meta["usage"][k] += int(usage.get(k, 0))
        meta["usage"]["estimated"] = meta["usage"]["estimated"] or bool(usage.get("estimated"))

    async def _respond(self, rec: dict) -> dict | None:
        record = self._record(rec)
        meta = record["meta"]
        messages = self.template.render(instruction=rec["instruction"], input=rec["input"], lang=self.lang, system=meta.get("system", ""))
        entries = await self._all([
            self.engine.ask(ANSWER, f"{ANSWER}:{model}:{rec['id']}", messages, max_tokens=self.cfg.max_tokens,
                            fields={"record_id": rec["id"], "model": model}, route=self.routes[model])
            for model in self.models])
        answers = []
        for model, entry in zip(self.models, entries):
            self._note(meta, entry, f"{ANSWER}:{model}")
            answers.append(self._answer(record, model, entry))
        if self.judge is None:
            answer = answers[0]
            meta |= {"model": answer["model"], "request_id": answer["request_id"], "response_id": answer.get("response_id"),
                     "finish_reason": answer.get("finish_reason"), "raw": answer["raw"]}
            record["output"] = answer["output"]
            if answer.get("reason"):
                return self._reject(record, answer["reason"], answer["detail"])
            return self._keep(record)
        meta["answers"] = answers
        usable = [a for a in answers if not a.get("reason")]
        if len(usable) < 2:
            bad = next(a for a in answers if a.get("reason"))
            return self._reject(record, bad["reason"], f"{bad['model']}: {bad['detail']}" + (
                f" ({len(usable)} usable answer of {len(answers)})" if len(usable) == 1 else " (no usable answer)"))
        pairs = [(a, b) for i, a in enumerate(usable) for b in usable[i + 1:]]
        verdicts = await self._all([self._judge(record, a, b) for a, b in pairs])
        meta["pairs"] = list(verdicts)
        meta["pair_judge"] = self.judge
        wins = collections.Counter(p["chosen"] for p in verdicts if p["outcome"] == "chosen")
        if not wins:
            outcomes = collections.Counter(p["outcome"] for p in verdicts)
            return self._reject(record, NO_PREFERENCE, "every pair dropped: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
        # The record's own output is the answer that won most pairs (ties to the earlier model): it trains SFT as well.
        best = max(usable, key=lambda a: (wins[a["model"]], -self.models.index(a["model"])))
        record["output"] = best["output"]
        meta["model"] = best["model"]
        return self._keep(record)

    def _answer(self, record: dict, model: str, entry: dict) -> dict:
        """One model's answer to a record, with its lineage and, when unusable, the rule it breaks."""
        answer = {"model": model, "output": "", "request_id": entry["request_id"], "usage": entry.get("usage") or {}, "raw": ""}
        if entry["status"] != "ok":
            return answer | {"reason": "request-failed", "detail": f"the answer request failed: {entry.get('error', '')}"}
        raw = entry.get("content", "") or ""
        answer |= {"raw": raw, "output": strip_think(raw), "response_id": entry.get("response_id"), "finish_reason": entry.get("finish_reason")}
        self.sample_reply = raw
        if entry.get("finish_reason") == "length":
            return answer | {"reason": "truncated", "detail": "the answer was cut by the token limit"}
        verdict = check(record["instruction"], record["input"], answer["output"], self.rules)
        if verdict:
            return answer | {"reason": verdict[0], "detail": verdict[1]}
        return answer

    async def _judge(self, record: dict, a: dict, b: dict) -> dict:
        """A pair judged in both orders; kept only when both orders choose the same answer."""
        task = prompt_text(record["instruction"], record["input"])
        system = record["meta"].get("system", "")
        orders = [(a, b), (b, a)]
        entries = await self._all([
            self.engine.ask(PAIR_JUDGE, f"{PAIR_JUDGE}:{x['model']}|{y['model']}:{record['id']}",
                            self.judge_template.render(system=system, task=task, first=x["output"], second=y["output"], lang=self.lang),
                            max_tokens=min(PAIR_JUDGE_MAX_TOKENS, self.cfg.max_tokens or PAIR_JUDGE_MAX_TOKENS),
                            fields={"record_id": record["id"], "first": x["model"], "second": y["model"]}, route=self.routes[self.judge])
            for x, y in orders])
        verdicts = []
        for (x, y), entry in zip(orders, entries):
            self._note(record["meta"], entry, f"{PAIR_JUDGE}:{x['model']}|{y['model']}")
            verdict = parse_verdict(entry.get("content", "")) if entry["status"] == "ok" else "failed"
            verdicts.append({"first": x["model"], "second": y["model"], "verdict": verdict, "request_id": entry["request_id"],
                             "raw": entry.get("content", "") if entry["status"] == "ok" else entry.get("error", "")})
        if "failed" in (v["verdict"] for v in verdicts):
            outcome, chosen = "judge-failed", None
        else:
            outcome, chosen = combine(verdicts[0]["verdict"], verdicts[1]["verdict"], a["model"], b["model"])
        pair = {"models": [a["model"], b["model"]], "outcome": outcome, "verdicts": verdicts}
        if chosen:
            pair |= {"chosen": chosen, "rejected": b["model"] if chosen == a["model"] else a["model"]}
        return pair

    def _keep(self, record: dict) -> dict:
        self.run.append(RECORDS, [record])
        self._finish(record, None)
        return record

    def _reject(self, record: dict, reason: str, detail: str) -> None:
        record |= {"reason": reason, "detail": detail}
        self.run.append(REJECTED, [record])
        self._finish(record, reason)
        return None

    # ---- manifest -----------------------------------------------------------------------

    def summary(self) -> dict:
        dropped = {k: self.pairs[k] for k in DROPPED if self.pairs[k]}
        out = {"models": list(self.models), "pair_judge_model": self.judge,
               "system_prompts": self.system_prompts.manifest() if self.system_prompts else None,
               "records": self.total, "kept": self.tally.kept, "rejected": dict(sorted(self.tally.rejected.items()))}
        if self.judge:
            out["pairs"] = {"judged": self.pairs["judged"], "kept": self.pairs["kept"], "dropped": dropped,
                            "orders_per_pair": 2}
        out["by_model"] = self.by_model()
        return out

    def by_model(self) -> dict:
        """Requests, tokens and dollars of each model in each of its roles (answering, judging), from the ledger's finished requests."""
        tallies: dict[tuple[str, str], list[int]] = {}
        for entry in self.engine.replies.values():
            stage = entry.get("stage")
            if stage not in self.ledger_stages:
                continue
            route = self.engine.routes.get(str(entry.get("route", "teacher"))) or self.engine.routes["teacher"]
            usage = entry.get("usage") or {}
            t = tallies.setdefault((route.name, str(stage)), [0, 0, 0])
            t[0] += 1
            t[1] += int(usage.get("prompt_tokens", 0))
            t[2] += int(usage.get("completion_tokens", 0))
        out: dict = {}
        for (route_name, stage), (requests, prompt, completion) in sorted(tallies.items()):
            route = self.engine.routes[route_name]
            out.setdefault(route.model, {})[stage] = {
                "requests": requests, "prompt_tokens": prompt, "completion_tokens": completion,
                "usd": round(route.price.usd(prompt, completion), 6) if route.price else None}
        return out

    def describe(self, m: dict) -> None:
        cfg = self.cfg
        keys = ("model", "base_url", "api_key_env", "seed", "concurrency", "rpm", "tpm", "timeout", "retries", "temperature", "top_p",
                "max_tokens", "similarity", "max_cost", "price_in", "price_out", "no_rule", "models", "pair_judge_model",
                "system_prompts", "min_yield", "yield_window", "grace")
        m["config"] = {k: v for k, v in cfg.to_dict().items() if k in keys} | {"lang": self.lang, "base_url": public_url(cfg.base_url)}
        m["input"] = self.source
        if self.seeds:
            m["seeds"] = self.seeds
        m["templates"] = {ANSWER: {"name": self.template.name, "sha256": self.template.sha256}}
        if self.judge:
            m["templates"][PAIR_JUDGE] = {"name": self.judge_template.name, "sha256": self.judge_template.sha256}
        m["filters"] = {"similarity": cfg.similarity if self.dedup else None, "rules": sorted(self.rules.enabled), "lang": self.lang,
                        "near_duplicate_on": "input instruction + input" if self.dedup else None}
        m["respond"] = self.summary()


# ---- the command ---------------------------------------------------------------------------------


def check_respondable(run: RunDir, cfg: GenerateConfig, lang: str, source: dict, templates: Sequence[Template],
                      system_prompts: SystemPrompts | None, specs: Mapping[str, ModelSpec], price: Price | None) -> None:
    """Refuse to resume a respond run with other input, models, judge, prices, system prompts, seed, language or templates."""
    from selfinstruct.batch import run_price_for

    previous = run.load_manifest()
    if not previous:
        return
    if "respond" not in previous:
        raise OutputError(f"{run.path}: holds another kind of run, not a respond run", "choose a new --out")
    old = previous["respond"]
    mismatches, flags = teacher_mismatches(previous, cfg.model, price)
    if (previous.get("input") or {}).get("sha256") != source.get("sha256"):
        mismatches.append("input records (files or --limit)")
    if old.get("models") != list(answer_models(cfg)):
        mismatches.append("--models")
    if old.get("pair_judge_model") != pair_judge(cfg):
        mismatches.append("--pair-judge-model")
    if (old.get("system_prompts") or {}).get("sha256") != (system_prompts.sha256 if system_prompts else None):
        mismatches.append("--system-prompts")
    old_cfg = previous.get("config") or {}
    for key, value in (("seed", cfg.seed), ("lang", lang), ("similarity", cfg.similarity)):
        if key in old_cfg and old_cfg[key] != value:
            mismatches.append(f"--{key}")
    teachers = previous.get("teachers") or {}
    for route_name, route in teachers.items():
        spec = specs.get(route.get("model"))
        # The quality gate's routes (--judge, --moderate) are checked by the gate itself.
        if spec is None or route_name in ("teacher", "judge", "moderation"):
            continue
        p = run_price_for(cfg, spec_price(spec))
        if route.get("price_in_per_1m") is not None and (p is None or (p.input, p.output) != (route["price_in_per_1m"], route["price_out_per_1m"])):
            mismatches.append(f"price of {spec.name}")
    old_templates = previous.get("templates") or {}
    for t in templates:
        if any(v.get("name") == t.name and v.get("sha256") != t.sha256 for v in old_templates.values()):
            mismatches.append(f"template {t.name}")
    if mismatches:
        hint = f"resume with {' '.join(flags)}" if flags and len(flags) == len(mismatches) else "re-run with the original settings to resume"
        raise OutputError(f"{run.path}: holds a respond run made with a different {', '.join(mismatches)}", f"{hint}, or choose a new --out")


def run_respond(cfg: GenerateConfig, inputs: Sequence[Path], limit: int | None, keys: Mapping[str, str | None], command: str,
                console, echo: Callable[[str], None] | None = None, judge_api_key: str | None = None) -> int:
    """The respond command after its flags: any dataset → a run directory of answered (or preference-paired) records, then --judge /
    --moderate. Returns the exit code."""
    from selfinstruct.batch import cancel_batches, check_batches, interrupted_note, run_price_for, transport_factory
    from selfinstruct.config import require_key
    from selfinstruct.engine import check_orphaned, make_engine, teacher_settings
    from selfinstruct.judging import check_judgeable, check_key, finish_gated, gate_run, gated_before, judge_key, judge_settings
    from selfinstruct.progress import run_displayed

    out = cfg.out
    if any(Path(p).resolve() == out.resolve() for p in inputs):
        raise ConfigError(f"--out {out} is also an input", "write the answers to a new directory")
    models = answer_models(cfg)
    if cfg.pair_judge_model and len(models) < 2:
        raise ConfigError("--pair-judge-model needs two or more --models", "pass --models A,B to make preference pairs")
    specs = model_specs(cfg)
    first = specs[models[0]]
    # The first model is the engine's teacher: its endpoint, price and key are the run's.
    cfg = dataclasses.replace(cfg, model=models[0], base_url=first.base_url, price_in=first.price_in, price_out=first.price_out,
                              api_key_env=first.api_key_env or cfg.api_key_env)
    base = read_base(inputs, limit)
    if not base:
        raise ConfigError(f"no records to answer in {', '.join(map(str, inputs))}", "check the input files")
    lang = cfg.lang or infer_lang(r["instruction"] for r in base)
    cfg = dataclasses.replace(cfg, lang=lang)
    system_prompts = load_system_prompts(cfg.system_prompts, lang) if cfg.system_prompts else None
    source = {"paths": [Path(p).name for p in inputs], "records": len(base), "limit": limit, "sha256": records_sha256(base)}
    prices = {}
    for name, spec in specs.items():
        prices[name] = run_price_for(cfg, spec_price(spec))
        if prices[name] is None:
            if cfg.max_cost is not None:
                raise ConfigError(f"--max-cost needs a price, and {name!r} is not in the price table",
                                  f"give its price: --model-spec {name}[@URL]:PRICE_IN:PRICE_OUT (USD per 1M tokens)")
            console.print(f"[yellow]warning:[/] no price known for {name!r}; its cost will be reported as unknown", highlight=False)
    if cfg.dry_run:
        rules = RuleSettings(lang=lang, enabled=frozenset(r for r in RuleSettings().enabled if r not in cfg.no_rule))
        refused = refused_before_paying(base, rules, cfg.similarity if "near-duplicate" not in cfg.no_rule else None)
        for line in projection_lines(project_respond(cfg, lang, base, refused, system_prompts, prices), cfg.max_cost):
            (echo or console.print)(line)
        if cfg.judge or cfg.moderate:
            from selfinstruct.judging import project_gate

            # Every answered record is judged: the inputs less those refused before paying.
            echo_line = echo or console.print
            echo_line(project_gate(cfg, lang, len(base) - len(refused), [(r["instruction"], r.get("input", ""), r.get("output", ""))
                                                                         for r in base[:20]]))
        return 0
    for spec in specs.values():
        require_key(dataclasses.replace(cfg, base_url=spec.base_url, api_key_env=spec.api_key_env or cfg.api_key_env),
                    keys.get(spec.api_key_env or cfg.api_key_env))
    run = RunDir(out)
    if cfg.cancel_batches:
        return cancel_batches(run, cfg, keys.get(cfg.api_key_env), echo or console.print)
    run.prepare()
    with DirectoryLock(run.path, command):
        check_orphaned(run)
        gate_key = judge_key(cfg, keys.get(cfg.api_key_env), judge_api_key)
        if cfg.judge or cfg.moderate:
            # The judge's key, price and (on a resume) sameness are checked before the answers are paid for, not after.
            gate_settings = judge_settings(cfg, lang)
            check_key(gate_settings, gate_key)
            check_judgeable(run.load_manifest(), gate_settings)
        if gated_before(run, cfg):  # the quality gate already rewrote records.jsonl: answering again would refill it
            return finish_gated(run, cfg, None, console)
        engine = make_engine(run, cfg, prices[models[0]], command)
        settings = teacher_settings(cfg)
        routes = {models[0]: "teacher"}
        for name, spec in specs.items():
            if name == models[0]:
                continue
            # A model called "teacher" or "pair-judge" must not take over the engine's own route names.
            route = (name if name not in ("teacher", PAIR_JUDGE) else f"model:{name}") if name in models else PAIR_JUDGE
            routes[name] = route
            key = keys.get(spec.api_key_env or cfg.api_key_env)
            route_settings = dataclasses.replace(settings, model=name, base_url=spec.base_url)
            engine.add_route(route, name, spec.base_url, prices[name], transport_factory(cfg, route_settings, key, engine, route=route))
        stage = Response(cfg, engine, lang, base, routes=routes, system_prompts=system_prompts, source=source, seeds=input_seeds(inputs))
        check_respondable(run, cfg, lang, source, (stage.template, stage.judge_template), system_prompts, specs, prices[models[0]])
        engine.load()
        check_batches(engine, cfg)
        stage.load()
        if engine.tally.requests and not cfg.quiet:
            console.print(f"resuming {run.path}: {stage.tally.kept:,} kept, {sum(stage.tally.rejected.values()):,} rejected")
        key = keys.get(cfg.api_key_env)
        try:
            exit_code = run_displayed(engine, stage, transport_factory(cfg, settings, key, engine), console, cfg.quiet)
        finally:
            run.close()
        print_summary(engine, stage, console)
        if exit_code in (130, 143):
            console.print(f"interrupted; everything finished is saved. Resume with: {command}", soft_wrap=True, highlight=False, markup=False)
            if cfg.batch:
                console.print(interrupted_note(command), soft_wrap=True, highlight=False, markup=False)
        if exit_code or not (cfg.judge or cfg.moderate):
            return exit_code
        # The gate rewrites records.jsonl in place: only answers the judge scored >= --min-score stay.
        return gate_run(engine, cfg, lang, gate_key, console)


# Planning priors for --dry-run, not measurements: an answer as long as the input's old output (this many tokens where there is
# none), and a verdict of a few sentences.
PRIOR_ANSWER_TOKENS = 400
PRIOR_VERDICT_TOKENS = 80


def project_respond(cfg: GenerateConfig, lang: str, base: Sequence[dict], refused: Mapping[str, tuple[str, str]],
                    system_prompts: SystemPrompts | None, prices: Mapping[str, Price | None]) -> dict:
    """The --dry-run projection: records to answer after the free checks, then requests, tokens and dollars per stage."""
    template, judge_template = load_answer_templates(lang)
    models, judge = answer_models(cfg), pair_judge(cfg)
    pairs = len(models) * (len(models) - 1) // 2
    todo = [r for r in base if r["id"] not in refused]
    answer_prompt = answer_out = judge_prompt = 0
    for rec in todo:
        system = system_prompts.draw(cfg.seed, rec["id"])[1] if system_prompts else ""
        answer_prompt += estimate_prompt_tokens(template.render(instruction=rec["instruction"], input=rec["input"], lang=lang, system=system))
        out = estimate_tokens(rec["output"]) if rec["output"].strip() else PRIOR_ANSWER_TOKENS
        out = min(out, cfg.max_tokens or out)
        answer_out += out
        if judge:
            frame = estimate_prompt_tokens(judge_template.render(system=system, task=prompt_text(rec["instruction"], rec["input"]),
                                                                 first="", second="", lang=lang))
            judge_prompt += 2 * pairs * (frame + 2 * out)
    stages = {ANSWER: {"requests": len(todo) * len(models), "prompt_tokens": answer_prompt * len(models),
                       "completion_tokens": answer_out * len(models),
                       "usd": (sum(prices[m].usd(answer_prompt, answer_out) for m in models)
                               if all(prices[m] is not None for m in models) else None)}}
    if judge:
        requests = 2 * pairs * len(todo)
        judge_out = requests * PRIOR_VERDICT_TOKENS
        stages[PAIR_JUDGE] = {"requests": requests, "prompt_tokens": judge_prompt, "completion_tokens": judge_out,
                              "usd": prices[judge].usd(judge_prompt, judge_out) if prices[judge] is not None else None}
    unknown = [m for m in dict.fromkeys([*models, *([judge] if judge else [])]) if prices[m] is None]
    return {"records": len(base), "to_answer": len(todo), "refused": dict(collections.Counter(r for r, _ in refused.values()).most_common()),
            "models": list(models), "pair_judge": judge, "stages": stages, "unpriced": unknown,
            "usd": None if unknown else sum(st["usd"] for st in stages.values())}


def projection_lines(p: dict, max_cost: float | None) -> list[str]:
    """The --dry-run report, one line per stage and one for the total."""
    refused = ", ".join(f"{k} {v:,}" for k, v in p["refused"].items()) or "none"
    lines = [f"dry run: {p['to_answer']:,} of {p['records']:,} records to answer (refused before paying: {refused}); "
             f"answers as long as the input's old outputs, {PRIOR_ANSWER_TOKENS} tokens where there is none"]
    for name, st in p["stages"].items():
        usd = f"${st['usd']:.2f}" if st["usd"] is not None else "unknown (no price)"
        who = f"{len(p['models'])} model{'s' if len(p['models']) > 1 else ''}" if name == ANSWER else f"{p['pair_judge']}, both orders of every pair"
        lines.append(f"  {name} ({who}): {st['requests']:,} requests ≈ {st['prompt_tokens']:,} prompt + {st['completion_tokens']:,} "
                     f"completion tokens ≈ {usd}")
    total = f"${p['usd']:.2f}" if p["usd"] is not None else f"unknown (no price for {', '.join(p['unpriced'])}: give it with --model-spec)"
    lines.append(f"  in all ≈ {total}")
    if max_cost is not None and p["usd"] is not None and p["usd"] > max_cost:
        lines.append(f"note: that is over --max-cost ${max_cost:g}; the run would stop at the budget with about "
                     f"{max_cost / p['usd']:.0%} of it done (re-run with a higher --max-cost to resume)")
    return lines


def print_summary(engine: Engine, stage: Response, console) -> None:
    """One line of counts, one of pairs (preference runs), then cost per stage and per model."""
    s = stage.summary()
    rejected = ", ".join(f"{k} {v:,}" for k, v in s["rejected"].items()) or "none"
    console.print(f"{engine.status}: kept {s['kept']:,} of {s['records']:,} records; rejected: {rejected}; {engine.run.path}",
                  soft_wrap=True, highlight=False, markup=False)
    if "pairs" in s:
        p = s["pairs"]
        dropped = ", ".join(f"{k} {v:,}" for k, v in p["dropped"].items()) or "none"
        console.print(f"pairs: {p['judged']:,} judged in both orders by {s['pair_judge_model']}, {p['kept']:,} kept; dropped: {dropped}",
                      soft_wrap=True, highlight=False, markup=False)
    m = engine.manifest()
    for name, st in m["stages"].items():
        usd = f"${st['usd']:.4f}" if engine.price or len(engine.routes) > 1 else "cost unknown"
        console.print(f"  {name}: {st['requests']:,} requests, {st['prompt_tokens']:,} prompt + {st['completion_tokens']:,} completion tokens, {usd}",
                      soft_wrap=True, highlight=False, markup=False)
