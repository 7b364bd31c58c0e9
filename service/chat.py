"""`cellstream chat`: a conversation on stdin/stdout, one session for all of it, each reply streamed as it comes."""

from __future__ import annotations

import sys
from typing import Any

from cellstream import CellstreamError, Client, Session


def chat(target: str, *, model: str = "", temperature: float = 0.0, max_tokens: int = 200,
         **connection: Any) -> int:
    """Chat with `target` until an empty line or end of input; `connection`: the Client's token and TLS options.
    Exit status 0, or 1 when the server fails (the reason on stderr)."""
    with Client(target, **connection) as client:
        try:
            session = client.session(model)
        except CellstreamError as exc:
            print(f"cellstream chat: cannot open a session on {target}: {exc}", file=sys.stderr)
            return 1
        print(f"session {session.session_id} on model {session.model}; empty line or Ctrl-D to quit")
        try:
            converse(session, temperature=temperature, max_tokens=max_tokens)
            session.close()
        except CellstreamError as exc:
            print(f"\n[error: {exc}]")
            return 1
    return 0


def converse(session: Session, *, temperature: float, max_tokens: int) -> None:
    """Turn after turn until an empty line: the user's line as a prompt, the reply printed chunk by chunk."""
    while True:
        print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            return
        print("bot> ", end="", flush=True)
        reply = ""
        for chunk in session.generate(f"user: {line.strip()}\nbot: ", temperature=temperature, max_tokens=max_tokens,
                                      stop=["\n"]):
            reply += chunk.text
            print(chunk.text, end="", flush=True)
        if not reply.endswith("\n"):
            print()
