"""In-memory session store: LRU order, per-session idle TTL, byte accounting, per-owner limit, and
an optional snapshot written at graceful shutdown (see snapshot.py; restored by factory.py).

Only the event loop thread touches it, so it needs no locks. States live in slabs (slab.py), one per
state shape: a record's h and c are views that a commit overwrites in place, so a reader copies them, or
uses them before its next await, and reads the position together with them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from cellstream.service.errors import ResourceExhausted, session_not_found
from cellstream.service.metrics import Metrics
from cellstream.service.sessions import snapshot
from cellstream.service.sessions.base import SessionRecord, StateUpdates
from cellstream.service.sessions.slab import StateSlab

log = logging.getLogger(__name__)


class MemoryStore:
    def __init__(
        self,
        metrics: Metrics,
        *,
        max_sessions: int,
        evict_when_full: bool = True,
        max_sessions_per_principal: int = 0,
        snapshot_path: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._records: OrderedDict[str, SessionRecord] = OrderedDict()  # least recently used first
        self._slabs: dict[tuple[int, ...], StateSlab] = {}  # by state shape (L, H)
        self._columns: dict[str, tuple[StateSlab, int]] = {}  # where each session's state lives
        self._bytes = 0
        self._owned: Counter[str] = Counter()  # live sessions per non-empty owner
        self._by_model: Counter[str] = Counter()  # live sessions per model version key (not yet swept)
        self._max_per_owner = max_sessions_per_principal
        self._metrics = metrics
        self._max_sessions = max_sessions
        self._evict_when_full = evict_when_full
        self._clock = clock
        self._snapshot_path = snapshot_path
        metrics.watch_store(self.count, self.state_bytes)

    def count(self) -> int:
        return len(self._records)

    def state_bytes(self) -> int:
        return self._bytes

    def _touch(self, record: SessionRecord, now: float) -> None:
        """Mark used at `now` (the store's clock)."""
        record.last_used = now
        record.expires_at = time.time() + record.ttl_seconds
        self._records.move_to_end(record.session_id)

    def _expired(self, record: SessionRecord, now: float) -> bool:
        return now - record.last_used > record.ttl_seconds

    def _remove(self, session_id: str) -> SessionRecord:
        record = self._records.pop(session_id)
        slab, column = self._columns.pop(session_id)
        slab.release(column)
        self._bytes -= record.state_bytes
        self._by_model[record.model] -= 1
        if record.owner:
            self._owned[record.owner] -= 1
            if not self._owned[record.owner]:
                del self._owned[record.owner]
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

    def _insert(self, record: SessionRecord) -> None:
        slab = self._slabs.get(record.h.shape)
        if slab is None:
            slab = self._slabs[record.h.shape] = StateSlab(record.h.shape)
        self._columns[record.session_id] = slab, slab.take(record)
        self._records[record.session_id] = record
        self._bytes += record.state_bytes
        self._by_model[record.model] += 1
        if record.owner:
            self._owned[record.owner] += 1

    def _check_owner_room(self, owner: str) -> None:
        if not (owner and self._max_per_owner) or self._owned[owner] < self._max_per_owner:
            return
        self._sweep()
        if self._owned[owner] >= self._max_per_owner:
            raise ResourceExhausted(f"you hold {self._max_per_owner} live sessions (max_sessions_per_principal); "
                                    "close some before opening more")

    async def create(self, record: SessionRecord) -> SessionRecord:
        now = self._clock()
        if record.session_id in self._records:  # a client-named session (KServe sequence) started again
            self._remove(record.session_id)
        self._check_owner_room(record.owner)
        if len(self._records) >= self._max_sessions:
            self._sweep()
        if len(self._records) >= self._max_sessions:
            if not self._evict_when_full:
                raise ResourceExhausted(
                    f"session store is full ({self._max_sessions} sessions, max_sessions); "
                    "close idle sessions or retry later"
                )
            oldest = next(iter(self._records))
            self._remove(oldest)
            self._metrics.sessions_evicted.inc()
        self._insert(record)
        self._touch(record, now)
        self._metrics.sessions_opened.inc()
        return record

    async def get(self, session_id: str) -> SessionRecord:
        now = self._clock()
        record = self._live(session_id, now)
        if record is None:
            raise session_not_found(session_id)
        self._touch(record, now)
        return record

    async def load_many(self, session_ids: list[str]) -> list[SessionRecord | None]:
        now, wall = self._clock(), time.time()
        find, to_end = self._records.get, self._records.move_to_end
        records: list[SessionRecord | None] = []
        # _live and _touch written out (one clock read for the batch): this loop runs for every step.
        for session_id in session_ids:
            record = find(session_id)
            if record is not None:
                if self._expired(record, now):
                    record = self._live(session_id, now)  # removed and counted there
                else:
                    record.last_used, record.expires_at = now, wall + record.ttl_seconds
                    to_end(session_id)
            records.append(record)
        return records

    def stack(self, records: Sequence[SessionRecord]) -> tuple[np.ndarray, np.ndarray]:
        # A batch is of one model: its sessions' states are columns of the one slab of their shape.
        columns = self._columns
        return self._slabs[records[0].h.shape].gather([columns[record.session_id][1] for record in records])

    async def commit_many(self, updates: StateUpdates) -> list[bool]:
        # Not a use of the sessions: their batch's load_many refreshed their idle TTLs and LRU places a moment
        # ago (a session that expired since was live when its step began: the step completes).
        records, columns = self._records, self._columns
        applied: list[bool] = []
        indices: list[int] = []  # the updates applied, and their sessions' columns
        slab_columns: list[int] = []
        for k, (session_id, expected, position) in enumerate(
                zip(updates.session_ids, updates.expected_positions, updates.positions, strict=True)):
            record = records.get(session_id)
            if record is None or record.position != expected:
                applied.append(False)
                continue
            record.position = position  # a session's state keeps its model's shape: its bytes do not change
            indices.append(k)
            slab_columns.append(columns[session_id][1])
            applied.append(True)
        if indices:
            layers, _, hidden = updates.h.shape
            slab = self._slabs[(layers, hidden)]  # the batch's model's slab, as in stack
            if len(indices) == len(applied):  # every update of the batch: no need to pick columns
                slab.scatter(slab_columns, updates.h, updates.c)
            else:
                slab.scatter(slab_columns, updates.h[:, indices], updates.c[:, indices])
        return applied

    async def delete(self, session_id: str) -> SessionRecord:
        if self._live(session_id, self._clock()) is None:
            raise session_not_found(session_id)
        return self._remove(session_id)

    async def sweep(self) -> int:
        return self._sweep()

    async def count_models(self) -> dict[str, int]:
        """Sessions that expired since the last sweep count until it removes them."""
        return {model: count for model, count in self._by_model.items() if count}

    async def ping(self) -> None:
        """Always reachable: it lives in this process."""

    async def close(self) -> None:
        """Write every live session to the snapshot file, if there is one; SnapshotError if that fails."""
        if self._snapshot_path is not None:
            sessions = self.live_sessions()
            await asyncio.to_thread(snapshot.write, self._snapshot_path, sessions)
            log.info("wrote %d sessions to the snapshot %s", len(sessions), self._snapshot_path)

    def live_sessions(self) -> list[tuple[SessionRecord, float]]:
        """Every live session, least recently used first, with its idle seconds left."""
        now = self._clock()
        return [(r, r.ttl_seconds - (now - r.last_used)) for r in self._records.values() if not self._expired(r, now)]

    def restore(self, record: SessionRecord, remaining_seconds: float) -> None:
        """Add a session from a snapshot with `remaining_seconds` of idle time left; call in LRU order."""
        if record.session_id in self._records:
            self._remove(record.session_id)
        self._insert(record)
        record.last_used = self._clock() - (record.ttl_seconds - remaining_seconds)
        record.expires_at = time.time() + remaining_seconds

    def _sweep(self) -> int:
        now = self._clock()
        expired = [sid for sid, record in self._records.items() if self._expired(record, now)]
        for sid in expired:
            self._remove(sid)
        self._metrics.sessions_expired.inc(len(expired))
        for slab in self._slabs.values():
            for session_id, column in slab.shrink().items():
                self._columns[session_id] = slab, column
        return len(expired)
