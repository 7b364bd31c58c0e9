"""The session record and the protocol every store implements."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np


def new_session_id() -> str:
    """128 random bits, hex: unguessable, so a session id works as a capability."""
    return secrets.token_hex(16)


@dataclass
class SessionRecord:
    """One session: the model version it is pinned to, layer-major state h/c (L, H) float32 and tokens consumed."""

    session_id: str
    model: str  # the key of its model version (versions.py): the model's name for version 1
    h: np.ndarray
    c: np.ndarray
    position: int
    ttl_seconds: float
    owner: str = ""
    last_used: float = 0.0  # time.monotonic() of the last access
    expires_at: float = 0.0  # wall-clock time.time() it expires if left idle

    @property
    def state_bytes(self) -> int:
        return self.h.nbytes + self.c.nbytes


class StateUpdates(NamedTuple):
    """New states of a batch's sessions, as the engine returns them; each is applied only if its session
    is still at its expected position."""

    session_ids: Sequence[str]
    expected_positions: Sequence[int]
    positions: Sequence[int]  # after the step
    h: np.ndarray  # (L, B, H): column b is session_ids[b]'s
    c: np.ndarray


def stack_states(records: Sequence[SessionRecord]) -> tuple[np.ndarray, np.ndarray]:
    """The records' states as h0, c0 (L, B, H)."""
    # np.array, not np.stack: stack's Python-level work per array is several times the copy.
    h = np.array([record.h for record in records]).transpose(1, 0, 2)
    c = np.array([record.c for record in records]).transpose(1, 0, 2)
    return np.ascontiguousarray(h), np.ascontiguousarray(c)


class SessionStore(Protocol):
    async def create(self, record: SessionRecord) -> SessionRecord:
        """Add a new session (stamping its expiry); ResourceExhausted when full and not evicting."""

    async def get(self, session_id: str) -> SessionRecord:
        """The live session, refreshing its idle TTL; NotFound if unknown, expired or closed."""

    async def load_many(self, session_ids: list[str]) -> list[SessionRecord | None]:
        """Live sessions in one round trip, None where missing; refreshes their TTLs."""

    def stack(self, records: Sequence[SessionRecord]) -> tuple[np.ndarray, np.ndarray]:
        """The states of records load_many just returned, as h0, c0 (L, B, H) (read before any await)."""

    async def commit_many(self, updates: StateUpdates) -> list[bool]:
        """Apply each update whose expected position still holds (compare-and-set); False where not."""

    async def delete(self, session_id: str) -> SessionRecord:
        """Remove and return a live session; NotFound if there is none."""

    async def sweep(self) -> int:
        """Drop expired sessions now; returns how many."""

    async def ping(self) -> None:
        """Return if the store is reachable, else raise Unavailable (health follows this)."""

    async def close(self) -> None:
        """Release the store's resources at shutdown (the memory store writes its snapshot here)."""

    def count(self) -> int:
        """Live sessions, for the gauge; a shared store reports its last known total of all replicas."""

    async def count_models(self) -> dict[str, int]:
        """Live sessions per model version key, counted now (a shared store: all replicas' sessions); versions
        without sessions may be left out. Sessions written before the store counted by version (Redis) are not
        counted."""

    def state_bytes(self) -> int:
        """Bytes of h and C of those sessions, read like count()."""
