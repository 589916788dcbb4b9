"""Run configuration: resolved once at the CLI edge (defaults < file < env < flags), then frozen."""

from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

from selfinstruct.errors import ConfigError, InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ENV_PREFIX = "SELFINSTRUCT_"


@dataclass(frozen=True)
class GenerateConfig:
    """Everything a generate run depends on. The API key is not here: only the variable's name."""

    seeds: Path = Path("seeds/zh.jsonl")
    n: int = 1000
    out: Path | None = None
    lang: str | None = None  # zh, zh-Hant, en; None: inferred from the seeds
    model: str = "gpt-4o-mini"
    base_url: str | None = None
    # --base-url repeated: more endpoints serving the same model (vLLM or llama.cpp replicas); base_url stays
    # the primary one (its kind and price stand for all).
    replicas: tuple[str, ...] = ()
    api_key_env: str = "OPENAI_API_KEY"
    # --local: a llama.cpp server started for the command (selfinstruct/local_server.py); --gguf implies it.
    local: bool = False
    gguf: Path | None = None
    ctx_size: int | None = None  # the local server's context (default: the longest prompt plus --max-tokens)
    template: str | None = None
    json_mode: bool = False
    num_examples: int = 3
    per_request: int = 10
    seed: int = 42
    # The most requests in flight: fixed, or with adaptive_concurrency (--concurrency auto) the ceiling a
    # limit starting at 1 grows to while latency holds (ConcurrencyLimit). 64: one CLI process still keeps
    # up with the teacher there (0.95x the bound in benchmarks/throughput_bench.py, CPU-bound at 256).
    concurrency: int = 64
    adaptive_concurrency: bool = True
    rpm: int | None = None
    tpm: int | None = None
    timeout: float = 120.0
    retries: int = 6
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    max_tokens: int | None = 3072
    similarity: float = 0.7
    dedup_field: str = "topic"
    max_cost: float | None = None
    price_in: float | None = None
    price_out: float | None = None
    max_requests: int | None = None
    min_yield: float = 0.1
    yield_window: int = 50
    no_rule: tuple[str, ...] = ()
    seeds_license: str | None = None
    evol_rounds: int = 0
    evol_ops: tuple[str, ...] = ()
    judge_equal: bool = False
    # The quality gate (selfinstruct/judging.py): a judge's 1-5 score, moderation, and the judge's own teacher.
    judge: bool = False
    min_score: float = 4.0
    judge_model: str | None = None
    judge_base_url: str | None = None
    judge_api_key_env: str | None = None
    judge_price_in: float | None = None
    judge_price_out: float | None = None
    moderate: bool = False
    push_to: str | None = None
    # respond: the answering models (preference pairs when two or more), where each one lives and what it
    # costs (NAME[@BASE_URL][:PRICE_IN:PRICE_OUT][#KEY_ENV]), the pair judge, and the system-prompt set.
    models: tuple[str, ...] = ()
    model_specs: tuple[str, ...] = ()
    pair_judge_model: str | None = None
    system_prompts: str | None = None
    # textbook: exercises asked per section; chat: the most assistant turns a conversation has.
    exercises: int = 3
    turns: int = 3
    grace: float = 10.0
    quiet: bool = False
    dry_run: bool = False
    # OpenAI's Batch API instead of online requests (see selfinstruct/batch.py).
    batch: bool = False
    poll_interval: float = 5.0  # first wait between batch status checks; backs off to a minute
    batch_discount: float | None = None  # None: the price table's batch price, else half off
    cancel_batches: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for the manifest (paths as strings, tuples as lists)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


_FIELDS = {f.name: f for f in dataclasses.fields(GenerateConfig)}


def _base_type(annotation: Any) -> tuple[type, bool]:
    """The concrete type of a field annotation and whether None is allowed."""
    hint = typing.get_type_hints(GenerateConfig)[annotation] if isinstance(annotation, str) else annotation
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    if typing.get_origin(hint) is tuple:
        return tuple, False
    return hint, False


def _coerce(name: str, value: Any, where: str) -> Any:
    """Convert a config-file or environment value to the field's type, or fail naming where it came from."""
    kind, nullable = _base_type(name)
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null") and nullable):
        if nullable:
            return None
        raise ConfigError(f"{where}: `{name}` cannot be empty", "give it a value or remove it")
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if kind is tuple:
            if isinstance(value, str):
                return tuple(v.strip() for v in value.split(",") if v.strip())
            return tuple(str(v) for v in value)
        if kind is int and isinstance(value, float):
            raise ValueError(value)
        if kind in (int, float) and isinstance(value, bool):
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{where}: `{name}` must be {kind.__name__}, got {value!r}", "fix the value's type"
        ) from None


# Keys of files, environment and flags that are not fields: `concurrency` takes "auto" or a number,
# `max_concurrency` is the ceiling of auto (both spread over concurrency and adaptive_concurrency).
_CONCURRENCY_KEYS = ("concurrency", "max_concurrency")
MAX_CONCURRENCY = GenerateConfig.concurrency


def _spread_concurrency(name: str, value: Any, where: str) -> dict[str, Any]:
    """`concurrency` "auto" or N, or `max_concurrency` M, as the fields they set (a fixed number means fixed)."""
    if name == "concurrency" and isinstance(value, str) and value.strip().lower() == "auto":
        return {"adaptive_concurrency": True}
    number = _coerce("concurrency", value, where)
    return {"concurrency": number, "adaptive_concurrency": False} if name == "concurrency" else {"concurrency": number}


def read_config_file(path: Path) -> dict[str, Any]:
    """Keys from a TOML config file (top level or a [generate] table); unknown keys are errors."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise InputError(f"{path}: no such config file", "pass --config with an existing TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path}: invalid TOML ({exc})", "fix the TOML syntax") from None
    if isinstance(data.get("generate"), dict):
        data = {**{k: v for k, v in data.items() if k != "generate"}, **data["generate"]}
    values = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name in _CONCURRENCY_KEYS:
            values.update(_spread_concurrency(name, value, str(path)))
            continue
        if name not in _FIELDS:
            raise ConfigError(
                f"{path}: unknown key `{key}`",
                f"known keys: {', '.join(sorted(_FIELDS))}",
            )
        values[name] = _coerce(name, value, str(path))
    return values


def read_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """Values from SELFINSTRUCT_<FIELD> environment variables."""
    values = {}
    for name in (*_FIELDS, "max_concurrency"):
        key = ENV_PREFIX + name.upper()
        if key in environ:
            values.update(_spread_concurrency(name, environ[key], key) if name in _CONCURRENCY_KEYS else {name: _coerce(name, environ[key], key)})
    return values


def resolve(
    flags: Mapping[str, Any], config_file: Path | None = None, environ: Mapping[str, str] | None = None
) -> GenerateConfig:
    """Merge defaults < config file < environment < flags (flags given as None are unset)."""
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(read_config_file(config_file))
    values.update(read_env(os.environ if environ is None else environ))
    fixed, ceiling = flags.get("concurrency"), flags.get("max_concurrency")
    if ceiling is not None and fixed is not None and str(fixed).strip().lower() != "auto":
        raise ConfigError(f"--max-concurrency {ceiling} goes with --concurrency auto, not --concurrency {fixed}",
                          "a fixed --concurrency is the limit itself; drop one of the two")
    for name, value in flags.items():
        if value is None:
            continue
        if name in _CONCURRENCY_KEYS:
            values.update(_spread_concurrency(name, value, f"--{name.replace('_', '-')}"))
        elif name == "base_url" and isinstance(value, (list, tuple)):  # --base-url repeated: the first is the primary
            values["base_url"], values["replicas"] = (value[0], tuple(value[1:])) if value else (None, ())
        else:
            values[name] = tuple(value) if isinstance(value, list) else value
    for name in ("seeds", "out", "gguf"):
        if isinstance(values.get(name), str):
            values[name] = Path(values[name])
    cfg = GenerateConfig(**values)
    validate(cfg)
    return cfg


def _has_credentials(url: str | None) -> bool:
    """Whether a URL has user:password@ (the HTTP client refuses it, and it would be a secret in the manifest)."""
    if not url:
        return False
    parts = urlparse(url)
    return bool(parts.username or parts.password)


def validate(cfg: GenerateConfig) -> None:
    """Reject values no run can use, naming the flag."""
    from selfinstruct.similarity import FIELDS  # numpy and rapidfuzz: not for every --help

    checks = [
        (cfg.n >= 1, "--n must be at least 1", "ask for the number of records you want, e.g. --n 1000"),
        (cfg.per_request >= 1, "--per-request must be at least 1", "the default is 10"),
        (cfg.num_examples >= 0, "--num-examples cannot be negative", "the default is 3"),
        (cfg.concurrency >= 1, "--concurrency must be at least 1" if not cfg.adaptive_concurrency else "--max-concurrency must be at least 1",
         "auto (the default) finds the teacher's pace; a number fixes it, e.g. 16"),
        (not cfg.replicas or cfg.base_url is not None, "replicas need a primary --base-url", "give every endpoint as --base-url URL"),
        (not (cfg.replicas and cfg.batch), "--batch goes to one endpoint, not several --base-url", "give one --base-url with --batch"),
        (cfg.ctx_size is None or cfg.ctx_size >= 256, "--ctx-size must be at least 256", "leave it out to fit the prompt plus --max-tokens"),
        (0.0 < cfg.similarity <= 1.0, "--similarity must be in (0, 1]", "0.7 is the Self-Instruct threshold"),
        (cfg.dedup_field in FIELDS, f"--field {cfg.dedup_field!r} is not supported",
         "use topic (the default), instruction+input or instruction"),
        (cfg.timeout > 0, "--timeout must be positive", "seconds per request, e.g. 120"),
        (cfg.grace >= 0, "--grace cannot be negative", "seconds a stop waits for requests in flight, e.g. 10"),
        (cfg.retries >= 0, "--retries cannot be negative", "the default is 6"),
        (cfg.rpm is None or cfg.rpm >= 1, "--rpm must be at least 1", "leave it out for no limit"),
        (cfg.tpm is None or cfg.tpm >= 1, "--tpm must be at least 1", "leave it out for no limit"),
        (cfg.max_cost is None or cfg.max_cost > 0, "--max-cost must be positive", "a budget in USD, e.g. 5"),
        (cfg.lang in (None, "zh", "zh-Hant", "en"), f"--lang {cfg.lang!r} is not supported", "use zh, zh-Hant or en"),
        (cfg.exercises >= 1, "--exercises must be at least 1", "exercises asked per textbook section, e.g. 3"),
        (cfg.turns >= 1, "--turns must be at least 1", "the most assistant turns a conversation has, e.g. 3"),
        (cfg.evol_rounds >= 0, "--evol-rounds cannot be negative", "0 switches evolution off"),
        (0.0 <= cfg.min_yield < 1.0, "--min-yield must be in [0, 1)", "the default is 0.1"),
        (cfg.max_requests is None or cfg.max_requests >= 1, "--max-requests must be at least 1", "leave it out for the default cap"),
        (cfg.poll_interval > 0, "--poll-interval must be positive", "seconds between batch status checks, e.g. 5"),
        (cfg.batch_discount is None or 0.0 <= cfg.batch_discount < 1.0, "--batch-discount must be in [0, 1)",
         "the share off the online price, e.g. 0.5"),
        (bool(cfg.model.strip()), "--model is empty", "name the teacher model, e.g. --model gpt-4o-mini"),
        (not any(map(_has_credentials, (cfg.base_url, *cfg.replicas))), "--base-url carries a user name or password",
         "drop the user:password@ part; the key goes in the variable named by --api-key-env"),
        (1.0 <= cfg.min_score <= 5.0, "--min-score must be in [1, 5]", "the judge scores 1-5; 4 keeps records that meet every criterion"),
        (cfg.judge_model is None or bool(cfg.judge_model.strip()), "--judge-model is empty", "name the judge model, or leave it out"),
        (not _has_credentials(cfg.judge_base_url), "--judge-base-url carries a user name or password",
         "drop the user:password@ part; the key goes in the variable named by --judge-api-key-env"),
    ]
    for ok, message, hint in checks:
        if not ok:
            raise ConfigError(message, hint)


def require_key(cfg: GenerateConfig, api_key: str | None) -> None:
    """A key must be set unless the teacher is a local server and no variable was named."""
    from selfinstruct.pricing import endpoint_kind

    if not api_key and (endpoint_kind(cfg.base_url) != "local" or cfg.api_key_env != "OPENAI_API_KEY"):
        raise ConfigError(
            f"no API key: ${cfg.api_key_env} is not set for {cfg.base_url or 'the OpenAI API'}",
            f"export {cfg.api_key_env}=..., or pass --api-key-env NAME, or --base-url for a local server",
        )
