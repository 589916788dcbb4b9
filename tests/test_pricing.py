"""Prices, endpoint kinds and the offline token estimate."""

from __future__ import annotations

import pytest

from selfinstruct.errors import ConfigError
from selfinstruct.pricing import Price, endpoint_kind, estimate_tokens, load_price_table, resolve_price


def test_endpoint_kinds():
    assert endpoint_kind(None) == "openai"
    assert endpoint_kind("https://api.openai.com/v1") == "openai"
    assert endpoint_kind("http://localhost:8000/v1") == "local"
    assert endpoint_kind("http://127.0.0.1:11434/v1") == "local"
    assert endpoint_kind("http://192.168.1.5:8000/v1") == "local"
    assert endpoint_kind("https://api.deepseek.com/v1") == "hosted"


def test_price_resolution():
    assert resolve_price("gpt-4o-mini", "openai") == Price(0.15, 0.60, "prices.toml:gpt-4o-mini")
    # A dated snapshot matches its family, the longest prefix first.
    assert resolve_price("gpt-4o-mini-2024-07-18", "openai").source == "prices.toml:gpt-4o-mini"
    assert resolve_price("gpt-4o-2024-08-06", "openai").source == "prices.toml:gpt-4o"
    assert resolve_price("qwen2.5:7b", "local") == Price(0.0, 0.0, "local server")
    assert resolve_price("my-private-model", "hosted") is None
    assert resolve_price("my-private-model", "hosted", 1.0, 2.0) == Price(1.0, 2.0, "flags")


def test_cost_is_tokens_times_price():
    price = Price(0.15, 0.60, "t")
    assert price.usd(1_000_000, 1_000_000) == 0.75
    assert price.usd(12_345, 67_890) == round((12_345 * 0.15 + 67_890 * 0.60) / 1e6, 10)


def test_price_table_has_sane_entries():
    table = load_price_table()
    assert len(table) >= 10
    assert all(0 <= a <= 100 and 0 <= b <= 200 for a, b in table.values())


def test_token_estimate_counts_cjk_per_character():
    assert estimate_tokens("你好世界") == 4
    assert estimate_tokens("abcdefgh") == 2
    assert estimate_tokens("") == 0


def test_one_price_flag_overrides_one_side_of_the_known_price():
    assert resolve_price("gpt-4o-mini", "openai", price_in=0.2) == Price(0.2, 0.60, "flags over prices.toml:gpt-4o-mini")
    assert resolve_price("gpt-4o-mini", "openai", price_out=1.0) == Price(0.15, 1.0, "flags over prices.toml:gpt-4o-mini")


def test_one_price_flag_for_an_unknown_model_is_an_error_not_a_free_side():
    # The other side would silently cost $0 and --max-cost would hardly bind.
    with pytest.raises(ConfigError, match="--price-in was given without --price-out") as caught:
        resolve_price("my-private-model", "hosted", price_in=3.0)
    assert "pass --price-out too" in str(caught.value)
