"""Figure 5: tokens/s of concurrent chat replies (Generate: prompt prefill, then one step per token)."""

from __future__ import annotations

from cellstream.bench.conversation import chat_turns
from cellstream.bench.jobs import GenerateLoad
from cellstream.bench.options import Options
from cellstream.bench.pool import WorkerPool
from cellstream.bench.progress import say
from cellstream.bench.server import ServerProcess
from cellstream.bench.service_load import CALL_MARGIN_SECONDS
from cellstream.bench.window import measure_window


def reply_prompt() -> str:
    """A user line of the corpus, then the bot's turn to speak."""
    user_line = chat_turns(1)[0].split("\n")[0]
    return f"{user_line}\nbot: "


def measure_generate(pool: WorkerPool, server: ServerProcess, options: Options) -> list[dict[str, object]]:
    timeout = options.warmup_seconds + options.duration_seconds + CALL_MARGIN_SECONDS
    runs = []
    for replies in options.generate_levels:
        say(f"  generate: {replies} concurrent replies")
        jobs = [GenerateLoad(n, reply_prompt(), options.generate_tokens, timeout) if n else None
                for n in pool.spread(replies)]
        window = measure_window(pool, server, jobs, options.warmup_seconds, options.duration_seconds)
        # One event per streamed chunk: its latency is the time since the previous chunk (or the request).
        runs.append({"replies": replies, "max_tokens": options.generate_tokens, **window.summary("token")})
    return runs
