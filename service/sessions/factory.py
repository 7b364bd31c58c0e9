"""The session store the settings ask for: this process's memory (restored from its snapshot), or
a shared Redis."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from cellstream.service.config import MEMORY, Settings
from cellstream.service.engine import ModelSpec
from cellstream.service.metrics import Metrics
from cellstream.service.sessions import snapshot
from cellstream.service.sessions.base import SessionStore
from cellstream.service.sessions.memory import MemoryStore
from cellstream.service.sessions.redis import RedisStore

if TYPE_CHECKING:
    from cellstream.service.telemetry import Telemetry

log = logging.getLogger(__name__)


async def open_store(
    settings: Settings, metrics: Metrics, specs: Mapping[str, ModelSpec], *,
    clock: Callable[[], float] = time.monotonic, tracing: Telemetry | None = None,
) -> SessionStore:
    """The store, ready to serve; SnapshotError when its snapshot is unusable and the settings refuse it.
    `specs`: the model versions loaded, by key. `clock` measures the memory store's idle TTLs (tests advance one
    by hand); Redis keeps its own time. `tracing`: Redis operations are traced (the memory store's take
    microseconds: they are not)."""
    evict = settings.when_full == "evict"
    per_principal = settings.max_sessions_per_principal
    if settings.state_store != MEMORY:
        # Not pinged here: a replica that starts while Redis is down serves NOT_SERVING until it is back.
        return RedisStore(settings.state_store, metrics, max_sessions=settings.max_sessions, evict_when_full=evict,
                          max_sessions_per_principal=per_principal,
                          timeout_seconds=settings.state_store_timeout_seconds, tracing=tracing)
    store = MemoryStore(metrics, max_sessions=settings.max_sessions, evict_when_full=evict,
                        max_sessions_per_principal=per_principal, snapshot_path=settings.snapshot_path, clock=clock)
    path = settings.snapshot_path
    if path is not None and path.exists():
        await _restore(store, path, settings, specs)
    return store


async def _restore(store: MemoryStore, path: Path, settings: Settings, specs: Mapping[str, ModelSpec]) -> None:
    try:
        taken = await asyncio.to_thread(snapshot.read, path)
    except snapshot.SnapshotError as exc:
        aside = snapshot.set_aside(path)
        if settings.snapshot_on_invalid == "refuse":
            raise snapshot.SnapshotError(
                f"refusing the session snapshot {path}: {exc}. It was moved to {aside}; no session was restored. "
                "Start again to start empty, or set snapshot_on_invalid=start-empty to skip this stop"
            ) from None
        log.error("session snapshot %s refused: %s; moved to %s, starting with no sessions", path, exc, aside)
        return
    # Idle time went on while no server ran; a snapshot from the future (clock change) costs none.
    downtime = max(0.0, time.time() - taken.written_at)
    restored = expired = dropped = elsewhere = 0
    for record, remaining in taken.sessions[-settings.max_sessions:]:
        spec = specs.get(record.model)
        if spec is not None and spec.state_shape != record.h.shape:
            dropped += 1
        elif remaining - downtime <= 0:
            expired += 1
        else:
            # A session of a version not loaded now is kept: its steps are refused (FAILED_PRECONDITION) until
            # that version is loaded, never run on another.
            store.restore(record, remaining - downtime)
            restored += 1
            elsewhere += spec is None
    # Consumed: a later start (after a crash, which writes no snapshot) must not bring back stale states.
    path.unlink()
    log.info("restored %d sessions from %s (%d of them pinned to model versions not loaded now; %d expired while "
             "down, %d of versions whose state shape changed, %d over max_sessions)", restored, path, elsewhere,
             expired, dropped, max(0, len(taken.sessions) - settings.max_sessions))
