"""`selfinstruct export`: formats, lineage columns, splits, files written through datasets, and a run left untouched."""

from __future__ import annotations

import json
import sys

import pytest
from datasets import Dataset, load_dataset

from fakes.sample_run import make_run, snapshot
from selfinstruct.errors import ConfigError, InputError, OutputError
from selfinstruct.export import build, convert, export_run, split
from selfinstruct.rundir import RECORDS

LINEAGE = ["id", "seed_ids", "evol_ops", "model"]


@pytest.fixture
def run(tmp_path):
    return make_run(tmp_path / "run")


def parquet(path, split_name="train") -> Dataset:
    return Dataset.from_parquet(str(path / "data" / f"{split_name}-00000-of-00001.parquet"))


@pytest.mark.parametrize(
    ("fmt", "columns"),
    [("alpaca", ["instruction", "input", "output"]), ("sharegpt", ["conversations"]), ("messages", ["messages"])],
)
def test_each_format_round_trips_through_parquet(run, tmp_path, fmt, columns):
    result = export_run(run, tmp_path / "out", fmt)
    ds = parquet(tmp_path / "out")
    assert ds.column_names == columns + LINEAGE
    assert len(ds) == 12 and result.rows == {"train": 12}
    by_id = {row["id"]: row for row in ds}
    row = by_id["r000001.1"]  # 把下面的句子翻译成英文。 with an input
    if fmt == "alpaca":
        assert row["instruction"] == "把下面的句子翻译成英文。" and row["input"] == "今天天气很好，我们去公园散步吧。"
    elif fmt == "sharegpt":
        assert row["conversations"] == [
            {"from": "human", "value": "把下面的句子翻译成英文。\n\n今天天气很好，我们去公园散步吧。"},
            {"from": "gpt", "value": "The weather is nice today; let's take a walk in the park."},
        ]
    else:
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert row["messages"][0]["content"].endswith("我们去公园散步吧。")
    assert row["seed_ids"] == ["seed_task_0", "seed_task_2"] and row["evol_ops"] == [] and row["model"] == "gpt-4o-mini"
    assert by_id["r000002.1"]["evol_ops"] == ["deepen"]


def test_chat_formats_take_a_system_prompt_and_alpaca_refuses_it(run, tmp_path):
    export_run(run, tmp_path / "m", "messages", system="你是一个乐于助人的助手。")
    first = parquet(tmp_path / "m")[0]["messages"][0]
    assert first == {"role": "system", "content": "你是一个乐于助人的助手。"}
    export_run(run, tmp_path / "s", "sharegpt", system="你是一个乐于助人的助手。")
    assert parquet(tmp_path / "s")[0]["conversations"][0]["from"] == "system"
    with pytest.raises(ConfigError, match="--system needs a chat format"):
        export_run(run, tmp_path / "a", "alpaca", system="x")


def test_slim_drops_lineage(run, tmp_path):
    export_run(run, tmp_path / "out", "alpaca", slim=True)
    assert parquet(tmp_path / "out").column_names == ["instruction", "input", "output"]


def test_jsonl_and_test_split_load_back_with_datasets(run, tmp_path):
    out = tmp_path / "out"
    result = export_run(run, out, "messages", jsonl=True, test_size=0.25)
    assert result.rows == {"train": 9, "test": 3}
    line = (out / "test.jsonl").read_text(encoding="utf-8").splitlines()[0]
    assert "\\u" not in line and json.loads(line)["messages"][-1]["role"] == "assistant"  # Chinese kept readable
    # The README's configs make the folder loadable as-is, with both splits.
    dd = load_dataset(str(out), cache_dir=str(tmp_path / "cache"))
    assert {name: len(ds) for name, ds in dd.items()} == {"train": 9, "test": 3}
    assert dd["train"].column_names == ["messages", *LINEAGE]
    ids = set(dd["train"]["id"]) | set(dd["test"]["id"])
    assert len(ids) == 12


def test_split_is_seeded_and_keeps_evolved_variants_with_their_parent(run):
    a = build(run, "alpaca", test_size=4, seed=1)
    b = build(run, "alpaca", test_size=4, seed=1)
    c = build(run, "alpaca", test_size=4, seed=2)
    assert [r["id"] for r in a.splits["test"]] == [r["id"] for r in b.splits["test"]]
    assert [r["id"] for r in a.splits["train"]] != [r["id"] for r in c.splits["train"]]
    records = [json.loads(line) for line in (run / RECORDS).read_text(encoding="utf-8").splitlines()]
    for seed in range(10):
        parts = split(records, 0.3, seed)
        where = {rec["id"]: name for name, rows in parts.items() for rec in rows}
        for rec in records:
            for step in rec["meta"].get("evol", []):
                assert where[rec["id"]] == where[step["parent_id"]]
    assert [r["id"] for r in build(run, "alpaca", seed=3).splits["train"]] == [r["id"] for r in build(run, "alpaca", seed=3).splits["train"]]


@pytest.mark.parametrize(("size", "message"), [(12, "leaves no training rows"), (-1, "neither a fraction"), (2.5, "neither a fraction")])
def test_bad_test_size(run, size, message):
    with pytest.raises(ConfigError, match=message):
        build(run, "alpaca", test_size=size)


def test_export_never_modifies_the_run_even_with_a_torn_last_line(run, tmp_path):
    with open(run / RECORDS, "a", encoding="utf-8") as fh:
        fh.write('{"id": "r000099.1", "instruction": "半行')  # a writer killed mid-line
    before = snapshot(run)
    result = export_run(run, tmp_path / "out", "alpaca")
    assert result.rows == {"train": 12}
    assert snapshot(run) == before


def test_target_directory_safety(run, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not written by selfinstruct export"):
        export_run(run, foreign, "alpaca")
    with pytest.raises(OutputError, match="run directory itself"):
        export_run(run, run, "alpaca")
    assert (foreign / "notes.txt").read_text() == "mine"


def test_re_export_replaces_shards_and_keeps_user_card_text(run, tmp_path):
    out = tmp_path / "out"
    export_run(run, out, "alpaca", test_size=3, jsonl=True)
    readme = (out / "README.md").read_text(encoding="utf-8")
    (out / "README.md").write_text(readme + "\n## 我的备注\n\n只在本地使用。\n", encoding="utf-8")
    export_run(run, out, "messages")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "README.md", "data/train-00000-of-00001.parquet", "figures/funnel.png", "figures/lengths.png", "figures/similarity.png"]
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "只在本地使用。" in card and card.count("<!-- selfinstruct:begin") == 1 and "`messages` format" in card


def test_input_errors(tmp_path):
    with pytest.raises(InputError, match="no such run directory"):
        build(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no records.jsonl"):
        build(tmp_path / "empty")
    (tmp_path / "empty" / RECORDS).write_text("")
    with pytest.raises(InputError, match="no kept records"):
        build(tmp_path / "empty")
    (tmp_path / "empty" / RECORDS).write_text('{"id": "x", "instruction": "", "output": "y"}\n')
    with pytest.raises(InputError, match=":1: record has no instruction"):
        build(tmp_path / "empty")
    with pytest.raises(ConfigError, match="--format 'chatml'"):
        build(tmp_path / "empty", "chatml")


def test_missing_manifest_and_meta_degrade(tmp_path):
    run = make_run(tmp_path / "run", manifest=False)
    b = build(run, "alpaca")
    assert b.manifest == {} and b.rows == 12
    row = convert({"instruction": "你好", "output": "你好！"}, "messages")
    assert row == {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}],
                   "id": "", "seed_ids": [], "evol_ops": [], "model": ""}
    export_run(run, tmp_path / "out", "alpaca")
    assert "not recorded" in (tmp_path / "out" / "README.md").read_text(encoding="utf-8")


def test_cli_export_prints_a_summary_and_one_line_errors(run, tmp_path, monkeypatch, capsys):
    from selfinstruct.cli import main

    def cli(*args):
        monkeypatch.setattr(sys, "argv", ["selfinstruct", "export", *args])
        try:
            main()
        except SystemExit as exc:
            return exc.code or 0, capsys.readouterr()
        return 0, capsys.readouterr()

    code, out = cli(str(run), "--to", str(tmp_path / "out"), "--format", "sharegpt", "--test-size", "0.25")
    assert code == 0 and "exported 12 rows (train 9, test 3) as sharegpt" in out.out
    code, out = cli(str(run), "--to", str(tmp_path / "out2"), "--format", "chatml")
    assert code == 2 and out.err.count("\n") == 1 and out.err.startswith("error: --format 'chatml'")


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_a_filter_output_exports_with_its_rules_on_the_card(tmp_path, fmt):
    from selfinstruct.filtering import Filtering, FilterSettings

    tasks = ["解释积雨云是怎样形成的", "写一首关于秋天落叶的短诗", "把这句话翻译成英文：今天很冷", "列出三种节约用水的方法",
             "判断下面这条评论的情感倾向", "用一句话总结光合作用的过程"]
    rows = [{"instruction": t, "input": "", "output": "好的，这是回答。"} for t in tasks]
    rows += [{"instruction": "请解释积雨云是怎样形成的", "input": "", "output": "同上。"},  # a near-duplicate
             {"instruction": "画一张图片", "input": "", "output": "好的"}]  # blacklist
    data = tmp_path / "in.json"
    data.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    Filtering(FilterSettings(inputs=(data,), out=tmp_path / "filtered", format=fmt, quiet=True)).run()
    # A stale kept file of the other format (an older filter version left them) is not what the report names.
    stale = tmp_path / "filtered" / ("kept.parquet" if fmt == "jsonl" else "kept.jsonl")
    stale.write_text("", encoding="utf-8")
    result = export_run(tmp_path / "filtered", tmp_path / "out", "messages")
    assert result.rows == {"train": 6}
    loaded = load_dataset("parquet", data_files=str(tmp_path / "out" / "data" / "*.parquet"), split="train")
    assert loaded.num_rows == 6 and {row["messages"][0]["content"] for row in loaded} == set(tasks)
    card = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    assert "| `near-duplicate` | ROUGE-L" in card and "| `blacklist` |" in card and "| **total** | | **2** |" in card
    # It says what it is: cleaned from the inputs, not synthetic data from a teacher with a cost.
    assert "cleaned by `selfinstruct filter`" in card and "from `in.json` (8 records in)" in card
    assert "synthetic" not in card.split("---")[1] and "Tokens and cost" not in card and "teacher" not in card.lower()


def test_export_adds_the_key_figures_as_png_and_shows_them_in_the_card(run, tmp_path):
    from PIL import Image

    result = export_run(run, tmp_path / "out", "alpaca")
    card = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    for name in ("funnel", "lengths", "similarity"):
        png = tmp_path / "out" / "figures" / f"{name}.png"
        assert png in result.files and f"](figures/{name}.png)" in card
        with Image.open(png) as img:
            assert img.format == "PNG" and img.size[0] > 300 and len(img.getcolors(1 << 20) or []) > 10  # drawn, not blank
    # The same run gives the same bytes (no timestamp inside), so a repeated push uploads nothing new.
    first = (tmp_path / "out" / "figures" / "funnel.png").read_bytes()
    export_run(run, tmp_path / "out", "alpaca")
    assert (tmp_path / "out" / "figures" / "funnel.png").read_bytes() == first


def test_figure_labels_in_chinese_are_drawn_with_a_cjk_font_or_spelled_as_code_points():
    import io

    import numpy as np
    from PIL import Image

    from selfinstruct.report import _label, cjk_font, render_figures

    def funnel_png(rule: str) -> np.ndarray:
        stats = {"funnel": [{"stage": "filter", "steps": [{"label": "records in", "count": 3, "kind": "in"},
                                                          {"label": rule, "count": 1, "kind": "drop"}, {"label": "kept", "count": 2, "kind": "out"}]}],
                 "lengths": {"unit": "characters", "fields": {}}, "similarity": {"threshold": None}}
        return np.asarray(Image.open(io.BytesIO(render_figures(stats)["figures/funnel.png"])).convert("L"))

    if cjk_font() is None:
        assert _label("敏感词", None) == "U+654F U+611F U+8BCD".replace(" ", "")
        pytest.skip("no CJK font installed (.ci/run installs fonts-noto-cjk)")
    # A rule file may name its rules in Chinese: two names must draw differently (missing glyphs all draw the same box).
    assert not np.array_equal(funnel_png("敏感词"), funnel_png("广告语"))
