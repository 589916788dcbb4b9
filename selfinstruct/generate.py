"""The generate run: seeds → prompts → teacher → parse → rules → dedup → run directory."""

from __future__ import annotations

import collections
import dataclasses
import math
import random
import re
from pathlib import Path
from typing import Awaitable, Callable

from selfinstruct.batch import BATCH_WINDOW
from selfinstruct.config import GenerateConfig, require_key
from selfinstruct.dirlock import DirectoryLock
from selfinstruct.engine import Engine, Tally, one_line, public_url, teacher_capacity, teacher_mismatches, teacher_settings
from selfinstruct.errors import ConfigError, OutputError, RunStopped
from selfinstruct.parsing import CONTEXT_FIX, ParsedItem, context_cut, parse_reply
from selfinstruct.pricing import Price, estimate_prompt_tokens, estimate_tokens, run_price
from selfinstruct.prompts import Template
from selfinstruct.rules import RuleSettings, check
from selfinstruct.rundir import RECORDS, REJECTED, SURPLUS, RunDir
from selfinstruct.seeds import SeedSet, SeedTask
from selfinstruct.similarity import DedupIndex, compared_text

# Until a few requests are back, the dry run assumes half the asked-for tasks survive the filters...
PRIOR_YIELD = 0.5
# ...and dispatch assumes most do: a first wave sized for a bad yield over-delivers (--n 100 sent 20
# requests where 11 sufficed); a short one only costs another round trip once the yield is measured.
DISPATCH_PRIOR = 0.9


def request_rng(seed: int, request_no: int) -> random.Random:
    """The rng of one request, derived from the run seed so sampling survives resume and reordering."""
    return random.Random(f"{seed}:{request_no}")


def sample_examples(seeds: SeedSet, k: int, rng: random.Random) -> list[SeedTask]:
    """k distinct seed tasks for one prompt."""
    return rng.sample(list(seeds.tasks), min(k, len(seeds.tasks)))


def render_prompt(
    template: Template, examples: list[SeedTask], cfg: GenerateConfig, rng: random.Random, json_mode: bool | None = None
) -> list[dict[str, str]]:
    """Chat messages asking for cfg.per_request new tasks, showing one instance of each example."""
    shown = []
    for task in examples:
        inst = rng.choice(task.instances)
        shown.append({"instruction": task.instruction, "input": inst.input, "output": inst.output})
    json_mode = cfg.json_mode if json_mode is None else json_mode
    return template.render(examples=shown, num_tasks=cfg.per_request, start_index=1, json_mode=json_mode)


def apply_rules(item: ParsedItem, settings: RuleSettings) -> tuple[str, str] | None:
    """The rejection (reason, detail) for a parsed item, or None when it passes."""
    if item.problem:
        return item.problem, item.detail
    return check(item.instruction, item.input, item.output, settings)


class Generation:
    """The generate stage: one job a request, each reply parsed, filtered and deduplicated into the run directory."""

    name = "generate"
    ledger_stages = ("generate",)

    def __init__(self, cfg: GenerateConfig, seeds: SeedSet, template: Template, engine: Engine) -> None:
        self.cfg = cfg
        self.seeds = seeds
        self.template = template
        self.engine = engine
        self.run = engine.run
        self.lang = cfg.lang or "zh"
        self.rules = RuleSettings(lang=self.lang, enabled=frozenset(r for r in RuleSettings().enabled if r not in cfg.no_rule))
        self.index = DedupIndex(cfg.similarity)
        # Records kept and rejected by reason (the engine counts requests and tokens).
        self.tally = Tally()
        self.next_request = 1
        # Replies handled (their records written), for the yield estimate.
        self.answered = 0
        # Requests sent but never answered by an earlier attempt: asked again first, with the same prompt.
        self.redo: list[int] = []
        # Valid records beyond --n, held in surplus.jsonl for a later, larger --n.
        self.reserve = 0
        self.sample_reply = ""
        self.sample_finish: str | None = None
        self.sample_cut: str | None = None  # the sample reply was cut by the server's context, not --max-tokens
        # The server's refusal of response_format, once seen: the run then asks in the text template.
        self.json_fallback: str | None = None

    @property
    def window(self) -> int:
        """Requests in flight: what the teacher takes now (--concurrency auto moves it); with --batch a wave is one batch."""
        return BATCH_WINDOW if self.cfg.batch else teacher_capacity(self.engine, self.cfg)

    # ---- resume -------------------------------------------------------------------------

    def load(self, finished: list[dict]) -> int:
        """Reload an earlier attempt from the engine's ledger: index seeds and kept records, finish half-processed replies."""
        for task in self.seeds.tasks:
            # Each instance of a seed: with --field instruction+input a seed's instruction on other material is another task.
            for k, inst in enumerate(task.instances):
                self.index.add(f"seed:{task.id}" + (f"#{k}" if k else ""), self.compared(task.instruction, inst.input))
        previous = self.engine.previous
        if previous:
            self.json_fallback = (previous.get("teacher") or {}).get("json_mode_fallback")
        # generate --evol-rounds shares these files; evolved records and evol requests are the evolution's to count.
        kept = self.run.load(RECORDS)
        rejected = [r for r in self.run.load(REJECTED) if (r.get("meta") or {}).get("stage", "generate") == "generate"]
        done = set()
        for rec in kept:
            self.index.add(rec["id"], self.compared(rec["instruction"], rec.get("input", "")))
            if (rec.get("meta") or {}).get("stage", "generate") == "generate":
                done.add(rec["id"])
        self.tally.kept = len(done)
        for rec in rejected:
            self.tally.rejected[rec.get("reason", "unknown")] += 1
            done.add(rec["id"])
        pool = [r for r in self.run.load(SURPLUS) if r["id"] not in done]
        for rec in pool:
            self.index.add(rec["id"], self.compared(rec["instruction"], rec.get("input", "")))
            done.add(rec["id"])
        # A larger --n than the run had: the records it held back are used before anything is paid for.
        promoted = pool[: max(self.cfg.n - self.tally.kept, 0)]
        if promoted:
            self.run.append(RECORDS, promoted)
            self.tally.kept += len(promoted)
        self.reserve = len(pool) - len(promoted)
        self.tally.items = len(done)
        replayed = 0
        for entry in finished:
            if entry.get("stage", "generate") != "generate":
                continue
            self.next_request = max(self.next_request, int(entry["request_no"]) + 1)
            if entry.get("status") != "ok":
                if f"{entry['request_id']}.0" not in done:
                    self._write([], [self._failed_record(entry)])
                continue
            # A reply logged before a kill but not fully written: finish it from the ledger.
            replayed += self._process(entry, skip=done)
            self.answered += 1
        lost = {int(e["request_no"]) for e in self.engine.unanswered if e.get("stage") == "generate" and "request_no" in e}
        self.redo = sorted(no for no in lost if f"r{no:06d}" not in self.engine.replies)
        if self.redo:
            self.next_request = max(self.next_request, self.redo[-1] + 1)
        # Those a batch holds first (stable: in order): they are paid for, or will be, whatever --n says.
        self.redo.sort(key=lambda no: f"r{no:06d}" not in self.engine.held)
        return replayed

    # ---- one reply ----------------------------------------------------------------------

    def _failed_record(self, entry: dict) -> dict:
        """A failed request, kept in rejected.jsonl so nothing it cost goes unseen."""
        return {
            "id": f"{entry['request_id']}.0",
            "instruction": "",
            "input": "",
            "output": "",
            "reason": "oversized" if entry.get("error_kind") == "oversized" else "request-failed",
            "detail": entry.get("error", ""),
            "meta": self._meta(entry, None, 1),
        }

    def _meta(self, entry: dict, item: ParsedItem | None, share: int) -> dict:
        usage = entry.get("usage") or {}
        return {
            "seed_ids": entry.get("seed_ids", []),
            "template": self.template.name,
            "template_sha256": self.template.sha256,
            "model": self.cfg.model,
            "request_id": entry["request_id"],
            "response_id": entry.get("response_id"),
            "finish_reason": entry.get("finish_reason"),
            "usage": {
                "prompt_tokens": round(usage.get("prompt_tokens", 0) / share, 3),
                "completion_tokens": round(usage.get("completion_tokens", 0) / share, 3),
                "estimated": bool(usage.get("estimated", False)),
            },
            "round": 0,
            "stage": "generate",
            "raw": item.raw if item else "",
        }

    def _process(self, entry: dict, skip: set[str] | frozenset = frozenset()) -> int:
        """Parse, filter and deduplicate one logged reply; append what is new. Returns items written."""
        items = parse_reply(entry.get("content", ""), entry.get("finish_reason"), entry.get("json_mode", self.cfg.json_mode))
        cut = context_cut(entry.get("finish_reason"), entry.get("usage"), self.cfg.max_tokens)
        if cut:  # a bigger --max-tokens cannot help this one: name the context and its fix
            items = [dataclasses.replace(i, detail=f"{cut} (hint: {CONTEXT_FIX})") if i.problem == "truncated" else i for i in items]
        share = max(1, len(items))
        kept, rejected, surplus = [], [], []
        for item in items:
            rid = f"{entry['request_id']}.{item.index}"
            if rid in skip:
                continue
            record = {
                "id": rid,
                "instruction": item.instruction,
                "input": item.input,
                "output": item.output,
                "meta": self._meta(entry, item, share),
            }
            verdict = apply_rules(item, self.rules)
            if verdict is None and "near-duplicate" not in self.cfg.no_rule:
                match = self.index.add_if_novel(rid, self.compared(item.instruction, item.input))
                if match is not None:
                    verdict = ("near-duplicate", f"ROUGE-L {match.score:.3f} with {match.key}")
                    record["duplicate_of"] = match.key
                    record["duplicate_text"] = match.text
                    record["score"] = round(match.score, 4)
            if verdict is None:
                # Valid past --n: held back (and in the index), not rejected, so a larger --n need not pay for it again.
                (kept if self.tally.kept + len(kept) < self.cfg.n else surplus).append(record)
            else:
                record["reason"], record["detail"] = verdict
                rejected.append(record)
        self._write(kept, rejected, surplus)
        return len(kept) + len(rejected) + len(surplus)

    def compared(self, instruction: str, input_text: str) -> str:
        return compared_text(instruction, input_text, self.cfg.dedup_field)

    def _write(self, kept: list[dict], rejected: list[dict], surplus: list[dict] = ()) -> None:
        if kept:
            self.run.append(RECORDS, kept)
        if rejected:
            self.run.append(REJECTED, rejected)
        if surplus:
            self.run.append(SURPLUS, surplus)
        self.tally.kept += len(kept)
        self.reserve += len(surplus)
        self.tally.items += len(kept) + len(rejected) + len(surplus)
        for rec in rejected:
            self.tally.rejected[rec["reason"]] += 1

    def handle(self, entry: dict) -> None:
        """Turn one ledgered reply (or failure) into records."""
        kept_before = self.tally.kept
        if entry.get("status") != "ok":
            self._write([], [self._failed_record(entry)])
        else:
            self.answered += 1
            self._process(entry)
            if self.tally.kept == kept_before:
                self.sample_reply, self.sample_finish = entry.get("content", ""), entry.get("finish_reason")
                self.sample_cut = context_cut(entry.get("finish_reason"), entry.get("usage"), self.cfg.max_tokens)
        self.engine.outcome(self.tally.kept - kept_before)

    # ---- jobs ---------------------------------------------------------------------------

    @property
    def requests(self) -> Tally:
        return self.engine.usage.get("generate") or Tally()

    def yield_estimate(self) -> float:
        # Over handled replies only: a reply counted as a request but not parsed yet has kept nothing so far.
        ok = self.answered
        if ok < 5:
            return self.cfg.per_request * DISPATCH_PRIOR
        return max(self.tally.kept / ok, 0.05)

    def max_requests(self) -> int:
        """A hard cap on requests, so no run loops without bound."""
        if self.cfg.max_requests:
            return self.cfg.max_requests
        return math.ceil(self.cfg.n / self.cfg.per_request) * 10 + 100

    def next_job(self, running: int) -> Callable[[], Awaitable[None]] | None:
        """The next request while --n, the request cap and the yield estimate say more is needed."""
        # `running` counts every unfinished job, replies still being handled too (their records are not kept yet);
        # the engine keeps the requests in flight under the window.
        if self.redo and f"r{self.redo[0]:06d}" in self.engine.held:
            # A batch holds it (--batch, resumed): asked even past --n so its reply is ledgered and its cost counted.
            request_no = self.redo.pop(0)
            return lambda: self._request(request_no)
        if self.tally.kept >= self.cfg.n:
            return None
        if self.requests.requests + running >= self.max_requests():
            return None
        # Don't launch requests whose records the target can no longer use.
        if self.tally.kept + running * self.yield_estimate() >= self.cfg.n:
            return None
        if self.redo:
            request_no = self.redo.pop(0)
        else:
            request_no = self.next_request
            self.next_request += 1
        return lambda: self._request(request_no)

    async def _request(self, request_no: int) -> None:
        transport = self.engine.transport
        if transport.json_mode_error:
            self.json_fallback = transport.json_mode_error
        json_mode = self.cfg.json_mode and not self.json_fallback
        examples, messages = self._prompt(request_no, json_mode)
        # A server without JSON mode gets the same request rendered as text (same seeds, same rng).
        text = (lambda: self._prompt(request_no, False)[1]) if json_mode else None
        entry = await self.engine.ask(
            "generate", f"r{request_no:06d}", messages, json_mode=json_mode, text_messages=text,
            fields={"request_no": request_no, "seed_ids": [t.id for t in examples]},
        )
        self.handle(entry)

    def _prompt(self, request_no: int, json_mode: bool) -> tuple[list[SeedTask], list[dict[str, str]]]:
        """The examples and messages of one request, the same on every call (the rng is the request's)."""
        rng = request_rng(self.cfg.seed, request_no)
        examples = sample_examples(self.seeds, self.cfg.num_examples, rng)
        return examples, render_prompt(self.template, examples, self.cfg, rng, json_mode)

    def check_template(self) -> None:
        """Render the first request's prompt in both forms, so a template error stops the run before anything is spent."""
        self._prompt(1, self.cfg.json_mode)
        self._prompt(1, False)

    def wanted(self) -> bool:
        """Whether more records are needed (a request waiting on the budget is dropped once --n is kept)."""
        return self.tally.kept < self.cfg.n

    def finish(self) -> None:
        """After the last job: completed, or stopped by the request cap."""
        transport = self.engine.transport
        if transport is not None and transport.json_mode_error:
            self.json_fallback = transport.json_mode_error
        if self.tally.kept < self.cfg.n:
            raise RunStopped(
                "max-requests",
                f"stopped after {self.requests.requests:,} requests (the --max-requests cap) with {self.tally.kept:,} of "
                f"{self.cfg.n:,} records kept (hint: raise --max-requests and re-run the same command to resume)",
                exit_code=3,
            )

    def low_yield(self, useful: int, window: int) -> str | None:
        if self.tally.kept >= self.cfg.n:
            return None
        sample = one_line(self.sample_reply)
        hint = "check the model, --template and --json-mode, then re-run to resume"
        if not sample and self.sample_finish == "length":
            # Typical of reasoning models: the whole token budget went to <think>.
            hint = "the teacher used all of --max-tokens before answering; raise --max-tokens, then re-run to resume"
        if self.sample_cut:
            hint = f"{self.sample_cut}; {CONTEXT_FIX}, then re-run to resume"
        return (f"only {useful} of the last {window} requests gave a usable record; stopping instead of spending on. "
                f"A sample reply (finish_reason {self.sample_finish}): {sample!r} (hint: {hint})")

    def progress(self) -> tuple[str, int, int]:
        return "kept", self.tally.kept, self.cfg.n

    def counts(self) -> tuple[int, collections.Counter]:
        return self.tally.kept, self.tally.rejected

    def describe(self, manifest: dict) -> None:
        """The generate run's own manifest sections."""
        manifest["config"] = self.cfg.to_dict() | {"lang": self.lang, "base_url": public_url(self.cfg.base_url)}
        manifest["seeds"] = {"path": self.seeds.path.name, "count": len(self.seeds.tasks), "sha256": self.seeds.sha256,
                             "license": self.seeds.license}
        manifest["templates"] = {"generate": {"name": self.template.name, "sha256": self.template.sha256}}
        manifest["teacher"]["json_mode_fallback"] = self.json_fallback
        manifest["filters"] = {"similarity": self.cfg.similarity, "field": self.cfg.dedup_field, "rules": sorted(self.rules.enabled),
                               "lang": self.lang}
        manifest["surplus"] = {"records": self.reserve, "file": SURPLUS}


def project(cfg: GenerateConfig, seeds: SeedSet, template: Template, price: Price | None) -> dict:
    """The --dry-run projection: requests, tokens and dollars for --n, without calling the teacher."""
    rng = request_rng(cfg.seed, 1)
    messages = render_prompt(template, sample_examples(seeds, cfg.num_examples, rng), cfg, rng)
    prompt_tokens = estimate_prompt_tokens(messages)
    per_task = sum(
        estimate_tokens(t.instruction + t.instances[0].input + t.instances[0].output) + 12 for t in seeds.tasks
    ) / len(seeds.tasks)
    completion_tokens = per_task * cfg.per_request
    if cfg.max_tokens:
        completion_tokens = min(completion_tokens, cfg.max_tokens)
    requests = math.ceil(cfg.n / (cfg.per_request * PRIOR_YIELD * 1.4))  # assumes ~70% of items kept
    totals = {"prompt_tokens": int(requests * prompt_tokens), "completion_tokens": int(requests * completion_tokens)}
    return {
        "requests": requests,
        "prompt_tokens_per_request": prompt_tokens,
        "completion_tokens_per_request": int(completion_tokens),
        **totals,
        "usd": price.usd(totals["prompt_tokens"], totals["completion_tokens"]) if price else None,
        "assumed_yield": PRIOR_YIELD * 1.4,
    }


def check_resumable(run: RunDir, cfg: GenerateConfig, seeds: SeedSet, template: Template, price: Price | None) -> None:
    """Refuse to resume into a directory made from other seeds, template, language, model or prices."""
    previous = run.load_manifest()
    if not previous:
        return
    old = previous.get("config", {})
    mismatches, flags = teacher_mismatches(previous, cfg.model, price)
    if previous.get("seeds", {}).get("sha256") not in (None, seeds.sha256):
        mismatches.append("seed file contents")
    if previous.get("templates", {}).get("generate", {}).get("sha256") not in (None, template.sha256):
        mismatches.append("template")
    for key in ("lang", "json_mode", "similarity", "dedup_field"):
        if key in old and old[key] != getattr(cfg, key) and not (key == "lang" and cfg.lang is None):
            mismatches.append(f"--{key.replace('_', '-')}")
    if mismatches:
        # The exact flags only when they are all that differs; otherwise the original command.
        hint = f"resume with {' '.join(flags)}" if len(flags) == len(mismatches) else "re-run with the original settings to resume"
        raise OutputError(f"{run.path}: holds a run made with a different {', '.join(mismatches)}", f"{hint}, or choose a new --out")


def infer_lang(seeds: SeedSet) -> str:
    """zh, zh-Hant or en from the seed instructions (and a Hant/TW hint in the file name)."""
    from selfinstruct.rules import script_of

    scripts = [script_of(t.instruction) for t in seeds.tasks]
    if scripts.count("zh") * 2 >= len(scripts):
        stem = seeds.path.stem.lower()
        return "zh-Hant" if ("hant" in stem or "tw" in stem.split("_") or stem.endswith("-tw")) else "zh"
    return "en"


def default_out(seeds: Path, model: str) -> Path:
    """outputs/<seed file>-<model>: the same command resumes into the same directory."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", model).strip("-") or "model"
    return Path("outputs") / f"{seeds.stem}-{slug}"


def print_projection(cfg: GenerateConfig, seeds: SeedSet, template: Template, price: Price | None, echo: Callable[[str], None]) -> None:
    """The --dry-run report: generation, then --evol-rounds, then the total against --max-cost."""
    projection = project(cfg, seeds, template, price)
    usd = f"${projection['usd']:.2f}" if projection["usd"] is not None else "unknown (no price)"
    echo(
        f"dry run: {cfg.n:,} records ≈ {projection['requests']:,} requests "
        f"(assuming {projection['assumed_yield']:.0%} of {cfg.per_request} tasks per request are kept), "
        f"≈ {projection['prompt_tokens']:,} prompt + {projection['completion_tokens']:,} completion tokens, ≈ {usd}"
    )
    projected = projection["usd"]
    if cfg.evol_rounds:
        from selfinstruct.evolution import project_evolution

        samples = [(t.instruction, t.instances[0].input, t.instances[0].output) for t in seeds.tasks]
        evo = project_evolution(cfg, cfg.lang, cfg.n, samples)
        evo_usd = price.usd(evo["prompt_tokens"], evo["completion_tokens"]) if price else None
        total = f"${projection['usd'] + evo_usd:.2f}" if evo_usd is not None else "unknown (no price)"
        echo(
            f"then --evol-rounds {cfg.evol_rounds}: ≈ {evo['steps']:,} evolutions, {evo['requests']:,} requests "
            f"(assuming {evo['assumed_survival']:.0%} survive each round, ≈ {evo['kept']:,} more records), "
            f"≈ {evo['prompt_tokens']:,} prompt + {evo['completion_tokens']:,} completion tokens, "
            f"≈ {'$%.2f' % evo_usd if evo_usd is not None else 'unknown'}; in all ≈ {total}"
        )
        projected = projected + evo_usd if projected is not None and evo_usd is not None else None
    if cfg.max_cost is not None and projected is not None and projected > cfg.max_cost:
        echo(f"note: that is over --max-cost ${cfg.max_cost:g}; the run would stop at the budget with about "
             f"{cfg.max_cost / projected:.0%} of it done (re-run with a higher --max-cost to resume)")


def run_generate(cfg: GenerateConfig, api_key: str | None, command: str, console, echo: Callable[[str], None],
                 judge_api_key: str | None = None) -> int:
    """The generate command after its flags: seeds → run directory (resumed), then --evol-rounds and --push-to. Returns the exit code."""
    from selfinstruct.batch import cancel_batches, check_batches, interrupted_note, run_price_for, transport_factory
    from selfinstruct.engine import check_orphaned, make_engine
    from selfinstruct.progress import generation_summary_line, print_generation_summary, run_displayed
    from selfinstruct.prompts import generation_template_name, load_template
    from selfinstruct.seeds import read_seeds

    seed_set = read_seeds(cfg.seeds, cfg.seeds_license)
    cfg = dataclasses.replace(cfg, lang=cfg.lang or infer_lang(seed_set), out=cfg.out or default_out(cfg.seeds, cfg.model))
    template = load_template(cfg.template or generation_template_name(cfg.lang))
    price = run_price_for(cfg, run_price(cfg, console))
    if cfg.dry_run:
        print_projection(cfg, seed_set, template, price, echo)
        if cfg.judge or cfg.moderate:
            from selfinstruct.judging import project_gate

            # Every kept record is judged: --n, plus what --evol-rounds adds (its projection's prior).
            judged = cfg.n + sum(round(cfg.n * 0.7 ** r) for r in range(1, cfg.evol_rounds + 1))
            echo(project_gate(cfg, cfg.lang, judged, [(t.instruction, t.instances[0].input, t.instances[0].output) for t in seed_set.tasks]))
        if cfg.batch and price is not None:
            echo(f"at the Batch API price: ${price.input:g} in, ${price.output:g} out per 1M tokens ({price.source})")
        return 0
    require_key(cfg, api_key)
    if cfg.push_to:
        from selfinstruct.hub import get_token, parse_repo

        # Checked before the run: a bad repo id or a missing token would otherwise show up hours later.
        parse_repo(cfg.push_to, flag="--push-to")
        get_token()
    if cfg.seeds.resolve().parent == cfg.out.resolve():
        # The run appends to its files: seeding from one of them would feed the run its own output.
        raise ConfigError(f"--seeds {cfg.seeds} is inside --out {cfg.out}",
                          "copy the seed file elsewhere or choose another --out (to grow a run, re-run it with a larger --n)")
    run = RunDir(cfg.out)
    if cfg.cancel_batches:
        return cancel_batches(run, cfg, api_key, echo)
    run.prepare()
    with DirectoryLock(run.path, command):
        check_orphaned(run)
        from selfinstruct.judging import finish_gated, gated_before

        if gated_before(run, cfg):  # the quality gate already rewrote records.jsonl: generating again would refill it
            return finish_gated(run, cfg, seed_set.license, console)
        check_resumable(run, cfg, seed_set, template, price)
        engine = make_engine(run, cfg, price, command)
        gen = Generation(cfg, seed_set, template, engine)
        gen.check_template()
        evo = None
        if cfg.evol_rounds:
            from selfinstruct.evolution import after_generation

            evo = after_generation(gen)  # evol templates and resume settings are checked before anything is spent
        replayed = gen.load(engine.load())
        check_batches(engine, cfg)
        if gen.requests.requests and not cfg.quiet:
            console.print(f"resuming {run.path}: {gen.tally.kept:,} kept from {gen.requests.requests:,} requests"
                          + (f", {replayed} records recovered from the ledger" if replayed else ""))
        settings = teacher_settings(cfg)
        try:
            exit_code = run_displayed(engine, gen, transport_factory(cfg, settings, api_key, engine), console, cfg.quiet)
        finally:
            run.close()
        if not cfg.quiet or exit_code:
            print_generation_summary(engine, gen, console)
        else:
            console.print(generation_summary_line(engine, gen), soft_wrap=True, highlight=False, markup=False)
        if exit_code in (130, 143):
            console.print(f"interrupted; everything finished is saved. Resume with: {command}", soft_wrap=True, highlight=False, markup=False)
            if cfg.batch:
                console.print(interrupted_note(command), soft_wrap=True, highlight=False, markup=False)
        if exit_code:
            return exit_code
        if evo is not None:
            from selfinstruct.evolution import run_evolution

            evo.load()
            exit_code = run_evolution(engine, evo, settings, api_key, console)
            if exit_code:
                return exit_code
        if cfg.judge or cfg.moderate:
            from selfinstruct.judging import gate_run

            exit_code = gate_run(engine, cfg, cfg.lang, api_key if judge_api_key is None else judge_api_key, console)
            if exit_code:
                return exit_code
    if cfg.push_to:
        from selfinstruct.hub import push_run

        # Re-running a finished run goes straight here, so a failed push is retried by the same command.
        push_run(run.path, cfg.push_to, private=True, license=seed_set.license,
                 echo=lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True))
    return 0
