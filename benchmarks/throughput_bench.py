"""Throughput at the teacher's limit: a real `selfinstruct generate` against a fake teacher of fixed latency.

The bound: with C requests in flight and a teacher that answers each in L seconds, no client can
complete more than C/L requests per second. This runs the real CLI (dedup index, rules, ledger
and record writes all in the loop) at --concurrency C against the fake teacher in its own process
(so the two never share a GIL), and prints the sustained rate as a ratio of that bound, with the
CLI's own CPU time per request (os.wait4 on the CLI process alone, start-up subtracted).

    python benchmarks/throughput_bench.py                      # C=64 and C=256, L=500 ms, 30 s each
    python benchmarks/throughput_bench.py --concurrency 64 --seconds 60 --without-dedup
    git worktree add /tmp/base <commit>; python benchmarks/throughput_bench.py --concurrency 64 --baseline /tmp/base --repeat 3

--baseline runs the same configurations with another checkout's CLI (`python -m selfinstruct` from that
directory), alternating with this one, and prints this checkout's sustained rate as a ratio of the baseline's.

Figures depend on the machine and on what else runs on it: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FAKE = REPO / "tests" / "fakes" / "openai_server.py"


def start_fake(latency: float, stats: Path, *knobs: str) -> tuple[subprocess.Popen, str]:
    """The fake teacher as a process; returns it and its base URL once it listens."""
    cmd = [sys.executable, str(FAKE), "--port", "0", "--latency", str(latency), "--seed", "1",
           "--no-record-contents", "--stats-out", str(stats), "--max-seconds", "0", *knobs]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    url = proc.stdout.readline().strip()
    if not url.startswith("http"):
        proc.kill()
        sys.exit(f"the fake teacher did not start: {url!r}")
    return proc, url


def stop_fake(proc: subprocess.Popen, stats: Path) -> dict:
    """Stop the fake (it writes its stats on SIGTERM) and read them, with its own CPU time."""
    proc.send_signal(signal.SIGTERM)
    _, _, usage = os.wait4(proc.pid, 0)
    proc.returncode = 0
    data = json.loads(stats.read_text(encoding="utf-8"))
    data["cpu_seconds"] = usage.ru_utime + usage.ru_stime
    return data


@dataclass
class Measured:
    """One CLI run: exit code, wall seconds, CPU seconds, peak RSS, and completed-request samples."""

    code: int
    wall: float
    cpu: float
    peak_mb: float
    samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, ledger lines)


def run_measured(args: list[str], ledger: Path | None, cwd: Path = REPO, log: Path | None = None) -> Measured:
    """Run the CLI as its own process; sample the ledger's line count; rusage of that process alone."""
    env = {**os.environ, "OPENAI_API_KEY": os.environ.get("OPENAI_API_KEY", "sk-bench-not-a-key")}
    err = open(log, "w", encoding="utf-8") if log else subprocess.DEVNULL
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "selfinstruct", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=err)
    samples: list[tuple[float, int]] = []
    done = threading.Event()

    def sample() -> None:
        count, offset = 0, 0
        while not done.is_set():
            if ledger is not None and ledger.exists():
                with open(ledger, "rb") as fh:
                    fh.seek(offset)
                    chunk = fh.read()
                offset += len(chunk)
                # Finished requests only: the engine also ledgers a `dispatched` line before each request leaves.
                count += chunk.count(b'"status":"ok"') + chunk.count(b'"status":"failed"')
                samples.append((time.monotonic() - started, count))
            done.wait(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    thread.join()
    if log:
        err.close()
    return Measured(proc.returncode, wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, samples)


def sustained_rate(samples: list[tuple[float, int]], total: int, skip: int) -> float:
    """Completed requests per second between the end of the first `skip` and the start of the last `skip`."""
    inside = [(t, n) for t, n in samples if skip <= n <= total - skip]
    if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
        return float("nan")
    (t1, n1), (t2, n2) = inside[0], inside[-1]
    return (n2 - n1) / (t2 - t1)


def startup_cpu(seeds: Path, workdir: Path) -> float:
    """CPU seconds of start-up alone (imports, seeds, template): a --dry-run of the same command."""
    m = run_measured(["generate", "--seeds", str(seeds), "--n", "1000", "--base-url", "http://127.0.0.1:9/v1",
                      "--model", "m", "--out", str(workdir / "dry"), "--dry-run"], None)
    return m.cpu


def bench(concurrency: int, latency: float, seconds: float, seeds: Path, workdir: Path, dedup: bool, boot_cpu: float,
          repo: Path = REPO, tag: str = "") -> dict:
    stats = workdir / f"fake-{concurrency}-{dedup}{tag}.json"
    out = workdir / f"run-{concurrency}-{dedup}{tag}"
    fake, url = start_fake(latency, stats)
    requests = int(concurrency / latency * seconds)
    args = ["generate", "--seeds", str(seeds), "--n", "10000000", "--base-url", url, "--model", "fake-teacher",
            "--out", str(out), "--concurrency", str(concurrency), "--max-requests", str(requests), "--quiet"]
    if not dedup:
        args += ["--no-rule", "near-duplicate"]
    try:
        m = run_measured(args, out / "requests.jsonl", cwd=repo, log=workdir / f"cli-{concurrency}-{dedup}{tag}.log")
    finally:
        served = stop_fake(fake, stats)
    ledger = [json.loads(line) for line in (out / "requests.jsonl").read_text(encoding="utf-8").splitlines()]
    ledger = [e for e in ledger if e.get("status") in ("ok", "failed")]
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    done = len(ledger)
    bound = concurrency / latency
    steady = sustained_rate(m.samples, done, concurrency)
    first = next((t for t, n in m.samples if n > 0), 0.0)
    mean_latency = sum(e.get("latency", 0) for e in ledger) / max(done, 1)
    return {
        "concurrency": concurrency,
        "dedup": dedup,
        "exit": m.code,
        "requests": done,
        "served": served["requests_received"],
        "kept": manifest["counts"]["kept"],
        "bound": bound,
        "steady": steady,
        "overall": done / max(m.wall - first, 1e-9),
        "wall": m.wall,
        "cpu_ms_per_request": (m.cpu - boot_cpu) / max(done, 1) * 1000,
        "cpu_share": m.cpu / m.wall,
        "peak_mb": m.peak_mb,
        "mean_latency": mean_latency,
        "fake_late_ms": served.get("late_seconds_total", 0.0) / max(served.get("responses_ok", 1), 1) * 1000,
        "fake_cpu_share": served["cpu_seconds"] / m.wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--latency", type=float, default=0.5, help="the fake teacher's fixed latency L, seconds")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each run at the bound (sets --max-requests)")
    parser.add_argument("--seeds", type=Path, default=REPO / "seeds" / "zh.jsonl")
    parser.add_argument("--without-dedup", action="store_true", help="also run each C with --no-rule near-duplicate")
    parser.add_argument("--baseline", type=Path, help="another checkout whose CLI runs the same configurations, alternating with this one")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each configuration (per checkout)")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start; seeds {args.seeds.name}; "
          f"fake teacher latency {args.latency * 1000:.0f} ms in its own process")
    with tempfile.TemporaryDirectory(prefix="selfinstruct-throughput-") as tmp:
        workdir = Path(tmp)
        boot = startup_cpu(args.seeds, workdir)
        print(f"start-up CPU (imports, seeds, template) {boot:.2f} s, subtracted from the per-request figures")
        rows = []
        checkouts = [("", REPO)] + ([("-baseline", args.baseline.resolve())] if args.baseline else [])
        for c in args.concurrency:
            for dedup in ([True, False] if args.without_dedup else [True]):
                steady: dict[str, list[float]] = {tag: [] for tag, _ in checkouts}
                for k in range(args.repeat):
                    # Alternate the checkouts, the baseline first on odd rounds, so drift in machine load hits both.
                    for tag, repo in (checkouts if k % 2 else checkouts[::-1]):
                        row = bench(c, args.latency, args.seconds, args.seeds, workdir, dedup, boot, repo, f"{tag}-{k}")
                        row["checkout"] = str(repo)
                        rows.append(row)
                        steady[tag].append(row["steady"])
                        print(
                            f"{'baseline' if tag else 'this'} C={row['concurrency']:<4} {'dedup on ' if dedup else 'dedup off'} bound {row['bound']:.0f} req/s | "
                            f"sustained {row['steady']:.1f} req/s = {row['steady'] / row['bound']:.2f} x bound | "
                            f"whole run {row['overall']:.1f} req/s = {row['overall'] / row['bound']:.2f} x | "
                            f"{row['requests']:,} requests, {row['kept']:,} kept, mean latency seen {row['mean_latency'] * 1000:.0f} ms | "
                            f"our CPU {row['cpu_ms_per_request']:.2f} ms/request, CLI busy {row['cpu_share']:.0%} of wall, "
                            f"peak RSS {row['peak_mb']:.0f} MB | fake: late {row['fake_late_ms']:.1f} ms/reply, busy {row['fake_cpu_share']:.0%}",
                            flush=True,
                        )
                if args.baseline:
                    ours, base = sum(steady[""]) / len(steady[""]), sum(steady["-baseline"]) / len(steady["-baseline"])
                    print(f"C={c} {'dedup on' if dedup else 'dedup off'}: this checkout sustains {ours:.1f} req/s, the baseline "
                          f"{base:.1f} req/s: {ours / base:.3f} x the baseline (mean of {args.repeat} runs each)", flush=True)
        print(f"load average at end {os.getloadavg()[0]:.2f}")
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
