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
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from service.engine import Engine
from service.errors import Aborted, CellstreamError, DeadlineExceeded, NotFound, ResourceExhausted, Unavailable
from service.metrics import Metrics
from service.sessions.base import SessionRecord, SessionStore, StateUpdate

log = logging.getLogger(__name__)

INLINE_MAX_TOKENS = 4


@dataclass(frozen=True)
class StepResult:
    logits: np.ndarray  # (T, V)
    h: np.ndarray  # (L, H) after the step
    c: np.ndarray
    position: int  # after the step


@dataclass
class StepJob:
    session_id: str
    inputs: np.ndarray  # (T,) int64 tokens or (T, F) float32 features
    expected_position: int | None = None
    deadline: float | None = None  # loop.time() after which the step is not worth computing
    state: tuple[np.ndarray, np.ndarray] | None = None  # client-held (h, c) (L, H): not in the store
    future: asyncio.Future[StepResult] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    enqueued: float = 0.0

    @property
    def steps(self) -> int:
        return len(self.inputs)

    def fail(self, error: Exception) -> None:
        if not self.future.done():
            self.future.set_exception(error)


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
        if self._closed:
            raise Unavailable("server is shutting down; retry on another replica")
        if len(self._queue) >= self.max_queue_size:
            self.metrics.steps_dropped.labels(self.model, "queue_full").inc()
            raise ResourceExhausted(
                f"model {self.model!r} has {len(self._queue)} steps queued (max_queue_size); retry later"
            )
        now = asyncio.get_running_loop().time()
        if self._queue and self._overdue(self._queue[0], now):
            self.metrics.steps_dropped.labels(self.model, "queue_wait").inc()
            raise ResourceExhausted(f"model {self.model!r} is overloaded: its oldest queued step has waited "
                                    f"{now - self._queue[0].enqueued:.3f}s (max_queue_wait_ms); retry later")
        job.enqueued = now
        self._queue.append(job)
        self._wakeup.set()
        return await job.future

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
        for job in self._queue:
            if job.future.done():  # the caller went away
                self.metrics.steps_dropped.labels(self.model, "cancelled").inc()
                continue
            if job.deadline is not None and now >= job.deadline:
                self.metrics.steps_dropped.labels(self.model, "deadline").inc()
                job.fail(DeadlineExceeded(f"deadline passed after {now - job.enqueued:.3f}s in the queue"))
                continue
            if self._overdue(job, now):
                self.metrics.steps_dropped.labels(self.model, "queue_wait").inc()
                job.fail(ResourceExhausted(f"model {self.model!r} is overloaded: this step waited "
                                           f"{now - job.enqueued:.3f}s in the queue (max_queue_wait_ms); "
                                           "nothing was applied, retry later"))
                continue
            eligible = job.session_id not in seen and (length is None or job.steps == length)
            if eligible and len(chosen) < self.max_batch_size:
                chosen.append(job)
                length = job.steps
            else:
                waiting.append(job)
            seen.add(job.session_id)
        self._queue = waiting
        return chosen

    async def _execute(self, batch: list[StepJob]) -> None:
        loop = asyncio.get_running_loop()
        records = await self._starting_points(batch)
        ready: list[tuple[StepJob, SessionRecord]] = []
        for job, record in zip(batch, records, strict=True):
            if record is None:
                job.fail(NotFound(f"session {job.session_id!r} not found (unknown, expired, evicted or closed)"))
            elif job.expected_position is not None and job.expected_position != record.position:
                job.fail(Aborted(
                    f"expected_position is {job.expected_position} but session {job.session_id!r} is at "
                    f"position {record.position}; nothing was applied"
                ))
            elif not job.future.done():
                ready.append((job, record))
        if not ready:
            return
        started = loop.time()
        for job, _ in ready:
            self._queue_wait.observe(started - job.enqueued)
        inputs = np.stack([job.inputs for job, _ in ready])  # (B, T[, F])
        h0 = np.stack([record.h for _, record in ready], axis=1)  # (L, B, H)
        c0 = np.stack([record.c for _, record in ready], axis=1)
        # The positions this state stands for, read now: a store may update its records in place
        # while the batch runs, and compare-and-set must check against what was computed from.
        positions = [record.position for _, record in ready]
        if inputs.shape[0] * inputs.shape[1] <= self.inline_max_tokens:
            logits, hn, cn = self.engine.run(inputs, h0, c0)
        else:
            logits, hn, cn = await loop.run_in_executor(self._executor, self.engine.run, inputs, h0, c0)
        self._compute.observe(loop.time() - started)
        self._batch_size.observe(len(ready))
        # A caller that went away while the batch ran gets nothing applied: its request failed.
        live = [(b, job) for b, (job, _) in enumerate(ready) if not job.future.done()]
        for b, job in live:
            if job.state is not None:
                self._tokens.inc(job.steps)
                job.future.set_result(StepResult(logits[b], np.ascontiguousarray(hn[:, b]),
                                                 np.ascontiguousarray(cn[:, b]), job.steps))
        committing = [(b, job, positions[b]) for b, job in live if job.state is None]
        updates = [
            StateUpdate(job.session_id, position, np.ascontiguousarray(hn[:, b]),
                        np.ascontiguousarray(cn[:, b]), position + job.steps)
            for b, job, position in committing
        ]
        applied = await self.store.commit_many(updates)
        for (b, job, _), update, ok in zip(committing, updates, applied, strict=True):
            if not ok:
                job.fail(Aborted(f"session {job.session_id!r} changed while this step ran; nothing was applied"))
                continue
            self._tokens.inc(job.steps)
            if not job.future.done():
                job.future.set_result(StepResult(logits[b], update.h, update.c, update.position))

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
