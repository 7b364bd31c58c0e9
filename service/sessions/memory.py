"""In-memory session store: LRU order, per-session idle TTL, byte accounting.

Only the event loop thread touches it, so it needs no locks. A commit replaces a record's arrays
(never writes into them) and its position: arrays handed out stay valid, but a reader that needs the
position a state stood for must read it together with the arrays.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from service.errors import NotFound, ResourceExhausted
from service.metrics import Metrics
from service.sessions.base import SessionRecord, StateUpdate


class MemoryStore:
    def __init__(
        self,
        metrics: Metrics,
        *,
        max_sessions: int,
        evict_when_full: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._records: OrderedDict[str, SessionRecord] = OrderedDict()  # least recently used first
        self._bytes = 0
        self._metrics = metrics
        self._max_sessions = max_sessions
        self._evict_when_full = evict_when_full
        self._clock = clock
        metrics.watch_store(self.count, self.state_bytes)

    def count(self) -> int:
        return len(self._records)

    def state_bytes(self) -> int:
        return self._bytes

    def _touch(self, record: SessionRecord, now: float) -> None:
        record.last_used = now
        record.expires_at = time.time() + record.ttl_seconds
        self._records.move_to_end(record.session_id)

    def _expired(self, record: SessionRecord, now: float) -> bool:
        return now - record.last_used > record.ttl_seconds

    def _remove(self, session_id: str) -> SessionRecord:
        record = self._records.pop(session_id)
        self._bytes -= record.state_bytes
        return record

    def _live(self, session_id: str, now: float) -> SessionRecord | None:
        record = self._records.get(session_id)
        if record is None:
            return None
        if self._expired(record, now):
            self._remove(session_id)
            self._metrics.sessions_expired.inc()
            return None
        return record

    async def create(self, record: SessionRecord) -> SessionRecord:
        now = self._clock()
        if len(self._records) >= self._max_sessions:
            self.sweep()
        if len(self._records) >= self._max_sessions:
            if not self._evict_when_full:
                raise ResourceExhausted(
                    f"session store is full ({self._max_sessions} sessions, max_sessions); "
                    "close idle sessions or retry later"
                )
            oldest = next(iter(self._records))
            self._remove(oldest)
            self._metrics.sessions_evicted.inc()
        self._records[record.session_id] = record
        self._bytes += record.state_bytes
        self._touch(record, now)
        self._metrics.sessions_opened.inc()
        return record

    async def get(self, session_id: str) -> SessionRecord:
        now = self._clock()
        record = self._live(session_id, now)
        if record is None:
            raise NotFound(f"session {session_id!r} not found (unknown, expired, evicted or closed)")
        self._touch(record, now)
        return record

    async def load_many(self, session_ids: list[str]) -> list[SessionRecord | None]:
        now = self._clock()
        records = [self._live(sid, now) for sid in session_ids]
        for record in records:
            if record is not None:
                self._touch(record, now)
        return records

    async def commit_many(self, updates: list[StateUpdate]) -> list[bool]:
        now = self._clock()
        applied = []
        for update in updates:
            record = self._live(update.session_id, now)
            ok = record is not None and record.position == update.expected_position
            if ok:
                self._bytes += update.h.nbytes + update.c.nbytes - record.state_bytes
                record.h, record.c, record.position = update.h, update.c, update.position
                self._touch(record, now)
            applied.append(ok)
        return applied

    async def delete(self, session_id: str) -> SessionRecord:
        if self._live(session_id, self._clock()) is None:
            raise NotFound(f"session {session_id!r} not found (unknown, expired, evicted or closed)")
        return self._remove(session_id)

    def sweep(self) -> int:
        now = self._clock()
        expired = [sid for sid, record in self._records.items() if self._expired(record, now)]
        for sid in expired:
            self._remove(sid)
        self._metrics.sessions_expired.inc(len(expired))
        return len(expired)
