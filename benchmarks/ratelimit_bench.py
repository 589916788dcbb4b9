"""--rpm and --tpm over real minutes: the requests and tokens the teacher sees in every 60 s window.

A real `selfinstruct generate` (its own process) runs against a fast fake teacher (50 ms, far more
capacity than the caps), first with --rpm, then with --tpm. The fake's counters are sampled every
50 ms; every 60 s window inside the run is checked: the most it saw against the cap (must stay
within 5% of it, and at or under it is the aim) and the mean rate against the cap (how much of the
allowance the limiter uses).

    python benchmarks/ratelimit_bench.py                        # about 3.5 minutes
    python benchmarks/ratelimit_bench.py --rpm 1200 --tpm 600000 --seconds 150
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from fakes.openai_server import FakeTeacher  # noqa: E402

WINDOW = 60.0


def windows(samples: list[tuple[float, int]]) -> tuple[float, float, int]:
    """(most counted in any WINDOW-second window, mean per WINDOW over the sampled span, windows checked)."""
    most, checked, j = 0, 0, 0
    for i, (t0, c0) in enumerate(samples):
        while j + 1 < len(samples) and samples[j + 1][0] <= t0 + WINDOW:
            j += 1
        if samples[j][0] < t0 + WINDOW - 0.1:
            break  # the run ended inside this window
        most = max(most, samples[j][1] - c0)
        checked += 1
    span = samples[-1][0] - samples[0][0]
    mean = (samples[-1][1] - samples[0][1]) / span * WINDOW if span > 0 else 0.0
    return most, mean, checked


def run(kind: str, limit: int, seconds: float, seeds: Path, workdir: Path) -> None:
    with FakeTeacher(latency=0.05, seed=3, record_contents=False) as fake:
        out = workdir / f"run-{kind}"
        args = [sys.executable, "-m", "selfinstruct", "generate", "--seeds", str(seeds), "--n", "10000000",
                "--base-url", fake.base_url, "--model", "fake-teacher", "--out", str(out), "--concurrency", "16",
                f"--{kind}", str(limit), "--quiet"]
        env = {**os.environ, "OPENAI_API_KEY": "sk-bench-not-a-key"}
        errors = workdir / f"{kind}.stderr"
        with errors.open("w") as err:
            proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
        samples: list[tuple[float, int]] = []
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            s = fake.stats
            count = s["requests_received"] if kind == "rpm" else s["prompt_tokens_sent"] + s["completion_tokens_sent"]
            samples.append((time.monotonic(), count))
            time.sleep(0.05)
        proc.terminate()
        proc.wait(60)
    first = next((i for i, (_, c) in enumerate(samples) if c > 0), None)
    if first is None:
        raise SystemExit(f"the CLI sent no request; its stderr ends with:\n{errors.read_text()[-2000:]}")
    most, mean, checked = windows(samples[first:])
    unit = "requests" if kind == "rpm" else "tokens"
    print(f"--{kind} {limit:,}: most {unit} in any 60 s window {most:,} = {most / limit:.3f} x the cap "
          f"({checked:,} windows, sampled every 50 ms); mean {mean:,.0f} per minute = {mean / limit:.3f} x the cap", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rpm", type=int, default=600)
    parser.add_argument("--tpm", type=int, default=300_000)
    parser.add_argument("--seconds", type=float, default=100.0, help="length of each run (at least 60)")
    parser.add_argument("--seeds", type=Path, default=REPO / "seeds" / "zh.jsonl")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start; fake teacher 50 ms, --concurrency 16")
    with tempfile.TemporaryDirectory(prefix="selfinstruct-ratelimit-") as tmp:
        run("rpm", args.rpm, args.seconds, args.seeds, Path(tmp))
        run("tpm", args.tpm, args.seconds, args.seeds, Path(tmp))


if __name__ == "__main__":
    main()
