"""`selfinstruct push` end to end: the real datasets/huggingface_hub upload path against a fake Hub on 127.0.0.1."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fakes.hub_server import FakeHub
from fakes.sample_run import make_run, snapshot

TOKEN = "hf_pushTestTokenAbc123XYZ789"
READ_TOKEN = "hf_readOnlyTokenQwe456RTY"
LINEAGE = ["id", "seed_ids", "evol_ops", "model"]


@pytest.fixture
def hub():
    with FakeHub() as fake:
        fake.add_token(TOKEN, "alice", orgs={"acme": "write", "readers": "read"})
        fake.add_token(READ_TOKEN, "bob", role="read")
        yield fake


@pytest.fixture
def run(tmp_path) -> Path:
    return make_run(tmp_path / "run")


def cli(hub_url: str, tmp_path: Path, *args: str, token: str | None = TOKEN, home: Path | None = None) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess: HF_ENDPOINT is read when huggingface_hub is imported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"HF_ENDPOINT": hub_url, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(home or tmp_path / "hf-home"),
            "HF_HUB_DISABLE_TELEMETRY": "1", "NO_COLOR": "1", "COLUMNS": "200"}
    if token is not None:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "selfinstruct", "push", *args], env=env, capture_output=True, text=True, timeout=120)


def parquet(hub: FakeHub, repo_id: str, split: str, revision: str = "main"):
    files = hub.files(repo_id, revision)
    shards = sorted(p for p in files if p.startswith(f"data/{split}-") and p.endswith(".parquet"))
    assert shards, f"no {split} shard in {sorted(files)}"
    from datasets import Dataset, concatenate_datasets

    tables = [Dataset(pq.read_table(io.BytesIO(files[p]))) for p in shards]
    return concatenate_datasets(tables)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def assert_no_token(hub: FakeHub, *texts: str, dirs: tuple[Path, ...] = ()) -> None:
    for token in (TOKEN, READ_TOKEN):
        for text in texts:
            assert token not in text
        for content in hub.objects.values():
            assert token.encode() not in content
        for d in dirs:
            for path in d.rglob("*"):
                if path.is_file():
                    assert token.encode() not in path.read_bytes(), path


def test_push_alpaca_private_with_test_split_then_repush_messages(hub, run, tmp_path):
    before = snapshot(run)
    proc = cli(hub.url, tmp_path, str(run), "--repo", "alice/zh-instruct", "--test-size", "0.25")
    assert proc.returncode == 0, proc.stderr
    assert "alice/zh-instruct" in proc.stdout and "(private)" in proc.stdout
    assert hub.repos["alice/zh-instruct"].private is True
    files = hub.files("alice/zh-instruct")
    assert {"README.md", "data/train-00000-of-00001.parquet", "data/test-00000-of-00001.parquet"} <= set(files)

    train, test = parquet(hub, "alice/zh-instruct", "train"), parquet(hub, "alice/zh-instruct", "test")
    assert train.column_names == ["instruction", "input", "output", *LINEAGE]
    assert len(train) + len(test) == 12 and len(test) == 3
    ids = {line.split('"id":"')[1].split('"')[0] for line in (run / "records.jsonl").read_text(encoding="utf-8").splitlines()}
    assert set(train["id"]) | set(test["id"]) == ids
    row = next(r for r in train if r["evol_ops"])
    assert row["model"] == "gpt-4o-mini" and row["seed_ids"] and "要求更具体" in row["instruction"]

    card = files["README.md"].decode()
    assert card.startswith("---\n") and "license: apache-2.0" in card and "evol-instruct" in card
    assert "configs:" in card and "dataset_info:" in card and "path: data/test-*" in card
    assert card.count("<!-- selfinstruct:begin") == 1 and 'load_dataset("alice/zh-instruct")' in card
    # The card's figures are uploaded beside it, and the card shows them by their repo paths.
    for name in ("funnel", "lengths", "similarity"):
        assert files[f"figures/{name}.png"].startswith(b"\x89PNG\r\n") and f"](figures/{name}.png)" in card
    assert snapshot(run) == before

    # Same repo again as messages without a split: the stale test shard goes, the card block is replaced, not repeated.
    proc2 = cli(hub.url, tmp_path, str(run), "--repo", "alice/zh-instruct", "--format", "messages", "--system", "你是一个乐于助人的助手。")
    assert proc2.returncode == 0, proc2.stderr
    files = hub.files("alice/zh-instruct")
    assert not any(p.startswith("data/test-") for p in files)
    train = parquet(hub, "alice/zh-instruct", "train")
    assert train.column_names == ["messages", *LINEAGE] and len(train) == 12
    assert [m["role"] for m in train[0]["messages"]] == ["system", "user", "assistant"]
    card = files["README.md"].decode()
    assert card.count("<!-- selfinstruct:begin") == 1 and "`messages` format" in card and "path: data/test-*" not in card
    assert_no_token(hub, proc.stdout, proc.stderr, proc2.stdout, proc2.stderr, dirs=(run,))
    assert snapshot(run) == before
    assert not hub.unhandled


def test_push_to_branch_keeps_user_card_text(hub, run, tmp_path):
    user_card = "---\nlicense: mit\nmy_note: keep me\ntags:\n- chinese\n---\n\n# 我的数据集\n\n这段话是用户自己写的。\n"
    hub.create_repo("acme/sharegpt-zh", private=True, files={"README.md": user_card.encode()})
    args = [str(run), "--repo", "acme/sharegpt-zh", "--format", "sharegpt", "--slim", "--branch", "dev",
            "--commit-message", "first sharegpt export"]
    proc = cli(hub.url, tmp_path, *args)
    assert proc.returncode == 0, proc.stderr
    assert "README.md" in hub.files("acme/sharegpt-zh", "main") and not any(p.startswith("data/") for p in hub.files("acme/sharegpt-zh", "main"))
    files = hub.files("acme/sharegpt-zh", "dev")
    train = parquet(hub, "acme/sharegpt-zh", "train", "dev")
    assert train.column_names == ["conversations"] and len(train) == 12
    assert [t["from"] for t in train[0]["conversations"]] == ["human", "gpt"]
    assert "first sharegpt export" in [m for _, m in hub.repos["acme/sharegpt-zh"].messages]

    card = files["README.md"].decode()
    assert "这段话是用户自己写的。" in card and "my_note: keep me" in card and "- chinese" in card
    assert "license: apache-2.0" in card  # the seeds' declared licence wins over a guess
    assert card.index("这段话是用户自己写的。") < card.index("<!-- selfinstruct:begin")

    proc2 = cli(hub.url, tmp_path, *args)
    assert proc2.returncode == 0, proc2.stderr
    card2 = hub.files("acme/sharegpt-zh", "dev")["README.md"].decode()
    assert card2.count("这段话是用户自己写的。") == 1 and card2.count("<!-- selfinstruct:begin") == 1
    assert_no_token(hub, proc.stdout, proc.stderr, proc2.stdout, proc2.stderr)


def test_transient_500_and_429_are_retried_then_push_succeeds(hub, run, tmp_path):
    hub.fail("POST", r"/commit/", 500, times=1)
    hub.fail("POST", r"/commit/", 429, times=1, headers={"Retry-After": "0"})
    proc = cli(hub.url, tmp_path, str(run), "--repo", "alice/retry", "--public")
    assert proc.returncode == 0, proc.stderr
    assert "HTTP 500; retrying" in proc.stderr and "HTTP 429; retrying in 0.0s" in proc.stderr
    assert hub.count("POST", r"/commit/main$") >= 4  # two failures, the data commit, the card commit
    assert hub.repos["alice/retry"].private is False and "(public)" in proc.stdout
    assert len(parquet(hub, "alice/retry", "train")) == 12
    assert_no_token(hub, proc.stdout, proc.stderr)


def test_failed_push_leaves_run_untouched_and_can_be_repeated(hub, run, tmp_path):
    before = snapshot(run)
    hub.fail("POST", r"/commit/", 503, times=10, headers={"Retry-After": "0"})
    proc = cli(hub.url, tmp_path, str(run), "--repo", "alice/flaky", "--retries", "1")
    assert_one_line_error(proc, "uploading the data", "HTTP 503", "after 2 attempt(s)", "re-run the same command")
    assert snapshot(run) == before
    assert not any(p.startswith("data/") for p in hub.files("alice/flaky"))
    hub.faults.clear()
    again = cli(hub.url, tmp_path, str(run), "--repo", "alice/flaky")
    assert again.returncode == 0, again.stderr
    assert len(parquet(hub, "alice/flaky", "train")) == 12 and "README.md" in hub.files("alice/flaky")
    assert_no_token(hub, proc.stdout, proc.stderr, again.stdout, again.stderr, dirs=(run,))


@pytest.fixture
def inproc(hub, tmp_path, monkeypatch, capsys):
    """The CLI in this process for checks that fail before `datasets` is involved; the endpoint is patched in."""
    from huggingface_hub import constants

    import selfinstruct.hub

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-login"))
    monkeypatch.setattr(selfinstruct.hub, "MAX_WAIT", 0.0)  # retries without sleeping
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)

    def run_main(*args: str, token: str | None = TOKEN, endpoint: str | None = None) -> subprocess.CompletedProcess:
        from selfinstruct.cli import main

        if token is not None:
            monkeypatch.setenv("HF_TOKEN", token)
        if endpoint:
            monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(sys, "argv", ["selfinstruct", "push", *args])
        code = 0
        try:
            main()
        except SystemExit as exc:
            code = exc.code or 0
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)

    return run_main


def test_invalid_token_401(hub, run, inproc):
    bad = "hf_notAValidTokenZZZ999"
    proc = inproc(str(run), "--repo", "alice/x", token=bad)
    assert_one_line_error(proc, "rejected the token", "401")
    assert bad not in proc.stdout + proc.stderr
    assert hub.count("POST", "/api/repos/create") == 0


def test_read_only_token(hub, run, inproc):
    proc = inproc(str(run), "--repo", "bob/x", token=READ_TOKEN)
    assert_one_line_error(proc, "read-only")
    assert "bob/x" not in hub.repos
    assert_no_token(hub, proc.stdout, proc.stderr)


def test_saved_login_is_used_when_hf_token_is_unset(hub, run, tmp_path, inproc, monkeypatch):
    from huggingface_hub import constants

    saved = tmp_path / "saved-token"
    saved.write_text(READ_TOKEN)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(saved))
    proc = inproc(str(run), "--repo", "bob/x", token=None)
    assert_one_line_error(proc, "'bob' is read-only")  # proves the saved token reached whoami
    assert READ_TOKEN not in proc.stdout + proc.stderr


@pytest.mark.parametrize(("repo", "needle"), [("carol/x", "owned by 'carol'"), ("readers/x", "read role in organisation 'readers'")])
def test_repo_owned_by_someone_else(hub, run, inproc, repo, needle):
    proc = inproc(str(run), "--repo", repo)
    assert_one_line_error(proc, needle)
    assert repo not in hub.repos and hub.count("POST", "/api/repos/create") == 0


def test_fine_grained_token_without_write_scope(hub, run, inproc):
    scoped = [{"entity": {"type": "user", "name": "dave"}, "permissions": ["repo.content.read"]}]
    hub.add_token("hf_fineGrainedTokenPqr321", "dave", role="fineGrained", scoped=scoped)
    proc = inproc(str(run), "--repo", "dave/x", token="hf_fineGrainedTokenPqr321")
    assert_one_line_error(proc, "fine-grained", "no repo write permission")


def test_no_token(hub, run, inproc):
    proc = inproc(str(run), "--repo", "alice/x", token=None)
    assert_one_line_error(proc, "no Hugging Face token", "HF_TOKEN")


def test_forbidden_is_not_retried(hub, run, tmp_path):
    hub.fail("POST", r"/preupload/", 403, times=5)
    proc = cli(hub.url, tmp_path, str(run), "--repo", "alice/forbidden")  # a subprocess: the 403 comes from inside datasets
    assert_one_line_error(proc, "403 Forbidden", "alice/forbidden")
    assert hub.count("POST", r"/preupload/") == 1


def test_existing_public_repo_needs_public_flag(hub, run, inproc):
    hub.create_repo("alice/open", private=False)
    proc = inproc(str(run), "--repo", "alice/open")
    assert_one_line_error(proc, "is public", "--public")
    assert len(hub.repos["alice/open"].messages) == 1  # only the initial commit


def test_network_down(run, inproc):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    before = snapshot(run)
    proc = inproc(str(run), "--repo", "alice/x", "--retries", "1", endpoint=f"http://127.0.0.1:{port}")
    assert_one_line_error(proc, "cannot reach the Hub", f"127.0.0.1:{port}", "after 2 attempt(s)")
    assert "retrying" in proc.stderr
    assert TOKEN not in proc.stdout + proc.stderr
    assert snapshot(run) == before


def test_bad_arguments_fail_before_any_request(hub, run, tmp_path, inproc):
    proc = inproc(str(run), "--repo", "not a repo!")
    assert_one_line_error(proc, "not a Hub dataset id")
    proc = inproc(str(tmp_path / "missing"), "--repo", "alice/x")
    assert_one_line_error(proc, "no such run directory")
    assert [r for r in hub.requests if r[1] != "/api/agent-harnesses"] == []


def test_retry_policy():
    import httpx2
    import tenacity
    from huggingface_hub.errors import HfHubHTTPError

    from selfinstruct.hub import _wait, is_transient

    def http_error(status: int, headers: dict | None = None) -> HfHubHTTPError:
        request = httpx2.Request("POST", "http://127.0.0.1/api/datasets/a/b/commit/main")
        return HfHubHTTPError("boom", response=httpx2.Response(status, headers=headers, request=request))

    assert [is_transient(http_error(s)) for s in (429, 500, 502, 503, 504, 400, 401, 403, 404, 409, 412)] == [True] * 5 + [False] * 6
    assert is_transient(httpx2.ConnectError("refused"))
    wrapped = RuntimeError("Error while uploading 'data/train.parquet' to the Hub.")
    wrapped.__cause__ = http_error(503)
    assert is_transient(wrapped) and not is_transient(ValueError("bad yaml"))

    def state(exc: BaseException, attempt: int) -> tenacity.RetryCallState:
        s = tenacity.RetryCallState(tenacity.Retrying(), None, (), {})
        s.attempt_number = attempt
        s.set_exception((type(exc), exc, None))
        return s

    assert _wait(state(http_error(429, {"Retry-After": "7"}), 1)) == 7.0
    assert _wait(state(http_error(503, {"Retry-After": "9999"}), 1)) == 60.0
    assert 1.0 <= _wait(state(http_error(500), 1)) <= 1.25 and 4.0 <= _wait(state(http_error(500), 3)) <= 5.0
    assert _wait(state(http_error(500), 10)) <= 30 * 1.25
