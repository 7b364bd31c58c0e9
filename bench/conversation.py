"""Figure 4: per-turn latency of a chat when the server carries the state vs when the client re-sends history."""

from __future__ import annotations

import random
import statistics

from cellstream.bench.jobs import Conversation, TurnLatencies
from cellstream.bench.pool import WorkerPool
from cellstream.bench.server import ServerProcess
from cellstream.bench.window import READY_TIMEOUT_SECONDS
from cellstream.model.corpus import FillerGenerator, line

TURN_TIMEOUT_SECONDS = 60.0
SEED = 2024


def chat_turns(count: int, seed: int = SEED) -> tuple[str, ...]:
    """Small-talk turns of the model's training corpus: a user line and the bot's reply, ~70 bytes."""
    rng = random.Random(seed)
    filler = FillerGenerator()
    return tuple(line("user", user) + line("bot", bot) for user, bot in (filler.turn(rng) for _ in range(count)))


def history_bytes(turns: tuple[str, ...]) -> int:
    """Bytes (= tokens of the byte tokenizer) of the whole conversation: the stateless client's last request."""
    return len("".join(turns).encode())


def measure_conversation(pool: WorkerPool, server: ServerProcess, turns: tuple[str, ...],
                         repetitions: int) -> dict[str, object]:
    job = Conversation(turns, repetitions, TURN_TIMEOUT_SECONDS)
    pool.start(server.target, [job] + [None] * (pool.size - 1), READY_TIMEOUT_SECONDS)
    pool.go()
    timeout = TURN_TIMEOUT_SECONDS * len(turns) * repetitions
    [latencies] = pool.results(timeout)
    assert isinstance(latencies, TurnLatencies)
    stateful = [statistics.median(seconds) * 1e3 for seconds in latencies.stateful]
    stateless = [statistics.median(seconds) * 1e3 for seconds in latencies.stateless]
    return {
        "turns": len(turns),
        "repetitions": repetitions,
        "bytes_per_turn": history_bytes(turns) / len(turns),
        "history_bytes": history_bytes(turns),
        "stateful_ms": stateful,
        "stateless_ms": stateless,
        "ratio_at_final_turn": stateless[-1] / stateful[-1],
    }
