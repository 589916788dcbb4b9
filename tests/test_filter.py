"""selfinstruct filter end to end: nothing lost, every rule named, duplicates linked, errors in one line."""

from __future__ import annotations

import gzip
import io
import json
import re
import sys

import polars as pl
import pytest
from conftest import fixture_path

from selfinstruct.errors import ConfigError
from selfinstruct.filtering import FilterSettings, Filtering
from selfinstruct.similarity import dedup_text, rouge_l, topic_text

ZH_TASKS = [
    "解释一下光合作用的过程。",
    "写一首关于秋天的五言绝句。",
    "给出保持健康的三个建议。",
    "把下面的句子翻译成英文。",
    "列举三种常见的排序算法并比较它们。",
    "描述一下你理想中的周末。",
]
EN_TASKS = [
    "Explain how photosynthesis works in plants.",
    "Write a short poem about autumn leaves.",
    "Give three tips for staying healthy.",
]


def rec(instruction, output="这是一个足够长的回答，用来通过规则。", input="", **extra):
    return {"instruction": instruction, "input": input, "output": output, **extra}


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture
def mixed(tmp_path):
    """Five inputs of four formats and three shapes, with duplicates across them and rule breakers."""
    a = jsonl(tmp_path / "a.jsonl", [rec(t) for t in ZH_TASKS] + [rec("写诗"), rec("根据这张图片描述场景。")])
    b = tmp_path / "b.json.gz"
    b.write_bytes(gzip.compress(json.dumps([
        rec("给出保持健康的三个建议"),            # punctuation differs: a near-duplicate at ROUGE-L 1.0
        rec("解释一下光合作用的过程吧。"),         # near-duplicate of a:1
        rec("介绍一下长城的历史。", output="作为一个AI语言模型，我无法回答。"),
    ], ensure_ascii=False).encode()))
    c = tmp_path / "c.parquet"
    pl.DataFrame([rec("比较猫和狗作为宠物的优缺点。"), rec("列举三种常见的排序算法 并比较它们。")]).write_parquet(c)
    d = jsonl(tmp_path / "d.jsonl", [
        {"id": "sg-1", "conversations": [{"from": "human", "value": "写一首关于秋天的五言绝句"}, {"from": "gpt", "value": "秋风起，落叶飞，雁南归。"}]},
        {"id": "sg-2", "conversations": [{"from": "human", "value": "说说量子计算和经典计算的区别。"}, {"from": "gpt", "value": "量子计算利用叠加和纠缠。"}]},
    ])
    run = tmp_path / "run"
    run.mkdir()
    jsonl(run / "records.jsonl", [rec("描述一下你理想中的周末。", id="r000001.0"), rec("用三句话介绍杭州。", id="r000001.1")])
    return [a, b, c, d, run]


def run_filter(tmp_path, inputs, **kw):
    settings = FilterSettings(inputs=tuple(inputs), out=tmp_path / "out", quiet=True, **kw)
    report = Filtering(settings).run()
    kept_path = tmp_path / "out" / f"kept.{settings.format}"
    kept = pl.read_parquet(kept_path).to_dicts() if settings.format == "parquet" else read_jsonl(kept_path)
    return report, kept, read_jsonl(tmp_path / "out" / "rejected.jsonl")


def test_kept_plus_rejected_is_the_input(tmp_path, mixed):
    import datasets

    chat = jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "system", "content": "你是一个乐于助人的助手。"},
                      {"role": "user", "content": "比较猫和狗作为宠物的优缺点"},  # near-duplicate of c.parquet:1
                      {"role": "assistant", "content": "猫更独立，狗更忠诚，各有优点。"}]},
        {"messages": [{"role": "user", "content": "推荐三本适合初学者的编程书。"},
                      {"role": "assistant", "content": "可以从基础的入门教程开始读起。"}]},
    ])
    saved = tmp_path / "saved"
    datasets.Dataset.from_list([rec("用三句话介绍杭州。"), rec("说明一下地球为什么有四季。"), rec("描述一下这段视频的内容。")]).save_to_disk(str(saved))
    report, kept, rejected = run_filter(tmp_path, [*mixed, chat, saved])
    total = 8 + 3 + 2 + 2 + 2 + 2 + 3
    assert report.total == total and len(kept) + len(rejected) == total
    ids = [r["id"] for r in kept] + [r["id"] for r in rejected]
    assert len(set(ids)) == total
    reasons = {r["id"]: r["reason"] for r in rejected}
    assert reasons["a.jsonl:7"] == "too-short"
    assert reasons["a.jsonl:8"] == "blacklist"
    assert reasons["b.json.gz:3"] == "refusal"
    assert reasons["b.json.gz:2"] == "near-duplicate"
    assert reasons["c.parquet:2"] == "exact-duplicate"  # only whitespace differs
    assert reasons["r000001.0"] == "exact-duplicate"
    assert reasons["b.json.gz:1"] == "near-duplicate"  # the final 。 differs: not the same text, same tokens
    assert reasons["sg-1"] == "near-duplicate"
    assert reasons["chat.jsonl:1"] == "near-duplicate"
    assert reasons["saved:1"] == "exact-duplicate"
    assert reasons["saved:3"] == "blacklist"
    assert {"chat.jsonl:2", "saved:2"} <= {r["id"] for r in kept}
    assert {r["id"]: r["instruction"] for r in kept}["chat.jsonl:2"] == "推荐三本适合初学者的编程书。"
    for r in rejected:
        assert r["detail"]
    report_json = json.loads((tmp_path / "out" / "filter_report.json").read_text(encoding="utf-8"))
    assert report_json["kept"] + report_json["rejected"] == total
    assert sum(report_json["rejected_by_rule"].values()) == len(rejected)
    assert set(report_json["seconds"]) >= {"read", "rules", "exact-duplicate", "near-duplicate", "write"}
    assert [i["records"] for i in report_json["inputs"]] == [8, 3, 2, 2, 2, 2, 3]


def test_near_duplicates_name_a_kept_record_and_score(tmp_path, mixed):
    _, kept, rejected = run_filter(tmp_path, mixed)
    kept_by_id = {r["id"]: r for r in kept}
    near = [r for r in rejected if r["reason"] == "near-duplicate"]
    assert near
    compared = lambda r: topic_text(r["instruction"], r.get("input") or "")  # the topic by default
    shown = lambda r: dedup_text(r["instruction"], r.get("input") or "")  # what a reader compares
    for r in near:
        assert r["duplicate_of"] in kept_by_id
        assert r["score"] == pytest.approx(rouge_l(compared(r), compared(kept_by_id[r["duplicate_of"]])), abs=1e-4)
        assert r["score"] > 0.7
        assert r["duplicate_text"] == shown(kept_by_id[r["duplicate_of"]])
    assert all(r["duplicate_of"] in kept_by_id for r in rejected if r["reason"] == "exact-duplicate")
    assert all(r["duplicate_of"] is None for r in rejected if r["reason"] not in ("near-duplicate", "exact-duplicate"))


def test_only_the_near_duplicate_rule(tmp_path, mixed):
    report, kept, rejected = run_filter(tmp_path, mixed, rules=("near-duplicate",))
    assert {r["reason"] for r in rejected} == {"near-duplicate"}
    assert "写诗" in {r["instruction"] for r in kept}  # too-short did not run
    # The exact copies are now caught as near-duplicates (ROUGE-L 1.0 on tokens).
    assert len(rejected) == 5
    assert report.enabled == ["near-duplicate"]


def test_no_rule_switches_one_off(tmp_path, mixed):
    _, kept, rejected = run_filter(tmp_path, mixed, no_rules=("blacklist", "near-duplicate"))
    reasons = {r["reason"] for r in rejected}
    assert "blacklist" not in reasons and "near-duplicate" not in reasons
    assert "根据这张图片描述场景。" in {r["instruction"] for r in kept}


def test_field_instruction_plus_input(tmp_path):
    path = jsonl(tmp_path / "x.jsonl", [
        rec("把下面的句子翻译成英文。", input="今天天气很好。"),
        rec("把下面的句子翻译成英文。", input="我喜欢读书和旅行，也喜欢音乐。"),
    ])
    _, kept, _ = run_filter(tmp_path, [path], rules=("near-duplicate",), field="instruction")  # the Alpaca way
    assert len(kept) == 1
    _, kept, _ = run_filter(tmp_path, [path], rules=("near-duplicate",))  # the default: other material, another task
    assert len(kept) == 2


def test_field_topic_compares_what_a_task_is_about(tmp_path):
    """The default drops the same topic asked in other words and keeps one template on two topics; instruction+input does the opposite."""
    path = jsonl(tmp_path / "x.jsonl", [
        rec("列出三种减轻压力的方法。"),
        rec("给出四种可以减轻压力的技巧"),  # the same task: only framing words and the count differ
        rec("写一首关于春天的诗。"),
        rec("写一首关于秋天的诗。"),  # one template, another topic
    ])
    _, kept, rejected = run_filter(tmp_path, [path], rules=("near-duplicate",))
    assert [r["id"] for r in kept] == ["x.jsonl:1", "x.jsonl:3", "x.jsonl:4"]
    assert rejected[0]["id"] == "x.jsonl:2" and rejected[0]["duplicate_of"] == "x.jsonl:1"
    _, kept, _ = run_filter(tmp_path, [path], rules=("near-duplicate",), field="instruction+input")
    assert [r["id"] for r in kept] == ["x.jsonl:1", "x.jsonl:2", "x.jsonl:3"]


def test_similarity_one_removes_only_exact_token_matches(tmp_path):
    path = jsonl(tmp_path / "x.jsonl", [rec("解释光合作用。"), rec("解释光合作用"), rec("解释一下光合作用")])
    _, kept, rejected = run_filter(tmp_path, [path], rules=("near-duplicate",), similarity=1.0)
    assert [r["instruction"] for r in kept] == ["解释光合作用。", "解释一下光合作用"]
    assert rejected[0]["score"] == 1.0


def test_exact_duplicates_after_normalisation(tmp_path):
    """Case, full-width forms and whitespace runs do not make a new text; joining two words does."""
    path = jsonl(tmp_path / "x.jsonl", [
        rec("Explain how photosynthesis works."),
        rec("explain  how PHOTOSYNTHESIS works. "),                 # case and a whitespace run
        rec("Ｅｘｐｌａｉｎ\u3000ｈｏｗ ｐｈｏｔｏｓｙｎｔｈｅｓｉｓ ｗｏｒｋｓ．"),  # full-width (NFKC)
        rec("Give the rapist a call."),
        rec("Give therapist a call."),                              # other words: not a duplicate
        rec("解释一下光合作用的过程，好吗？"),
        rec("解释一下 光合作用的过程,好吗?"),                        # CJK spacing and half-width ，？ only
    ])
    _, kept, rejected = run_filter(tmp_path, [path], rules=("exact-duplicate",))
    assert [r["id"] for r in kept] == ["x.jsonl:1", "x.jsonl:4", "x.jsonl:5", "x.jsonl:6"]
    assert {r["id"]: r["duplicate_of"] for r in rejected} == {"x.jsonl:2": "x.jsonl:1", "x.jsonl:3": "x.jsonl:1", "x.jsonl:7": "x.jsonl:6"}
    assert {r["reason"] for r in rejected} == {"exact-duplicate"}


def test_exact_duplicate_of_a_near_duplicate_names_the_kept_record(tmp_path):
    """The exact stage runs first; when its first copy is then a near-duplicate, the link moves on to the kept one."""
    path = jsonl(tmp_path / "x.jsonl", [
        rec("解释一下光合作用的过程。"),
        rec("解释一下光合作用的过程吧。"),   # near-duplicate of 1
        rec("解释一下 光合作用的过程吧。"),  # exact duplicate of 2
    ])
    _, kept, rejected = run_filter(tmp_path, [path], rules=("exact-duplicate", "near-duplicate"))
    assert [r["id"] for r in kept] == ["x.jsonl:1"]
    by_id = {r["id"]: r for r in rejected}
    exact = by_id["x.jsonl:3"]
    assert exact["reason"] == "exact-duplicate" and by_id["x.jsonl:2"]["reason"] == "near-duplicate"
    assert exact["duplicate_of"] == "x.jsonl:1" and exact["duplicate_text"] == "解释一下光合作用的过程。"
    assert exact["score"] == pytest.approx(rouge_l(topic_text(exact["instruction"]), topic_text("解释一下光合作用的过程。")), abs=1e-4)
    assert "x.jsonl:2" in exact["detail"] and "x.jsonl:1" in exact["detail"]


def test_against_removes_contamination(tmp_path, mixed):
    bench = jsonl(tmp_path / "test_set.jsonl", [{"instruction": "Give three tips for staying healthy!", "output": "x"},
                                                 {"instruction": "比较猫和狗作为宠物的优缺点", "output": "x"}])
    extra = jsonl(tmp_path / "en.jsonl", [rec(t, output="A long enough answer for the rules.") for t in EN_TASKS])
    _, kept, rejected = run_filter(tmp_path, [*mixed, extra], against=(bench,), no_rules=("wrong-language",))
    contaminated = {r["instruction"]: r for r in rejected if r["reason"] == "contaminated"}
    assert set(contaminated) == {"Give three tips for staying healthy.", "比较猫和狗作为宠物的优缺点。"}
    assert contaminated["Give three tips for staying healthy."]["duplicate_of"] == "test_set.jsonl:1"
    assert contaminated["Give three tips for staying healthy."]["score"] == 1.0


def test_minhash_mode_and_parquet_output(tmp_path):
    rows = [rec(t) for t in ZH_TASKS] + [rec(t[:-1] + "吧。") for t in ZH_TASKS]
    path = jsonl(tmp_path / "x.jsonl", rows)
    _, exact_kept, _ = run_filter(tmp_path, [path], rules=("near-duplicate",))
    report, kept, rejected = run_filter(tmp_path, [path], rules=("near-duplicate",), dedup="minhash", format="parquet")
    assert (tmp_path / "out" / "kept.parquet").exists()
    assert len(kept) + len(rejected) == len(rows)
    # Precision 1.0: minhash never drops what exact mode keeps... on this set it finds them all.
    assert {r["id"] for r in kept} == {r["id"] for r in exact_kept}


def test_user_rule_file(tmp_path, mixed):
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\nname = "no-autumn"\nfield = "output"\nregex = "秋风"\n', encoding="utf-8")
    _, _, rejected = run_filter(tmp_path, mixed, rule_file=rules, no_rules=("exact-duplicate", "near-duplicate"))
    hit = [r for r in rejected if r["reason"] == "no-autumn"]
    assert [r["id"] for r in hit] == ["sg-1"] and "秋风" in hit[0]["detail"]


def test_wrong_language_uses_the_data_language(tmp_path):
    path = jsonl(tmp_path / "x.jsonl", [rec(t) for t in ZH_TASKS] + [rec(EN_TASKS[0])])
    report, _, rejected = run_filter(tmp_path, [path], rules=("wrong-language",))
    assert report.lang == "zh" and report.lang_inferred
    assert [r["instruction"] for r in rejected] == [EN_TASKS[0]]
    report, _, rejected = run_filter(tmp_path, [path], rules=("wrong-language",), lang="en")
    assert len(rejected) == len(ZH_TASKS)


def test_every_stage_has_a_progress_bar(tmp_path, mixed):
    """On a terminal each stage, read and write included, draws a bar that ends at its record count."""
    from rich.console import Console

    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=100, color_system=None)
    settings = FilterSettings(inputs=tuple(mixed), out=tmp_path / "out")
    report = Filtering(settings, console=console).run()
    text = screen.getvalue()
    for stage in ("read", "rules", "exact-duplicate", "near-duplicate", "write"):
        assert re.search(rf"{stage}\s.*\d+/\d+", text), stage
    assert re.search(rf"read\s.*{report.total}/{report.total}", text)
    assert re.search(rf"write\s.*{report.total}/{report.total}", text)


# ---- the command line ----------------------------------------------------------------------------


@pytest.fixture
def cli(monkeypatch, capsys):
    from selfinstruct.cli import main

    def call(*args):
        monkeypatch.setattr(sys, "argv", ["selfinstruct", "filter", *map(str, args)])
        try:
            main()
        except SystemExit as exc:
            return exc.code or 0, capsys.readouterr()
        return 0, capsys.readouterr()

    return call


def test_cli_prints_a_summary(cli, tmp_path, mixed):
    code, out = cli(*mixed, "--out", tmp_path / "o")
    assert code == 0
    assert "selfinstruct filter" in out.err and "near-duplicate" in out.err and "kept" in out.err
    assert (tmp_path / "o" / "kept.jsonl").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["missing.jsonl"], "error: missing.jsonl: no such file"),
        (["{a}", "--rules", "nope"], "error: unknown rule 'nope'"),
        (["{a}", "--similarity", "1.5"], "error: --similarity 1.5 is outside (0, 1]"),
        (["{a}", "--dedup", "simhash"], "error: --dedup 'simhash'"),
        (["{a}", "--format", "csv"], "error: --format 'csv'"),
        (["{a}", "--rule-file", "{bad}"], "rule 'x': bad regex"),
        (["{a}", "--rule-file", "{badfield}"], "rule 'y': no field 'answer' in the input"),
        (["{a}", "--field", "instruction+context"], "error: --field 'instruction+context' is not supported (hint: use one of topic, instruction+input, instruction)"),
        (["{a}", "--field", "output"], "error: --field 'output' is not supported (hint: use one of topic, instruction+input, instruction)"),
        (["{a}", "--field", "instruction+output"], "error: --field 'instruction+output' is not supported"),
        (["{a}", "--lang", "xx"], "error: --lang 'xx' is not supported (hint: use one of zh, zh-Hant, en, ja, ko"),
        (["{a}", "--rules", "contaminated"], "error: the contaminated rule needs --against"),
        (["{broken}"], "broken.jsonl:2: invalid JSON"),
    ],
)
def test_cli_errors_are_one_line_exit_2(cli, tmp_path, args, message):
    paths = {
        "a": jsonl(tmp_path / "a.jsonl", [rec(t) for t in ZH_TASKS]),
        "bad": tmp_path / "bad.toml",
        "badfield": tmp_path / "badfield.toml",
        "broken": tmp_path / "broken.jsonl",
    }
    paths["bad"].write_text('[[rule]]\nname = "x"\nregex = "(["\n', encoding="utf-8")
    paths["badfield"].write_text('[[rule]]\nname = "y"\nfield = "answer"\nmin = 3\n', encoding="utf-8")
    paths["broken"].write_text('{"instruction": "a"}\n{"instruction":\n', encoding="utf-8")
    argv = [a.format(**{k: str(v) for k, v in paths.items()}) for a in args]
    code, out = cli(*argv, "--out", tmp_path / "o")
    assert code == 2
    assert message in out.err
    assert out.err.count("\n") == 1 and "Traceback" not in out.err


@pytest.mark.parametrize("name", ["BELLE__zh_seed_tasks.json", "stanford_alpaca__seed_tasks.jsonl"])
def test_seed_task_files_are_not_all_empty(tmp_path, name):
    """Self-Instruct/BELLE seed files keep the answer in instances[]: filter reads it there, not as empty."""
    report, kept, rejected = run_filter(tmp_path, [fixture_path(name)], rules=("empty",))
    assert report.total == 175 and not rejected
    assert all(r["output"].strip() and r["id"].startswith("seed_task_") for r in kept)


def snapshot(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def run_dir(tmp_path):
    """A generate run directory: manifest, kept records, 30 rejected lines and the request ledger."""
    run = tmp_path / "r1"
    run.mkdir()
    (run / "manifest.json").write_text('{"run_id": "r1", "records": 3}\n', encoding="utf-8")
    jsonl(run / "records.jsonl", [rec(t, id=f"r000001.{k}") for k, t in enumerate(ZH_TASKS[:3])])
    jsonl(run / "rejected.jsonl", [{**rec(f"第{k}条被拒绝的指令。"), "reason": "too-short"} for k in range(30)])
    jsonl(run / "requests.jsonl", [{"request": k, "status": "ok"} for k in range(5)])
    return run


@pytest.mark.parametrize(
    "args,message",
    [
        (["{r1}", "--out", "{r1}"], "would overwrite the input"),                 # the run itself
        (["{a}", "--out", "{r1}"], "is a run directory (it has records.jsonl)"),  # another run
        (["{r1}/records.jsonl", "--out", "{r1}"], "is a run directory"),
        (["{a}", "--out", "{a}"], "would overwrite the input"),                   # the input file itself
        (["{data}/rejected.jsonl", "--out", "{data}"], "would overwrite the input"),  # an input named like an output
        (["{a}", "--against", "{data}/filter_report.json", "--out", "{data}"], "would overwrite the input"),
    ],
)
def test_out_never_overwrites_a_run_or_an_input(cli, tmp_path, run_dir, args, message):
    data = tmp_path / "data"
    data.mkdir()
    a = jsonl(data / "a.jsonl", [rec(t) for t in ZH_TASKS])
    jsonl(data / "rejected.jsonl", [rec(EN_TASKS[0])])
    (data / "filter_report.json").write_text(json.dumps([rec(EN_TASKS[1])]), encoding="utf-8")
    before = snapshot(tmp_path)
    argv = [x.format(r1=run_dir, a=a, data=data, tmp=tmp_path) for x in args]
    code, out = cli(*argv)
    assert code == 2
    assert message in out.err and "--out" in out.err
    assert out.err.count("\n") == 1 and "Traceback" not in out.err
    # Byte for byte, and nothing added: the refusal comes before any write.
    assert snapshot(tmp_path) == before


def test_switching_format_leaves_one_kept_file(cli, tmp_path):
    """A parquet run after a jsonl run into the same --out: export must not find the stale kept.jsonl."""
    data = jsonl(tmp_path / "a.jsonl", [rec(t) for t in ZH_TASKS])
    assert cli(str(data), "--out", str(tmp_path / "f"))[0] == 0
    assert cli(str(data), "--out", str(tmp_path / "f"), "--format", "parquet")[0] == 0
    assert sorted(p.name for p in (tmp_path / "f").glob("kept.*")) == ["kept.parquet"]


def test_out_beside_or_above_the_inputs_is_fine(cli, tmp_path, run_dir):
    """Only a real collision is refused: --out . next to data/a.jsonl overwrites nothing."""
    data = tmp_path / "data"
    data.mkdir()
    a = jsonl(data / "a.jsonl", [rec(t) for t in ZH_TASKS])
    (data / "manifest.json").write_text("{}", encoding="utf-8")  # some other tool's: not a run
    before = a.read_bytes()
    code, out = cli(str(a), "--out", str(data))
    assert code == 0, out.err
    code, out = cli(str(a), str(run_dir), "--out", str(tmp_path))
    assert code == 0, out.err
    assert a.read_bytes() == before and (data / "kept.jsonl").exists() and (tmp_path / "kept.jsonl").exists()


def test_out_may_be_an_earlier_filter_output(cli, tmp_path, run_dir):
    """filter's own rejected.jsonl does not make a run directory: filtering again into the same --out works."""
    out = tmp_path / "filtered"
    assert cli(run_dir, "--out", out)[0] == 0
    assert cli(run_dir, "--out", out, "--quiet")[0] == 0
    assert {p.name for p in out.iterdir()} == {"kept.jsonl", "rejected.jsonl", "filter_report.json"}


def test_fixture_sample_equals_brute_force(tmp_path):
    """A slice of the real 52K fixture: filter's near-duplicate verdicts are the all-pairs greedy answer."""
    rows = json.loads(gzip.decompress(fixture_path("alpaca-chinese-dataset__alpaca_chinese_part_0-52.json.gz").read_bytes()))[:1500]
    path = jsonl(tmp_path / "slice.jsonl", rows)
    _, kept, rejected = run_filter(tmp_path, [path], rules=("near-duplicate",))
    texts = [topic_text(r["instruction"], r["input"]) for r in rows]  # the default --field
    keep = []
    for j, t in enumerate(texts):
        if not any(rouge_l(texts[i], t) > 0.7 + 1e-9 for i in keep):  # above the threshold, as filter decides
            keep.append(j)
    assert [r["id"] for r in kept] == [f"slice.jsonl:{j + 1}" for j in keep]


def test_pii_dropped_by_default_or_redacted_and_kept(tmp_path):
    path = jsonl(tmp_path / "x.jsonl", [
        rec("给客户回一封邮件，确认订单已经发货。", input="客户邮箱 li.ming@qq.com，电话 13912345678", output="您好，您的订单已经发货，请留意查收。"),
        rec("解释一下光合作用的过程和意义。", output="光合作用把光能变成化学能，是地球上生命的基础。"),
    ])
    report, kept, rejected = run_filter(tmp_path, [path])
    assert [r["reason"] for r in rejected] == ["pii"] and len(kept) == 1
    assert "13912345678" not in rejected[0]["detail"]  # the detail names the kind, not the data
    report, kept, rejected = run_filter(tmp_path, [path], pii="redact")
    assert not rejected and len(kept) == 2
    assert kept[0]["input"] == "客户邮箱 [EMAIL]，电话 [PHONE]"
    assert report.pii_redacted == 1
    saved = json.loads((tmp_path / "out" / "filter_report.json").read_text(encoding="utf-8"))
    assert saved["pii"] == {"mode": "redact", "records_redacted": 1}
    with pytest.raises(ConfigError, match="--pii"):
        run_filter(tmp_path, [path], pii="mask")
