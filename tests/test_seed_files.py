"""The project's own seed files: size, spread, script, originality, and that generate accepts them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from rapidfuzz import process
from rapidfuzz.distance import Indel

from conftest import REPO, fixture_path
from selfinstruct.rules import RuleSettings, check, script_of
from selfinstruct.seed_profile import profile
from selfinstruct.seeds import read_seeds
from selfinstruct.similarity import Vocabulary

SEED_FILES = {"zh.jsonl": 175, "zh-Hant.jsonl": 100, "en.jsonl": 100}
FIXTURE_SEEDS = ("BELLE__zh_seed_tasks.json", "stanford_alpaca__seed_tasks.jsonl")


@pytest.mark.parametrize("name, minimum", SEED_FILES.items())
def test_seed_file_passes_check(name, minimum):
    seeds = read_seeds(REPO / "seeds" / name)
    prof = profile(seeds)
    assert prof.problems == []
    assert prof.count >= minimum
    assert prof.near_pairs == []
    assert len(prof.families) >= 15
    assert 0.25 <= prof.with_input_share <= 0.45
    assert 0.10 <= prof.classification_share <= 0.20
    assert all(1 <= len(t.instances) <= 3 for t in seeds.tasks)
    assert all(t.name and "-" in t.name for t in seeds.tasks)


@pytest.mark.parametrize("name", ["zh.jsonl", "zh-Hant.jsonl"])
def test_chinese_instructions_are_mainly_han(name):
    for task in read_seeds(REPO / "seeds" / name).tasks:
        assert script_of(task.instruction) == "zh", task.id


def test_zh_hant_is_traditional_and_zh_is_simplified():
    opencc = pytest.importorskip("opencc")
    # s2tw, not s2t: plain s2t rewrites standard Taiwan forms into archaic ones (吃→喫).
    to_trad, to_simp = opencc.OpenCC("s2tw"), opencc.OpenCC("t2s")
    hant = read_seeds(REPO / "seeds" / "zh-Hant.jsonl").tasks
    texts = [t.instruction + "".join(i.input + i.output for i in t.instances) for t in hant]
    unchanged = sum(to_trad.convert(t) == t for t in texts)
    assert unchanged / len(texts) >= 0.95  # nothing left to convert to Traditional
    assert sum(to_simp.convert(t) != t for t in texts) / len(texts) >= 0.9  # and it really is Traditional
    hans = read_seeds(REPO / "seeds" / "zh.jsonl").tasks
    assert sum(to_simp.convert(t.instruction) == t.instruction for t in hans) / len(hans) >= 0.95


@pytest.mark.parametrize("name", SEED_FILES)
def test_no_seed_is_a_near_copy_of_a_fixture_seed(name):
    ours = [t.instruction for t in read_seeds(REPO / "seeds" / name).tasks]
    theirs = [t.instruction for f in FIXTURE_SEEDS for t in read_seeds(fixture_path(f)).tasks]
    vocab = Vocabulary()
    scores = process.cdist([vocab.encode(t) for t in ours], [vocab.encode(t) for t in theirs], scorer=Indel.normalized_similarity, workers=-1)
    assert float(scores.max()) < 0.7


def test_seeds_check_command_reports_and_fails_on_near_copies(tmp_path):
    good = subprocess.run([sys.executable, "-m", "selfinstruct", "seeds", "check", str(REPO / "seeds" / "zh.jsonl"), "--json"], capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["count"] >= 175
    bad = tmp_path / "dup.jsonl"
    rows = [{"id": "a", "instruction": "请写一首关于春天的诗", "output": "x"}, {"id": "b", "instruction": "请写一首关于秋天的诗", "output": "y"}]
    bad.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "selfinstruct", "seeds", "check", str(bad)], capture_output=True, text=True)
    assert done.returncode == 1
    assert f"{bad}:2: instruction b is a near-copy of a" in done.stdout
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "x", "output": "y"}\n{bad\n', encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "selfinstruct", "seeds", "check", str(broken)], capture_output=True, text=True)
    assert done.returncode == 2 and f"{broken}:2: invalid JSON" in done.stderr


@pytest.mark.parametrize(
    "source",
    ["seeds/zh.jsonl", "seeds/zh-Hant.jsonl", "seeds/en.jsonl", "fixture:BELLE__zh_seed_tasks.json", "fixture:stanford_alpaca__seed_tasks.jsonl"],
)
def test_generate_accepts_each_seed_file_unchanged(tmp_path, source):
    from fakes.openai_server import FakeTeacher

    path = fixture_path(source.split(":", 1)[1]) if source.startswith("fixture:") else REPO / source
    out = tmp_path / "run"
    with FakeTeacher(seed=1) as fake:
        done = subprocess.run(
            [sys.executable, "-m", "selfinstruct", "generate", "--seeds", str(path), "--n", "20", "--base-url", fake.base_url,
             "--model", "m", "--out", str(out), "--quiet"],
            capture_output=True, text=True, timeout=120,
        )
        prompts = fake.stats["requests_received"]
    assert done.returncode == 0, done.stderr
    assert prompts >= 2
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["counts"]["kept"] == 20
    expected_lang = {"seeds/zh-Hant.jsonl": "zh-Hant", "seeds/en.jsonl": "en", "fixture:stanford_alpaca__seed_tasks.jsonl": "en"}.get(source, "zh")
    assert manifest["config"]["lang"] == expected_lang
    ids = {t.id for t in read_seeds(path).tasks}
    first = json.loads((out / "records.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert set(first["meta"]["seed_ids"]) <= ids


@pytest.mark.parametrize("name, lang", [("zh.jsonl", "zh"), ("zh-Hant.jsonl", "zh-Hant"), ("en.jsonl", "en")])
def test_every_seed_passes_the_generation_rules(name, lang):
    # A seed that generation would reject (an image task, a refusal, too long) teaches the teacher to make them.
    settings = RuleSettings(lang=lang)
    broken = [(t.id, verdict) for t in read_seeds(REPO / "seeds" / name).tasks for i in t.instances
              if (verdict := check(t.instruction, i.input, i.output, settings)) is not None]
    assert broken == []


def test_zh_hant_is_written_for_taiwan_not_converted_from_zh():
    opencc = pytest.importorskip("opencc")
    to_simp = opencc.OpenCC("t2s")
    hant = [to_simp.convert(t.instruction) for t in read_seeds(REPO / "seeds" / "zh-Hant.jsonl").tasks]
    hans = [t.instruction for t in read_seeds(REPO / "seeds" / "zh.jsonl").tasks]
    vocab = Vocabulary()
    scores = process.cdist([vocab.encode(t) for t in hant], [vocab.encode(t) for t in hans], scorer=Indel.normalized_similarity, workers=-1)
    assert float(scores.max()) < 0.7
