"""--local: a real llama.cpp teacher started for the command and stopped on every way out; replies a server's context cut."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, finished
from fakes.openai_server import FakeTeacher
from selfinstruct.local_server import BUNDLED_PACKAGE, SERVER_MODULES
from test_generate import KEY, cli, read_jsonl, run_cli


def _local_installed() -> bool:
    try:
        importlib.metadata.distribution(BUNDLED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return False
    return all(importlib.util.find_spec(name) is not None for name in SERVER_MODULES)


needs_local = pytest.mark.skipif(not _local_installed(), reason='the [local] extra is not installed (pip install ".[local]")')


def equal_seeds(tmp_path: Path) -> Path:
    """Chinese seeds all of one length, so every prompt of a run has the same number of tokens."""
    path = tmp_path / "seeds.jsonl"
    # Outputs long enough that the prompt alone outgrows the smallest context a server runs (512 tokens).
    rows = [{"id": f"s{i}", "name": "t", "instruction": f"解释第{i}个现象的原因", "instances": [{"input": "", "output": f"第{i}个现象的原因" + "很简单" * 60 + "。"}]}
            for i in range(5)]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return path


def english_seeds(tmp_path: Path) -> Path:
    """Short English tasks: a small prompt, so the tiny local model answers in seconds."""
    rows = [
        ("Give a synonym for the word.", "happy", "glad"),
        ("Name the capital city of the country.", "France", "Paris"),
        ("Write a short title for a story about a lost dog.", "", "Finding Max"),
        ("Translate the word into Spanish.", "water", "agua"),
        ("List three primary colors.", "", "Red, blue and yellow."),
    ]
    path = tmp_path / "seeds_en.jsonl"
    path.write_text("\n".join(json.dumps({"id": f"e{i}", "name": "t", "instruction": a, "instances": [{"input": b, "output": c}]})
                              for i, (a, b, c) in enumerate(rows)) + "\n", encoding="utf-8")
    return path


def server_pid(log: Path) -> int:
    """The llama.cpp server's pid, from the line --local writes to its log when it starts one."""
    return int(re.findall(r"== server pid (\d+)", log.read_text(encoding="utf-8", errors="replace"))[-1])


def gone(pid: int, within: float = 15.0) -> bool:
    """Whether the process has exited (and is not a zombie) within `within` seconds."""
    until = time.monotonic() + within
    while time.monotonic() < until:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state == "Z":
            return True
        time.sleep(0.1)
    return False


# ---- without the extra ------------------------------------------------------------------


def test_importing_the_package_loads_no_llama_cpp():
    code = "import sys, selfinstruct.cli, selfinstruct.local_server, selfinstruct.generate, selfinstruct.doctor; print('llama_cpp' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.stdout.strip() == "False", done.stderr


def test_local_without_the_extra_is_one_line_naming_the_install(tmp_path):
    # llama_cpp made unimportable, as on a machine where `pip install .` left the extra out.
    code = ("import sys; sys.modules['llama_cpp'] = None; from selfinstruct.cli import main; "
            f"sys.argv = ['selfinstruct', 'generate', '--local', '--seeds', {str(english_seeds(tmp_path))!r}, '--n', '1', "
            f"'--out', {str(tmp_path / 'run')!r}]; main()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and 'pip install ".[local]"' in done.stderr and "llama_cpp" in done.stderr, done.stderr
    assert not (tmp_path / "run").exists()


def test_a_reply_cut_by_the_servers_context_is_named_with_its_fix_not_max_tokens(tmp_path):
    seeds = equal_seeds(tmp_path)
    common = ("generate", "--seeds", str(seeds), "--n", "20", "--per-request", "3", "--concurrency", "2", "--quiet")
    env = {"SELFINSTRUCT_YIELD_WINDOW": "4"}
    with FakeTeacher() as fake:
        # One request to learn the prompt's size, then a server whose context leaves room for a few tokens of reply.
        done = run_cli(*common, "--base-url", fake.base_url, "--out", str(tmp_path / "probe"), "--max-requests", "1", env=env)
        prompt = fake.stats["prompt_tokens_sent"]
        assert done.returncode == 3 and prompt > 0, done.stderr
        assert prompt > 600
        fake.configure(context=prompt + 24)
        done = run_cli(*common, "--base-url", fake.base_url, "--out", str(tmp_path / "run"), env=env)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    truncated = [r for r in read_jsonl(tmp_path / "run" / "rejected.jsonl") if r["reason"] == "truncated"]
    assert truncated
    for record in truncated:
        assert "cut by the server's context, not --max-tokens 3072" in record["detail"], record["detail"]
        assert "--num-examples" in record["detail"] and "--ctx-size" in record["detail"]
    stop = done.stderr[done.stderr.index("stopped:"):]
    assert "server's context" in stop and "--per-request" in stop and "raise --max-tokens" not in stop, stop


# ---- with the extra: the real llama.cpp server ---------------------------------------------


@needs_local
def test_generate_local_runs_the_real_model_end_to_end_and_stops_its_server(tmp_path):
    out = tmp_path / "run"
    started = time.monotonic()
    done = run_cli("generate", "--local", "--seeds", str(english_seeds(tmp_path)), "--n", "1", "--per-request", "2",
                   "--num-examples", "2", "--max-tokens", "128", "--max-requests", "2", "--out", str(out), "--quiet",
                   env={"OPENAI_API_KEY": ""}, timeout=600)
    seconds = time.monotonic() - started
    assert done.returncode in (0, 3), done.stderr  # 3: the 135M model gave nothing usable in 2 requests
    assert "Traceback" not in done.stderr
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["teacher"]["model"] == "SmolLM2-135M-Instruct.Q4_1"
    assert manifest["config"]["local"] is True and manifest["config"]["base_url"].startswith("http://127.0.0.1:")
    answered = [e for e in finished(read_jsonl(out / "requests.jsonl")) if e["status"] == "ok"]
    assert answered and all(e["usage"]["completion_tokens"] > 0 and not e["usage"]["estimated"] for e in answered)
    assert all(e["content"].strip() for e in answered)
    assert sum(1 for _ in read_jsonl(out / "records.jsonl")) + sum(1 for _ in read_jsonl(out / "rejected.jsonl")) >= 1
    assert gone(server_pid(out / "local-server.log"), within=0.5)
    print(f"generate --local end to end: {seconds:.1f} s, {len(answered)} requests")


@needs_local
@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_the_local_server_stops_when_the_run_is_stopped_by_a_signal(tmp_path, how):
    out = tmp_path / "run"
    proc = cli("generate", "--local", "--seeds", str(english_seeds(tmp_path)), "--n", "500", "--per-request", "2",
               "--num-examples", "2", "--max-tokens", "400", "--grace", "1", "--out", str(out), "--quiet", env={"OPENAI_API_KEY": ""})
    try:
        ledger = out / "requests.jsonl"
        until = time.monotonic() + 180
        while not (ledger.exists() and ledger.stat().st_size) and proc.poll() is None and time.monotonic() < until:
            time.sleep(0.1)  # the server answers: a request is on its way
        assert proc.poll() is None, proc.communicate()[1]
        pid = server_pid(out / "local-server.log")
        proc.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    if how == "sigterm":  # a graceful stop: requests in flight land, the server goes with the run
        assert proc.returncode == 143 and "Traceback" not in err, err
    else:  # no cleanup code runs at all: the kernel's parent-death signal takes the server down
        assert proc.returncode == -signal.SIGKILL
    assert gone(pid), f"llama.cpp server {pid} outlived the run ({how})"


@needs_local
def test_a_gguf_the_server_cannot_load_fails_in_one_line_naming_the_log(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)  # the magic, then nothing a loader can use
    out = tmp_path / "run"
    done = run_cli("generate", "--gguf", str(bad), "--seeds", str(english_seeds(tmp_path)), "--n", "1", "--out", str(out),
                   "--quiet", env={"OPENAI_API_KEY": ""}, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    error = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "llama.cpp server exited" in error[0] and str(out / "local-server.log") in error[0]
    assert gone(server_pid(out / "local-server.log"), within=1)


@needs_local
def test_doctor_local_checks_the_real_server_and_prints_the_flags(tmp_path):
    done = run_cli("doctor", "--local", "--lang", "en", "--per-request", "2", "--max-tokens", "100", "--json",
                   env={"OPENAI_API_KEY": ""}, timeout=600)
    assert "Traceback" not in done.stderr, done.stderr
    report = json.loads(done.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["reachable"]["status"] == "ok" and checks["model listed"]["status"] == "ok"
    assert checks["context"]["detail"].endswith("(the --local server)")
    # llama-cpp-python answers one request at a time: doctor must see it (two at once take twice as long).
    assert "one request at a time" in checks["parallel"]["detail"], checks["parallel"]
    assert report["flags"].startswith("--concurrency 1 ")
    assert done.returncode == (0 if checks["chat works"]["status"] == "ok" else 1)


@needs_local
def test_an_error_inside_the_run_stops_the_server_too(tmp_path):
    # The server is up before the run directory is checked: a directory holding another teacher's run is a
    # user error raised inside the with-block, and the server must go with it.
    seeds, out = english_seeds(tmp_path), tmp_path / "run"
    with FakeTeacher() as fake:
        done = run_cli("generate", "--seeds", str(seeds), "--n", "2", "--base-url", fake.base_url, "--model", "fake-teacher",
                       "--out", str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    done = run_cli("generate", "--local", "--seeds", str(seeds), "--n", "2", "--out", str(out), "--quiet",
                   env={"OPENAI_API_KEY": ""}, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "different --model (fake-teacher)" in done.stderr
    assert gone(server_pid(out / "local-server.log"), within=1)


def test_an_out_that_is_a_file_is_a_user_error_not_a_crash(tmp_path):
    out = tmp_path / "run"
    out.write_text("not a directory", encoding="utf-8")
    done = run_cli("generate", "--local", "--seeds", str(english_seeds(tmp_path)), "--n", "1", "--out", str(out), "--quiet",
                   env={"OPENAI_API_KEY": ""}, timeout=300)
    if not _local_installed():
        assert done.returncode == 2 and 'pip install ".[local]"' in done.stderr
        return
    assert done.returncode == 2 and "Traceback" not in done.stderr and "unexpected" not in done.stderr, done.stderr
    assert "cannot write the local server's log" in done.stderr


@pytest.mark.parametrize("command", ["respond", "judge", "pairs", "chat", "textbook"])
def test_every_teacher_command_takes_local(tmp_path, command):
    # llama_cpp made unimportable: --local must reach the server start on every teacher command, not only generate.
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"instruction": "Name a colour.", "input": "", "output": "Blue."}) + "\n", encoding="utf-8")
    args = {"respond": [str(data)], "judge": [str(data)], "pairs": [str(data)], "chat": [str(data)], "textbook": ["--topics", "en", "--n", "1"]}[command]
    argv = ["selfinstruct", command, *args, "--local", "--out", str(tmp_path / "run")]
    code = f"import sys; sys.modules['llama_cpp'] = None; from selfinstruct.cli import main; sys.argv = {argv!r}; main()"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2 and 'pip install ".[local]"' in done.stderr, done.stderr


@needs_local
def test_respond_local_answers_with_the_real_model(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"instruction": "Name three primary colours.", "input": "", "output": ""}) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    done = run_cli("respond", str(data), "--local", "--max-tokens", "64", "--out", str(out), "--quiet", env={"OPENAI_API_KEY": ""},
                   timeout=600)
    assert done.returncode == 0, done.stderr
    answered = [e for e in finished(read_jsonl(out / "requests.jsonl")) if e["status"] == "ok"]
    assert len(answered) == 1 and answered[0]["content"].strip() and not answered[0]["usage"]["estimated"]
    assert gone(server_pid(out / "local-server.log"), within=0.5)


# A llama_cpp.server that lists its model and then dies as a build for another CPU does (SIGILL) on the first token.
_SIGILL_SERVER = '''
import argparse, json, os, signal
from http.server import BaseHTTPRequestHandler, HTTPServer

parser = argparse.ArgumentParser()
for flag in ("--model", "--model_alias", "--host", "--port"):
    parser.add_argument(flag)
args, _ = parser.parse_known_args()


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"data": [{"id": args.model_alias}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        os.kill(os.getpid(), signal.SIGILL)


HTTPServer((args.host, int(args.port)), Handler).serve_forever()
'''


@needs_local
def test_a_server_that_dies_on_its_first_token_is_refused_at_start_with_the_rebuild(tmp_path):
    stub = tmp_path / "stub" / "llama_cpp"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("", encoding="utf-8")
    (stub / "server.py").write_text(_SIGILL_SERVER, encoding="utf-8")
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    records = tmp_path / "in.jsonl"
    records.write_text(json.dumps({"instruction": "Name a color.", "input": "", "output": "Blue."}) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    env = {"OPENAI_API_KEY": "", "PYTHONPATH": os.pathsep.join([str(tmp_path / "stub"), os.environ.get("PYTHONPATH", "")])}
    done = run_cli("judge", str(records), "--out", str(out), "--gguf", str(gguf), "--ctx-size", "1024", "--quiet", env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    error = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "illegal instruction" in error[0] and "GGML_NATIVE=OFF" in error[0], done.stderr
    assert not (out / "requests.jsonl").exists() or not finished(read_jsonl(out / "requests.jsonl"))  # the run never began
