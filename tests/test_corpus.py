"""Reading any dataset into the record shape: containers, shapes, ids, and one-line errors."""

from __future__ import annotations

import gzip
import json

import polars as pl
import pytest

from conftest import fixture_path

from selfinstruct.corpus import compared_text, read_one, read_records
from selfinstruct.errors import InputError

ALPACA = [
    {"instruction": "解释光合作用。", "input": "", "output": "植物把光能变成化学能。"},
    {"instruction": "Translate to French", "input": "good morning", "output": "bonjour"},
]
SHAREGPT = [
    {"id": "sg-1", "conversations": [
        {"from": "system", "value": "You are helpful."},
        {"from": "human", "value": "写一首关于秋天的诗"},
        {"from": "gpt", "value": "秋风起，落叶飞。"},
        {"from": "human", "value": "再来一首"},
    ]},
]
MESSAGES = [
    {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]},
]


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_alpaca_json_list(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(ALPACA, ensure_ascii=False), encoding="utf-8")
    df = read_one(path)
    assert df.columns[:4] == ["id", "instruction", "input", "output"]
    assert df["id"].to_list() == ["data.json:1", "data.json:2"]
    assert df["input"].to_list() == ["", "good morning"]


@pytest.mark.parametrize("name", ["BELLE__zh_seed_tasks.json", "stanford_alpaca__seed_tasks.jsonl"])
def test_self_instruct_seed_shape_takes_the_first_instance(name):
    """Seed tasks keep output in instances[]: the first instance's input/output, the seeds' own ids."""
    path = fixture_path(name)
    tasks = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    df = read_one(path)
    assert df.height == len(tasks) == 175
    assert df["id"].to_list() == [t["id"] for t in tasks]
    assert df["instruction"].to_list() == [t["instruction"] for t in tasks]
    assert df["input"].to_list() == [t["instances"][0]["input"] for t in tasks]
    assert df["output"].to_list() == [t["instances"][0]["output"] for t in tasks]
    assert all(df["output"].str.strip_chars() != "")


def test_seed_shape_edge_cases(tmp_path):
    """Several instances, none, and instances read as JSON text (mixed value types) all give one row per task."""
    path = jsonl(tmp_path / "seeds.jsonl", [
        {"id": "t1", "instruction": "反义词", "instances": [{"input": "高", "output": "低"}, {"input": "大", "output": "小"}]},
        {"id": "t2", "instruction": "Say hi", "instances": []},
    ])
    df = read_one(path)
    assert df["input"].to_list() == ["高", ""] and df["output"].to_list() == ["低", ""]
    odd = jsonl(tmp_path / "odd.jsonl", [
        {"id": "t1", "instruction": "Add", "instances": [{"input": "1+1", "output": 2}]},
        {"id": "t2", "instruction": "Name", "instances": "not a list"},
    ])
    df = read_one(odd)
    assert df["output"].to_list() == ["2", ""]


def test_gzipped_json_and_jsonl(tmp_path):
    a = tmp_path / "a.json.gz"
    a.write_bytes(gzip.compress(json.dumps(ALPACA).encode()))
    b = tmp_path / "b.jsonl.gz"
    b.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in ALPACA).encode()))
    assert read_one(a)["instruction"].to_list() == read_one(b)["instruction"].to_list() == [r["instruction"] for r in ALPACA]


def test_sharegpt_and_messages_shapes(tmp_path):
    df = read_records([jsonl(tmp_path / "sg.jsonl", SHAREGPT), jsonl(tmp_path / "m.jsonl", MESSAGES)])
    assert df["instruction"].to_list() == ["写一首关于秋天的诗", "What is 2+2?"]
    assert df["output"].to_list() == ["秋风起，落叶飞。", "4"]
    assert df["id"].to_list() == ["sg-1", "m.jsonl:1"]
    # The conversation itself rides along, so nothing the input had is lost.
    assert df["conversations"][0] is not None


def test_parquet_and_save_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    pq = tmp_path / "d.parquet"
    pl.DataFrame(ALPACA).write_parquet(pq)
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(ALPACA).save_to_disk(str(saved))
    assert read_one(pq)["output"].to_list() == read_one(saved)["output"].to_list() == [r["output"] for r in ALPACA]
    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ALPACA), "test": datasets.Dataset.from_list(ALPACA[:1])}).save_to_disk(str(dd))
    assert read_one(dd).height == 3


def test_run_directory_reads_records_and_skips_a_torn_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"id": "r000001.0", **ALPACA[0], "meta": {"round": 0}}]
    (run / "records.jsonl").write_text(json.dumps(rows[0], ensure_ascii=False) + "\n" + '{"id": "r0000', encoding="utf-8")
    df = read_one(run)
    assert df["id"].to_list() == ["r000001.0"]


def test_merge_keeps_order_and_makes_ids_unique(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", [{"id": "x", **ALPACA[0]}])
    b = jsonl(tmp_path / "b.jsonl", [{"id": "x", **ALPACA[1]}, ALPACA[0]])
    df = read_records([a, b])
    assert df["id"].to_list() == ["x", "x#1", "b.jsonl:2"]
    assert df["instruction"].to_list() == [ALPACA[0]["instruction"], ALPACA[1]["instruction"], ALPACA[0]["instruction"]]


def test_irregular_values_become_text(tmp_path):
    path = jsonl(tmp_path / "odd.jsonl", [{"instruction": "q", "output": 3}, {"instruction": "r", "output": ["a", "b"]}, {"instruction": "s"}])
    df = read_one(path)
    assert df["output"].to_list() == ["3", '["a", "b"]', ""]


def test_gbk_file(tmp_path):
    path = tmp_path / "gbk.json"
    path.write_bytes(json.dumps(ALPACA[:1], ensure_ascii=False).encode("gb18030"))
    assert read_one(path)["instruction"].to_list() == [ALPACA[0]["instruction"]]


def test_compared_text_joins_fields():
    df = pl.DataFrame({"instruction": ["a", "b", "c"], "input": ["x", None, "  "]})
    # A blank input adds nothing, as dedup_text builds it for generate: "b", not "b\n".
    assert compared_text(df, "instruction+input").to_list() == ["a\nx", "b", "c"]
    with pytest.raises(InputError, match="no column 'context'"):
        compared_text(df, "instruction+context")


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("missing.json", None, "no such file"),
        ("bad.jsonl", '{"instruction": "a"}\n{"instruction": \n', "bad.jsonl:2: invalid JSON"),
        ("list.json", "[1, 2]", "record 1 is a int"),
        ("noinst.jsonl", '{"question_text": "a"}\n', "no instruction column"),
        ("bad.parquet", "not parquet", "not a readable parquet file"),
        ("bad.json.gz", "not gzip", "broken gzip"),
        ("sg.jsonl", '{"conversations": "hello"}\n', "`conversations` must be a list"),
        ("seeds.jsonl", '{"instruction": "a", "instances": [1, 2]}\n', "`instances` must be a list of {input, output}"),
    ],
)
def test_unreadable_input_is_one_line_input_error(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(InputError) as err:
        read_one(path)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_directory_that_is_not_a_dataset(tmp_path):
    with pytest.raises(InputError, match="neither records.jsonl"):
        read_one(tmp_path)
