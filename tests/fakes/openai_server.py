"""A fake OpenAI-compatible teacher on 127.0.0.1 for tests and benchmarks.

Plain asyncio streams (standard library only): HTTP/1.1 with keep-alive, one coroutine per
connection, no thread per request. Speaks `GET /v1/models`, `GET /v1/models/{id}` and
non-streaming `POST /v1/chat/completions`.

In-process::

    with FakeTeacher(latency=0.05, seed=1, p_429=0.1) as fake:
        client = openai.OpenAI(base_url=fake.base_url, api_key="sk-test")
        ...
        fake.stats["prompt_tokens_sent"]

The server runs its own event loop in a daemon thread; `fake.stats` is a thread-safe snapshot
(a copy), `fake.configure(**knobs)` changes knobs while serving, `fake.reset_stats()` starts over.

As a process (benchmarks, kill tests)::

    python tests/fakes/openai_server.py --port 0 --latency 0.5 --stats-out stats.json [--config JSON|FILE] [--p-429 0.1 ...]

prints `http://127.0.0.1:PORT/v1` (flushed) once listening, rewrites the stats file atomically every
second while they change, and on SIGTERM/SIGINT writes it once more and exits 0. It also exits by
itself after --max-seconds (default 1800) or when its parent process dies. `--help` lists every knob
(each KNOBS name as a --flag-with-dashes; booleans also as --no-flag; --models a,b).

Replies: the last user message asks for N tasks (`(\\d+)\\s*个` in Chinese, `(\\d+) (new) tasks` in
English; 10 if neither matches). The reply is Chinese when that message has more Han characters than
ASCII letters. Items are numbered blocks separated by `###` lines (`指令：/输入：/输出：`, or
`Instruction:/Input:/Output:`; traditional 輸入/輸出 labels when the prompt uses them), or
`{"tasks": [...]}` when `response_format` is `json_object`. Instructions come from large word pools
and ~50 sentence frames per language, drawn from a per-request rng seeded by (seed, request number),
so two instructions almost never reach ROUGE-L 0.7 except the deliberate near-duplicates, which are
listed in `stats["near_duplicates"]` (deliberately bad items in `stats["bad_items"]`).

Knobs: see KNOBS below. Stats: see _new_stats below; token sums, `responses_ok` and `sent_contents`
count only responses actually written to a client still connected.
"""


from __future__ import annotations

import asyncio
import functools
import json
import os
import random
import re
import threading
import time
from typing import Any, Callable

try:
    from fakes.batch_api import FakeBatchAPI
except ImportError:  # run as a process: python tests/fakes/openai_server.py
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from batch_api import FakeBatchAPI

# ---------------------------------------------------------------------------------------------
# Word pools. Chinese words avoid the characters of the blacklist (图 画 视 频 照 录 附 件 绘 截 片),
# so that no concatenation can spell a blacklisted word; generated instructions are still checked.
# ---------------------------------------------------------------------------------------------

ZH_NOUNS = tuple(
    dict.fromkeys(
        """
春天 夏天 秋天 冬天 季节 气候 天气 台风 暴雨 雷电 彩虹 云朵 雪花 冰川 沙漠 草原 森林 湿地 河流 湖泊
海洋 山脉 高原 盆地 岛屿 海岸 港口 瀑布 峡谷 火山 地震 洪水 干旱 土壤 岩石 矿产 石油 煤炭 风能 太阳
月亮 星空 银河 宇宙 行星 彗星 卫星 引力 熊猫 老虎 狮子 大象 海豚 鲸鱼 蜜蜂 蝴蝶 蚂蚁 候鸟 企鹅 骆驼
猎豹 松鼠 兔子 金鱼 鹦鹉 青蛙 乌龟 恐龙 竹子 松树 柳树 荷花 菊花 牡丹 梅花 兰花 蘑菇 种子 果树 稻谷
小麦 玉米 大豆 茶树 苹果 西瓜 葡萄 橘子 香蕉 草莓 芒果 米饭 面条 饺子 包子 馒头 火锅 烧烤 月饼 粽子
汤圆 豆腐 咖啡 奶茶 绿茶 红茶 牛奶 酸奶 蛋糕 面包 蔬菜 水果 早餐 午餐 晚餐 外卖 菜谱 调料 酱油 厨房
餐厅 家庭 父母 孩子 爷爷 奶奶 邻居 朋友 同事 宠物 花园 阳台 客厅 卧室 家具 家务 购物 超市 快递 房租
储蓄 工资 账单 预算 保险 贷款 信用 手机 电脑 耳机 键盘 钥匙 雨伞 书包 衣服 鞋子 帽子 围巾 手表 眼镜
学生 老师 学校 校园 课堂 作业 考试 复习 课程 教材 大学 高中 小学 阅读 写作 作文 演讲 辩论 背诵 笔记
词汇 语法 拼音 汉字 成语 谚语 诗歌 散文 小说 童话 寓言 神话 传说 故事 剧本 数学 物理 化学 生物 天文
地理 历史 哲学 心理 经济 法律 政治 医学 工程 算法 程序 代码 函数 变量 数组 链表 循环 递归 排序 搜索
数据 模型 网络 电池 机器 系统 平台 接口 协议 密码 隐私 安全 病毒 漏洞 云端 编程 调试
版本 城市 乡村 社区 交通 地铁 高铁 公交 航班 机场 汽车 能源 环保 垃圾 回收 污染 人口 就业 创业 市场
价格 通胀 股票 基金 投资 银行 消费 广告 品牌 营销 客户 产品 服务 质量 物流 供应 制造 农业 工业 商业
旅游 酒店 景点 长城 故宫 西湖 黄河 长江 泰山 春节 元宵 清明 端午 中秋 重阳 七夕 灯笼 龙舟 红包 鞭炮
书法 京剧 茶道 丝绸 瓷器 剪纸 武术 太极 围棋 象棋 民歌 乐器 钢琴 吉他 舞蹈 戏剧 电影 综艺 新闻 杂志
报纸 博客 公司 团队 领导 员工 会议 报告 简历 面试 加班 绩效 目标 计划 项目 流程 效率 沟通 合作
谈判 创新 决策 风险 管理 战略 客服 招聘 培训 健康 睡眠 运动 跑步 游泳 瑜伽 饮食 营养 体重 心情 情绪
压力 焦虑 孤独 快乐 习惯 疾病 感冒 疫苗 医院 医生 护士 药物 牙齿 眼睛 时间 金钱 友谊 爱情 勇气 诚信
责任 自由 公平 梦想 记忆 好奇 耐心 礼貌 幽默 批评 赞美 灵感 传统 习俗 方言 节奏 旋律 色彩 味道 香气
温度 湿度 噪音 灯光 桥梁 隧道 道路 广场 公园 车站 码头 农场 果园 牧场 渔船 帆船 火车 轮船 飞机 火箭
沙发 书架 台灯 冰箱 空调 电梯 楼梯 窗户 门铃 花瓶 茶杯 筷子 碗筷 砂锅 蒸笼 菜刀 剪刀 毛笔 砚台 宣纸
邮票 硬币 纸币 钱包 背包 行李 签证 地址 电话 短信 微博 论坛 直播 游戏 玩具 积木 风筝 陀螺
足球 篮球 排球 羽毛 乒乓 网球 滑雪 登山 露营 钓鱼 园艺 烹饪 烘焙 手工 编织 陶艺 木工 摄影 收藏 魔术
""".split()
    )
)
ZH_VERBS = tuple(
    "提高 改善 减少 避免 培养 保持 选择 规划 准备 学习 理解 记住 整理 安排 处理 应对 评估 推广 设计 优化 "
    "平衡 控制 调整 解决 节约 保护 宣传 组织 改进 维护".split()
)
ZH_AUDIENCES = tuple(
    "小学生 初中生 高中生 大学新生 初学者 老年人 上班族 家长 外国游客 退休教师 新手司机 程序员 投资新手 "
    "农民朋友 社区居民 留学生 公司新人 运动爱好者 美食爱好者 历史迷 志愿者 店主 护士 厨师 大学教授 幼儿园老师".split()
)
ZH_ROLES = tuple(
    "导游 医生 厨师 律师 记者 教练 店主 消防员 宇航员 图书管理员 园丁 侦探 外交官 船长 面包师 科学家 村长 "
    "邮递员 裁缝 老中医 茶艺师 考古学家".split()
)
ZH_ROLES = tuple(r for r in ZH_ROLES if "图" not in r)
ZH_TONES = tuple("幽默 严肃 温柔 热情 冷静 夸张 正式 亲切 俏皮 诚恳 活泼 含蓄".split())
ZH_GENRES = tuple("短评 日记 通知 短信 演讲稿 新闻稿 感谢信 道歉信 请假条 推荐语 招聘启事 倡议书 歌词 顺口溜".split())
ZH_COUNTS = tuple("两 三 四 五 六 七 八".split())
ZH_IDIOMS = tuple(
    "画蛇添足 守株待兔 亡羊补牢 刻舟求剑 对牛弹琴 井底之蛙 杯弓蛇影 掩耳盗铃 叶公好龙 拔苗助长 狐假虎威 "
    "自相矛盾 望梅止渴 愚公移山 卧薪尝胆 破釜沉舟 纸上谈兵 三顾茅庐 塞翁失马 南辕北辙 熟能生巧 半途而废 "
    "一举两得 胸有成竹 班门弄斧 草木皆兵 入木三分 滥竽充数 鹬蚌相争 朝三暮四".split()
)
ZH_IDIOMS = tuple(i for i in ZH_IDIOMS if "画" not in i)
ZH_TAILS = tuple(
    "，并联系{n} ，重点谈{n} ，别提{n} ，举{n}的例子 ，顺带说说{n} ，结合{n} ，最后落到{n} ，对比{n}".split()
)

# Frames: `[a|b]` picks one alternative, {n} a noun phrase, {v} a verb, {p} an audience, {r} a role,
# {t} a tone, {g} a genre, {k} a count, {i} an idiom. Fixed text is kept short next to the slots.
ZH_FRAMES = (
    "[请|试着][解释|说明|讲讲]{n}、{n}、{n}与{n}的关系",
    "为{p}介绍{n}、{n}、{n}和{n}",
    "比较{n}、{n}、{n}与{n}",
    "列出{n}和{n}[影响|改变]{n}与{n}的[例子|原因]",
    "如何{v}{n}{n}中的{n}和{n}",
    "[写首|作一首]{n}诗，提到{n}、{n}和{n}",
    "[为什么|为何]{n}会影响{n}和{n}的{n}",
    "用{n}、{n}、{n}和{n}编个[故事|寓言|笑话]",
    "{n}、{n}和{n}哪个更适合{n}",
    "就{n}、{n}、{n}、{n}和{n}给{p}提建议",
    "[总结|概括]{n}和{n}对{n}与{n}的作用",
    "润色一段讲{n}、{n}、{n}和{n}的话",
    "评论{n}、{n}、{n}与{n}是褒是贬",
    "[策划|组织]{n}、{n}和{n}主题的{n}活动",
    "写{n}与{n}关于{n}和{n}的[对话|辩论]",
    "[假如|如果]没有{n}，{n}、{n}和{n}会怎样",
    "{n}和{n}给{n}{n}带来什么[好处|风险]",
    "推荐{v}{n}、{n}和{n}的{n}方法",
    "从{n}和{n}的角度[评价|分析]{n}与{n}",
    "[制定|规划]兼顾{n}、{n}和{n}的{n}计划",
    "把{n}、{n}、{n}、{n}和{n}按[重要性|难度]排序",
    "用一句话说明{n}、{n}和{n}的{n}",
    "为{n}{n}起名，突出{n}和{n}",
    "谈谈你对{n}、{n}、{n}和{n}的看法",
    "[分析|探讨]{n}对{n}、{n}和{n}的冲击",
    "找出{n}、{n}、{n}与{n}的共同点",
    "出道{n}、{n}、{n}和{n}的[数学|逻辑]题",
    "用“{i}”点评{n}、{n}、{n}、{n}和{n}",
    "把“{n}{n}改变了{n}{n}”译成英文",
    "[描述|描写]{n}{n}旁的{n}和{n}",
    "以{t}风格写{n}、{n}、{n}、{n}和{n}的{g}",
    "扮演{r}，介绍{n}、{n}、{n}和{n}",
    "把{n}、{n}、{n}和{n}结合起来",
    "哪些因素决定{n}、{n}和{n}的{n}",
    "给{r}写信谈{n}、{n}、{n}与{n}",
    "纠正{n}、{n}、{n}和{n}里的错误",
    "展望{n}、{n}和{n}的{n}前景",
    "梳理{n}、{n}、{n}和{n}的演变",
    "为{n}{n}写一条{n}{n}标语",
    "列举{n}、{n}、{n}和{n}的[趣事|常识|误区]",
    "{n}和{n}真能{v}{n}与{n}吗",
    "估算{n}、{n}、{n}和{n}的[开销|成本]",
    "向{p}解释{n}、{n}、{n}和{n}",
    "提取关于{n}、{n}、{n}和{n}的[人名|数字]",
    "判断“{n}{n}比{n}{n}更重要”的对错",
    "{n}{n}和{n}{n}有什么区别",
    "设计一份{n}、{n}和{n}的{n}问卷",
    "写一段{n}、{n}和{n}的{n}介绍",
    "统计{n}、{n}、{n}和{n}的[数量|比例]",
    "解释{n}、{n}和{n}背后的{n}原理",
)
ZH_OUT_LINKS = tuple("和 与 的 在 让 使 能够 往往 常常 需要 可以 通过 因此 同时 也 更 对 把 为".split())
ZH_OUT_PUNCT = ("，", "，", "，", "。", "；", "、")

EN_NOUNS = tuple(
    dict.fromkeys(
        """
river mountain city village student teacher doctor engineer program database history culture economy energy
traffic health diet sport music movie novel poem journey holiday family friend company market product customer
service science phone computer network security privacy education exam reading writing language math physics
chemistry biology astronomy climate ocean forest animal plant farming industry bank investment insurance law policy
society emotion sleep coffee tea bread rice garden kitchen recipe weather storm volcano universe planet galaxy comet
satellite gravity desert glacier island harbor bridge tunnel highway railway airport bicycle scooter subway bus
tram ferry rocket engine battery charger keyboard laptop tablet printer router server algorithm compiler function
variable array loop recursion sorting search cache query thread process kernel browser website password encryption
virus firewall backup cloud startup budget salary tax loan mortgage pension stock bond currency inflation price
wallet receipt invoice contract lawyer judge court election parliament mayor citizen neighbor community volunteer
charity festival parade concert theater opera ballet painting sculpture museum gallery library archive newspaper
magazine podcast blog novelist poet playwright composer violin piano guitar drum choir orchestra melody rhythm
lyric dance recipe soup salad noodle dumpling pizza burger sandwich cheese yogurt chocolate cookie pancake honey
sugar salt pepper garlic onion tomato potato carrot cabbage apple banana orange grape mango strawberry lemon melon
peach cherry walnut almond bean corn wheat barley cotton silk wool leather timber steel copper iron aluminum glass
plastic paper cardboard ceramic marble granite sand clay soil fertilizer seed harvest orchard vineyard greenhouse
tractor farmer fisherman sailor pilot astronaut nurse surgeon dentist pharmacist chef baker waiter cashier
plumber electrician carpenter architect designer journalist editor translator librarian scientist chemist
historian philosopher economist psychologist athlete coach referee marathon tournament stadium trophy medal
swimming cycling hiking camping fishing gardening knitting pottery chess puzzle riddle joke proverb idiom grammar
vocabulary accent dialect alphabet syllable sentence paragraph essay summary headline slogan resume interview
meeting deadline project schedule calendar habit routine hobby vacation passport luggage hotel hostel campsite
tiger panda elephant dolphin whale penguin eagle owl sparrow parrot butterfly bee ant spider turtle frog rabbit
squirrel fox wolf bear deer horse camel lion giraffe zebra kangaroo koala octopus shark salmon coral bamboo cactus
tulip rose lotus maple pine oak willow mushroom moss fern rainbow thunder lightning snowflake hurricane drought
flood earthquake tide wave breeze sunrise sunset moonlight twilight horizon
""".split()
    )
)
EN_ADJECTIVES = tuple(
    """
ancient modern rural urban tiny huge quiet noisy cheap expensive healthy risky simple complex local global
digital manual seasonal daily weekly annual remote nearby famous forgotten traditional futuristic colorful
bitter sweet spicy salty crispy fresh frozen organic wooden metal electric solar coastal tropical arctic
northern southern eastern western friendly lonely curious patient brave nervous elderly young clever honest
polite stubborn creative practical efficient fragile durable portable affordable sustainable invisible hidden
secret public private shared personal ordinary unusual strange popular rare unknown sleepy busy lazy noble
humble generous loyal gentle fierce calm stormy foggy sunny rainy windy snowy dusty muddy shiny rusty
""".split()
)
EN_VERBS = tuple(
    "improve reduce avoid build keep choose plan prepare learn understand remember organize schedule handle "
    "evaluate promote design optimize balance control adjust solve protect repair measure explain teach".split()
)
EN_AUDIENCES = tuple(
    "a ten-year-old|a retired nurse|first-year students|busy parents|new employees|a curious tourist|"
    "beginner programmers|small business owners|high school seniors|a skeptical investor|elderly neighbors|"
    "amateur cooks|weekend hikers|a jazz fan|exchange students|night-shift workers|village farmers|"
    "museum visitors|library volunteers|football coaches|nursing students|a grumpy landlord".split("|")
)
EN_ROLES = tuple(
    "tour guide|detective|ship captain|baker|lighthouse keeper|astronaut|museum curator|park ranger|"
    "chess coach|street vendor|radio host|tailor|beekeeper|train conductor|diplomat|fortune teller".split("|")
)
EN_TONES = tuple("cheerful formal sarcastic gentle dramatic calm playful solemn friendly urgent poetic dry".split())
EN_GENRES = tuple(
    "limerick|haiku|short story|news brief|thank-you note|product review|cover letter|speech|fable|"
    "tweet|riddle|diary entry|menu description|travel tip".split("|")
)
EN_COUNTS = tuple("two three four five six seven".split())
EN_TAILS = tuple(
    "mentioning {n}|without naming {n}|with an example about {n}|in the style of {n}|ending with {n}|"
    "contrasting {n}".split("|")
)
EN_FRAMES = (
    "[Explain|Describe] how {n} and {n} [affect|shape] {n} and {n}",
    "Compare {n}, {n}, {n} and {n}",
    "Write a {g} on {n}, {n}, {n} and {n}",
    "List ways {n} could help {n}, {n} and {n}",
    "How can {n} and {n} {v} {n} or {n}?",
    "Why does {n} matter for {n}, {n} and {n}?",
    "Tell a {g} featuring {n}, {n}, {n} and {n}",
    "Which suits {n} better: {n}, {n} or {n}?",
    "Give {p} tips on {n}, {n}, {n} and {n}",
    "Summarize how {n} and {n} shape {n} and {n}",
    "Rewrite a {t} note about {n}, {n}, {n} and {n}",
    "Classify reviews of {n}, {n}, {n} and {n} by sentiment",
    "Plan a {n} event with {n}, {n} and {n}",
    "Script {n} and {n} discussing {n} and {n}",
    "What happens to {n} and {n} without {n} or {n}?",
    "Recommend {n} and {n} habits that {v} {n} and {n}",
    "Evaluate {n} from the viewpoint of {n}, {n} and {n}",
    "Create a {n} plan covering {n}, {n} and {n}",
    "Rank {n}, {n}, {n}, {n} and {n} by [importance|cost|difficulty]",
    "Explain {n}, {n} and {n} with one {n} metaphor",
    "Suggest names for a {n} {n} highlighting {n} and {n}",
    "Argue for {n} over {n}, {n} or {n}",
    "Find what {n}, {n}, {n} and {n} have in common",
    "Write a word problem about {n}, {n}, {n} and {n}",
    "Translate into Chinese: {n} changed {n} and {n} for {n}",
    "Describe {n} at {n} with {n} and {n}",
    "As {r}, introduce {n}, {n}, {n} and {n}",
    "Brainstorm ideas mixing {n}, {n}, {n} and {n}",
    "Which factors link {n} and {n} to {n} and {n}?",
    "Draft a letter about {n}, {n}, {n} and {n}",
    "Fix the errors about {n}, {n}, {n} and {n}",
    "Predict how {n} and {n} will change {n} and {n}",
    "Outline the history of {n}, {n}, {n} and {n}",
    "Write a slogan linking {n}, {n}, {n} and {n}",
    "Can {n} and {n} really {v} {n} or {n}?",
    "Estimate monthly spending on {n}, {n}, {n} and {n}",
    "Extract each {n} mentioned alongside {n}, {n} and {n}",
    "Teach {p} about {n}, {n}, {n} and {n}",
    "Debate {n} versus {n} for {n} and {n}",
    "Invent a riddle about {n}, {n}, {n} and {n}",
    "Contrast {n} with {n}, {n} and {n}",
    "Design a {n} quiz on {n}, {n} and {n}",
    "Name risks linking {n} and {n} to {n} and {n}",
)
EN_OUT_LINKS = tuple("and the of with for to in because so while often usually can may".split())

ZH_BANNED = (
    "图片", "图像", "照片", "视频", "音频", "录音", "画一", "画出", "绘制", "流程图", "地图", "文件", "附件", "截图",
    "图表", "網址", "圖片", "圖像", "影片", "視頻", "音訊", "音頻", "錄音", "畫一", "畫出", "繪製", "流程圖", "地圖",
    "檔案", "截圖", "圖表",
)
EN_BANNED = (
    "image", "images", "picture", "pictures", "photo", "photos", "photograph", "video", "videos", "audio",
    "recording", "file", "files", "attachment", "map", "maps", "draw", "drawing", "sketch", "plot", "chart",
    "diagram", "flowchart", "screenshot", "go to",
)
_BANNED_RE = re.compile(
    "|".join(re.escape(w) for w in ZH_BANNED) + r"|\b(?:" + "|".join(re.escape(w) for w in EN_BANNED) + r")\b",
    re.IGNORECASE,
)
HAN_RE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
MAX_TASKS = 500

# Bad items on purpose (p_bad_items). Each kind is something a client's filters must catch.
BAD_KINDS = ("blacklist", "refusal", "wrong_language", "empty_output", "output_equals_input", "punctuation_start", "too_short")
ZH_BLACKLIST_PREFIXES = ("看完这段视频后，", "根据这张图片，", "打开附件中的文件，", "听这段音频，", "参考下面的照片，", "先画一只猫，再", "绘制流程图说明")
EN_BLACKLIST_PREFIXES = ("Look at the image and", "Watch the video, then", "Open the attached file and", "Draw a diagram to", "Using the map,", "Listen to the audio and")
ZH_REFUSALS = ("抱歉，我无法完成这个任务。", "作为一个人工智能，我不能回答这个问题。", "对不起，我不能提供这方面的帮助。")
EN_REFUSALS = ("As an AI language model, I cannot do that.", "I'm sorry, but I can't help with that request.", "As an AI assistant, I cannot provide that.")

REASONS = {
    100: "Continue", 200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 413: "Payload Too Large", 429: "Too Many Requests", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout",
}

# ---------------------------------------------------------------------------------------------
# Content generation (pure functions of an rng; cheap: ~20 rng calls per item).
# ---------------------------------------------------------------------------------------------

_SLOT_RE = re.compile(r"\[([^\]]*)\]|\{([a-z])\}")


def _compile(frame: str) -> list:
    """A frame as a list of parts: str (fixed), tuple (alternatives) or one-letter slot name (list)."""
    parts: list = []
    pos = 0
    for m in _SLOT_RE.finditer(frame):
        if m.start() > pos:
            parts.append(frame[pos : m.start()])
        if m.group(1) is not None:
            parts.append(tuple(m.group(1).split("|")))
        else:
            parts.append([m.group(2)])
        pos = m.end()
    if pos < len(frame):
        parts.append(frame[pos:])
    return parts


_ZH_FRAMES = [_compile(f) for f in ZH_FRAMES]
_EN_FRAMES = [_compile(f) for f in EN_FRAMES]
_ZH_TAILS = [_compile(f) for f in ZH_TAILS]
_EN_TAILS = [_compile(f) for f in EN_TAILS]


def _zh_np(rng: random.Random) -> str:
    # A noun, or a compound of two nouns (城市交通): more random characters per fixed character.
    r = rng.random
    n = len(ZH_NOUNS)
    if r() < 0.7:
        return ZH_NOUNS[int(r() * n)] + ZH_NOUNS[int(r() * n)]
    return ZH_NOUNS[int(r() * n)]


def _en_np(rng: random.Random) -> str:
    r = rng.random
    x = r()
    if x < 0.55:
        return EN_ADJECTIVES[int(r() * len(EN_ADJECTIVES))] + " " + EN_NOUNS[int(r() * len(EN_NOUNS))]
    if x < 0.85:
        return EN_NOUNS[int(r() * len(EN_NOUNS))] + " " + EN_NOUNS[int(r() * len(EN_NOUNS))]
    return EN_NOUNS[int(r() * len(EN_NOUNS))]


def _picker(pool: tuple) -> Callable[[random.Random], str]:
    return lambda rng: pool[int(rng.random() * len(pool))]


_ZH_SLOTS: dict[str, Callable[[random.Random], str]] = {
    "n": _zh_np, "v": _picker(ZH_VERBS), "p": _picker(ZH_AUDIENCES), "r": _picker(ZH_ROLES), "t": _picker(ZH_TONES),
    "g": _picker(ZH_GENRES), "k": _picker(ZH_COUNTS), "i": _picker(ZH_IDIOMS),
}
_EN_SLOTS: dict[str, Callable[[random.Random], str]] = {
    "n": _en_np, "v": _picker(EN_VERBS), "p": _picker(EN_AUDIENCES), "r": _picker(EN_ROLES), "t": _picker(EN_TONES),
    "g": _picker(EN_GENRES), "k": _picker(EN_COUNTS), "i": _picker(EN_NOUNS),
}


def _render_frame(parts: list, slots: dict, rng: random.Random) -> str:
    out = []
    r = rng.random
    for part in parts:
        if part.__class__ is str:
            out.append(part)
        elif part.__class__ is tuple:
            out.append(part[int(r() * len(part))])
        else:
            out.append(slots[part[0]](rng))
    return "".join(out)


_EN_BANNED_WORDS = frozenset(w for w in EN_BANNED if " " not in w)
_WORD_RE = re.compile(r"[a-z]+")


def is_clean(text: str) -> bool:
    """True when the text mentions nothing from the blacklist (Chinese substrings, English whole words)."""
    for word in ZH_BANNED:
        if word in text:
            return False
    lower = text.lower()
    if "go to" in lower:
        return _BANNED_RE.search(text) is None
    return _EN_BANNED_WORDS.isdisjoint(_WORD_RE.findall(lower))


_ZH_QUESTION_STARTS = ("为什么", "为何", "哪些", "什么", "怎样", "怎么", "如何")


def make_instruction(rng: random.Random, lang: str) -> str:
    """One good instruction: zh 12-30 Han characters, en 6-30 words; clean, starting with a letter."""
    r = rng.random
    for _ in range(50):
        if lang == "zh":
            text = _render_frame(_ZH_FRAMES[int(r() * len(_ZH_FRAMES))], _ZH_SLOTS, rng)
            if r() < 0.25:
                text += _render_frame(_ZH_TAILS[int(r() * len(_ZH_TAILS))], _ZH_SLOTS, rng)
            if text.endswith("吗") or text.startswith(_ZH_QUESTION_STARTS):
                text += "？"
            elif r() < 0.3:
                text += "。"
            # The frames' only non-Han characters are 、，“”？。
            han = len(text) - text.count("、") - text.count("，") - text.count("“") - text.count("”") - text.count("？") - text.count("。")
            if not 12 <= han <= 30:
                continue
        else:
            text = _render_frame(_EN_FRAMES[int(r() * len(_EN_FRAMES))], _EN_SLOTS, rng)
            if r() < 0.25:
                text = text.rstrip("?") + ", " + _render_frame(_EN_TAILS[int(r() * len(_EN_TAILS))], _EN_SLOTS, rng)
            if not text.endswith("?"):
                text += "."
            text = text[0].upper() + text[1:]
        if is_clean(text):
            return text
    raise RuntimeError("could not make a clean instruction")  # pragma: no cover - pools are clean


def _corpus(lang: str) -> tuple[str, list[int]]:
    """A long filler text made once per language, and the offsets where its clauses start."""
    rng = random.Random(f"corpus:{lang}")
    pieces, starts, size = [], [], 0
    for _ in range(3000 if lang == "zh" else 2000):
        if lang == "zh":
            piece = (rng.choice(ZH_NOUNS) + rng.choice(ZH_OUT_LINKS) + rng.choice(ZH_NOUNS)
                     + (rng.choice(ZH_OUT_LINKS) + rng.choice(ZH_NOUNS) if rng.random() < 0.5 else "") + rng.choice(ZH_OUT_PUNCT))
        else:
            words = [rng.choice(EN_NOUNS) if rng.random() < 0.6 else rng.choice(EN_OUT_LINKS + EN_ADJECTIVES) for _ in range(rng.randint(3, 7))]
            piece = " ".join(words) + rng.choice((", ", ". ", "; ", " "))
        starts.append(size)
        pieces.append(piece)
        size += len(piece)
    return "".join(pieces), starts[: len(starts) - 200]


_CORPUS: dict[str, tuple[str, list[int]]] = {}


def make_text(rng: random.Random, lang: str, lo: int, hi: int) -> str:
    """Filler text (an output or an input) of lo..hi characters: a slice of a pre-made corpus, 2 rng calls."""
    corpus = _CORPUS.get(lang)
    if corpus is None:
        corpus = _CORPUS[lang] = _corpus(lang)
    text, starts = corpus
    r = rng.random
    target = lo + 1 + int(r() * (hi - lo))
    start = starts[int(r() * len(starts))]
    if lang == "zh":
        body = text[start : start + target - 1]
        return (body[:-1] if body[-1] in "，；、。" else body) + "。"
    chunk = text[start : start + hi + 1]
    cut = chunk.rfind(" ", lo + 2, target)
    if cut < 0:
        cut = chunk.rfind(" ", lo + 2, hi - 1)
    body = (chunk[:cut] if cut > 0 else chunk[: hi - 1]).rstrip(",.; ")
    return body[0].upper() + body[1:] + "."


def make_item(rng: random.Random, lang: str) -> tuple[str, str, str]:
    """A good (instruction, input, output): input for about a third, output 20-120 characters."""
    ins = make_instruction(rng, lang)
    inp = make_text(rng, lang, 10, 60) if rng.random() < 1 / 3 else ""
    out = make_text(rng, lang, 20, 120)
    if out == inp:  # pragma: no cover - one chance in millions
        out = out[:-1] + "！"
    return ins, inp, out


def _near_duplicate(rng: random.Random, text: str, lang: str) -> str:
    """Change exactly one character of `text`: a Han character for zh, a letter inside a word for en."""
    for _ in range(50):
        if lang == "zh":
            positions = [i for i, ch in enumerate(text) if HAN_RE.match(ch)]
            pos = rng.choice(positions)
            repl = rng.choice(rng.choice(ZH_NOUNS))
        else:
            positions = [i for i, ch in enumerate(text) if ch.isalpha() and i > 0]
            pos = rng.choice(positions)
            repl = rng.choice("abcdefghijklmnopqrstuvwxyz")
        if repl == text[pos]:
            continue
        edited = text[:pos] + repl + text[pos + 1 :]
        if is_clean(edited):
            return edited
    return text[:-1] + ("某" if lang == "zh" else "x")  # pragma: no cover


def _bad_item(rng: random.Random, lang: str, kind: str) -> tuple[str, str, str]:
    ins, inp, out = make_item(rng, lang)
    zh = lang == "zh"
    if kind == "blacklist":
        if zh:
            ins = rng.choice(ZH_BLACKLIST_PREFIXES) + ins
        else:
            ins = rng.choice(EN_BLACKLIST_PREFIXES) + " " + ins[0].lower() + ins[1:]
    elif kind == "refusal":
        out = rng.choice(ZH_REFUSALS if zh else EN_REFUSALS)
    elif kind == "wrong_language":
        ins = make_instruction(rng, "en" if zh else "zh")
    elif kind == "empty_output":
        out = ""
    elif kind == "output_equals_input":
        inp = inp or make_text(rng, lang, 10, 60)
        out = inp
    elif kind == "punctuation_start":
        ins = rng.choice(("，", "。", "？", "、", "；") if zh else (", ", ". ", "; ", "? ", "- ")) + ins
    elif kind == "too_short":
        ins = rng.choice(ZH_NOUNS) if zh else rng.choice(("Explain", "Describe", "Summarize")) + " " + rng.choice(EN_NOUNS) + "."
    return ins, inp, out


@functools.lru_cache(maxsize=1)
def _s2t():
    import opencc

    return opencc.OpenCC("s2t")


def to_hant(text: str) -> str:
    """Simplified Chinese text in Traditional characters."""
    return _s2t().convert(text) if text else text


def render_items(items: list[tuple[str, str, str]], lang: str, as_json: bool, hant: bool = False) -> str:
    """The reply text: numbered blocks separated by ### lines, or {"tasks": [...]} JSON."""
    if hant:  # a zh-Hant prompt gets Traditional text, as a real teacher writes it
        items = [(to_hant(a), to_hant(b), to_hant(c)) for a, b, c in items]
    if as_json:
        return json.dumps({"tasks": [{"instruction": a, "input": b, "output": c} for a, b, c in items]}, ensure_ascii=False)
    if lang == "zh":
        li, lo_, none = ("輸入", "輸出", "<無輸入>") if hant else ("输入", "输出", "<无输入>")
        blocks = [f"{i}. 指令：{a}\n{li}：{b or none}\n{lo_}：{c}" for i, (a, b, c) in enumerate(items, 1)]
    else:
        blocks = [f"{i}. Instruction: {a}\nInput: {b or '<noinput>'}\nOutput: {c}" for i, (a, b, c) in enumerate(items, 1)]
    return "\n###\n".join(blocks)


def make_garbage(rng: random.Random, lang: str) -> str:
    """Prose with no numbered items and no labels: nothing a parser can take."""
    if lang == "zh":
        return "好的！这是一个很有意思的话题。" + make_text(rng, "zh", 40, 120) + "希望这些想法对你有帮助。"
    return "Sure! That is an interesting topic. " + make_text(rng, "en", 40, 120) + " Hope this helps."


def message_text(messages: Any) -> list[str]:
    """The text of each message (string content, or the text parts of a content list)."""
    texts = []
    for m in messages if isinstance(messages, list) else []:
        if not isinstance(m, dict):
            continue
        c = m.get("content")
        if isinstance(c, str):
            texts.append(c)
        elif isinstance(c, list):
            texts.append("".join(str(p.get("text", "")) for p in c if isinstance(p, dict)))
    return texts


def _number_before(text: str, pos: int, need_space: bool) -> int | None:
    """The ASCII number right before text[pos] (whitespace between allowed, or required)."""
    j = pos
    while j > 0 and text[j - 1].isspace():
        j -= 1
    if need_space and j == pos:
        return None
    k = j
    while k > 0 and "0" <= text[k - 1] <= "9":
        k -= 1
    return int(text[k:j]) if k < j else None


def _asked_count(user: str) -> int:
    """N from `(\\d+)\\s*个` or `(\\d+)\\s+(new\\s+)?tasks` (first match), else 10; str.find, not a regex
    scan, because prompts are long and this runs for every request."""
    best: tuple[int, int] | None = None
    for mark in ("个", "個"):
        pos = user.find(mark)
        while pos >= 0 and (best is None or pos < best[0]):
            n = _number_before(user, pos, False)
            if n is not None:
                best = (pos, n)
                break
            pos = user.find(mark, pos + 1)
    if best is not None:
        return best[1]
    lower = user.lower()
    pos = lower.find("tasks")
    while pos >= 0:
        n = _number_before(lower, pos, True)
        if n is None:
            j = pos
            while j > 0 and lower[j - 1].isspace():
                j -= 1
            if j < pos and lower.endswith("new", 0, j):
                n = _number_before(lower, j - 3, True)
        if n is not None:
            return n
        pos = lower.find("tasks", pos + 1)
    return 10


_HAN_LEAD_BYTES = bytes(range(0xE4, 0xEA))
_ASCII_LETTERS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def detect_request(messages: Any) -> tuple[str, int, bool]:
    """(lang, number of tasks asked for, traditional labels?) from the last user message."""
    user = ""
    for m in reversed(messages if isinstance(messages, list) else []):
        if isinstance(m, dict) and m.get("role") == "user":
            user = message_text([m])[0] if message_text([m]) else ""
            break
    else:
        texts = message_text(messages)
        user = texts[-1] if texts else ""
    # Counted on UTF-8 bytes (fast on long prompts): U+4E00..U+9FFF all start with a byte E4..E9.
    raw = user.encode("utf-8")
    han = len(raw) - len(raw.translate(None, _HAN_LEAD_BYTES))
    letters = len(raw) - len(raw.translate(None, _ASCII_LETTERS))
    lang = "zh" if han > letters else "en"
    count = _asked_count(user)
    hant = lang == "zh" and ("輸出" in user or "繁體" in user)
    return lang, max(1, min(count, MAX_TASKS)), hant


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------

KNOBS: dict[str, Any] = {
    # name: default
    "latency": 0.0,  # seconds each chat completion waits (plus/minus latency_jitter, uniform)
    "latency_jitter": 0.0,
    "seed": 0,
    "p_429": 0.0,
    "retry_after": 1.0,  # Retry-After seconds on 429s (p_retry_after_ms of them also carry retry-after-ms)
    "p_retry_after_ms": 0.5,
    "p_500": 0.0,  # 500, 502 (HTML body) or 503
    "p_timeout": 0.0,  # sleep timeout_sleep seconds, then 504; nothing is counted as sent
    "timeout_sleep": 30.0,
    "p_malformed": 0.0,  # 200 whose body is not JSON, or JSON without `choices`
    # Malformed replies are all JSON without `choices` but with a `usage`: the prompt's tokens and
    # this many completion tokens (at most the request's max_tokens). Billed and unusable.
    "billed_malformed": None,
    "p_garbage": 0.0,  # valid completion, prose content with no items
    "p_truncated": 0.0,  # finish_reason "length", content cut inside the last item
    "p_bad_items": 0.0,  # some items are bad on purpose (see BAD_KINDS)
    "p_near_duplicate": 0.0,  # one item is a one-character edit of an instruction sent earlier
    "usage_mode": "exact",  # exact | absent | zero | completion_one
    "think": False,  # prefix content with <think>...</think>
    "code_fence": False,  # wrap content in ``` fences
    "reject_max_tokens": False,  # 400 unsupported_parameter when the body has max_tokens
    "no_json_mode": False,  # 400 when the body has response_format
    "ignore_json_mode": False,  # response_format accepted and ignored: the reply is the numbered text list
    "empty_length": False,  # content "" with finish_reason "length" (always, or with p_empty_length)
    "p_empty_length": 0.0,
    "ignore_n": False,  # one choice whatever `n` asks for
    "api_key": None,  # require Authorization: Bearer <api_key>, else 401
    "models": None,  # list of known models; others get 404 model_not_found
    "forbidden": False,  # 403 for everything
    # A llama.cpp server with -np N: at most this many chat requests are worked on at once, the others wait.
    "slots": None,
    # The server's context (n_ctx): prompt + reply tokens past it are cut (finish_reason "length", usage
    # adding up to it), and a prompt that does not fit gets a 400.
    "context": None,
    # Where the server tells its context: "props" (llama.cpp's GET /props, with total_slots) or
    # "models" (vLLM's max_model_len in GET /v1/models).
    "report_context": None,
    # 400 and 5xx error bodies of chat requests quote the request's Authorization header in full, as
    # careless proxies and debug-mode servers do: whatever we log of an error must cut the key out.
    "echo_key": False,
    "max_requests": None,  # chat requests after this many get 500
    "record_contents": True,  # keep sent_contents and arrivals (turn off for long benchmarks)
    # Stop sequences and the asked count ignored: this many items past the count, then an echo of
    # the prompt's examples, cut mid-item by the length limit (finish_reason "length"). Text replies only.
    "overrun": 0,
    "reply": None,  # callable(request_body, rng) -> content, replaces the generated tasks
    "reply_chars": 0,  # >0: every reply's content is repeated or cut to this many characters (a runaway reply)
    # 429 insufficient_quota for every chat request, as OpenAI answers a key whose account has no credit.
    "no_credit": False,
    # A 200 whose body is not a completion: "html" (a login page, as a proxy or a web UI answers, for
    # GET /models too) or "event-stream" (chunks, as a proxy that forces streaming sends).
    "body": None,
    # POST /v1/moderations: None answers 404 (as most local servers); a word flags every text that
    # contains it (categories harassment and violence); a callable(text) -> list of flagged categories.
    "moderation": None,
    # Batch API (tests/fakes/batch_api.py): seconds a batch spends validating and finalizing, the least it
    # spends in progress, lines it runs before it expires (None: never), and "validation" to fail every batch.
    "batch_delay": 0.05,
    "batch_run_seconds": 0.0,
    "batch_expire_after": None,
    "batch_fail": None,
}
USAGE_MODES = ("exact", "absent", "zero", "completion_one")
BODIES = (None, "html", "event-stream")
_LOGIN_PAGE = (b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body><form action=\"/login\">"
               + b"<input name=\"user\"></form></body></html>" * 40)


def _error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}}).encode()


def _echo_header(body: bytes, authorization: str) -> bytes:
    """An error body that quotes the request's Authorization header (the echo_key knob)."""
    echo = f" (request headers: Authorization: {authorization})"
    try:
        data = json.loads(body)
        data["error"]["message"] += echo
        return json.dumps(data).encode()
    except (ValueError, KeyError, TypeError):
        return body + echo.encode()


class _Response:
    __slots__ = ("status", "headers", "body", "on_sent", "content_type")

    def __init__(self, status: int, body: bytes, headers: list[tuple[str, str]] | None = None,
                 on_sent: Callable[[], None] | None = None, content_type: str = "application/json") -> None:
        self.status = status
        self.body = body
        self.headers = headers or []
        self.on_sent = on_sent
        self.content_type = content_type


def _new_stats() -> dict[str, Any]:
    return {
        "requests_received": 0,  # POST .../chat/completions, whatever the outcome
        "other_requests": 0,  # GET /models and anything else
        "by_status": {},  # status (str) -> responses written
        "responses_ok": 0,  # 200 with a valid completion
        "prompt_tokens_sent": 0,
        "completion_tokens_sent": 0,
        "sent_contents": [],
        "faults": {},  # fault -> responses carrying it that a client received (timeouts: injected); 429, 500 (any 5xx), timeout, malformed, garbage, truncated, empty_length, bad_items, near_duplicate
        "bad_items": [],  # {"kind", "instruction"} of each deliberately bad item sent
        "near_duplicates": [],  # {"instruction", "original"} of each deliberate near-duplicate sent
        "dropped": 0,  # responses not written because the client had gone
        "last_request": {},
        "arrivals": [],  # time.monotonic() at which each chat request arrived (with record_contents)
        "in_flight": 0,
        "max_in_flight": 0,
        "moderation_requests": 0,  # POST .../moderations, whatever the outcome
        "connections": 0,  # TCP connections accepted (keep-alive: far fewer than requests)
        "late_seconds_total": 0.0,  # how far past their latency replies were ready (CPU queueing), summed
        "late_seconds_max": 0.0,
        "files_uploaded": 0,  # Batch API: input files uploaded
        "batches_created": 0,
        "batch_lines": [],  # custom_id of every line of every batch created, in order (a line sent twice shows twice)
        "batch_cancels": 0,
    }


class FakeTeacher:
    """An OpenAI-compatible chat server on 127.0.0.1 with latency, faults, quirks and exact usage bookkeeping."""

    def __init__(self, **knobs: Any) -> None:
        unknown = set(knobs) - set(KNOBS)
        if unknown:
            raise TypeError(f"unknown knobs: {sorted(unknown)}")
        self.knobs: dict[str, Any] = {**KNOBS, **knobs}
        self._check_knobs()
        self._lock = threading.Lock()
        self._stats = _new_stats()
        self._contents_json: list[str] = []  # sent_contents pre-encoded, for cheap dumps
        self._version = 0  # bumped on every stats change
        self._history: dict[str, list[str]] = {"zh": [], "en": []}  # good instructions sent
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[asyncio.Task] = set()
        self._slot_gate: tuple[int, asyncio.Semaphore] | None = None  # (slots, gate), made in the serving loop
        self.host = "127.0.0.1"
        self.port = 0
        self.batch_api = FakeBatchAPI(self)

    def _check_knobs(self) -> None:
        k = self.knobs
        if k["usage_mode"] not in USAGE_MODES:
            raise ValueError(f"usage_mode must be one of {USAGE_MODES}")
        if k["body"] not in BODIES:
            raise ValueError(f"body must be one of {BODIES}")
        for name, value in k.items():
            if name.startswith("p_") and not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")
        edge = sum(float(k[n]) for n in ("p_429", "p_500", "p_timeout", "p_malformed"))
        if edge > 1.0 + 1e-9:
            raise ValueError("p_429 + p_500 + p_timeout + p_malformed must not exceed 1")

    # ---- public API ------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    @property
    def stats(self) -> dict[str, Any]:
        """A consistent snapshot (a copy), safe to read from any thread."""
        with self._lock:
            return self._snapshot()

    def _snapshot(self) -> dict[str, Any]:
        s = dict(self._stats)
        for key in ("by_status", "faults", "last_request"):
            s[key] = dict(s[key])
        for key in ("sent_contents", "bad_items", "near_duplicates", "arrivals", "batch_lines"):
            s[key] = list(s[key])
        return s

    def reset_stats(self) -> None:
        with self._lock:
            in_flight = self._stats["in_flight"]
            self._stats = _new_stats()
            self._stats["in_flight"] = in_flight
            self._contents_json = []
            self._version += 1

    def configure(self, **knobs: Any) -> None:
        """Change knobs while serving (takes effect for requests that arrive afterwards)."""
        unknown = set(knobs) - set(KNOBS)
        if unknown:
            raise TypeError(f"unknown knobs: {sorted(unknown)}")
        with self._lock:
            old = dict(self.knobs)
            self.knobs.update(knobs)
            try:
                self._check_knobs()
            except ValueError:
                self.knobs = old
                raise

    def start(self) -> "FakeTeacher":
        """Serve from a daemon thread with its own event loop; returns once listening."""
        if self._thread is not None:
            return self
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._listen(0))
            except BaseException as exc:  # pragma: no cover - e.g. no free port
                failure.append(exc)
                ready.set()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="FakeTeacher", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(10)
            except Exception:  # pragma: no cover
                pass
            loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._thread = None
        self._loop = None

    close = stop

    def __enter__(self) -> "FakeTeacher":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _listen(self, port: int, host: str = "127.0.0.1") -> None:
        self._server = await asyncio.start_server(self._connection, host, port, backlog=2048, limit=1 << 20)
        self.host = host
        self.port = self._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = [t for t in self._conns if t is not asyncio.current_task()] + list(self.batch_api._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)

    async def serve_forever(self, port: int = 0, host: str = "127.0.0.1") -> None:
        """Serve in the running event loop (the process form)."""
        await self._listen(port, host)
        await self._server.serve_forever()

    # ---- HTTP/1.1 --------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._conns.add(task)
        with self._lock:
            self._stats["connections"] += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return  # the client closed between requests
                except asyncio.LimitOverrunError:
                    await self._write(writer, reader, _Response(431, _error_body("headers too large", "invalid_request_error")), False)
                    return
                try:
                    lines = head[:-4].decode("latin-1").split("\r\n")
                    method, target, version = lines[0].split(" ", 2)
                    headers: dict[str, str] = {}
                    for line in lines[1:]:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                except ValueError:
                    await self._write(writer, reader, _Response(400, _error_body("bad request line", "invalid_request_error")), False)
                    return
                connection = headers.get("connection", "").lower()
                keep_alive = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
                if headers.get("expect", "").lower() == "100-continue":
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                if "chunked" in headers.get("transfer-encoding", "").lower():
                    body = await self._read_chunked(reader)
                else:
                    body = await reader.readexactly(int(headers.get("content-length") or 0))
                response = await self._dispatch(method, target.split("?", 1)[0], headers, body, reader)
                if response is None:
                    return  # the client has gone
                if not await self._write(writer, reader, response, keep_alive) or not keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self._conns.discard(task)
            try:
                writer.close()
            except Exception:  # pragma: no cover
                pass

    @staticmethod
    async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
        chunks = []
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                return b"".join(chunks)
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)

    def _client_gone(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        return writer.is_closing() or reader.at_eof() or reader.exception() is not None

    async def _write(self, writer: asyncio.StreamWriter, reader: asyncio.StreamReader, resp: _Response, keep_alive: bool) -> bool:
        """Write one response; its stats are committed only if the client is still there."""
        if self._client_gone(reader, writer):
            with self._lock:
                self._stats["dropped"] += 1
                self._version += 1
            return False
        head = (
            f"HTTP/1.1 {resp.status} {REASONS.get(resp.status, 'Unknown')}\r\n"
            f"Content-Type: {resp.content_type}\r\nContent-Length: {len(resp.body)}\r\n"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n"
        )
        for name, value in resp.headers:
            head += f"{name}: {value}\r\n"
        with self._lock:
            by = self._stats["by_status"]
            key = str(resp.status)
            by[key] = by.get(key, 0) + 1
            if resp.on_sent is not None:
                resp.on_sent()
            self._version += 1
        writer.write(head.encode("latin-1") + b"\r\n" + resp.body)
        await writer.drain()
        return True

    async def _sleep(self, seconds: float, reader: asyncio.StreamReader) -> bool:
        """Sleep; long sleeps end early (False) when the client closes the connection."""
        if seconds <= 2.0:
            if seconds > 0:
                await asyncio.sleep(seconds)
            return True
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            await asyncio.sleep(min(0.25, left))
            if reader.at_eof() or reader.exception() is not None:
                return False

    # ---- routing ---------------------------------------------------------------------

    async def _dispatch(self, method: str, path: str, headers: dict, body: bytes, reader: asyncio.StreamReader) -> _Response | None:
        k = self.knobs
        path = "/" + path.strip("/")
        is_chat = path.endswith("/chat/completions")
        req: dict = {}
        if is_chat and method == "POST":
            try:
                req = json.loads(body or b"{}")
                if not isinstance(req, dict):
                    raise ValueError("not an object")
            except ValueError:
                req = {"_invalid": True}
            with self._lock:
                self._stats["requests_received"] += 1
                n_req = self._stats["requests_received"]
                if k["record_contents"]:
                    self._stats["arrivals"].append(time.monotonic())
                self._stats["last_request"] = {
                    key: req.get(key)
                    for key in ("model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "response_format", "stream", "seed")
                }
                self._version += 1
        else:
            with self._lock:
                self._stats["other_requests"] += 1
                self._version += 1
        if k["api_key"] and headers.get("authorization") != f"Bearer {k['api_key']}":
            given = headers.get("authorization", "").removeprefix("Bearer ").strip()
            masked = (given[:3] + "*" * max(0, len(given) - 7) + given[-4:]) if len(given) > 8 else "***"
            return _Response(401, _error_body(
                f"Incorrect API key provided: {masked}. You can find your API key at https://platform.openai.com/account/api-keys.",
                "invalid_request_error", None, "invalid_api_key"))
        if k["forbidden"]:
            return _Response(403, _error_body(
                "You are not allowed to sample from this model", "invalid_request_error", None, "model_access_denied"))
        if method == "GET" and k["body"] == "html":  # a web UI or login page answers every path
            return _Response(200, _LOGIN_PAGE, content_type="text/html; charset=utf-8")
        if method == "GET" and path.endswith("/props") and k["report_context"] == "props":
            settings = {"n_ctx": k["context"], "n_predict": -1, "temperature": 0.8}
            return _Response(200, json.dumps({"default_generation_settings": settings, "total_slots": k["slots"] or 1,
                                              "model_path": "fake-teacher.gguf"}).encode())
        if method == "GET" and path.endswith("/models"):
            names = k["models"] or ["fake-teacher"]
            data = {"object": "list", "data": [{"id": m, "object": "model", "created": 1700000000, "owned_by": "fake"} for m in names]}
            if k["report_context"] == "models":
                for model in data["data"]:
                    model["max_model_len"] = k["context"]
            return _Response(200, json.dumps(data).encode())
        if method == "GET" and "/models/" in path:
            name = path.rsplit("/models/", 1)[1]
            if k["models"] and name not in k["models"]:
                return _Response(404, _error_body(f"The model `{name}` does not exist or you do not have access to it.",
                                                  "invalid_request_error", None, "model_not_found"))
            return _Response(200, json.dumps({"id": name, "object": "model", "created": 1700000000, "owned_by": "fake"}).encode())
        if method == "POST" and path.endswith("/moderations"):
            return self._moderation(body)
        if FakeBatchAPI.handles(path):
            return await self.batch_api.handle(method, path, headers, body)
        if not is_chat:
            return _Response(404, _error_body(f"Invalid URL ({method} {path})", "invalid_request_error"))
        if method != "POST":
            return _Response(405, _error_body(f"Invalid method for URL ({method} {path})", "invalid_request_error"))
        response = await self._chat(req, n_req, reader)
        if response is not None and k["echo_key"] and (response.status == 400 or response.status >= 500):
            response.body = _echo_header(response.body, headers.get("authorization", ""))
        return response

    def _moderation(self, body: bytes) -> _Response:
        """OpenAI's moderation reply for each input text, flagged by the `moderation` knob; 404 when it is None."""
        with self._lock:
            self._stats["moderation_requests"] += 1
        rule = self.knobs["moderation"]
        if rule is None:
            return _Response(404, _error_body("Invalid URL (POST /v1/moderations)", "invalid_request_error"))
        try:
            texts = json.loads(body or b"{}").get("input")
        except (ValueError, AttributeError):
            return _Response(400, _error_body("We could not parse the JSON body of your request.", "invalid_request_error"))
        names = ("harassment", "hate", "self-harm", "sexual", "violence")
        results = []
        for text in texts if isinstance(texts, list) else [texts]:
            text = str(text)
            flagged = list(rule(text)) if callable(rule) else (["harassment", "violence"] if str(rule) in text else [])
            results.append({"flagged": bool(flagged), "categories": {n: n in flagged for n in (*names, *flagged)},
                            "category_scores": {n: (0.9 if n in flagged else 0.001) for n in (*names, *flagged)}})
        return _Response(200, json.dumps({"id": "modr-fake", "model": "omni-moderation-latest", "results": results}).encode())

    async def _chat(self, req: dict, n_req: int, reader: asyncio.StreamReader) -> _Response | None:
        k = dict(self.knobs)
        if req.get("_invalid"):
            return _Response(400, _error_body(
                "We could not parse the JSON body of your request.", "invalid_request_error"))
        if k["max_requests"] is not None and n_req > int(k["max_requests"]):
            return _Response(500, _error_body("The fake's request cap (max_requests) was reached.", "server_error"))
        model = req.get("model")
        if not model:
            return _Response(400, _error_body("you must provide a model parameter", "invalid_request_error", "model"))
        if k["models"] and model not in k["models"]:
            return _Response(404, _error_body(f"The model `{model}` does not exist or you do not have access to it.",
                                              "invalid_request_error", None, "model_not_found"))
        if not isinstance(req.get("messages"), list) or not req["messages"]:
            return _Response(400, _error_body("'messages' is a required property", "invalid_request_error", "messages"))
        if k["reject_max_tokens"] and req.get("max_tokens") is not None:
            return _Response(400, _error_body(
                "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead.",
                "invalid_request_error", "max_tokens", "unsupported_parameter"))
        if k["no_json_mode"] and req.get("response_format") is not None:
            kind = (req.get("response_format") or {}).get("type", "json_object") if isinstance(req.get("response_format"), dict) else "json_object"
            return _Response(400, _error_body(
                f"Invalid parameter: 'response_format' of type '{kind}' is not supported with this model.",
                "invalid_request_error", "response_format", None))
        if req.get("stream"):
            return _Response(400, _error_body("The fake teacher does not stream.", "invalid_request_error", "stream"))

        with self._lock:
            self._stats["in_flight"] += 1
            self._stats["max_in_flight"] = max(self._stats["max_in_flight"], self._stats["in_flight"])
        try:
            if k["slots"]:
                if self._slot_gate is None or self._slot_gate[0] != int(k["slots"]):
                    self._slot_gate = (int(k["slots"]), asyncio.Semaphore(int(k["slots"])))
                async with self._slot_gate[1]:  # waiting here counts in the client's latency, as in a real queue
                    return await self._chat_faults(req, n_req, reader, k)
            return await self._chat_faults(req, n_req, reader, k)
        finally:
            with self._lock:
                self._stats["in_flight"] -= 1

    def _fault(self, name: str) -> None:
        with self._lock:
            self._fault_locked(name)

    def _fault_locked(self, name: str) -> None:
        f = self._stats["faults"]
        f[name] = f.get(name, 0) + 1

    def _billed_fault(self, billed: tuple[int, int]) -> Callable[[], None]:
        """An on_sent hook for a billed malformed reply: a fault whose tokens count as sent."""

        def on_sent() -> None:
            self._fault_locked("malformed")
            self._stats["prompt_tokens_sent"] += billed[0]
            self._stats["completion_tokens_sent"] += billed[1]

        return on_sent

    def _counted(self, name: str) -> Callable[[], None]:
        """An on_sent hook: the fault counts once the client has it (timeouts count when injected)."""
        return lambda: self._fault_locked(name)

    async def _chat_faults(self, req: dict, n_req: int, reader: asyncio.StreamReader, k: dict) -> _Response | None:
        t0 = time.monotonic()
        seed = int(k["seed"])
        frng = random.Random(seed * 1_000_003 + n_req * 2 + 1)  # faults: a separate stream
        draws = [frng.random() for _ in range(10)]
        roll, variant, with_ms, jitter = draws[0], draws[1], draws[2], draws[3]
        edge1 = k["p_429"]
        edge2 = edge1 + k["p_500"]
        edge3 = edge2 + k["p_timeout"]
        edge4 = edge3 + k["p_malformed"]
        if k["no_credit"]:
            return _Response(429, _error_body(
                "You exceeded your current quota, please check your plan and billing details. For more information on this "
                "error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors.",
                "insufficient_quota", None, "insufficient_quota"), [], self._counted("429"))
        if k["body"] == "html":
            return _Response(200, _LOGIN_PAGE, content_type="text/html; charset=utf-8")
        if k["body"] == "event-stream":
            chunk = {"id": f"chatcmpl-{n_req}", "object": "chat.completion.chunk", "model": req.get("model"),
                     "choices": [{"index": 0, "delta": {"content": "你好"}, "finish_reason": None}]}
            return _Response(200, f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode() * 3 + b"data: [DONE]\n\n",
                             content_type="text/event-stream")
        if roll < edge1:
            ra = float(k["retry_after"])
            hdrs = [("retry-after", f"{ra:g}"), ("x-ratelimit-limit-requests", "500"), ("x-ratelimit-remaining-requests", "0"),
                    ("x-ratelimit-reset-requests", f"{ra:g}s")]
            if with_ms < float(k["p_retry_after_ms"]):
                hdrs.append(("retry-after-ms", f"{ra * 1000:g}"))
            return _Response(429, _error_body(
                f"Rate limit reached for {req.get('model')} in organization org-fake on requests per min (RPM): "
                f"Limit 500, Used 500, Requested 1. Please try again in {ra:g}s.",
                "requests", "requests", "rate_limit_exceeded"), hdrs, self._counted("429"))
        delay = max(0.0, float(k["latency"]) + (jitter * 2 - 1) * float(k["latency_jitter"]))
        if roll < edge3 and roll >= edge2:
            self._fault("timeout")
            if not await self._sleep(float(k["timeout_sleep"]), reader):
                return None
            return _Response(504, _error_body("The server timed out before answering.", "server_error", None, "timeout"))
        # The reply is made while the latency runs, not after it: under a burst of requests the
        # generation work overlaps the wait instead of adding to it. Yield first, so every request
        # of a burst has its arrival time taken before any of them spends CPU on content.
        deadline = t0 + delay
        await asyncio.sleep(0)
        if roll < edge2:
            if variant < 0.5:
                response = _Response(500, _error_body("The server had an error while processing your request. Sorry about that!", "server_error"))
            elif variant < 0.75:
                response = _Response(502, b"<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1></center></body></html>",
                                     content_type="text/html")
            else:
                response = _Response(503, _error_body("The engine is currently overloaded, please try again later.", "server_error"))
            response.on_sent = self._counted("500")
        elif roll < edge4 and k["billed_malformed"]:
            limit = req.get("max_tokens") or req.get("max_completion_tokens") or int(k["billed_malformed"])
            billed = (sum(len(t) for t in message_text(req.get("messages"))) // 2 + 10, min(int(k["billed_malformed"]), int(limit)))
            response = _Response(200, json.dumps({"id": f"chatcmpl-{n_req}", "object": "chat.completion", "model": req.get("model"),
                                                  "usage": {"prompt_tokens": billed[0], "completion_tokens": billed[1],
                                                            "total_tokens": sum(billed)}}).encode())
            response.on_sent = self._billed_fault(billed)
        elif roll < edge4:
            if variant < 0.5:
                response = _Response(200, b'{"id": "chatcmpl-broken", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assis')
            else:
                response = _Response(200, json.dumps({"id": f"chatcmpl-{n_req}", "object": "chat.completion", "created": int(time.time()),
                                                      "model": req.get("model")}).encode())
            response.on_sent = self._counted("malformed")
        else:
            response = self._complete(req, n_req, k, draws)
        if not await self._sleep(deadline - time.monotonic(), reader):
            return None
        late = time.monotonic() - deadline
        with self._lock:
            self._stats["late_seconds_total"] += late
            if late > self._stats["late_seconds_max"]:
                self._stats["late_seconds_max"] = late
        return response

    # ---- completions -----------------------------------------------------------------

    def _complete(self, req: dict, n_req: int, k: dict, draws: list[float]) -> _Response:
        seed = int(k["seed"])
        rng = random.Random(seed * 1_000_003 + n_req * 2)
        messages = req["messages"]
        lang, count, hant = detect_request(messages)
        as_json = (isinstance(req.get("response_format"), dict) and req["response_format"].get("type") in ("json_object", "json_schema")
                   and not k["ignore_json_mode"])
        n_choices = 1
        if not k["ignore_n"] and isinstance(req.get("n"), int) and req["n"] > 1:
            n_choices = min(req["n"], 16)
        p_empty = float(k["p_empty_length"]) if float(k["p_empty_length"]) > 0 else (1.0 if k["empty_length"] else 0.0)
        choices = []
        bad_sent: list[dict] = []
        near_sent: list[dict] = []
        faults: list[str] = []
        good: list[str] = []
        for c in range(n_choices):
            d = draws if c == 0 else [rng.random() for _ in range(10)]
            finish = "stop"
            cut: tuple[int, int] | None = None
            if k["reply"] is not None:
                content = str(k["reply"](req, rng))
            elif d[4] < p_empty:
                content, finish = "", "length"
                faults.append("empty_length")
            elif d[5] < k["p_garbage"]:
                content = make_garbage(rng, lang)
                faults.append("garbage")
            else:
                items = [make_item(rng, lang) for _ in range(count)]
                good_idx = set(range(count))
                if d[6] < k["p_bad_items"]:
                    faults.append("bad_items")
                    n_bad = 1 + rng.randrange(max(1, count // 4))
                    for i in rng.sample(range(count), min(n_bad, count)):
                        kind = rng.choice(BAD_KINDS)
                        items[i] = _bad_item(rng, lang, kind)
                        good_idx.discard(i)
                        bad_sent.append({"kind": kind, "instruction": items[i][0]})
                if d[7] < k["p_near_duplicate"]:
                    with self._lock:
                        history = self._history[lang]
                        pool = history[-2000:]
                    candidates = sorted(good_idx)
                    earlier = [items[i][0] for i in candidates[:1]]
                    if candidates and (pool or len(candidates) > 1):
                        target = candidates[-1]
                        original = rng.choice(pool) if pool else earlier[0]
                        edited = _near_duplicate(rng, original, lang)
                        items[target] = (edited, "", make_text(rng, lang, 20, 120))
                        good_idx.discard(target)
                        near_sent.append({"instruction": edited, "original": original})
                        faults.append("near_duplicate")
                good.extend(items[i][0] for i in sorted(good_idx))
                content = render_items(items, lang, as_json, hant)
                if k["overrun"] and not as_json:
                    extra = [make_item(rng, lang) for _ in range(int(k["overrun"]))]
                    good.extend(e[0] for e in extra)
                    tail = render_items(items + extra, lang, False, hant).split("\n###\n", len(items))[-1]
                    user = message_text(messages)[-1] if message_text(messages) else ""
                    marker = "示例1" if lang == "zh" else "Example 1"
                    echo = user[user.find(marker):][:400] if marker in user else ""
                    content = f"{content}\n###\n{tail}\n\n{echo}"[:-7]
                    finish = "length"
                elif d[8] < k["p_truncated"]:
                    faults.append("truncated")
                    # Where the last item starts; the cut falls inside it (after any wrapping below).
                    cut = (content.rfind('{"instruction"') if as_json else content.rfind("\n###\n") + 5 if count > 1 else 0, len(content))
            prefix = ""
            if k["think"]:
                prefix = "<think>Let me think about which tasks would be diverse and useful.</think>\n"
            if k["code_fence"]:
                prefix += "```json\n" if as_json else "```\n"
                content = prefix + content + "\n```"
            else:
                content = prefix + content
            if cut is not None:
                start, end = cut[0] + len(prefix), cut[1] + len(prefix)
                lo = start + max(1, (end - start) // 4)
                content = content[: rng.randint(lo, max(lo, end - 2))]
                finish = "length"
                cut = None
            if int(k["reply_chars"]) > 0:
                n = int(k["reply_chars"])
                content = (content * (n // max(len(content), 1) + 1))[:n]
            choices.append({"index": c, "message": {"role": "assistant", "content": content, "refusal": None},
                            "logprobs": None, "finish_reason": finish})
        prompt_tokens = sum(len(t) for t in message_text(messages)) // 2 + 10
        if k["context"]:
            room = int(k["context"]) - prompt_tokens
            if room <= 0:
                return _Response(400, _error_body(
                    f"the request exceeds the available context size ({prompt_tokens} prompt tokens, context {k['context']}), "
                    "try increasing it", "exceed_context_size_error"))
            for ch in choices:  # the reply stops where the context is full: prompt + completion = context
                if len(ch["message"]["content"]) // 2 + 1 > room:
                    ch["message"]["content"] = ch["message"]["content"][: 2 * (room - 1)]
                    ch["finish_reason"] = "length"
        completion_tokens = sum(len(ch["message"]["content"]) // 2 + 1 for ch in choices)
        completion: dict[str, Any] = {
            "id": f"chatcmpl-fake{n_req}", "object": "chat.completion", "created": int(time.time()),
            "model": req.get("model"), "system_fingerprint": "fp_fake", "choices": choices,
        }
        mode = k["usage_mode"]
        counted = (0, 0)
        if mode == "exact":
            counted = (prompt_tokens, completion_tokens)
        elif mode == "completion_one":
            counted = (prompt_tokens, 1)
        if mode != "absent":
            completion["usage"] = {
                "prompt_tokens": counted[0], "completion_tokens": counted[1], "total_tokens": counted[0] + counted[1],
                "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0},
            }
        contents = [ch["message"]["content"] for ch in choices]
        record = bool(k["record_contents"])

        def on_sent() -> None:  # called under self._lock when the response is written
            s = self._stats
            s["responses_ok"] += 1
            s["prompt_tokens_sent"] += counted[0]
            s["completion_tokens_sent"] += counted[1]
            for name in faults:
                s["faults"][name] = s["faults"].get(name, 0) + 1
            s["bad_items"].extend(bad_sent)
            s["near_duplicates"].extend(near_sent)
            if record:
                s["sent_contents"].extend(contents)
                self._contents_json.extend(json.dumps(c, ensure_ascii=False) for c in contents)
            history = self._history[lang]
            history.extend(good)
            if len(history) > 4000:
                del history[:2000]

        return _Response(200, json.dumps(completion, ensure_ascii=False).encode(), [("x-request-id", f"req_fake{n_req}")], on_sent)

    # ---- stats as a file (process form) ----------------------------------------------

    def stats_json_pieces(self) -> tuple[int, list[str]]:
        """(version, JSON text pieces) of the stats, cheap to take under the lock; join them to write."""
        with self._lock:
            s = self._snapshot()
            pieces = self._contents_json[:]
            version = self._version
        s.pop("sent_contents")
        head = json.dumps(s, ensure_ascii=False)
        return version, [head[:-1], ', "sent_contents": [', ", ".join(pieces), "]}"]

    def write_stats(self, path: str) -> int:
        """Write the stats as JSON to `path` atomically (temp file + rename); returns the stats version."""
        version, pieces = self.stats_json_pieces()
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(pieces)
        os.replace(tmp, path)
        return version


# ---------------------------------------------------------------------------------------------
# Process form
# ---------------------------------------------------------------------------------------------


def _parser():
    import argparse

    p = argparse.ArgumentParser(
        prog="openai_server.py",
        description="Fake OpenAI-compatible teacher on 127.0.0.1. Prints the base URL once listening; "
        "SIGTERM writes --stats-out and exits.",
    )
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--host", default="127.0.0.1", choices=("127.0.0.1", "::1"), help="a loopback address (default 127.0.0.1)")
    p.add_argument("--stats-out", default=None, help="write stats JSON here every second and on exit")
    p.add_argument("--config", default=None, help="knobs as a JSON object, inline or a path to a .json file")
    p.add_argument("--max-seconds", type=float, default=1800.0, help="exit by itself after this long (0: never)")
    p.add_argument("--keep-when-orphaned", action="store_true", help="keep serving after the parent process dies")
    for name, default in KNOBS.items():
        flag = "--" + name.replace("_", "-")
        if name == "reply":
            continue
        if name in ("batch_expire_after", "batch_fail"):
            p.add_argument(flag, type=int if name == "batch_expire_after" else str, default=None)
            continue
        if name == "moderation":
            p.add_argument(flag, default=None, help="flag moderation inputs that contain this word (default: no /v1/moderations)")
            continue
        if isinstance(default, bool) and flag.startswith("--no-"):
            # BooleanOptionalAction reads any --no-… spelling as False: --no-json-mode would switch itself off.
            p.add_argument(flag, action="store_true", default=None)
        elif isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif name == "body":
            p.add_argument(flag, default=None, choices=BODIES)
        elif name == "report_context":
            p.add_argument(flag, default=None, choices=("props", "models"))
        elif name in ("seed", "max_requests", "reply_chars", "slots", "context"):
            p.add_argument(flag, type=int, default=None)
        elif name == "models":
            p.add_argument(flag, default=None, help="comma-separated model names")
        elif name in ("api_key", "usage_mode"):
            p.add_argument(flag, default=None, choices=USAGE_MODES if name == "usage_mode" else None)
        else:
            p.add_argument(flag, type=float, default=None)
    return p


def knobs_from_args(argv: list[str] | None = None) -> tuple[dict[str, Any], Any]:
    args = _parser().parse_args(argv)
    knobs: dict[str, Any] = {}
    if args.config:
        text = args.config
        if not text.lstrip().startswith("{"):
            with open(text, encoding="utf-8") as fh:
                text = fh.read()
        knobs.update(json.loads(text))
    for name in KNOBS:
        value = getattr(args, name, None)
        if value is None:
            continue
        if name == "models":
            value = [m.strip() for m in value.split(",") if m.strip()]
        knobs[name] = value
    return knobs, args


def main(argv: list[str] | None = None) -> int:
    import signal

    knobs, args = knobs_from_args(argv)
    fake = FakeTeacher(**knobs)
    parent = os.getppid()

    async def run() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await fake._listen(args.port, args.host)
        written = fake.write_stats(args.stats_out) if args.stats_out else -1  # the file exists once the URL is out
        print(fake.base_url, flush=True)
        started = time.monotonic()
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
            if args.max_seconds and time.monotonic() - started > args.max_seconds:
                break
            if os.getppid() != parent and not args.keep_when_orphaned:  # the parent died: do not linger
                break
            if args.stats_out and fake._version != written and not stop.is_set():
                # The JSON text is built here (cheap: contents are pre-encoded); the disk write in a thread.
                version, pieces = fake.stats_json_pieces()
                await loop.run_in_executor(None, _write_pieces, args.stats_out, pieces)
                written = version
        fake._server.close()
        if args.stats_out:
            fake.write_stats(args.stats_out)

    asyncio.run(run())
    return 0


def _write_pieces(path: str, pieces: list[str]) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(pieces)
    os.replace(tmp, path)


if __name__ == "__main__":
    raise SystemExit(main())
