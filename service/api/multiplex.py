"""The items of StepMany and StreamMany: many sessions' steps per message, each with its own outcome.

Every item is checked like a single Step (same rules, same statuses and messages) and queued in
its model's batcher, so items batch with every other caller's steps and take their turn. What makes
an item cheaper than a Step is what it does not do: a message's items travel through the batcher as
groups (`StepGroup`: distinct sessions of one model and input length, at most a batch each), so an item
has no job, future, callback or task of its own; no store read of its own (the batch's load checks that
the session exists and is the caller's; only a server of several models must first learn each session's
model, in one round trip per message for the sessions new to the call); and no copy of its reply (filled in
place). A session named twice in a message has its second step in a later group, so it runs after the
first. One difference follows: an item with several faults may report a different one of them than a
Step would (a Step looks the session up before it checks the input).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc

from service._proto.cellstream.v1 import inference_pb2 as pb
from service.api.native_codec import expected_position, fill_response, fill_status, step_inputs, wanted
from service.api.outbox import Outbox
from service.auth import current_principal
from service.batcher import StepGroup
from service.dataplane import DataPlane, deadline_after
from service.engine import ModelSpec
from service.errors import CellstreamError, InvalidArgument
from service.metrics import Metrics

# (item, its session's model, the group its step is in and its index there, or the error that refused it)
Entry = tuple[pb.StepRequest, ModelSpec | None, StepGroup | CellstreamError, int]

KNOWN_SESSIONS_PER_CALL = 65_536  # a stream forgets the sessions it found past this many (they are found again)


def check_item_count(count: int, limit: int, message: str) -> None:
    if count > limit:
        raise InvalidArgument(f"{message} has {count} items, more than max_items_per_message ({limit}); "
                              "nothing was done: split it into several messages")


class StepItems:
    """The step items of one StepMany or StreamMany call."""

    def __init__(self, dataplane: DataPlane, metrics: Metrics, method: str) -> None:
        self.dataplane = dataplane
        self.metrics = metrics
        self.method = method
        self.outbox: Outbox[Entry] = Outbox()
        self._ok = metrics.items.labels(method, grpc.StatusCode.OK.name)  # bound once: counted per message
        self._models: dict[str, ModelSpec] = {}  # sessions this call found (and the caller owns): their model
        self._running: dict[int, tuple[StepGroup, list[Entry]]] = {}  # by id() of the group, in queue order
        self._after: dict[int, list[Entry]] = {}  # refused items waiting for an earlier group of their session

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

    async def _queue(self, batch: pb.StepBatch, timeout: float | None) -> tuple[list[Entry], list[StepGroup]]:
        """Check every item and queue the valid ones in groups: entries in item order, and the groups queued."""
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
        entries: list[Entry] = []
        # A session's steps go to groups made one after another (queued in that order, so they run in order).
        groups: dict[tuple[str, int], int] = {}  # the open group for (model, T): its index in `made`
        made: list[tuple[str, StepGroup]] = []  # every group with its model, in the order made
        latest: dict[str, int] = {}  # each session's latest group, by index in `made`
        largest = dataplane.settings.max_batch_size  # a group is taken into a batch whole
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
                entries.append((item, spec, exc, -1))
                continue
            key = (spec.name, len(inputs))
            index = groups.get(key, -1)
            if index <= latest.get(session_id, -1) or len(made[index][1].session_ids) == largest:
                index = groups[key] = len(made)
                made.append((spec.name, StepGroup([], [], None, deadline, owner, self._done)))
            latest[session_id] = index
            group = made[index][1]
            entries.append((item, spec, group, len(group.session_ids)))
            group.add(session_id, inputs, expected_position(item))
        cut: dict[int, tuple[int, CellstreamError]] = {}  # groups the queue took only part of
        for model, group in made:
            refusal = dataplane.start_group(model, group)
            if refusal is not None:
                cut[id(group)] = (len(group), refusal)
        if cut:
            for k, (item, spec, group, index) in enumerate(entries):
                if isinstance(group, StepGroup) and id(group) in cut:
                    queued, refusal = cut[id(group)]
                    if index >= queued:
                        entries[k] = (item, spec, refusal, -1)
        return entries, [group for _, group in made if group.session_ids]

    async def answer(self, batch: pb.StepBatch, timeout: float | None) -> pb.StepBatchResult:
        """StepMany: every item's outcome, in item order."""
        entries, groups = await self._queue(batch, timeout)
        if groups:
            remaining = len(groups)
            finished = asyncio.get_running_loop().create_future()

            def count(_: StepGroup) -> None:
                nonlocal remaining
                remaining -= 1
                if not remaining:
                    finished.set_result(None)

            for group in groups:
                group.on_done = count
            try:
                await finished
            except asyncio.CancelledError:
                for group in groups:  # the caller went away: what has not run yet never will
                    group.cancelled = True
                raise
        return self.pack(entries)

    async def admit(self, batch: pb.StepBatch, context: grpc.aio.ServicerContext) -> None:
        """StreamMany: queue a message's items; each group's outcomes are filed when it completes, and a
        refused item after the outcomes of the same session's earlier items."""
        entries, _ = await self._queue(batch, context.time_remaining())
        outbox, running = self.outbox, self._running
        outbox.pending += len(entries)
        latest: dict[str, StepGroup] | None = None  # each session's latest running group, once an item was refused
        for entry in entries:
            item, _, outcome, _ = entry
            if isinstance(outcome, StepGroup):
                running.setdefault(id(outcome), (outcome, []))[1].append(entry)
                if latest is not None:
                    latest[item.session_id] = outcome
                continue
            if latest is None:  # refusals are rare: only then is it worth knowing (running is in queue order)
                latest = {}
                for group, members in running.values():
                    for member in members:
                        latest[member[0].session_id] = group
            earlier = latest.get(item.session_id)
            if earlier is None:
                outbox.file(entry)
            else:
                self._after.setdefault(id(earlier), []).append(entry)

    def _done(self, group: StepGroup) -> None:
        self.outbox.file_many(self._running.pop(id(group))[1])
        if self._after:
            for later in self._after.pop(id(group), ()):
                self.outbox.file(later)

    def pack(self, entries: list[Entry]) -> pb.StepBatchResult:
        """One reply holding `entries`' outcomes, filled in place; counts the items by status."""
        reply = pb.StepBatchResult()
        add = reply.items.add
        ok = 0
        for item, spec, outcome, index in entries:
            message = add(tag=item.tag)
            if isinstance(outcome, StepGroup):
                error = outcome.errors.get(index) if outcome.errors else None
                if error is None:
                    want = wanted(item)
                    if want is None:  # the common case: the position only
                        response = message.response
                        response.session_id, response.position = item.session_id, outcome.position(index)
                    else:
                        fill_response(message.response, item.session_id, spec, want, outcome.result(index))
                    ok += 1
                    continue
            else:
                error = outcome
            fill_status(message.error, error)
            self.metrics.items.labels(self.method, error.code.name).inc()
        self._ok.inc(ok)
        return reply

    def cancel(self) -> None:
        for group, _ in self._running.values():
            group.cancelled = True
        self._running.clear()
        self.outbox.clear()
