"""ROUGE-L on CJK-aware tokens, and an exact, pruned near-duplicate index."""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Callable, Collection, Sequence

import numpy as np

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


def cutoff(threshold: float) -> float:
    """The score_cutoff to hand rapidfuzz for a `>= threshold` test.

    With a cutoff, rapidfuzz turns it into a whole-number distance bound and can reject a pair
    whose score, computed without one, is exactly the threshold (F1 3/10 at 0.3); so ask for a
    hair less and compare the returned score, the same float `rouge_l` gives, ourselves.
    """
    return max(0.0, threshold - 1e-6)


def over(score, threshold: float):
    """A duplicate scores above the threshold (> t, as Alpaca and Self-Instruct test), or is identical at t = 1."""
    # A pair at exactly t (7 of 10 shared characters) is a shared template more often than the
    # same task; the tolerance keeps a float 0.7000000000000001 from passing for 7/10.
    return score >= 1.0 if threshold >= 1.0 else score > threshold + 1e-9


def dedup_text(instruction: str, input: str = "") -> str:
    """The text the near-duplicate checks compare: the instruction, and the input when there is one."""
    return f"{instruction}\n{input}" if input and input.strip() else instruction


# What --field may name: the topic (the default), the whole instruction and input, or the instruction alone (Alpaca).
FIELDS = ("topic", "instruction+input", "instruction")
# How a dataset card names each.
FIELD_NAMES = {"topic": "task's topic (the instruction without counts and framing words, and the input)",
               "instruction+input": "instruction and input", "instruction": "instruction"}
# Words that frame a Chinese task rather than say what it is about: verbs of asking, answer forms, counts' classifiers,
# function words. Written for this project and chosen by measurement (benchmarks/audit_bench.py): with them gone,
# 写一首关于春天的诗 and 写一首关于秋天的诗 differ in half of what is left, and 列出三种减轻压力的方法 and
# 给出四种减轻压力的技巧 in nothing. Removed as substrings, longest first, from both sides alike.
FRAMING_WORDS = tuple(sorted(set("""
列出 列举 说出 给出 提供 描述 解释 说明 生成 产生 创建 创作 写 写下 写出 编写 撰写 设计 构建 构造 提出 想出 确定 找出 命名 举 举出
分析 讨论 总结 概述 介绍 告诉 给 我 你 请 帮 用 使用 利用 简短 简单 简要 一篇 一段 一个 一种 一些 文章 列表 清单 方法 方式 办法 建议
技巧 解决方案 方案 好处 优势 优点 益处 原因 理由 例子 示例 什么 如何 怎么 怎样 为什么 哪些 哪个 是 有 的 了 和 与 及 以及 或 在 中 对 为
把 将 从 以 来 可以 能 应该 这 那 些 以下 下列 给定 所给 此 该 主要 重要 最 可能 潜在 有效 不同 新 原创 有趣 其 它 们 关于 如下 问题 回答
答案 过程 步骤 概念 含义 意思 定义 几 前 后 上 个 种 项 位 条 首 句 行 点 份 张 篇 段 款 类 步 件 名 组 对 下 吗 呢
""".split()), key=lambda w: (-len(w), w)))
_FRAMING_RE = re.compile("|".join(map(re.escape, FRAMING_WORDS)))
# A count ("3 个", "五种", "20 项"): how many answers a task asks for does not make it another task.
_COUNT_RE = re.compile(r"(?:\d+|[零一二两三四五六七八九十百千万几]+)\s*[个种项件句行首位条点名段篇款类步招方面份张幅部本组对样次天年周]")


def topic_text(instruction: str, input: str = "") -> str:
    """The instruction without counts and Chinese framing words, and the input whole: what --field topic compares."""
    # Tokens joined by spaces, so English words stay words when tokenize reads them again. An instruction that is
    # all framing (找出不同的一个) keeps its words: two empty topics would count as identical.
    topic = " ".join(tokenize(_FRAMING_RE.sub(" ", _COUNT_RE.sub(" ", instruction.lower())))) or instruction
    return dedup_text(topic, input)


def compared_text(instruction: str, input: str, field: str) -> str:
    """The text a run's near-duplicate check compares for --field topic, instruction+input or instruction."""
    if field == "topic":
        return topic_text(instruction, input)
    return instruction if field == "instruction" else dedup_text(instruction, input)


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


# DedupIndex probes extra rare tokens while their lists hold no more hits than those already
# probed (x growth, + slack): measured best on real Chinese and on the fake teacher's text.
_PROBE_GROWTH = 2
_PROBE_SLACK = 256
# Count hits by sorting them when they are this many times fewer than the entries, else bincount.
_SORT_BELOW = 16


class DedupIndex:
    """Exact ROUGE-L near-duplicate index: shared-token counts over inverted lists, then rapidfuzz.

    Two sequences of m and n tokens with F1 >= t share at least a = ceil(t·(m+n)/2) tokens
    (with multiplicity; tagging each token with its occurrence number makes that a set overlap).
    Every entry is listed under each of its tokens. A query counts, per entry, the tokens it
    shares among a subset S of its own tokens, the rarest ones: at most n - |S| shared tokens
    lie outside S, so a match needs at least a - (n - |S|) shared inside it. S holds enough
    tokens for that bound to be positive, plus further rare ones while their lists are short,
    each of which tightens it by one. The counting is one numpy bincount, so only the few
    entries that pass are verified. Exact for any S: nothing depends on a global token order.
    """

    def __init__(self, threshold: float = 0.7) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError("threshold must be in (0, 1]")
        self.threshold = threshold
        self.vocab = Vocabulary()
        self._keys: list[str] = []
        self._texts: list[str] = []
        self._codes: list[str] = []
        self._lens = np.zeros(1024, dtype=np.int32)
        self._tid: dict[tuple[str, int], int] = {}
        self._lists: list[np.ndarray] = []  # token id -> entry ids (first _sizes[tid] are used)
        self._sizes: list[int] = []
        self._empty: list[int] = []

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

    def search(self, text: str, code: str | None = None, exclude: Collection[str] = ()) -> Match | None:
        """The best indexed entry with F1 >= threshold, or None; entries keyed in `exclude` are passed over."""
        code = self.vocab.encode(text) if code is None else code
        return self._search(code, self._tagged(code), exclude)

    def _candidates(self, n: int, tagged: list[tuple[str, int]]) -> np.ndarray:
        """Entries, in index order, that share enough tokens with a query of n tokens to be verified."""
        t = self.threshold
        lo, hi = partner_min_len(n, t), partner_max_len(n, t)
        tids, sizes = self._tid, self._sizes
        known = sorted((sizes[tid], tid) for tid in (tids.get(tok) for tok in tagged) if tid is not None)
        # Tokens no entry has share nothing: probing them is free and tightens the bound.
        unknown = n - len(known)
        required = n - min_overlap(n, lo, t) + 1  # the fewest probed tokens that still bound every length
        k = max(0, required - unknown)
        if k > len(known):
            return np.empty(0, dtype=np.int64)
        spent = sum(size for size, _ in known[:k])
        budget = _PROBE_GROWTH * spent + _PROBE_SLACK
        while k < len(known) and spent + known[k][0] <= budget:
            spent += known[k][0]
            k += 1
        if spent == 0:
            return np.empty(0, dtype=np.int64)
        lists = self._lists
        hits = np.concatenate([lists[tid][:size] for size, tid in known[:k]])
        outside = n - unknown - k  # query tokens not probed: each could add one shared token
        least = max(1, min_overlap(n, lo, t) - outside)  # what the shortest partner needs
        if len(hits) * _SORT_BELOW < len(self._keys):
            cand, shared = np.unique(hits, return_counts=True)  # few hits: sort them
            keep = shared >= least
            cand, shared = cand[keep], shared[keep]
        else:
            counts = np.bincount(hits)  # many: one pass over a counter per entry
            cand = np.flatnonzero(counts >= least)
            shared = counts[cand]
        b = self._lens[cand]
        need = np.ceil(t * (n + b) / 2.0 - 1e-9).astype(np.int64) - outside
        return cand[(shared >= np.maximum(need, 1)) & (b >= lo) & (b <= hi)]

    def _search(self, code: str, tagged: list[tuple[str, int]], exclude: Collection[str] = ()) -> Match | None:
        n = len(code)
        if n == 0:
            # An empty token list only matches another empty one (identical: 1.0, as rapidfuzz says).
            for i in self._empty:
                if self._keys[i] not in exclude:
                    return Match(self._keys[i], self._texts[i], 1.0)
            return None
        order = self._candidates(n, tagged).tolist()
        if exclude:
            # An evolved instruction may resemble its own ancestors; only others count as duplicates.
            order = [i for i in order if self._keys[i] not in exclude]
        if not order:
            return None
        codes = self._codes
        best = process.extractOne(
            code,
            [codes[i] for i in order],
            scorer=Indel.normalized_similarity,
            score_cutoff=cutoff(self.threshold),
        )
        if best is None or not over(best[1], self.threshold):
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
        if i >= len(self._lens):
            self._lens = np.concatenate([self._lens, np.zeros(len(self._lens), dtype=np.int32)])
        self._lens[i] = len(code)
        if not code:
            self._empty.append(i)
            return
        tids, lists, sizes = self._tid, self._lists, self._sizes
        for tok in tagged:
            tid = tids.get(tok)
            if tid is None:
                tid = tids[tok] = len(lists)
                lists.append(np.empty(4, dtype=np.int32))
                sizes.append(0)
            size = sizes[tid]
            arr = lists[tid]
            if size == len(arr):
                arr = lists[tid] = np.concatenate([arr, np.empty(size, dtype=np.int32)])
            arr[size] = i
            sizes[tid] = size + 1

    def add_if_novel(self, key: str, text: str) -> Match | None:
        """Add `text` unless it is a near-duplicate; return the match that blocked it."""
        code = self.vocab.encode(text)
        tagged = self._tagged(code)
        match = self._search(code, tagged)
        if match is None:
            self._add(key, text, code, tagged)
        return match


# ---- batch near-duplicate removal ------------------------------------------------------------
#
# When every record is known up front, the greedy keep-first answer can be computed in bulk:
# encode all texts once, fix one global token order (rarest first), generate candidate pairs
# with a vectorised prefix-filter join, verify them with rapidfuzz on all cores, then walk the
# verified pairs in input order. Records are taken in blocks: each block is joined against the
# records kept so far, then with itself, so the index only ever holds kept records and a block's
# pair set stays bounded however many near-copies the data holds.

# Bits below a join group's id in the sorted composite key; lengths must stay under 2**32.
_LEN_BITS = 32
# Pairs generated per slice of a join (bounds temporary memory).
_PAIR_CHUNK = 4_000_000
# Split a block in two when its self-join would generate more raw pairs than this.
_BLOCK_PAIR_BUDGET = 40_000_000
# Prefix combinations (k tokens each) a record may emit; longer records fall back to single tokens.
_COMBO_BUDGET = 512
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


@dataclass(frozen=True)
class BatchResult:
    """Greedy keep-first verdicts: for record i, `duplicate_of[i]` is a kept earlier record it repeats, or -1.

    The kept set is exactly the all-pairs answer. The record named is the closest kept one in
    the same block (all of a 64K-record input); against earlier blocks it is the candidate
    sharing the most rare-token pairs, verified at or above the threshold (usually the closest).
    """

    duplicate_of: np.ndarray
    score: np.ndarray
    candidates: int
    pairs: int

    @property
    def keep(self) -> np.ndarray:
        return self.duplicate_of < 0


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads consecutive ids over 64 bits (uint64 arithmetic wraps)."""
    with np.errstate(over="ignore"):
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return h ^ (h >> np.uint64(31))


def _ceil(x: np.ndarray) -> np.ndarray:
    # The slack only ever loosens a bound: a filter may keep a pair it could drop, never the reverse.
    return np.ceil(x - 1e-9).astype(np.int64)


def _lo(n: np.ndarray, t: float) -> np.ndarray:
    return np.maximum(1, _ceil(n * (t / (2.0 - t))))


def _hi(n: np.ndarray, t: float) -> np.ndarray:
    return np.floor(n * ((2.0 - t) / t) + 1e-9).astype(np.int64)


def _need(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """Shared tokens two sequences of lengths a and b need for F1 >= t (LCS <= multiset overlap)."""
    return np.maximum(1, _ceil((a + b) * (t / 2.0)))


class TokenTable:
    """All records' tokens as one array: per record, tagged tokens sorted rarest first.

    A token is tagged with its occurrence number ("的" twice becomes 的#0, 的#1), turning the
    multiset into a set whose overlap bounds the LCS. Rarity is document frequency over the
    whole batch, fixed once, so every prefix is taken under the same order (what prefix
    filtering needs to be exact).
    """

    def __init__(self, codes: Sequence[str]) -> None:
        self.lens = np.fromiter((len(c) for c in codes), dtype=np.int64, count=len(codes))
        self.starts = np.zeros(len(codes), dtype=np.int64)
        np.cumsum(self.lens[:-1], out=self.starts[1:])
        tok = np.frombuffer("".join(codes).encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        rec = np.repeat(np.arange(len(codes), dtype=np.int64), self.lens)
        order = np.lexsort((tok, rec))  # stable: equal tokens of a record keep text order
        tok, rec = tok[order], rec[order]
        del order
        idx = np.arange(len(tok), dtype=np.int64)
        new = np.ones(len(tok), dtype=bool)
        new[1:] = (tok[1:] != tok[:-1]) | (rec[1:] != rec[:-1])
        occ = idx - np.maximum.accumulate(np.where(new, idx, 0))
        del new, idx
        ids, inv = np.unique(tok * (1 << 32) + occ, return_inverse=True)
        del tok, occ
        df = np.bincount(inv.ravel(), minlength=len(ids))
        rank = np.empty(len(ids), dtype=np.int64)
        rank[np.lexsort((np.arange(len(ids)), df))] = np.arange(len(ids))
        ranks = rank[inv.ravel()]
        del inv, rank
        # rec is already sorted, so a lexsort on (rank, rec) only reorders inside each record.
        self.ranks = ranks[np.lexsort((ranks, rec))]
        self.vocab = len(ids)


@dataclass
class _Side:
    """Signature entries of some records, sorted by (signature, length) for range look-ups."""

    sig: np.ndarray    # per entry, sorted
    keys: np.ndarray   # distinct signatures, sorted
    comp: np.ndarray   # (group << 32) | length, sorted
    rec: np.ndarray
    rest: np.ndarray   # overlap bound of the positional filter

    @classmethod
    def build(cls, sig: np.ndarray, rec: np.ndarray, rest: np.ndarray, lens: np.ndarray) -> "_Side":
        order = np.lexsort((lens[rec], sig))
        return cls._sorted(sig[order], rec[order], rest[order], lens)

    @classmethod
    def _sorted(cls, sig: np.ndarray, rec: np.ndarray, rest: np.ndarray, lens: np.ndarray) -> "_Side":
        new = np.ones(len(sig), dtype=bool)
        new[1:] = sig[1:] != sig[:-1]
        group = np.cumsum(new) - 1
        return cls(sig, sig[new], (group << _LEN_BITS) | lens[rec], rec, rest)

    def subset(self, mask: np.ndarray, lens: np.ndarray) -> "_Side":
        """The entries under `mask`, still sorted (no new sort needed)."""
        return _Side._sorted(self.sig[mask], self.rec[mask], self.rest[mask], lens)

    @classmethod
    def empty(cls) -> "_Side":
        z = np.zeros(0, dtype=np.int64)
        return cls(np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.uint64), z, z, z)

    def __len__(self) -> int:
        return len(self.rec)


class _Prefixes:
    """Prefix signatures under one threshold: k-token combinations for short records, single tokens else.

    Two sequences sharing at least o tagged tokens share their first k common tokens inside both
    "k-prefixes" (the n-o+k rarest tokens), so a k-combination of prefix tokens is a signature
    every true pair has in common, and much rarer than one token. A record emits k-combinations
    while they stay few, and single tokens (k=1) when its partners could be too long for
    combinations, or the pair could need fewer than k shared tokens; a pair is then always
    covered by one family both records emit.
    """

    def __init__(self, table: TokenTable, threshold: float, k: int = 2) -> None:
        self.table = table
        self.t = threshold
        self.k = k
        n = np.arange(0, int(table.lens.max(initial=0)) + 2, dtype=np.int64)
        self.need_min = _need(n, _lo(n, threshold), threshold)  # fewest shared tokens over all partners
        combos_ok = (n >= k) & (self.need_min >= k)
        p = n - np.maximum(self.need_min, k) + k
        count = np.array([math.comb(int(x), k) if ok else 0 for x, ok in zip(p, combos_ok)], dtype=np.int64)
        combos_ok &= count <= _COMBO_BUDGET
        # A record emits single tokens when some possible partner emits only those...
        alone = ~combos_ok
        lo, hi = _lo(n, threshold), np.minimum(_hi(n, threshold), len(n) - 1)
        mark = np.zeros(len(n) + 1, dtype=np.int64)
        np.add.at(mark, lo[alone], 1)
        np.add.at(mark, hi[alone] + 1, -1)
        # ...or when a pair could need fewer than k shared tokens (a+b <= 2(k-1)/t: both are short).
        tiny = n <= math.floor(2 * (k - 1) / threshold + 1e-9)
        self.combos = combos_ok
        self.singles = (np.cumsum(mark)[:-1] > 0) | tiny
        self.combo_len = np.where(combos_ok, p, 0)

    def signatures(self, recs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(signature, record, rest) for the given records' prefixes.

        `rest` bounds the overlap of any pair for which this signature holds its first k common
        tokens: k - 1 + tokens from the signature's last one to the record's end (positional filter).
        """
        tab = self.table
        n = tab.lens[recs]
        out_sig, out_rec, out_rest = [], [], []
        r1 = recs[self.singles[n] & (n > 0)]
        if len(r1):
            n1 = tab.lens[r1]
            p1 = n1 - self.need_min[n1] + 1
            rec = np.repeat(r1, p1)
            pos = np.arange(len(rec), dtype=np.int64) - np.repeat(np.cumsum(p1) - p1, p1)
            ranks = tab.ranks[tab.starts[rec] + pos].astype(np.uint64)
            out_sig.append(_mix(ranks) | np.uint64(1))  # odd: never equal to a combination's signature
            out_rec.append(rec)
            out_rest.append(tab.lens[rec] - pos)
        rk = recs[self.combos[n]]
        if len(rk):
            plen = self.combo_len[tab.lens[rk]]
            for p in np.unique(plen):
                group = rk[plen == p]
                cols = np.array(list(itertools.combinations(range(int(p)), self.k)), dtype=np.int64)
                mat = tab.ranks[tab.starts[group][:, None] + np.arange(p)[None, :]].astype(np.uint64)
                h = np.full((len(group), len(cols)), np.uint64(self.k), dtype=np.uint64)
                with np.errstate(over="ignore"):
                    for c in range(self.k):
                        h = _mix(h * np.uint64(0x9E3779B97F4A7C15) + mat[:, cols[:, c]])
                out_sig.append((h & ~np.uint64(1)).ravel())
                out_rec.append(np.repeat(group, len(cols)))
                out_rest.append((tab.lens[group][:, None] - cols[None, :, -1] + (self.k - 1)).ravel())
        if not out_sig:
            z = np.zeros(0, dtype=np.int64)
            return np.zeros(0, dtype=np.uint64), z, z
        return np.concatenate(out_sig), np.concatenate(out_rec), np.concatenate(out_rest)


def _distinct(x: np.ndarray) -> np.ndarray:
    """Sorted distinct values (a plain sort: numpy's hash-based unique is slower on large int arrays)."""
    x = np.sort(x)
    if len(x) > 1:
        x = x[np.concatenate(([True], x[1:] != x[:-1]))]
    return x


def _runs(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct values and how often each occurs."""
    x = np.sort(x)
    if not len(x):
        return x, np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.concatenate(([True], x[1:] != x[:-1])))
    return x[starts], np.diff(np.append(starts, len(x)))


def _expand(lo: np.ndarray, hi: np.ndarray, chunk: int = _PAIR_CHUNK):
    """Yield (entry, partner) index arrays for partners lo[e] <= p < hi[e], a bounded slice at a time."""
    counts = np.maximum(hi - lo, 0)
    ends = np.cumsum(counts)
    start = 0
    while start < len(counts):
        base = ends[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(ends, base + chunk, side="right")))
        c = counts[start:stop]
        total = int(c.sum())
        if total:
            src = np.repeat(np.arange(start, stop, dtype=np.int64), c)
            offset = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(c) - c, c)
            yield src, lo[src] + offset
        start = stop


def _longest(ln: np.ndarray, rest: np.ndarray, t: float) -> np.ndarray:
    """Longest partner an entry can still match: the length bound, and the positional bound on its own side.

    rest >= need(n + m) = ceil(t(n + m)/2) holds exactly when m <= 2·rest/t - n, so partners
    past that length fail the positional filter anyway; cutting the range there saves generating them.
    """
    return np.minimum(_hi(ln, t), np.maximum(np.floor(2.0 * rest / t - ln + 1e-6), 0).astype(np.int64))


def _self_ranges(side: _Side, t: float) -> tuple[np.ndarray, np.ndarray]:
    """Partners of each entry within one side: later entries of its group up to the longest partner length."""
    ln = side.comp & ((1 << _LEN_BITS) - 1)
    group = side.comp >> _LEN_BITS
    lo = np.arange(1, len(side) + 1, dtype=np.int64)
    hi = np.searchsorted(side.comp, (group << _LEN_BITS) | _longest(ln, side.rest, t), side="right")
    # Partners found this way are at least as long, so the pair needs >= need(n, n) tokens.
    return lo, np.where(side.rest >= _need(ln, ln, t), hi, lo)


def _cross_ranges(query: _Side, side: _Side, t: float) -> tuple[np.ndarray, np.ndarray]:
    """Partners of query entries in another side: same signature, length within the bounds.

    Both sides are sorted by (signature, length), so the needles arrive in order and every
    binary search starts where the last one ended."""
    ln = query.comp & ((1 << _LEN_BITS) - 1)
    group = np.searchsorted(side.keys, query.sig)
    found = group < len(side.keys)
    found[found] = side.keys[group[found]] == query.sig[found]
    group = np.where(found, group, 0)
    lo = np.searchsorted(side.comp, (group << _LEN_BITS) | _lo(ln, t), side="left")
    hi = np.searchsorted(side.comp, (group << _LEN_BITS) | _longest(ln, query.rest, t), side="right")
    return lo, np.maximum(lo, np.where(found, hi, lo))


def _verify(codes: np.ndarray, a: np.ndarray, b: np.ndarray, t: float, workers: int) -> np.ndarray:
    """ROUGE-L F1 of each pair (0 well below t), computed by rapidfuzz on all cores."""
    out = np.empty(len(a), dtype=np.float64)
    step = 2_000_000
    for s in range(0, len(a), step):
        out[s : s + step] = process.cpdist(
            codes[a[s : s + step]], codes[b[s : s + step]],
            scorer=Indel.normalized_similarity, score_cutoff=cutoff(t), workers=workers, dtype=np.float64,
        )
    return out


class BatchDedup:
    """Greedy keep-first near-duplicate removal over a known set of texts, exactly as DedupIndex would decide.

    `signer` yields each record's join signatures: prefix combinations (exact) or MinHash bands
    (approximate recall). Either way every candidate pair is verified by ROUGE-L, so a record is
    only ever dropped for a real match.
    """

    def __init__(self, threshold: float = 0.7, *, block_size: int = 1 << 16, workers: int = -1, method: str = "exact",
                 on_progress: Callable[[int], None] | None = None) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError("threshold must be in (0, 1]")
        if method not in ("exact", "minhash"):
            raise ValueError("method must be exact or minhash")
        self.threshold = threshold
        self.block_size = block_size
        self.workers = workers
        self.method = method
        self.on_progress = on_progress
        self.candidates = 0
        self.pairs = 0

    def run(self, texts: Sequence[str]) -> BatchResult:
        """Verdicts for `texts` in input order."""
        vocab = Vocabulary()
        return self.run_codes([vocab.encode(t) for t in texts])

    def run_codes(self, codes: Sequence[str]) -> BatchResult:
        """Verdicts for already encoded texts (see Vocabulary)."""
        t = self.threshold
        n = len(codes)
        dup = np.full(n, -1, dtype=np.int64)
        score = np.zeros(n, dtype=np.float64)
        # Identical token sequences: only the first copy takes part; a copy shares its verdict.
        first: dict[str, int] = {}
        copy_of = np.fromiter((first.setdefault(c, i) for i, c in enumerate(codes)), dtype=np.int64, count=n)
        distinct = np.flatnonzero(copy_of == np.arange(n))
        if t < 1.0 and len(distinct) > 1:
            uniq = [codes[i] for i in distinct]
            table = TokenTable(uniq)
            signer = _Prefixes(table, t) if self.method == "exact" else _MinHash(table, uniq, t)
            local_dup, local_score = self._greedy_blocks(np.array(uniq, dtype=object), table, signer)
            kept_dup = local_dup >= 0
            dup[distinct[kept_dup]] = distinct[local_dup[kept_dup]]
            score[distinct] = local_score
        copies = np.flatnonzero(copy_of != np.arange(n))
        if len(copies):
            src = copy_of[copies]
            # A copy repeats its first occurrence if that was kept, else whatever that one repeated.
            dup[copies] = np.where(dup[src] < 0, src, dup[src])
            score[copies] = np.where(dup[src] < 0, 1.0, score[src])
        if self.on_progress:
            self.on_progress(n)
        return BatchResult(dup, score, self.candidates, self.pairs + len(copies))

    def nearest(self, texts: Sequence[str], reference: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """For each text, the most similar reference text with F1 >= threshold: (index or -1, score)."""
        vocab = Vocabulary()
        codes = [vocab.encode(t) for t in reference] + [vocab.encode(t) for t in texts]
        r = len(reference)
        best = np.full(len(texts), -1, dtype=np.int64)
        score = np.zeros(len(texts), dtype=np.float64)
        table = TokenTable(codes)
        signer = _Prefixes(table, self.threshold) if self.method == "exact" else _MinHash(table, codes, self.threshold)
        side = _Side.build(*signer.signatures(np.arange(r, dtype=np.int64)), table.lens)
        code_arr = np.array(codes, dtype=object)
        for start in range(r, len(codes), self.block_size):
            query = _Side.build(*signer.signatures(np.arange(start, min(start + self.block_size, len(codes)), dtype=np.int64)), table.lens)
            lo, hi = _cross_ranges(query, side, self.threshold)
            a, b, s = self._join(code_arr, table.lens, lo, hi, (query.rec, query.rest), (side.rec, side.rest))
            if len(a):
                order = np.lexsort((b, -s, a))
                a, b, s = a[order], b[order], s[order]
                first = np.ones(len(a), dtype=bool)
                first[1:] = a[1:] != a[:-1]
                best[a[first] - r], score[a[first] - r] = b[first], s[first]
            if self.on_progress:
                self.on_progress(min(start + self.block_size, len(codes)) - r)
        empty_ref = np.flatnonzero(table.lens[:r] == 0)
        if len(empty_ref):  # an empty token list is identical to another (F1 1.0), and to nothing else
            empty = table.lens[r:] == 0
            best[empty], score[empty] = empty_ref[0], 1.0
        return best, score

    def similar_pairs(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every pair i < j with F1 >= threshold this method finds (no greedy pass): for measuring recall."""
        vocab = Vocabulary()
        codes = [vocab.encode(t) for t in texts]
        table = TokenTable(codes)
        signer = _Prefixes(table, self.threshold) if self.method == "exact" else _MinHash(table, codes, self.threshold)
        sig, rec, rest = signer.signatures(np.arange(len(codes), dtype=np.int64))
        side = _Side.build(sig, rec, rest, table.lens)
        lo, hi = _self_ranges(side, self.threshold)
        a, b, s = self._join(np.array(codes, dtype=object), table.lens, lo, hi, (side.rec, side.rest), (side.rec, side.rest), ordered=False)
        empty = np.flatnonzero(table.lens == 0)
        if len(empty) > 1:  # empty token lists are identical to each other (F1 1.0) and match nothing else
            ea, eb = np.triu_indices(len(empty), 1)
            a, b = np.concatenate([a, empty[ea]]), np.concatenate([b, empty[eb]])
            s = np.concatenate([s, np.ones(len(ea))])
        return a, b, s

    def _greedy_blocks(self, codes: np.ndarray, table: TokenTable, signer) -> tuple[np.ndarray, np.ndarray]:
        n = len(codes)
        dup = np.full(n, -1, dtype=np.int64)
        score = np.zeros(n, dtype=np.float64)
        kept = _Side.empty()
        kept_parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        pending = [np.arange(s, min(s + self.block_size, n), dtype=np.int64) for s in range(0, n, self.block_size)]
        pending.reverse()
        done = 0
        while pending:
            block = pending.pop()
            sig, rec, rest = signer.signatures(block)
            side = _Side.build(sig, rec, rest, table.lens)
            lo, hi = _self_ranges(side, self.threshold)
            if int(np.maximum(hi - lo, 0).sum()) > _BLOCK_PAIR_BUDGET and len(block) > 1:
                half = len(block) // 2
                pending.extend([block[half:], block[:half]])
                continue
            # 1. against everything kept in earlier blocks
            if len(kept):
                lo_k, hi_k = _cross_ranges(side, kept, self.threshold)
                a, b, s = self._join_any(codes, table.lens, lo_k, hi_k, (side.rec, side.rest), (kept.rec, kept.rest))
                dup[a], score[a] = b, s
            # 2. within the block, among records still standing
            standing = dup[side.rec] < 0
            if not standing.all():
                side = side.subset(standing, table.lens)
                lo, hi = _self_ranges(side, self.threshold)
            a, b, s = self._join(codes, table.lens, lo, hi, (side.rec, side.rest), (side.rec, side.rest), ordered=False)
            if len(a):
                self._walk(a, b, s, dup, score)
            # 3. the block's kept records join the index
            keep = dup[side.rec] < 0
            kept_parts.append((side.sig[keep], side.rec[keep], side.rest[keep]))
            if pending:
                kept = _Side.build(*(np.concatenate(p) for p in zip(*kept_parts)), table.lens)
            done += len(block)
            if self.on_progress:
                self.on_progress(done)
        return dup, score

    def _candidates(self, width, lens, lo, hi, src, dst, ordered: bool) -> tuple[np.ndarray, np.ndarray]:
        """Distinct candidate pair keys (a * width + b) from entry ranges, with how many signatures each pair shares."""
        (src_rec, src_rest), (dst_rec, dst_rest) = src, dst
        # Shared tokens needed depend on a + b only: one table instead of float maths per pair.
        need = _need(np.arange(2 * int(lens.max(initial=0)) + 1, dtype=np.int64), 0, self.threshold)
        keys = []
        for i, j in _expand(lo, hi):
            a, b = src_rec[i], dst_rec[j]
            fits = np.minimum(src_rest[i], dst_rest[j]) >= need[lens[a] + lens[b]]
            a, b = a[fits], b[fits]
            if not ordered:
                a, b = np.minimum(a, b), np.maximum(a, b)
            keys.append(a * width + b)
        if not keys:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        # One sort of everything beats sorting each slice and merging the counts.
        return _runs(np.concatenate(keys) if len(keys) > 1 else keys[0])

    def _check(self, codes, a, b) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Verify candidate pairs; keep those at or above the threshold."""
        self.candidates += len(a)
        s = _verify(codes, a, b, self.threshold, self.workers)
        ok = over(s, self.threshold)
        self.pairs += int(ok.sum())
        return a[ok], b[ok], s[ok]

    def _join(self, codes, lens, lo, hi, src, dst, ordered: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Candidate pairs from entry ranges, deduplicated, verified: (a, b, score) with score >= t.

        `ordered` False (a self-join) puts the earlier record first."""
        width = len(codes)
        pk, _ = self._candidates(width, lens, lo, hi, src, dst, ordered)
        a, b = pk // width, pk % width
        same = a != b
        return self._check(codes, a[same], b[same])

    def _join_any(self, codes, lens, lo, hi, src, dst) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One verified match per query record (a), cheaply: the candidate sharing the most signatures first.

        Most queries that have a match at all match that candidate, so each costs one
        verification instead of one per candidate; the rest verify all theirs and report the best.
        """
        width = len(codes)
        pk, count = self._candidates(width, lens, lo, hi, src, dst, ordered=True)
        a, b = pk // width, pk % width  # sorted by a, then b
        if not len(a):
            e = np.zeros(0, dtype=np.int64)
            return e, e, np.zeros(0)
        starts = np.flatnonzero(np.concatenate(([True], a[1:] != a[:-1])))
        run = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, len(a))))
        top = count == np.maximum.reduceat(count, starts)[run]
        at = np.flatnonzero(top)
        first = np.zeros(len(a), dtype=bool)
        first[at[np.concatenate(([True], run[at][1:] != run[at][:-1]))]] = True
        s1 = _verify(codes, a[first], b[first], self.threshold, self.workers)
        ok = over(s1, self.threshold)
        self.candidates += len(s1)
        self.pairs += int(ok.sum())
        a1, b1, s1 = a[first][ok], b[first][ok], s1[ok]
        hit = np.zeros(len(starts), dtype=bool)
        hit[run[first][ok]] = True
        rest = ~first & ~hit[run]
        a2, b2, s2 = self._check(codes, a[rest], b[rest])
        if len(a2):
            order = np.lexsort((b2, -s2, a2))
            a2, b2, s2 = a2[order], b2[order], s2[order]
            best = np.concatenate(([True], a2[1:] != a2[:-1]))
            a2, b2, s2 = a2[best], b2[best], s2[best]
        return np.concatenate([a1, a2]), np.concatenate([b1, b2]), np.concatenate([s1, s2])

    @staticmethod
    def _walk(a: np.ndarray, b: np.ndarray, s: np.ndarray, dup: np.ndarray, score: np.ndarray) -> None:
        """Greedy keep-first over verified pairs a < b: b goes if its best earlier neighbour still stands."""
        order = np.lexsort((a, -s, b))
        a, b, s = a[order].tolist(), b[order].tolist(), s[order].tolist()
        decided = -1
        for x, y, sc in zip(a, b, s):
            if y == decided:
                continue
            if dup[x] < 0:
                dup[y], score[y] = x, sc
                decided = y


def lsh_bands(threshold: float, recall: float = 0.95, max_bands: int = 48) -> tuple[int, int]:
    """(bands, rows) that make any pair with F1 >= threshold a candidate with probability >= recall.

    Such a pair's tagged-token Jaccard is at least j = t/(2-t); a band of r rows matches with
    probability j**r, so b bands miss it with (1 - j**r)**b. More rows cut false candidates;
    take the most rows that still need no more than `max_bands` bands.
    """
    j = threshold / (2.0 - threshold)
    best = (1, 1)
    for rows in range(1, 9):
        p = j**rows
        bands = 1 if p >= 1.0 else math.ceil(math.log(1.0 - recall) / math.log(1.0 - p))
        if bands <= max_bands:
            best = (bands, rows)
    return best


class _MinHash:
    """MinHash LSH signatures on token n-grams (characters, for Chinese): approximate recall, cheap at scale.

    Defaults were chosen on the 52K Chinese Alpaca instructions at F1 0.7: single tagged tokens
    (bigrams of 10-20 character texts share too little) and bands from `lsh_bands`: at 0.7,
    35 bands of 4 rows make any true pair a candidate with probability >= 0.95 whatever the data.
    """

    def __init__(self, table: TokenTable, codes: Sequence[str], threshold: float, ngram: int = 1,
                 bands: int | None = None, rows: int | None = None, seed: int = 1) -> None:
        self.table = table
        self.codes = codes
        if bands is None or rows is None:
            bands, rows = lsh_bands(threshold)
        self.ngram, self.bands, self.rows = ngram, bands, rows
        rng = np.random.default_rng(seed)
        perms = bands * rows
        self.mul = rng.integers(1, 1 << 61, size=perms, dtype=np.uint64) | np.uint64(1)
        self.add = rng.integers(0, 1 << 61, size=perms, dtype=np.uint64)

    def signatures(self, recs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        tab = self.table
        recs = recs[tab.lens[recs] > 0]
        n = tab.lens[recs]
        q = self.ngram
        starts = np.zeros(len(recs), dtype=np.int64)
        np.cumsum(n[:-1], out=starts[1:])
        if q == 1:
            # Tagged tokens (的#0, 的#1): their Jaccard is >= t/(2-t) for every true pair.
            grams = n
            at = np.arange(int(n.sum()), dtype=np.int64) - np.repeat(starts, n)
            h = _mix(tab.ranks[np.repeat(tab.starts[recs], n) + at].astype(np.uint64))
        else:
            # Token codes in text order (the table holds them rarest first, which n-grams must not use).
            flat = np.frombuffer("".join(self.codes[i] for i in recs).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
            # n-grams starting at each position; a record shorter than q is one gram of itself.
            grams = np.maximum(n - q + 1, 1)
            rec_of = np.repeat(np.arange(len(recs), dtype=np.int64), grams)
            at = np.arange(len(rec_of), dtype=np.int64) - np.repeat(np.cumsum(grams) - grams, grams)
            h = np.zeros(len(rec_of), dtype=np.uint64)
            with np.errstate(over="ignore"):
                for k in range(q):
                    p = starts[rec_of] + at + k
                    valid = at + k < n[rec_of]
                    h = _mix(h * np.uint64(0x100000001B3) + np.where(valid, flat[np.minimum(p, len(flat) - 1)] + np.uint64(1), np.uint64(0)))
        offsets = np.zeros(len(recs), dtype=np.int64)
        np.cumsum(grams[:-1], out=offsets[1:])
        sig = np.empty((len(recs), self.bands * self.rows), dtype=np.uint64)
        with np.errstate(over="ignore"):
            for j in range(self.bands * self.rows):
                sig[:, j] = np.minimum.reduceat(h * self.mul[j] + self.add[j], offsets)
        band = np.full((len(recs), self.bands), np.uint64(0), dtype=np.uint64)
        with np.errstate(over="ignore"):
            for b in range(self.bands):
                acc = np.full(len(recs), np.uint64(b + 1), dtype=np.uint64)
                for r in range(self.rows):
                    acc = _mix(acc * np.uint64(0x9E3779B97F4A7C15) + sig[:, b * self.rows + r])
                band[:, b] = acc
        rec = np.repeat(recs, self.bands)
        # No positional bound: any band match is a candidate (the length filter still applies).
        return band.ravel(), rec, np.full(len(rec), 1 << 40, dtype=np.int64)
