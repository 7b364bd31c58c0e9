"""A chat turn's chunks as server-sent events: `event: chunk` for each, `event: done` for the last (the one
with `finish_reason`), `event: error` if the turn fails once the reply has begun (its status can no
longer change: the event carries it).

The first chunk is awaited before the reply starts, so a turn refused at once (unknown session, bad
prompt) gets its HTTP status like any request. A client that disconnects cancels the turn where it stands,
as a cancelled gRPC Generate does: what was fed to the state so far stays fed.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable

from starlette.responses import Response, StreamingResponse

from cellstream.service.api.handling import INTERNAL_MESSAGE
from cellstream.service.api.http.endpoint import CLIENT_GONE, Call
from cellstream.service.api.http.errors import INTERNAL, HttpError, from_cellstream
from cellstream.service.dataplane import GeneratedChunk
from cellstream.service.errors import CellstreamError

log = logging.getLogger(__name__)

EVENT_STREAM = "text/event-stream"
# Proxies (nginx) buffer replies unless told not to; a buffered event stream arrives all at the end.
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event(name: str, data: object) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def stream_turn(call: Call, chunks: AsyncGenerator[GeneratedChunk, None],
                      render: Callable[[GeneratedChunk], object]) -> Response:
    """The turn's reply: its first chunk now (errors propagate to the endpoint), the rest as they come."""
    first = await anext(chunks)
    return StreamingResponse(_events(call, first, chunks, render), media_type=EVENT_STREAM, headers=HEADERS)


async def _events(call: Call, first: GeneratedChunk, chunks: AsyncGenerator[GeneratedChunk, None],
                  render: Callable[[GeneratedChunk], object]) -> AsyncIterator[bytes]:
    chunk: GeneratedChunk | None = first
    try:
        while chunk is not None:
            yield event("done" if chunk.finish_reason else "chunk", render(chunk))
            if chunk.finish_reason:
                return
            async with asyncio.timeout_at(call.deadline):
                chunk = await anext(chunks, None)
    except TimeoutError:
        yield _failed(call, HttpError(504, "deadline exceeded: the turn took longer than its deadline "
                                           "(Request-Timeout-Ms or http_request_timeout_seconds)"))
    except CellstreamError as exc:
        yield _failed(call, from_cellstream(exc))
    except asyncio.CancelledError:
        call.outcome = CLIENT_GONE
        raise
    except Exception:  # a bug: logged once, reported like gRPC's INTERNAL
        log.exception("unexpected error in a streamed turn")
        yield _failed(call, HttpError(INTERNAL, INTERNAL_MESSAGE))
    finally:
        await chunks.aclose()


def _failed(call: Call, error: HttpError) -> bytes:
    call.outcome = error.status
    return event("error", {"error": error.message, "status": error.status})
