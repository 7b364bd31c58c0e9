"""What the Python client's own multiplexing reaches (`make bench-client`, `python -m cellstream.bench.client`).

A `cellstream serve` process on the shipped model; this process opens SESSIONS sessions and steps each of them
one byte at a time, back to back, from its own asyncio task, in three ways, each for the same time:

- `AsyncClient`: `await session.step(tokens=[...])` per step; the client coalesces the concurrent steps onto one
  StreamMany stream by itself (every step conditional on its position: exactly once across retries);
- `AsyncClient(multiplex=False)`: the same sessions, one unary `Step` call per step (what a thin client does);
- a hand-written StreamMany loop: one pre-serialised StepBatch naming every session, sent again as soon as all
  its outcomes are back (bench/multiplexed.py's load; no expected positions, no per-step Python work).

Then one session alone, through the client both ways: the latency of a lone step (p50, p99).
The table gives steps/s, the mean batch the server ran (its metrics) and the server's and this process's CPU
per step (from /proc). Figures are the machine's: compare the rows of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from cellstream import AsyncClient, AsyncSession
from cellstream.bench import wire
from cellstream.bench.procfs import cpu_seconds
from cellstream.bench.server import ServerProcess
from cellstream.bench.stats import percentile_ms

MODEL_DIR = Path(__file__).resolve().parents[1] / "model" / "artifacts"
MODEL = "cellstream-chat"
SESSIONS = 256
TOKEN = [wire.STEP_TOKEN]


@dataclass(frozen=True)
class Row:
    name: str
    steps: int
    seconds: float
    latencies: list[float]
    server_cpu_seconds: float
    client_cpu_seconds: float
    batches: float
    batch_steps: float

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.seconds

    def cells(self) -> list[str]:
        per_step = 1e6 / self.steps if self.steps else 0.0
        mean_batch = self.batch_steps / self.batches if self.batches else 0.0
        return [self.name, f"{self.steps_per_s:,.0f}", f"{percentile_ms(self.latencies, 50):.2f}",
                f"{percentile_ms(self.latencies, 99):.2f}", f"{mean_batch:.1f}",
                f"{self.server_cpu_seconds * per_step:.1f}", f"{self.client_cpu_seconds * per_step:.1f}"]


Load = Callable[[Callable[[], bool], list[float]], Awaitable[int]]


async def measure(name: str, server: ServerProcess, load: Load, warmup: float, seconds: float) -> Row:
    """Run `load` (it steps until told to stop, noting each step's latency; returns the steps it made) and read
    the server and this process over a window after `warmup`."""
    latencies: list[float] = []
    state = {"stop": False}
    task = asyncio.ensure_future(load(lambda: state["stop"], latencies))
    await asyncio.sleep(warmup)
    before, client_before, start = server.snapshot(), cpu_seconds(os.getpid()), len(latencies)
    await asyncio.sleep(seconds)
    after, client_after, end = server.snapshot(), cpu_seconds(os.getpid()), len(latencies)
    state["stop"] = True
    await task
    return Row(name, end - start, after.time - before.time, latencies[start:end],
               after.cpu_seconds - before.cpu_seconds, client_after - client_before,
               after.batches.batches - before.batches.batches, after.batches.steps - before.batches.steps)


def through_client(sessions: Sequence[AsyncSession]) -> Load:
    async def load(stopping: Callable[[], bool], latencies: list[float]) -> int:
        async def one(session: AsyncSession) -> None:
            while not stopping():
                started = time.perf_counter()
                await session.step(TOKEN)
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(one(s) for s in sessions))
        return len(latencies)

    return load


def hand_written(target: str, session_ids: list[str]) -> Load:
    """One StreamMany stream, one pre-serialised message naming every session, sent again once answered."""
    async def load(stopping: Callable[[], bool], latencies: list[float]) -> int:
        async with grpc.aio.insecure_channel(target) as channel:
            call = channel.stream_stream(wire.STREAM_MANY)()
            request = wire.step_batch(session_ids)
            while not stopping():
                started = time.perf_counter()
                await call.write(request)
                received = 0
                while received < len(session_ids):
                    received += wire.outcomes(await call.read())
                elapsed = time.perf_counter() - started
                latencies.extend([elapsed] * len(session_ids))  # every step of the round took the round's time
            await wire.finish(call, "StreamMany")
        return len(latencies)

    return load


async def run(target: str, server: ServerProcess, sessions: int, warmup: float, seconds: float
              ) -> tuple[list[Row], float]:
    """The rows of the table, and the steps per StreamMany message the client sent."""
    async with AsyncClient(target) as client, AsyncClient(target, multiplex=False) as unary:
        opened = [await client.open_session(MODEL) for _ in range(sessions)]
        rows = [await measure(f"client, {sessions} sessions (StreamMany by itself)", server, through_client(opened),
                              warmup, seconds)]
        per_message = client.steps_per_message
        # The same sessions, attached where the first run left them, by a client that does not multiplex.
        same = [await unary.attach(s.session_id) for s in opened]
        rows += [
            await measure(f"client, {sessions} sessions, unary Step", server, through_client(same), warmup, seconds),
            # Those sessions' positions move under the client: this run sends no expected positions.
            await measure(f"hand-written StreamMany loop, {sessions} sessions", server,
                          hand_written(target, [s.session_id for s in opened]), warmup, seconds),
        ]
        lone = await client.open_session(MODEL)
        rows.append(await measure("client, 1 session (StreamMany)", server, through_client([lone]), warmup, seconds))
        rows.append(await measure("client, 1 session, unary Step", server,
                                  through_client([await unary.attach(lone.session_id)]), warmup, seconds))
        return rows, per_message


def print_table(rows: list[Row], steps_per_message: float) -> None:
    header = ["run", "steps/s", "p50 ms", "p99 ms", "mean batch", "server CPU µs/step", "client CPU µs/step"]
    print("| " + " | ".join(header) + " |")
    print("|---|" + "---:|" * (len(header) - 1))
    for row in rows:
        print("| " + " | ".join(row.cells()) + " |")
    many, unary, hand, lone, lone_unary = rows
    print(f"\nclient / unary Step: {many.steps_per_s / unary.steps_per_s:.2f}x steps/s; hand-written loop / client: "
          f"{hand.steps_per_s / many.steps_per_s:.2f}x; a lone step's p50: {percentile_ms(lone.latencies, 50):.2f} ms "
          f"multiplexed, {percentile_ms(lone_unary.latencies, 50):.2f} ms unary; the first run's client sent "
          f"{steps_per_message:.1f} steps per StreamMany message")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cellstream.bench.client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per run (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured time before each (default 2)")
    parser.add_argument("--sessions", type=int, default=SESSIONS, help=f"concurrent sessions (default {SESSIONS})")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as logs, ServerProcess(
            MODEL_DIR, MODEL, {"ort_intra_op_threads": 1}, (), Path(logs) / "server.log") as server:
        loop = new_event_loop()
        try:
            rows, per_message = loop.run_until_complete(run(server.target, server, args.sessions, args.warmup,
                                                            args.seconds))
        finally:
            loop.close()
    print(f"{args.sessions} sessions of 1-byte steps, {args.seconds:g} s each, client and server on "
          f"{os.cpu_count()} cores ({type(loop).__module__.split('.')[0]} event loop in the client)")
    print_table(rows, per_message)
    return 0


def new_event_loop() -> asyncio.AbstractEventLoop:
    with contextlib.suppress(ImportError):
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


if __name__ == "__main__":
    raise SystemExit(main())
