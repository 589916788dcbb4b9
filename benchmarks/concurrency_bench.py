"""--concurrency auto against a fixed --concurrency: a real `selfinstruct generate` against fake teachers in their own process.

Two teachers:

* 64 slots (the fake's `--slots 64`, latency L): the same number of requests at `--concurrency 64` and at
  `--concurrency auto` (which starts at 1), alternating. The figure is auto's whole-run rate (start-up and
  ramp included) as a ratio of the fixed run's; the goal is 0.9 or more.
* one slot (`--slots 1`, as llama.cpp with -np 1: extra requests wait in the server, so their latency
  grows): `--concurrency auto` only. The figures are the most requests the server ever held at once,
  the concurrency the progress lines showed, and the timeouts; the goal is 1-2 and none.

    python benchmarks/concurrency_bench.py                       # ~3 minutes
    python benchmarks/concurrency_bench.py --requests 2000 --repeat 3 --latency 0.5

Figures depend on the machine and on what else runs on it: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput_bench import REPO, run_measured, start_fake, stop_fake  # noqa: E402

PROGRESS = re.compile(r"concurrency (\d+)(?: \(auto[^)]*\))?, (\d+) timeouts, (\d+) retries")


def ledger_counts(out: Path) -> tuple[int, int]:
    """Finished requests and attempts that timed out, from the run's ledger."""
    done = timeouts = 0
    for line in (out / "requests.jsonl").read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        if entry.get("status") in ("ok", "failed"):
            done += 1
            timeouts += entry.get("errors", []).count("timeout")
    return done, timeouts


def run(concurrency: str, slots: int, latency: float, requests: int, seeds: Path, workdir: Path, tag: str,
        timeout: float = 120.0) -> dict:
    """One generate run of `requests` requests against a fake of `slots` slots; its rate, timeouts and progress lines."""
    stats = workdir / f"fake-{tag}.json"
    out = workdir / f"run-{tag}"
    log = workdir / f"cli-{tag}.log"
    fake, url = start_fake(latency, stats, "--slots", str(slots))
    args = ["generate", "--seeds", str(seeds), "--n", "10000000", "--base-url", url, "--model", "fake-teacher",
            "--out", str(out), "--concurrency", concurrency, "--max-requests", str(requests), "--timeout", str(timeout),
            "--no-rule", "near-duplicate"]
    try:
        m = run_measured(args, out / "requests.jsonl", log=log)
    finally:
        served = stop_fake(fake, stats)
    done, timeouts = ledger_counts(out)
    first = next((t for t, n in m.samples if n > 0), 0.0)
    shown = [tuple(map(int, match)) for match in PROGRESS.findall(log.read_text(encoding="utf-8"))]
    return {"concurrency": concurrency, "slots": slots, "exit": m.code, "requests": done, "wall": m.wall,
            "rate": done / max(m.wall, 1e-9), "rate_after_first": done / max(m.wall - first, 1e-9), "timeouts": timeouts,
            "server_max_in_flight": served.get("max_in_flight"), "shown_concurrency": [c for c, _, _ in shown]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency", type=float, default=0.5, help="the fake teacher's latency, seconds")
    parser.add_argument("--requests", type=int, default=1920, help="requests of each 64-slot run (1920: 15 s at the bound)")
    parser.add_argument("--serial-requests", type=int, default=60, help="requests of the one-slot run")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each 64-slot configuration, alternating")
    parser.add_argument("--seeds", type=Path, default=REPO / "seeds" / "zh.jsonl")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start; fake teacher latency "
          f"{args.latency * 1000:.0f} ms in its own process", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="selfinstruct-concurrency-") as tmp:
        workdir = Path(tmp)
        rates: dict[str, list[float]] = {"64": [], "auto": []}
        for k in range(args.repeat):
            for concurrency in (("64", "auto") if k % 2 == 0 else ("auto", "64")):
                row = run(concurrency, 64, args.latency, args.requests, args.seeds, workdir, f"{concurrency}-{k}")
                rows.append(row)
                rates[concurrency].append(row["rate"])
                print(f"64 slots, --concurrency {concurrency:<4}: {row['requests']:,} requests in {row['wall']:.1f} s = "
                      f"{row['rate']:.1f} req/s (bound {64 / args.latency:.0f}); timeouts {row['timeouts']}; exit {row['exit']}; "
                      f"server held at most {row['server_max_in_flight']}; shown concurrency {row['shown_concurrency']}", flush=True)
        auto, fixed = sum(rates["auto"]) / len(rates["auto"]), sum(rates["64"]) / len(rates["64"])
        print(f"auto / fixed 64: {auto:.1f} / {fixed:.1f} req/s = {auto / fixed:.3f} (whole runs, start-up and ramp included; "
              f"mean of {args.repeat} each)", flush=True)
        # The serial teacher's timeout: a request alone takes L, so 4 L leaves room for one waiting behind it, not three.
        row = run("auto", 1, args.latency, args.serial_requests, args.seeds, workdir, "serial", timeout=4 * args.latency)
        rows.append(row)
        print(f"1 slot, --concurrency auto, --timeout {4 * args.latency:g}: {row['requests']} requests in {row['wall']:.1f} s = "
              f"{row['rate']:.2f} req/s (one at a time: {1 / args.latency:.2f}); server held at most {row['server_max_in_flight']}; "
              f"timeouts {row['timeouts']}; shown concurrency {row['shown_concurrency']}; exit {row['exit']}", flush=True)
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
