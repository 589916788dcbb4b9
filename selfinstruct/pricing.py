"""Prices per 1M tokens, endpoint kinds, cost arithmetic and the offline token estimate."""

from __future__ import annotations

import ipaddress
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from selfinstruct.errors import ConfigError
from selfinstruct.similarity import CJK_RE

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PRICE_FILE = Path(__file__).with_name("prices.toml")


@dataclass(frozen=True)
class Price:
    """USD per 1M input and output tokens, and where the figure came from."""

    input: float
    output: float
    source: str

    def usd(self, prompt_tokens: float, completion_tokens: float) -> float:
        """Dollars for a token count, computed from totals so sums stay exact."""
        return round((prompt_tokens * self.input + completion_tokens * self.output) / 1_000_000, 10)


def endpoint_kind(base_url: str | None) -> str:
    """`openai` for the default API, `local` for loopback/private hosts, else `hosted`."""
    if not base_url:
        return "openai"
    host = (urlparse(base_url).hostname or "").lower()
    if host in ("localhost", "0.0.0.0") or host.endswith(".local") or host.endswith(".localhost"):
        return "local"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return "openai" if host == "api.openai.com" else "hosted"
    return "local" if (ip.is_loopback or ip.is_private or ip.is_link_local) else "hosted"


def load_price_table(path: Path = PRICE_FILE) -> dict[str, tuple[float, float]]:
    """The shipped price table."""
    with open(path, "rb") as fh:
        data = tomllib.load(fh)
    return {name: (float(p[0]), float(p[1])) for name, p in data.get("models", {}).items()}


def resolve_price(
    model: str, kind: str, price_in: float | None = None, price_out: float | None = None
) -> Price | None:
    """The price to charge: flags, else 0 for a local server, else the table; None if unknown.

    One flag alone overrides that side of the known price; with no known price it is an error,
    since the other side would silently cost nothing and --max-cost would barely bind.
    """
    if price_in is not None and price_out is not None:
        return Price(price_in, price_out, "flags")
    known = _table_price(model, kind)
    if price_in is None and price_out is None:
        return known
    if known is None:
        given, missing = ("--price-in", "--price-out") if price_in is not None else ("--price-out", "--price-in")
        raise ConfigError(
            f"{given} was given without {missing} and {model!r} is not in the price table",
            f"pass {missing} too (USD per 1M tokens)",
        )
    return Price(known.input if price_in is None else price_in, known.output if price_out is None else price_out,
                 f"flags over {known.source}")


def _table_price(model: str, kind: str) -> Price | None:
    """0 for a local server, else the shipped table's price; None if unknown."""
    if kind == "local":
        return Price(0.0, 0.0, "local server")
    table = load_price_table()
    name = model.lower()
    if name in table:
        return Price(*table[name], f"prices.toml:{name}")
    # Longest table name that prefixes the model (dated snapshots, provider suffixes).
    for key in sorted(table, key=len, reverse=True):
        if name.startswith(key + "-") or name.startswith(key + ":"):
            return Price(*table[key], f"prices.toml:{key}")
    return None


# The Batch API's discount when the table names no batch price for a model (OpenAI's is half).
BATCH_DISCOUNT = 0.5


def batch_price(price: Price | None, model: str, discount: float | None = None) -> Price | None:
    """The price of a batch: --batch-discount off the online price, else the table's batch price, else half off."""
    if price is None or (price.input, price.output) == (0.0, 0.0):
        return price  # nothing to take half of (a local server)
    if discount is None and price.source.startswith("prices.toml:"):
        with open(PRICE_FILE, "rb") as fh:
            table = tomllib.load(fh).get("batch", {})
        key = price.source.removeprefix("prices.toml:")
        if key in table:
            return Price(float(table[key][0]), float(table[key][1]), f"prices.toml:batch.{key}")
    off = BATCH_DISCOUNT if discount is None else discount
    return Price(round(price.input * (1 - off), 10), round(price.output * (1 - off), 10), f"{price.source}, batch {off:.0%} off")


def estimate_tokens(text: str) -> int:
    """Offline token estimate: one per CJK character plus one per four other non-space characters."""
    cjk = len(CJK_RE.findall(text))
    other = sum(1 for ch in text if not ch.isspace()) - cjk
    return cjk + math.ceil(max(other, 0) / 4)


def estimate_prompt_tokens(messages: list[dict[str, str]]) -> int:
    """Estimated prompt tokens of chat messages (4 tokens of framing per message)."""
    return sum(estimate_tokens(m["content"]) + 4 for m in messages) + 2


def run_price(cfg, warn) -> Price | None:
    """The price of a run's teacher; unknown is a warning, or an error when --max-cost needs it."""
    price = resolve_price(cfg.model, endpoint_kind(cfg.base_url), cfg.price_in, cfg.price_out)
    if price is None:
        if cfg.max_cost is not None:
            raise ConfigError(
                f"--max-cost needs a price, and {cfg.model!r} is not in the price table",
                "pass --price-in and --price-out (USD per 1M tokens)",
            )
        warn.print(f"[yellow]warning:[/] no price known for {cfg.model!r}; cost will be reported as unknown (pass --price-in/--price-out)")
    return price
