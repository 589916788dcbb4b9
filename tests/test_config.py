"""Config resolution: defaults < config file < environment < flags; bad values are one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from selfinstruct.config import GenerateConfig, resolve
from selfinstruct.errors import ConfigError


def test_precedence(tmp_path):
    cfg_file = tmp_path / "si.toml"
    cfg_file.write_text('model = "from-file"\nn = 10\nconcurrency = 3\n[generate]\ntemperature = 0.5\n', encoding="utf-8")
    env = {"SELFINSTRUCT_MODEL": "from-env", "SELFINSTRUCT_N": "20", "SELFINSTRUCT_JSON_MODE": "true"}
    cfg = resolve({"model": "from-flag", "n": None}, cfg_file, env)
    assert cfg.model == "from-flag"  # flag beats env
    assert cfg.n == 20  # env beats file
    assert cfg.concurrency == 3 and cfg.temperature == 0.5  # file beats default
    assert cfg.json_mode is True
    assert cfg.per_request == GenerateConfig().per_request  # default


def test_config_is_frozen():
    cfg = resolve({}, None, {})
    with pytest.raises(Exception):
        cfg.n = 5  # type: ignore[misc]


def test_unknown_key_in_file_is_an_error(tmp_path):
    cfg_file = tmp_path / "si.toml"
    cfg_file.write_text("modle = 'typo'\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"si.toml: unknown key `modle`"):
        resolve({}, cfg_file, {})


def test_wrong_type_names_its_source(tmp_path):
    with pytest.raises(ConfigError, match="SELFINSTRUCT_N: `n` must be int"):
        resolve({}, None, {"SELFINSTRUCT_N": "many"})
    cfg_file = tmp_path / "si.toml"
    cfg_file.write_text("concurrency = 'lots'\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="`concurrency` must be int"):
        resolve({}, cfg_file, {})


@pytest.mark.parametrize(
    "flags, flag",
    [({"n": 0}, "--n"), ({"similarity": 1.5}, "--similarity"), ({"concurrency": 0}, "--concurrency"), ({"lang": "fr"}, "--lang"), ({"max_cost": -1.0}, "--max-cost")],
)
def test_invalid_values_name_the_flag(flags, flag):
    with pytest.raises(ConfigError, match=flag):
        resolve(flags, None, {})


def test_paths_from_env_become_paths():
    cfg = resolve({}, None, {"SELFINSTRUCT_SEEDS": "seeds/en.jsonl"})
    assert cfg.seeds == Path("seeds/en.jsonl")
