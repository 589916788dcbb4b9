"""Templates: shipped files render to chat messages; mistakes are one-line errors with file and line."""

from __future__ import annotations

import pytest

from selfinstruct.errors import InputError
from selfinstruct.prompts import load_template, prompts_dir, split_messages

EXAMPLES = [{"instruction": "写一首诗", "input": "", "output": "春眠不觉晓"}]


@pytest.mark.parametrize("lang, marker", [("zh", "简体中文"), ("zh-Hant", "繁體中文"), ("en", "English")])
def test_shipped_templates_render(lang, marker):
    tpl = load_template(f"generate_{lang}.jinja")
    messages = tpl.render(examples=EXAMPLES, num_tasks=7, start_index=1, json_mode=False)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert marker in messages[1]["content"] and "7" in messages[1]["content"]
    assert "写一首诗" in messages[1]["content"]
    assert len(tpl.sha256) == 64


def test_json_mode_asks_for_json():
    tpl = load_template("generate_zh.jinja")
    text = tpl.render(examples=EXAMPLES, num_tasks=3, start_index=1, json_mode=True)[1]["content"]
    assert '"tasks"' in text and "###" not in text


def test_undefined_variable_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jinja"
    path.write_text("<<user>>\nline one\n{{ nonexistent }}\n", encoding="utf-8")
    with pytest.raises(InputError) as err:
        load_template(path).render(examples=[], num_tasks=1, start_index=1, json_mode=False)
    assert f"{path}:3" in str(err.value) and "nonexistent" in str(err.value)


def test_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jinja"
    path.write_text("ok\n{% for x in %}\n", encoding="utf-8")
    with pytest.raises(InputError, match=f"{path}:2: template syntax error"):
        load_template(path)


def test_messages_without_markers_are_one_user_message():
    assert split_messages("hello") == [{"role": "user", "content": "hello"}]


def test_shipped_directory_exists():
    assert (prompts_dir() / "generate_zh.jinja").exists()
