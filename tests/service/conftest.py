"""Fixtures for the live-server tests: in-process servers on real ports, clients, references, scrapes.

Helpers are handed out through fixtures so no test module imports a conftest by name.
"""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import aio as triton_aio

from cellstream import AsyncClient
from cellstream.service._proto.cellstream.v1 import inference_pb2 as pb
from cellstream.service._proto.cellstream.v1 import inference_pb2_grpc as pb_grpc
from cellstream.service.config import load_settings
from cellstream.service.engine import Engine
from cellstream.service.server import RunningServer, start_server

CHAT = "tiny-chat"


class Samples:
    """One /metrics scrape: sample values by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.values: dict[tuple[str, frozenset], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.values[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def get(self, name: str, default: float | None = None, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        if key not in self.values:
            if default is not None:
                return default
            raise KeyError(f"no sample {name}{labels} in the scrape")
        return self.values[key]

    def names(self) -> set[str]:
        return {name for name, _ in self.values}


def state_arrays(state) -> tuple[np.ndarray, np.ndarray]:
    """(h, c) of a State message as (L, H) float32 arrays."""
    shape = (state.num_layers, state.hidden_size)
    return (np.asarray(state.h, np.float32).reshape(shape), np.asarray(state.c, np.float32).reshape(shape))


@pytest.fixture
def arrays():
    """state_arrays(State) -> (h, c) as (L, H) arrays."""
    return state_arrays


class ManualClock:
    """A monotonic clock that moves only when the test says: idle TTLs pass in one call, however busy
    the machine is, and never pass by accident while the test runs slowly."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> ManualClock:
    """A ManualClock: start(clock=clock) gives the server's memory store that clock for its idle TTLs."""
    return ManualClock()


@pytest.fixture
async def start(tiny_model_dir: Path) -> AsyncIterator[Callable[..., Awaitable[RunningServer]]]:
    """start(clock=time.monotonic, **settings) -> a RunningServer on 127.0.0.1 with free ports, its memory
    store's idle TTLs on `clock`; all stopped after the test."""
    servers: list[RunningServer] = []

    async def _start(clock: Callable[[], float] = time.monotonic, **overrides: object) -> RunningServer:
        settings = dict(
            host="127.0.0.1",
            port=0,
            metrics_host="127.0.0.1",
            metrics_port=0,
            model_dir=tiny_model_dir,
            default_model=CHAT,
            ort_intra_op_threads=1,
        )
        settings.update(overrides)
        running = await asyncio.wait_for(start_server(load_settings(**settings), clock=clock), 60)
        servers.append(running)
        return running

    yield _start
    for running in servers:
        await asyncio.wait_for(running.stop(0), 30)


@pytest.fixture
async def server(start) -> RunningServer:
    return await start()


@pytest.fixture
async def client(server: RunningServer) -> AsyncIterator[AsyncClient]:
    """cellstream.AsyncClient on `server`: steps and replies multiplexed, as users get them."""
    async with AsyncClient(f"127.0.0.1:{server.port}", timeout=30) as c:
        yield c


Stub = pb_grpc.InferenceStub


@pytest.fixture
async def connect() -> AsyncIterator[Callable[..., Stub]]:
    """connect(running) -> the generated cellstream.v1 stub on a real channel to that server (each RPC as it is
    on the wire, errors as grpc.aio.AioRpcError); closed after the test."""
    channels: list[grpc.aio.Channel] = []

    def _connect(running: RunningServer) -> Stub:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
        channels.append(channel)
        return pb_grpc.InferenceStub(channel)

    yield _connect
    for channel in channels:
        await channel.close()


@pytest.fixture
async def channel(server: RunningServer) -> AsyncIterator[grpc.aio.Channel]:
    """A grpc.aio channel to `server` (for raw bytes, health, reflection)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as opened:
        yield opened


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> Stub:
    """The generated cellstream.v1 stub on `server`, for tests of the RPCs themselves."""
    return pb_grpc.InferenceStub(channel)


def step_request(session_id: str = "", *, tokens: object = None, text: str | None = None,
                 features: object = None, expected_position: int | None = None, logits: bool = False,
                 top_k: int = 0, all_steps: bool = False, state: bool = False, gates: bool = False,
                 tag: int = 0) -> pb.StepRequest:
    """A StepRequest with one of tokens, text or features ((T, F) floats) and the outputs asked for."""
    request = pb.StepRequest(session_id=session_id, tag=tag, expected_position=expected_position,
                             want=pb.Outputs(logits=logits, top_k=top_k, all_steps=all_steps, state=state,
                                             gates=gates))
    if tokens is not None:
        request.tokens.ids.extend(int(t) for t in tokens)  # type: ignore[attr-defined]
    elif text is not None:
        request.text = text
    elif features is not None:
        array = np.asarray(features, dtype=np.float32)
        request.features.values.extend(array.ravel().tolist())
        request.features.dim = array.shape[-1]
    return request


@pytest.fixture
def step() -> Callable[..., pb.StepRequest]:
    """step(session_id, tokens=... | text=... | features=..., logits=..., top_k=..., expected_position=..., tag=...)
    -> a StepRequest (for the stub, or an item of a StepBatch)."""
    return step_request


@pytest.fixture
def reply() -> Callable[..., Awaitable[str]]:
    """await reply(stub, session_id, prompt, **GenerateRequest fields) -> the whole text of one Generate call."""

    async def _reply(stub: Stub, session_id: str, prompt: str, **fields: object) -> str:
        request = pb.GenerateRequest(session_id=session_id, prompt=prompt, **fields)
        return "".join([chunk.text async for chunk in stub.Generate(request)])

    return _reply


@pytest.fixture
def warmed() -> Callable[..., Awaitable[str]]:
    """warmed(stub, model="tiny-chat", metadata=None) -> the id of a new session stepped to non-zero state
    (position 5, 3 for features), so 'unchanged' means something; `metadata`: a principal's bearer token."""

    async def _warmed(stub: Stub, model: str = CHAT, metadata: tuple[tuple[str, str], ...] | None = None) -> str:
        session_id = (await stub.OpenSession(pb.OpenSessionRequest(model=model), metadata=metadata)).session_id
        if model == CHAT:
            await stub.Step(step_request(session_id, tokens=[10, 20, 30, 40, 50]), metadata=metadata)
        else:
            await stub.Step(step_request(session_id, features=np.linspace(-1, 1, 15).reshape(3, 5)), metadata=metadata)
        return session_id

    return _warmed


class Gate:
    """A model's engine whose next run waits (in the ORT worker thread) until the gate opens."""

    def __init__(self, engine) -> None:
        self.engine, self.spec = engine, engine.spec
        self.running, self.open = threading.Event(), threading.Event()

    def run(self, inputs: np.ndarray, h0: np.ndarray, c0: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.running.is_set():
            self.running.set()
            self.open.wait(30)
        return self.engine.run(inputs, h0, c0)


@pytest.fixture
def gate() -> Iterator[Callable[..., Gate]]:
    """gate(running, model="tiny-chat") -> a Gate on that model's batcher: hold the model busy while
    other steps queue (`gate.running.wait()`, then `gate.open.set()`). Opened after the test anyway."""
    gates: list[Gate] = []

    def _gate(running: RunningServer, model: str = CHAT) -> Gate:
        batcher = running.dataplane.batchers[model]
        batcher.engine = Gate(batcher.engine)
        batcher.inline_max_tokens = 0  # the gate blocks: never on the event loop
        gates.append(batcher.engine)
        return batcher.engine

    yield _gate
    for g in gates:
        g.open.set()


@pytest.fixture
async def triton(server: RunningServer) -> AsyncIterator[triton_aio.InferenceServerClient]:
    """tritonclient.grpc.aio's client on a real channel to `server` (the KServe v2 API)."""
    c = triton_aio.InferenceServerClient(f"127.0.0.1:{server.port}")
    yield c
    await c.close()


@pytest.fixture
async def http(server: RunningServer) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client on `server`'s HTTP port (a module that uses it starts its server with an http_port)."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.http_port}", timeout=30) as c:
        yield c


class HoldRun:
    """A model's engine whose `n`-th run (counted from now) waits until `open` is set."""

    def __init__(self, engine: Engine, n: int) -> None:
        self.engine, self.spec, self.n, self.runs = engine, engine.spec, n, 0
        self.running, self.open = threading.Event(), threading.Event()

    def run(self, inputs: np.ndarray, h0: np.ndarray, c0: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self.runs += 1
        if self.runs == self.n:
            self.running.set()
            self.open.wait(30)
        return self.engine.run(inputs, h0, c0)


@pytest.fixture
def hold_run() -> type[HoldRun]:
    """hold_run(engine, n): the engine, its n-th run from now held until `.open` is set (`.running` tells)."""
    return HoldRun


@pytest.fixture
def scrape() -> Callable[[RunningServer], Awaitable[Samples]]:
    """scrape(running) -> Samples of GET http://127.0.0.1:<metrics_port>/metrics."""

    async def _scrape(running: RunningServer) -> Samples:
        def fetch() -> str:
            url = f"http://127.0.0.1:{running.metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=10) as response:
                assert response.status == 200
                return response.read().decode()

        return Samples(await asyncio.to_thread(fetch))

    return _scrape


@pytest.fixture
def rpc_error():
    """await rpc_error(awaitable) -> the grpc.aio.AioRpcError it raised (fails if it succeeded)."""

    async def _rpc_error(awaitable: Awaitable[object]) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(awaitable, 30)
        return info.value

    return _rpc_error


@pytest.fixture
def eventually() -> Callable[..., Awaitable[None]]:
    """await eventually(condition, what): poll `condition()` (a bool, or an awaitable of one) until it holds;
    fails with `what` after 30 s. For what the server learns a moment after the client (a cancellation)."""

    async def _eventually(condition: Callable[[], bool | Awaitable[bool]], what: str) -> None:
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            held = condition()
            if not isinstance(held, bool):
                held = await held
            if held:
                return
            assert asyncio.get_running_loop().time() < deadline, f"never happened: {what}"
            await asyncio.sleep(0.01)

    return _eventually
