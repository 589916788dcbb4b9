"""Seed-file profile for `selfinstruct seeds check`: counts, families, shares, lengths, scripts, near-copies."""

from __future__ import annotations

import collections
import re
import statistics
from dataclasses import dataclass, field

from rapidfuzz import process
from rapidfuzz.distance import Indel

from selfinstruct.rules import measure, script_of
from selfinstruct.seeds import SeedSet
from selfinstruct.similarity import Vocabulary

# Frequent characters that exist only in one of the two standard scripts (simplified, traditional).
_PAIRS = (
    "这這 说說 为為 们們 时時 来來 对對 国國 会會 个個 学學 发發 动動 经經 过過 还還 进進 实實 现現 问問 题題 "
    "关關 开開 长長 与與 书書 车車 东東 边邊 见見 电電 话話 语語 请請 让讓 认認 识識 读讀 写寫 买買 卖賣 钱錢 "
    "门門 间間 网網 应應 该該 从從 无無 气氣 样樣 种種 点點 难難 图圖 数數 总總 结結 给給 论論 历歷 节節 乐樂 "
    "诗詩 词詞 听聽 业業 产產 处處 义義 习習 简簡 单單 类類 帮幫 几幾 机機 报報 将將 热熱 华華 岁歲 观觀 视視"
)
SIMPLIFIED_ONLY = frozenset(p[0] for p in _PAIRS.split() if p[0] != p[1])
TRADITIONAL_ONLY = frozenset(p[1] for p in _PAIRS.split() if p[0] != p[1])


def han_variant(text: str) -> str:
    """simplified, traditional, mixed or unknown, from characters unique to one standard."""
    s = sum(1 for ch in text if ch in SIMPLIFIED_ONLY)
    t = sum(1 for ch in text if ch in TRADITIONAL_ONLY)
    if s and t:
        return "mixed"
    return "simplified" if s else "traditional" if t else "unknown"


def family_of(name: str) -> str:
    """The family prefix of a task name: `writing-apology_email` → `writing`."""
    return re.split(r"[-_/:]", name, maxsplit=1)[0] if name else "(none)"


@dataclass
class SeedProfile:
    """What `seeds check` reports, and the problems that make it fail."""

    path: str
    count: int
    families: dict[str, int]
    with_input_share: float
    classification_share: float
    instruction_length: dict[str, float]
    output_length: dict[str, float]
    scripts: dict[str, int]
    variants: dict[str, int]
    near_pairs: list[tuple[str, str, float]]
    problems: list[str] = field(default_factory=list)


def _stats(values: list[int], unit: str) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "mean": round(statistics.fmean(values), 1), "max": max(values), "unit": unit}


def near_pairs(texts: list[str], ids: list[str], threshold: float = 0.7) -> list[tuple[str, str, float]]:
    """Every pair of texts at ROUGE-L F1 >= threshold (all pairs; seed files are small)."""
    vocab = Vocabulary()
    codes = [vocab.encode(t) for t in texts]
    scores = process.cdist(codes, codes, scorer=Indel.normalized_similarity, score_cutoff=threshold, workers=-1)
    pairs = []
    for i in range(len(codes)):
        for j in range(i + 1, len(codes)):
            if scores[i, j] >= threshold:
                pairs.append((ids[i], ids[j], round(float(scores[i, j]), 4)))
    return pairs


def profile(seeds: SeedSet, threshold: float = 0.7) -> SeedProfile:
    """Profile a seed set and list what is wrong with it."""
    tasks = seeds.tasks
    scripts = collections.Counter(script_of(t.instruction) for t in tasks)
    main_script = scripts.most_common(1)[0][0]
    variants = collections.Counter(han_variant(t.instruction + "".join(i.output for i in t.instances)) for t in tasks) if main_script == "zh" else collections.Counter()
    ins_len = [measure(t.instruction)[0] for t in tasks]
    unit = "chars" if main_script in ("zh", "ja", "ko") else "words"
    out_len = [measure(t.instances[0].output)[0] for t in tasks]
    result = SeedProfile(
        path=str(seeds.path),
        count=len(tasks),
        families=dict(collections.Counter(family_of(t.name) for t in tasks).most_common()),
        with_input_share=round(sum(any(i.input for i in t.instances) for t in tasks) / len(tasks), 3),
        classification_share=round(sum(t.is_classification for t in tasks) / len(tasks), 3),
        instruction_length=_stats(ins_len, unit),
        output_length=_stats(out_len, unit),
        scripts=dict(scripts),
        variants=dict(variants),
        near_pairs=near_pairs([t.instruction for t in tasks], [t.id for t in tasks], threshold),
    )
    off = [t for t in tasks if script_of(t.instruction) != main_script]
    for t in off[:10]:
        result.problems.append(f"{seeds.path}:{t.line}: instruction is mainly {script_of(t.instruction)}, the file is mainly {main_script}")
    if variants.get("simplified") and variants.get("traditional") or variants.get("mixed"):
        result.problems.append(f"{seeds.path}: mixes simplified and traditional characters ({dict(variants)})")
    line_of = {t.id: t.line for t in tasks}
    for a, b, score in result.near_pairs[:20]:
        result.problems.append(f"{seeds.path}:{line_of[b]}: instruction {b} is a near-copy of {a} (line {line_of[a]}), ROUGE-L {score:.2f}")
    for t in tasks:
        if not 1 <= len(t.instances) <= 3:
            result.problems.append(f"{seeds.path}:{t.line}: {t.id} has {len(t.instances)} instances (1-3 expected)")
        if any(not i.output.strip() for i in t.instances):
            result.problems.append(f"{seeds.path}:{t.line}: {t.id} has an empty output")
    return result
