"""L. /metrics over HTTP after a known workload: every series exists and its values add up."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram

from cellstream.service._proto.cellstream.v1 import inference_pb2 as pb
from cellstream.service.metrics import observe_many

CHAT_STATE_BYTES = 2 * 2 * 16 * 4
FEATURES_STATE_BYTES = 2 * 2 * 12 * 4


async def test_metrics_after_a_workload(server, stub, scrape, rpc_error, step):
    began = time.monotonic()
    chat = await stub.OpenSession(pb.OpenSessionRequest())
    features = await stub.OpenSession(pb.OpenSessionRequest(model="tiny-features"))
    doomed = await stub.OpenSession(pb.OpenSessionRequest())
    fork = await stub.ForkSession(pb.ForkSessionRequest(session_id=chat.session_id))

    chat_steps, chat_tokens = 0, 0
    for tokens in ([1, 2, 3], [4], list(range(10)), [7, 7]):
        await stub.Step(step(chat.session_id, tokens=tokens))
        chat_steps, chat_tokens = chat_steps + 1, chat_tokens + len(tokens)
    await stub.Step(step(doomed.session_id, text="bye"))
    chat_steps, chat_tokens = chat_steps + 1, chat_tokens + 3
    for rows in (2, 5):
        await stub.Step(step(features.session_id, features=np.ones((rows, 5))))

    call = stub.StreamSteps()
    for i, tokens in enumerate(([5, 6], [7], [8, 9, 10])):
        await call.write(step(fork.session_id if i == 0 else "", tokens=tokens))
        await asyncio.wait_for(call.read(), 30)
        chat_steps, chat_tokens = chat_steps + 1, chat_tokens + len(tokens)
    await call.done_writing()
    assert await asyncio.wait_for(call.code(), 30) == grpc.StatusCode.OK

    chunks = [c async for c in stub.Generate(pb.GenerateRequest(session_id=chat.session_id, prompt="hi", max_tokens=6))]
    generated = sum(len(c.tokens) for c in chunks)
    chat_steps += 1 + generated  # the prompt, then one step per sampled token
    chat_tokens += 2 + generated

    error = await rpc_error(stub.Step(step(chat.session_id, tokens=[999])))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    await stub.CloseSession(pb.SessionRef(session_id=doomed.session_id))

    samples = await scrape(server)
    elapsed = time.monotonic() - began
    get = samples.get
    # Requests by method and code.
    assert get("cellstream_requests_total", method="Step", code="OK") == 7
    assert get("cellstream_requests_total", method="Step", code="INVALID_ARGUMENT") == 1
    assert get("cellstream_requests_total", method="StreamSteps", code="OK") == 1
    assert get("cellstream_requests_total", method="Generate", code="OK") == 1
    assert get("cellstream_requests_total", method="OpenSession", code="OK") == 3
    assert get("cellstream_requests_total", method="ForkSession", code="OK") == 1
    assert get("cellstream_requests_total", method="CloseSession", code="OK") == 1
    # Latency histogram: one observation per call, every bucket cumulative up to +Inf.
    assert get("cellstream_request_duration_seconds_count", method="Step") == 8
    assert get("cellstream_request_duration_seconds_bucket", method="Step", le="+Inf") == 8
    assert get("cellstream_request_duration_seconds_sum", method="Step") > 0
    buckets = sorted(
        (float(dict(labels)["le"]), value)
        for (name, labels), value in samples.values.items()
        if name == "cellstream_request_duration_seconds_bucket" and dict(labels)["method"] == "Step"
    )
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)
    # Batcher series: sequential calls, so each step ran alone.
    for model, steps in (("tiny-chat", chat_steps), ("tiny-features", 2)):
        assert get("cellstream_queue_wait_seconds_count", model=model) == steps
        # Waits are durations inside this workload (test_queue_wait_is_how_long_steps_waited bounds them below).
        assert 0 <= get("cellstream_queue_wait_seconds_sum", model=model) <= elapsed
        assert get("cellstream_batch_size_count", model=model) == steps
        assert get("cellstream_batch_size_sum", model=model) == steps
        assert get("cellstream_batch_size_bucket", model=model, le="1.0") == steps
        assert get("cellstream_compute_seconds_count", model=model) == steps
        assert get("cellstream_compute_seconds_sum", model=model) > 0
    assert get("cellstream_tokens_total", model="tiny-chat") == chat_tokens
    assert get("cellstream_tokens_total", model="tiny-features") == 7
    # Sessions: opened (incl. the fork), closed, none expired or evicted; gauges read the store.
    assert get("cellstream_sessions_opened_total") == 4
    assert get("cellstream_sessions_closed_total") == 1
    assert get("cellstream_sessions_expired_total") == 0
    assert get("cellstream_sessions_evicted_total") == 0
    assert get("cellstream_sessions_active") == 3
    assert get("cellstream_state_bytes") == 2 * CHAT_STATE_BYTES + FEATURES_STATE_BYTES
    # The same numbers are in the server's own registry (the HTTP endpoint serves that registry).
    registry = server.metrics.registry
    assert registry.get_sample_value("cellstream_tokens_total", {"model": "tiny-chat"}) == chat_tokens



async def test_calls_ended_by_the_client_or_its_deadline_are_counted_as_such(server, stub, gate, scrape, rpc_error,
                                                                            eventually, step):
    held = gate(server)
    blocker = await stub.OpenSession(pb.OpenSessionRequest())
    waiting = [await stub.OpenSession(pb.OpenSessionRequest()) for _ in range(2)]
    first = asyncio.ensure_future(stub.Step(step(blocker.session_id, tokens=[1])))
    await asyncio.to_thread(held.running.wait, 30)  # the model is busy: later steps wait in the queue

    late = await rpc_error(stub.Step(step(waiting[0].session_id, tokens=[2]), timeout=0.2))
    assert late.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    abandoned = stub.Step(step(waiting[1].session_id, tokens=[3]), timeout=30)
    batcher = server.dataplane.batchers["tiny-chat"]
    # Both wait in the queue (the late one is dropped only when its turn comes): the server has the call.
    await eventually(lambda: batcher.queued == 2, "the abandoned Step reaches the server's queue")
    abandoned.cancel()
    # The server learns of the cancellation a moment after the client; a step it has not yet heard of
    # may still run, so the model stays held until the server has counted the call CANCELLED.
    async def counted() -> bool:
        return bool((await scrape(server)).get("cellstream_requests_total", 0.0, method="Step", code="CANCELLED"))

    await eventually(counted, "the server counts the abandoned Step CANCELLED")
    held.open.set()
    assert (await asyncio.wait_for(first, 30)).position == 1

    get = (await scrape(server)).get
    assert get("cellstream_requests_total", method="Step", code="DEADLINE_EXCEEDED") == 1
    assert get("cellstream_requests_total", method="Step", code="CANCELLED") == 1
    assert get("cellstream_requests_total", method="Step", code="OK") == 1
    for session in waiting:
        assert (await stub.GetState(pb.SessionRef(session_id=session.session_id))).position == 0


async def test_queue_wait_is_how_long_steps_waited(server, stub, gate, scrape, eventually, step):
    held = gate(server)
    blocker, *behind = [await stub.OpenSession(pb.OpenSessionRequest()) for _ in range(3)]
    began = time.monotonic()
    first = asyncio.ensure_future(stub.Step(step(blocker.session_id, tokens=[1])))
    await asyncio.to_thread(held.running.wait, 30)
    queued = [asyncio.ensure_future(stub.Step(step(s.session_id, tokens=[2]))) for s in behind]
    batcher = server.dataplane.batchers["tiny-chat"]
    await eventually(lambda: batcher.queued == 2, "both steps queue behind the held batch")
    queued_by = time.monotonic()
    await asyncio.sleep(0.3)
    opened = time.monotonic()
    held.open.set()
    assert [r.position for r in await asyncio.wait_for(asyncio.gather(first, *queued), 30)] == [1, 1, 1]
    ended = time.monotonic()

    get = (await scrape(server)).get
    assert get("cellstream_queue_wait_seconds_count", model="tiny-chat") == 3
    assert get("cellstream_batch_size_count", model="tiny-chat") == 2  # the blocker alone, then both behind it
    # Each step behind the gate waited at least from when both were queued until it opened (the server's
    # loop.time() is this process's monotonic clock); all three waits lie within the test. A compute time
    # in place of the wait would sum to one held period, not two.
    waited = get("cellstream_queue_wait_seconds_sum", model="tiny-chat")
    assert 2 * (opened - queued_by) <= waited <= 3 * (ended - began)
    # Per step, not per batch: at least two observations past 0.25 s (a busy machine only lengthens them).
    assert get("cellstream_queue_wait_seconds_bucket", model="tiny-chat", le="0.25") <= 1


def histogram_samples(registry: CollectorRegistry, name: str) -> dict[tuple, float]:
    """(sample suffix, labels) -> value of one histogram, creation time left out."""
    return {(sample.name.removeprefix(name), tuple(sorted(sample.labels.items()))): sample.value
            for family in registry.collect() if family.name == name
            for sample in family.samples if not sample.name.endswith("_created")}


@pytest.mark.parametrize("count", [3, 40])  # below (observe() per value) and above BULK_OBSERVE_FROM: both paths
def test_observe_many_equals_one_observe_per_value(count):
    registry = CollectorRegistry()
    bulk = Histogram("bulk", "values observed at once", ["m"], registry=registry)
    each = Histogram("each", "values observed one by one", ["m"], registry=registry)
    bounds = [b for b in bulk._upper_bounds if b != float("inf")]
    values = [bounds[k % len(bounds)] * (0.5, 1.0, 1.5)[k % 3] for k in range(count)]  # some exactly on a bound
    observations = [(value, k % 4) for k, value in enumerate(values)]  # a value 0 to 3 times
    observe_many(bulk.labels("a"), observations)
    for value, times in observations:
        for _ in range(times):
            each.labels("a").observe(value)
    got, want = histogram_samples(registry, "bulk"), histogram_samples(registry, "each")
    assert len(want) == len(bounds) + 3  # every bucket incl. +Inf, count and sum
    assert got == pytest.approx(want)
