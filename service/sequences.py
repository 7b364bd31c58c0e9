"""Triton-style sequences: sessions named by the client, started and ended by request flags.

A sequence is a session of the shared store whose id the client picks (an int or a string),
namespaced per model: same TTL, metrics and persistence as a native session, and its steps go
through the same batcher, so KServe sequence steps batch with native Step calls.

Rules:
  - START runs the step from zero state and then stores the sequence, replacing a live one of the
    same id; a START that fails leaves the old sequence as it was. The sequence is pinned to the
    model version START ran on (the one the request names, or the model's default).
  - without START, the id must name a live sequence; otherwise the client is told the first request
    must carry the START flag (the sequence never started, ended, or idled past its TTL). The step
    runs on the sequence's version; a request naming another version is refused.
  - END closes the sequence after its step succeeded; a failed END request leaves it open.
"""

from __future__ import annotations

import contextlib

import numpy as np

from cellstream.service.auth import current_principal
from cellstream.service.batcher import StepInputs, StepResult
from cellstream.service.dataplane import DataPlane
from cellstream.service.engine import ModelSpec
from cellstream.service.errors import FailedPrecondition, InvalidArgument, NotFound
from cellstream.service.sessions.base import SessionRecord

SequenceId = int | str


def sequence_key(model: str, sequence_id: SequenceId) -> str:
    """The store id of a sequence. The int 7 and the string "7" are different sequences; model names
    are file stems (no '/') and native session ids are hex, so no two keys collide. With tokens, each
    principal (no '/' either) has its own sequence ids: another's sequence 7 is not yours."""
    kind = "int" if isinstance(sequence_id, int) else "str"
    principal = current_principal()
    return f"kserve/{principal + '/' if principal else ''}{model}/{kind}/{sequence_id}"


async def find_sequence(dataplane: DataPlane, model: str, version: int, sequence_id: SequenceId
                        ) -> tuple[ModelSpec, SessionRecord]:
    """The live sequence of `model` ('' = default) named `sequence_id` and the spec of the version it is pinned
    to, which `version` (0: any) must be."""
    name = dataplane.model_name(model)
    if version:
        dataplane.registry.find(name, version)  # NotFound for a version not loaded, before any sequence's refusal
    try:
        record = await dataplane.store.get(sequence_key(name, sequence_id))
    except NotFound:
        raise not_active(dataplane, name, sequence_id) from None
    spec = dataplane.pinned(record)
    if version and version != spec.version:
        raise FailedPrecondition(f"sequence {sequence_id!r} of model {name!r} runs on version {spec.version} (since "
                                 f"its START): send its requests with that version or none, or START it again")
    return spec, record


async def step_sequence(
    dataplane: DataPlane, spec: ModelSpec, sequence_id: SequenceId, inputs: StepInputs, *, start: bool, end: bool,
    timeout: float | None, record: SessionRecord | None = None,
) -> StepResult:
    """Feed validated `inputs` (T[, F]) to the sequence (`record`, found by find_sequence, unless it starts now);
    start and end it as the flags say."""
    if start:
        key = sequence_key(spec.name, sequence_id)
        result = await _start(dataplane, spec, key, inputs, timeout)
    else:
        assert record is not None
        key = record.session_id
        result = await _continue(dataplane, spec, record, sequence_id, inputs, timeout)
    if end:
        with contextlib.suppress(NotFound):  # it expired meanwhile: ended all the same
            await dataplane.close_session(key)
    return result


async def _start(
    dataplane: DataPlane, spec: ModelSpec, key: str, inputs: StepInputs, timeout: float | None
) -> StepResult:
    zeros = np.zeros((spec.num_layers, 1, spec.hidden_size), np.float32)
    [result] = await dataplane.step_stateless(spec.key, [inputs], zeros, zeros, timeout=timeout)
    with contextlib.suppress(NotFound):  # a START replaces a live sequence of the same id
        await dataplane.close_session(key)
    ttl = dataplane.settings.session_ttl_seconds
    await dataplane.store.create(SessionRecord(key, spec.key, result.h, result.c, result.position, ttl,
                                               current_principal()))
    return result


async def _continue(
    dataplane: DataPlane, spec: ModelSpec, record: SessionRecord, sequence_id: SequenceId, inputs: StepInputs,
    timeout: float | None,
) -> StepResult:
    # NotFound from the batcher: the sequence expired or was evicted while this step waited, so the client has to
    # start it again.
    try:
        return await dataplane.step(record, inputs, timeout=timeout)
    except NotFound:
        raise not_active(dataplane, spec.name, sequence_id) from None


def not_active(dataplane: DataPlane, name: str, sequence_id: SequenceId) -> InvalidArgument:
    ttl = dataplane.settings.session_ttl_seconds
    return InvalidArgument(
        f"sequence {sequence_id!r} of model {name!r} is not active (never started, ended, or idle longer than "
        f"{ttl:g} s): the first request of a sequence must carry the START flag (sequence_start=true)")
