"""A fake OpenAI-compatible teacher on 127.0.0.1 for tests and benchmarks (asyncio, no framework)."""

from __future__ import annotations

import asyncio
import json
import random
import re
import threading
import time
from typing import Any

ZH_WORDS = (
    "春天 秋天 城市 乡村 学生 老师 医生 工程师 程序 数据 历史 文化 经济 环境 能源 交通 健康 饮食 运动 音乐 "
    "电影 小说 诗歌 旅行 节日 家庭 朋友 公司 市场 产品 客户 服务 科技 手机 电脑 网络 安全 隐私 教育 考试 "
    "读书 写作 语言 翻译 数学 物理 化学 生物 天文 地理 气候 海洋 森林 河流 山脉 动物 植物 农业 工业 商业 "
    "银行 投资 保险 法律 政策 社会 心理 情绪 睡眠 咖啡 茶叶 面包 米饭 火锅 饺子 月饼 长城 故宫 西湖 黄河 "
    "长江 熊猫 机器人 人工智能 算法 函数 变量 数组 排序 搜索 概率 统计 面积 速度 时间 成本 利润 预算 计划 "
    "会议 邮件 简历 面试 团队 领导 沟通 合作 创新 习惯 目标 效率 压力 运动会 图书馆 博物馆 高铁 飞机 地铁 "
    "自行车 垃圾分类 志愿者 社区 邻居 宠物 花园 厨房 菜谱 天气 台风 地震 火山 宇宙 星球 月亮 太阳 成语 "
    "古诗 对联 书法 京剧 茶道 丝绸 瓷器 剪纸 灯笼 龙舟 端午 中秋 春节 元宵 清明 重阳 红包 鞭炮 故事 童话"
).split()
ZH_PREFIXES = "请解释 谈谈 分析 说明 比较 介绍 总结 评价 描述 列举 讨论 梳理 概括 阐述 举例说明 简述 探讨 归纳 点评 对比".split()
ZH_SUFFIXES = "之间的联系 各自的特点 的共同点 对生活的影响 的发展趋势 的优缺点 背后的原理 的常见误区 的历史渊源 的实际用途".split()
EN_WORDS = (
    "river mountain city village student teacher doctor engineer program data history culture economy energy "
    "traffic health diet sport music movie novel poem travel holiday family friend company market product client "
    "service science phone computer network security privacy education exam reading writing language math physics "
    "chemistry biology astronomy climate ocean forest animal plant farming industry bank investment insurance law "
    "policy society emotion sleep coffee tea bread rice garden kitchen recipe weather storm volcano universe planet"
).split()
EN_PREFIXES = "Explain|Compare|Describe|Discuss|Summarize|Contrast|Analyze|Review|Outline|Connect".split("|")
EN_SUFFIXES = "and how they relate|for a curious teenager|with one example each|in under fifty words|and their common ground|and why they matter today".split("|")
BAD_ITEMS = (
    ("请描述这张图片中的{a}", "", "图中有……"),
    ("解释{a}的意义", "", "抱歉，我无法完成这个任务。"),
    ("Describe the history of {a} briefly", "", "It is long."),
    ("说明{a}的特点", "", ""),
    ("把这句话原样输出", "{a}", "{a}"),
    ("，{a}是什么", "", "一种东西。"),
    ("{a}", "", "太短了"),
)


def _now() -> float:
    return time.monotonic()


class FakeTeacher:
    """An OpenAI-compatible chat server with latency, faults, quirks and exact usage bookkeeping."""

    def __init__(self, **knobs: Any) -> None:
        defaults = dict(
            latency=0.0, latency_jitter=0.0, seed=0, p_429=0.0, retry_after=1.0, p_500=0.0, p_timeout=0.0,
            timeout_sleep=30.0, p_malformed=0.0, p_garbage=0.0, p_truncated=0.0, p_bad_items=0.0,
            p_near_duplicate=0.0, usage_mode="exact", think=False, code_fence=False, reject_max_tokens=False,
            no_json_mode=False, p_empty_length=0.0, api_key=None, models=None, forbidden=False, max_requests=None,
            reply=None, overrun=0, keep_contents=True, log_times=False,
        )
        unknown = set(knobs) - set(defaults)
        if unknown:
            raise TypeError(f"unknown knobs: {sorted(unknown)}")
        self.knobs = {**defaults, **knobs}
        self._lock = threading.Lock()
        self._stats: dict[str, Any] = {
            "requests_received": 0, "by_status": {}, "responses_ok": 0, "prompt_tokens_sent": 0,
            "completion_tokens_sent": 0, "sent_contents": [], "sent_ids": [], "last_request": {}, "max_in_flight": 0,
            # With log_times: wall-clock arrival of every chat request, and [time, tokens] of every reply.
            "arrivals": [], "token_log": [],
        }
        self._in_flight = 0
        self._fault_rng = random.Random(f"faults:{self.knobs['seed']}")
        self._sent_instructions: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # ---- lifecycle ---------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def stats(self) -> dict[str, Any]:
        with self._lock:
            return json.loads(json.dumps(self._stats))

    def __enter__(self) -> "FakeTeacher":
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=1024))
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        loop = self._loop
        if loop is None:
            return

        async def stop() -> None:
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(10)

    async def serve_forever(self, port: int = 0) -> None:
        """Serve in the current event loop (the subprocess form)."""
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", port, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        await self._server.serve_forever()

    # ---- HTTP --------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
                status, extra, payload = await self._route(method, path, headers, body)
                if status is None:
                    writer.close()
                    return
                reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
                          429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}.get(status, "X")
                out = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json", f"Content-Length: {len(payload)}"]
                out += [f"{k}: {v}" for k, v in extra.items()]
                writer.write(("\r\n".join(out) + "\r\n\r\n").encode("latin-1") + payload)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            try:
                writer.close()
            except Exception:
                pass

    def _count(self, status: int) -> None:
        with self._lock:
            key = str(status)
            self._stats["by_status"][key] = self._stats["by_status"].get(key, 0) + 1

    @staticmethod
    def _error(status: int, message: str, kind: str, code: str | None = None) -> tuple[int, dict, bytes]:
        body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
        return status, {}, json.dumps(body).encode()

    async def _route(self, method: str, path: str, headers: dict, body: bytes):
        k = self.knobs
        if k["api_key"] and headers.get("authorization") != f"Bearer {k['api_key']}":
            self._count(401)
            return self._error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        if k["forbidden"]:
            self._count(403)
            return self._error(403, "You are not allowed to use this model.", "permission_error")
        if method == "GET" and path.rstrip("/").endswith("/models"):
            names = k["models"] or ["fake-model"]
            data = {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in names]}
            return 200, {}, json.dumps(data).encode()
        if method != "POST" or not path.rstrip("/").endswith("/chat/completions"):
            return self._error(404, f"no route {path}", "invalid_request_error")
        return await self._chat(json.loads(body or b"{}"))

    async def _chat(self, req: dict):
        k = self.knobs
        with self._lock:
            self._stats["requests_received"] += 1
            n_req = self._stats["requests_received"]
            self._stats["last_request"] = {key: req.get(key) for key in ("model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "response_format", "n", "stop")}
            if k["log_times"]:
                self._stats["arrivals"].append(time.time())
            self._in_flight += 1
            self._stats["max_in_flight"] = max(self._stats["max_in_flight"], self._in_flight)
            roll = self._fault_rng.random()
            jitter = self._fault_rng.uniform(-1, 1) * k["latency_jitter"]
        try:
            if k["max_requests"] is not None and n_req > k["max_requests"]:
                self._count(500)
                return self._error(500, "request cap reached", "server_error")
            if k["models"] and req.get("model") not in k["models"]:
                self._count(404)
                return self._error(404, f"The model `{req.get('model')}` does not exist", "invalid_request_error", "model_not_found")
            if k["reject_max_tokens"] and "max_tokens" in req:
                self._count(400)
                return self._error(400, "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead.", "invalid_request_error", "unsupported_parameter")
            if k["no_json_mode"] and req.get("response_format"):
                self._count(400)
                return self._error(400, "response_format is not supported by this server", "invalid_request_error")
            await asyncio.sleep(max(0.0, k["latency"] + jitter))
            edge = 0.0
            for name in ("p_429", "p_500", "p_timeout", "p_malformed"):
                edge += k[name]
                if roll < edge:
                    return await self._fault(name, req)
            return self._complete(req, n_req, roll)
        finally:
            with self._lock:
                self._in_flight -= 1

    async def _fault(self, name: str, req: dict):
        k = self.knobs
        if name == "p_429":
            self._count(429)
            status, _, payload = self._error(429, "Rate limit reached. Please try again later.", "requests", "rate_limit_exceeded")
            return 429, {"Retry-After": f"{k['retry_after']:g}"}, payload
        if name == "p_500":
            self._count(500)
            return self._error(500, "The server had an error while processing your request.", "server_error")
        if name == "p_timeout":
            await asyncio.sleep(k["timeout_sleep"])
            self._count(0)
            return None, {}, b""
        self._count(200)
        return 200, {}, b'{"id": "chatcmpl-broken", "object": "chat.completion", "choices": [{"index": 0, "mess'

    # ---- content -----------------------------------------------------------------------

    def _complete(self, req: dict, n_req: int, roll: float):
        k = self.knobs
        messages = req.get("messages") or []
        prompt = "\n".join(str(m.get("content", "")) for m in messages)
        user = next((str(m.get("content", "")) for m in reversed(messages) if m.get("role") == "user"), prompt)
        rng = random.Random(f"{k['seed']}:{n_req}")
        finish = "stop"
        if k["reply"] is not None:
            content = k["reply"](req, rng)
        else:
            zh = len(re.findall(r"[\u4e00-\u9fff]", user)) > len(re.findall(r"[A-Za-z]", user))
            m = re.search(r"(\d+)\s*个", user) if zh else re.search(r"(\d+)\s+(?:new\s+)?tasks", user)
            count = int(m.group(1)) if m else 10
            as_json = (req.get("response_format") or {}).get("type") == "json_object"
            items = [self._item(rng, zh) for _ in range(count)]
            content = self._render(items, zh, as_json)
            if rng.random() < k["p_truncated"]:
                content = content[: max(1, len(content) - rng.randint(5, 40))]
                finish = "length"
            if rng.random() < k["p_garbage"]:
                content = "好的，我明白了你的要求，但我想先聊聊别的。" if zh else "Sure, but first let me say something unrelated."
            if rng.random() < k["p_empty_length"]:
                content, finish = "", "length"
            if k["overrun"] and not as_json:
                # A server that ignores the asked count and stop sequences: more items, then an echo
                # of the prompt's examples, cut mid-item by the token limit.
                extra = [self._item(rng, zh) for _ in range(k["overrun"])]
                tail = self._render(items + extra, zh, False).split("\n###\n", len(items))[-1]
                marker = "示例1" if zh else "Example 1"
                echo = user[user.find(marker):][:400] if marker in user else ""
                content = content + "\n###\n" + tail + "\n\n" + echo
                content, finish = content[: len(content) - 7], "length"
        if k["think"]:
            content = "<think>Let me plan the tasks first.</think>\n" + content
        if k["code_fence"]:
            content = "```\n" + content + "\n```"
        completion: dict[str, Any] = {
            "id": f"chatcmpl-{n_req}", "object": "chat.completion", "created": int(time.time()), "model": req.get("model", "fake"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
        }
        prompt_tokens = len(prompt) // 2 + 10
        completion_tokens = len(content) // 2 + 1
        mode = k["usage_mode"]
        counted = (0, 0)
        if mode == "exact":
            completion["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}
            counted = (prompt_tokens, completion_tokens)
        elif mode == "zero":
            completion["usage"] = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        elif mode == "completion_one":
            completion["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": 1, "total_tokens": prompt_tokens + 1}
            counted = (prompt_tokens, 1)
        self._count(200)
        with self._lock:
            self._stats["responses_ok"] += 1
            self._stats["prompt_tokens_sent"] += counted[0]
            self._stats["completion_tokens_sent"] += counted[1]
            if k["keep_contents"]:
                self._stats["sent_contents"].append(content)
                self._stats["sent_ids"].append(completion["id"])
            if k["log_times"]:
                self._stats["token_log"].append([time.time(), counted[0] + counted[1]])
        return 200, {}, json.dumps(completion, ensure_ascii=False).encode()

    def _item(self, rng: random.Random, zh: bool) -> tuple[str, str, str]:
        k = self.knobs
        if rng.random() < k["p_bad_items"]:
            a = rng.choice(ZH_WORDS)
            ins, inp, out = rng.choice(BAD_ITEMS)
            return ins.format(a=a), inp.format(a=a), out.format(a=a)
        if self._sent_instructions and rng.random() < k["p_near_duplicate"]:
            base = rng.choice(self._sent_instructions)
            pos = rng.randrange(len(base))
            return base[:pos] + ("某" if zh else "x") + base[pos + 1 :], "", "与之前类似的回答。" if zh else "A similar answer."
        if zh:
            # Few fixed characters and five random words: two instructions rarely share enough to reach 0.7.
            ins = rng.choice(ZH_PREFIXES) + "、".join(rng.sample(ZH_WORDS, 5)) + rng.choice(ZH_SUFFIXES)
            inp = "、".join(rng.sample(ZH_WORDS, 3)) if rng.random() < 0.33 else ""
            out = "".join(rng.sample(ZH_WORDS, rng.randint(6, 30)))
        else:
            ins = rng.choice(EN_PREFIXES) + " " + ", ".join(rng.sample(EN_WORDS, 5)) + " " + rng.choice(EN_SUFFIXES)
            inp = ", ".join(rng.sample(EN_WORDS, 3)) if rng.random() < 0.33 else ""
            out = " ".join(rng.sample(EN_WORDS, rng.randint(6, 30)))
        with self._lock:
            self._sent_instructions.append(ins)
            if len(self._sent_instructions) > 5000:
                del self._sent_instructions[:1000]
        return ins, inp, out

    @staticmethod
    def _render(items: list[tuple[str, str, str]], zh: bool, as_json: bool) -> str:
        if as_json:
            return json.dumps({"tasks": [{"instruction": a, "input": b, "output": c} for a, b, c in items]}, ensure_ascii=False)
        if zh:
            blocks = [f"{i}. 指令：{a}\n输入：{b or '<无输入>'}\n输出：{c}" for i, (a, b, c) in enumerate(items, 1)]
        else:
            blocks = [f"{i}. Instruction: {a}\nInput: {b or '<noinput>'}\nOutput: {c}" for i, (a, b, c) in enumerate(items, 1)]
        return "\n###\n".join(blocks)


def main() -> None:
    """Run as a process: print the base URL when ready, dump stats to --stats-out every second and on SIGTERM."""
    import argparse
    import os
    import signal
    import sys

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--stats-out", default=None)
    parser.add_argument("--config", default=None, help="JSON object of knobs")
    for name, default in FakeTeacher().knobs.items():
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=None)
    args = parser.parse_args()
    knobs = json.loads(args.config) if args.config else {}
    for name in FakeTeacher().knobs:
        value = getattr(args, name, None)
        if value is not None:
            knobs[name] = int(value) if name in ("seed", "max_requests") else value
    fake = FakeTeacher(**knobs)

    def dump() -> None:
        if args.stats_out:
            tmp = args.stats_out + ".tmp"
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(fake.stats, fh, ensure_ascii=False)
            os.replace(tmp, args.stats_out)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        server = asyncio.ensure_future(fake.serve_forever(args.port))
        while not fake.port:
            await asyncio.sleep(0.01)
        print(fake.base_url, flush=True)
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
            dump()
        server.cancel()
        dump()

    asyncio.run(run())
    sys.exit(0)


if __name__ == "__main__":
    main()
