"""Cross-session dynamic batching.

Steps of different sessions that arrive while a batch runs form the next batch: there is no timer,
so a lone step on an idle server runs at once, and a busy server batches as wide as its backlog.
Rules, each needed for exact state carry:
  - a batch holds at most one step per session, and a session's steps run in arrival order
    (a session's later step is never taken while an earlier one waits);
  - every step in a batch has the same length T (padding would change the carried state);
    the oldest waiting step picks T, so no length starves;
  - a step whose deadline passed, or whose caller went away, is dropped before compute;
  - overload is refused, not queued: a full queue, or a queue whose oldest step already waited
    max_queue_wait, refuses new steps at once, and a step that waited longer is refused unrun;
  - new state is committed with compare-and-set on the position the step was computed from;
    a step that carries its own state (client-held) starts from it and commits nothing.
onnxruntime runs in a worker thread (it releases the GIL) so the event loop keeps serving, except
for batches of at most INLINE_MAX_TOKENS tokens: those take ~20-40 us, less than handing them to the
thread and waking the loop afterwards costs, so the event loop runs them itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from service.engine import TOKENS, Engine
from service.errors import Aborted, CellstreamError, DeadlineExceeded, ResourceExhausted, Unavailable, session_not_found
from service.metrics import Metrics, observe_many
from service.sessions.base import SessionRecord, SessionStore, StateUpdates, stack_states

log = logging.getLogger(__name__)

INLINE_MAX_TOKENS = 4


class StepResult(NamedTuple):  # a tuple: built once per step, in the hot path
    logits: np.ndarray  # (T, V)
    h: np.ndarray  # (L, H) after the step
    c: np.ndarray
    position: int  # after the step


StepInputs = list[int] | np.ndarray
"""A step's validated input: T token ids, or (T, F) float32 features."""


@dataclass(slots=True)
class StepJob:
    session_id: str
    inputs: StepInputs
    expected_position: int | None = None
    deadline: float | None = None  # loop.time() after which the step is not worth computing
    state: tuple[np.ndarray, np.ndarray] | None = None  # client-held (h, c) (L, H): not in the store
    future: asyncio.Future[StepResult] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    enqueued: float = 0.0
    owner: str | None = None  # if set: the session must be this principal's (checked when it is loaded)
    on_done: Callable[[StepJob], None] | None = None
    """Called at once when the batcher resolves the future: a multiplexed call learns of each of its
    steps without a callback scheduled on the event loop per step."""

    def succeed(self, result: StepResult) -> None:
        self.future.set_result(result)
        if self.on_done is not None:
            self.on_done(self)

    def fail(self, error: Exception) -> None:
        if not self.future.done():
            self.future.set_exception(error)
            if self.on_done is not None:
                self.on_done(self)


class Batcher:
    """Batches the steps of one model; `submit` from the event loop, await the result."""

    def __init__(
        self,
        engine: Engine,
        store: SessionStore,
        metrics: Metrics,
        *,
        max_batch_size: int,
        max_queue_size: int,
        max_queue_wait: float | None = None,
        inline_max_tokens: int = INLINE_MAX_TOKENS,
    ) -> None:
        self.engine = engine
        self.model = engine.spec.name
        self.store = store
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_queue_size = max_queue_size
        self.max_queue_wait = max_queue_wait  # seconds
        self.inline_max_tokens = inline_max_tokens  # 0: every batch runs on the worker thread
        self._queue: deque[StepJob] = deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ort-{self.model}")
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._input_dtype = np.int64 if engine.spec.input_kind == TOKENS else np.float32
        # Bound once: labels() costs a lock and a dict lookup on every call of the hot path.
        self._queue_wait = metrics.queue_wait.labels(self.model)
        self._compute = metrics.compute.labels(self.model)
        self._batch_size = metrics.batch_size.labels(self.model)
        self._tokens = metrics.tokens.labels(self.model)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.model}")

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def submit(self, job: StepJob) -> StepResult:
        self.enqueue(job)
        return await job.future

    def enqueue(self, job: StepJob) -> None:
        """Queue a step without waiting for it: its future gets the result. Refusals raise here."""
        _, refusal = self.enqueue_many((job,))
        if refusal is not None:
            raise refusal

    def enqueue_many(self, jobs: Sequence[StepJob]) -> tuple[int, CellstreamError | None]:
        """Queue `jobs` in order, as enqueue() would one after another, in one call (a multiplexed message
        queues all its steps at once, without a task each): returns how many were queued, and the error
        that refuses the others (None if none was refused)."""
        queue = self._queue
        if self._closed:
            return 0, Unavailable("server is shutting down; retry on another replica")
        room = self.max_queue_size - len(queue)
        if room > 0:
            now = asyncio.get_running_loop().time()
            if queue and self._overdue(queue[0], now):
                self.metrics.steps_dropped.labels(self.model, "queue_wait").inc(len(jobs))
                return 0, ResourceExhausted(f"model {self.model!r} is overloaded: its oldest queued step has "
                                            f"waited {now - queue[0].enqueued:.3f}s (max_queue_wait_ms); retry later")
            taken = jobs if len(jobs) <= room else jobs[:room]
            for job in taken:
                job.enqueued = now
            queue.extend(taken)
            self._wakeup.set()
            if len(taken) == len(jobs):
                return len(taken), None
        queued = max(room, 0)
        self.metrics.steps_dropped.labels(self.model, "queue_full").inc(len(jobs) - queued)
        return queued, ResourceExhausted(
            f"model {self.model!r} has {len(queue)} steps queued (max_queue_size); retry later")

    async def _loop(self) -> None:
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            batch = self._take_batch()
            if batch:
                try:
                    await self._execute(batch)
                except CellstreamError as exc:
                    for job in batch:
                        job.fail(exc)
                except asyncio.CancelledError:
                    for job in batch:
                        job.fail(Unavailable("server shut down while this step ran; nothing was applied"))
                    raise
                except Exception:  # the loop must survive anything, or every later caller hangs
                    log.exception("batch of %d steps on model %s failed", len(batch), self.model)
                    for job in batch:
                        job.fail(CellstreamError(f"internal error running model {self.model!r}"))

    def _overdue(self, job: StepJob, now: float) -> bool:
        return self.max_queue_wait is not None and now - job.enqueued > self.max_queue_wait

    def _take_batch(self) -> list[StepJob]:
        now = asyncio.get_running_loop().time()
        chosen: list[StepJob] = []
        waiting: deque[StepJob] = deque()
        seen: set[str] = set()
        length: int | None = None
        room = self.max_batch_size
        # Steps queued after this instant have not waited too long (max_queue_wait): checked in one comparison.
        fresh = -math.inf if self.max_queue_wait is None else now - self.max_queue_wait
        for job in self._queue:
            if job.future.done():  # the caller went away
                self.metrics.steps_dropped.labels(self.model, "cancelled").inc()
                continue
            if job.deadline is not None and now >= job.deadline:
                self.metrics.steps_dropped.labels(self.model, "deadline").inc()
                job.fail(DeadlineExceeded(f"deadline passed after {now - job.enqueued:.3f}s in the queue"))
                continue
            if job.enqueued < fresh:
                self.metrics.steps_dropped.labels(self.model, "queue_wait").inc()
                job.fail(ResourceExhausted(f"model {self.model!r} is overloaded: this step waited "
                                           f"{now - job.enqueued:.3f}s in the queue (max_queue_wait_ms); "
                                           "nothing was applied, retry later"))
                continue
            session_id = job.session_id
            if room and session_id not in seen and (length is None or len(job.inputs) == length):
                chosen.append(job)
                length = len(job.inputs)
                room -= 1
            else:
                waiting.append(job)
            seen.add(session_id)
        self._queue = waiting
        return chosen

    async def _execute(self, batch: list[StepJob]) -> None:
        loop = asyncio.get_running_loop()
        records = await self._starting_points(batch)
        jobs: list[StepJob] = []
        ready: list[SessionRecord] = []
        for job, record in zip(batch, records, strict=True):
            if record is None or (job.owner is not None and record.owner != job.owner):
                job.fail(session_not_found(job.session_id))
            elif job.expected_position is not None and job.expected_position != record.position:
                job.fail(Aborted(
                    f"expected_position is {job.expected_position} but session {job.session_id!r} is at "
                    f"position {record.position}; nothing was applied"
                ))
            elif not job.future.done():
                jobs.append(job)
                ready.append(record)
        if not jobs:
            return
        started = loop.time()
        observe_many(self._queue_wait, [started - job.enqueued for job in jobs])
        inputs = np.array([job.inputs for job in jobs], dtype=self._input_dtype)  # (B, T[, F])
        # Read now, before any await: a commit of another batch may overwrite these states in place.
        held = any(job.state is not None for job in jobs)
        h0, c0 = stack_states(ready) if held else self.store.stack(ready)  # (L, B, H)
        positions = [record.position for record in ready]
        if inputs.shape[0] * inputs.shape[1] <= self.inline_max_tokens:
            logits, hn, cn = self.engine.run(inputs, h0, c0)
        else:
            logits, hn, cn = await loop.run_in_executor(self._executor, self.engine.run, inputs, h0, c0)
        self._compute.observe(loop.time() - started)
        self._batch_size.observe(len(jobs))
        steps = inputs.shape[1]
        # Each result's h, c are views of the batch's arrays (L, B, H), which nothing writes again; the
        # store copied what it keeps. Iterating the (B, L, H) transposes makes those views in C.
        results = zip(jobs, positions, logits, hn.transpose(1, 0, 2), cn.transpose(1, 0, 2), strict=True)
        # A caller that went away while the batch ran gets nothing applied: its request failed.
        committing: list[tuple[StepJob, StepResult]] = []
        columns: list[int] = []
        answered = 0
        for column, (job, position, row_logits, h, c) in enumerate(results):
            if job.future.done():
                continue
            if job.state is not None:
                job.succeed(StepResult(row_logits, h, c, steps))
                answered += 1
                continue
            committing.append((job, StepResult(row_logits, h, c, position + steps)))
            columns.append(column)
        if committing:
            every = len(columns) == len(jobs)
            applied = await self.store.commit_many(StateUpdates(
                [job.session_id for job, _ in committing], [positions[k] for k in columns],
                [result.position for _, result in committing],
                hn if every else hn[:, columns], cn if every else cn[:, columns]))
            for (job, result), ok in zip(committing, applied, strict=True):
                if not ok:
                    job.fail(Aborted(f"session {job.session_id!r} changed while this step ran; nothing was applied"))
                elif not job.future.done():
                    job.succeed(result)
                    answered += 1
        self._tokens.inc(answered * steps)

    async def _starting_points(self, batch: list[StepJob]) -> list[SessionRecord | None]:
        """Each job's record: its stored session (one store round trip), or its client-held state."""
        stored = [job.session_id for job in batch if job.state is None]
        loaded = iter(await self.store.load_many(stored) if stored else [])
        return [next(loaded) if job.state is None else SessionRecord(job.session_id, self.model, *job.state, 0, 0.0)
                for job in batch]

    async def close(self) -> None:
        """Stop taking steps; fail those still queued with UNAVAILABLE."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for job in self._queue:
            job.fail(Unavailable("server shut down before this step ran; retry"))
        self._queue.clear()
        # A batch cut off mid-compute finishes in its thread on its own; waiting would block the loop.
        self._executor.shutdown(wait=False, cancel_futures=True)
