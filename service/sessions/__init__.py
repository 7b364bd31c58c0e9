"""Session stores: where each session's (h, C) and position live between steps."""

from cellstream.service.sessions.base import SessionRecord, SessionStore, StateUpdates

__all__ = ["SessionRecord", "SessionStore", "StateUpdates"]
