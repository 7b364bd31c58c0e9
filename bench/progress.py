"""Progress lines on stdout, stamped with the time since the run began (a full run takes minutes)."""

from __future__ import annotations

import time

_started = time.monotonic()


def restart() -> None:
    global _started
    _started = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - _started:6.1f}s] {message}", flush=True)
