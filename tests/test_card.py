"""The dataset card: every field from the manifest, no secrets or private URLs, and merging into an existing card."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from fakes.sample_run import EVOLVE_SHA, SAMPLE_CARD, SEEDS_SHA, TEMPLATE_SHA, make_run, sample_card
from selfinstruct.card import (BEGIN, END, file_name, hub_card, license_metadata, local_paths_to_names, merge, redact, size_category,
                               split_card)
from selfinstruct.errors import PublishError
from selfinstruct.export import build

TOKEN = "hf_cardTestTokenLmn456Opq"
COMMAND = ("selfinstruct generate --seeds seeds/zh_seed_tasks.jsonl --n 12 --model qwen2.5-72b-instruct "
           "--base-url http://10.1.2.3:8000/v1?key=sk-abcdefghijklmnop --api-key-env MY_KEY --hf-token " + TOKEN)


@pytest.fixture
def run(tmp_path):
    return make_run(tmp_path / "run", command=COMMAND)


def front(card: str) -> dict:
    data, _ = split_card(card)
    return data


def test_card_has_every_field(run):
    b = build(run, "messages", test_size=0.25)
    card = hub_card(b, None, "alice/zh-instruct", secrets=[TOKEN], private=True)
    meta = front(card)
    assert meta["language"] == ["zh"]
    assert meta["license"] == "apache-2.0"
    assert meta["task_categories"] == ["text-generation"]
    assert meta["tags"] == ["synthetic", "self-instruct", "evol-instruct"]
    assert meta["size_categories"] == ["n<1K"]
    assert meta["pretty_name"] == "zh-instruct"
    text = card.split("---\n", 2)[2]
    for needle in [
        "`gpt-4o-mini` via the OpenAI API",  # teacher model and endpoint kind
        "`zh_seed_tasks.jsonl`, 175 tasks", SEEDS_SHA, "| Seed licence | `Apache-2.0` |",
        f"`generate_zh.jinja`, sha256 `{TEMPLATE_SHA}`", f"`evolve_zh.jinja`, sha256 `{EVOLVE_SHA}`",
        "temperature 1.0, top_p 1.0, max_tokens 3072, tasks per request 10, seed examples per prompt 3",
        "| Evol-Instruct | 1 round; deepen ×2 kept, concretize ×1 kept |",
        "| `blacklist` |", "| `near-duplicate` | ROUGE-L F1 above 0.7", "| `wrong-language` |", "**total** | | **3**",
        "| Near-duplicate threshold | ROUGE-L F1 above 0.7",
        "| generate | 4 | 4,000 | 1,700 | $0.0016 |", "| evolve | 1 | 1,200 | 400 | $0.0004 |",
        "**5** | **5,200** | **2,100** | **$0.0020**",
        "| selfinstruct version | 0.1.0 |", "selfinstruct generate --seeds seeds/zh_seed_tasks.jsonl --n 12 --model qwen2.5-72b-instruct",
        "## Examples", "```json", 'ds = load_dataset("alice/zh-instruct")', "private",
        "12 rows (train 9, test 3), `messages` format",
    ]:
        assert needle in text, needle
    for row in (b.splits["train"][:3]):
        assert json.dumps(row["messages"][0]["content"], ensure_ascii=False)[1:-1][:30] in text
    assert text.count("```json") == 3
    examples = [json.loads(block.split("```")[0]) for block in text.split("```json\n")[1:]]
    assert examples == b.splits["train"][:3]  # short rows: not truncated
    filters = [line for line in text.splitlines() if line.startswith("| `")]
    assert [line.split("`")[1] for line in filters][:11] == ["blacklist", "empty", "refusal", "too-long", "too-short", "wrong-language", "near-duplicate",
                                                             "no-gain", "prompt-leak", "refusal-response", "stopword-response"]


def test_every_evol_check_gets_a_row_even_if_it_never_fired(run):
    card = hub_card(build(run, "alpaca"), None, "alice/x")
    assert "| `no-gain` | Evol-Instruct: the rewrite is identical or nearly (ROUGE-L ≥ 0.9) to its parent, or judged equal | 1 |" in card
    for check, what in (("prompt-leak", "the rewrite still contains the rewriting prompt's markers"),
                        ("refusal-response", "the answer to the rewrite is a short refusal"),
                        ("stopword-response", "the answer to the rewrite is only punctuation and stop words")):
        assert f"| `{check}` | Evol-Instruct: {what} | 0 |" in card, check
    assert card.count("| `near-duplicate` |") == 1  # both a rule of generation and an evol check: one row


def _sizes_blanked(card: str) -> str:
    # Parquet and Arrow byte sizes move with pyarrow/datasets versions; everything else must match exactly.
    return re.sub(r"^(\s*(?:num_bytes|download_size|dataset_size)): \d+$", r"\1: N", card, flags=re.MULTILINE)


def test_docs_sample_card_is_what_export_writes_for_the_sample_run(tmp_path):
    written = sample_card(tmp_path)
    assert "download_size: N" in _sizes_blanked(written)
    assert _sizes_blanked(SAMPLE_CARD.read_text(encoding="utf-8")) == _sizes_blanked(written), \
        "docs/sample-card.md is stale: regenerate it with `python tests/fakes/sample_run.py`"


def test_card_never_shows_keys_tokens_or_private_urls(run):
    card = hub_card(build(run, "alpaca"), None, "alice/x", secrets=[TOKEN])
    for secret in (TOKEN, "sk-abcdefghijklmnop", "10.1.2.3", "http://", "?key="):
        assert secret not in card, secret
    assert "--base-url <endpoint>" in card and "--hf-token ***" in card and "--api-key-env MY_KEY" in card


def test_card_shows_seed_and_other_local_files_by_name_only(tmp_path):
    from selfinstruct.export import export_run

    seeds = tmp_path / "private data" / "zh_seed_tasks.jsonl"
    command = f"selfinstruct generate --seeds '{seeds}' --out={tmp_path}/runs/zh --template ~/prompts/mine.jinja --n 12"
    run = make_run(tmp_path / "run", command=command, seeds_path=str(seeds))
    export_run(run, tmp_path / "exports" / "zh", "alpaca")
    cards = [(tmp_path / "exports" / "zh" / "README.md").read_text(encoding="utf-8"), hub_card(build(run, "alpaca"), None, "alice/x")]
    for card in cards:
        assert str(tmp_path) not in card and "private data" not in card and "~/" not in card
        assert "| Seed tasks | `zh_seed_tasks.jsonl`, 175 tasks" in card
        assert "selfinstruct generate --seeds zh_seed_tasks.jsonl --out=zh --template mine.jinja --n 12" in card
    assert 'load_dataset("zh")  # this folder' in cards[0]


def test_local_paths_to_names_keeps_relative_paths_and_untouched_commands():
    plain = "selfinstruct generate --seeds seeds/zh.jsonl --stop '###'  --n 3"
    assert local_paths_to_names(plain) == plain  # nothing to cut: the command keeps its exact spelling
    assert local_paths_to_names(r"x --seeds 'C:\Users\al\s.json' --out=/srv/runs/a b.json") == "x --seeds s.json --out=a b.json"
    assert file_name("/home/al/seeds.jsonl") == file_name(r"D:\data\seeds.jsonl") == "seeds.jsonl"


def test_redact_masks_flags_keys_urls_and_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    text = redact(f"x --api-key=abc123 --base-url https://user:pw@llm.internal:9000/v1 {tmp_path}/home/seeds.jsonl hf_abcdefghijk", ["abc123"])
    assert text == "x --api-key=*** --base-url <endpoint> ~/seeds.jsonl ***"


def test_no_evol_no_tag_and_licence_sources(tmp_path):
    run = make_run(tmp_path / "run", n=3, license=None)  # records 0..2 carry no evol steps
    manifest = json.loads((run / "manifest.json").read_text(encoding="utf-8"))
    del manifest["evol"]
    manifest["config"]["evol_rounds"] = 0
    (run / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False), encoding="utf-8")
    b = build(run, "alpaca")
    meta = front(hub_card(b, None, "alice/x"))
    assert "evol-instruct" not in meta["tags"] and meta["license"] == "unknown"
    assert "| Evol-Instruct | not used |" in hub_card(b, None, "alice/x")
    assert front(hub_card(b, None, "alice/x", license="CC-BY-NC-4.0"))["license"] == "cc-by-nc-4.0"
    existing = "---\nlicense: mit\n---\n"
    assert front(hub_card(b, existing, "alice/x"))["license"] == "mit"  # the user's licence is kept when seeds declare none


def test_license_and_size_helpers():
    assert license_metadata("Apache-2.0") == {"license": "apache-2.0"}
    assert license_metadata(None) == {"license": "unknown"}
    assert license_metadata("Research use only") == {"license": "other", "license_name": "research-use-only"}
    assert [size_category(n) for n in (0, 999, 1000, 9999, 10_000, 150_000, 2_000_000)] == [
        "n<1K", "n<1K", "1K<n<10K", "1K<n<10K", "10K<n<100K", "100K<n<1M", "1M<n<10M"]


def test_merge_keeps_user_text_and_yaml_and_replaces_only_our_block():
    existing = ("---\nlicense: mit\ntags:\n- chinese\nmy_key: 1\nconfigs:\n- config_name: default\n  data_files: data/*\n---\n\n"
                "# 标题\n\n用户写的介绍。\n\n" + BEGIN + "\nold generated text\n" + END + "\n\n## 致谢\n\n感谢大家。\n")
    merged = merge(existing, {"license": "apache-2.0", "tags": ["chinese", "synthetic"]}, BEGIN + "\nnew block\n" + END)
    meta, text = split_card(merged)
    assert meta["my_key"] == 1 and meta["license"] == "apache-2.0" and meta["tags"] == ["chinese", "synthetic"]
    assert list(meta)[-1] == "configs"  # datasets' keys stay last
    assert "old generated text" not in text and text.count("new block") == 1
    assert text.index("用户写的介绍。") < text.index("new block") < text.index("感谢大家。")
    assert merge(merged, {"license": "apache-2.0", "tags": ["chinese", "synthetic"]}, BEGIN + "\nnew block\n" + END) == merged


def test_merge_into_card_without_front_matter_or_block():
    merged = merge("# Hand-written\n\nNotes.\n", {"license": "mit"}, BEGIN + "\nblock\n" + END)
    assert merged.startswith("---\nlicense: mit\n---\n") and merged.index("Notes.") < merged.index("block")
    assert yaml.safe_load(merged.split("---\n")[1]) == {"license": "mit"}


def test_invalid_existing_yaml_is_a_publish_error():
    with pytest.raises(PublishError, match="invalid YAML"):
        split_card("---\nlicense: [mit\n---\ntext\n")


def test_card_degrades_with_an_empty_manifest(tmp_path):
    run = make_run(tmp_path / "run", manifest=False)
    (run / "manifest.json").write_text('{"status": "running"}', encoding="utf-8")
    card = hub_card(build(run, "alpaca"), None, "alice/x")
    assert front(card)["license"] == "unknown" and "not recorded" in card and "status running" in card
    assert "Simplified Chinese" in card  # language inferred from the text itself


def test_failed_requests_are_listed_but_not_counted_as_candidates(tmp_path):
    run = make_run(tmp_path / "run")
    manifest = json.loads((run / "manifest.json").read_text(encoding="utf-8"))
    manifest["counts"]["rejected"]["request-failed"] = 3
    (run / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False), encoding="utf-8")
    card = hub_card(build(run, "alpaca"), None, "alice/x")
    assert "| `request-failed` | the teacher request failed after retries | 3 |" in card
    assert "12 of 15 candidates kept (80.0%)." in card and "**total** | | **6**" in card
