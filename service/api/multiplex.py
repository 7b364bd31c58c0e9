"""The items of StepMany and StreamMany: many sessions' steps per message, each with its own outcome.

Every item is checked like a single Step (same rules, same statuses and messages) and queued in
its model's batcher like one, so items batch with every other caller's steps and take their turn.
What makes an item cheaper than a Step is what it does not do: no task of its own (the batcher
reports its outcome at once), no store read of its own (the batch's load checks that the session
exists and is the caller's; only a server of several models must first learn each session's model,
in one round trip per message for the sessions new to the call), and no copy of its reply (filled in
place). One difference follows: an item with several faults may report a different one of them than
a Step would (a Step looks the session up before it checks the input).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc

from service._proto.cellstream.v1 import inference_pb2 as pb
from service.api.native_codec import expected_position, fill_response, fill_status, step_inputs, wanted
from service.api.outbox import Outbox
from service.auth import current_principal
from service.batcher import StepJob
from service.dataplane import DataPlane, deadline_after
from service.engine import ModelSpec
from service.errors import CellstreamError, InvalidArgument
from service.metrics import Metrics

# (item, its session's model, its queued step or the error that refused it)
Entry = tuple[pb.StepRequest, ModelSpec | None, StepJob | CellstreamError]

KNOWN_SESSIONS_PER_CALL = 65_536  # a stream forgets the sessions it found past this many (they are found again)


def check_item_count(count: int, limit: int, message: str) -> None:
    if count > limit:
        raise InvalidArgument(f"{message} has {count} items, more than max_items_per_message ({limit}); "
                              "nothing was done: split it into several messages")


def abandon(job: StepJob) -> None:
    """Nobody will read this step's outcome: cancel it if it has not run (then nothing is applied),
    else mark its error as read, which asyncio would otherwise log as never retrieved."""
    if not job.future.cancel() and not job.future.cancelled():
        job.future.exception()


class StepItems:
    """The step items of one StepMany or StreamMany call."""

    def __init__(self, dataplane: DataPlane, metrics: Metrics, method: str) -> None:
        self.dataplane = dataplane
        self.metrics = metrics
        self.method = method
        self.outbox: Outbox[Entry] = Outbox()
        self._ok = metrics.items.labels(method, grpc.StatusCode.OK.name)  # bound once: counted per message
        self._models: dict[str, ModelSpec] = {}  # sessions this call found (and the caller owns): their model
        self._running: dict[int, Entry] = {}  # by id() of the job, in the order they were queued
        self._after: dict[int, list[Entry]] = {}  # refused items waiting for an earlier item of their session

    async def _find(self, items: Sequence[pb.StepRequest]) -> dict[str, CellstreamError]:
        """Learn the model of every session new to this call (one store round trip); the errors of the
        ids that are no session of the caller's."""
        if len(self._models) > KNOWN_SESSIONS_PER_CALL:
            self._models.clear()
        known = self._models
        new = list({item.session_id for item in items if item.session_id not in known})
        errors: dict[str, CellstreamError] = {}
        if not new:
            return errors
        for session_id, found in zip(new, await self.dataplane.sessions(new), strict=True):
            if isinstance(found, CellstreamError):
                errors[session_id] = found
            else:
                known[session_id] = self.dataplane.spec(found.model)
        return errors

    async def _queue(self, batch: pb.StepBatch, timeout: float | None) -> list[Entry]:
        """Check and queue every item; entries in item order."""
        items = batch.items
        dataplane = self.dataplane
        check_item_count(len(items), dataplane.settings.max_items_per_message, "StepBatch")
        # With one model, every session is of that model: an item needs no lookup before it is queued,
        # and its batch's load checks that the session exists and is the caller's.
        only = dataplane.only_spec
        errors = {} if only is not None else await self._find(items)
        models = self._models
        owner = current_principal()
        deadline = deadline_after(timeout)
        create_future = asyncio.get_running_loop().create_future
        entries: list[Entry] = []
        by_model: dict[str, list[int]] = {}  # entry indices of each model's steps, queued together below
        for item in items:
            session_id = item.session_id
            spec = only or models.get(session_id)
            try:
                if spec is None:
                    raise errors[session_id]
                if only is not None:
                    dataplane.check_session_id(session_id)
                inputs = step_inputs(dataplane, spec, item)
            except CellstreamError as exc:
                entries.append((item, spec, exc))
                continue
            job = StepJob(session_id, inputs, expected_position(item), deadline, owner=owner,
                          future=create_future())
            by_model.setdefault(spec.name, []).append(len(entries))
            entries.append((item, spec, job))
        for model, indices in by_model.items():
            queued, refusal = dataplane.start_steps(model, [entries[k][2] for k in indices])
            for k in indices[queued:]:
                entries[k] = (entries[k][0], entries[k][1], refusal)
        return entries

    async def answer(self, batch: pb.StepBatch, timeout: float | None) -> pb.StepBatchResult:
        """StepMany: every item's outcome, in item order."""
        entries = await self._queue(batch, timeout)
        jobs = [job for _, _, job in entries if isinstance(job, StepJob)]
        if jobs:
            remaining = len(jobs)
            finished = asyncio.get_running_loop().create_future()

            def count(_: StepJob) -> None:
                nonlocal remaining
                remaining -= 1
                if not remaining:
                    finished.set_result(None)

            for job in jobs:
                job.on_done = count
            try:
                await finished
            except asyncio.CancelledError:
                for job in jobs:  # the caller went away: what has not run yet never will
                    abandon(job)
                raise
        return self.pack(entries)

    async def admit(self, batch: pb.StepBatch, context: grpc.aio.ServicerContext) -> None:
        """StreamMany: queue a message's items; each outcome is filed when it completes, after the
        outcomes of the same session's earlier items."""
        entries = await self._queue(batch, context.time_remaining())
        outbox, running, done = self.outbox, self._running, self._done
        outbox.pending += len(entries)
        latest: dict[str, StepJob] | None = None  # each session's latest running step, once an item was refused
        for entry in entries:
            outcome = entry[2]
            if isinstance(outcome, StepJob):
                running[id(outcome)] = entry
                outcome.on_done = done
                if latest is not None:
                    latest[entry[0].session_id] = outcome
                continue
            if latest is None:  # refusals are rare: only then is it worth knowing (running is in queue order)
                latest = {item.session_id: job for item, _, job in running.values()}
            earlier = latest.get(entry[0].session_id)
            if earlier is None:
                outbox.file(entry)
            else:
                self._after.setdefault(id(earlier), []).append(entry)

    def _done(self, job: StepJob) -> None:
        self.outbox.file(self._running.pop(id(job)))
        if self._after:
            for later in self._after.pop(id(job), ()):
                self.outbox.file(later)

    def pack(self, entries: list[Entry]) -> pb.StepBatchResult:
        """One reply holding `entries`' outcomes, filled in place; counts the items by status."""
        reply = pb.StepBatchResult()
        add = reply.items.add
        ok = 0
        for item, spec, outcome in entries:
            message = add(tag=item.tag)
            if isinstance(outcome, StepJob):
                try:
                    result = outcome.future.result()
                except CellstreamError as exc:  # anything else is a bug: the call becomes INTERNAL, logged once
                    error = exc
                else:
                    fill_response(message.response, item.session_id, spec, wanted(item), result)
                    ok += 1
                    continue
            else:
                error = outcome
            fill_status(message.error, error)
            self.metrics.items.labels(self.method, error.code.name).inc()
        self._ok.inc(ok)
        return reply

    def cancel(self) -> None:
        for _, _, job in [*self._running.values(), *self.outbox.clear()]:
            if isinstance(job, StepJob):
                abandon(job)
