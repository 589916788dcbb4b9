"""ROUGE-L on CJK-aware tokens, and an exact, pruned near-duplicate index."""

from __future__ import annotations

import bisect
import math
import re
from dataclasses import dataclass

from rapidfuzz import process
from rapidfuzz.distance import Indel

# Han (URO, ext A-G, compatibility), kana, hangul: one token per character.
_CJK = (
    "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
    "\U00020000-\U0002fa1f\U00030000-\U0003134f"
    "\u3040-\u309f\u30a0-\u30ff\u31f0-\u31ff\uff66-\uff9f"
    "\uac00-\ud7af\u1100-\u11ff\u3130-\u318f"
)
_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f\U00030000-\U0003134f"
TOKEN_RE = re.compile(f"[{_CJK}]|[a-z0-9]+")
CJK_RE = re.compile(f"[{_CJK}]")
HAN_RE = re.compile(f"[{_HAN}]")


def tokenize(text: str) -> list[str]:
    """Lower-case; each CJK character is a token, each ASCII letter/digit run is a token; drop the rest."""
    return TOKEN_RE.findall(text.lower())


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F1 = 2·LCS/(m+n) on `tokenize` tokens (two empty lists are identical: 1.0)."""
    return Indel.normalized_similarity(tokenize(a), tokenize(b))


class Vocabulary:
    """Maps each distinct token to one code point, so rapidfuzz compares plain strings at full speed."""

    def __init__(self) -> None:
        self._ids: dict[str, str] = {}

    def encode(self, text: str) -> str:
        ids = self._ids
        out = []
        for tok in tokenize(text):
            code = ids.get(tok)
            if code is None:
                n = len(ids) + 1
                # Skip the surrogate block: lone surrogates are not valid code points.
                code = chr(n if n < 0xD800 else n + 0x800)
                ids[tok] = code
            out.append(code)
        return "".join(out)

    def __len__(self) -> int:
        return len(self._ids)


@dataclass(frozen=True)
class Match:
    """The nearest indexed entry at or above the threshold."""

    key: str
    text: str
    score: float


def partner_min_len(length: int, threshold: float) -> int:
    """Shortest sequence that can still reach F1 >= threshold against one of `length` tokens."""
    # F1 <= 2·min/(a+b); with a <= b this needs a >= b·t/(2-t).
    return max(1, math.ceil(length * threshold / (2.0 - threshold) - 1e-9))


def partner_max_len(length: int, threshold: float) -> int:
    """Longest sequence that can still reach F1 >= threshold against one of `length` tokens."""
    return math.floor(length * (2.0 - threshold) / threshold + 1e-9)


def min_overlap(a: int, b: int, threshold: float) -> int:
    """Tokens two sequences of lengths a and b must share to reach F1 >= threshold."""
    return max(1, math.ceil(threshold * (a + b) / 2.0 - 1e-9))


class DedupIndex:
    """Exact ROUGE-L near-duplicate index, pruned by length bounds and a rare-token prefix filter.

    Any two sequences with F1 >= t share at least ceil(t·(m+n)/2) tokens (counted with
    multiplicity), so under one fixed token order their "prefixes" of rarest tokens must
    intersect (prefix filtering). Rarity is document frequency; the order is recomputed and
    the postings rebuilt each time the index doubles, which keeps it exact (one order at a
    time) and cheap (amortised O(n log n)). rapidfuzz verifies the few candidates.
    """

    def __init__(self, threshold: float = 0.7) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError("threshold must be in (0, 1]")
        self.threshold = threshold
        self.vocab = Vocabulary()
        self._keys: list[str] = []
        self._texts: list[str] = []
        self._codes: list[str] = []
        self._lens: list[int] = []
        # token -> (entry lengths, sorted; [(entry, longest query this posting can match)] in step)
        self._postings: dict[tuple[str, int], tuple[list[int], list[tuple[int, int]]]] = {}
        self._df: dict[tuple[str, int], int] = {}
        self._rank: dict[tuple[str, int], int] = {}
        self._empty: list[int] = []
        self._rebuild_at = 256

    def __len__(self) -> int:
        return len(self._keys)

    @staticmethod
    def _tagged(code: str) -> list[tuple[str, int]]:
        """Each token tagged with its occurrence number, turning the multiset into a set."""
        seen: dict[str, int] = {}
        out = []
        for ch in code:
            k = seen.get(ch, 0)
            seen[ch] = k + 1
            out.append((ch, k))
        return out

    def _prefix(self, tagged: list[tuple[str, int]]) -> list[tuple[str, int]]:
        """The rarest tokens of which any match must share at least one."""
        n = len(tagged)
        overlap = min_overlap(n, partner_min_len(n, self.threshold), self.threshold)
        rank = self._rank
        for tok in tagged:
            if tok not in rank:
                # Newer than the last rebuild: rarest of all, and fixed from now on.
                rank[tok] = (1 << 32) + len(rank)
        ordered = sorted(tagged, key=rank.__getitem__, reverse=True)
        return ordered[: max(1, n - overlap + 1)]

    def _rebuild(self) -> None:
        """Re-rank tokens by document frequency and re-index every prefix."""
        by_df = sorted(self._df.items(), key=lambda kv: (-kv[1], kv[0]))
        self._rank = {tok: r for r, (tok, _) in enumerate(by_df)}
        self._postings = {}
        for i, code in enumerate(self._codes):
            if code:
                self._post(i, len(code), self._tagged(code))
        self._rebuild_at = 2 * len(self._codes)

    def _post(self, i: int, b: int, tagged: list[tuple[str, int]]) -> None:
        """Add entry i's prefix tokens to the postings, each with its positional bound."""
        t = self.threshold
        postings = self._postings
        for p, tok in enumerate(self._prefix(tagged)):
            # The token at prefix position p can witness a match with a query of length n only
            # if p < b - ceil(t(n+b)/2) + 1, i.e. n <= 2(b-p)/t - b (positional filter).
            max_n = math.floor(2.0 * (b - p) / t - b + 1e-9)
            entry = postings.get(tok)
            if entry is None:
                postings[tok] = ([b], [(i, max_n)])
            else:
                lens, items = entry
                at = bisect.bisect_right(lens, b)
                lens.insert(at, b)
                items.insert(at, (i, max_n))

    def search(self, text: str, code: str | None = None) -> Match | None:
        """The best indexed entry with F1 >= threshold, or None."""
        code = self.vocab.encode(text) if code is None else code
        return self._search(code, self._tagged(code))

    def _search(self, code: str, tagged: list[tuple[str, int]]) -> Match | None:
        n = len(code)
        if n == 0:
            # An empty token list only matches another empty one (identical: 1.0, as rapidfuzz says).
            if self._empty:
                i = self._empty[0]
                return Match(self._keys[i], self._texts[i], 1.0)
            return None
        lo, hi = partner_min_len(n, self.threshold), partner_max_len(n, self.threshold)
        t = self.threshold
        cands: set[int] = set()
        postings = self._postings
        for q, tok in enumerate(self._prefix(tagged)):
            # The witness token sits at query position q < n - ceil(t(n+b)/2) + 1, so b <= 2(n-q)/t - n.
            bmax = min(hi, math.floor(2.0 * (n - q) / t - n + 1e-9))
            if bmax < lo:
                break
            entry = postings.get(tok)
            if entry is not None:
                lens, items = entry
                start = bisect.bisect_left(lens, lo)
                stop = bisect.bisect_right(lens, bmax, start)
                cands.update([i for i, max_n in items[start:stop] if max_n >= n])
        if not cands:
            return None
        order = sorted(cands)
        codes = self._codes
        best = process.extractOne(
            code,
            [codes[i] for i in order],
            scorer=Indel.normalized_similarity,
            score_cutoff=self.threshold,
        )
        if best is None:
            return None
        _, score, pos = best
        i = order[pos]
        return Match(self._keys[i], self._texts[i], float(score))

    def add(self, key: str, text: str, code: str | None = None) -> None:
        """Index one entry (no check: call `search` first when deduplicating)."""
        code = self.vocab.encode(text) if code is None else code
        self._add(key, text, code, self._tagged(code))

    def _add(self, key: str, text: str, code: str, tagged: list[tuple[str, int]]) -> None:
        i = len(self._keys)
        self._keys.append(key)
        self._texts.append(text)
        self._codes.append(code)
        self._lens.append(len(code))
        if not code:
            self._empty.append(i)
            return
        df = self._df
        for tok in tagged:
            df[tok] = df.get(tok, 0) + 1
        if len(self._codes) >= self._rebuild_at:
            self._rebuild()
            return
        self._post(i, len(code), tagged)

    def add_if_novel(self, key: str, text: str) -> Match | None:
        """Add `text` unless it is a near-duplicate; return the match that blocked it."""
        code = self.vocab.encode(text)
        tagged = self._tagged(code)
        match = self._search(code, tagged)
        if match is None:
            self._add(key, text, code, tagged)
        return match
