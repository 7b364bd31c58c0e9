"""Memory-store snapshots: every live session, written at graceful shutdown and read back at start-up.

Format version 1, little-endian:
  header   8s magic b"CELLSNAP" | u16 version | u16 reserved (0) | u64 payload bytes | f64 written at
           (Unix seconds) | 32s SHA-256 of the payload
  payload  u32 index bytes | index: JSON list, one object per session (id, model, owner, position,
           ttl, remaining, layers, hidden), least recently used first | then each session's h and c,
           float32, layers * hidden each, in index order

A file is used whole or not at all: any mismatch (magic, version, length, checksum, index, array
sizes) is a SnapshotError naming the reason. Writes go to a temporary file in the same directory,
are fsynced and renamed over the old one, so a crash mid-write leaves the previous file intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cellstream.service.sessions.base import SessionRecord

MAGIC = b"CELLSNAP"
VERSION = 1
HEADER = struct.Struct("<8sHHQd32s")
INDEX_LENGTH = struct.Struct("<I")
FIELDS = {"id": str, "model": str, "owner": str, "position": int, "ttl": float, "remaining": float,
          "layers": int, "hidden": int}


class SnapshotError(Exception):
    """A snapshot that cannot be used (or written); the message says why."""


@dataclass(frozen=True)
class Snapshot:
    written_at: float  # Unix seconds
    sessions: list[tuple[SessionRecord, float]]  # each with its idle time left (s) when written


def encode(sessions: list[tuple[SessionRecord, float]], written_at: float) -> bytes:
    index = [
        {"id": r.session_id, "model": r.model, "owner": r.owner, "position": r.position, "ttl": r.ttl_seconds,
         "remaining": remaining, "layers": r.h.shape[0], "hidden": r.h.shape[1]}
        for r, remaining in sessions
    ]
    index_bytes = json.dumps(index, separators=(",", ":")).encode()
    arrays = b"".join(np.ascontiguousarray(a, "<f4").tobytes() for r, _ in sessions for a in (r.h, r.c))
    payload = INDEX_LENGTH.pack(len(index_bytes)) + index_bytes + arrays
    return HEADER.pack(MAGIC, VERSION, 0, len(payload), written_at, hashlib.sha256(payload).digest()) + payload


def decode(data: bytes) -> Snapshot:
    if len(data) < HEADER.size or not data.startswith(MAGIC):
        raise SnapshotError("not a cellstream session snapshot (no CELLSNAP header)")
    _magic, version, _reserved, length, written_at, digest = HEADER.unpack_from(data)
    if version != VERSION:
        raise SnapshotError(f"snapshot format version {version}; this server reads version {VERSION}")
    payload = data[HEADER.size:]
    if len(payload) != length:
        raise SnapshotError(f"truncated or padded: the header announces {length} payload bytes, the file has "
                            f"{len(payload)}")
    if hashlib.sha256(payload).digest() != digest:
        raise SnapshotError("checksum mismatch: the file is corrupt")
    return Snapshot(written_at, _sessions(payload))


def _sessions(payload: bytes) -> list[tuple[SessionRecord, float]]:
    try:
        (index_length,) = INDEX_LENGTH.unpack_from(payload)
        index = json.loads(payload[INDEX_LENGTH.size:INDEX_LENGTH.size + index_length])
        arrays = memoryview(payload)[INDEX_LENGTH.size + index_length:]
        for entry in index:
            for name, kind in FIELDS.items():
                if not isinstance(entry[name], kind if kind is not float else (int, float)):
                    raise TypeError(f"{name} is {type(entry[name]).__name__}")
    except (struct.error, ValueError, TypeError, KeyError) as exc:
        raise SnapshotError(f"malformed session index: {exc!r}") from None
    sessions, offset = [], 0
    for entry in index:
        shape = (entry["layers"], entry["hidden"])
        size = 4 * shape[0] * shape[1]
        if min(shape) < 1 or entry["position"] < 0 or entry["ttl"] <= 0:
            raise SnapshotError(f"malformed: session {entry['id']!r} has shape {shape}, position "
                                f"{entry['position']}, ttl {entry['ttl']}")
        if offset + 2 * size > len(arrays):
            raise SnapshotError(f"malformed: session {entry['id']!r} needs state past the end of the file")
        h, c = (np.frombuffer(arrays[offset + k * size:offset + (k + 1) * size], "<f4").reshape(shape).copy()
                for k in (0, 1))
        offset += 2 * size
        record = SessionRecord(entry["id"], entry["model"], h, c, entry["position"], float(entry["ttl"]),
                               entry["owner"])
        sessions.append((record, float(entry["remaining"])))
    if offset != len(arrays):
        raise SnapshotError(f"malformed: {len(arrays) - offset} bytes of state belong to no session")
    return sessions


def write(path: Path, sessions: list[tuple[SessionRecord, float]]) -> None:
    """Atomically replace `path` with a snapshot of `sessions` (owner-only permissions: it holds state)."""
    data = encode(sessions, time.time())
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a power cut
        finally:
            os.close(directory)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise SnapshotError(f"cannot write the session snapshot {path}: {exc}") from None


def read(path: Path) -> Snapshot:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SnapshotError(f"cannot read {path}: {exc}") from None
    return decode(data)


def set_aside(path: Path) -> Path:
    """Rename a refused snapshot to `<name>.rejected` (or `.rejected.N`), keeping earlier ones."""
    target = path.with_name(path.name + ".rejected")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.rejected.{n}")
        n += 1
    path.rename(target)
    return target
