"""The items of StepMany and StreamMany: many sessions' steps per message, each with its own outcome.

Every item is checked like a single Step (same rules, same statuses and messages) and queued in
its model version's batcher, so items batch with every other caller's steps and take their turn. What
makes an item cheaper than a Step is what it does not do: a message's items travel through the batcher
as groups (`StepGroup`: distinct sessions of one model version and input length, at most a batch each),
so an item has no job, future, callback or task of its own; no store read of its own (the batch's load
checks that the session exists, is the caller's and is pinned to the batch's version; only a server of
several model versions must first learn each session's version, in one round trip per message for the
sessions new to the call); and no copy of its reply (filled in place). A session named twice in a
message has its second step in a later group, so it runs after the first. One difference follows: an
item with several faults may report a different one of them than a Step would (a Step looks the session
up before it checks the input).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import methodcaller

import grpc

from cellstream.service._proto.cellstream.v1 import inference_pb2 as pb
from cellstream.service.api.native_codec import (
    check_reply,
    expected_position,
    fill_response,
    fill_status,
    reply_bytes,
    step_inputs,
)
from cellstream.service.api.outbox import Outbox
from cellstream.service.auth import current_principal
from cellstream.service.batcher import StepGroup, StepInputs
from cellstream.service.dataplane import MAX_ID_CHARS, REPLY_FRAMING_BYTES, DataPlane, deadline_after
from cellstream.service.engine import ModelSpec
from cellstream.service.errors import CellstreamError, InvalidArgument
from cellstream.service.metrics import Metrics

# (item, its session's model version, the group its step is in and its index there, or the error that refused it)
Entry = tuple[pb.StepRequest, ModelSpec | None, StepGroup | CellstreamError, int]

Made = tuple[str, StepGroup, list[Entry]]  # a group to queue: its model version's key, the group, its items' entries

HAS_EXPECTED_POSITION = methodcaller("HasField", "expected_position")
HAS_WANT = methodcaller("HasField", "want")
GATES_REFUSED = ("want.gates is served on Step and StreamSteps (and the JSON face's step), one session per call; "
                 "a multiplexed call's batches stay cheap: send this item as a Step")
ITEM_FRAMING_BYTES = 32  # an outcome's tag, position, status or field tags, beside its session id and outputs
KNOWN_SESSIONS_PER_CALL = 65_536  # a stream forgets the sessions it found past this many (they are found again)


@dataclass(slots=True)
class Checked:
    """A message's items after their checks, by item: session id, model (None: not known), input or the
    error refusing the item, expected position; and how many were refused."""

    session_ids: list[str]
    specs: list[ModelSpec | None]
    inputs: list[StepInputs | CellstreamError]
    expected: list[int | None]
    refused: int = 0
    reply_bytes: int = 0  # what the valid items' outputs take in the reply, beyond their position


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
        self._models: dict[str, ModelSpec] = {}  # sessions this call found (and the caller owns): their version
        self._running: dict[int, tuple[StepGroup, list[Entry]]] = {}  # by id() of the group, in queue order
        self._after: dict[int, list[Entry]] = {}  # refused items waiting for an earlier group of their session
        self.large_replies = False  # some item asked for outputs: replies are then cut by size (see relay)

    async def _find(self, items: Sequence[pb.StepRequest]) -> dict[str, CellstreamError]:
        """Learn the model version of every session new to this call (one store round trip); the errors of the
        ids that are no session of the caller's, or of a version not served."""
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
                continue
            try:
                known[session_id] = self.dataplane.pinned(found)
            except CellstreamError as exc:
                errors[session_id] = exc
        return errors

    def _check(self, items: Sequence[pb.StepRequest], only: ModelSpec | None,
               errors: dict[str, CellstreamError]) -> Checked:
        """Every item checked like a Step (same rules, same errors), nothing queued yet."""
        dataplane, models = self.dataplane, self._models
        checked = Checked([], [], [], [])
        session_ids, specs, inputs = checked.session_ids, checked.specs, checked.inputs
        for item in items:
            session_id = item.session_id
            spec = only or models.get(session_id)
            try:
                if spec is None:
                    raise errors[session_id]
                if only is not None and not 0 < len(session_id) <= MAX_ID_CHARS:  # the call only when it raises
                    dataplane.check_session_id(session_id)
                inputs.append(step_inputs(dataplane, spec, item))
            except CellstreamError as exc:
                inputs.append(exc)
                checked.refused += 1
            session_ids.append(session_id)
            specs.append(spec)
        if any(map(HAS_WANT, items)):  # most items want nothing: the position only
            self._check_outputs(items, checked)
        if any(map(HAS_EXPECTED_POSITION, items)):  # rare: most steps do not name a position
            checked.expected = [expected_position(item) for item in items]
        else:
            checked.expected = [None] * len(items)
        return checked

    def _check_outputs(self, items: Sequence[pb.StepRequest], checked: Checked) -> None:
        """Refuse the items asking for gates, or for outputs no reply can hold (like a Step); count what the
        others' outputs take in the reply."""
        dataplane, specs, inputs = self.dataplane, checked.specs, checked.inputs
        for k, item in enumerate(items):
            step, spec = inputs[k], specs[k]
            if isinstance(step, CellstreamError) or spec is None or not item.HasField("want"):
                continue
            try:
                if item.want.gates:
                    raise InvalidArgument(GATES_REFUSED)
                check_reply(dataplane, spec, len(step), item.want)
            except CellstreamError as exc:
                inputs[k] = exc
                checked.refused += 1
                continue
            checked.reply_bytes += reply_bytes(spec, len(step), item.want)
        if checked.reply_bytes:  # outcomes of several messages may travel together: replies are then cut by size
            self.large_replies = True

    def _check_reply_size(self, items: Sequence[pb.StepRequest], checked: Checked) -> None:
        """InvalidArgument, for the whole message, when its outcomes cannot travel in one reply."""
        size = checked.reply_bytes + sum(ITEM_FRAMING_BYTES + len(item.session_id) for item in items)
        limit = self.dataplane.settings.max_message_bytes
        if size > limit - REPLY_FRAMING_BYTES:
            raise InvalidArgument(f"the outcomes of this StepBatch would take about {size} bytes, more than one reply "
                                  f"of max_message_bytes ({limit}) holds; nothing was done: ask for every step's "
                                  "output (all_steps) or the state on fewer items per message, or use StreamMany")

    def entry_bytes(self, entry: Entry) -> int:
        """About how many bytes an outcome takes in a reply (relay splits replies by it)."""
        item, spec, outcome, _ = entry
        size = ITEM_FRAMING_BYTES + len(item.session_id)
        if isinstance(outcome, StepGroup) and spec is not None and item.HasField("want"):
            size += reply_bytes(spec, outcome.length, item.want)
        return size

    def _groups(self, items: Sequence[pb.StepRequest], checked: Checked, deadline: float | None,
                owner: str | None) -> tuple[list[Entry], list[Made]]:
        """The items' entries, in item order, and the groups to queue (model, group, its entries), in order.
        A session's steps go to groups made one after another, so they run in item order."""
        session_ids, specs, inputs = checked.session_ids, checked.specs, checked.inputs
        count = len(session_ids)
        spec = specs[0] if count else None
        if (spec is not None and not checked.refused and specs.count(spec) == count
                and len(set(session_ids)) == count
                and len(set(map(len, inputs))) == 1):  # the common message: cut into groups as it comes
            return self._slices(items, checked, spec, deadline, owner)
        entries: list[Entry] = []
        made: list[Made] = []
        largest = self.dataplane.settings.max_batch_size  # a group is taken into a batch whole
        groups: dict[tuple[str, int], int] = {}  # the open group for (model version, T): its index in `made`
        latest: dict[str, int] = {}  # each session's latest group, by index in `made`
        for k, (item, session_id, spec, step) in enumerate(zip(items, session_ids, specs, inputs, strict=True)):
            if isinstance(step, CellstreamError):
                entries.append((item, spec, step, -1))
                continue
            assert spec is not None
            key = (spec.key, len(step))
            index = groups.get(key, -1)
            if index <= latest.get(session_id, -1) or len(made[index][1]) == largest:
                index = groups[key] = len(made)
                made.append((spec.key, StepGroup([], [], None, deadline, owner, self._done), []))
            latest[session_id] = index
            _, group, members = made[index]
            entry = (item, spec, group, len(group))
            entries.append(entry)
            members.append(entry)
            group.add(session_id, step, checked.expected[k])
        return entries, made

    def _slices(self, items: Sequence[pb.StepRequest], checked: Checked, spec: ModelSpec, deadline: float | None,
                owner: str | None) -> tuple[list[Entry], list[Made]]:
        """_groups of valid items of distinct sessions, one model and one length (with or without expected
        positions): consecutive slices, made without any work per item in Python."""
        largest = self.dataplane.settings.max_batch_size
        entries: list[Entry] = []
        made: list[Made] = []
        expected = None if checked.expected.count(None) == len(items) else checked.expected
        for start in range(0, len(items), largest):
            stop = start + largest
            group = StepGroup(checked.session_ids[start:stop], checked.inputs[start:stop],
                              None if expected is None else expected[start:stop], deadline, owner, self._done)
            members: list[Entry] = list(zip(items[start:stop], repeat(spec), repeat(group), range(len(group))))
            entries += members
            made.append((spec.key, group, members))
        return entries, made

    async def _queue(self, batch: pb.StepBatch, timeout: float | None, *, one_reply: bool = False
                     ) -> tuple[list[Entry], list[tuple[StepGroup, list[Entry]]]]:
        """Check every item and queue the valid ones in groups: entries in item order, and the groups queued
        with their entries. `one_reply`: every outcome must fit in one reply (StepMany), else nothing is done."""
        items = batch.items
        dataplane = self.dataplane
        check_item_count(len(items), dataplane.settings.max_items_per_message, "StepBatch")
        # With one model version loaded, the sessions are of that version (the batch refuses any that is not): an
        # item needs no lookup before it is queued, and its batch's load checks that the session exists, is the
        # caller's and is pinned to that version.
        only = dataplane.only_spec
        errors = {} if only is not None else await self._find(items)
        checked = self._check(items, only, errors)
        if one_reply and checked.reply_bytes:
            self._check_reply_size(items, checked)
        entries, made = self._groups(items, checked, deadline_after(timeout), current_principal())
        queued: list[tuple[StepGroup, list[Entry]]] = []
        cut: dict[int, CellstreamError] = {}  # groups the queue took only part of (or none): their refusal
        for model, group, members in made:
            refusal = dataplane.start_group(model, group)
            if refusal is not None:
                cut[id(group)] = refusal
                del members[len(group):]
            if members:
                queued.append((group, members))
        if cut:
            for k, (item, spec, group, index) in enumerate(entries):
                if isinstance(group, StepGroup) and id(group) in cut and index >= len(group):
                    entries[k] = (item, spec, cut[id(group)], -1)
        return entries, queued

    async def answer(self, batch: pb.StepBatch, timeout: float | None) -> pb.StepBatchResult:
        """StepMany: every item's outcome, in item order."""
        entries, queued = await self._queue(batch, timeout, one_reply=True)
        if queued:
            remaining = len(queued)
            finished = asyncio.get_running_loop().create_future()

            def count(_: StepGroup) -> None:
                nonlocal remaining
                remaining -= 1
                if not remaining:
                    finished.set_result(None)

            for group, _ in queued:
                group.on_done = count
            try:
                await finished
            except asyncio.CancelledError:
                for group, _ in queued:  # the caller went away: what has not run yet never will
                    group.cancelled = True
                raise
        return self.pack(entries)

    async def admit(self, batch: pb.StepBatch, context: grpc.aio.ServicerContext) -> None:
        """StreamMany: queue a message's items; each group's outcomes are filed when it completes, and a
        refused item after the outcomes of the same session's earlier items."""
        entries, queued = await self._queue(batch, context.time_remaining())
        self.outbox.pending += len(entries)
        if len(entries) > sum(len(members) for _, members in queued):  # refusals are rare
            self._file_refused(entries)
        running = self._running
        for group, members in queued:
            running[id(group)] = (group, members)

    def _file_refused(self, entries: list[Entry]) -> None:
        """File each refused item's outcome now, or hold it until its session's earlier steps have theirs
        (in this message or running before it: `_running` is in queue order, and this message's groups are
        not in it yet)."""
        latest = {member[0].session_id: group for group, members in self._running.values() for member in members}
        for entry in entries:
            item, _, outcome, _ = entry
            if isinstance(outcome, StepGroup):
                latest[item.session_id] = outcome
            elif (earlier := latest.get(item.session_id)) is None:
                self.outbox.file(entry)
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
            message = add()  # add(tag=...) parses keyword arguments: slower than setting the field
            message.tag = item.tag
            if isinstance(outcome, StepGroup):
                error = outcome.errors.get(index) if outcome.errors else None
                if error is None:
                    if item.HasField("want"):
                        fill_response(message.response, item.session_id, spec, item.want, outcome.result(index))
                    else:  # the common case: the position only
                        response = message.response
                        response.session_id = item.session_id
                        response.position = outcome.position(index)
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
