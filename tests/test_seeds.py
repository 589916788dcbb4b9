"""Seed files in every accepted shape, and the errors bad ones give."""

from __future__ import annotations

import json

import pytest

from conftest import fixture_path
from selfinstruct.errors import InputError
from selfinstruct.seeds import read_seeds


def test_reads_self_instruct_fixture():
    seeds = read_seeds(fixture_path("stanford_alpaca__seed_tasks.jsonl"))
    assert len(seeds.tasks) == 175
    first = seeds.tasks[0]
    assert first.id == "seed_task_0" and first.name == "breakfast_suggestion"
    assert first.instances[0].output.startswith("Yes")
    assert sum(t.is_classification for t in seeds.tasks) > 10


def test_reads_belle_fixture_jsonl_in_json_file():
    seeds = read_seeds(fixture_path("BELLE__zh_seed_tasks.json"))
    assert len(seeds.tasks) == 175
    assert any("诗" in t.instruction for t in seeds.tasks)


def test_reads_alpaca_json_list_and_jsonl(tmp_path):
    rows = [{"instruction": "写一首诗", "input": "", "output": "春眠不觉晓"}, {"instruction": "翻译", "input": "你好", "output": "Hello"}]
    as_list = tmp_path / "a.json"
    as_list.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    as_lines = tmp_path / "b.jsonl"
    as_lines.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    for path in (as_list, as_lines):
        seeds = read_seeds(path)
        assert [t.instruction for t in seeds.tasks] == ["写一首诗", "翻译"]
        assert seeds.tasks[1].instances[0].input == "你好"
        assert seeds.tasks[0].id.endswith("-1")


def test_bom_gbk_and_crlf_are_read(tmp_path):
    line = json.dumps({"instruction": "解释光合作用", "output": "植物利用光能"}, ensure_ascii=False)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + (line + "\r\n").encode("utf-8"))
    gbk = tmp_path / "gbk.jsonl"
    gbk.write_bytes((line + "\r\n").encode("gbk"))
    for path in (bom, gbk):
        assert read_seeds(path).tasks[0].instruction == "解释光合作用"


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"instruction": "a", "output": "b"}', "{not json"], ":2: invalid JSON"),
        (['{"input": "x", "output": "b"}'], ":1: missing `instruction`"),
        (['{"instruction": 42, "output": "b"}'], ":1: `instruction` must be a string, got int"),
        (['{"instruction": "a", "output": 3.5}'], ":1: `output` must be a string, got float"),
        (['{"instruction": "a", "instances": [{"input": 7, "output": "b"}]}'], ":1: `instances[0].input` must be a string, got int"),
        (['{"instruction": true, "output": "b"}'], ":1: `instruction` must be a string, got bool"),
        (['{"instruction": ["a"], "output": "b"}'], ":1: `instruction` must be a string"),
        (['{"instruction": "a", "instances": []}'], ":1: `instances` must be a non-empty list"),
        (['{"instruction": "a", "output": "b", "is_classification": "yes"}'], ":1: `is_classification` must be true or false"),
        (['{"id": "x", "instruction": "a", "output": "b"}', '{"id": "x", "instruction": "c", "output": "d"}'], ":2: duplicate id"),
        (["[1, 2]"], None),
    ],
)
def test_broken_lines_name_file_and_line(write_seeds, lines, message):
    path = write_seeds(lines)
    if message is None and lines[0].startswith("{"):
        read_seeds(path)
        return
    with pytest.raises(InputError) as err:
        read_seeds(path)
    assert str(path) in str(err.value)
    if message:
        assert message in str(err.value)


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(InputError, match="no seed tasks"):
        read_seeds(empty)
    with pytest.raises(InputError, match="no such seed file"):
        read_seeds(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("encoding, name", [("utf-16-le", "UTF-16 little-endian"), ("utf-16-be", "UTF-16 big-endian"),
                                            ("utf-16", "UTF-16"), ("utf-32", "UTF-32")])
def test_utf16_and_utf32_files_are_named_with_or_without_a_bom(tmp_path, encoding, name):
    path = tmp_path / "seeds.jsonl"
    line = json.dumps({"instruction": "解释天空为什么是蓝色的", "input": "", "output": "散射"}, ensure_ascii=False) + "\n"
    path.write_bytes(line.encode(encoding) * 3)
    with pytest.raises(InputError) as err:
        read_seeds(path)
    assert f"{path}: the file is {name}" in err.value.message and "UTF-8" in err.value.hint
    assert "invalid JSON" not in str(err.value)
