"""The model versions this server has loaded, their states, and which one a request means.

A loaded version is READY (it takes new sessions and stateless calls) or DRAINING (unloaded while sessions
were pinned to it: it serves those sessions only, until the last one closes or expires; then it is released
and forgotten here). A request that names a model but no version gets the model's default version: the one
`default_versions` pins, or else its highest READY version. A session is pinned to the version it opened
with: its steps find that version by the session's key (versions.py), one dictionary lookup.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from cellstream.service.batcher import Batcher
from cellstream.service.engine import Engine, ModelSpec
from cellstream.service.errors import FailedPrecondition, NotFound
from cellstream.service.versions import describe, key_parts

READY, DRAINING, UNAVAILABLE = "READY", "DRAINING", "UNAVAILABLE"
FALLBACK_DEFAULT = "cellstream-chat"  # the default model's name when several are served and none is configured


@dataclass(eq=False)
class ModelVersion:
    """One loaded version: its engine, its batcher (its steps never share an onnxruntime call with another
    version's), the file it came from as it was then, and its state."""

    engine: Engine
    batcher: Batcher
    stamp: tuple[int, int]  # the file's (mtime ns, size) when it was loaded
    state: str = READY
    spec: ModelSpec = field(init=False)  # the engine's, an attribute: a session's step reads it

    def __post_init__(self) -> None:
        self.spec = self.engine.spec

    @property
    def name(self) -> str:
        return self.engine.spec.name

    @property
    def version(self) -> int:
        return self.engine.spec.version

    @property
    def key(self) -> str:
        return self.engine.spec.key


class ModelRegistry:
    """What is loaded, by version key; what a request means. Only the event loop changes it."""

    def __init__(self, default_model: str = "", default_versions: Mapping[str, int] | None = None) -> None:
        self.versions: dict[str, ModelVersion] = {}  # every loaded version, READY or DRAINING
        self.batchers: dict[str, Batcher] = {}  # the same versions' batchers: a step's one lookup
        self.only_spec: ModelSpec | None = None  # the spec of the one loaded version, when there is one
        self._configured_default = default_model
        self._default_versions = dict(default_versions or {})
        self._models: dict[str, list[ModelVersion]] = {}  # by name, ascending version
        self._defaults: dict[str, ModelVersion] = {}  # each model's default version, if it has one
        self.default = default_model or FALLBACK_DEFAULT

    # --- changes -------------------------------------------------------------------------------

    def add(self, version: ModelVersion) -> None:
        self.versions[version.key] = version
        self.batchers[version.key] = version.batcher
        self._changed()

    def drain(self, key: str) -> ModelVersion:
        version = self.versions[key]
        version.state = DRAINING
        self._changed()
        return version

    def revive(self, key: str) -> ModelVersion:
        version = self.versions[key]
        version.state = READY
        self._changed()
        return version

    def remove(self, key: str) -> ModelVersion:
        version = self.versions.pop(key)
        del self.batchers[key]
        self._changed()
        return version

    def _changed(self) -> None:
        models: dict[str, list[ModelVersion]] = {}
        for version in sorted(self.versions.values(), key=lambda v: (v.name, v.version)):
            models.setdefault(version.name, []).append(version)
        self._models = models
        # Kept, not searched for: a stateless call or a new session looks its model's default up once.
        self._defaults = {name: found for name in models if (found := self._find_default(name)) is not None}
        self.only_spec = next(iter(self.versions.values())).spec if len(self.versions) == 1 else None
        if not self._configured_default:
            self.default = next(iter(models)) if len(models) == 1 else FALLBACK_DEFAULT

    # --- questions -----------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """The models with a loaded version, sorted."""
        return list(self._models)

    def of(self, name: str) -> list[ModelVersion]:
        """The loaded versions of model `name`, ascending."""
        return self._models.get(name, [])

    @property
    def draining(self) -> list[ModelVersion]:
        return [v for v in self.versions.values() if v.state == DRAINING]

    def name(self, model: str) -> str:
        """The model a request means ('' = the default) if it has a loaded version; NotFound otherwise."""
        name = model or self.default
        if name not in self._models:
            raise NotFound(f"model {model or name!r} is not served; models: {self.names}")
        return name

    def default_version(self, name: str) -> ModelVersion | None:
        """The version a request naming `name` but no version gets: the pinned one, or the highest READY one."""
        return self._defaults.get(name)

    def _find_default(self, name: str) -> ModelVersion | None:
        pinned = self._default_versions.get(name)
        for version in reversed(self.of(name)):
            if version.state == READY and (pinned is None or version.version == pinned):
                return version
        return None

    def resolve(self, model: str, version: int = 0) -> ModelVersion:
        """The READY version new work on `model` ('' = the default) goes to: `version`, or the default one when 0.
        NotFound for a model or version not loaded; FailedPrecondition for a draining one."""
        if version == 0:
            found = self._defaults.get(model or self.default)
            if found is None:
                raise FailedPrecondition(self._no_default(self.name(model)))
            return found
        found = self.find(model, version)
        if found.state != READY:
            raise FailedPrecondition(f"{describe(found.key)} is draining: it was unloaded, and serves only the "
                                     f"sessions opened on it until they close or expire; {self.listing(found.name)}")
        return found

    def find(self, model: str, version: int) -> ModelVersion:
        """Version `version` of `model` ('' = the default), READY or DRAINING; NotFound if it is not loaded."""
        name = self.name(model)
        found = next((v for v in self.of(name) if v.version == version), None)
        if found is None:
            raise NotFound(f"model {name!r} has no version {version} loaded; {self.listing(name)}")
        return found

    def listing(self, name: str) -> str:
        """The loaded versions of `name` in words, with their states."""
        versions = ", ".join(f"{v.version} ({v.state})" for v in self.of(name))
        return f"its loaded versions: {versions}" if versions else "it has no loaded version"

    def _no_default(self, name: str) -> str:
        pinned = self._default_versions.get(name)
        if pinned is not None:
            return (f"model {name!r} has no READY version {pinned} (default_versions pins it); {self.listing(name)}: "
                    "name a version, or load that one")
        return (f"every loaded version of model {name!r} is draining (it was unloaded): they serve only the sessions "
                f"opened on them; {self.listing(name)}: load the model again for new sessions")

    def pinned_elsewhere(self, session_id: str, key: str) -> FailedPrecondition:
        """The refusal of a step of a session pinned to a version this server does not serve."""
        name, _ = key_parts(key)
        return FailedPrecondition(
            f"session {session_id!r} is pinned to {describe(key)}, which this server does not serve "
            f"({self.listing(name)}); a session keeps the model version it was opened with: load that version, or "
            "open a new session")
