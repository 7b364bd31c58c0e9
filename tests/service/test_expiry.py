"""E. Idle TTL expiry and LRU eviction, observed through the API and the metrics."""

from __future__ import annotations

import grpc

from cellstream.service._proto.cellstream.v1 import inference_pb2 as pb

NOT_FOUND = grpc.StatusCode.NOT_FOUND
STATE_BYTES_PER_SESSION = 2 * 2 * 16 * 4  # h and c, 2 layers x 16 units, float32


async def test_ttl_expiry_by_the_sweeper(start, connect, scrape, rpc_error, clock, eventually, step):
    server = await start(sweep_interval_seconds=0.05, clock=clock)
    stub = connect(server)
    short = await stub.OpenSession(pb.OpenSessionRequest(ttl_seconds=1))
    long = await stub.OpenSession(pb.OpenSessionRequest(ttl_seconds=60))
    await stub.Step(step(short.session_id, tokens=[1, 2, 3]))
    # Activity refreshes the idle TTL: 0.9 s + 0.9 s idle is past 1 s in total but not since the last use.
    for _ in range(2):
        clock.advance(0.9)
        assert (await stub.GetState(pb.SessionRef(session_id=short.session_id))).position == 3
    clock.advance(1.1)

    # The sweeper removes it before anyone touches it again (a scrape reads the store, it does not use it).
    async def swept() -> bool:
        return (await scrape(server)).get("cellstream_sessions_expired_total") == 1

    await eventually(swept, "the sweeper removes the idle session")
    samples = await scrape(server)
    assert samples.get("cellstream_sessions_active") == 1
    assert samples.get("cellstream_state_bytes") == STATE_BYTES_PER_SESSION
    for call in (stub.Step(step(short.session_id, tokens=[1])),
                 stub.GetState(pb.SessionRef(session_id=short.session_id))):
        error = await rpc_error(call)
        assert error.code() == NOT_FOUND
        assert short.session_id in error.details()
    assert (await stub.GetState(pb.SessionRef(session_id=long.session_id))).position == 0
    assert (await scrape(server)).get("cellstream_sessions_expired_total") == 1


async def test_expired_session_is_refused_before_any_sweep(start, connect, scrape, rpc_error, clock, step):
    server = await start(sweep_interval_seconds=3600, clock=clock)
    stub = connect(server)
    session = await stub.OpenSession(pb.OpenSessionRequest(ttl_seconds=1))
    clock.advance(1.3)
    error = await rpc_error(stub.Step(step(session.session_id, tokens=[1])))
    assert error.code() == NOT_FOUND
    samples = await scrape(server)
    assert samples.get("cellstream_sessions_expired_total") == 1
    assert samples.get("cellstream_sessions_active") == 0


async def test_lru_eviction(start, connect, scrape, rpc_error, step):
    server = await start(max_sessions=3, when_full="evict")
    stub = connect(server)
    first, second, third = [await stub.OpenSession(pb.OpenSessionRequest()) for _ in range(3)]
    await stub.Step(step(first.session_id, tokens=[1, 2]))  # touch the first: the second is now least recent
    fourth = await stub.OpenSession(pb.OpenSessionRequest())
    error = await rpc_error(stub.GetState(pb.SessionRef(session_id=second.session_id)))
    assert error.code() == NOT_FOUND
    for session, position in ((first, 2), (third, 0), (fourth, 0)):
        assert (await stub.GetState(pb.SessionRef(session_id=session.session_id))).position == position
    samples = await scrape(server)
    assert samples.get("cellstream_sessions_evicted_total") == 1
    assert samples.get("cellstream_sessions_opened_total") == 4
    assert samples.get("cellstream_sessions_active") == 3
    assert samples.get("cellstream_state_bytes") == 3 * STATE_BYTES_PER_SESSION

    # A read (GetState) also counts as use: touch third and fourth, then first is the oldest.
    await stub.GetState(pb.SessionRef(session_id=third.session_id))
    await stub.GetState(pb.SessionRef(session_id=fourth.session_id))
    fifth = await stub.ForkSession(pb.ForkSessionRequest(session_id=third.session_id))
    error = await rpc_error(stub.GetState(pb.SessionRef(session_id=first.session_id)))
    assert error.code() == NOT_FOUND
    for session in (third, fourth, fifth):
        await stub.GetState(pb.SessionRef(session_id=session.session_id))
    samples = await scrape(server)
    assert samples.get("cellstream_sessions_evicted_total") == 2
    assert samples.get("cellstream_sessions_active") == 3
