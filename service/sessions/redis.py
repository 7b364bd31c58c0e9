"""Redis session store: every replica sees every session, so any replica can serve any step.

A session is one hash holding its state as raw float32 bytes (see redis_lua.py for the layout). The
batcher's `load_many` is one script call for the whole batch and `commit_many` one pipelined round
trip of per-session compare-and-set scripts: a replica whose step lost a race on a session applies
nothing to it. The scripts are registered once per Redis (SCRIPT LOAD) and called by digest; after a
Redis restart forgets them, they are registered again and the calls, which never ran, are resent.

Redis unreachable (refused, timed out, loading, read-only) is Unavailable; Redis out of memory is
ResourceExhausted. Nothing falls back to another store. Messages name Redis without credentials.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cellstream.service.config import redacted_url
from cellstream.service.errors import ResourceExhausted, Unavailable, session_not_found
from cellstream.service.metrics import Metrics
from cellstream.service.sessions import redis_lua
from cellstream.service.sessions.base import SessionRecord, StateUpdates, stack_states

if TYPE_CHECKING:
    from cellstream.service.telemetry import Telemetry

PREFIX = "cellstream:"
SWEEP_BATCH = 1000  # index entries one sweep script looks at: bounds how long it holds Redis
T = TypeVar("T")


class _Script:
    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


SCRIPTS = {name: _Script(getattr(redis_lua, name))
           for name in ("CREATE", "LOAD", "COMMIT", "DELETE", "SWEEP", "COUNT")}


def _record(session_id: str, values: Sequence[bytes | int | None], now_ms: int) -> SessionRecord | None:
    """A SessionRecord from the FIELDS of a hash as a script returned them, None if it had none."""
    model, owner, position, layers, h, c, ttl_ms = values
    if model is None:
        return None
    shape = (int(layers), -1)
    return SessionRecord(
        session_id, model.decode(), np.frombuffer(h, "<f4").reshape(shape), np.frombuffer(c, "<f4").reshape(shape),
        int(position), int(ttl_ms) / 1000, owner.decode(), expires_at=(now_ms + int(ttl_ms)) / 1000,
    )


def _raw(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, "<f4").tobytes()


class RedisStore:
    def __init__(
        self,
        url: str,
        metrics: Metrics,
        *,
        max_sessions: int,
        evict_when_full: bool = True,
        max_sessions_per_principal: int = 0,
        timeout_seconds: float = 1.0,
        tracing: Telemetry | None = None,
    ) -> None:
        # No client-side retries: a step fails fast with UNAVAILABLE and the client decides; a resent
        # commit could not tell "applied before the connection dropped" from "lost the race".
        self._redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout_seconds, socket_connect_timeout=timeout_seconds, retry=Retry(NoBackoff(), 0),
        )
        self.where = redacted_url(url)
        self._tracing = tracing
        parts = urlsplit(url)
        self._span_attributes = {"db.system.name": "redis", "server.address": parts.hostname or parts.path}
        if parts.port:
            self._span_attributes["server.port"] = parts.port
        self._metrics = metrics
        self._max_sessions = max_sessions
        self._evict = evict_when_full
        self._max_per_owner = max_sessions_per_principal
        self._count = 0
        self._bytes = 0
        metrics.watch_store(self.count, self.state_bytes)

    def count(self) -> int:
        return self._count

    def state_bytes(self) -> int:
        return self._bytes

    def _key(self, session_id: str) -> str:
        return f"{PREFIX}s:{session_id}"

    async def _guarded(self, action: Callable[[], Awaitable[T]], doing: str, operation: str, sessions: int = 1) -> T:
        """Run `action` (traced as `operation` on `sessions` sessions when tracing is on), registering the scripts
        and rerunning it once if Redis had forgotten them."""
        if self._tracing is None:
            return await self._run_guarded(action, doing)
        with self._tracing.store_span(operation, {**self._span_attributes, "cellstream.sessions": sessions}):
            return await self._run_guarded(action, doing)

    async def _run_guarded(self, action: Callable[[], Awaitable[T]], doing: str) -> T:
        try:
            try:
                return await action()
            except NoScriptError:
                for script in SCRIPTS.values():
                    await self._redis.script_load(script.source)
                return await action()
        except (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OSError) as exc:
            raise Unavailable(f"session store unreachable (Redis at {self.where}) while {doing}: {exc}; "
                              "retry shortly") from None
        except ResponseError as exc:
            if str(exc).startswith("OOM"):
                raise ResourceExhausted(f"session store is out of memory (Redis at {self.where}, maxmemory); "
                                        "close idle sessions or retry later") from None
            raise

    async def _run(self, name: str, keys: Sequence[str], args: Sequence[object]) -> object:
        return await self._redis.evalsha(SCRIPTS[name].sha, len(keys), *keys, *args)

    async def create(self, record: SessionRecord) -> SessionRecord:
        args = (PREFIX, record.session_id, record.model, record.owner, record.position, record.h.shape[0],
                _raw(record.h), _raw(record.c), max(1, round(record.ttl_seconds * 1000)), self._max_sessions,
                int(self._evict), self._max_per_owner)
        status, expires_ms, evicted = await self._guarded(lambda: self._run("CREATE", (), args), "opening a session",
                                                           "CREATE")
        if status == b"full":
            raise ResourceExhausted(f"session store is full ({self._max_sessions} sessions, max_sessions); "
                                    "close idle sessions or retry later")
        if status == b"owner_full":
            raise ResourceExhausted(f"you hold {self._max_per_owner} live sessions (max_sessions_per_principal); "
                                    "close some before opening more")
        self._metrics.sessions_evicted.inc(evicted)
        self._metrics.sessions_opened.inc()
        record.expires_at = expires_ms / 1000
        return record

    async def get(self, session_id: str) -> SessionRecord:
        [record] = await self.load_many([session_id])
        if record is None:
            raise session_not_found(session_id)
        return record

    async def load_many(self, session_ids: list[str]) -> list[SessionRecord | None]:
        keys = [self._key(sid) for sid in session_ids]
        reply = await self._guarded(lambda: self._run("LOAD", keys, ()), "loading sessions", "LOAD", len(keys))
        now_ms, fields = reply[0], len(redis_lua.FIELDS)
        return [_record(sid, reply[1 + i * fields:1 + (i + 1) * fields], now_ms) for i, sid in enumerate(session_ids)]

    def stack(self, records: Sequence[SessionRecord]) -> tuple[np.ndarray, np.ndarray]:
        return stack_states(records)

    async def commit_many(self, updates: StateUpdates) -> list[bool]:
        if not updates.session_ids:
            return []

        async def pipelined() -> list[object]:
            pipe = self._redis.pipeline(transaction=False)
            for k, (session_id, expected, position) in enumerate(
                    zip(updates.session_ids, updates.expected_positions, updates.positions, strict=True)):
                pipe.evalsha(SCRIPTS["COMMIT"].sha, 1, self._key(session_id), expected, position,
                             _raw(updates.h[:, k]), _raw(updates.c[:, k]))
            replies = await pipe.execute(raise_on_error=False)
            # Every call names the same script: if Redis lacked it, none of them ran.
            errors = [r for r in replies if isinstance(r, Exception)]
            if errors:
                raise errors[0]
            return replies

        doing = "saving steps (each may or may not have been applied: read the position, or retry with " \
                "expected_position)"
        return [reply == 1 for reply in await self._guarded(pipelined, doing, "COMMIT", len(updates.session_ids))]

    async def delete(self, session_id: str) -> SessionRecord:
        reply = await self._guarded(lambda: self._run("DELETE", (), (PREFIX, session_id)), "closing a session",
                                    "DELETE")
        record = None if reply is None else _record(session_id, reply[1:], reply[0])
        if record is None:
            raise session_not_found(session_id)
        return record

    async def sweep(self) -> int:
        """Forget the index entries of sessions Redis expired, and refresh the gauges."""
        forgotten = 0
        while True:
            gone, seen, self._count, self._bytes = await self._guarded(
                lambda: self._run("SWEEP", (), (PREFIX, SWEEP_BATCH)), "sweeping expired sessions", "SWEEP", 0)
            forgotten += gone
            if seen < SWEEP_BATCH:
                break
        self._metrics.sessions_expired.inc(forgotten)
        return forgotten

    async def count_models(self) -> dict[str, int]:
        reply = await self._guarded(lambda: self._run("COUNT", (), (PREFIX, SWEEP_BATCH)), "counting sessions",
                                    "COUNT", 0)
        return {model.decode(): int(count) for model, count in zip(reply[::2], reply[1::2], strict=True)}

    async def ping(self) -> None:
        """One round trip that also refreshes the gauges between sweeps."""

        async def stats() -> list[object]:
            pipe = self._redis.pipeline(transaction=False)
            pipe.zcard(f"{PREFIX}idx")
            pipe.get(f"{PREFIX}bytes")
            return await pipe.execute()

        count, state_bytes = await self._guarded(stats, "checking the store", "PING", 0)
        self._count, self._bytes = int(count), int(state_bytes or 0)

    async def close(self) -> None:
        await self._redis.aclose()
