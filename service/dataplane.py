"""The shared core both APIs call: validate inputs, manage sessions, run steps through the batcher.

Servicers only convert protobuf to the arguments here and results back; every rule lives here once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from cellstream.service.auth import current_principal
from cellstream.service.batcher import Batcher, StepGroup, StepInputs, StepJob, StepResult
from cellstream.service.config import Settings
from cellstream.service.engine import FEATURES, TOKENS, ModelRegistry, ModelSpec
from cellstream.service.errors import CellstreamError, FailedPrecondition, InvalidArgument, NotFound, session_not_found
from cellstream.service.gates import HOW_TO_EXPORT
from cellstream.service.metrics import Metrics
from cellstream.service.sessions.base import SessionRecord, SessionStore, new_session_id
from cellstream.service.sessions.watch import StoreWatch
from cellstream.service.textcodec import StreamDecoder, encode_text

if TYPE_CHECKING:
    from cellstream.service.telemetry import Telemetry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InitialState:
    """A client-supplied state: layer-major flat h and c, and the position it stands for."""

    model: str
    num_layers: int
    hidden_size: int
    h: Sequence[float]
    c: Sequence[float]
    position: int


@dataclass(frozen=True)
class StepOutcome:
    spec: ModelSpec
    result: StepResult


@dataclass(frozen=True)
class GeneratedChunk:
    text: str
    tokens: list[int]
    position: int
    finish_reason: str = ""  # set on the last chunk
    gates: np.ndarray | None = None  # (T, 6, L, H) of the steps fed since the previous chunk, if asked


MAX_ID_CHARS = 1024  # session ids (KServe's: prefix + 256) and model names; short enough to echo
FLOAT_BYTES = 4
GATE_BYTES_PER_UNIT = 6 * FLOAT_BYTES  # six float32 gates per unit, layer and step
REPLY_FRAMING_BYTES = 4096  # a reply's ids, names, shapes and field tags, beside what check_reply counts


class DataPlane:
    def __init__(self, settings: Settings, registry: ModelRegistry, store: SessionStore, metrics: Metrics,
                 tracing: Telemetry | None = None) -> None:
        self.settings = settings
        self.registry = registry
        self.store = store
        self.metrics = metrics
        self.tracing = tracing  # on: request spans name their session (the batchers add model and tokens)
        self.batchers = {
            name: Batcher(engine, store, metrics, max_batch_size=settings.max_batch_size,
                          max_queue_size=settings.max_queue_size, max_queue_wait=settings.max_queue_wait_ms / 1000,
                          tracing=tracing)
            for name, engine in registry.engines.items()
        }
        self._sweeper: asyncio.Task[None] | None = None
        self._watch: StoreWatch | None = None
        self._stateless_ids = itertools.count()  # unique batcher ids for steps that have no session

    async def start(self) -> None:
        for batcher in self.batchers.values():
            batcher.start()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever(), name="session-sweeper")

    async def watch_store(self, on_change: Callable[[bool], Awaitable[None]]) -> None:
        """Report the store's reachability to `on_change` now and whenever it flips (health follows it)."""
        self._watch = StoreWatch(self.store, self.settings.store_probe_interval_seconds, on_change)
        await self._watch.start()

    async def close(self) -> None:
        if self._watch is not None:
            await self._watch.stop()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for batcher in self.batchers.values():
            await batcher.close()
        await self.store.close()

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_interval_seconds)
            # A shared store can be down or full for a while: the store watch reports it, the sweeper retries.
            try:
                await self.store.sweep()
            except CellstreamError as exc:
                log.warning("session sweep skipped: %s", exc.message)

    # --- models -------------------------------------------------------------------------------

    def spec(self, model: str) -> ModelSpec:
        """The spec of a requested model ('' = default); NotFound names the models served."""
        if len(model) > MAX_ID_CHARS:
            raise InvalidArgument(f"model name has {len(model)} characters; model names have at most {MAX_ID_CHARS}")
        try:
            return self.registry.engines[self.registry.resolve(model)].spec
        except KeyError:
            raise NotFound(f"model {model!r} is not served; models: {sorted(self.registry.engines)}") from None

    # --- input validation ---------------------------------------------------------------------

    def _check_length(self, steps: int, field: str) -> None:
        if steps == 0:
            raise InvalidArgument(f"{field} is empty; send at least one token or feature vector")
        limit = self.settings.max_tokens_per_request
        if steps > limit:
            raise InvalidArgument(f"{field} has {steps} steps, more than max_tokens_per_request ({limit})")

    def tokens_input(self, spec: ModelSpec, ids: Sequence[int] | np.ndarray, field: str = "tokens") -> list[int]:
        """The validated ids as a list: the batcher makes one array for its whole batch (an array per step
        would cost more than the rest of the step's validation)."""
        if spec.input_kind != TOKENS:
            raise InvalidArgument(f"model {spec.name!r} takes features ({spec.feature_size} floats per step), "
                                  f"not {field}")
        # Checked as Python ints: numpy's per-call overhead is most of the cost of a 1-token step. A slice,
        # not list(): a protobuf repeated field slices into a list at half the cost of iterating it.
        values = ids.reshape(-1).tolist() if isinstance(ids, np.ndarray) else ids[:]
        count, vocab = len(values), spec.vocab_size
        if not 0 < count <= self.settings.max_tokens_per_request:  # the call only when it raises
            self._check_length(count, field)
        # One token (most streamed steps) is checked without min() and max(), half the cost of this check.
        if (not 0 <= values[0] < vocab) if count == 1 else (min(values) < 0 or max(values) >= vocab):
            k, token = next((k, t) for k, t in enumerate(values) if not 0 <= t < vocab)
            raise InvalidArgument(f"{field}[{k}] = {token} is outside the vocabulary "
                                  f"[0, {vocab}) of model {spec.name!r}")
        return values

    def text_input(self, spec: ModelSpec, text: str, field: str = "text") -> list[int]:
        if not spec.accepts_text:
            raise InvalidArgument(f"model {spec.name!r} has no byte tokenizer ({spec.input_kind} input); "
                                  f"send {'tokens' if spec.input_kind == TOKENS else 'features'} instead of {field}")
        return self.tokens_input(spec, encode_text(text), field)

    def features_input(
        self, spec: ModelSpec, values: Sequence[float] | np.ndarray, dim: int, field: str = "features"
    ) -> np.ndarray:
        if spec.input_kind != FEATURES:
            raise InvalidArgument(f"model {spec.name!r} takes tokens, not {field}")
        if dim != spec.feature_size:
            raise InvalidArgument(f"{field}.dim is {dim} but model {spec.name!r} takes {spec.feature_size} "
                                  "features per step")
        array = np.asarray(values, dtype=np.float32).reshape(-1)
        if len(array) % dim:
            raise InvalidArgument(f"{field}.values has {len(array)} floats, not a multiple of dim {dim}")
        self._check_length(len(array) // dim, f"{field}.values")
        finite = np.isfinite(array)
        if not finite.all():
            k = int(np.flatnonzero(~finite)[0])
            raise InvalidArgument(f"{field}.values[{k}] is {array[k]}; features must be finite (no NaN or Inf)")
        return array.reshape(-1, dim)

    def _ttl(self, ttl_seconds: float, field: str = "ttl_seconds") -> float:
        if ttl_seconds == 0:
            return self.settings.session_ttl_seconds
        limit = self.settings.max_session_ttl_seconds
        if not 0 < ttl_seconds <= limit:
            raise InvalidArgument(f"{field} is {ttl_seconds}; it must be in (0, {limit:g}] (max_session_ttl_seconds)")
        return float(ttl_seconds)

    def _initial_arrays(self, spec: ModelSpec, state: InitialState) -> tuple[np.ndarray, np.ndarray]:
        if state.model and state.model != spec.name:
            raise InvalidArgument(f"initial_state.model is {state.model!r} but the session is for {spec.name!r}")
        if (state.num_layers, state.hidden_size) != spec.state_shape:
            raise InvalidArgument(
                f"initial_state is {state.num_layers} layers x {state.hidden_size} units but model {spec.name!r} "
                f"has {spec.num_layers} x {spec.hidden_size}"
            )
        arrays = []
        for name, values in (("h", state.h), ("c", state.c)):
            array = np.asarray(values, dtype=np.float32)
            size = spec.num_layers * spec.hidden_size
            if array.size != size:
                raise InvalidArgument(f"initial_state.{name} has {array.size} floats; expected {size} "
                                      f"(num_layers * hidden_size, layer-major)")
            if not np.isfinite(array).all():
                raise InvalidArgument(f"initial_state.{name} has NaN or Inf values")
            arrays.append(array.reshape(spec.state_shape).copy())
        return arrays[0], arrays[1]

    def check_gates(self, model: str, steps: int) -> None:
        """FailedPrecondition if `model` has no glass-box graph; InvalidArgument past max_gate_steps."""
        if self.registry.engines[model].glass_box is None:
            raise FailedPrecondition(f"model {model!r} is served without a glass-box graph, so it has no gates to "
                                     f"show; {HOW_TO_EXPORT}")
        limit = self.settings.max_gate_steps
        if steps > limit:
            raise InvalidArgument(f"gates were asked for {steps} steps, more than max_gate_steps ({limit}); "
                                  "ask for gates on shorter requests (the state carries over between them)")

    def check_reply(self, spec: ModelSpec, steps: int, *, all_steps: bool = False, gates: bool = False,
                    fixed_bytes: int = 0) -> None:
        """InvalidArgument when the outputs asked for `steps` steps (every step's output, gates), beside
        `fixed_bytes` of others, would not fit in one gRPC message of max_message_bytes. The gRPC faces check it
        before the step: a reply too large to send would fail after the state had moved. (HTTP replies have no
        such bound.)"""
        step_bytes = (FLOAT_BYTES * spec.vocab_size if all_steps else 0) + (
            GATE_BYTES_PER_UNIT * spec.num_layers * spec.hidden_size if gates else 0)
        limit = self.settings.max_message_bytes
        fitting = max(limit - REPLY_FRAMING_BYTES - fixed_bytes, 0) // step_bytes if step_bytes else steps
        if steps > fitting:
            what = " and ".join(name for name, asked in (("every step's output", all_steps), ("gates", gates))
                                if asked)
            raise InvalidArgument(
                f"{what} of {steps} steps of model {spec.name!r} ({step_bytes} bytes a step) would exceed "
                f"max_message_bytes ({limit}): at most {fitting} steps per request (the state carries over between "
                "requests)")

    # --- sessions -----------------------------------------------------------------------------

    async def open_session(self, model: str, ttl_seconds: float = 0, initial: InitialState | None = None
                           ) -> SessionRecord:
        """A new session owned by the calling principal."""
        spec = self.spec(model)
        ttl = self._ttl(ttl_seconds)
        if initial is not None:
            h, c = self._initial_arrays(spec, initial)
            position = initial.position
        else:
            h = np.zeros(spec.state_shape, np.float32)
            c = np.zeros(spec.state_shape, np.float32)
            position = 0
        record = SessionRecord(new_session_id(), spec.name, h, c, position, ttl, current_principal())
        if self.tracing is not None:
            self.tracing.annotate(record.session_id, record.model)
        return await self.store.create(record)

    @staticmethod
    def check_session_id(session_id: str) -> None:
        """InvalidArgument for an id no session can have (empty, or too long to echo)."""
        if not session_id:
            raise InvalidArgument("session_id is empty; open a session first (OpenSession)")
        if len(session_id) > MAX_ID_CHARS:
            raise InvalidArgument(f"session_id has {len(session_id)} characters; session ids have at most "
                                  f"{MAX_ID_CHARS}")

    async def session(self, session_id: str) -> SessionRecord:
        """The caller's live session. Another principal's is NotFound, word for word like a missing one,
        so an id reveals nothing about sessions that are not the caller's."""
        self.check_session_id(session_id)
        record = await self.store.get(session_id)
        if record.owner != current_principal():
            raise session_not_found(session_id)
        if self.tracing is not None:
            self.tracing.annotate(session_id, record.model)
        return record

    async def sessions(self, session_ids: Sequence[str]) -> list[SessionRecord | CellstreamError]:
        """Each id's live session, in one store round trip, or the error `session(id)` would raise."""
        refused: dict[int, CellstreamError] = {}
        for k, session_id in enumerate(session_ids):
            try:
                self.check_session_id(session_id)
            except InvalidArgument as exc:
                refused[k] = exc
        wanted = [session_id for k, session_id in enumerate(session_ids) if k not in refused]
        records = iter(await self.store.load_many(wanted) if wanted else [])
        principal = current_principal()
        found: list[SessionRecord | CellstreamError] = []
        for k, session_id in enumerate(session_ids):
            if k in refused:
                found.append(refused[k])
                continue
            record = next(records)
            found.append(record if record is not None and record.owner == principal else session_not_found(session_id))
        return found

    async def fork(self, session_id: str, ttl_seconds: float = 0) -> SessionRecord:
        source = await self.session(session_id)
        ttl = self._ttl(ttl_seconds)
        copy = SessionRecord(new_session_id(), source.model, source.h, source.c, source.position, ttl, source.owner)
        return await self.store.create(copy)

    async def close_session(self, session_id: str) -> SessionRecord:
        await self.session(session_id)
        record = await self.store.delete(session_id)
        self.batchers[record.model].forget(session_id)
        self.metrics.sessions_closed.inc()
        return record

    # --- steps --------------------------------------------------------------------------------

    async def step(
        self, record: SessionRecord, inputs: StepInputs, *, expected_position: int | None = None,
        timeout: float | None = None, gates: bool = False,
    ) -> StepResult:
        """Feed validated `inputs` to the session and wait for the new state and logits (and the gates of
        every step, if asked)."""
        job = StepJob(record.session_id, inputs, expected_position, deadline_after(timeout))
        if gates:
            self.check_gates(record.model, len(inputs))
            job.gates = True
        return await self.batchers[record.model].submit(job)

    def start_group(self, model: str, group: StepGroup) -> CellstreamError | None:
        """Queue validated steps of sessions of `model` without waiting (multiplexed calls); the error refusing
        some or all of them (queue full, shutting down), if any: see Batcher.enqueue_group.

        A step's session is checked when its batch loads it (with the group's owner, that it is the
        owner's): NotFound then, word for word session()'s.
        """
        return self.batchers[model].enqueue_group(group)

    @property
    def only_spec(self) -> ModelSpec | None:
        """The spec of the one model served, if there is only one: every session is of that model."""
        engines = self.registry.engines
        return next(iter(engines.values())).spec if len(engines) == 1 else None

    async def step_stateless(
        self, model: str, inputs: Sequence[StepInputs], h: np.ndarray, c: np.ndarray, *, timeout: float | None = None
    ) -> list[StepResult]:
        """Run each row of validated `inputs` (B rows of T steps) from its client-held state h, c (L, B, H).

        The rows go through the model's batcher like any session's step, so they batch with other
        traffic and honour the queue limit and deadlines, but nothing is loaded or stored. Results
        come in row order; their positions are T.
        """
        deadline = deadline_after(timeout)
        jobs = [
            StepJob(f"stateless/{next(self._stateless_ids)}", row, deadline=deadline, state=(h[:, b], c[:, b]))
            for b, row in enumerate(inputs)
        ]
        batcher = self.batchers[model]
        try:
            return list(await asyncio.gather(*(batcher.submit(job) for job in jobs)))
        finally:
            for job in jobs:  # when one row failed, the request failed: the others need no compute
                job.future.cancel()

    async def generate(
        self,
        record: SessionRecord,
        prompt: list[int],
        *,
        max_tokens: int,
        temperature: float,
        top_k: int,
        seed: int | None,
        stop: Sequence[str],
        timeout: float | None = None,
        gates: bool = False,
        reply_limited: bool = False,
    ) -> AsyncIterator[GeneratedChunk]:
        """Feed the prompt, then sample and feed one token at a time, yielding text as it completes (with the
        gates of every step fed since the previous chunk, if asked; `reply_limited`: each chunk must fit in a
        gRPC message)."""
        spec = self.registry.engines[record.model].spec
        limit = self.settings.max_generate_tokens
        if max_tokens == 0:
            max_tokens = limit
        if max_tokens > limit:
            raise InvalidArgument(f"max_tokens is {max_tokens}, more than max_generate_tokens ({limit})")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise InvalidArgument(f"temperature is {temperature}; it must be a finite number >= 0 (0: greedy)")
        if top_k > spec.vocab_size:
            raise InvalidArgument(f"top_k is {top_k}, more than the vocabulary size {spec.vocab_size}")
        if any(not s for s in stop):
            raise InvalidArgument("stop has an empty string; every stop sequence needs at least one character")
        if gates:
            self.check_gates(record.model, len(prompt))
            if reply_limited:  # the first chunk carries the prompt's gates
                self.check_reply(spec, len(prompt), gates=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        rng = np.random.default_rng(seed)
        end_tokens = spec.end_tokens()
        decoder = StreamDecoder()
        reply = ""
        result = await self.step(record, prompt, timeout=timeout, gates=gates)
        pending: list[int] = []
        pending_gates = [result.gates] if gates else []
        for count in range(1, max_tokens + 1):
            token = sample_token(result.logits[-1], temperature, top_k, rng)
            remaining = None if deadline is None else deadline - time.monotonic()
            result = await self.step(record, [token], timeout=remaining, gates=gates)
            pending.append(token)
            if gates:
                pending_gates.append(result.gates)
            text = decoder.feed([token])
            reply += text
            finish = ""
            if token in end_tokens:
                finish = "end_token"
            elif any(reply.endswith(s) for s in stop):
                finish = "stop"
            elif count == max_tokens:
                finish = "length"
            if finish:
                # The turn is over: the next step of this session waits for its user, not a batch for it.
                self.batchers[record.model].forget(record.session_id)
                yield GeneratedChunk(text + decoder.flush(), pending, result.position, finish, joined(pending_gates))
                return
            if text:
                yield GeneratedChunk(text, pending, result.position, gates=joined(pending_gates))
                pending = []
                pending_gates = []


def joined(gates: list[np.ndarray | None]) -> np.ndarray | None:
    """Steps' gates (T_k, 6, L, H) one after another, or None when none were asked for."""
    return np.concatenate([g for g in gates if g is not None]) if gates else None


def deadline_after(timeout: float | None) -> float | None:
    """The event loop's time `timeout` seconds from now (the batcher's clock), None for no deadline."""
    return None if timeout is None else asyncio.get_running_loop().time() + timeout


def sample_token(logits: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator) -> int:
    """Greedy at temperature 0; else a draw from softmax(logits / T), limited to the top_k when > 0."""
    if temperature == 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature
    if 0 < top_k < len(scaled):
        cutoff = np.partition(scaled, -top_k)[-top_k]
        scaled = np.where(scaled >= cutoff, scaled, -np.inf)
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    return int(rng.choice(len(probs), p=probs))
