"""F. Batcher rules, driven directly (real Engine + MemoryStore + Metrics, no gRPC).

Jobs are queued before the batcher starts, and a gate holds onnxruntime where a test needs a batch
"in flight", so the batch composition never depends on timing.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from cellstream.service.batcher import INLINE_MAX_TOKENS, Batcher, StepJob
from cellstream.service.engine import Engine
from cellstream.service.errors import Aborted, DeadlineExceeded, ResourceExhausted, Unavailable
from cellstream.service.metrics import Metrics
from cellstream.service.sessions.base import SessionRecord, StateUpdates, new_session_id
from cellstream.service.sessions.memory import MemoryStore

MODEL = "tiny-chat"


class RecordingEngine:
    """The real engine, recording each batch's inputs; optionally held at a gate until released."""

    def __init__(self, engine: Engine, gated: bool = False) -> None:
        self.engine = engine
        self.spec = engine.spec
        self.glass_box = None  # plain steps only: no step here asks for gates
        self.batches: list[np.ndarray] = []
        self.gated = gated
        self.entered = threading.Event()
        self.release = threading.Event()

    def run(self, inputs: np.ndarray, h0: np.ndarray, c0: np.ndarray):
        self.batches.append(inputs.copy())
        if self.gated:
            self.entered.set()
            assert self.release.wait(30), "test never released the gate"
        return self.engine.run(inputs, h0, c0)


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> Engine:
    return Engine(tiny_model_dir / f"{MODEL}.onnx", intra_op_threads=1)


@pytest.fixture
async def rig(engine):
    """rig(gated, **batcher kwargs) -> (batcher, store, metrics, recording engine); closed afterwards."""
    made: list[Batcher] = []

    def _rig(gated: bool = False, max_batch_size: int = 256, max_queue_size: int = 1000,
             max_queue_wait: float | None = None):
        metrics = Metrics()
        store = MemoryStore(metrics, max_sessions=1000)
        recorder = RecordingEngine(engine, gated)
        # A gated engine blocks until the test releases it: it must never run on the event loop.
        batcher = Batcher(recorder, store, metrics, max_batch_size=max_batch_size, max_queue_size=max_queue_size,
                          max_queue_wait=max_queue_wait, inline_max_tokens=0 if gated else INLINE_MAX_TOKENS)
        made.append(batcher)
        return batcher, store, metrics, recorder

    yield _rig
    for batcher in made:
        batcher.engine.release.set()
        await asyncio.wait_for(batcher.close(), 30)


async def new_session(store: MemoryStore) -> SessionRecord:
    zeros = np.zeros((2, 16), np.float32)  # tiny-chat: 2 layers x 16 units
    return await store.create(SessionRecord(new_session_id(), MODEL, zeros, zeros.copy(), 0, 3600.0))


def job(record: SessionRecord, tokens: list[int], **kwargs) -> StepJob:
    return StepJob(record.session_id, np.array(tokens, np.int64), **kwargs)


async def enqueue(batcher: Batcher, jobs: list[StepJob]) -> list[asyncio.Task]:
    """Submit every job (in this order) without letting the batcher run yet."""
    tasks = [asyncio.create_task(batcher.submit(j)) for j in jobs]
    await asyncio.sleep(0)
    assert batcher.queued == len(jobs)
    return tasks


def dropped(metrics: Metrics, reason: str) -> float:
    value = metrics.registry.get_sample_value("cellstream_steps_dropped_total", {"model": MODEL, "reason": reason})
    return value or 0.0


def sample(metrics: Metrics, name: str) -> float:
    return metrics.registry.get_sample_value(name, {"model": MODEL}) or 0.0


async def test_one_step_per_session_per_batch_in_arrival_order(rig, ref, close):
    batcher, store, metrics, recorder = rig()
    a, b = await new_session(store), await new_session(store)
    jobs = [job(a, [1]), job(a, [2]), job(a, [3]), job(b, [4])]
    finished: list[int] = []
    for index, j in enumerate(jobs):
        j.future.add_done_callback(lambda _f, index=index: finished.append(index))
    tasks = await enqueue(batcher, jobs)
    batcher.start()
    results = await asyncio.wait_for(asyncio.gather(*tasks), 30)

    assert [r.position for r in results] == [1, 2, 3, 1]
    # A's steps finish in arrival order; B rides along with A's first step.
    assert [i for i in finished if i < 3] == [0, 1, 2]
    assert [batch.tolist() for batch in recorder.batches] == [[[1], [4]], [[2]], [[3]]]
    assert sample(metrics, "cellstream_batch_size_count") == 3
    assert sample(metrics, "cellstream_batch_size_sum") == 4
    assert sample(metrics, "cellstream_tokens_total") == 4

    for prefix, result in zip(([1], [1, 2], [1, 2, 3]), results[:3], strict=True):
        want, h, c = ref.run(MODEL, np.array(prefix))
        close(result.logits, want[-1:], f"logits after {prefix}")  # (T, V) of this step only
        close(result.h, h, f"h after {prefix}")
        close(result.c, c, f"c after {prefix}")
    want, h, _ = ref.run(MODEL, np.array([4]))
    close(results[3].logits, want, "B logits")
    record = await store.get(a.session_id)
    assert record.position == 3
    assert np.array_equal(record.h, results[2].h) and np.array_equal(record.c, results[2].c)


async def test_lengths_are_never_mixed(rig, ref, close):
    batcher, store, _, recorder = rig()
    sessions = [await new_session(store) for _ in range(5)]
    lengths = [2, 1, 2, 3, 1]
    rng = np.random.default_rng(0)
    token_lists = [rng.integers(0, 260, n).tolist() for n in lengths]
    tasks = await enqueue(batcher, [job(s, t) for s, t in zip(sessions, token_lists, strict=True)])
    batcher.start()
    results = await asyncio.wait_for(asyncio.gather(*tasks), 30)
    # The oldest waiting step picks the length: first T=2 (sessions 0, 2), then T=1 (1, 4), then T=3.
    assert [b.shape for b in recorder.batches] == [(2, 2), (2, 1), (1, 3)]
    assert [b.tolist() for b in recorder.batches] == [
        [token_lists[0], token_lists[2]],
        [token_lists[1], token_lists[4]],
        [token_lists[3]],
    ]
    for tokens, result in zip(token_lists, results, strict=True):
        want, h, c = ref.run(MODEL, np.array(tokens))
        assert result.position == len(tokens)
        close(result.logits, want, "logits")
        close(result.h, h, "h")
        close(result.c, c, "c")


async def test_max_batch_size_is_respected(rig):
    batcher, store, metrics, recorder = rig(max_batch_size=2)
    sessions = [await new_session(store) for _ in range(5)]
    tasks = await enqueue(batcher, [job(s, [i]) for i, s in enumerate(sessions)])
    batcher.start()
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    assert [b.tolist() for b in recorder.batches] == [[[0], [1]], [[2], [3]], [[4]]]
    assert sample(metrics, "cellstream_batch_size_sum") == 5


async def test_past_deadline_fails_and_changes_nothing(rig):
    batcher, store, metrics, recorder = rig()
    late, other = await new_session(store), await new_session(store)
    before_h, before_c = late.h.copy(), late.c.copy()
    now = asyncio.get_running_loop().time()
    tasks = await enqueue(batcher, [job(late, [1, 2], deadline=now - 0.001), job(other, [3, 4])])
    batcher.start()
    with pytest.raises(DeadlineExceeded, match="deadline passed"):
        await asyncio.wait_for(tasks[0], 30)
    assert (await asyncio.wait_for(tasks[1], 30)).position == 2
    assert [b.tolist() for b in recorder.batches] == [[[3, 4]]], "the late step was computed"
    record = await store.get(late.session_id)
    assert record.position == 0
    assert np.array_equal(record.h, before_h) and np.array_equal(record.c, before_c)
    assert dropped(metrics, "deadline") == 1
    assert sample(metrics, "cellstream_tokens_total") == 2


async def test_queue_full(rig):
    batcher, store, metrics, _ = rig(max_queue_size=2)
    sessions = [await new_session(store) for _ in range(3)]
    tasks = await enqueue(batcher, [job(sessions[0], [1]), job(sessions[1], [2])])
    with pytest.raises(ResourceExhausted, match="max_queue_size"):
        await asyncio.wait_for(batcher.submit(job(sessions[2], [3])), 5)
    assert dropped(metrics, "queue_full") == 1
    assert batcher.queued == 2
    batcher.start()
    assert [r.position for r in await asyncio.wait_for(asyncio.gather(*tasks), 30)] == [1, 1]
    assert (await store.get(sessions[2].session_id)).position == 0
    # With the queue drained, the refused session can step again.
    assert (await asyncio.wait_for(batcher.submit(job(sessions[2], [3])), 30)).position == 1


async def test_queue_wait_bound_refuses_at_once_and_drops_overdue_steps(rig):
    batcher, store, metrics, recorder = rig(gated=True, max_queue_wait=0.2)
    a, b, c = [await new_session(store) for _ in range(3)]
    running = await enqueue(batcher, [job(a, [1])])
    batcher.start()
    assert await asyncio.to_thread(recorder.entered.wait, 30), "the batch never started"
    waiting = asyncio.create_task(batcher.submit(job(b, [2])))  # queued behind the held batch
    await asyncio.sleep(0.3)

    # The oldest queued step waited past the bound: the queue is not draining, refuse without queueing.
    # At once: the refusal comes while the batch ahead is still held. A step that queued instead would
    # wait for the gate, which opens only below: wait_for would raise TimeoutError, not the refusal.
    with pytest.raises(ResourceExhausted, match="oldest queued step has waited"):
        await asyncio.wait_for(batcher.submit(job(c, [3])), 10)
    assert batcher.queued == 1

    recorder.release.set()
    assert (await asyncio.wait_for(running[0], 30)).position == 1
    with pytest.raises(ResourceExhausted, match=r"this step waited .* nothing was applied"):
        await asyncio.wait_for(waiting, 30)
    assert [batch.tolist() for batch in recorder.batches] == [[[1]]], "an overdue step was computed"
    assert (await store.get(b.session_id)).position == 0
    assert dropped(metrics, "queue_wait") == 2
    # Drained: steps are admitted again.
    assert (await asyncio.wait_for(batcher.submit(job(c, [3])), 30)).position == 1


async def test_cancelled_mid_batch(rig, ref, close):
    batcher, store, metrics, recorder = rig(gated=True)
    a, b, c = [await new_session(store) for _ in range(3)]
    tasks = await enqueue(batcher, [job(a, [1, 2]), job(b, [3, 4]), job(c, [5, 6])])
    batcher.start()
    assert await asyncio.to_thread(recorder.entered.wait, 30), "the batch never started"
    tasks[1].cancel()
    await asyncio.sleep(0)
    recorder.release.set()
    first, third = await asyncio.wait_for(asyncio.gather(tasks[0], tasks[2]), 30)
    with pytest.raises(asyncio.CancelledError):
        await tasks[1]
    assert first.position == third.position == 2
    assert [batch.shape for batch in recorder.batches] == [(3, 2)]
    record = await store.get(b.session_id)
    assert record.position == 0 and not record.h.any() and not record.c.any(), "cancelled state was applied"
    assert sample(metrics, "cellstream_tokens_total") == 4
    # B steps again from its untouched state.
    result = await asyncio.wait_for(batcher.submit(job(b, [3, 4])), 30)
    want, h, _ = ref.run(MODEL, np.array([3, 4]))
    assert result.position == 2
    close(result.logits, want, "logits")
    close(result.h, h, "h")


async def test_cancelled_while_queued_is_dropped(rig):
    batcher, store, metrics, recorder = rig()
    a, b = await new_session(store), await new_session(store)
    tasks = await enqueue(batcher, [job(a, [1]), job(a, [2]), job(b, [3])])
    tasks[0].cancel()
    await asyncio.sleep(0)
    batcher.start()
    second, other = await asyncio.wait_for(asyncio.gather(tasks[1], tasks[2]), 30)
    # The cancelled step never ran and holds nothing back: A's next step runs in the first batch.
    assert second.position == 1 and other.position == 1
    assert [batch.tolist() for batch in recorder.batches] == [[[2], [3]]]
    assert dropped(metrics, "cancelled") == 1


async def test_expected_position_and_concurrent_change(rig):
    batcher, store, _, recorder = rig(gated=True)
    a, b = await new_session(store), await new_session(store)
    recorder.release.set()
    batcher.start()
    with pytest.raises(Aborted, match="expected_position is 3"):
        await asyncio.wait_for(batcher.submit(job(a, [1], expected_position=3)), 30)
    assert (await store.get(a.session_id)).position == 0
    assert (await asyncio.wait_for(batcher.submit(job(a, [1], expected_position=0)), 30)).position == 1

    # Someone else commits to B while B's step is being computed: compare-and-set refuses the step.
    recorder.release.clear()
    recorder.entered.clear()
    task = asyncio.create_task(batcher.submit(job(b, [5, 6])))
    assert await asyncio.to_thread(recorder.entered.wait, 30)
    marker = np.full((2, 16), 0.25, np.float32)
    column = marker[:, None]  # (L, 1, H): one session's column
    assert await store.commit_many(StateUpdates([b.session_id], [0], [7], column, column)) == [True]
    recorder.release.set()
    with pytest.raises(Aborted, match="changed while this step ran"):
        await asyncio.wait_for(task, 30)
    record = await store.get(b.session_id)
    assert record.position == 7 and np.array_equal(record.h, marker)


async def test_closed_batcher_refuses(rig):
    batcher, store, _, _ = rig()
    a = await new_session(store)
    tasks = await enqueue(batcher, [job(a, [1])])
    await asyncio.wait_for(batcher.close(), 30)
    with pytest.raises(Unavailable):
        await asyncio.wait_for(tasks[0], 5)
    with pytest.raises(Unavailable, match="shutting down"):
        await asyncio.wait_for(batcher.submit(job(a, [1])), 5)
    assert (await store.get(a.session_id)).position == 0


async def test_close_mid_batch_fails_the_running_steps(rig):
    batcher, store, _, recorder = rig(gated=True)
    a = await new_session(store)
    tasks = await enqueue(batcher, [job(a, [1])])
    batcher.start()
    assert await asyncio.to_thread(recorder.entered.wait, 30), "the batch never started"
    # close() must neither hang on the held compute nor leave its caller waiting forever.
    await asyncio.wait_for(batcher.close(), 5)
    with pytest.raises(Unavailable, match="while this step ran"):
        await asyncio.wait_for(tasks[0], 5)
    recorder.release.set()
    assert (await store.get(a.session_id)).position == 0


async def test_a_batch_waits_for_sessions_that_stepped_recently_and_never_for_a_lone_one(rig, monkeypatch):
    """A session that just stepped is expected back: a batch waits for it (at most its patience), so
    per-request steps of many sessions share batches; a lone session, one known to be done for now, or one
    idle for ACTIVE_SECONDS, is never waited for."""
    import cellstream.service.batcher as batcher_module

    monkeypatch.setattr(batcher_module, "PATIENCE_MIN_SECONDS", 5.0)  # a wait that could only end by an arrival
    monkeypatch.setattr(batcher_module, "PATIENCE_MAX_SECONDS", 5.0)
    batcher, store, _, recorder = rig()
    a, b = await new_session(store), await new_session(store)
    batcher.start()
    for token in (1, 2):  # alone: never waited for, each answered well within the 5 s patience
        await asyncio.wait_for(batcher.submit(job(a, [token])), 1)
    b_step = asyncio.create_task(batcher.submit(job(b, [3])))
    await asyncio.sleep(0.05)
    assert not b_step.done(), "b's step was taken alone although a stepped a moment ago"
    a_step = asyncio.create_task(batcher.submit(job(a, [4])))
    await asyncio.wait_for(asyncio.gather(b_step, a_step), 1)
    assert [inputs.tolist() for inputs in recorder.batches] == [[[1]], [[2]], [[3], [4]]]  # b waited for a
    now = asyncio.get_running_loop().time()
    assert batcher._expected(now) == 2  # both stepped, none queued
    batcher.forget(a.session_id)  # a's turn ended (or it closed): not waited for
    assert batcher._expected(now) == 1
    assert batcher._expected(now + batcher_module.ACTIVE_SECONDS + 1) == 0  # idle sessions drop out
