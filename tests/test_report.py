"""selfinstruct report: the measures, the self-contained page, and the page in a real headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fakes.sample_run import make_run
from selfinstruct.filtering import FilterSettings, Filtering
from selfinstruct.report import (distinct_n, funnel, lengths, load_source, max_similarity, measure, render_html, similarity,
                                 verb_object, write_report)
from selfinstruct.rundir import RECORDS, RunDir
from selfinstruct.similarity import Vocabulary, rouge_l


def _steps(stage: dict) -> dict[str, int]:
    return {s["label"]: s["count"] for s in stage["steps"]}


def test_funnel_counts_each_stage_of_a_run(tmp_path):
    src = load_source(make_run(tmp_path / "run"))
    stages = {s["stage"]: _steps(s) for s in funnel(src)}
    # sample_run: 5 generate requests, 12 kept of which 3 evolved; blacklist and near-duplicate at generate, no-gain at evolve.
    assert stages["generate"] == {"requests": 5, "items read": 11, "blacklist": 1, "near-duplicate": 1, "kept": 9}
    assert stages["evolve"]["no-gain"] == 1 and stages["evolve"]["kept"] == 3


def test_lengths_count_characters_for_chinese_and_words_for_english(tmp_path):
    run = RunDir(tmp_path / "en")
    run.prepare()
    run.append(RECORDS, [{"id": "r1", "instruction": "Write a short poem about rain.", "input": "", "output": "Rain falls softly on the roof."}])
    run.write_manifest({"config": {"lang": "en"}})
    run.close()
    en = lengths(load_source(tmp_path / "en"))
    assert en["unit"] == "words" and en["fields"]["instruction"]["kept"]["median"] == 6
    zh = lengths(load_source(make_run(tmp_path / "zh", n=1)))  # 把下面的句子翻译成英文。: 12 characters
    assert zh["unit"] == "characters" and zh["fields"]["instruction"]["kept"]["median"] == 12


def test_similarity_is_the_filters_rouge_l_to_the_nearest_text():
    texts = ["把下面的句子翻译成英文。", "把这句话翻译成英文", "写一首关于秋天的诗", "Write a poem about autumn", "write a poem about rain"]
    vocab = Vocabulary()
    codes = [vocab.encode(t) for t in texts]
    got = max_similarity(codes, codes, skip_self=np.arange(len(texts)))
    want = [max(rouge_l(a, b) for j, b in enumerate(texts) if j != i) for i, a in enumerate(texts)]
    assert np.allclose(got, want, atol=1e-6)


def test_similarity_to_seeds_uses_the_recorded_seed_file(tmp_path):
    seeds = tmp_path / "elsewhere" / "mine.jsonl"
    seeds.parent.mkdir()
    seeds.write_text(json.dumps({"id": "s1", "instruction": "把下面的句子翻译成英文。", "instances": [{"input": "", "output": "x"}]}, ensure_ascii=False) + "\n", encoding="utf-8")
    src = load_source(make_run(tmp_path / "run", n=12), seeds=seeds)
    seed = similarity(src)["seed"]
    # The 1st kept instruction equals the seed (F1 1.0, last bin); the others share a few characters at most.
    assert seed["n"] == 12 and seed["counts"][-1] == 1 and seed["seeds"] == 1
    missing = load_source(tmp_path / "run")  # the manifest names zh_seed_tasks.jsonl, which is nowhere near
    assert "seed" not in similarity(missing) and "pass --seeds" in missing.seeds_note
    # generate records the path as given in config.seeds (the card's seeds.path is only the file name)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text(encoding="utf-8"))
    manifest["config"]["seeds"] = str(seeds)
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    assert similarity(load_source(tmp_path / "run"))["seed"]["counts"][-1] == 1


def test_leading_verb_and_object():
    zh = verb_object(["写一首关于秋天的诗。", "请帮我翻译下面的句子。", "三原色是什么？", "给出保持健康的三个建议。"], "zh")
    assert zh == [("写", "诗"), ("翻译", "句子"), None, ("给出", "建议")]
    en = verb_object(["Write a poem about autumn.", "What is the capital of France?", "Please translate the following sentence."], "en")
    assert en == [("write", "poem"), None, ("translate", "sentence")]


def test_distinct_n_on_filter_tokens():
    assert distinct_n(["天天天天"], 1) == 0.25 and distinct_n(["ab cd", "ab ef"], 1) == 0.75 and distinct_n(["ab cd", "ab cd"], 2) == 0.5


def test_report_of_a_filter_output(tmp_path):
    data = tmp_path / "in.jsonl"
    rows = [{"instruction": "把下面的句子翻译成英文。", "input": "", "output": "ok"}] * 3 + [{"instruction": "写一首关于秋天的诗。", "input": "", "output": "秋风"}]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    Filtering(FilterSettings(inputs=(data,), out=tmp_path / "out", quiet=True)).run()
    report = json.loads((tmp_path / "out" / "filter_report.json").read_text(encoding="utf-8"))
    stats = measure(load_source(tmp_path / "out"))
    steps = _steps(stats["funnel"][0])
    assert stats["kind"] == "filter" and steps["records in"] == 4 and steps["kept"] == report["kept"] >= 1
    assert sum(n for k, n in steps.items() if k not in ("records in", "kept")) == report["rejected"] == 4 - report["kept"]
    assert {r["status"] for r in stats["samples"]["rows"]} == {"kept", "rejected"}


def test_page_is_self_contained_and_data_cannot_close_its_script(tmp_path):
    run = make_run(tmp_path / "run")
    with open(run / RECORDS, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"id": "x", "instruction": "</script><script>document.title='pwned'</script> <!--", "input": "", "output": "a & b"}) + "\n")
    html = render_html(measure(load_source(run)))
    assert not re.search(r"<(script|img|link|iframe)[^>]*\b(src|href)\s*=", html, re.IGNORECASE)
    assert "@import" not in html and "url(" not in html
    assert html.count("</script>") == 2  # the data's own closing tag was escaped
    data = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', html, re.DOTALL).group(1)
    assert any(r["instruction"].startswith("</script>") for r in json.loads(data)["samples"]["rows"])


def test_cli_writes_the_report_and_refuses_a_folder_that_is_no_run(tmp_path):
    run = make_run(tmp_path / "run")
    done = subprocess.run([sys.executable, "-m", "selfinstruct", "report", str(run), "--out", str(tmp_path / "r.html")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "r.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>") and "wrote" in done.stdout
    (tmp_path / "empty").mkdir()
    bad = subprocess.run([sys.executable, "-m", "selfinstruct", "report", str(tmp_path / "empty")], capture_output=True, text=True)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) <= 2


# ---- in a real browser -----------------------------------------------------------------------

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (.ci/run installs Debian's chromium)")


def _chromium(tmp_path: Path, page: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"  # a fresh profile per start
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--force-device-scale-factor=1",
             f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000"]
    return subprocess.run([CHROMIUM, *flags, *args, page.as_uri()], capture_output=True, text=True, timeout=120)


@needs_chromium
@pytest.mark.parametrize("timed", [False, True], ids=["ledger-in-order", "ledger-with-times"])
def test_page_loads_in_chromium_with_charts_and_no_errors(tmp_path, timed):
    run = make_run(tmp_path / "run")
    if timed:
        _with_timed_ledger(run)
    out, stats = write_report(run, tmp_path / "report.html")
    done = _chromium(tmp_path, out, "--dump-dom")
    body = re.search(r"<body[^>]*>", done.stdout).group(0)
    assert "data-errors" not in body, body
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line]
    assert not [line for line in console if re.search(r"error|uncaught", line, re.IGNORECASE)], console
    charts = int(re.search(r'data-charts="(\d+)"', body).group(1))
    assert charts >= (15 if timed else 13)  # the timed ledger adds in-flight and failed-attempt charts
    # Drawn, not just declared: bars, arcs of the sunburst, and the Chinese verbs as SVG text.
    assert done.stdout.count("<rect") > 20 and done.stdout.count("<path") > 6
    verbs = [v["verb"] for v in stats["diversity"]["verbs"]]
    assert verbs and all(f">{v}</text>" in done.stdout for v in verbs[:3])
    # The searchable table drawn: the 12 kept and 3 rejected records of the sample run.
    assert done.stdout.count('<tr><td class="kept">') == 12 and done.stdout.count('<tr><td class="rejected">') == 3


def _label_shot(tmp_path: Path, report_html: str, text: str) -> bytes:
    """A screenshot of `text` drawn as the report's SVG chart labels, in the report's own stylesheet."""
    style = re.search(r"<style>.*?</style>", report_html, re.DOTALL).group(0)
    page = tmp_path / f"label-{abs(hash(text))}.html"
    page.write_text(f'<!DOCTYPE html><html><head><meta charset="utf-8">{style}</head><body style="margin:0">'
                    f'<svg width="300" height="60"><text x="10" y="40" class="label" style="font-size:32px">{text}</text></svg></body></html>',
                    encoding="utf-8")
    shot = tmp_path / f"{page.stem}.png"
    _chromium(tmp_path, page, "--window-size=320,80", f"--screenshot={shot}")
    return shot.read_bytes()


@needs_chromium
def test_chinese_labels_render_as_glyphs_not_empty_boxes(tmp_path):
    from PIL import Image

    html = render_html(measure(load_source(make_run(tmp_path / "run"))))
    one, two, tofu = (_label_shot(tmp_path, html, t) for t in ("翻译句子", "写作诗歌", "\ue000\ue001\ue002\ue003"))
    # Without a CJK font every character is the same .notdef box: two different strings would draw the same pixels,
    # and the same pixels as code points no font has.
    assert one != two and one != tofu and two != tofu

    def ink_columns(png: bytes) -> int:
        import io

        img = Image.open(io.BytesIO(png)).convert("L")
        w, h = img.size
        px = img.load()
        return sum(1 for x in range(w) if any(px[x, y] < 128 for y in range(h)))

    assert ink_columns(one) > 60 and ink_columns(two) > 60  # four glyphs of ink, not a blank label


def _with_timed_ledger(run: Path) -> Path:
    """Replace a run's ledger with the engine's shape: dispatched lines, then ok/failed/cancelled ones, each with `at`."""
    from selfinstruct.rundir import LEDGER

    (run / LEDGER).unlink()
    rd = RunDir(run)
    lines = []
    for k in range(10):  # sent at k seconds, back 2 s later; the 4th failed after 3 attempts, the 8th came back on its 2nd
        base = {"request_id": f"r{k:06d}", "stage": "generate", "dispatch": f"d{k}"}
        lines.append({**base, "status": "dispatched", "at": 1000.0 + k})
        status = "failed" if k == 3 else "ok"
        lines.append({**base, "status": status, "at": 1002.0 + k, "attempts": 3 if k == 3 else 2 if k == 7 else 1,
                      "errors": ["http-429", "timeout"] if k == 3 else ["http-500"] if k == 7 else [], "latency": 2.0})
    lines.append({"request_id": "r000010", "stage": "generate", "dispatch": "d10", "status": "dispatched", "at": 1010.0})
    lines.append({"request_id": "r000010", "stage": "generate", "dispatch": "d10", "status": "cancelled", "at": 1010.5})
    rd.append(LEDGER, lines)
    rd.close()
    return run


def test_requests_over_time_from_a_ledger_with_dispatch_lines_and_times(tmp_path):
    from selfinstruct.report import requests_over_time

    src = load_source(_with_timed_ledger(make_run(tmp_path / "run")))
    rq = requests_over_time(src)
    assert rq["timed"] and rq["requests"] == 10 and rq["cancelled"] == 1
    assert sum(rq["ok"]) == 9 and sum(rq["failed"]) == 1 and sum(rq["retries"]) == 3 and sum(rq["sent"]) == 11
    assert rq["errors"] == {"http-429": 1, "timeout": 1, "http-500": 1}
    assert max(rq["in_flight"]) == 2 and rq["in_flight"][-1] == 0  # two out at a time, none left at the end
    assert rq["per_second"] == round(10 / 11, 3)
    assert _steps(funnel(src)[0])["requests"] == 10  # dispatched and cancelled lines are not requests
    assert not any("timestamps" in n for n in measure(src)["notes"])


def test_a_run_that_kept_nothing_still_reports_why(tmp_path):
    run = make_run(tmp_path / "run")
    (run / RECORDS).write_text("", encoding="utf-8")
    out, stats = write_report(run)
    steps = _steps(stats["funnel"][0])
    assert out == run / "report.html" and steps["kept"] == 0 and steps["blacklist"] == 1
    assert stats["lengths"]["fields"]["instruction"]["rejected"]["n"] == 3 and "kept" not in stats["similarity"]
