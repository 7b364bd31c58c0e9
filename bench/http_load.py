"""The HTTP figure's client side: the real `tritonclient.http.aio` (aiohttp), as a Triton user drives a
sequence model over KServe v2 REST.

Every session is a sequence (`sequence_id`, started by its first request) stepping one token back to back
with unary POST .../infer requests, its reply holding the model's output as binary tensor data: the same
load as the gRPC KServe figure's unary runs, over the HTTP port.
"""

from __future__ import annotations

from tritonclient.http import InferInput, InferRequestedOutput
from tritonclient.http.aio import InferenceServerClient

from cellstream.bench.gate import Gate
from cellstream.bench.jobs import Events, HttpLoad
from cellstream.bench.kserve_load import TOKEN, drive_sequences, sequence_ids


def _inputs() -> list[InferInput]:
    tokens = InferInput("tokens", [1, 1], "INT64")
    tokens.set_data_from_numpy(TOKEN)
    return [tokens]


async def http_load(job: HttpLoad, gate: Gate) -> Events:
    # One connection per sequence: a sequence waits for its reply before its next step, as HTTP/1.1 does.
    client = InferenceServerClient(job.url, conn_limit=job.sessions, conn_timeout=job.timeout_seconds)
    outputs = [InferRequestedOutput(job.output, binary_data=True)]

    async def step(sequence_id: int, start: bool = False, end: bool = False) -> None:
        await client.infer(job.model, _inputs(), outputs=outputs, sequence_id=sequence_id, sequence_start=start,
                           sequence_end=end)

    try:
        return await drive_sequences(sequence_ids(job.sessions), step, gate)
    finally:
        await client.close()
