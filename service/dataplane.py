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

from cellstream.service.auth import ADMIN, current_principal, require_scope
from cellstream.service.batcher import StepGroup, StepInputs, StepJob, StepResult
from cellstream.service.config import EXPLICIT, Settings
from cellstream.service.engine import FEATURES, TOKENS, ModelSpec
from cellstream.service.errors import CellstreamError, FailedPrecondition, InvalidArgument, session_not_found
from cellstream.service.gates import HOW_TO_EXPORT
from cellstream.service.metrics import Metrics
from cellstream.service.model_control import Change, IndexEntry, Loaded, ModelControl
from cellstream.service.registry import DRAINING, READY, ModelRegistry, ModelVersion
from cellstream.service.sessions.base import SessionRecord, SessionStore, new_session_id
from cellstream.service.sessions.watch import StoreWatch
from cellstream.service.textcodec import StreamDecoder, encode_text
from cellstream.service.versions import describe

if TYPE_CHECKING:
    from cellstream.service.telemetry import Telemetry

log = logging.getLogger(__name__)
audit_log = logging.getLogger("cellstream.audit")  # who changed which model, and how it went


@dataclass(frozen=True)
class InitialState:
    """A client-supplied state: layer-major flat h and c, and the position it stands for."""

    model: str
    num_layers: int
    hidden_size: int
    h: Sequence[float]
    c: Sequence[float]
    position: int
    version: int = 0  # of the model it was taken from; 0: not said


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
MODEL_CONTROL_OFF = {
    "none": "model_control is 'none': the models of model_dir were loaded at start-up and stay as they are; start "
            "the server with --model-control explicit to load and unload models with these calls (or poll to have "
            "it follow model_dir)",
    "poll": "model_control is 'poll': the server follows model_dir by itself (every model_poll_interval_seconds); "
            "start it with --model-control explicit to load and unload models with these calls instead",
}


class DataPlane:
    def __init__(self, settings: Settings, loaded: list[Loaded], store: SessionStore, metrics: Metrics,
                 tracing: Telemetry | None = None) -> None:
        self.settings = settings
        self.registry = ModelRegistry(settings.default_model, settings.default_versions)
        self.store = store
        self.metrics = metrics
        self.tracing = tracing  # on: request spans name their session (the batchers add model and tokens)
        self.control = ModelControl(settings, self.registry, store, metrics, tracing)
        self.control.serve(loaded)
        # By version key; the registry's own dicts, changed in place as versions are loaded and released.
        self.batchers = self.registry.batchers
        self._versions = self.registry.versions
        self._sweeper: asyncio.Task[None] | None = None
        self._watch: StoreWatch | None = None
        self._stateless_ids = itertools.count()  # unique batcher ids for steps that have no session

    async def start(self) -> None:
        self.control.start()
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
        await self.control.close()
        await self.store.close()

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_interval_seconds)
            # A shared store can be down or full for a while: the store watch reports it, the sweeper retries.
            try:
                await self.store.sweep()
            except CellstreamError as exc:
                log.warning("session sweep skipped: %s", exc.message)
                continue
            await self.control.check_drains()

    # --- models -------------------------------------------------------------------------------

    @staticmethod
    def _check_model_name(model: str) -> None:
        if len(model) > MAX_ID_CHARS:
            raise InvalidArgument(f"model name has {len(model)} characters; model names have at most {MAX_ID_CHARS}")

    def spec(self, model: str, version: int = 0) -> ModelSpec:
        """The spec of the version new work on a model ('' = default) goes to: `version`, or (0) the model's
        default version; NotFound names the models served, FailedPrecondition a draining version."""
        self._check_model_name(model)
        return self.registry.resolve(model, version).spec

    def loaded_spec(self, model: str, version: int = 0) -> ModelSpec:
        """Like `spec`, but a version named explicitly may be draining (its metadata still describes its sessions)."""
        self._check_model_name(model)
        return (self.registry.find(model, version) if version else self.registry.resolve(model)).spec

    def model_name(self, model: str) -> str:
        """The model a request means ('' = default), if any version of it is loaded (NotFound otherwise)."""
        if len(model) > MAX_ID_CHARS:  # the call only when it raises: every sequence step asks this
            self._check_model_name(model)
        return self.registry.name(model)

    def pinned(self, record: SessionRecord) -> ModelSpec:
        """The spec of the version the session is pinned to; FailedPrecondition when this server does not serve it."""
        version = self._versions.get(record.model)
        if version is None:
            raise self.registry.pinned_elsewhere(record.session_id, record.model)
        return version.spec

    async def model_versions(self) -> list[tuple[ModelVersion, int]]:
        """Every loaded version with its live sessions (counted now; with a store that cannot be reached, as at the
        last count), by model and version."""
        with contextlib.suppress(CellstreamError):
            await self.control.count()
        return [(version, self.control.live_sessions(version.key))
                for name in self.registry.names for version in self.registry.of(name)]

    # --- the model repository (admin scope) ---------------------------------------------------

    async def load_model(self, model: str) -> Change:
        """Load (or reload) a model's versions from model_dir: explicit model control, admin scope."""
        return await self._repository_call("load", model, self.control.load)

    async def unload_model(self, model: str) -> Change:
        """Unload every version of a model (those with live sessions drain): explicit model control, admin scope."""
        return await self._repository_call("unload", model, self.control.unload)

    async def repository_index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every version in model_dir or loaded, with its state and live sessions (admin scope)."""
        try:
            require_scope(ADMIN, "the model repository index")
            entries = await self.control.index()
        except CellstreamError as exc:
            self._audit("index", "", f"refused, {exc.code.name}: {exc.message}")
            raise
        return [e for e in entries if e.state == READY] if ready_only else entries

    async def _repository_call(self, action: str, model: str, call: Callable[[str], Awaitable[Change]]) -> Change:
        try:
            require_scope(ADMIN, f"{action}ing models")
            if self.settings.model_control != EXPLICIT:
                raise FailedPrecondition(MODEL_CONTROL_OFF[self.settings.model_control])
            if not model:
                raise InvalidArgument(f"no model named: name the model to {action}")
            self._check_model_name(model)
            change = await call(model)
        except CellstreamError as exc:
            self._audit(action, model, f"refused, {exc.code.name}: {exc.message}")
            raise
        self._audit(action, model, f"OK: {change}")
        return change

    @staticmethod
    def _audit(action: str, model: str, outcome: str) -> None:
        who = current_principal() or "anonymous (no auth_token_file)"
        audit_log.info("repository %s%s by %s: %s", action, f" {model!r}" if model else "", who, outcome)

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
        if state.version and state.version != spec.version:
            raise InvalidArgument(f"initial_state.model_version is {state.version} but the session is for version "
                                  f"{spec.version} of {spec.name!r}: a state belongs to the weights that made it")
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

    def check_gates(self, key: str, steps: int) -> None:
        """FailedPrecondition if the model version `key` has no glass-box graph; InvalidArgument past
        max_gate_steps."""
        version = self._versions[key]
        if version.engine.glass_box is None:
            what = f"model {version.name!r}" if version.version == 1 else describe(key)
            raise FailedPrecondition(f"{what} is served without a glass-box graph, so it has no gates to "
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

    async def open_session(self, model: str, ttl_seconds: float = 0, initial: InitialState | None = None,
                           version: int = 0) -> SessionRecord:
        """A new session owned by the calling principal, pinned to `version` of `model` (0: its default version)."""
        spec = self.spec(model, version)
        ttl = self._ttl(ttl_seconds)
        if initial is not None:
            h, c = self._initial_arrays(spec, initial)
            position = initial.position
        else:
            h = np.zeros(spec.state_shape, np.float32)
            c = np.zeros(spec.state_shape, np.float32)
            position = 0
        record = SessionRecord(new_session_id(), spec.key, h, c, position, ttl, current_principal())
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
        """A copy of the session, pinned to the same model version (which must take new sessions)."""
        source = await self.session(session_id)
        self.pinned(source)
        if self._versions[source.model].state == DRAINING:
            raise FailedPrecondition(f"session {session_id!r} is pinned to {describe(source.model)}, which is "
                                     "draining: it takes no new session, forks included (the session itself goes on)")
        ttl = self._ttl(ttl_seconds)
        copy = SessionRecord(new_session_id(), source.model, source.h, source.c, source.position, ttl, source.owner)
        return await self.store.create(copy)

    async def close_session(self, session_id: str) -> SessionRecord:
        await self.session(session_id)
        record = await self.store.delete(session_id)
        version = self._versions.get(record.model)
        if version is not None:
            version.batcher.forget(session_id)
        self.metrics.sessions_closed.inc()
        if version is not None and version.state == DRAINING:  # perhaps its last session: released now if so
            await self.control.check_drains()
        return record

    # --- steps --------------------------------------------------------------------------------

    async def step(
        self, record: SessionRecord, inputs: StepInputs, *, expected_position: int | None = None,
        timeout: float | None = None, gates: bool = False,
    ) -> StepResult:
        """Feed validated `inputs` to the session and wait for the new state and logits (and the gates of
        every step, if asked)."""
        batcher = self.batchers.get(record.model)  # the version the session is pinned to
        if batcher is None:
            raise self.registry.pinned_elsewhere(record.session_id, record.model)
        job = StepJob(record.session_id, inputs, expected_position, deadline_after(timeout))
        if gates:
            self.check_gates(record.model, len(inputs))
            job.gates = True
        return await batcher.submit(job)

    def start_group(self, key: str, group: StepGroup) -> CellstreamError | None:
        """Queue validated steps of sessions of model version `key` without waiting (multiplexed calls); the error
        refusing some or all of them (queue full, shutting down, the version released), if any: see
        Batcher.enqueue_group.

        A step's session is checked when its batch loads it (with the group's owner, that it is the
        owner's, and that it is pinned to this version): NotFound then, word for word session()'s.
        """
        batcher = self.batchers.get(key)
        if batcher is None:  # released since the call learnt its sessions' version
            del group.session_ids[:], group.inputs[:]
            return FailedPrecondition(f"{describe(key)} is not served any more (unloaded and released); nothing "
                                      "was applied")
        return batcher.enqueue_group(group)

    @property
    def only_spec(self) -> ModelSpec | None:
        """The spec of the one model version loaded, if there is only one. Every session is probably of that
        version: its batcher refuses those that are not."""
        return self.registry.only_spec

    async def step_stateless(
        self, key: str, inputs: Sequence[StepInputs], h: np.ndarray, c: np.ndarray, *, timeout: float | None = None
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
        batcher = self.batchers[key]  # just resolved by the caller (spec), with no await since
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
        spec = self.pinned(record)
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
                batcher = self.batchers.get(record.model)
                if batcher is not None:
                    batcher.forget(record.session_id)
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
