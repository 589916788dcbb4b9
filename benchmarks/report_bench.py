"""`selfinstruct report` on the 52K Chinese Alpaca fixture: seconds per part, and the whole command.

    python benchmarks/report_bench.py [--limit N]

Reads ../shared/fixtures/alpaca-chinese-dataset__alpaca_chinese_part_0-52.json.gz (never copied into the repo), writes
it as a run directory in a temp folder (records.jsonl, a manifest naming seeds/zh.jsonl, a synthetic request ledger),
then times each measure and the full `selfinstruct report` command in a fresh process.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO.parent / "shared" / "fixtures" / "alpaca-chinese-dataset__alpaca_chinese_part_0-52.json.gz"


def make_run(folder: Path, limit: int | None) -> int:
    rows = json.loads(gzip.decompress(FIXTURE.read_bytes()))[:limit]
    folder.mkdir(parents=True)
    with open(folder / "records.jsonl", "w", encoding="utf-8") as fh:
        for i, r in enumerate(rows):
            rec = {"id": f"r{i // 10 + 1:06d}.{i % 10 + 1}", "instruction": r["instruction"], "input": r["input"], "output": r["output"],
                   "meta": {"model": "fixture", "seed_ids": []}}
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    with open(folder / "requests.jsonl", "w", encoding="utf-8") as fh:
        for k in range(1, len(rows) // 10 + 1):
            fh.write(json.dumps({"request_id": f"r{k:06d}", "request_no": k, "stage": "generate", "status": "ok", "attempts": 1 + (k % 50 == 0),
                                 "errors": ["http-429"] if k % 50 == 0 else [], "latency": 2.0 + (k % 7) / 3}) + "\n")
    manifest = {"selfinstruct_version": "bench", "status": "completed", "config": {"lang": "zh", "similarity": 0.7, "seeds_path": str(REPO / "seeds" / "zh.jsonl")},
                "teacher": {"model": "fixture"}, "counts": {"kept": len(rows), "rejected": {}},
                "stages": {"generate": {"requests": len(rows) // 10, "prompt_tokens": 0, "completion_tokens": 0, "usd": 0}}}
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--limit", type=int, default=None, help="only the first N records")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from selfinstruct import report

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "alpaca-zh"
        n = make_run(run, args.limit)
        print(f"{n:,} records, {os.cpu_count()} cores")
        t = time.perf_counter()
        src = report.load_source(run)
        print(f"  load             {time.perf_counter() - t:6.2f} s")
        for name in ("funnel", "lengths", "similarity", "diversity", "evolution", "costs", "requests_over_time", "samples"):
            t = time.perf_counter()
            getattr(report, name)(src)
            print(f"  {name:<16} {time.perf_counter() - t:6.2f} s")
        t = time.perf_counter()
        html = report.render_html(report.measure(src))
        print(f"  measure+render   {time.perf_counter() - t:6.2f} s  ({len(html.encode()) / 1e6:.1f} MB page)")
        exe = Path(sys.executable).with_name("selfinstruct")
        t = time.perf_counter()
        subprocess.run([str(exe), "report", str(run), "--out", str(Path(tmp) / "report.html")], check=True)
        print(f"selfinstruct report, whole command: {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
