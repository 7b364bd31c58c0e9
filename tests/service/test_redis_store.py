"""K. The Redis session store against a real redis-server: the store protocol, compare-and-set,
TTL, capacity, gauges, script re-registration, and Redis going away and coming back."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import redis.asyncio as aioredis

from cellstream.service.errors import NotFound, ResourceExhausted, Unavailable
from cellstream.service.metrics import Metrics
from cellstream.service.sessions.base import SessionRecord, StateUpdates, new_session_id
from cellstream.service.sessions.redis import RedisStore

pytestmark = pytest.mark.timeout(60)
SHAPE = (2, 16)


def record(ttl: float = 60.0, owner: str = "", position: int = 0, seed: int = 0) -> SessionRecord:
    rng = np.random.default_rng(seed)
    h, c = (rng.normal(size=SHAPE).astype(np.float32) for _ in range(2))
    return SessionRecord(new_session_id(), "tiny-chat", h, c, position, ttl, owner)


def updates(*items: tuple[str, int, np.ndarray, np.ndarray, int]) -> StateUpdates:
    """A batch of (session id, expected position, h, c, position after) updates, as the batcher commits them."""
    ids, expected, h, c, positions = zip(*items, strict=True)
    return StateUpdates(list(ids), list(expected), list(positions), np.stack(h, axis=1), np.stack(c, axis=1))


@pytest.fixture
async def stores(redis_server):
    """stores(**kwargs) -> a RedisStore on the test's redis-server; all closed afterwards."""
    made: list[RedisStore] = []

    def _store(**kwargs: object) -> RedisStore:
        kwargs.setdefault("max_sessions", 1000)
        store = RedisStore(redis_server.url, Metrics(), **kwargs)
        made.append(store)
        return store

    yield _store
    for store in made:
        await store.close()


async def test_round_trip_is_exact_and_commit_is_compare_and_set(stores):
    store, other_replica = stores(), stores()
    original = record(owner="alice", position=7)
    created = await store.create(original)
    assert created.expires_at > 0

    loaded = await other_replica.get(original.session_id)
    assert (loaded.model, loaded.owner, loaded.position, loaded.ttl_seconds) == ("tiny-chat", "alice", 7, 60.0)
    assert loaded.h.tobytes() == original.h.tobytes() and loaded.c.tobytes() == original.c.tobytes()
    assert loaded.h.shape == SHAPE

    first = (original.session_id, 7, original.h + 1, original.c + 1, 10)
    racing = (original.session_id, 7, original.h + 2, original.c + 2, 12)  # computed from 7 too
    assert await store.commit_many(updates(first, racing)) == [True, False]
    assert await other_replica.commit_many(updates(racing)) == [False]
    after = await store.get(original.session_id)
    assert after.position == 10
    assert after.h.tobytes() == (original.h + 1).tobytes(), "the losing write was applied"

    missing = new_session_id()
    assert await store.commit_many(updates((missing, 0, original.h, original.c, 1))) == [False]
    many = await store.load_many([missing, original.session_id])
    assert many[0] is None and many[1].position == 10

    closed = await other_replica.delete(original.session_id)
    assert closed.position == 10
    with pytest.raises(NotFound):
        await store.get(original.session_id)
    with pytest.raises(NotFound):
        await store.delete(original.session_id)


async def test_positions_beyond_2_to_the_53_compare_exactly(stores):
    store = stores()
    big = 2**63 + 1
    session = await store.create(record(position=big))
    near = (session.session_id, big - 1, session.h, session.c, big + 1)  # equal as a double
    assert await store.commit_many(updates(near)) == [False]
    exact = (session.session_id, big, session.h, session.c, big + 5)
    assert await store.commit_many(updates(exact)) == [True]
    assert (await store.get(session.session_id)).position == big + 5


async def test_idle_ttl_is_refreshed_on_access_and_expiry_is_swept(stores):
    store = stores()
    # Redis keeps the time, so no clock of ours can stand in: accesses 0.4 s apart leave a slow machine
    # 1.1 s of slack below the 1.5 s TTL, while 2 s in all is past it.
    session = await store.create(record(ttl=1.5))
    await store.ping()
    assert store.count() == 1 and store.state_bytes() == 2 * 2 * 16 * 4
    for _ in range(5):
        await asyncio.sleep(0.4)
        assert (await store.load_many([session.session_id]))[0] is not None
    await asyncio.sleep(1.8)
    assert await store.load_many([session.session_id]) == [None]
    assert await store.sweep() == 1
    assert store.count() == 0 and store.state_bytes() == 0
    assert store._metrics.sessions_expired._value.get() == 1


async def test_capacity_reject_and_evict(stores):
    rejecting = stores(max_sessions=2, evict_when_full=False)
    # Opened first but nearest expiry second: eviction must pick by expiry, not by age.
    later = await rejecting.create(record(ttl=60))
    sooner = await rejecting.create(record(ttl=30))
    with pytest.raises(ResourceExhausted, match="max_sessions"):
        await rejecting.create(record())
    await rejecting.ping()
    assert rejecting.count() == 2

    evicting = stores(max_sessions=2, evict_when_full=True)
    newest = await evicting.create(record(ttl=90))
    await evicting.ping()
    assert evicting.count() == 2
    assert evicting._metrics.sessions_evicted._value.get() == 1
    # The session nearest expiry made room (docs/OPERATIONS.md); the others are whole.
    with pytest.raises(NotFound):
        await evicting.get(sooner.session_id)
    assert (await evicting.get(later.session_id)).ttl_seconds == 60
    assert (await evicting.get(newest.session_id)).ttl_seconds == 90


async def test_sessions_per_owner_are_bounded(stores):
    store = stores(max_sessions_per_principal=2)
    kept = [await store.create(record(owner="alice")) for _ in range(2)]
    with pytest.raises(ResourceExhausted, match="max_sessions_per_principal"):
        await store.create(record(owner="alice"))
    await store.create(record(owner="bob"))  # others are not affected
    await store.delete(kept[0].session_id)
    await store.create(record(owner="alice"))  # room again


async def test_scripts_are_registered_again_after_redis_forgets_them(stores, redis_server):
    store = stores()
    session = await store.create(record())
    admin = aioredis.Redis.from_url(redis_server.url)
    await admin.script_flush()
    await admin.aclose()
    update = (session.session_id, 0, session.h, session.c, 3)
    assert await store.commit_many(updates(update)) == [True]
    assert (await store.get(session.session_id)).position == 3


async def test_redis_down_is_unavailable_and_nothing_is_lost(redis_server):
    store = RedisStore(redis_server.url.replace("redis://", "redis://:s3cret@"), Metrics(), max_sessions=100,
                       timeout_seconds=0.5)
    admin = aioredis.Redis.from_url(redis_server.url)
    await admin.config_set("requirepass", "s3cret")
    await admin.aclose()
    session = await store.create(record(position=4))

    redis_server.stop()
    update = (session.session_id, 4, session.h + 1, session.c + 1, 9)
    for attempt in (store.ping(), store.get(session.session_id), store.commit_many(updates(update)),
                    store.create(record()), store.sweep(), store.delete(session.session_id)):
        with pytest.raises(Unavailable) as info:
            await asyncio.wait_for(attempt, 5)
        assert "session store unreachable (Redis at redis://***@127.0.0.1" in info.value.message
        assert "s3cret" not in info.value.message

    redis_server.start()
    admin = aioredis.Redis.from_url(redis_server.url)
    await admin.config_set("requirepass", "s3cret")  # CONFIG SET does not outlive a restart
    await admin.aclose()
    await store.ping()
    back = await store.get(session.session_id)
    assert back.position == 4 and back.h.tobytes() == session.h.tobytes()
    assert await store.commit_many(updates(update)) == [True]
    await store.close()
