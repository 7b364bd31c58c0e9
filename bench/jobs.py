"""What the parent asks a client process to do, and what it hands back (all picklable)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class StepLoad:
    """`sessions` sessions, each sending 1-token steps back to back over `api` until told to stop."""

    api: str  # options.API_STREAM or API_UNARY
    sessions: int
    timeout_seconds: float


@dataclass(frozen=True)
class EchoLoad:
    """`calls` streams (or unary calls in flight) to the empty echo server, each sending the bytes of a
    1-token StreamSteps request back to back until told to stop."""

    api: str  # options.API_STREAM or API_UNARY
    calls: int
    timeout_seconds: float


@dataclass(frozen=True)
class ManyLoad:
    """Multiplexed calls (`api`: StreamMany or StepMany), one per entry of `sessions_per_call`: each sends
    a 1-token step for every one of its sessions in one message, waits for all their outcomes, and again."""

    api: str  # options.API_STREAM_MANY or API_STEP_MANY
    sessions_per_call: tuple[int, ...]
    timeout_seconds: float


@dataclass(frozen=True)
class KServeLoad:
    """`sessions` KServe sequences of `model`, each stepping 1 token back to back with tritonclient: unary
    ModelInfer calls, or (`stream`) a ModelStreamInfer stream each; every reply carries `output` only."""

    sessions: int
    stream: bool
    model: str
    output: str
    timeout_seconds: float


@dataclass(frozen=True)
class GenerateLoad:
    """`sessions` sessions, each asking for chat replies back to back until told to stop."""

    sessions: int
    prompt: str
    max_tokens: int
    timeout_seconds: float


@dataclass(frozen=True)
class OpenIdle:
    """Open `warmup_sessions`, report ready, then open `sessions` more and leave them all idle."""

    sessions: int
    warmup_sessions: int
    concurrency: int
    timeout_seconds: float


@dataclass(frozen=True)
class Conversation:
    """Feed `turns` to one session (stateful) and, each turn, the whole history to a fresh one (stateless)."""

    turns: tuple[str, ...]
    repetitions: int
    timeout_seconds: float


@dataclass(frozen=True)
class HttpLoad:
    """`sessions` KServe sequences of `model`, each stepping 1 token back to back with tritonclient.http's
    aio client on the HTTP port at `url` (host:port); every reply carries `output` only, as binary data."""

    url: str
    sessions: int
    model: str
    output: str
    timeout_seconds: float


Job = StepLoad | EchoLoad | ManyLoad | KServeLoad | GenerateLoad | OpenIdle | Conversation | HttpLoad


@dataclass(frozen=True)
class Assignment:
    target: str  # host:port of the server
    job: Job


@dataclass
class Events:
    """Completed operations: when each began and ended, and what it counted (steps, tokens).

    Times are time.monotonic(), one clock for every process on the machine, so the parent can cut
    the events of all client processes to the window it measured the server over.
    """

    start: list[float] = field(default_factory=list)
    end: list[float] = field(default_factory=list)
    count: list[int] = field(default_factory=list)

    def add(self, start: float, end: float, count: int = 1) -> None:
        self.start.append(start)
        self.end.append(end)
        self.count.append(count)

    @classmethod
    def merge(cls, parts: list[Events]) -> Events:
        merged = cls()
        for part in parts:
            merged.start += part.start
            merged.end += part.end
            merged.count += part.count
        return merged

    def ended_within(self, begin: float, finish: float) -> Events:
        kept = Events()
        for start, end, count in zip(self.start, self.end, self.count, strict=True):
            if begin <= end <= finish:
                kept.add(start, end, count)
        return kept

    @property
    def latencies(self) -> list[float]:
        return [end - start for start, end in zip(self.start, self.end, strict=True)]

    @property
    def total(self) -> int:
        return sum(self.count)


@dataclass
class TurnLatencies:
    """Seconds per turn (one list entry per repetition) with the state carried and with the history re-sent."""

    stateful: list[list[float]]
    stateless: list[list[float]]
