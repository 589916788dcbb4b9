"""Every command's --help: an example, switches without a type, defaults written one way, --no-rule's names, --seeds' default."""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from selfinstruct.cli import EVOL_CHECK_NAMES, RULE_NAMES, app
from selfinstruct.config import GenerateConfig
from selfinstruct.evolution import REASONS as EVOL_CHECKS
from selfinstruct.rules import REASONS


def commands() -> list[tuple[str, ...]]:
    """Every command's words, subcommands included (seeds check)."""
    found = []
    for name, command in typer.main.get_command(app).commands.items():
        subs = getattr(command, "commands", None)
        found.extend((name, sub) for sub in subs) if subs else found.append((name,))
    return sorted(found)


def render(words: tuple[str, ...]) -> str:
    """The help as a user sees it, one option a line (a wide terminal: nothing folds)."""
    result = CliRunner().invoke(app, [*words, "--help"], env={"COLUMNS": "2000", "TERMINAL_WIDTH": "2000"})
    assert result.exit_code == 0, result.output
    return result.output


def test_every_command_is_checked():
    assert {("generate",), ("evolve",), ("filter",), ("doctor",), ("seeds", "check")} <= set(commands())


@pytest.mark.parametrize("words", commands(), ids=" ".join)
def test_help_has_an_example_no_bool_types_and_one_way_of_writing_defaults(words):
    text = render(words)
    assert f"Example: selfinstruct {' '.join(words)} " in text
    assert "<bool>" not in text  # a switch takes no value
    assert "[default:" not in text  # typer's own form, beside the written one
    loose = [m.group(0) for m in re.finditer(r".{0,30}\bdefault\b(?!: ).{0,20}", text, re.IGNORECASE)
             if "by default" not in m.group(0)]
    assert not loose, loose  # every default reads "(default: X)"


@pytest.mark.parametrize("command", ["generate", "evolve", "filter", "respond", "textbook", "chat"])
def test_no_rule_lists_the_rule_names(command):
    line = next(line for line in render((command,)).splitlines() if "--no-rule" in line)
    for name in (*REASONS, "near-duplicate", *(EVOL_CHECKS if command == "evolve" else ())):
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", line), (name, line)


def test_the_written_rule_names_are_the_rules():
    assert RULE_NAMES.split(", ") == [*REASONS, "near-duplicate"]
    assert EVOL_CHECK_NAMES.split(", ") == list(EVOL_CHECKS)


def test_written_defaults_are_the_config_defaults():
    text = render(("generate",))
    defaults = GenerateConfig()
    for flag, value in [("--seeds", defaults.seeds), ("--n", defaults.n), ("--per-request", defaults.per_request),
                        ("--num-examples", defaults.num_examples), ("--retries", defaults.retries),
                        ("--max-tokens", defaults.max_tokens), ("--max-concurrency", defaults.concurrency),
                        ("--model", defaults.model), ("--similarity", defaults.similarity)]:
        line = next(line for line in text.splitlines() if re.search(rf"{flag}\s", line))
        assert f"(default: {value})" in line, line
    assert defaults.adaptive_concurrency and "(default: auto)" in next(l for l in text.splitlines() if "--concurrency " in l)
