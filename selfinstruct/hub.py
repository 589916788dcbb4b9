"""Publishing to the Hugging Face Hub: token and write-access checks, then a retried push and its dataset card."""

from __future__ import annotations

import functools
import importlib
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import tenacity

from selfinstruct.errors import ConfigError, PublishError

DEFAULT_RETRIES = 4  # retries after the first attempt, like generate's --retries
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
MAX_WAIT = 60.0
TOKEN_PAGE = "https://huggingface.co/settings/tokens"
CARD_MESSAGE = "Update dataset card from the selfinstruct manifest"
_REPO_ID = re.compile(r"^(?:(?P<owner>[A-Za-z0-9][A-Za-z0-9._-]{0,95})/)?(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,95})$")
T = TypeVar("T")


@dataclass(frozen=True)
class PushResult:
    """Where a run landed on the Hub."""

    repo_id: str
    url: str
    revision: str
    private: bool
    rows: dict[str, int]


def get_token() -> str:
    """The token from HF_TOKEN or the saved login; never printed."""
    from huggingface_hub import get_token as saved_token

    token = saved_token()
    if not token:
        raise PublishError(
            "no Hugging Face token: HF_TOKEN is not set and there is no saved login",
            f"create a write token at {TOKEN_PAGE}, then export HF_TOKEN=... or run `hf auth login`",
        )
    return token


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def parse_repo(repo: str, flag: str = "--repo") -> tuple[str | None, str]:
    """(owner, name) of OWNER/NAME or NAME; the owner is filled from the token later."""
    match = _REPO_ID.match(repo.strip())
    if not match or ".." in repo or repo.endswith((".git", ".")):
        raise ConfigError(f"{flag} {repo!r} is not a Hub dataset id", f"pass OWNER/NAME, e.g. {flag} alice/zh-instruct")
    return match.group("owner"), match.group("name")


def check_write_access(me: dict, repo_id: str) -> None:
    """Fail before uploading anything when the token cannot write to `repo_id`'s owner."""
    name = me.get("name") or "?"
    owner = repo_id.split("/")[0]
    orgs = {o.get("name"): o.get("roleInOrg") for o in me.get("orgs") or [] if isinstance(o, dict)}
    access = (me.get("auth") or {}).get("accessToken") or {}
    role = access.get("role")
    if role == "read":
        raise PublishError(f"the Hugging Face token of {name!r} is read-only", f"create a token with write access at {TOKEN_PAGE} and set HF_TOKEN to it")
    if owner != name and owner not in orgs:
        member = f" (organisations: {', '.join(sorted(o for o in orgs if o))})" if orgs else " (no organisations)"
        raise PublishError(
            f"{repo_id}: owned by {owner!r}, but the token belongs to {name!r}{member}",
            f"push to {name}/<dataset> or to an organisation you can write to",
        )
    if owner in orgs and orgs[owner] == "read":
        raise PublishError(f"{name!r} only has the read role in organisation {owner!r}", f"ask an admin of {owner} for write access, or push under {name}/")
    if role == "fineGrained":
        scoped = ((access.get("fineGrained") or {}).get("scoped")) or []
        if not any(_grants_write(s, owner, repo_id) for s in scoped if isinstance(s, dict)):
            raise PublishError(
                f"the fine-grained token of {name!r} has no repo write permission for {owner!r}",
                f"edit the token at {TOKEN_PAGE} to allow writing to {owner}'s repos",
            )


def _grants_write(scope: dict, owner: str, repo_id: str) -> bool:
    entity = scope.get("entity") or {}
    target = entity.get("name")
    return "repo.write" in (scope.get("permissions") or []) and (target == owner or (entity.get("type") == "dataset" and target == repo_id))


# ---- retries and errors -----------------------------------------------------------------


def _chain(exc: BaseException | None):
    """The exception and what caused it (datasets and the Hub wrap HTTP errors in others)."""
    seen = 0
    while exc is not None and seen < 12:
        yield exc
        exc = exc.__cause__ or exc.__context__
        seen += 1


def _status(exc: BaseException) -> int | None:
    from huggingface_hub.errors import HfHubHTTPError

    for e in _chain(exc):
        if isinstance(e, HfHubHTTPError) and getattr(e, "response", None) is not None:
            return e.response.status_code
    return None


@functools.lru_cache(maxsize=1)
def _transport_errors() -> tuple[type[BaseException], ...]:
    """Network error types of whichever HTTP client this huggingface_hub uses (httpx2, httpx or requests)."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError"), ("requests", "Timeout")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def _network_error(exc: BaseException) -> BaseException | None:
    errors = _transport_errors()
    for e in _chain(exc):
        if isinstance(e, errors):
            return e
    return None


def is_transient(exc: BaseException) -> bool:
    """429, 5xx and network failures are worth another try; everything else is final."""
    status = _status(exc)
    if status is not None:
        return status in RETRY_STATUS
    return _network_error(exc) is not None


def _retry_after(exc: BaseException | None) -> float | None:
    from huggingface_hub.errors import HfHubHTTPError

    for e in _chain(exc):
        if isinstance(e, HfHubHTTPError) and getattr(e, "response", None) is not None:
            value = e.response.headers.get("Retry-After")
            try:
                return max(0.0, float(value)) if value is not None else None
            except ValueError:
                return None
    return None


def _wait(state: tenacity.RetryCallState) -> float:
    """Retry-After when the Hub sends one, else exponential from 1 s with a little jitter."""
    after = _retry_after(state.outcome.exception() if state.outcome else None)
    if after is not None:
        return min(after, MAX_WAIT)
    return min(MAX_WAIT / 2, 2.0 ** (state.attempt_number - 1)) * (1 + random.random() / 4)


def _describe(exc: BaseException) -> str:
    status = _status(exc)
    if status is not None:
        return f"HTTP {status}"
    net = _network_error(exc)
    return type(net or exc).__name__


def _retrying(what: str, attempts: int, echo: Callable[[str], None] | None) -> tenacity.Retrying:
    def before_sleep(state: tenacity.RetryCallState) -> None:
        if echo and state.outcome is not None:
            echo(f"{what}: {_describe(state.outcome.exception())}; retrying in {state.upcoming_sleep:.1f}s (attempt {state.attempt_number + 1}/{attempts})")

    return tenacity.Retrying(
        stop=tenacity.stop_after_attempt(max(1, attempts)),
        wait=_wait,
        retry=tenacity.retry_if_exception(is_transient),
        before_sleep=before_sleep,
        reraise=True,
    )


def _scrub(text: str, token: str | None) -> str:
    from selfinstruct.redaction import mask_secrets

    return mask_secrets(text, [token] if token else [])


def publish_error(exc: BaseException, *, repo_id: str, token: str | None, attempts: int, what: str) -> PublishError:
    """A one-line PublishError for a Hub failure; the token never reaches the message."""
    from huggingface_hub.errors import HfHubHTTPError

    status = _status(exc)
    again = "nothing local was changed; re-run the same command to try again"
    if status is None:
        net = _network_error(exc)
        if net is not None:
            return PublishError(f"{what}: cannot reach the Hub at {endpoint()} ({type(net).__name__}) after {attempts} attempt(s)",
                                f"check the network or HF_ENDPOINT; {again}")
        return PublishError(_scrub(f"{what}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", token), again)
    server = ""
    hub_error = next((e for e in _chain(exc) if isinstance(e, HfHubHTTPError)), None)
    lines = (getattr(hub_error, "server_message", None) or "").strip().splitlines()
    if lines:
        server = f": {_scrub(lines[0], token)}"
    if status == 401:
        return PublishError(f"{what}: the Hub rejected the token (401 Unauthorized{server})", f"HF_TOKEN or the saved login is invalid or expired; create a new write token at {TOKEN_PAGE}")
    if status == 403:
        return PublishError(f"{what}: the Hub refused to write to {repo_id} (403 Forbidden{server})", f"use a token with write access to {repo_id.split('/')[0]}")
    if status == 404:
        return PublishError(f"{what}: {repo_id} was not found on {endpoint()}, or the token cannot see it (404)", "check --repo and the token's permissions")
    if status in RETRY_STATUS:
        return PublishError(f"{what}: the Hub kept failing (HTTP {status}{server}) after {attempts} attempt(s)", again)
    return PublishError(f"{what}: the Hub answered HTTP {status}{server}", again)


def _call(fn: Callable[[], T], *, what: str, repo_id: str, token: str, attempts: int, echo: Callable[[str], None] | None) -> T:
    """Run one Hub step with retries on transient failures; map the final failure to PublishError."""
    try:
        for attempt in _retrying(what, attempts, echo):
            with attempt:
                return fn()
    except PublishError:
        raise
    except Exception as exc:  # the Hub client raises many types; all end as one line for the user
        raise publish_error(exc, repo_id=repo_id, token=token, attempts=attempts if is_transient(exc) else 1, what=what) from None
    raise AssertionError("unreachable")  # pragma: no cover


# ---- the push ---------------------------------------------------------------------------


def prepare_repo(api: Any, repo: str, *, token: str, private: bool, attempts: int, echo: Callable[[str], None] | None) -> tuple[str, bool]:
    """Check the token and write access, and create the repo if needed; returns OWNER/NAME and whether it is private."""
    from huggingface_hub.errors import RepositoryNotFoundError

    owner, name = parse_repo(repo)
    label = repo if owner else name
    me = _call(lambda: api.whoami(token=token), what="checking the token", repo_id=label, token=token, attempts=attempts, echo=echo)
    repo_id = f"{owner or me.get('name')}/{name}"
    check_write_access(me, repo_id)

    def lookup():
        try:
            return api.repo_info(repo_id, repo_type="dataset", token=token)
        except RepositoryNotFoundError:
            return None

    info = _call(lookup, what="looking up the repo", repo_id=repo_id, token=token, attempts=attempts, echo=echo)
    if info is None:
        _call(lambda: api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True, token=token),
              what="creating the repo", repo_id=repo_id, token=token, attempts=attempts, echo=echo)
        if echo:
            echo(f"created {'private' if private else 'public'} dataset repo {repo_id}")
        return repo_id, private
    if private and info.private is False:
        raise PublishError(f"{repo_id} already exists and is public, so this push would publish the data", "pass --public to push to it anyway, or choose another --repo")
    if not private and info.private and echo:
        echo(f"note: {repo_id} exists and is private; --public does not change an existing repo's visibility (change it in the repo settings)")
    return repo_id, info.private is not False


def _read_card(api: Any, repo_id: str, revision: str | None, token: str) -> str | None:
    """The repo's README.md at `revision`, or None when there is none."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = hf_hub_url(repo_id, "README.md", repo_type="dataset", revision=revision, endpoint=api.endpoint)
    response = get_session().get(url, headers=build_hf_headers(token=token))
    if response.status_code == 404:
        return None
    hf_raise_for_status(response)
    return response.content.decode("utf-8")


def push_card(api: Any, build: Any, repo_id: str, *, token: str, revision: str | None, license: str | None, private: bool | None = None,
              figures: dict[str, bytes] | None = None) -> bool:
    """Merge the generated card into the repo's README.md, with the PNG figures it shows, in one commit; returns whether it changed."""
    from huggingface_hub import CommitOperationAdd

    from selfinstruct.card import hub_card

    figures = figures or {}
    existing = _read_card(api, repo_id, revision, token)
    text = hub_card(build, existing, repo_id, license=license, secrets=[token], private=private, figures=figures)
    if token in text:  # redact() should make this impossible; never upload a card that leaks it
        raise PublishError("refusing to upload a dataset card that contains the Hub token", "report this bug")
    if text == existing:
        return False
    operations = [CommitOperationAdd("README.md", text.encode("utf-8"))]
    operations += [CommitOperationAdd(path, png) for path, png in figures.items()]
    api.create_commit(repo_id, operations, commit_message=CARD_MESSAGE, repo_type="dataset", revision=revision, token=token)
    return True


def push_run(
    run_dir: Path,
    repo: str,
    *,
    private: bool = True,
    fmt: str = "alpaca",
    test_size: float | None = None,
    seed: int = 42,
    slim: bool = False,
    system: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    license: str | None = None,
    retries: int = DEFAULT_RETRIES,
    token: str | None = None,
    echo: Callable[[str], None] | None = None,
) -> PushResult:
    """Push a run directory's kept records and dataset card to a Hub dataset repo (private unless told)."""
    from selfinstruct.rows import build as build_rows, check_format, status_note

    check_format(fmt)
    if retries < 0:
        raise ConfigError(f"--retries {retries} must be 0 or more", "pass --retries 4")
    attempts = retries + 1
    from huggingface_hub import HfApi

    token = token or get_token()
    api = HfApi(endpoint=endpoint(), token=token)
    b = build_rows(run_dir, fmt, test_size=test_size, seed=seed, slim=slim, system=system)  # local errors before any upload
    from selfinstruct.report import card_figures

    figures = card_figures(run_dir)
    repo_id, is_private = prepare_repo(api, repo, token=token, private=private, attempts=attempts, echo=echo)
    if echo:
        for line in status_note(b):
            echo(line)
        echo(f"uploading {b.rows:,} rows ({', '.join(f'{k} {len(v):,}' for k, v in b.splits.items())}) to {repo_id}" + (f"@{revision}" if revision else ""))
    from selfinstruct.export import quiet_datasets

    quiet_datasets()
    dd = b.dataset_dict()
    message = commit_message or f"Upload {b.rows:,} {fmt} rows from selfinstruct"
    # datasets skips unchanged shards and replaces stale ones, so a retried or repeated push converges.
    _call(lambda: dd.push_to_hub(repo_id, private=private, token=token, revision=revision, commit_message=message),
          what="uploading the data", repo_id=repo_id, token=token, attempts=attempts, echo=echo)
    if echo:
        echo("writing the dataset card")
    _call(lambda: push_card(api, b, repo_id, token=token, revision=revision, license=license, private=is_private, figures=figures),
          what="writing the dataset card", repo_id=repo_id, token=token, attempts=attempts, echo=echo)
    url = f"{endpoint()}/datasets/{repo_id}" + (f"/tree/{revision}" if revision else "")
    return PushResult(repo_id, url, revision or "main", is_private, {k: len(v) for k, v in b.splits.items()})
