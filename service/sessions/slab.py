"""The states of the memory store's sessions of one shape, as columns of two arrays h, c (L, capacity, H).

A batch gathers its sessions' states with one `np.take` and commits them with one assignment per layer, in
the engine's own layout (L, B, H); with an array pair per session, the batcher built the batch from B arrays and
copied B pairs back out at every step, which cost more event-loop time than onnxruntime spent on the step.
A record's h and c are views of its column: they always show the session's current state.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cellstream.service.sessions.base import SessionRecord

INITIAL_COLUMNS = 64


class StateSlab:
    def __init__(self, shape: tuple[int, int], capacity: int = INITIAL_COLUMNS) -> None:
        self._shape = shape
        self.h, self.c = self._arrays(capacity)
        self._holders: dict[int, SessionRecord] = {}  # column -> the record whose h, c are views of it
        self._free = list(range(capacity - 1, -1, -1))  # lowest column first

    def take(self, record: SessionRecord) -> int:
        """Copy the record's state into a free column and make its h, c views of it; returns the column."""
        if not self._free:
            self._grow()
        column = self._free.pop()
        self.h[:, column], self.c[:, column] = record.h, record.c
        self._hold(column, record)
        return column

    def release(self, column: int) -> None:
        """Free the column; its record keeps a private copy of the state (it may still be read, e.g. by
        CloseSession), since the column will hold another session's."""
        record = self._holders.pop(column)
        record.h, record.c = record.h.copy(), record.c.copy()
        self._free.append(column)

    def gather(self, columns: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """The states of `columns` as h0, c0 (L, B, H), fresh arrays."""
        # take() on an index array: half the time of indexing with the list (measured, 256 columns).
        index = np.array(columns, dtype=np.intp)
        return np.take(self.h, index, axis=1), np.take(self.c, index, axis=1)

    def scatter(self, columns: Sequence[int], h: np.ndarray, c: np.ndarray) -> None:
        """Write h, c (L, B, H) into `columns`."""
        index = np.array(columns, dtype=np.intp)
        for layer in range(self.h.shape[0]):  # per layer, rows of one 2-D array: half the time of one 3-D assignment
            self.h[layer][index], self.c[layer][index] = h[layer], c[layer]

    def shrink(self) -> dict[str, int]:
        """If at most a quarter of the columns hold sessions (after a peak of sessions has gone), move them
        into arrays of twice their number, so the memory of the peak is given back; returns each moved
        session's new column (nothing if it did not shrink)."""
        capacity, used = self.h.shape[1], len(self._holders)
        if capacity <= INITIAL_COLUMNS or used > capacity // 4:
            return {}
        kept = list(self._holders.items())
        h, c = self._arrays(max(INITIAL_COLUMNS, 2 * used))
        h[:, :used], c[:, :used] = self.gather([column for column, _ in kept])
        self.h, self.c = h, c
        self._holders = {}
        moved: dict[str, int] = {}
        for column, (_, record) in enumerate(kept):
            self._hold(column, record)
            moved[record.session_id] = column
        self._free = list(range(h.shape[1] - 1, used - 1, -1))
        return moved

    def _grow(self) -> None:
        """Double the capacity; every record's views move to the new arrays."""
        capacity = self.h.shape[1]
        h, c = self._arrays(2 * capacity)
        h[:, :capacity], c[:, :capacity] = self.h, self.c
        self.h, self.c = h, c
        for column, record in list(self._holders.items()):
            self._hold(column, record)
        self._free.extend(range(2 * capacity - 1, capacity - 1, -1))

    def _arrays(self, capacity: int) -> tuple[np.ndarray, np.ndarray]:
        layers, hidden = self._shape
        return np.zeros((layers, capacity, hidden), np.float32), np.zeros((layers, capacity, hidden), np.float32)

    def _hold(self, column: int, record: SessionRecord) -> None:
        """Make the record's h, c views of `column` of the current arrays."""
        record.h, record.c = self.h[:, column], self.c[:, column]
        self._holders[column] = record
