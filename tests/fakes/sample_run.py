"""A realistic finished run directory (Chinese records, evol lineage, rejections) built with RunDir.

`python tests/fakes/sample_run.py` rewrites docs/sample-card.md from it; tests/test_card.py checks the file is current.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
from pathlib import Path

from selfinstruct.rundir import LEDGER, RECORDS, REJECTED, RunDir

TEMPLATE_SHA = hashlib.sha256(b"generate_zh.jinja").hexdigest()
EVOLVE_SHA = hashlib.sha256(b"evolve_zh.jinja").hexdigest()
SEEDS_SHA = hashlib.sha256(b"seeds").hexdigest()
JUDGE_SHA = hashlib.sha256(b"judge_zh.jinja").hexdigest()
SAMPLE_CARD = Path(__file__).resolve().parents[2] / "docs" / "sample-card.md"

TASKS = [
    ("把下面的句子翻译成英文。", "今天天气很好，我们去公园散步吧。", "The weather is nice today; let's take a walk in the park."),
    ("写一首关于秋天的五言绝句。", "", "秋风扫落叶，\n寒雁向南飞。\n霜染千山色，\n归人踏月回。"),
    ("解释什么是“边际效用递减”，并举一个生活中的例子。", "", "边际效用递减是指……例如吃第一个包子很满足，第五个就没那么香了。"),
    ("给下面的商品写一句广告语。", "一款保温时间长达12小时的不锈钢水杯", "十二小时温度不变，一杯暖意陪你整天。"),
    ("判断下面这句话的情感是积极还是消极。", "这家餐厅的服务太慢了，菜也凉了。", "消极。"),
    ("列出三种提高睡眠质量的方法。", "", "1. 固定作息时间；2. 睡前一小时不看手机；3. 保持卧室安静、黑暗、凉爽。"),
    ("用一句话总结下面的段落。", "人工智能正在改变医疗、教育和交通等行业，但也带来了隐私和就业方面的挑战。", "人工智能在推动多个行业变革的同时也带来了隐私与就业挑战。"),
    ("把下面的数字从小到大排序。", "42, 7, 19, 3, 88", "3, 7, 19, 42, 88"),
    ("写一封简短的请假邮件。", "原因：发烧，请假一天", "王经理您好：我今天发烧，想请假一天，工作已交接给小李。谢谢！"),
    ("解释成语“画蛇添足”的意思。", "", "比喻做了多余的事，反而把事情弄糟。"),
    ("计算下面表达式的值。", "(15 + 5) × 3 - 10", "50"),
    ("为一家咖啡店想三个店名。", "", "1. 晨光咖啡 2. 慢时光 3. 豆香小筑"),
]


def make_run(path: Path, *, n: int = 12, status: str = "completed", license: str | None = "Apache-2.0",
             command: str = "selfinstruct generate --seeds seeds/zh_seed_tasks.jsonl --n 12 --model gpt-4o-mini --evol-rounds 1",
             manifest: bool = True, seeds_path: str = "zh_seed_tasks.jsonl", judge: bool = False) -> Path:
    """Write records.jsonl, rejected.jsonl, requests.jsonl and manifest.json for a small zh run (`judge`: gated by generate --judge)."""
    run = RunDir(path)
    run.prepare()
    records = []
    for i in range(n):
        instruction, input_text, output = TASKS[i % len(TASKS)]
        rid = f"r{i // 3 + 1:06d}"
        meta = {
            "seed_ids": [f"seed_task_{i % 5}", f"seed_task_{(i + 2) % 5}"],
            "template": "generate_zh.jinja",
            "template_sha256": TEMPLATE_SHA,
            "model": "gpt-4o-mini",
            "request_id": rid,
            "finish_reason": "stop",
            "usage": {"prompt_tokens": 101.333, "completion_tokens": 40.5, "estimated": False},
            "round": 0,
            "raw": f"{i + 1}. 指令：{instruction}",
        }
        if i % 4 == 3:  # an evolved variant of the record before it
            meta["evol"] = [{"round": 1, "op": "deepen" if i % 8 == 3 else "concretize", "parent_id": records[-1]["id"]}]
            meta["round"] = 1
        records.append({"id": f"{rid}.{i % 3 + 1}", "instruction": instruction + ("（要求更具体）" if "evol" in meta else ""),
                        "input": input_text, "output": output, "meta": meta})
    run.append(RECORDS, records)
    rejected = [
        {"id": "r000009.1", "instruction": "请看这张图片并描述。", "input": "", "output": "图中有一只猫。", "reason": "blacklist",
         "detail": "instruction mentions '图片'", "meta": {"seed_ids": ["seed_task_1"], "model": "gpt-4o-mini"}},
        {"id": "r000009.2", "instruction": "把下面的句子翻译成英文。", "input": "", "output": "OK", "reason": "near-duplicate",
         "detail": "ROUGE-L 0.912 with r000001.1", "meta": {"seed_ids": ["seed_task_2"], "model": "gpt-4o-mini"}},
        {"id": "r000001.1.e1", "instruction": TASKS[0][0], "input": TASKS[0][1], "output": "", "reason": "no-gain",
         "detail": "identical to its parent", "parent_id": "r000001.1", "parent_instruction": TASKS[0][0],
         "meta": {"seed_ids": ["seed_task_0", "seed_task_2"], "model": "gpt-4o-mini", "stage": "evolve", "op": "deepen", "round": 1,
                  "evol": [{"round": 1, "op": "deepen", "parent_id": "r000001.1"}]}},
    ] + ([  # what the quality gate rejected
        {"id": "r000005.3", "instruction": "列出三种常见的哺乳动物。", "input": "", "output": "鲨鱼、海豚、鲸鱼。", "reason": "low-score",
         "detail": "2/5 < --min-score 4: 鲨鱼是鱼类，不是哺乳动物",
         "meta": {"seed_ids": ["seed_task_3"], "model": "gpt-4o-mini", "stage": "judge", "gated_stage": "generate",
                  "judge": {"score": 2, "reason": "鲨鱼是鱼类，不是哺乳动物", "model": "gpt-4o-mini"}}},
    ] if judge else [])
    run.append(REJECTED, rejected)
    run.append(LEDGER, [{"request_no": k, "request_id": f"r{k:06d}", "status": "ok", "content": "…"} for k in range(1, 6)])
    if manifest:
        run.write_manifest({
            "selfinstruct_version": "0.1.0",
            "command": command,
            "created": "2025-01-02T03:04:05+00:00",
            "updated": "2025-01-02T03:14:05+00:00",
            "status": status,
            "config": {"model": "gpt-4o-mini", "lang": "zh", "n": n, "per_request": 10, "num_examples": 3, "temperature": 1.0,
                       "top_p": 1.0, "max_tokens": 3072, "similarity": 0.7, "seed": 42, "seeds_path": "seeds/zh_seed_tasks.jsonl",
                       "base_url": None, "json_mode": False, "evol_rounds": 1},
            "seeds": {"path": seeds_path, "count": 175, "sha256": SEEDS_SHA, "license": license},
            "templates": {"generate": {"name": "generate_zh.jinja", "sha256": TEMPLATE_SHA},
                          "evolve": {"name": "evolve_zh.jinja", "sha256": EVOLVE_SHA}},
            "teacher": {"model": "gpt-4o-mini", "endpoint_kind": "openai"},
            "filters": {"similarity": 0.7, "rules": ["blacklist", "empty", "refusal", "too-long", "too-short", "wrong-language"], "lang": "zh",
                        # as Evolution writes them: prompt-leak, refusal-response and stopword-response never fired
                        "evol_checks": ["near-duplicate", "no-gain", "prompt-leak", "refusal-response", "stopword-response"]},
            "counts": {"kept": n, "rejected": {"blacklist": 1, "near-duplicate": 1, "no-gain": 1}, "requests": 5, "failed_requests": 0},
            "usage": {"prompt_tokens": 5200, "completion_tokens": 2100, "estimated": False},
            "cost": {"usd": 0.00204, "priced": True, "price_in_per_1m": 0.15, "price_out_per_1m": 0.6, "price_source": "table"},
            "stages": {"generate": {"requests": 4, "prompt_tokens": 4000, "completion_tokens": 1700, "usd": 0.00162},
                       "evolve": {"requests": 1, "prompt_tokens": 1200, "completion_tokens": 400, "usd": 0.00042}},
            "evol": {"rounds": 1, "rounds_completed": 1, "ops": {  # the shape Evolution.evol_summary writes
                "deepen": {"1": {"kept": 2, "eliminated": {"no-gain": 1}}},
                "concretize": {"1": {"kept": 1, "eliminated": {}}}}},
        } | (JUDGED if judge else {}))
    run.close()
    return path


# The manifest sections generate --judge --moderate changes (judging.Judging.summary's shape, a judge stage at the teacher's price).
JUDGED = {
    "command": "selfinstruct generate --seeds seeds/zh_seed_tasks.jsonl --n 12 --model gpt-4o-mini --evol-rounds 1 --judge --moderate",
    "counts": {"kept": 12, "rejected": {"blacklist": 1, "near-duplicate": 1, "no-gain": 1, "low-score": 1}, "requests": 18, "failed_requests": 0},
    "usage": {"prompt_tokens": 14200, "completion_tokens": 2700, "estimated": False},
    "cost": {"usd": 0.00375, "priced": True, "price_in_per_1m": 0.15, "price_out_per_1m": 0.6, "price_source": "table"},
    "stages": {"generate": {"requests": 4, "prompt_tokens": 4000, "completion_tokens": 1700, "usd": 0.00162},
               "evolve": {"requests": 1, "prompt_tokens": 1200, "completion_tokens": 400, "usd": 0.00042},
               "judge": {"requests": 13, "prompt_tokens": 9000, "completion_tokens": 600, "usd": 0.00171}},
    "judge": {"model": "gpt-4o-mini", "endpoint_kind": "openai", "template": {"name": "judge_zh.jinja", "sha256": JUDGE_SHA},
              "min_score": 4.0, "judge": True, "moderate": True, "moderation": "endpoint", "completed": True, "judged": 13,
              "kept": 12, "rejected": {"low-score": 1}, "histogram": {"1": 0, "2": 1, "3": 0, "4": 5, "5": 7}},
}


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under a directory with its bytes, to prove nothing changed."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def sample_card(workdir: Path) -> str:
    """The README.md `selfinstruct export --test-size 0.25` writes for the sample run: docs/sample-card.md."""
    from selfinstruct.export import export_run

    # Relative paths: the card's title and load_dataset() path must not depend on where it was made.
    with contextlib.chdir(workdir):
        make_run(Path("zh-sample"), judge=True)
        export_run(Path("zh-sample"), Path("exports/zh-sample"), "alpaca", test_size=0.25)
        return Path("exports/zh-sample/README.md").read_text(encoding="utf-8")


if __name__ == "__main__":
    import tempfile

    import shutil

    with tempfile.TemporaryDirectory() as tmp:
        SAMPLE_CARD.write_text(sample_card(Path(tmp)), encoding="utf-8")
        # The card links figures/*.png beside it: copy them next to docs/sample-card.md so it renders as exported.
        (SAMPLE_CARD.parent / "figures").mkdir(exist_ok=True)
        for png in sorted((Path(tmp) / "exports" / "zh-sample" / "figures").glob("*.png")):
            shutil.copyfile(png, SAMPLE_CARD.parent / "figures" / png.name)
    print(f"wrote {SAMPLE_CARD}", file=sys.stderr)
