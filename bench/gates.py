"""What asking for gates costs, and what it does to other sessions (`make bench-gates`,
`python -m cellstream.bench.gates`).

A `cellstream serve` process on the shipped model; SESSIONS sessions step one byte at a time back to back
(unary Step), while one more session sends a large request over and over: nothing; a plain request of the most
bytes a request with gates may have (max_gate_steps, or what fits in one reply); the same with gates; and a
plain request of max_tokens_per_request bytes, the largest any client may send; and one whose reply holds every
step's logits (want.all_steps), as many as one reply holds, about as many floats as the gates. The table gives the
large request's latency and the small steps' throughput and latency beside each: a gated request must weigh on
the others no more than the largest plain ones.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from cellstream import AsyncClient
from cellstream.bench.server import ServerProcess
from cellstream.bench.stats import percentile_ms
from cellstream.service.config import Settings
from cellstream.service.dataplane import FLOAT_BYTES, GATE_BYTES_PER_UNIT, REPLY_FRAMING_BYTES

MODEL_DIR = Path(__file__).resolve().parents[1] / "model" / "artifacts"
SESSIONS = 16
SETTINGS = Settings.model_construct()
LAYERS, HIDDEN, VOCAB = 2, 128, 260  # the shipped chat model
ROOM = SETTINGS.max_message_bytes - REPLY_FRAMING_BYTES
# The most steps one request with gates may have on it: max_gate_steps, or what fits in one reply; and the most
# steps whose every logits fit in one reply (want.all_steps): about as many floats, the other large reply.
GATED = min(SETTINGS.max_gate_steps, ROOM // (GATE_BYTES_PER_UNIT * LAYERS * HIDDEN))
ALL_STEPS = min(SETTINGS.max_tokens_per_request, ROOM // (FLOAT_BYTES * VOCAB))
CASES = (("none", 0, {}), (f"plain, {GATED} bytes", GATED, {}), (f"gated, {GATED} bytes", GATED, {"gates": True}),
         (f"plain, {SETTINGS.max_tokens_per_request} bytes (max_tokens_per_request)",
          SETTINGS.max_tokens_per_request, {}),
         (f"plain, {ALL_STEPS} bytes, every step's logits", ALL_STEPS, {"all_steps": True}))


async def small_steps(client: AsyncClient, stop: asyncio.Event, latencies: list[float]) -> None:
    session = await client.open_session()
    while not stop.is_set():
        started = time.perf_counter()
        await session.step([97])
        latencies.append(time.perf_counter() - started)


async def large_requests(client: AsyncClient, length: int, outputs: dict[str, bool], stop: asyncio.Event,
                         latencies: list[float]) -> None:
    session = await client.open_session()
    text = "a" * length
    while not stop.is_set():
        started = time.perf_counter()
        await session.step(text=text, **outputs)
        latencies.append(time.perf_counter() - started)
        await session.close()  # a fresh state each time: the same work every request
        session = await client.open_session()


async def measure(port: int, length: int, outputs: dict[str, bool], seconds: float) -> dict[str, float]:
    small: list[float] = []
    large: list[float] = []
    stop = asyncio.Event()
    # One unary Step per step, as the figures in docs/BENCHMARKS.md were measured (gates are served only so).
    async with AsyncClient(f"127.0.0.1:{port}", timeout=60, multiplex=False) as client:
        tasks = [asyncio.create_task(small_steps(client, stop, small)) for _ in range(SESSIONS)]
        if length:
            tasks.append(asyncio.create_task(large_requests(client, length, outputs, stop, large)))
        await asyncio.sleep(seconds)
        stop.set()
        await asyncio.gather(*tasks)
    return {"small_steps_per_s": len(small) / seconds, "small_p50_ms": percentile_ms(small, 50),
            "small_p99_ms": percentile_ms(small, 99), "large_ms": percentile_ms(large, 50) if large else 0.0}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cellstream.bench.gates", description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0, help="per case (default 10)")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as logs, ServerProcess(MODEL_DIR, "cellstream-chat", {}, (),
                                                               Path(logs) / "server.log") as server:
        for name, length, outputs in CASES:
            rows.append((name, asyncio.run(measure(server.port, length, outputs, args.seconds))))
    print(f"{SESSIONS} sessions of 1-byte unary steps beside one session of large requests ({args.seconds:g} s each)")
    print("| large request | its p50 ms | small steps/s | small p50 ms | small p99 ms |\n|---|---:|---:|---:|---:|")
    for name, row in rows:
        large = f"{row['large_ms']:.1f}" if row["large_ms"] else "-"
        print(f"| {name} | {large} | {row['small_steps_per_s']:,.0f} | {row['small_p50_ms']:.2f} | "
              f"{row['small_p99_ms']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
