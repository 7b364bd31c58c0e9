"""The memory store keeps states in slabs (service/sessions/slab.py): columns of shared arrays that grow,
are reused after a close, and are read and written a batch at a time."""

from __future__ import annotations

import numpy as np
import pytest

from cellstream.service.metrics import Metrics
from cellstream.service.sessions.base import SessionRecord, StateUpdates, new_session_id
from cellstream.service.sessions.memory import MemoryStore
from cellstream.service.sessions.slab import INITIAL_COLUMNS

pytestmark = pytest.mark.timeout(60)
SHAPE = (2, 16)


def state(seed: float) -> np.ndarray:
    return np.full(SHAPE, seed, np.float32) + np.arange(SHAPE[1], dtype=np.float32) / 100


async def open_sessions(store: MemoryStore, count: int, start: int = 0) -> list[SessionRecord]:
    return [await store.create(SessionRecord(new_session_id(), "m", state(k), -state(k), k, 60.0))
            for k in range(start, start + count)]


async def test_states_survive_growth_and_stack_in_engine_layout():
    store = MemoryStore(Metrics(), max_sessions=10_000)
    records = await open_sessions(store, 3 * INITIAL_COLUMNS + 5)  # the slab doubles twice
    for k, record in enumerate(records):
        got = await store.get(record.session_id)
        assert np.array_equal(got.h, state(k)) and np.array_equal(got.c, -state(k)), f"session {k} lost its state"

    ids = [r.session_id for r in records]
    new_h = np.stack([state(k + 1000) for k in range(len(records))], axis=1)  # (L, B, H)
    positions = [r.position for r in records]
    assert all(await store.commit_many(StateUpdates(ids, positions, [p + 1 for p in positions], new_h, -new_h)))
    for k, record in enumerate(records):
        assert np.array_equal((await store.get(record.session_id)).h, state(k + 1000)), f"session {k}: stale view"

    picked = records[5::7]
    h0, c0 = store.stack(await store.load_many([r.session_id for r in picked]))
    assert h0.shape == (SHAPE[0], len(picked), SHAPE[1])
    for b, record in enumerate(picked):
        k = records.index(record)
        assert np.array_equal(h0[:, b], state(k + 1000)) and np.array_equal(c0[:, b], -state(k + 1000))
    assert store.state_bytes() == len(records) * 2 * SHAPE[0] * SHAPE[1] * 4


async def test_commit_writes_only_the_accepted_columns():
    store = MemoryStore(Metrics(), max_sessions=100)
    a, b, c = await open_sessions(store, 3)
    new_h = np.stack([state(10), state(11), state(12)], axis=1)  # (L, 3, H)
    updates = StateUpdates([a.session_id, b.session_id, c.session_id], [0, 99, 2], [1, 100, 3], new_h, -new_h)
    assert await store.commit_many(updates) == [True, False, True]
    assert np.array_equal((await store.get(a.session_id)).h, state(10))
    assert np.array_equal((await store.get(b.session_id)).h, state(1)), "a refused update was written"
    assert (await store.get(b.session_id)).position == 1
    assert np.array_equal((await store.get(c.session_id)).c, -state(12))
    assert [(await store.get(r.session_id)).position for r in (a, c)] == [1, 3]


async def test_a_closed_session_keeps_its_state_when_its_column_is_reused():
    store = MemoryStore(Metrics(), max_sessions=100)
    first, _ = await open_sessions(store, 2)
    closed = await store.delete(first.session_id)
    [reused] = await open_sessions(store, 1, start=7)  # takes the freed column
    assert np.array_equal(closed.h, state(0)) and np.array_equal(closed.c, -state(0))
    assert np.array_equal((await store.get(reused.session_id)).h, state(7))


async def test_a_copy_made_from_a_sessions_arrays_is_independent():
    store = MemoryStore(Metrics(), max_sessions=100)
    [source] = await open_sessions(store, 1)
    fork = await store.create(SessionRecord(new_session_id(), "m", source.h, source.c, 0, 60.0))
    changed = state(5)[:, None]
    assert await store.commit_many(StateUpdates([source.session_id], [0], [1], changed, changed)) == [True]
    assert np.array_equal((await store.get(fork.session_id)).h, state(0)), "the fork followed its source"
    assert np.array_equal((await store.get(source.session_id)).h, state(5))


async def test_a_sweep_gives_back_the_columns_of_a_peak_that_has_gone():
    store = MemoryStore(Metrics(), max_sessions=10_000)
    records = await open_sessions(store, 8 * INITIAL_COLUMNS)
    [slab] = store._slabs.values()
    peak = slab.h.shape[1]
    kept = records[3::37]  # 14 sessions scattered over the columns
    for record in records:
        if record not in kept:
            await store.delete(record.session_id)
    await store.sweep()
    assert slab.h.shape[1] == INITIAL_COLUMNS < peak, "the peak's memory was not given back"
    for record in kept:
        got = await store.get(record.session_id)
        assert np.array_equal(got.h, state(record.position)) and np.array_equal(got.c, -state(record.position))
    changed = state(99)[:, None]
    first = kept[0]
    assert await store.commit_many(StateUpdates([first.session_id], [first.position], [first.position + 1],
                                                changed, changed)) == [True]
    assert np.array_equal((await store.get(first.session_id)).h, state(99)), "a commit after the move was lost"
    assert np.array_equal((await store.get(kept[1].session_id)).h, state(kept[1].position))
    await open_sessions(store, 2 * INITIAL_COLUMNS, start=5000)  # grows again from the moved columns
    assert np.array_equal((await store.get(kept[-1].session_id)).h, state(kept[-1].position))
