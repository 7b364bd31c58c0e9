"""Cross-session dynamic batching.

Steps of different sessions that arrive while a batch runs form the next batch: there is no timer,
so a lone step on an idle server runs at once, and a busy server batches as wide as its backlog.
Rules, each needed for exact state carry:
  - a batcher runs one model version: a session pinned to another (a KServe sequence started again on
    another version, a session of a version this server does not serve) is refused, never run on it;
  - a batch holds at most one step per session, and a session's steps run in arrival order
    (a session's later step is never taken while an earlier one waits);
  - every step in a batch has the same length T (padding would change the carried state);
    the oldest waiting step picks T, so no length starves;
  - a step whose deadline passed, or whose caller went away, is dropped before compute;
  - overload is refused, not queued: a full queue, or a queue whose oldest step already waited
    max_queue_wait, refuses new steps at once, and a step that waited longer is refused unrun;
  - new state is committed with compare-and-set on the position the step was computed from;
    a step that carries its own state (client-held) starts from it and commits nothing.
Per-request load (a unary call or a stream message per step) reaches the batcher one step at a
time: gRPC hands the event loop about one new call per turn. A batch taken at once would hold one
step, so the batcher waits for the steps it expects: sessions that stepped within ACTIVE_SECONDS and
have no step queued will send their next one as soon as their reply is out (unless they are known to
be done for now: a Generate turn ended, the session closed). It waits while they keep
coming, at most PATIENCE_GAPS times the recent gap between steps each time (no fixed window): a lone
session is never waited for, and 64 sessions of unary calls share one batch.
onnxruntime runs in a worker thread (it releases the GIL) so the event loop keeps reading the next
batch's requests meanwhile, on the other core. A batch of at most INLINE_MAX_TOKENS tokens runs on
the event loop itself: ~20-40 us, less than the handoff to the thread (batches that gathered their
sessions' steps are wider than that).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from operator import attrgetter
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from cellstream.service.engine import TOKENS, Engine
from cellstream.service.errors import (
    Aborted,
    CellstreamError,
    DeadlineExceeded,
    FailedPrecondition,
    ResourceExhausted,
    Unavailable,
    session_not_found,
)
from cellstream.service.metrics import Metrics, observe_many
from cellstream.service.sessions.base import SessionRecord, SessionStore, StateUpdates, stack_states
from cellstream.service.versions import describe

if TYPE_CHECKING:
    from opentelemetry.trace import Span, SpanContext

    from cellstream.service.telemetry import Telemetry

log = logging.getLogger(__name__)

INLINE_MAX_TOKENS = 4
ACTIVE_SECONDS = 0.25  # a session that queued a step this recently is expected to queue another
# How long a batch waits for the next expected step: PATIENCE_GAPS times the recent mean gap between steps
# (under load, gaps vary with what else the event loop does), within these bounds.
PATIENCE_GAPS = 8
PATIENCE_MIN_SECONDS, PATIENCE_MAX_SECONDS = 0.0001, 0.005
GAP_SMOOTHING = 0.05  # weight of the newest gap in that mean
MODEL_OF = attrgetter("model")


class StepResult(NamedTuple):  # a tuple: built once per step, in the hot path
    logits: np.ndarray  # (T, V)
    h: np.ndarray  # (L, H) after the step
    c: np.ndarray
    position: int  # after the step
    gates: np.ndarray | None = None  # (T, 6, L, H) when the step asked for them (Engine.run_with_gates)


StepInputs = list[int] | np.ndarray
"""A step's validated input: T token ids, or (T, F) float32 features."""


@dataclass(slots=True)
class StepJob:
    """One step of one session (Step, StreamSteps, Generate, KServe): its caller awaits the future."""

    session_id: str
    inputs: StepInputs
    expected_position: int | None = None
    deadline: float | None = None  # loop.time() after which the step is not worth computing
    state: tuple[np.ndarray, np.ndarray] | None = None  # client-held (h, c) (L, H): not in the store
    future: asyncio.Future[StepResult] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    enqueued: float = 0.0
    owner: str | None = None  # if set: the session must be this principal's (checked when it is loaded)
    gates: bool = False  # also run the glass-box graph on this step (its model has one)
    trace: SpanContext | None = None  # tracing on: the sampled request span that queued it (the batch links it)

    def succeed(self, result: StepResult) -> None:
        self.future.set_result(result)

    def fail(self, error: Exception) -> None:
        if not self.future.done():
            self.future.set_exception(error)


@dataclass(slots=True, eq=False)
class StepGroup:
    """Steps of distinct sessions of one model, all of one length T and all with stored state, queued and
    answered as one: a multiplexed message's items cost the batcher no job, future or callback each.
    A group is taken into a batch whole or waits whole, so it holds at most max_batch_size steps."""

    session_ids: list[str]
    inputs: list[StepInputs]
    expected_positions: list[int | None] | None  # None: no step names one
    deadline: float | None
    owner: str | None
    on_done: Callable[[StepGroup], None]
    """Called once, when every step has its outcome (or the group was refused or dropped unrun)."""
    enqueued: float = 0.0
    cancelled: bool = False  # the caller went away: dropped if queued; if running, nothing is committed
    finished: bool = False
    errors: dict[int, CellstreamError] = field(default_factory=dict)  # the failed steps, by index
    columns: Sequence[int] = ()  # each step's column in `outputs` (failed steps: unused)
    outputs: tuple[np.ndarray, np.ndarray, np.ndarray, list[int]] | None = None
    """The batch's logits (B, T, V), hn, cn (L, B, H) and positions after the step, by column."""
    trace: SpanContext | None = None  # tracing on: the sampled request span that queued it (the batch links it)

    def __len__(self) -> int:
        return len(self.session_ids)

    def add(self, session_id: str, inputs: StepInputs, expected_position: int | None) -> None:
        if expected_position is not None and self.expected_positions is None:
            self.expected_positions = [None] * len(self.session_ids)
        self.session_ids.append(session_id)
        self.inputs.append(inputs)
        if self.expected_positions is not None:
            self.expected_positions.append(expected_position)

    @property
    def length(self) -> int:
        return len(self.inputs[0])

    def position(self, index: int) -> int:
        """The position after step `index`, which succeeded."""
        assert self.outputs is not None
        return self.outputs[3][self.columns[index]]

    def result(self, index: int) -> StepResult:
        """The outputs of step `index`, which succeeded (views of the batch's arrays)."""
        assert self.outputs is not None
        logits, hn, cn, positions = self.outputs
        column = self.columns[index]
        return StepResult(logits[column], hn[:, column], cn[:, column], positions[column])

    def fail(self, error: CellstreamError) -> None:
        """Every step fails with `error` (unless the group has its outcomes, or nobody waits for them)."""
        if not (self.finished or self.cancelled):
            self.errors = dict.fromkeys(range(len(self.session_ids)), error)
            self.finish()

    def finish(self) -> None:
        """Report the outcomes, once; a cancelled group reports nothing (like a cancelled job's future)."""
        if not (self.finished or self.cancelled):
            self.finished = True
            self.on_done(self)


QueueEntry = StepJob | StepGroup
OtherVersion = Callable[[str, str], CellstreamError]
"""The refusal of a step of session `id` pinned to another version (its key) than the batcher's."""
SHUT_DOWN = "server shut down before this step ran; retry"


def pinned_elsewhere(session_id: str, key: str) -> CellstreamError:
    return FailedPrecondition(f"session {session_id!r} is pinned to {describe(key)}; nothing was applied")


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
        tracing: Telemetry | None = None,
        other_version: OtherVersion = pinned_elsewhere,
    ) -> None:
        self.engine = engine
        spec = engine.spec
        self.model, self.key = spec.name, spec.key  # the model's name (metrics' label), the version's key
        self.what = describe(spec.key)  # for messages
        self.store = store
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_queue_size = max_queue_size
        self.max_queue_wait = max_queue_wait  # seconds
        self.inline_max_tokens = inline_max_tokens  # 0: every batch runs on the worker thread
        self._active: dict[str, float] = {}  # session id -> loop time of its last queued step (per-request steps)
        self._pruned = 0.0
        self._last_queued = 0.0
        self._gap = PATIENCE_MAX_SECONDS  # recent mean time between queued entries
        self._gathering = False  # _gather is waiting for expected steps
        self._queue: deque[QueueEntry] = deque()
        self._queued_steps = 0
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ort-{self.key}")
        self._task: asyncio.Task[None] | None = None
        self._closed: CellstreamError | None = None  # why new steps are refused, once closed
        self._other_version = other_version
        self._input_dtype = np.int64 if engine.spec.input_kind == TOKENS else np.float32
        self._gates = engine.glass_box is not None
        # Bound once: labels() costs a lock and a dict lookup on every call of the hot path.
        self._queue_wait = metrics.queue_wait.labels(self.model)
        self._compute = metrics.compute.labels(self.model)
        self._batch_size = metrics.batch_size.labels(self.model)
        self._tokens = metrics.tokens.labels(self.model)
        self._tracing = tracing
        self.steps_run = 0  # steps computed and answered (metrics.StepCounts reads it)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.key}")

    @property
    def queued(self) -> int:
        """Steps waiting (a group counts each of its steps)."""
        return self._queued_steps

    async def submit(self, job: StepJob) -> StepResult:
        self.enqueue(job)
        return await job.future

    def enqueue(self, job: StepJob) -> None:
        """Queue a step without waiting for it: its future gets the result. Refusals raise here."""
        _, refusal = self._admit(job, 1)
        if refusal is not None:
            raise refusal

    def enqueue_group(self, group: StepGroup) -> CellstreamError | None:
        """Queue a group without waiting for it: its on_done gets its outcomes. Returns the error refusing
        steps, if any; the group then keeps only the steps the queue had room for (its lists are cut, to
        none if it was not queued)."""
        if len(group) > self.max_batch_size:
            raise ValueError(f"a group of {len(group)} steps is larger than max_batch_size {self.max_batch_size}")
        queued, refusal = self._admit(group, len(group))
        if queued < len(group):
            del group.session_ids[queued:], group.inputs[queued:]
            if group.expected_positions is not None:
                del group.expected_positions[queued:]
        return refusal

    def _admit(self, entry: QueueEntry, steps: int) -> tuple[int, CellstreamError | None]:
        """Queue the entry's first `queued` steps (all, or as many as there is room for): (queued, the error
        refusing the others)."""
        queue = self._queue
        if self._closed is not None:
            return 0, self._closed
        room = self.max_queue_size - self._queued_steps
        if room > 0:
            now = asyncio.get_running_loop().time()
            if queue and self._overdue(queue[0], now):
                self.metrics.steps_dropped.labels(self.model, "queue_wait").inc(steps)
                return 0, ResourceExhausted(f"{self.what} is overloaded: its oldest queued step has "
                                            f"waited {now - queue[0].enqueued:.3f}s (max_queue_wait_ms); retry later")
            queued = min(room, steps)
            entry.enqueued = now
            self._gap += GAP_SMOOTHING * (min(now - self._last_queued, PATIENCE_MAX_SECONDS) - self._gap)
            self._last_queued = now
            if isinstance(entry, StepJob) and entry.state is None:  # a session's step, not a multiplexed group's
                self._active[entry.session_id] = now
            if self._tracing is not None:
                self._note(entry)
            queue.append(entry)
            self._queued_steps += queued
            # A gathering batcher is woken only when this step ends its wait: the batch is full or nothing more
            # is expected (_expected without its pruning: this is the hot path).
            if not self._gathering or self._queued_steps >= min(self.max_batch_size, len(self._active)):
                self._wakeup.set()
            if queued == steps:
                return queued, None
        queued = max(room, 0)
        self.metrics.steps_dropped.labels(self.model, "queue_full").inc(steps - queued)
        return queued, ResourceExhausted(
            f"{self.what} has {self._queued_steps} steps queued (max_queue_size); retry later")

    async def _loop(self) -> None:
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            await self._gather()
            batch = self._take_batch()
            if not batch:
                continue
            if self._tracing is None:
                await self._run(batch)
                continue
            with self._tracing.batch_span(self.model, [entry.trace for entry in batch]) as span:
                await self._run(batch, span)

    async def _run(self, batch: list[QueueEntry], span: Span | None = None) -> None:
        """Run a batch; whatever fails, its callers get an answer (`span`, tracing on: the batch's, the failure's
        status and the log line's trace id)."""
        try:
            await self._execute(batch, span)
        except CellstreamError as exc:
            if span is not None:
                self._tracing.failed(span, exc)  # type: ignore[union-attr]  # a span: tracing is on
            for entry in batch:
                entry.fail(exc)
        except asyncio.CancelledError:
            for entry in batch:
                entry.fail(Unavailable("server shut down while this step ran; nothing was applied"))
            raise
        except Exception as exc:  # the loop must survive anything, or every later caller hangs
            if span is not None:
                self._tracing.failed(span, exc)  # type: ignore[union-attr]
            log.exception("batch of %d entries on %s failed", len(batch), self.what)
            for entry in batch:
                entry.fail(CellstreamError(f"internal error running {self.what}"))

    async def _gather(self) -> None:
        """Wait for the steps this batch can expect (the module's docstring says which), until none is expected,
        the batch is full, or PATIENCE_GAPS times the recent gap between steps passed without one. Arrivals meanwhile
        wake the batcher only when they end the wait (see _admit): a wake-up per step cost more than the step."""
        loop = asyncio.get_running_loop()
        if self._queued_steps >= self.max_batch_size or self._expected(loop.time()) <= 0:
            return
        patience = min(max(PATIENCE_GAPS * self._gap, PATIENCE_MIN_SECONDS), PATIENCE_MAX_SECONDS)
        self._gathering = True
        try:
            while (wait := self._last_queued + patience - loop.time()) > 0:
                self._wakeup.clear()
                try:
                    async with asyncio.timeout(wait):
                        await self._wakeup.wait()
                    return  # nothing more expected, or the batch is full
                except TimeoutError:
                    continue  # steps may have come meanwhile: wait on from the latest
        finally:
            self._gathering = False

    def forget(self, session_id: str) -> None:
        """The session will not step soon (its turn ended, or it closed): batches stop waiting for it."""
        self._active.pop(session_id, None)

    def _expected(self, now: float) -> int:
        """Sessions that stepped within ACTIVE_SECONDS and have no step queued (queued steps of multiplexed
        groups count too: they make the batch as wide without being waited for)."""
        if now - self._pruned > ACTIVE_SECONDS / 4:
            self._pruned = now
            horizon = now - ACTIVE_SECONDS
            self._active = {sid: t for sid, t in self._active.items() if t > horizon}
        return len(self._active) - self._queued_steps

    def _overdue(self, entry: QueueEntry, now: float) -> bool:
        return self.max_queue_wait is not None and now - entry.enqueued > self.max_queue_wait

    def _take_batch(self) -> list[QueueEntry]:
        now = asyncio.get_running_loop().time()
        chosen: list[QueueEntry] = []
        waiting: deque[QueueEntry] = deque()
        removed = 0  # steps taken or dropped
        seen: set[str] = set()
        length: int | None = None
        room = self.max_batch_size
        dropped = self.metrics.steps_dropped
        # Steps queued after this instant have not waited too long (max_queue_wait): checked in one comparison.
        fresh = -math.inf if self.max_queue_wait is None else now - self.max_queue_wait
        queue = iter(self._queue)
        for entry in queue:
            if not room:  # the batch is full: the rest wait as they are, checked when their turn comes
                waiting.append(entry)
                waiting.extend(queue)
                break
            if isinstance(entry, StepJob):
                steps, entry_length, ids = 1, len(entry.inputs), (entry.session_id,)
                gone = entry.future.done()
            else:
                steps, entry_length, ids = len(entry), entry.length, entry.session_ids
                gone = entry.cancelled
            if gone:  # the caller went away
                dropped.labels(self.model, "cancelled").inc(steps)
            elif entry.deadline is not None and now >= entry.deadline:
                dropped.labels(self.model, "deadline").inc(steps)
                entry.fail(DeadlineExceeded(f"deadline passed after {now - entry.enqueued:.3f}s in the queue"))
            elif entry.enqueued < fresh:
                dropped.labels(self.model, "queue_wait").inc(steps)
                entry.fail(ResourceExhausted(f"{self.what} is overloaded: this step waited "
                                             f"{now - entry.enqueued:.3f}s in the queue (max_queue_wait_ms); "
                                             "nothing was applied, retry later"))
            elif steps <= room and (length is None or entry_length == length) and seen.isdisjoint(ids):
                chosen.append(entry)
                length = entry_length
                room -= steps
                seen.update(ids)
                removed += steps
                continue
            else:
                waiting.append(entry)
                seen.update(ids)
                continue
            removed += steps
        self._queue = waiting
        self._queued_steps -= removed
        return chosen

    def _note(self, entry: QueueEntry) -> None:
        """Tracing: the queued steps on the span of the request that queued them, and that span on the entry."""
        assert self._tracing is not None
        if isinstance(entry, StepGroup):
            entry.trace = self._tracing.note_steps(self.model, len(entry) * entry.length, items=len(entry))
        else:  # a step of a session, or a row of a stateless KServe call (no session to name)
            entry.trace = self._tracing.note_steps(self.model, len(entry.inputs),
                                                   entry.session_id if entry.state is None else None)

    async def _execute(self, batch: list[QueueEntry], span: Span | None = None) -> None:
        """Run a batch; `span` (tracing on) gets its size, length, queue waits and onnxruntime time."""
        loop = asyncio.get_running_loop()
        ready, inputs_list, taken = self._arrange(batch, await self._starting_points(batch))
        if not ready:
            for entry, _ in taken:
                if isinstance(entry, StepGroup):
                    entry.finish()
            return
        started = loop.time()
        waits = [(started - entry.enqueued, 1 if isinstance(entry, StepJob) else len(entry) - len(entry.errors))
                 for entry, _ in taken]
        observe_many(self._queue_wait, waits)
        inputs = np.array(inputs_list, dtype=self._input_dtype)  # (B, T[, F])
        # Read now, before any await: a commit of another batch may overwrite these states in place.
        held = any(isinstance(entry, StepJob) and entry.state is not None for entry, _ in taken)
        h0, c0 = stack_states(ready) if held else self.store.stack(ready)  # (L, B, H)
        positions = [record.position for record in ready]
        gated = [first for entry, first in taken if isinstance(entry, StepJob) and entry.gates] if self._gates else ()
        gate_rows: dict[int, np.ndarray] = {}
        if gated:  # costs the batch as much as a longer step would: on the worker thread like one
            logits, hn, cn, gate_values = await loop.run_in_executor(
                self._executor, self.engine.run_with_gates, inputs, h0, c0, gated)
            gate_rows = dict(zip(gated, gate_values, strict=True))
        elif inputs.shape[0] * inputs.shape[1] <= self.inline_max_tokens:
            logits, hn, cn = self.engine.run(inputs, h0, c0)
        else:
            logits, hn, cn = await loop.run_in_executor(self._executor, self.engine.run, inputs, h0, c0)
        computed = loop.time() - started
        self._compute.observe(computed)
        self._batch_size.observe(len(ready))
        if span is not None:
            span.set_attributes({
                "cellstream.batch.size": len(ready), "cellstream.batch.steps": inputs.shape[1],
                "cellstream.batch.queue_wait_max_seconds": max(wait for wait, _ in waits),
                "cellstream.batch.queue_wait_mean_seconds": sum(w * n for w, n in waits) / max(len(ready), 1),
                "cellstream.batch.onnxruntime_seconds": computed, "cellstream.batch.gates": bool(gated)})
        steps = inputs.shape[1]
        after = [position + steps for position in positions]
        # What a result holds are views of the batch's arrays, which nothing writes again: the store
        # copies what it keeps. A caller that went away while the batch ran gets nothing applied.
        answered = 0
        commit: list[int] = []  # columns to commit
        for entry, first in taken:
            if isinstance(entry, StepGroup):
                if entry.cancelled:
                    continue
                if entry.errors:
                    commit += [column for k, column in enumerate(entry.columns) if k not in entry.errors]
                else:
                    commit += entry.columns
            elif entry.future.done():
                continue
            elif entry.state is not None:
                entry.succeed(StepResult(logits[first], hn[:, first], cn[:, first], steps))
                answered += 1
            else:
                commit.append(first)
        changed = await self._commit(ready, commit, positions, after, hn, cn)
        answered += self._settle(taken, changed, (logits, hn, cn, after), gate_rows)
        self._tokens.inc(answered * steps)
        self.steps_run += answered

    def _arrange(self, batch: list[QueueEntry], records: list[SessionRecord | None]
                 ) -> tuple[list[SessionRecord], list[StepInputs], list[tuple[QueueEntry, int]]]:
        """The batch's columns, one per step that can run, in batch order: their records and inputs, and
        each entry with its first column. Steps that cannot run (unknown session, another principal's,
        wrong expected position) fail here: a job at once, a group's in its `errors`."""
        ready: list[SessionRecord] = []
        inputs_list: list[StepInputs] = []
        taken: list[tuple[QueueEntry, int]] = []
        cursor = 0
        for entry in batch:
            if isinstance(entry, StepJob):
                record = records[cursor]
                cursor += 1
                error = self._refusal(entry.session_id, record, entry.owner, entry.expected_position)
                if error is not None:
                    entry.fail(error)
                elif not entry.future.done():
                    taken.append((entry, len(ready)))
                    ready.append(record)
                    inputs_list.append(entry.inputs)
                continue
            size = len(entry)
            loaded = records[cursor:cursor + size]
            cursor += size
            taken.append((entry, len(ready)))
            if self._all_ready(entry, loaded):
                entry.columns = range(len(ready), len(ready) + size)
                ready += loaded  # _all_ready: none of them is None
                inputs_list += entry.inputs
                continue
            columns: list[int] = []
            expected = entry.expected_positions
            for k, (session_id, record) in enumerate(zip(entry.session_ids, loaded, strict=True)):
                error = self._refusal(session_id, record, entry.owner, None if expected is None else expected[k])
                if error is not None:
                    entry.errors[k] = error
                    columns.append(-1)
                else:
                    columns.append(len(ready))
                    ready.append(record)
                    inputs_list.append(entry.inputs[k])
            entry.columns = columns
        return ready, inputs_list, taken

    @staticmethod
    def _settle(taken: list[tuple[QueueEntry, int]], changed: set[int],
                outputs: tuple[np.ndarray, np.ndarray, np.ndarray, list[int]], gate_rows: dict[int, np.ndarray]
                ) -> int:
        """Answer the steps whose state was committed (or fail those whose session changed meanwhile), with
        their gates if they asked; returns how many were answered."""
        logits, hn, cn, after = outputs
        answered = 0
        for entry, first in taken:
            if isinstance(entry, StepJob):
                if entry.future.done():  # answered before the commit (client-held state), or the caller left
                    continue
                if first in changed:
                    entry.fail(Aborted(f"session {entry.session_id!r} changed while this step ran; "
                                       "nothing was applied"))
                else:
                    entry.succeed(StepResult(logits[first], hn[:, first], cn[:, first], after[first],
                                             gate_rows.get(first)))
                    answered += 1
                continue
            if entry.cancelled:
                continue
            if changed:
                for k, column in enumerate(entry.columns):
                    if column in changed and k not in entry.errors:
                        entry.errors[k] = Aborted(f"session {entry.session_ids[k]!r} changed while this step ran; "
                                                  "nothing was applied")
            answered += len(entry) - len(entry.errors)
            entry.outputs = outputs
            entry.finish()
        return answered

    async def _commit(self, ready: list[SessionRecord], columns: list[int], positions: list[int],
                      after: list[int], hn: np.ndarray, cn: np.ndarray) -> set[int]:
        """Commit the new state of `columns` (compare-and-set on the positions they were computed from):
        the columns not applied because their session changed meanwhile."""
        if not columns:
            return set()
        if len(columns) == len(ready):  # every column, in order: no need to pick
            updates = StateUpdates([r.session_id for r in ready], positions, after, hn, cn)
        else:
            updates = StateUpdates([ready[k].session_id for k in columns], [positions[k] for k in columns],
                                   [after[k] for k in columns], hn[:, columns], cn[:, columns])
        applied = await self.store.commit_many(updates)
        return set() if all(applied) else {column for column, ok in zip(columns, applied, strict=True) if not ok}

    def _all_ready(self, group: StepGroup, loaded: list[SessionRecord | None]) -> bool:
        """Whether every step of the group can run (the common case, checked without a loop in Python): each
        session found, the caller's, pinned to this batcher's version, and at its expected position if the step
        names one (a client that makes every step conditional, cellstream.AsyncClient's, names one on every step)."""
        if None in loaded:
            return False
        expected = group.expected_positions
        if expected is not None and [record.position for record in loaded] != expected:  # type: ignore[union-attr]
            return False
        key = self.key  # compared without a loop in Python too: map runs in C
        if not all(map(key.__eq__, map(MODEL_OF, loaded))):
            return False
        owner = group.owner
        return owner is None or all(record.owner == owner for record in loaded)  # type: ignore[union-attr]

    def _refusal(self, session_id: str, record: SessionRecord | None, owner: str | None,
                 expected: int | None) -> CellstreamError | None:
        if record is None or (owner is not None and record.owner != owner):
            return session_not_found(session_id)
        if record.model != self.key:
            return self._other_version(session_id, record.model)
        if expected is not None and expected != record.position:
            return Aborted(f"expected_position is {expected} but session {session_id!r} is at "
                           f"position {record.position}; nothing was applied")
        return None

    async def _starting_points(self, batch: list[QueueEntry]) -> list[SessionRecord | None]:
        """Each step's record, in batch order: its stored session (one store round trip for the batch), or
        its client-held state."""
        stored: list[str] = []
        for entry in batch:
            if isinstance(entry, StepGroup):
                stored.extend(entry.session_ids)
            elif entry.state is None:
                stored.append(entry.session_id)
        loaded = iter(await self.store.load_many(stored) if stored else [])
        records: list[SessionRecord | None] = []
        for entry in batch:
            if isinstance(entry, StepGroup):
                records.extend(itertools.islice(loaded, len(entry)))
            elif entry.state is None:
                records.append(next(loaded))
            else:
                records.append(SessionRecord(entry.session_id, self.key, *entry.state, 0, 0.0))
        return records

    async def close(self, refusal: CellstreamError | None = None) -> None:
        """Stop taking steps: refuse new ones with `refusal` (default: the server is shutting down, UNAVAILABLE),
        and fail those still queued with it too."""
        self._closed = refusal or Unavailable("server is shutting down; retry on another replica")
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for entry in self._queue:
            entry.fail(refusal or Unavailable(SHUT_DOWN))
        self._queue.clear()
        self._queued_steps = 0
        # A batch cut off mid-compute finishes in its thread on its own; waiting would block the loop.
        self._executor.shutdown(wait=False, cancel_futures=True)
