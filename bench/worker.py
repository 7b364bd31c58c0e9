"""Entry point of a client process: runs each job the parent sends, until it sends None."""

from __future__ import annotations

import asyncio
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event

from cellstream.bench.gate import READY, Gate
from cellstream.bench.jobs import Assignment
from cellstream.bench.scenarios import run_job


def main(conn: Connection, go: Event, stop: Event) -> None:
    conn.send(READY)  # imports done: the parent may start timing things now
    assignment: Assignment | None
    while (assignment := conn.recv()) is not None:
        conn.send(asyncio.run(run_job(assignment.target, assignment.job, Gate(conn, go, stop))))
