"""Model versions loaded and unloaded while the server runs (model_control), as Triton does it, except that a
version with live sessions drains instead of dropping them.

- `load(name)` reads NAME's versions from the repository (repository.py) and serves those version_policy keeps:
  new ones are loaded (each checked with the engine's contract and glass-box checks, in a worker thread: the
  event loop keeps serving), draining ones are ready again, and loaded ones no longer there are unloaded. A
  version that fails its checks fails the whole call, and nothing served changes.
- `unload(name)` unloads every version of NAME.
- Unloading a version drains it: no new session or stateless call, the sessions pinned to it go on until they
  close or expire. A count of its live sessions taken after the drain began that finds none releases it: its
  batcher stops and its onnxruntime sessions are freed. Counts are taken after each sweep, after a repository
  call, and when a session of a draining version closes.
- A loaded version is never replaced: its sessions must keep the weights they started with. New weights go in
  a new version directory (a changed file of a loaded version is logged and left alone).
- `poll` mode re-reads the whole directory every model_poll_interval_seconds and follows it; a version that
  failed its checks is tried again once its file changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cellstream.service import repository
from cellstream.service.batcher import Batcher
from cellstream.service.config import EVERY_MODEL, Settings
from cellstream.service.engine import Engine, ModelSpec
from cellstream.service.errors import CellstreamError, FailedPrecondition, ModelLoadError, NotFound
from cellstream.service.metrics import Metrics
from cellstream.service.registry import DRAINING, FALLBACK_DEFAULT, READY, UNAVAILABLE, ModelRegistry, ModelVersion
from cellstream.service.sessions.base import SessionStore
from cellstream.service.versions import describe, version_key

if TYPE_CHECKING:
    from cellstream.service.telemetry import Telemetry

log = logging.getLogger(__name__)

Loaded = tuple[Engine, tuple[int, int]]  # an engine and its file's stamp when it was read


@dataclass(frozen=True)
class IndexEntry:
    """One version in the repository index (Triton's RepositoryIndex, with the live sessions in the reason)."""

    name: str
    version: int | None  # None: the model has no version that can be read
    state: str  # READY, DRAINING or UNAVAILABLE
    reason: str


@dataclass(frozen=True)
class Change:
    """What a load or unload did to one model: the versions in each outcome."""

    name: str
    loaded: tuple[int, ...] = ()
    ready_again: tuple[int, ...] = ()
    draining: tuple[int, ...] = ()
    released: tuple[int, ...] = ()

    def __str__(self) -> str:
        done = [f"{what} {', '.join(map(str, versions))}" for what, versions in (
            ("loaded", self.loaded), ("ready again", self.ready_again), ("draining", self.draining),
            ("released", self.released)) if versions]
        return "; ".join(done) or "nothing to change"


def read_versions(directory: Path, names: list[str] | None, policy: str, intra_op_threads: int) -> list[Loaded]:
    """The engines of every model of `directory` (or of `names` only), as start-up loads them: ModelLoadError when
    any cannot be served (blocking: run it in a worker thread)."""
    loaded: list[Loaded] = []
    for model in _startup_models(directory, names).values():
        loaded += build(model, policy, intra_op_threads)
    return loaded


def _startup_models(directory: Path, names: list[str] | None) -> dict[str, repository.ModelFiles]:
    """The models of `directory` start-up loads (all, or `names`), by name; ModelLoadError for a missing directory
    or a name it does not hold. Reads the directory only: no graph is loaded."""
    if not directory.is_dir():
        raise ModelLoadError(f"model directory not found: {directory}")
    found = repository.scan(directory)
    missing = sorted(set(names or ()) - set(found))
    if missing:
        raise ModelLoadError(f"load_model names {missing}, which {directory} does not hold (its models: "
                             f"{sorted(found)})")
    return {name: found[name] for name in sorted(found if names is None else names)}


def check_before_binding(settings: Settings) -> None:
    """What start-up can tell from model_dir's listing alone, checked before the server binds any port: the
    directory, the models start-up loads, and the default model among them (ModelLoadError says which setting
    to change). Loading the graphs, which takes longer, comes after binding (health answers NOT_SERVING meanwhile)."""
    names = startup_names(settings)
    models = list(_startup_models(settings.model_dir, names))
    if not models:
        if settings.model_control == "none":
            raise ModelLoadError(f"no .onnx models in {settings.model_dir} (NAME.onnx, or NAME/<version>/model.onnx)")
        return  # explicit control loading none at start-up, or polling an empty directory: models come later
    where = f"in {settings.model_dir}" if names is None else "named by load_model"
    default_model(models, settings.default_model, where)


def default_model(names: list[str], default: str, where: str) -> str:
    """The model a request that names none gets at start-up: `default` if set, else the only model, else
    cellstream-chat; ModelLoadError naming the setting when that is not among `names` (the models `where`)."""
    if not default:
        if len(names) == 1:
            return names[0]
        if FALLBACK_DEFAULT not in names:
            raise ModelLoadError(
                f"{len(names)} models {where} ({', '.join(names)}) and no default model: choose the one used by "
                "requests that name none with --default-model NAME (or CELLSTREAM_DEFAULT_MODEL)")
        return FALLBACK_DEFAULT
    if default not in names:
        raise ModelLoadError(f"default model {default!r} (--default-model, CELLSTREAM_DEFAULT_MODEL) is not among the "
                             f"models {where}: {', '.join(names)}")
    return default


class VersionsRefused(ModelLoadError):
    """Versions of a model whose files cannot be served: `refused` holds each one's reason."""

    def __init__(self, refused: dict[int, str], problems: list[str]) -> None:
        super().__init__("; ".join(refused.values()), problems)
        self.refused = refused


def build(model: repository.ModelFiles, policy: str, intra_op_threads: int,
          versions: dict[int, Path] | None = None) -> list[Loaded]:
    """Engines of `versions` (default: those `policy` serves) of `model`, or ModelLoadError naming every problem
    (the engine's own words: a flat NAME.onnx's name it; a version directory's model.onnx is named by its
    version)."""
    if model.problems:
        raise ModelLoadError(f"model {model.name!r}: {'; '.join(model.problems)}", model.problems)
    chosen = model.served(policy) if versions is None else versions
    loaded: list[Loaded] = []
    refused: dict[int, str] = {}
    problems: list[str] = []
    for version, path in chosen.items():
        stamp = repository.stamp(path)
        try:
            loaded.append((Engine(path, name=model.name, version=version, intra_op_threads=intra_op_threads), stamp))
        except ModelLoadError as exc:
            where = f"{describe(version_key(model.name, version))}: " if path.name == repository.VERSION_FILE else ""
            refused[version] = f"{where}{exc}"
            problems += exc.problems
    if refused:
        raise VersionsRefused(refused, problems)
    return loaded


class ModelControl:
    """The model versions this server serves, and their changes. Only the event loop calls it."""

    def __init__(self, settings: Settings, registry: ModelRegistry, store: SessionStore, metrics: Metrics,
                 tracing: Telemetry | None = None) -> None:
        self.settings = settings
        self.registry = registry
        self.store = store
        self.metrics = metrics
        self.tracing = tracing  # on: every version's batcher traces its batches, those loaded later too
        self._lock = asyncio.Lock()  # one change at a time (calls and polls)
        self._refused: dict[tuple[str, int], tuple[tuple[int, int], str]] = {}  # failed versions: stamp, why
        self._warned: dict[str, tuple[int, int]] = {}  # keys whose changed file was logged, at that stamp
        self._released: set[str] = set()  # keys unloaded and released: UNAVAILABLE "unloaded" in the index
        self._counts: dict[str, int] = {}  # live sessions per key, at the last count
        self._poll_errors: dict[str, str] = {}  # the last error polling logged per model: logged once
        self._poller: asyncio.Task[None] | None = None
        self._started = False  # batchers of versions added from now on start at once

    def serve(self, loaded: list[Loaded]) -> None:
        """Serve the versions start-up read (before the event loop runs the batchers)."""
        for engine, stamp in loaded:
            self._add(engine, stamp)
        if loaded and not self.settings.default_model:
            log.info("default model: %s (no default_model set: the only model, or %s)", self.registry.default,
                     FALLBACK_DEFAULT)

    def start(self) -> None:
        self._started = True
        for version in self.registry.versions.values():
            version.batcher.start()
        if self.settings.model_control == "poll":
            self._poller = asyncio.get_running_loop().create_task(self._poll_forever(), name="model-poll")

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        for version in self.registry.versions.values():
            await version.batcher.close()

    # --- changes -------------------------------------------------------------------------------

    async def load(self, name: str) -> Change:
        """Serve the versions of `name` the repository holds now (see the module's docstring)."""
        async with self._lock:
            found = await asyncio.to_thread(repository.scan, self.settings.model_dir)
            model = found.get(name)
            if model is None:
                raise NotFound(f"model {name!r} is not in the model repository {self.settings.model_dir} (as "
                               f"{name}.onnx or {name}/<version>/model.onnx); models there: {sorted(found)}")
            return await self._sync(model)

    async def unload(self, name: str) -> Change:
        """Unload every version of `name` (a model with no loaded version: nothing to do)."""
        async with self._lock:
            retired = [self._retire(version) for version in self.registry.of(name) if version.state == READY]
            released = await self._release_drained()
            return Change(name, draining=tuple(v.version for v in retired if v.key not in released),
                          released=tuple(v.version for v in retired if v.key in released))

    async def _sync(self, model: repository.ModelFiles, *, retry_refused: bool = True) -> Change:
        """Make the served versions of `model` those version_policy keeps; FailedPrecondition when one cannot be
        loaded (or the model's directory has a problem), with nothing changed. `retry_refused` False (polling):
        a version refused before is left out until its file changes."""
        present = model.versions
        if not retry_refused:
            present = {v: path for v, path in present.items()
                       if self._refused.get((model.name, v), ((), ""))[0] != repository.stamp(path)}
        wanted = repository.ModelFiles(model.name, present).served(self.settings.version_policy)
        loaded = {version.version: version for version in self.registry.of(model.name)}
        new = {v: path for v, path in wanted.items() if v not in loaded}
        try:
            built = await asyncio.to_thread(build, model, self.settings.version_policy,
                                            self.settings.ort_intra_op_threads, new)
        except ModelLoadError as exc:
            self._record_refusal(model, exc)
            raise FailedPrecondition(f"model {model.name!r} was not loaded, and what is served is unchanged: "
                                     f"{exc}") from None
        for engine, stamp in built:
            self._add(engine, stamp)
            self._refused.pop((model.name, engine.spec.version), None)
            self._released.discard(engine.spec.key)
        ready_again = []
        for version in loaded.values():
            if version.version not in wanted:
                continue
            if version.state == DRAINING:
                self.registry.revive(version.key)
                self._set_state(version, DRAINING, READY)
                ready_again.append(version.version)
            self._warn_if_changed(version, wanted[version.version])
        retired = [self._retire(v) for v in loaded.values() if v.version not in wanted and v.state == READY]
        released = await self._release_drained()
        change = Change(model.name, tuple(sorted(e.spec.version for e, _ in built)), tuple(ready_again),
                        tuple(v.version for v in retired if v.key not in released),
                        tuple(v.version for v in retired if v.key in released))
        if built or ready_again or retired:
            log.info("model %s: %s", model.name, change)
        return change

    def _add(self, engine: Engine, stamp: tuple[int, int]) -> None:
        spec = engine.spec
        batcher = Batcher(engine, self.store, self.metrics, max_batch_size=self.settings.max_batch_size,
                          max_queue_size=self.settings.max_queue_size,
                          max_queue_wait=self.settings.max_queue_wait_ms / 1000, tracing=self.tracing,
                          other_version=self.other_version)
        version = ModelVersion(engine, batcher, stamp)
        self.metrics.version_steps.watch(spec.name, spec.version, lambda: batcher.steps_run)
        if self._started:
            batcher.start()
        self.registry.add(version)
        self._event(spec, "loaded")
        self._set_state(version, None, READY)
        log.info("loaded %s from %s: %s; gates: %s", describe(spec.key), engine.path, spec,
                 engine.glass_box.path.name if engine.glass_box else "none (no glass-box graph beside it)")

    def _retire(self, version: ModelVersion) -> ModelVersion:
        """Start draining `version` (released once a count finds no session on it)."""
        self.registry.drain(version.key)
        self._set_state(version, READY, DRAINING)
        self._event(version.spec, "unloaded")
        log.info("unloaded %s: draining (no new sessions; its live sessions go on until they close or expire)",
                 describe(version.key))
        return version

    async def check_drains(self) -> list[str]:
        """Count live sessions per version; release the draining versions that have none. Returns their keys.
        Waits for a load or unload in progress (which may be reviving a draining version)."""
        async with self._lock:
            return await self._release_drained()

    async def _release_drained(self) -> list[str]:
        try:
            counts = await self.count()
        except CellstreamError as exc:  # a store that cannot be reached: the next sweep counts again
            if self.registry.draining:
                log.warning("draining versions not counted: %s", exc.message)
            return []
        released = []
        for version in self.registry.draining:
            if not counts.get(version.key, 0):
                await self._release(version)
                released.append(version.key)
        return released

    async def _release(self, version: ModelVersion) -> None:
        self.registry.remove(version.key)
        await version.batcher.close(FailedPrecondition(f"{describe(version.key)} was unloaded and released"))
        self._released.add(version.key)
        self._counts.pop(version.key, None)
        labels = (version.name, str(version.version))
        self.metrics.version_state.remove(*labels, DRAINING)
        with contextlib.suppress(KeyError):  # never counted: it drained before a count
            self.metrics.version_sessions.remove(*labels)
        self.metrics.version_steps.forget(version.name, version.version)
        self._event(version.spec, "released")
        log.info("released %s: no session is left on it", describe(version.key))

    async def count(self) -> dict[str, int]:
        """Live sessions per version key, counted now (and kept: the gauges and index read them)."""
        counts = await self.store.count_models()
        self._counts = counts
        for version in self.registry.versions.values():
            self.metrics.version_sessions.labels(version.name, str(version.version)).set(counts.get(version.key, 0))
        return counts

    def other_version(self, session_id: str, key: str) -> CellstreamError:
        """A batcher's refusal of a session pinned to another version than its own."""
        if key in self.registry.versions:  # a KServe sequence started again on another version while this step waited
            return FailedPrecondition(f"session {session_id!r} was started again on {describe(key)} while this step "
                                      "waited; nothing was applied")
        return self.registry.pinned_elsewhere(session_id, key)

    # --- polling -------------------------------------------------------------------------------

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.model_poll_interval_seconds)
            try:
                await self.poll()
            except Exception:  # the poller must outlive a bad directory entry
                log.exception("polling the model repository %s failed", self.settings.model_dir)

    async def poll(self) -> None:
        """Follow the repository: models added, changed and removed."""
        async with self._lock:
            found = await asyncio.to_thread(repository.scan, self.settings.model_dir)
            for name in sorted(set(found) | set(self.registry.names)):
                model = found.get(name, repository.ModelFiles(name))
                try:
                    await self._sync(model, retry_refused=False)
                    self._poll_errors.pop(name, None)
                except FailedPrecondition as exc:
                    if self._poll_errors.get(name) != exc.message:
                        self._poll_errors[name] = exc.message
                        log.error("%s", exc.message)

    # --- what is served ------------------------------------------------------------------------

    async def index(self) -> list[IndexEntry]:
        """Every version the repository holds or this server has loaded, with its state; counts live sessions
        (with a store that cannot be reached: the last count)."""
        found = await asyncio.to_thread(repository.scan, self.settings.model_dir)
        with contextlib.suppress(CellstreamError):
            await self.count()
        entries: list[IndexEntry] = []
        policy = self.settings.version_policy
        for name in sorted(set(found) | set(self.registry.names)):
            model = found.get(name, repository.ModelFiles(name))
            loaded = {version.version: version for version in self.registry.of(name)}
            served = model.served(policy)
            if model.problems:
                entries.append(IndexEntry(name, None, UNAVAILABLE, "; ".join(model.problems)))
            for number in sorted(set(loaded) | set(model.versions)):
                version = loaded.get(number)
                if version is not None:
                    entries.append(self._entry(version))
                    continue
                refused = self._refused.get((name, number))
                if refused is not None:
                    reason = f"refused: {refused[1]}"
                elif number not in served:
                    reason = f"not served under version_policy {policy}"
                else:
                    reason = "unloaded" if version_key(name, number) in self._released else "not loaded"
                entries.append(IndexEntry(name, number, UNAVAILABLE, reason))
        return entries

    def _entry(self, version: ModelVersion) -> IndexEntry:
        live = self._counts.get(version.key, 0)
        if version.state == DRAINING:
            reason = (f"unloaded, draining: {live} live sessions go on until they close or expire, then it is "
                      "released")
        else:
            reason = f"{live} live sessions"
        return IndexEntry(version.name, version.version, version.state, reason)

    def live_sessions(self, key: str) -> int:
        """Live sessions on a version at the last count."""
        return self._counts.get(key, 0)

    # --- bookkeeping ---------------------------------------------------------------------------

    def _record_refusal(self, model: repository.ModelFiles, error: ModelLoadError) -> None:
        if not isinstance(error, VersionsRefused):
            return
        for version, reason in error.refused.items():
            self._refused[(model.name, version)] = (repository.stamp(model.versions[version]), reason)
            self.metrics.model_events.labels(model.name, str(version), "refused").inc()

    def _warn_if_changed(self, version: ModelVersion, path: Path) -> None:
        stamp = repository.stamp(path)
        if stamp != version.stamp and self._warned.get(version.key) != stamp:
            self._warned[version.key] = stamp
            log.warning("%s: %s changed since it was loaded; a loaded version keeps its weights (its sessions "
                        "started with them): put new weights in a new version directory", describe(version.key),
                        path)

    def _event(self, spec: ModelSpec, event: str) -> None:
        self.metrics.model_events.labels(spec.name, str(spec.version), event).inc()

    def _set_state(self, version: ModelVersion, before: str | None, after: str) -> None:
        labels = (version.name, str(version.version))
        if before is not None:
            self.metrics.version_state.remove(*labels, before)
        self.metrics.version_state.labels(*labels, after).set(1)


def startup_names(settings: Settings) -> list[str] | None:
    """The models start-up loads: None for every model of model_dir, else those named (explicit control)."""
    if settings.model_control != "explicit" or settings.load_model == [EVERY_MODEL]:
        return None
    return list(settings.load_model)
