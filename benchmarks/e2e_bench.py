"""End to end: 52,000 Chinese records from a 1 s-latency fake teacher at --concurrency 64, 10 tasks per request.

The teacher-bound time is what the teacher alone needs to serve the requests the run made:
requests x L / C (C requests always in flight, each taking L). The run's wall time, from starting
the CLI process to its exit (start-up, dedup, writes, the last wave, all of it), is printed as a
ratio of that bound, with the CLI's peak resident memory and CPU time.

    python benchmarks/e2e_bench.py                 # about 2 minutes on 2 cores
    python benchmarks/e2e_bench.py --n 10000       # a shorter run

The fake teacher runs in its own process; the figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput_bench import REPO, run_measured, start_fake, stop_fake  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=52_000)
    parser.add_argument("--latency", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--per-request", type=int, default=10)
    parser.add_argument("--seeds", type=Path, default=REPO / "seeds" / "zh.jsonl")
    parser.add_argument("--keep", type=Path, default=None, help="keep the run directory here instead of a temporary one")
    parser.add_argument("--without-dedup", action="store_true", help="--no-rule near-duplicate: what the run costs without the dedup index")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start"
          + ("; near-duplicate rule off" if args.without_dedup else ""))
    with tempfile.TemporaryDirectory(prefix="selfinstruct-e2e-") as tmp:
        workdir = Path(tmp)
        out = args.keep or workdir / "run"
        stats = workdir / "fake.json"
        fake, url = start_fake(args.latency, stats)
        cli = ["generate", "--seeds", str(args.seeds), "--n", str(args.n), "--base-url", url, "--model", "fake-teacher",
               "--out", str(out), "--concurrency", str(args.concurrency), "--per-request", str(args.per_request), "--quiet"]
        if args.without_dedup:
            cli += ["--no-rule", "near-duplicate"]
        try:
            m = run_measured(cli, out / "requests.jsonl", log=workdir / "cli.log")
        finally:
            served = stop_fake(fake, stats)
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
        kept = sum(1 for _ in open(out / "records.jsonl", encoding="utf-8"))
        if m.code != 0:
            print((workdir / "cli.log").read_text(encoding="utf-8")[-2000:])
    requests = manifest["counts"]["requests"]
    bound = served["requests_received"] * args.latency / args.concurrency
    ideal = args.n / args.per_request * args.latency / args.concurrency
    print(f"exit {m.code}: {kept:,} records kept of --n {args.n:,} from {requests:,} requests "
          f"({kept / max(requests, 1):.2f} kept per request of {args.per_request} asked; rejected: {manifest['counts']['rejected']})")
    print(f"wall {m.wall:.1f} s; teacher-bound {bound:.1f} s ({served['requests_received']:,} requests x {args.latency:g} s / {args.concurrency}) "
          f"-> {m.wall / bound:.2f} x the bound; if every asked task were kept: {ideal:.1f} s -> {m.wall / ideal:.2f} x")
    print(f"CLI peak RSS {m.peak_mb:.0f} MB; CLI CPU {m.cpu:.1f} s ({m.cpu / m.wall:.0%} of wall, {m.cpu / max(requests, 1) * 1000:.1f} ms per request); "
          f"fake teacher CPU {served['cpu_seconds']:.1f} s, late {served.get('late_seconds_total', 0.0) / max(served['responses_ok'], 1) * 1000:.1f} ms per reply")
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
