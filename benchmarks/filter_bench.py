"""selfinstruct filter at scale: a 2,000,000-record synthetic set (the 52K fixture repeated with small edits).

Prints wall time per stage and peak memory for the whole `selfinstruct filter` run, in exact
and minhash mode. Figures are printed, not asserted. Run from the repo root:

    python benchmarks/filter_bench.py                 # 2M records, both modes
    python benchmarks/filter_bench.py --records 200000 --mode exact
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO.parent / "shared" / "fixtures" / "alpaca-chinese-dataset__alpaca_chinese_part_0-52.json.gz"
# Characters the edits insert or substitute: common enough to look like real text.
EDIT_CHARS = "的一是了我不人在他有这个上们来到时大地为子中你说生国年着就那和要她出也得里后自以会家可下而过天去能对小多然于心学么之都好看起发当没成只如事把还用第样道想作种开美总从无情己面最女但现前些所同日手又行意动"


def edit(text: str, rng: random.Random) -> str:
    """One or two small character edits: substitute, insert or delete."""
    chars = list(text)
    for _ in range(rng.choice((1, 1, 2))):
        op = rng.random()
        at = rng.randrange(len(chars) + 1)
        if op < 0.4 and at < len(chars):
            chars[at] = rng.choice(EDIT_CHARS)
        elif op < 0.8 or len(chars) < 2:
            chars.insert(at, rng.choice(EDIT_CHARS))
        elif at < len(chars):
            del chars[at]
    return "".join(chars)


def synthesize(n: int, path: Path, seed: int = 0) -> None:
    """The fixture, then edited copies of it, until n records; written as parquet."""
    rows = json.loads(gzip.decompress(FIXTURE.read_bytes()))
    base = pl.DataFrame(rows).select("instruction", "input", "output")
    rng = random.Random(seed)
    parts, have, copy = [], 0, 0
    while have < n:
        take = base.head(min(base.height, n - have))
        if copy:
            take = take.with_columns(pl.Series("instruction", [edit(t, rng) for t in take["instruction"].to_list()]))
        parts.append(take)
        have += take.height
        copy += 1
    pl.concat(parts).write_parquet(path)


def run_filter(data: Path, out: Path, mode: str) -> tuple[float, float, dict]:
    """Run the CLI in a child process: wall seconds, child peak RSS in MiB, and its report."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "selfinstruct", "filter", str(data), "--out", str(out), "--dedup", mode, "--quiet", "--format", "parquet"]
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:
        print("  (peak memory below an earlier child's; run one mode at a time for its own figure)")
    report = json.loads((out / "filter_report.json").read_text(encoding="utf-8"))
    return wall, peak / 1024, report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=2_000_000)
    ap.add_argument("--mode", choices=("exact", "minhash", "both"), default="both")
    ap.add_argument("--workdir", type=Path, default=None, help="Keep the synthetic data and outputs here.")
    args = ap.parse_args()
    if not FIXTURE.exists():
        sys.exit(f"fixture {FIXTURE} not found: check out ../shared beside the repo")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="filter-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"synthetic-{args.records}.parquet"
    if not data.exists():
        start = time.perf_counter()
        synthesize(args.records, data)
        print(f"synthetic set: {args.records:,} records ({data.stat().st_size / 2**20:,.0f} MiB parquet) made in {time.perf_counter() - start:.0f} s")
    modes = ("exact", "minhash") if args.mode == "both" else (args.mode,)
    for mode in modes:
        wall, peak, report = run_filter(data, work / f"out-{mode}", mode)
        stages = ", ".join(f"{k} {v:.0f} s" for k, v in report["seconds"].items())
        print(f"filter --dedup {mode}: {report['total']:,} records -> {report['kept']:,} kept in {wall:.0f} s wall ({wall / 60:.1f} min); peak memory {peak / 1024:.2f} GiB")
        print(f"  stages: {stages}")
        print(f"  rejected: {json.dumps(report['rejected_by_rule'])}")
        print(f"  candidate pairs verified: {report['dedup'].get('candidates_verified', 0):,}")


if __name__ == "__main__":
    main()
